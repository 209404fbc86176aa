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
