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

``write_and_attend`` also takes over the steps before attention: from the
layer's raw ``[B, L, (H + 2G) * R]`` projections, one kernel RMS-normalises
and rotates the new keys and writes keys and values into the cache stack in
place, and the attention kernel does the same to its queries as it loads them
(``QKPrep``). XLA spends five small kernels per layer on those steps (the
norms, RoPE's concatenations, two cache updates). The rotary dims are handled
as separate column parts (first half, second half, the rest), so rotate-half
needs no shuffle inside a tile; the query-key product is the sum over parts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

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
  return _interpret(interpret) or _compiles(q_BLHR.dtype, k_cache_NBSGR)


def _pow2_from_16(n: int) -> bool:
  return n >= 16 and n & (n - 1) == 0


def _compiles(dtype, k_cache_NBSGR) -> bool:
  """``supported``'s compiled case: a GPU, these dtypes, head_dim a power of two >= 16, cache length % 16 == 0."""
  R, S = k_cache_NBSGR.shape[4], k_cache_NBSGR.shape[2]
  return (jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and _pow2_from_16(R)
          and S % 16 == 0)


class QKPrep(NamedTuple):
  """How raw query / key projections become the attended ones: RMSNorm (optional), then partial RoPE.

  ``norms`` ``[N, W]``: per layer, a row holding the query norm's weights at
  columns ``q_col ..`` and the key norm's at ``k_col ..`` (None: no q/k norm);
  ``eps`` the norm's epsilon; ``rotation`` the rotary angles' ``(cos, sin)``,
  each ``[B, L, rotary_dim / 2]`` fp32 (fp64 for fp64 inputs) at the queries'
  positions (None: no rotation), applied rotate-half style to the first
  ``rotary_dim`` dims of each head. Computed once per forward by the caller, they
  keep transcendentals out of the kernels' per-layer critical path.
  """

  norms: Optional[jax.Array]
  q_col: int
  k_col: int
  eps: float
  rotation: Optional[tuple]


def _parts(R: int, half: int):
  """Column runs ``(start, width)`` of a head: the rotary halves (``half`` wide each) and the rest."""
  return tuple((c, w) for c, w in ((0, half), (half, half), (2 * half, R - 2 * half)) if w)


def _prepared(xs, rotation, layer, col, norm_ref, eps, dtype):
  """Normalised (rounded to ``dtype``, as the XLA path does), then rotated: ``xs`` are a head's column runs, fp32.

  ``rotation`` the rows' (cos, sin) ``[L, half]`` or None; ``col`` the norm weights' first column in
  ``norm_ref``'s row ``layer``.
  """
  wide = xs[0].dtype
  if norm_ref is not None:
    R = sum(x.shape[1] for x in xs)
    rs = jax.lax.rsqrt(sum(jnp.sum(x * x, axis=1) for x in xs) / R + eps)[:, None]
    offsets = [sum(x.shape[1] for x in xs[:i]) for i in range(len(xs))]
    xs = [(norm_ref[layer, pl.ds(col + o, x.shape[1])].astype(wide)[None, :] * (x * rs)).astype(dtype).astype(wide)
          for o, x in zip(offsets, xs)]
  if rotation is not None:
    cos, sin = (a.astype(wide) for a in rotation)
    xs = [xs[0] * cos - xs[1] * sin, xs[1] * cos + xs[0] * sin] + xs[2:]
  return [x.astype(dtype) for x in xs]


def _kernel(layer_ref, q_ref, *refs, block_q, block_s, splits, group_size, precision, parts, prep, indirect=False):
  """One (batch row, head, query block, key split): online softmax over the split's key chunks.

  ``q_ref`` holds the queries ``[B, L, H, R]``, or with ``prep`` (a
  ``QKPrep`` less its arrays) the raw projections ``[B, L, (H + 2G) * R]``,
  followed by the norm and rotation refs (``_prep_refs``), whose queries are
  prepared here (``_prepared``). One split: writes the attention output.
  Several: writes the split's normalised output (fp32) and its log-sum-exp,
  which ``_combine`` merges.
  """
  rows_ref, q_ref, refs = (q_ref, refs[0], refs[1:]) if indirect else (None, q_ref, refs)  # rows' table first
  norm_ref, rot_refs, refs = _prep_refs(refs, prep)
  k_ref, v_ref, mask_ref, *out_refs = refs
  b, h, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kb = rows_ref[b] if indirect else b  # the cache row this query row reads
  g = h // group_size
  layer = layer_ref[0]
  R = k_ref.shape[-1]
  span = k_ref.shape[2] // splits  # keys per split
  acc_t = accum_dtype(q_ref.dtype)
  rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
  if prep:
    rotation = rot_refs and tuple(r[b, rows, :] for r in rot_refs)
    qs = _prepared([q_ref[b, rows, pl.ds(h * R + c0, w)].astype(acc_t) for c0, w in parts], rotation, layer,
                   prep.q_col, norm_ref, prep.eps, q_ref.dtype)
  else:
    qs = [q_ref[b, rows, h, :]]
  scale = R**-0.5

  def body(j, carry):
    m, total, acc = carry
    keys = pl.ds(pl.multiple_of(c * span + j * block_s, block_s), block_s)
    s = sum(jax.lax.dot_general(q, k_ref[layer, kb, keys, g, pl.ds(c0, w)].astype(q.dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=acc_t, precision=precision) for q, (c0, w) in zip(qs, parts))
    s = jnp.where(mask_ref[b, rows, keys], s * scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    v = v_ref[layer, kb, keys, g, :].astype(qs[0].dtype)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=acc_t, precision=precision)
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
                     key_splits=KEY_SPLITS, num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=None, rows=None):
  """Grouped-query attention of ``q`` over layer ``layer`` (traced is fine) of a cache stack -> [B, L, H, R].

  ``mask_BLS[b, l, s]``: query l of row b sees key s. Same contract as
  ``transformer.attend(q, k_cache[layer], v_cache[layer], mask)`` up to
  rounding, without copying the layer's cache out of the stack. The query
  length is padded to a multiple of ``block_q`` (padding rows are dropped);
  the keys are cut into ``key_splits`` runs by separate programs (at most
  the number that leaves each a power-of-two multiple of 16 keys), each in
  ``block_s`` chunks. ``rows`` ``[B]`` (int32): query row b attends over cache row ``rows[b]`` instead of row b
  (read in place: the serving engine's rows each name their slot).
  """
  launch = dict(block_q=block_q, block_s=block_s, key_splits=key_splits, num_warps=num_warps, num_stages=num_stages,
                interpret=_interpret(interpret))
  return _attend(q_BLHR, (), k_cache_NBSGR, v_cache_NBSGR, layer, mask_BLS, q_BLHR.shape[2], None, rows=rows,
                 **launch)


def _attend(q_in, prep_args, k_cache_NBSGR, v_cache_NBSGR, layer, mask_BLS, H, prep, *, block_q, block_s, key_splits,
            num_warps, num_stages, interpret, rows=None):
  """The attention kernel's launch: ``q_in`` queries [B, L, H, R] or, with ``prep`` (static), raw projections."""
  B, L = q_in.shape[:2]
  G, S, R = k_cache_NBSGR.shape[3], k_cache_NBSGR.shape[2], k_cache_NBSGR.shape[4]
  splits = _pow2_at_most(S // 16, key_splits) if S % 16 == 0 else 1
  block_s = _pow2_at_most(S // splits, block_s)
  pad = -L % block_q
  if pad:
    q_in = jnp.pad(q_in, ((0, 0), (0, pad)) + ((0, 0),) * (q_in.ndim - 2))
    mask_BLS = jnp.pad(mask_BLS, ((0, 0), (0, pad), (0, 0)))
    prep_args = tuple(jnp.pad(a, ((0, 0), (0, pad), (0, 0))) if a.ndim == 3 else a for a in prep_args)  # cos, sin
  Lp = q_in.shape[1]
  dtype = q_in.dtype
  wide = accum_dtype(dtype)
  out_shape = [jax.ShapeDtypeStruct((B, Lp, H, R), dtype)] if splits == 1 else [
      jax.ShapeDtypeStruct((splits, B, Lp, H, R), wide), jax.ShapeDtypeStruct((splits, B, Lp, H), wide)]
  table = () if rows is None else (jnp.asarray(rows, jnp.int32),)
  args = (_scalar(layer),) + table + (q_in,) + tuple(prep_args) + (
      k_cache_NBSGR, v_cache_NBSGR, mask_BLS)
  outs = pl.pallas_call(
      functools.partial(_kernel, block_q=block_q, block_s=block_s, splits=splits, group_size=H // G,
                        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
                        parts=_parts(R, prep.rotation if prep else 0), prep=prep, indirect=rows is not None),
      out_shape=out_shape,
      grid=(B, H, Lp // block_q, splits),
      in_specs=[pl.BlockSpec()] * len(args),  # whole arrays: the kernel indexes them
      out_specs=[pl.BlockSpec()] * len(out_shape),
      interpret=interpret,
      compiler_params=None if interpret else _triton_params(num_warps, num_stages),
      name="decode_attention",
  )(*args)
  out = outs[0] if splits == 1 else _combine(*outs, dtype)
  return out[:, :L] if pad else out


def _scalar(v):
  """An int32 scalar (traced is fine) as the ``[1]`` array a kernel reads it from."""
  return jnp.reshape(jnp.asarray(v, jnp.int32), (1,))


def _static(prep: QKPrep) -> QKPrep:
  """``prep`` hashable (a kernel's static argument): ``norms`` whether there are any, ``rotation`` the rotary
  half width (0: none)."""
  return prep._replace(norms=prep.norms is not None, rotation=0 if prep.rotation is None else prep.rotation[0].shape[-1])


def _prep_arrays(prep: QKPrep):
  """The arrays of ``prep`` a kernel takes after its queries: the norm rows, then cos and sin (those present)."""
  return ((prep.norms,) if prep.norms is not None else ()) + tuple(prep.rotation or ())


def _prep_refs(refs, prep):
  """(norm ref or None, (cos, sin) refs or (), the refs after them) from a kernel's refs after its queries."""
  if not prep:
    return None, (), refs
  norm_ref, refs = (refs[0], refs[1:]) if prep.norms else (None, refs)
  return (norm_ref,) + ((tuple(refs[:2]), refs[2:]) if prep.rotation else ((), refs))


def _write_kernel(layer_ref, start_ref, qkv_ref, *refs, num_heads, parts, prep):
  """One (batch row, key/value group): the new keys prepared and keys and values written into the cache stack."""
  norm_ref, rot_refs, refs = _prep_refs(refs, prep)
  k_out, v_out = refs[-2:]  # aliased to the cache stacks passed in (refs[-4:-2])
  b, g = pl.program_id(0), pl.program_id(1)
  layer, H = layer_ref[0], num_heads
  G, R = k_out.shape[3], k_out.shape[4]
  rows = pl.ds(start_ref[0], qkv_ref.shape[1])
  wide = accum_dtype(qkv_ref.dtype)
  ks = _prepared([qkv_ref[b, :, pl.ds((H + g) * R + c0, w)].astype(wide) for c0, w in parts],
                 rot_refs and tuple(r[b, :, :] for r in rot_refs), layer, prep.k_col, norm_ref, prep.eps, qkv_ref.dtype)
  for k, (c0, w) in zip(ks, parts):
    k_out[layer, b, rows, g, pl.ds(c0, w)] = k.astype(k_out.dtype)
  v_out[layer, b, rows, g, :] = qkv_ref[b, :, pl.ds((H + G + g) * R, R)].astype(v_out.dtype)


def write_and_attend(qkv_BLC, k_cache_NBSGR, v_cache_NBSGR, layer, start, mask_BLS, prep: QKPrep, *,
                     num_heads: int, block_q=BLOCK_Q, block_s=BLOCK_S, key_splits=KEY_SPLITS, num_warps=NUM_WARPS,
                     num_stages=NUM_STAGES, interpret=None):
  """A cached forward's attention from the raw projections -> (out [B, L, H, R], k cache, v cache).

  ``qkv_BLC``: the layer's ``[B, L, (H + 2G) * R]`` query, key and value
  projections (``num_heads`` = H). One kernel prepares the new keys
  (``prep``: RMSNorm, RoPE) and writes keys and values
  into layer ``layer`` of the stacks at ``start`` (both traced is fine), in
  place; the attention kernel prepares the queries as it loads them and
  attends as ``cached_attention`` does. Same result as preparing q and k,
  updating the cache and calling ``cached_attention``, up to rounding.
  """
  interpret = _interpret(interpret)
  B, L, _ = qkv_BLC.shape
  G, R = k_cache_NBSGR.shape[3], k_cache_NBSGR.shape[4]
  static, extra = _static(prep), _prep_arrays(prep)
  args = (_scalar(layer), _scalar(start), qkv_BLC) + extra + (k_cache_NBSGR, v_cache_NBSGR)
  k_cache_NBSGR, v_cache_NBSGR = pl.pallas_call(
      functools.partial(_write_kernel, num_heads=num_heads, parts=_parts(R, static.rotation), prep=static),
      out_shape=[jax.ShapeDtypeStruct(k_cache_NBSGR.shape, k_cache_NBSGR.dtype),
                 jax.ShapeDtypeStruct(v_cache_NBSGR.shape, v_cache_NBSGR.dtype)],
      grid=(B, G),
      in_specs=[pl.BlockSpec()] * len(args),
      out_specs=[pl.BlockSpec()] * 2,
      input_output_aliases={len(args) - 2: 0, len(args) - 1: 1},
      interpret=interpret,
      compiler_params=None if interpret else _triton_params(NUM_WARPS, 1),
      name="decode_cache_write",
  )(*args)
  launch = dict(block_q=block_q, block_s=block_s, key_splits=key_splits, num_warps=num_warps, num_stages=num_stages,
                interpret=interpret)
  out = _attend(qkv_BLC, extra, k_cache_NBSGR, v_cache_NBSGR, layer, mask_BLS, num_heads, static, **launch)
  return out, k_cache_NBSGR, v_cache_NBSGR


def supported_prepared(qkv_BLC, k_cache_NBSGR, prep: QKPrep, interpret=None) -> bool:
  """Whether ``write_and_attend`` runs these shapes (compiled: ``supported``'s, L and each column run a power of two >= 16)."""
  if _interpret(interpret):
    return True
  L, R = qkv_BLC.shape[1], k_cache_NBSGR.shape[-1]
  return (_compiles(qkv_BLC.dtype, k_cache_NBSGR) and qkv_BLC.dtype == k_cache_NBSGR.dtype and _pow2_from_16(L)
          and all(_pow2_from_16(w) for _, w in _parts(R, _static(prep).rotation)))


def _triton_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
