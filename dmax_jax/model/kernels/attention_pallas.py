"""Attention of a few queries over a stacked KV cache as one Pallas kernel (the decoding path).

Shape letters: the package glossary (``dmax_jax/shapes.py``); N is the number
of layers in the cache stack.

Why: a decoding forward attends 32 queries per sequence over a cache of a few
hundred keys. XLA's einsum / softmax / einsum takes about eight small kernels
per layer (the layer's cache slice copied out of the stack, transposes, the
two products, max / exp / sum), each a microsecond or two of launch-bound
work, while the data are a few hundred kilobytes. This kernel reads the keys
and values in place from the whole ``[N, B, S, G, R]`` stack at the layer's
index and does everything in one launch.

Grid: (batch, query head, query block, key split). A program holds ``block_q``
queries of one head and runs an online softmax (fp32 running max, sum and
output) over its split of the keys in chunks of ``block_s``; the heads of one
key/value group read the same key chunks, which they mostly find in L2. With
several splits (``key_splits``: more programs, shorter loops, the faster
setting at decoding sizes) each writes its normalised output and log-sum-exp
and one fused XLA step merges them. Scores and softmax are fp32
(fp64 for fp64 inputs), the probabilities are cast to the values' dtype for
the second product, which accumulates in fp32; masked scores are the float32
minimum (as in ``transformer.attend``), so a row with no visible key attends
uniformly, as the XLA path does. The result differs from ``attend`` only by
rounding (the probabilities are normalised after the product, not before).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dmax_jax.model.config import accum_dtype
from dmax_jax.model.kernels import interpret_default as _interpret

_NEG = float(jnp.finfo(jnp.float32).min)
BLOCK_Q = 16  # queries per program (Triton's dot needs >= 16 rows)
BLOCK_S = 128  # keys per online-softmax step
KEY_SPLITS = 4  # key runs per (row, head, query block), each by its own program (BENCHMARKS.md)
NUM_WARPS = 4
NUM_STAGES = 2


def _pow2_at_most(n: int, cap: int) -> int:
  """The largest power of two <= ``cap`` that divides ``n`` (1 if none > 1 does)."""
  t = 1
  while t * 2 <= cap and n % (t * 2) == 0:
    t *= 2
  return t


def supported(q_BLHR, k_cache_NBSGR, interpret=None) -> bool:
  """Whether ``cached_attention`` runs these shapes / dtypes (else the caller uses XLA's attention).

  Compiled (GPU): bf16 / fp16 / fp32 inputs, ``head_dim`` a power of two >= 16,
  a cache length divisible by 16. Interpreted: any.
  """
  if _interpret(interpret):
    return True
  R, S = q_BLHR.shape[-1], k_cache_NBSGR.shape[2]
  return (jax.default_backend() == "gpu" and q_BLHR.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
          and R >= 16 and R & (R - 1) == 0 and S % 16 == 0)


def _kernel(layer_ref, q_ref, k_ref, v_ref, mask_ref, *out_refs, block_q, block_s, splits, group_size, precision):
  """One (batch row, head, query block, key split): online softmax over the split's key chunks.

  One split: writes the attention output. Several: writes the split's
  normalised output (fp32) and its log-sum-exp, which ``_combine`` merges.
  """
  b, h, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  g = h // group_size
  layer = layer_ref[0]
  R = q_ref.shape[-1]
  span = k_ref.shape[2] // splits  # keys per split
  acc_t = accum_dtype(q_ref.dtype)
  rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
  q = q_ref[b, rows, h, :]
  scale = R**-0.5

  def body(j, carry):
    m, total, acc = carry
    keys = pl.ds(pl.multiple_of(c * span + j * block_s, block_s), block_s)
    k = k_ref[layer, b, keys, g, :].astype(q.dtype)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc_t, precision=precision)
    s = jnp.where(mask_ref[b, rows, keys], s * scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    v = v_ref[layer, b, keys, g, :].astype(q.dtype)
    pv = jnp.dot(p.astype(q.dtype), v, preferred_element_type=acc_t, precision=precision)
    return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  init = (jnp.full((block_q,), _NEG, acc_t), jnp.zeros((block_q,), acc_t), jnp.zeros((block_q, R), acc_t))
  m, total, acc = jax.lax.fori_loop(0, span // block_s, body, init)
  out = acc / total[:, None]
  if len(out_refs) == 1:
    out_refs[0][b, rows, h, :] = out.astype(out_refs[0].dtype)
  else:
    out_refs[0][c, b, rows, h, :] = out
    out_refs[1][c, b, rows, h] = m + jnp.log(total)


def _combine(part_CBLHR, lse_CBLH, dtype):
  """The splits' outputs weighted by their share of the softmax mass (fp32)."""
  w = jnp.exp(lse_CBLH - jnp.max(lse_CBLH, axis=0, keepdims=True))
  return (jnp.sum(part_CBLHR * w[..., None], axis=0) / jnp.sum(w, axis=0)[..., None]).astype(dtype)


def cached_attention(q_BLHR, k_cache_NBSGR, v_cache_NBSGR, layer, mask_BLS, *, block_q=BLOCK_Q, block_s=BLOCK_S,
                     key_splits=KEY_SPLITS, num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=None):
  """Grouped-query attention of ``q`` over layer ``layer`` (traced is fine) of a cache stack -> [B, L, H, R].

  ``mask_BLS[b, l, s]``: query l of row b sees key s. Same contract as
  ``transformer.attend(q, k_cache[layer], v_cache[layer], mask)`` up to
  rounding, without copying the layer's cache out of the stack. The query
  length is padded to a multiple of ``block_q`` (padding rows are dropped);
  the keys are cut into ``key_splits`` runs by separate programs (at most
  the number that leaves each a power-of-two multiple of 16 keys), each in
  ``block_s`` chunks.
  """
  interpret = _interpret(interpret)
  B, L, H, R = q_BLHR.shape
  G, S = k_cache_NBSGR.shape[3], k_cache_NBSGR.shape[2]
  splits = _pow2_at_most(S // 16, key_splits) if S % 16 == 0 else 1
  block_s = _pow2_at_most(S // splits, block_s)
  pad = -L % block_q
  if pad:
    q_BLHR = jnp.pad(q_BLHR, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask_BLS = jnp.pad(mask_BLS, ((0, 0), (0, pad), (0, 0)))
  Lp = q_BLHR.shape[1]
  wide = accum_dtype(q_BLHR.dtype)
  out_shape = [jax.ShapeDtypeStruct(q_BLHR.shape, q_BLHR.dtype)] if splits == 1 else [
      jax.ShapeDtypeStruct((splits, B, Lp, H, R), wide), jax.ShapeDtypeStruct((splits, B, Lp, H), wide)]
  outs = pl.pallas_call(
      functools.partial(_kernel, block_q=block_q, block_s=block_s, splits=splits, group_size=H // G,
                        precision=jax.lax.Precision.HIGHEST if q_BLHR.dtype == jnp.float32 else None),
      out_shape=out_shape,
      grid=(B, H, Lp // block_q, splits),
      in_specs=[pl.BlockSpec()] * 5,  # whole arrays: the kernel indexes them
      out_specs=[pl.BlockSpec()] * len(out_shape),
      interpret=interpret,
      compiler_params=None if interpret else _triton_params(num_warps, num_stages),
      name="decode_attention",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), q_BLHR, k_cache_NBSGR, v_cache_NBSGR, mask_BLS)
  out = outs[0] if splits == 1 else _combine(*outs, q_BLHR.dtype)
  return out[:, :L] if pad else out


def _triton_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
