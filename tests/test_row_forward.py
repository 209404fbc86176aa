"""The serving engine's forward (``transformer.RowWrite``: each row at its own slot and position) against the
plain cached forward of each sequence alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.model import transformer

K, S = 4, 32  # block length, cache positions per slot (a multiple of 16: the Pallas kernel's compiled case)


def _alone(params, cfg, tokens_L, block):
  """Logits of block ``block`` of ``tokens`` after prefilling the blocks before it, block-causally, alone."""
  L = (block + 1) * K
  mask = transformer.block_causal_mask(L, K)
  cache = transformer.init_cache(cfg, 1, S)
  full = jnp.zeros((1, L, S), bool).at[:, :, :L].set(mask)
  logits, _ = transformer.forward_cached(params, cfg, cache, start=0, kv_mask=full, tokens=jnp.asarray([tokens_L[:L]]))
  return np.asarray(logits[0, block * K:L])


def _rows_forward(params, cfg, seqs, blocks, extra):
  """Every sequence's blocks before ``blocks[i]`` as extra rows, then one RowWrite forward of each sequence's block
  ``blocks[i]`` (main rows) plus ``extra`` (slot, block) rows; -> the main rows' logits."""
  M = len(seqs)
  cache = transformer.init_cache(cfg, M + 1, S)
  rows = [(i, b) for i, n in enumerate(blocks) for b in range(n)] + list(extra)  # prompt blocks, then extras

  def run(cache, main, rows):
    slot = np.array([i for i, _ in main] + [i for i, _ in rows], np.int32)
    block = np.array([b for _, b in main] + [b for _, b in rows], np.int32)
    tokens = np.stack([seqs[i][b * K:(b + 1) * K] for i, b in list(main) + list(rows)])
    key = np.arange(S)
    mask = np.broadcast_to(((key[None] < (block[:, None] + 1) * K))[:, None], (len(slot), K, S))
    pos = block[:, None] * K + np.arange(K)[None]
    write = transformer.RowWrite(slot=jnp.asarray(slot), start=jnp.asarray(block * K), direct=len(main))
    logits, cache = transformer.forward_cached(params, cfg, cache, start=write, kv_mask=jnp.asarray(mask),
                                               tokens=jnp.asarray(tokens), positions=jnp.asarray(pos))
    return np.asarray(logits[:len(main)]), cache

  _, cache = run(cache, [], rows[:len(rows) - len(extra)][:1])  # one prompt block alone first (gathered rows only)
  logits, _ = run(cache, list(enumerate(blocks)), rows[1:])
  return logits


def test_row_forward_equals_each_sequence_alone(tiny):
  cfg, params = tiny
  with jax.enable_x64(True):
    cfg = dataclasses.replace(cfg, compute_dtype="float64", moe_backend="dense")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 500, S).tolist() for _ in range(3)]
    blocks = [2, 0, 4]  # each slot decodes its own block: slot 1 its first, slot 2 its fifth
    got = _rows_forward(params, cfg, seqs, blocks, extra=[(1, 3)])  # an extra row past slot 1's block: unseen
    for i, b in enumerate(blocks):
      np.testing.assert_allclose(got[i], _alone(params, cfg, seqs[i], b), rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_row_forward_pallas_attention_close_to_xla_gpu(tiny):
  """On a GPU the rows attend through the Pallas kernel (each row's slot read in place): close to XLA's in float32."""
  cfg, params = tiny
  from dmax_jax.model.kernels import attention_pallas  # pylint: disable=import-outside-toplevel

  q = jnp.zeros((1, K, cfg.num_attention_heads, cfg.head_dim), jnp.float32)
  assert attention_pallas.supported(q, jnp.zeros((1, 1, S, cfg.num_key_value_heads, cfg.head_dim)))  # not XLA's
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, 500, S).tolist() for _ in range(3)]
  outs = {a: _rows_forward(params, dataclasses.replace(cfg, attention=a), seqs, [2, 0, 4], extra=[(1, 3)])
          for a in ("xla", "pallas")}
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-3, atol=1e-3)
