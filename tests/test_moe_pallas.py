"""The Pallas MoE backend against the dense reference, the grouped backend and the golden logits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmax_jax
from dmax_jax.model import moe, quant
from dmax_jax.model.kernels import moe_pallas
from conftest import with_numerics


def _weights(key, E, D, F, dtype=jnp.float32):
  kg, ku, kd = jax.random.split(key, 3)
  wg = jax.random.normal(kg, (E, D, F)) / np.sqrt(D)
  wu = jax.random.normal(ku, (E, D, F)) / np.sqrt(D)
  wd = jax.random.normal(kd, (E, F, D)) / np.sqrt(F)
  return wg.astype(dtype), wu.astype(dtype), wd.astype(dtype)


def _random_ids(key, T, X, E):
  keys = jax.random.split(key, T)
  return jnp.stack([jax.random.permutation(k, E)[:X] for k in keys]).astype(jnp.int32)


def _case(name, T, X, E, seed=0):
  kx, ki, kw = jax.random.split(jax.random.key(seed), 3)
  if name == "one_expert_all_rows":  # every token on expert 2 alone: 3 blocks of one expert
    idx = jnp.full((T, X), 2, jnp.int32)
  elif name == "few_experts":  # experts {1, 5} only: most experts get zero rows
    idx = jnp.stack([jnp.where(jnp.arange(T) % 2 == 0, 1, 5), jnp.where(jnp.arange(T) % 2 == 0, 5, 1)], 1)
  else:
    idx = _random_ids(ki, T, X, E)
  x = jax.random.normal(kx, (T, 64))
  w = jax.random.uniform(kw, (T, X), minval=0.1, maxval=1.0)
  return x, idx.astype(jnp.int32), w


# Interpret-mode kernels take ~8 s a case on 2 CPU cores: the first two (features the other cases and the shared-expert
# test cover too) run with -m slow.
CASES = [  # (name, T, X, E, block_rows)
    pytest.param("random", 5, 3, 8, 16, marks=pytest.mark.slow),  # T*X = 15: a partial block, several empty experts
    pytest.param("random", 9, 4, 16, 8, marks=pytest.mark.slow),  # T*X = 36, smaller blocks
    ("random", 24, 4, 16, 16),  # the tiny fixture's routing shape
    ("one_expert_all_rows", 37, 1, 8, 16),  # 37 rows of one expert: blocks 16 + 16 + 5
    ("few_experts", 20, 2, 16, 16),  # two experts, 20 rows each, 14 experts empty
]


@pytest.mark.parametrize("name,T,X,E,block_rows", CASES)
def test_pallas_equals_dense_and_grouped(name, T, X, E, block_rows):
  x, idx, w = _case(name, T, X, E)
  wg, wu, wd = _weights(jax.random.key(1), E, 64, 32)
  got = moe_pallas.experts_pallas(x, idx, w, wg, wu, wd, block_rows=block_rows, interpret=True)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(got, moe.experts_dense(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, moe.experts_grouped(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_pallas_small_tiles_under_jit():
  """Tiles smaller than the dimensions: the in-kernel contraction loop and the F/D tile grid axes."""
  x, idx, w = _case("random", 11, 3, 8, seed=3)
  wg, wu, wd = _weights(jax.random.key(4), 8, 64, 32)
  f = jax.jit(lambda *a: moe_pallas.experts_pallas(
      *a, interpret=True, gate_up_tiles=moe_pallas.Tiles(n=16, k=16), down_tiles=moe_pallas.Tiles(n=32, k=16)))
  np.testing.assert_allclose(f(x, idx, w, wg, wu, wd), moe.experts_dense(x, idx, w, wg, wu, wd), rtol=1e-5, atol=1e-5)


def test_pallas_bf16_returns_bf16_close_to_dense():
  x, idx, w = _case("random", 6, 2, 8, seed=5)
  wg, wu, wd = _weights(jax.random.key(6), 8, 64, 32)  # fp32 params, bf16 compute: cast inside
  x = x.astype(jnp.bfloat16)
  got = moe_pallas.experts_pallas(x, idx, w, wg, wu, wd, interpret=True)
  want = moe.experts_dense(x, idx, w, wg, wu, wd)
  assert got.dtype == jnp.bfloat16
  err = np.linalg.norm(np.float32(got) - np.float32(want)) / np.linalg.norm(np.float32(want))
  assert err < 1e-2


@pytest.mark.parametrize("method", ["compare", "sort"])
def test_block_layout_by_hand(method):
  """T=3 tokens, X=2, E=4, blocks of 2 rows: expert sizes [3, 0, 1, 2]."""
  idx = jnp.array([[0, 3], [2, 0], [0, 3]], jnp.int32)  # pairs 0..5 -> experts 0,3,2,0,0,3
  lay = moe_pallas.block_layout(idx, 4, 2, method=method)
  # expert 0 takes blocks 0-1 (rows 0-3) for pairs 0, 3, 4; expert 2 block 2 (rows 4-5) for pair 2;
  # expert 3 block 3 (rows 6-7) for pairs 1, 5
  np.testing.assert_array_equal(lay["pos"], [[0, 6], [4, 1], [2, 7]])
  assert moe_pallas.num_row_blocks(6, 4, 2) == 5  # (6 + 4 * 1) // 2
  np.testing.assert_array_equal(lay["src"], [0, 1, 2, 3, 1, 3, 0, 2, 3, 3])  # 3 = T: padding
  np.testing.assert_array_equal(lay["expert"], [0, 0, 2, 3, 3])  # unused block 4: clipped
  np.testing.assert_array_equal(lay["used"], [4])


def test_block_layout_rank_methods_agree():
  """Ranking by comparison and by stable sort give the same layout (skewed routing, repeated experts)."""
  idx = jax.random.randint(jax.random.key(7), (97, 6), 0, 11) ** 2 % 11
  a = moe_pallas.block_layout(idx, 11, 16, method="compare")
  b = moe_pallas.block_layout(idx, 11, 16, method="sort")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("R,E,bm", [(1, 4, 2), (6, 4, 2), (7, 3, 3), (8, 5, 4), (5, 6, 2)])
def test_row_block_bound_is_tight(R, E, bm):
  """The static block count equals the most blocks any split of R rows over E experts needs."""
  worst = max(sum(-(-g // bm) for g in sizes)
              for sizes in itertools.product(range(R + 1), repeat=E) if sum(sizes) == R)
  assert moe_pallas.num_row_blocks(R, E, bm) == worst


def test_golden_logits_pallas(tiny, golden):
  cfg, params = tiny
  cfg = with_numerics(cfg, moe_backend="pallas")
  got = dmax_jax.forward(params, cfg, tokens=golden["input_ids"], positions=golden["position_ids"])
  np.testing.assert_allclose(got, golden["logits_full"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [32, 256])
def test_pallas_bf16_mini_shapes_gpu(T):
  """LLaDA-2.0-mini expert shapes, bf16, compiled with the Triton backend."""
  E, X, D, F = 256, 8, 2048, 512
  kx, ki, kw = jax.random.split(jax.random.key(T), 3)
  x = jax.random.normal(kx, (T, D), jnp.bfloat16)
  idx = _random_ids(ki, T, X, E)
  w = jax.random.uniform(kw, (T, X), minval=0.1, maxval=1.0)
  wg, wu, wd = _weights(jax.random.key(7), E, D, F, jnp.bfloat16)
  got = jax.jit(moe_pallas.experts_pallas)(x, idx, w, wg, wu, wd)
  want = jax.jit(moe.experts_dense)(x, idx, w, wg, wu, wd)
  assert got.dtype == jnp.bfloat16
  got, want = np.float32(got), np.float32(want)
  assert np.isfinite(got).all()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  sg, su, sd = (a[0] for a in _weights(jax.random.key(8), 1, D, F, jnp.bfloat16))  # the shared expert, merged in
  got_m = np.float32(jax.jit(lambda *a: moe_pallas.experts_pallas(*a, shared=(sg, su, sd)))(x, idx, w, wg, wu, wd))
  want_m = want + np.float32((jax.nn.silu(x @ sg) * (x @ su)) @ sd)
  assert np.linalg.norm(got_m - want_m) / np.linalg.norm(want_m) < 1e-2


def test_pallas_skips_invalid_pairs():
  """Pairs marked invalid (experts on another device) contribute nothing and take no rows."""
  x, idx, w = _case("random", 13, 3, 8, seed=5)
  wg, wu, wd = _weights(jax.random.key(6), 8, 64, 32)
  valid = idx < 5  # experts 5..7 live elsewhere
  got = moe_pallas.experts_pallas(x, idx, w, wg, wu, wd, interpret=True, valid_TX=valid)
  want = moe.experts_dense(x, idx, jnp.where(valid, w, 0.0), wg, wu, wd)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lay = moe_pallas.block_layout(idx, 8, 16, valid_TX=valid)
  assert int(lay["used"][0]) == sum(-(-int(jnp.sum(idx == e)) // 16) for e in range(5))
  assert int(jnp.sum(lay["src"] < 13)) == int(jnp.sum(valid))  # one padded row per valid pair


def _numpy_swiglu_expert(x, wg, wu, wd):
  """silu(x @ Wg) * (x @ Wu) @ Wd in float64 NumPy."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  g, u = x @ wg, x @ wu
  return (g / (1 + np.exp(-g)) * u) @ wd


@pytest.mark.parametrize("T,block_rows,int8", [  # one partial shared block; three blocks, the last partial
    (5, 16, False), (19, 8, True),
    pytest.param(5, 16, True, marks=pytest.mark.slow), pytest.param(19, 8, False, marks=pytest.mark.slow)])
def test_pallas_with_the_shared_expert_in_its_kernels(T, block_rows, int8):
  """``shared=``: the shared expert's blocks run first in the same kernels; routed + shared against NumPy float64."""
  x, idx, w = _case("random", T, 3, 8, seed=7)
  routed = _weights(jax.random.key(8), 8, 64, 32)
  shared = tuple(a[0] for a in _weights(jax.random.key(9), 1, 64, 32))
  if int8:
    routed, shared = ([quant.quantize(a, 16) for a in ws] for ws in (routed, shared))
  with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    got = moe_pallas.experts_pallas(x64, idx, w, *routed, block_rows=block_rows, interpret=True, shared=shared)

  def dense64(a):  # the weight in float64: int8 values times their scales, each group's rows of K
    if not int8:
      return np.asarray(a, np.float64)
    v = np.swapaxes(np.asarray(a.values, np.float64), -1, -2)
    return v * np.repeat(np.asarray(a.scale, np.float64), a.group, axis=-2)

  dense = [dense64(a) for a in routed]
  want = _numpy_swiglu_expert(x, *(dense64(a) for a in shared))
  for t in range(T):
    for s in range(idx.shape[1]):
      e = int(idx[t, s])
      want[t] += float(w[t, s]) * _numpy_swiglu_expert(np.asarray(x)[t:t + 1], *(d[e] for d in dense))[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T,valid", [pytest.param(5, False, marks=pytest.mark.slow), (19, False), (13, True)])
def test_pallas_rows_found_from_pairs_equal_the_row_scatter(T, valid, monkeypatch):
  """Blocks finding their rows' tokens among the pairs' rows (``PairRows``) give the ``src`` scatter's output.

  With the shared expert's lead blocks (the last one partial at T=5 and 19) and pairs without a row.
  """
  x, idx, w = _case("random", T, 3, 8, seed=13)
  routed = _weights(jax.random.key(14), 8, 64, 32)
  shared = tuple(a[0] for a in _weights(jax.random.key(15), 1, 64, 32))
  kw = dict(interpret=True, shared=None if valid else shared, valid_TX=(idx < 5) if valid else None)
  by_pairs = moe_pallas.experts_pallas(x, idx, w, *routed, **kw)
  monkeypatch.setattr(moe_pallas, "PAIR_ROWS_MAX_PAIRS", 0)
  np.testing.assert_array_equal(np.asarray(by_pairs), np.asarray(moe_pallas.experts_pallas(x, idx, w, *routed, **kw)))


def test_block_layout_pair_rows():
  """``rows`` is ``pos`` flattened, -1 for a pair without a row; each row holds the token ``src`` says."""
  idx = jnp.array([[0, 3], [2, 0], [0, 3]], jnp.int32)
  lay = moe_pallas.block_layout(idx, 4, 2, valid_TX=idx != 2)
  np.testing.assert_array_equal(lay["rows"], [0, 4, -1, 1, 2, 5])  # expert 0: block 0-1, expert 3: block 2
  np.testing.assert_array_equal(lay["src"][:6], [0, 1, 2, 3, 0, 2])
  np.testing.assert_array_equal(lay["used"], [3])


def test_pallas_reads_the_shared_expert_of_its_layer_from_a_stack():
  """``shared`` as ``[n, ...]`` stacks and a traced ``shared_index``: the same as passing that layer's weights."""
  x, idx, w = _case("random", 11, 2, 8, seed=10)
  routed = _weights(jax.random.key(11), 8, 64, 32)
  stack = _weights(jax.random.key(12), 3, 64, 32)  # three layers' shared experts
  f = jax.jit(lambda i: moe_pallas.experts_pallas(x, idx, w, *routed, interpret=True, shared=stack, shared_index=i))
  for i in range(3):
    want = moe_pallas.experts_pallas(x, idx, w, *routed, interpret=True, shared=tuple(a[i] for a in stack))
    np.testing.assert_array_equal(np.asarray(f(i)), np.asarray(want))
  assert not np.allclose(np.asarray(f(0)), np.asarray(f(1)))
