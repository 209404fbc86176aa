"""The decoding attention kernel against a NumPy float64 re-statement, the golden logits and XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmax_jax
from dmax_jax.model import transformer
from dmax_jax.model.kernels import attention_pallas
from conftest import with_numerics


def _numpy_attention(q_BLHR, k_BSGR, v_BSGR, mask_BLS):
  """Grouped-query softmax attention in float64, head by head; a row that sees no key attends uniformly."""
  B, L, H, R = q_BLHR.shape
  G = k_BSGR.shape[2]
  out = np.zeros((B, L, H, R))
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      s = q_BLHR[b, :, h] @ k_BSGR[b, :, g].T / np.sqrt(R)
      s = np.where(mask_BLS[b], s, -np.inf)
      s = np.where(mask_BLS[b].any(axis=1, keepdims=True), s, 0.0)
      p = np.exp(s - s.max(axis=1, keepdims=True))
      out[b, :, h] = (p / p.sum(axis=1, keepdims=True)) @ v_BSGR[b, :, g]
  return out


def _case(B, L, H, G, R, S, N, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, L, H, R))
  k, v = rng.standard_normal((2, N, B, S, G, R))
  mask = rng.random((B, L, S)) < 0.5
  mask[0, 1] = False  # a query that sees nothing
  mask[-1, -1] = True  # one that sees everything
  return q, k, v, mask


@pytest.mark.parametrize("L, block_s, splits", [(16, 16, 1), (20, 8, 1), (3, 64, 1), (20, 8, 4), (16, 64, 2)])
def test_kernel_equals_numpy_reference(L, block_s, splits):
  """One query block or padded ones; several key chunks or one; keys split over programs or not."""
  B, H, G, R, S, N = 2, 4, 2, 16, 64, 3
  q, k, v, mask = _case(B, L, H, G, R, S, N)
  with jax.enable_x64(True):
    got = attention_pallas.cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(2),
                                            jnp.asarray(mask), block_s=block_s, key_splits=splits)
    assert got.shape == (B, L, H, R) and got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k[2], v[2], mask), rtol=1e-12, atol=1e-12)


def _numpy_prepared(x_BLnR, w_R, pos_BL, inv_freq, eps):
  """RMSNorm times its weight, then rotate-half RoPE on the first 2 * len(inv_freq) dims, float64."""
  x = x_BLnR / np.sqrt(np.mean(x_BLnR**2, axis=-1, keepdims=True) + eps) * w_R
  h = len(inv_freq)
  ang = pos_BL[:, :, None, None] * inv_freq
  x1, x2 = x[..., :h], x[..., h:2 * h]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang), x[..., 2 * h:]], -1)


@pytest.mark.parametrize("L, splits", [(16, 1), (20, 4)])
def test_write_and_attend_equals_numpy_reference(L, splits):
  """Raw projections in: keys normalised, rotated and written at ``start`` of their layer, nothing else touched;
  queries prepared the same way attend over the updated cache."""
  B, H, G, R, S, N, layer, start, eps = 2, 4, 2, 16, 64, 3, 1, 24, 1e-6
  rng = np.random.default_rng(3)
  qkv = rng.standard_normal((B, L, (H + 2 * G) * R))
  _, k, v, mask = _case(B, L, H, G, R, S, N, seed=4)
  norms = rng.uniform(0.5, 1.5, (N, 3 + 2 * R))  # q norm at columns 3.., k norm at 3 + R..
  pos = start + 2 * np.arange(L)[None, :] + np.arange(B)[:, None]
  inv_freq = 100.0 ** (-np.arange(0, 8, 2) / 8)
  angles = pos[:, :, None] * inv_freq
  with jax.enable_x64(True):
    prep = attention_pallas.QKPrep(norms=jnp.asarray(norms), q_col=3, k_col=3 + R, eps=eps,
                                   rotation=(jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))))
    out, k2, v2 = attention_pallas.write_and_attend(
        jnp.asarray(qkv), jnp.asarray(k), jnp.asarray(v), layer, start, jnp.asarray(mask), prep, num_heads=H,
        key_splits=splits)
  split = qkv.reshape(B, L, H + 2 * G, R)
  want_k, want_v = k.copy(), v.copy()
  want_k[layer, :, start:start + L] = _numpy_prepared(split[:, :, H:H + G], norms[layer, 3 + R:], pos, inv_freq, eps)
  want_v[layer, :, start:start + L] = split[:, :, H + G:]
  np.testing.assert_allclose(np.asarray(k2), want_k, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(v2), want_v)
  q = _numpy_prepared(split[:, :, :H], norms[layer, 3:3 + R], pos, inv_freq, eps)
  want = _numpy_attention(q, want_k[layer], want_v[layer], mask)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-11, atol=1e-11)


def test_kernel_reads_only_its_layer():
  """Changing another layer's cache leaves the output alone; changing its own changes it."""
  q, k, v, mask = _case(1, 16, 2, 1, 16, 32, 3)
  run = lambda k_: np.asarray(attention_pallas.cached_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k_, jnp.float32),
                                                                jnp.asarray(v, jnp.float32), 1, jnp.asarray(mask)))
  base = run(k)
  other, mine = k.copy(), k.copy()
  other[[0, 2]] += 1.0
  mine[1, 0, 5] += 1.0
  np.testing.assert_array_equal(run(other), base)
  assert np.abs(run(mine) - base).max() > 1e-3


def test_cached_forward_with_the_kernel_equals_xla(tiny, golden):
  """Block by block through the cache: attention="pallas" (interpreted here) gives XLA's logits in float64."""
  cfg, params = tiny
  ids = golden["input_ids"]
  B, L = ids.shape
  K, S = 8, 32
  key_block = np.arange(S) // K
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    outs = {}
    for impl in ("xla", "pallas"):
      c = with_numerics(cfg, attention=impl, compute_dtype="float64")
      cache, got = dmax_jax.init_cache(c, B, S, dtype=jnp.float64), []
      for start in range(0, L, K):
        kv_mask = np.broadcast_to(key_block[None, :] <= ((start + np.arange(K)) // K)[:, None], (B, K, S))
        pos = np.broadcast_to(np.arange(start, start + K), (B, K))
        logits, cache = dmax_jax.forward_cached(p64, c, cache, tokens=ids[:, start:start + K], positions=pos,
                                                start=start, kv_mask=kv_mask)
        got.append(np.asarray(logits))
      outs[impl] = np.concatenate(got, axis=1)
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-10, atol=1e-10)
  want = dmax_jax.forward(params, cfg, tokens=ids, mask=golden["mask_block_causal"])
  np.testing.assert_allclose(outs["pallas"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B, splits", [(1, 1), (1, 4), (8, 2)])
def test_kernel_bf16_mini_shapes_gpu(B, splits):
  """LLaDA-2.0-mini's attention (16 heads, 4 groups, head_dim 128) over a 512-key cache, bf16: close to XLA's."""
  L, H, G, R, S, N = 32, 16, 4, 128, 512, 3
  q, k, v, mask = _case(B, L, H, G, R, S, N, seed=1)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  run = jax.jit(lambda *a: attention_pallas.cached_attention(*a, key_splits=splits))
  got = run(bf(q), bf(k), bf(v), jnp.int32(1), jnp.asarray(mask))
  want = _numpy_attention(np.asarray(bf(q), np.float64), np.asarray(bf(k[1]), np.float64),
                          np.asarray(bf(v[1]), np.float64), mask)
  xla = transformer.attend(bf(q), bf(k[1]), bf(v[1]), jnp.asarray(mask))
  err = np.abs(np.asarray(got, np.float64) - want).max()
  err_xla = np.abs(np.asarray(xla, np.float64) - want).max()
  assert err < 2e-2 and err < 2 * err_xla + 1e-3, (err, err_xla)  # bf16 outputs of magnitude ~1


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8])
def test_write_and_attend_bf16_mini_shapes_gpu(B):
  """LLaDA-2.0-mini's heads (16 of 128, 4 groups, RoPE on 64 dims), bf16, compiled: the written keys and the
  output against NumPy float64 on the same bf16 inputs."""
  L, H, G, R, S, N, layer, start, eps = 32, 16, 4, 128, 512, 3, 1, 480, 1e-6
  rng = np.random.default_rng(5)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  f64 = lambda a: np.asarray(a, np.float64)
  qkv, norms = bf(rng.standard_normal((B, L, (H + 2 * G) * R))), bf(rng.uniform(0.5, 1.5, (N, 2 * R)))
  _, k, v, mask = _case(B, L, H, G, R, S, N, seed=6)
  pos = np.broadcast_to(start + np.arange(L), (B, L))
  inv_freq = 600000.0 ** (-np.arange(0, 64, 2, dtype=np.float32) / 64)
  angles = np.float32(pos[:, :, None] * inv_freq)
  prep = attention_pallas.QKPrep(norms=norms, q_col=0, k_col=R, eps=eps,
                                 rotation=(jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))))
  run = jax.jit(lambda *a: attention_pallas.write_and_attend(*a, prep, num_heads=H))
  out, k2, _ = run(qkv, bf(k), bf(v), jnp.int32(layer), jnp.int32(start), jnp.asarray(mask))
  split = f64(qkv).reshape(B, L, H + 2 * G, R)
  want_k = _numpy_prepared(split[:, :, H:H + G], f64(norms)[layer, R:], pos, f64(inv_freq), eps)
  got_k = f64(k2)[layer, :, start:start + L]
  assert np.abs(got_k - want_k).max() < 2e-2 * np.abs(want_k).max()
  assert (f64(k2)[layer, :, :start] == f64(bf(k))[layer, :, :start]).all()
  keys, values = f64(k2)[layer], f64(bf(v))[layer]
  values[:, start:start + L] = split[:, :, H + G:]
  want = _numpy_attention(_numpy_prepared(split[:, :, :H], f64(norms)[layer, :R], pos, f64(inv_freq), eps), keys,
                          values, mask)
  assert np.abs(f64(out) - want).max() < 2e-2, np.abs(f64(out) - want).max()


def test_kernel_rows_read_the_named_cache_rows():
  """``rows``: query row b attends over cache row rows[b] (the serving engine's slots), read in place."""
  B, L, H, G, R, S, N = 3, 16, 4, 2, 16, 32, 2
  q, k, v, mask = _case(B, L, H, G, R, S, N, seed=3)
  k5, v5 = (np.random.default_rng(4).standard_normal((N, 5, S, G, R)) for _ in range(2))
  rows = np.array([4, 0, 4])
  with jax.enable_x64(True):
    got = attention_pallas.cached_attention(jnp.asarray(q), jnp.asarray(k5), jnp.asarray(v5), jnp.int32(1),
                                            jnp.asarray(mask), block_s=16, key_splits=2, rows=jnp.asarray(rows))
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k5[1][rows], v5[1][rows], mask),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_kernel_rows_bf16_gpu():
  """The same indirection compiled: rows of a 9-row cache, mini's heads, bf16, against NumPy on the bf16 inputs."""
  B, L, H, G, R, S, N = 6, 32, 16, 4, 128, 512, 2
  q, _, _, mask = _case(B, L, H, G, R, S, N, seed=5)
  rng = np.random.default_rng(6)
  k, v = rng.standard_normal((2, N, 9, S, G, R))
  rows = np.array([8, 0, 3, 3, 7, 1])
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  got = jax.jit(lambda *a: attention_pallas.cached_attention(*a[:5], rows=a[5]))(
      bf(q), bf(k), bf(v), jnp.int32(1), jnp.asarray(mask), jnp.asarray(rows, jnp.int32))
  f64 = lambda a: np.asarray(bf(a), np.float64)
  want = _numpy_attention(f64(q), f64(k[1])[rows], f64(v[1])[rows], mask)
  assert np.abs(np.asarray(got, np.float64) - want).max() < 2e-2
