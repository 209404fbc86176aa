"""The decoding MoE's row layout (``moe_pallas.block_layout``) as one Pallas kernel.

Why: at decoding sizes XLA computes the layout (expert sizes, their cumulative
block counts, each pair's rank within its expert, the row scatter, each row
block's expert) as ~10 small kernels per layer, each a launch of 1-3 us, more
than the work. Here one program does it all for up to ``MAX_PAIRS`` pairs (a
multiple of ``CHUNK``); other sizes keep the XLA layout (one program would be slower than XLA's
spread over the GPU).

Shape letters as in ``moe_pallas``: M (token, expert) pairs, E experts, X
experts per token, Q row blocks of ``block_rows`` rows, P = Q * block_rows.
Every quantity is a count over comparisons of small chunks (``CHUNK`` pairs
or blocks against all experts), so only elementwise work, sums, a cumsum and
one scatter store are lowered; the outputs equal ``block_layout``'s bit for bit
(tests compare them), except that ``expert`` may hold a few unused entries
past Q (the kernels read only the first Q).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_PAIRS = 512  # up to this many (token, expert) pairs (batch 2 of 32 tokens x 8 experts) the kernel is used
CHUNK = 64  # pairs or row blocks per comparison tile


def supported(num_pairs: int, num_experts: int) -> bool:
  """Whether ``block_layout_kernel`` takes these sizes: M a multiple of CHUNK up to MAX_PAIRS, E a power of two."""
  return (num_pairs <= MAX_PAIRS and num_pairs % CHUNK == 0 and num_experts >= 2
          and num_experts & (num_experts - 1) == 0)


def _layout_kernel(ids_ref, lead_id_ref, offset_ref, fill_ref, pos_ref, src_ref, expert_ref, used_ref, *,
                   num_experts, per_token, block_rows, lead_blocks):
  """One program: sizes, block ends, pair ranks and rows, the row scatter, block experts, used blocks."""
  del fill_ref  # aliased to src_ref: the padding rows' tokens, written before this kernel runs
  E, bm, c = num_experts, block_rows, CHUNK
  iota = lambda shape, dim: jax.lax.broadcasted_iota(jnp.int32, shape, dim)  # pylint: disable=unnecessary-lambda-assignment
  chunk = lambda ref, k: ref[pl.ds(pl.multiple_of(k * c, c), c)]  # pylint: disable=unnecessary-lambda-assignment

  def count(k, size_E):  # pairs per expert
    return size_E + jnp.sum((chunk(ids_ref, k)[None, :] == iota((E, c), 0)).astype(jnp.int32), axis=1)

  size_E = jax.lax.fori_loop(0, ids_ref.shape[0] // c, count, jnp.zeros((E,), jnp.int32))
  blocks_E = (size_E + bm - 1) // bm
  end_E = jnp.cumsum(blocks_E) + lead_blocks
  start_E = end_E - blocks_E

  def rows(k, carry):  # the padded row of each pair of chunk k: its expert's first row + its rank there
    ids_i = chunk(ids_ref, k)
    pair_i = k * c + iota((c,), 0)

    def earlier(j, within):  # pairs of chunk j before pair i with the same expert
      same = (chunk(ids_ref, j)[None, :] == ids_i[:, None]) & ((j * c + iota((c, c), 1)) < pair_i[:, None])
      return within + jnp.sum(same.astype(jnp.int32), axis=1)

    within = jax.lax.fori_loop(0, k + 1, earlier, jnp.zeros((c,), jnp.int32))
    start = jnp.sum(jnp.where(ids_i[:, None] == iota((c, E), 1), start_E[None, :], 0), axis=1)
    pos = start * bm + within
    pos_ref[pl.ds(pl.multiple_of(k * c, c), c)] = pos
    pltriton.store(src_ref.at[pos], pair_i // per_token)  # each pair's row reads its token
    return carry

  jax.lax.fori_loop(0, ids_ref.shape[0] // c, rows, 0)

  def experts(k, carry):  # each row block's expert: how many experts' blocks end at or before it
    q = k * c + iota((c,), 0)
    ahead = jnp.sum((end_E[None, :] <= q[:, None]).astype(jnp.int32), axis=1)
    expert = jnp.where(q < lead_blocks, lead_id_ref[0], jnp.minimum(ahead, E - 1) + offset_ref[0])
    expert_ref[pl.ds(pl.multiple_of(k * c, c), c)] = expert
    return carry

  jax.lax.fori_loop(0, expert_ref.shape[0] // c, experts, 0)
  used_ref[...] = jnp.broadcast_to(jnp.max(end_E), (1,))


def block_layout_kernel(idx_TX, num_experts: int, block_rows: int, *, num_blocks: int, expert_offset=0,
                        lead_blocks: int = 0, lead_id=0, interpret: bool = False):
  """``moe_pallas.block_layout`` (no ``valid_TX``) computed by one Pallas program.

  ``num_blocks`` is Q (``num_row_blocks`` plus ``lead_blocks``); ``expert``
  comes back with its length rounded up to a multiple of ``CHUNK``.
  """
  T, X = idx_TX.shape
  M, E = T * X, num_experts
  if not supported(M, E):
    raise ValueError(f"the layout kernel takes a multiple of {CHUNK} pairs up to {MAX_PAIRS} and a power-of-two "
                     f"expert count, got {M} pairs, {E} experts")
  ids = idx_TX.reshape(-1).astype(jnp.int32)
  P = num_blocks * block_rows
  rows = jnp.arange(P, dtype=jnp.int32)
  fill = jnp.where(rows < min(lead_blocks * block_rows, T), rows, T)  # lead rows read their token, the rest T
  scalar = lambda v: jnp.asarray(v, jnp.int32).reshape(1)  # pylint: disable=unnecessary-lambda-assignment
  params = None
  if not interpret:
    params = pltriton.CompilerParams(num_warps=8, num_stages=1)
  kernel = functools.partial(_layout_kernel, num_experts=E, per_token=X, block_rows=block_rows,
                             lead_blocks=lead_blocks)
  whole = pl.BlockSpec()
  pos, src, expert, used = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((M,), jnp.int32), jax.ShapeDtypeStruct((P,), jnp.int32),
                 jax.ShapeDtypeStruct((-(-num_blocks // CHUNK) * CHUNK,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)),
      grid=(1,),
      in_specs=[whole] * 4,
      out_specs=[whole] * 4,
      input_output_aliases={3: 1},
      interpret=interpret,
      compiler_params=params,
      name="moe_layout",
  )(ids, scalar(lead_id), scalar(expert_offset), fill)
  return dict(pos=pos.reshape(T, X), src=src, expert=expert, used=used)
