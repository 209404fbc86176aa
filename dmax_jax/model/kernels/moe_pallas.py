"""Routed experts as two Pallas grouped matmuls that skip untouched experts.

Shape letters: the package glossary (``dmax_jax/shapes.py``): T tokens, D model
width, E experts, F expert width, X experts per token, M = T*X sorted
(token, expert) rows, P padded rows, Q row blocks (P = Q * block_rows).

Why: decoding runs the MoE on a few dozen tokens, so a layer is bound by
reading expert weights. ``jax.lax.ragged_dot`` is lowered by XLA on NVIDIA
GPUs to a dense product over all E experts and a dense einsum computes
every expert too; both read every expert's weights. Here each touched
expert's weights are read once (from HBM; repeated row blocks of one expert
find them in L2) and untouched experts cost nothing.

Layout (all static shapes, jit-able):
1. The M (token, expert) pairs are sorted by expert and each expert's group
   is padded to a multiple of ``block_rows`` rows, so every row block belongs
   to one expert. The number of blocks is bounded statically by
   ``Q = (M + min(E, M) * (block_rows - 1)) // block_rows``; blocks past the
   used ones are skipped inside the kernels (``pl.when``).
2. Kernel A (grid: F tile x row block): ``h = silu(x @ Wg[e]) * (x @ Wu[e])``
   with fp32 accumulation and SwiGLU in fp32, cast to the compute dtype.
   It gathers each block's rows from the token rows itself (no padded copy).
3. Kernel B (grid: D tile x row block): ``y = h @ Wd[e]``.
   In both kernels the output-tile axis varies fastest: a row block's tiles
   run side by side, the row blocks of one expert a few programs apart (they
   still share each weight tile through L2), and the programs of the unused
   blocks past the last used one come last, after all the work, instead of
   between the tiles' runs (~1% of an int8 decoding forward; BENCHMARKS.md).
4. Each (token, slot) pair's output row is gathered back and combined with
   the routing weights in fp32; padding rows are never read.

Weights are cast to x's dtype tile by tile inside the kernels, so fp32
parameters cost a read of the touched experts only (the other backends cast
every expert first). The expert of a row block is read inside the kernel
from a small int32 array: the Triton backend has no scalar prefetch, so the weight refs are
whole arrays and the kernel slices ``w[e, d0:d0+bk, f0:f0+tF]`` itself.
Tiles are powers of two (Triton's constraint on loaded blocks); Triton's dot
needs ``block_rows >= 16``. Forward only (no VJP): this is the decoding path.

int8 experts (``quant.Int8Weight``): the kernels load the int8 tiles, convert
them to x's dtype in registers (exact: |values| <= 127) and multiply the fp32
partial products by the scales, so no dequantized weight is ever written to
memory. The int8 values are stored ``[E, N, K]`` (K contiguous): with the
tile ``[tn, bk]`` contracted on its last axis, Triton builds the MMA's weight
operand from it 25% faster than from a ``[bk, tn]`` tile of ``[E, K, N]``
values (one H200; BENCHMARKS.md). Per-output-channel scales multiply the
accumulator once at the end; per-group scales (``group`` rows of K each)
multiply each chunk's partial product, the chunk being cut to at most one group. ``shared_expert_pallas``
runs the shared expert through the same kernels (every token to one expert).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dmax_jax.model import quant
from dmax_jax.model.kernels import interpret_default as _interpret
from dmax_jax.model.config import accum_dtype


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Launch settings of one grouped-matmul kernel.

  ``n``: upper bound on the output tile width; ``k``: upper bound on the
  contraction chunk (both rounded down to a power of two dividing the
  dimension); ``num_warps`` / ``num_stages``: Triton's warps per program and
  software-pipelining depth.
  """

  n: int = 128
  k: int = 128
  num_warps: int = 4
  num_stages: int = 3


def _tile(dim: int, preferred: int) -> int:
  """The largest power of two <= ``preferred`` that divides ``dim`` (``dim`` itself if none > 1 does)."""
  t = 1
  while t * 2 <= min(dim, preferred) and dim % (t * 2) == 0:
    t *= 2
  return t if t > 1 else dim


def num_row_blocks(rows: int, num_experts: int, block_rows: int) -> int:
  """Static upper bound on the row blocks needed for ``rows`` sorted rows.

  Each non-empty expert adds at most ``block_rows - 1`` padding rows and at
  most ``min(E, rows)`` experts are non-empty.
  """
  return (rows + min(num_experts, rows) * (block_rows - 1)) // block_rows


def _rank_and_sizes(flat_M, num_experts: int):
  """(for each pair, how many earlier pairs chose the same expert; pairs per expert [E]), by a stable argsort.

  Ids >= ``num_experts`` belong to no expert (not counted). Memory linear in M:
  the prefill and training sizes (``_compare_layout`` covers decoding's).
  """
  M = flat_M.shape[0]
  ar = jnp.arange(M, dtype=jnp.int32)
  order = jnp.argsort(flat_M, stable=True)
  size_E = jnp.zeros((num_experts,), jnp.int32).at[flat_M].add(1, mode="drop")
  start_E = jnp.cumsum(size_E) - size_E
  within_sorted = ar - start_E[jnp.minimum(flat_M[order], num_experts - 1)]
  return jnp.zeros((M,), jnp.int32).at[order].set(within_sorted), size_E


# Up to this many (token, expert) pairs the layout ranks pairs by comparison, not by sorting.
COMPARE_RANK_MAX_PAIRS = 4096


def _compare_layout(flat_M, num_experts: int, block_rows: int, num_blocks: int, lead_blocks: int):
  """(pos [M], expert [Q] unclipped past the used blocks, used [1]) by [M, M] / [Q, M] comparisons.

  Every quantity is indexed by pair, none by expert: a pair's rank within its
  expert and its expert's size are counts over the pairs; an expert's first
  block counts the blocks of the experts below it, each taken at its first pair;
  a block's expert is the largest expert whose first block is at or before it.
  Three fused reductions, no sort, scatter or cumulative sum (each of those is
  another small kernel at decoding sizes).
  """
  M, E, bm = flat_M.shape[0], num_experts, block_rows
  ar = jnp.arange(M, dtype=jnp.int32)
  same = flat_M[:, None] == flat_M[None, :]
  within = jnp.sum(same & (ar[None, :] < ar[:, None]), axis=1, dtype=jnp.int32)
  size = jnp.sum(same, axis=1, dtype=jnp.int32)
  opens = (flat_M < E) & (within == 0)  # each expert's first pair
  first_blocks = jnp.where(opens, (size + bm - 1) // bm, 0)  # each expert's blocks, counted once
  below = jnp.concatenate([flat_M, jnp.full((1,), E, jnp.int32)])  # the sentinel E: every expert is below it
  start = lead_blocks + jnp.sum(jnp.where(flat_M[None, :] < below[:, None], first_blocks[None, :], 0), axis=1,
                                dtype=jnp.int32)
  pos = start[:M] * bm + within
  blocks = jnp.arange(num_blocks, dtype=jnp.int32)
  expert = jnp.max(jnp.where(opens[None, :] & (start[None, :M] <= blocks[:, None]), flat_M[None, :], -1), axis=1)
  return pos, expert, start[M:]


def _sorted_layout(flat_M, num_experts: int, block_rows: int, num_blocks: int, lead_blocks: int):
  """``_compare_layout``'s outputs through a stable argsort and per-expert counts (large M)."""
  E, bm = num_experts, block_rows
  within, size_E = _rank_and_sizes(flat_M, E)
  blocks_E = (size_E + bm - 1) // bm
  block_end_E = jnp.cumsum(blocks_E) + lead_blocks
  pos = (block_end_E - blocks_E)[jnp.minimum(flat_M, E - 1)] * bm + within
  # compare_all: the default searchsorted method lowers to a sequential loop on GPU.
  expert = jnp.searchsorted(block_end_E, jnp.arange(num_blocks), side="right", method="compare_all")
  return pos, expert, block_end_E[-1:]


def block_layout(idx_TX, num_experts: int, block_rows: int, method: str | None = None, valid_TX=None, *,
                 expert_offset=0, lead_blocks: int = 0, lead_id=0, with_src: bool = True):
  """Padded, expert-sorted row layout of the (token, expert) pairs.

  Returns a dict of int32 arrays:
    pos [T, X]: the padded row of each pair;
    rows [M]: ``pos`` flattened, -1 for a pair without a row (what the kernels match rows against);
    src [P] (with ``with_src``): the token each padded row reads, T for a padding row;
    expert [Q]: the expert of each row block (clipped to E-1 past the used blocks), plus ``expert_offset``;
    used [1]: the number of used row blocks (they come first).
  Within an expert's rows, pairs keep their original (token-major) order.
  ``method`` picks how pairs are ranked: "compare" (``_compare_layout``) or
  "sort" (``_sorted_layout``); default by size.
  Pairs where ``valid_TX`` is False (experts held by another device) get no
  row; their ``pos`` is 0 and the combine must ignore them.
  ``lead_blocks`` row blocks of id ``lead_id`` come first, row t reading
  token t (the shared expert's blocks); the pairs' blocks follow them. All of
  it is computed here rather than concatenated afterwards: each separate step
  is one more small kernel per layer.
  """
  T, X = idx_TX.shape
  M = T * X
  E = num_experts
  Q = num_row_blocks(M, E, block_rows) + lead_blocks
  method = method or ("compare" if M <= COMPARE_RANK_MAX_PAIRS else "sort")
  flat = idx_TX.reshape(-1).astype(jnp.int32)
  if valid_TX is not None:
    flat = jnp.where(valid_TX.reshape(-1), flat, E)  # a bucket past the last expert: no blocks
  pos, expert_Q, used = (_compare_layout if method == "compare" else _sorted_layout)(
      flat, E, block_rows, Q, lead_blocks)
  blocks = jnp.arange(Q)
  expert_Q = jnp.where(blocks < used[0], jnp.minimum(expert_Q, E - 1), E - 1) + expert_offset
  held = pos if valid_TX is None else jnp.where(flat < E, pos, -1)  # -1: the pair has no row
  out = dict(
      pos=(pos if valid_TX is None else jnp.maximum(held, 0)).reshape(T, X),
      rows=held,
      expert=jnp.where(blocks < lead_blocks, lead_id, expert_Q).astype(jnp.int32),
      used=used.astype(jnp.int32),
  )
  if with_src:
    rows = jnp.arange(Q * block_rows, dtype=jnp.int32)
    out["src"] = jnp.where(rows < min(lead_blocks * block_rows, T), rows, T).at[
        jnp.where(held < 0, Q * block_rows, held)].set(jnp.arange(M, dtype=jnp.int32) // X, mode="drop")
  return out


def _unpack_refs(refs, num_weights, gather, group, shared):
  """(src or None, rows, weight sets, out) from the kernel's positional refs.

  A weight set is (weights, scales or Nones): the routed experts', then with
  ``shared`` the shared expert's.
  """
  src_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
  rows_ref, out_ref, refs = refs[0], refs[-1], refs[1:-1]
  per_set = num_weights * (2 if group else 1)
  sets = []
  for i in range(2 if shared else 1):
    w = refs[i * per_set:(i + 1) * per_set]
    sets.append((w[:num_weights], w[num_weights:] if group else (None,) * num_weights))
  return src_ref, rows_ref, sets, out_ref


def shared_block_id(index):
  """The expert id of a row block of shared expert ``index`` (in the shared weights' stack): negative."""
  return -1 - index


def _row_block_kernel(expert_ref, used_ref, *refs, bk, num_weights, gather, group=None, shared=False, pairs=None):
  """One row block x one output tile of ``rows @ W[e]`` for each weight ref.

  With one weight (w_down) the product is the output; with two (w_gate,
  w_up) the output is ``silu(rows @ Wg[e]) * (rows @ Wu[e])``, in fp32.
  The contraction runs in ``bk`` chunks with fp32 accumulators. With
  ``gather`` the block's rows are read straight from the token rows
  (``x[src[p]]``, padding rows clamped to the last token and discarded
  later) instead of from a materialised padded copy; with ``pairs`` =
  (X, lead rows) the gather ref is the layout's ``rows`` [M] instead of
  ``src`` and each program finds its rows' tokens there (``_block_tokens``). With ``group`` the
  weights are int8 and followed by their scale refs ``[E, K // group, N]``.
  With ``shared`` a second weight set (a stack of shared experts, ``[n, ...]``)
  follows and row blocks with a negative expert id (``shared_block_id``) read it.
  """
  src_ref, rows_ref, sets, out_ref = _unpack_refs(refs, num_weights, gather, group, shared)
  b = pl.program_id(1)  # grid (output tile, row block): the tile axis varies fastest
  e_b = expert_ref[b]
  if shared:
    _row_block(b, e_b, *sets[0], src_ref, rows_ref, out_ref, used_ref, bk, gather, group, e_b >= 0, pairs)
    _row_block(b, -1 - e_b, *sets[1], src_ref, rows_ref, out_ref, used_ref, bk, gather, group, e_b < 0, pairs)
  else:
    _row_block(b, e_b, *sets[0], src_ref, rows_ref, out_ref, used_ref, bk, gather, group, True, pairs)


def _block_tokens(b, bm, pair_rows_ref, per_token, lead_rows):
  """The tokens the ``bm`` rows of block ``b`` read: row r < lead_rows reads token r, a pair's row its token.

  A row no pair holds (padding) gets -1; the caller clamps it.
  """
  r = b * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
  held = pair_rows_ref[...]
  pair = jax.lax.broadcasted_iota(jnp.int32, held.shape, 0)
  token = jnp.max(jnp.where(held[None, :] == r[:, None], pair[None, :] // per_token, -1), axis=1)
  return jnp.where(r < lead_rows, r, token)


def _row_block(b, e, w_refs, s_refs, src_ref, rows_ref, out_ref, used_ref, bk, gather, group, mine, pairs):
  """The body of ``_row_block_kernel`` for one weight set: runs when ``mine`` and the block is used."""
  j = pl.program_id(0)
  bm, tn = out_ref.shape
  K = rows_ref.shape[1]

  @pl.when(jnp.logical_and(b < used_ref[0], mine))
  def _():
    n0 = pl.multiple_of(j * tn, tn)
    if gather:
      src = (_block_tokens(b, bm, src_ref, *pairs) if pairs
             else src_ref[pl.ds(pl.multiple_of(b * bm, bm), bm)])
      row_idx = jnp.clip(src, 0, rows_ref.shape[0] - 1)

    acc_t = accum_dtype(rows_ref.dtype)  # fp32 (fp64 for fp64 inputs, interpret mode)

    def scaled(part, s_ref, g):  # an int8 weight's fp32 product times the scales of its group g
      return part if s_ref is None else part * s_ref[e, pl.ds(g, 1), pl.ds(n0, tn)].astype(acc_t)

    def body(k, accs):
      k0 = pl.multiple_of(k * bk, bk)
      x = rows_ref[row_idx, pl.ds(k0, bk)] if gather else rows_ref[:, pl.ds(k0, bk)]
      if group:  # int8 values stored [E, N, K]: the product contracts both operands' last axis
        parts = (jax.lax.dot_general(x, w_ref[e, pl.ds(n0, tn), pl.ds(k0, bk)].astype(x.dtype),
                                     (((1,), (1,)), ((), ())), preferred_element_type=acc_t) for w_ref in w_refs)
      else:
        parts = (jnp.dot(x, w_ref[e, pl.ds(k0, bk), pl.ds(n0, tn)].astype(x.dtype), preferred_element_type=acc_t)
                 for w_ref in w_refs)
      if group and group < K:  # per-group scales: the chunk lies in group k0 // group
        parts = (scaled(part, s_ref, k0 // group) for part, s_ref in zip(parts, s_refs))
      return tuple(acc + part for acc, part in zip(accs, parts))

    zeros = tuple(jnp.zeros((bm, tn), acc_t) for _ in w_refs)
    accs = jax.lax.fori_loop(0, K // bk, body, zeros)
    if group == K:  # per-output-channel scales: once, on the accumulators
      accs = tuple(scaled(acc, s_ref, 0) for acc, s_ref in zip(accs, s_refs))
    y = accs[0] / (1.0 + jnp.exp(-accs[0])) * accs[1] if len(accs) == 2 else accs[0]  # silu(g) * u, or the product
    out_ref[...] = y.astype(out_ref.dtype)


class PairRows(NamedTuple):
  """The rows of a gathering kernel as the layout's pair rows instead of a ``src`` array.

  ``rows`` [M]: pair m's padded row (-1: none), pair m being token ``m // per_token``'s;
  rows below ``lead_rows`` read their own token. Each program finds its rows'
  tokens by comparison (``_block_tokens``), so the layout needs no row scatter.
  """

  rows: jax.Array
  per_token: int
  lead_rows: int


def _pair_rows(src_P):
  """(the gather ref's array, the kernel's ``pairs`` argument): a ``PairRows``' rows padded with -1 to a
  power-of-two length (what Triton loads), or ``src_P`` itself and None."""
  if not isinstance(src_P, PairRows):
    return src_P, None
  held = src_P.rows.astype(jnp.int32)
  pad = (1 << max(held.shape[0] - 1, 0).bit_length()) - held.shape[0]
  return jnp.pad(held, (0, pad), constant_values=-1), (src_P.per_token, src_P.lead_rows)


def _row_block_call(name, rows, expert_Q, used, weights, out_cols, *, block_rows, tiles: Tiles, interpret,
                    src_P=None, shared_weights=None):
  """Runs ``_row_block_kernel`` on an (output tile, row block) grid; the output-tile axis varies fastest.

  ``rows`` is the padded ``[P, K]`` row array, or with ``src_P`` the ``[T, K]``
  token rows that padded row p reads as ``rows[src_P[p]]`` (``src_P`` may
  be a ``PairRows``: P is then ``Q * block_rows``). ``weights`` are
  arrays, or all ``quant.Int8Weight``s of one group size; ``shared_weights``
  (optional) a stack of shared experts' ``[n, ...]``, read by the blocks of negative id.
  """
  interpret = _interpret(interpret)
  K = rows.shape[1]
  src_P, pairs = _pair_rows(src_P)
  P = rows.shape[0] if src_P is None else expert_Q.shape[0] * block_rows if pairs else src_P.shape[0]
  tile, tile_k = _tile(out_cols, tiles.n), _tile(K, tiles.k)
  num_weights = len(weights)
  every = tuple(weights) + tuple(shared_weights or ())
  group = None
  if all(quant.is_quantized(w) for w in every):
    (group,) = {w.group for w in every}
    tile_k = min(tile_k, _tile(group, tiles.k))  # a contraction chunk within one group of scales
    sets = (weights,) + ((shared_weights,) if shared_weights else ())
    weights = tuple(a for ws in sets for a in tuple(w.values for w in ws) + tuple(w.scale for w in ws))
  elif any(quant.is_quantized(w) for w in every):
    raise ValueError("the weights of one kernel are all int8 or none")
  else:
    weights = every
  whole = pl.BlockSpec()  # whole array: the kernel slices it
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

    params = pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
  if src_P is None:
    row_specs, row_args = [pl.BlockSpec((block_rows, K), lambda j, b: (b, 0))], (rows,)
  else:
    row_specs, row_args = [whole, whole], (src_P, rows)
  kernel = functools.partial(_row_block_kernel, bk=tile_k, num_weights=num_weights, gather=src_P is not None,
                             group=group, shared=bool(shared_weights), pairs=pairs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((P, out_cols), rows.dtype),
      grid=(out_cols // tile, P // block_rows),
      in_specs=[whole, whole] + row_specs + [whole] * len(weights),
      out_specs=pl.BlockSpec((block_rows, tile), lambda j, b: (b, j)),
      interpret=interpret,
      compiler_params=params,
      name=name,
  )(expert_Q, used, *row_args, *weights)


def grouped_swiglu(x_TD, src_P, expert_Q, used, w_gate_EDF, w_up_EDF, *, block_rows, tiles=None, interpret=None,
                   shared=None):
  """Kernel A: ``h [P, F] = silu(xs @ Wg[e]) * (xs @ Wu[e])`` per row block, in x's dtype.

  ``xs[p] = x_TD[src_P[p]]`` (the padded, expert-sorted rows) is gathered
  inside the kernel. ``shared``: shared experts' (gate, up) ``[n, D, F]`` for
  the blocks of negative id.
  """
  F = w_gate_EDF.shape[2]
  return _row_block_call("moe_gate_up", x_TD, expert_Q, used, (w_gate_EDF, w_up_EDF), F, block_rows=block_rows,
                         tiles=tiles or GATE_UP_TILES, interpret=interpret, src_P=src_P, shared_weights=shared)


def grouped_down(h_PF, expert_Q, used, w_down_EFD, *, block_rows, tiles=None, interpret=None, shared=None):
  """Kernel B over padded rows: ``y [P, D] = h @ Wd[e]`` per row block (``shared``: the shared expert's down)."""
  D = w_down_EFD.shape[2]
  return _row_block_call("moe_down", h_PF, expert_Q, used, (w_down_EFD,), D, block_rows=block_rows,
                         tiles=tiles or DOWN_TILES, interpret=interpret, shared_weights=shared)


# Settings of the fastest combined run of an earlier sweep on one H100 (jax 0.11.2, LLaDA-2.0-mini
# shapes); with them each kernel runs at ~1.07x of its touched-weight bytes in the decoding forward.
GATE_UP_TILES = Tiles(n=128, k=128, num_warps=4, num_stages=3)
DOWN_TILES = Tiles(n=128, k=128, num_warps=4, num_stages=3)
# The shared expert is one weight for all T tokens, a few row blocks: narrower output tiles give its
# kernels more programs to spread the weight reads over (a guess, not yet tuned by measurement).
SHARED_GATE_UP_TILES = Tiles(n=32, k=128, num_warps=4, num_stages=3)
SHARED_DOWN_TILES = Tiles(n=64, k=128, num_warps=4, num_stages=3)


def shared_expert_pallas(x_TD, w_gate_DC, w_up_DC, w_down_CD, *, block_rows=16, interpret=None,
                         gate_up_tiles: Tiles | None = None, down_tiles: Tiles | None = None):
  """The shared expert ``swiglu(x @ Wg, x @ Wu) @ Wd`` [T, D] through the routed experts' kernels.

  Every token is routed to one expert holding these weights (int8 ``quant.Int8Weight``s
  or arrays); the output is in x's dtype.
  """
  interpret = _interpret(interpret)
  T = x_TD.shape[0]
  one = _one_expert((w_gate_DC, w_up_DC, w_down_CD))
  Q = -(-T // block_rows)  # the tokens in order, the last block padded (padding rows read token T-1)
  src_P = jnp.minimum(jnp.arange(Q * block_rows, dtype=jnp.int32), T)
  expert_Q, used = jnp.zeros((Q,), jnp.int32), jnp.full((1,), Q, jnp.int32)
  kw = dict(block_rows=block_rows, interpret=interpret)
  h_PF = grouped_swiglu(x_TD, src_P, expert_Q, used, one[0], one[1], tiles=gate_up_tiles or SHARED_GATE_UP_TILES, **kw)
  return grouped_down(h_PF, expert_Q, used, one[2], tiles=down_tiles or SHARED_DOWN_TILES, **kw)[:T]


# Up to this many (token, expert) pairs the gate / up kernel finds its rows' tokens by comparing the
# pairs' rows (``PairRows``): the layout then needs no row scatter (two fewer small kernels per layer).
# Measured on one H200 (BENCHMARKS.md): faster at 256 pairs (batch 1), slower at 2048 (batch 8), where
# each program's [block_rows, M] comparison costs more than the scatter saves.
PAIR_ROWS_MAX_PAIRS = 256


def experts_pallas(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD, *, block_rows=16, interpret=None,
                   gate_up_tiles: Tiles | None = None, down_tiles: Tiles | None = None, num_experts=None,
                   expert_offset=0, valid_TX=None, shared=None, shared_index=0):
  """Routed-expert output [T, D], same contract as ``moe.experts_dense``.

  Expert weights are cast to x's dtype, matmuls accumulate in fp32, SwiGLU
  runs in fp32, combine weights are applied in fp32 and the result is
  returned in x's dtype. ``interpret`` defaults to True on the CPU backend.
  The weights may hold several layers' experts flattened to ``[layers * E, ...]``:
  then ``num_experts`` is E and ``expert_offset`` (traced is fine) is the
  layer's first row, so a scan over layers reads its slice in place instead
  of copying it out of the stacked parameter first.
  ``gate_up_tiles`` / ``down_tiles`` are the two kernels' launch settings
  (default ``GATE_UP_TILES`` / ``DOWN_TILES``, chosen by
  ``tools/bench_moe.py --sweep``). Pairs where ``valid_TX`` is False are
  skipped (they contribute nothing): the expert-parallel path passes the
  pairs whose experts live on other devices that way.

  ``shared`` (optional): the shared expert's ``(gate [D, F], up [D, F],
  down [F, D])``, the routed experts' width and kind (arrays or int8), or
  stacks of them ``[n, ...]`` of which ``shared_index`` (traced is fine) is
  this layer's, read in place. Its output is added (in fp32); it runs in the
  same two kernels as ``ceil(T / block_rows)`` row blocks placed first (no
  extra launches or weight copies; its programs fill the routed waves).
  """
  interpret = _interpret(interpret)
  dtype = x_TD.dtype
  E = num_experts or w_gate_EDF.shape[0]
  if not interpret and (block_rows < 16 or block_rows & (block_rows - 1)):
    raise ValueError(f"block_rows must be a power of two >= 16 on the GPU, got {block_rows}")
  one = None if shared is None else _one_expert(shared) if shared[0].ndim == 2 else tuple(shared)
  layout, src = _layout_for_kernels(idx_TX, E, block_rows, valid_TX, expert_offset, shared is not None, shared_index)
  kw = dict(block_rows=block_rows, interpret=interpret)
  h_PF = grouped_swiglu(x_TD, src, layout["expert"], layout["used"], w_gate_EDF, w_up_EDF, tiles=gate_up_tiles,
                        shared=one and one[:2], **kw)
  y_PD = grouped_down(h_PF, layout["expert"], layout["used"], w_down_EFD, tiles=down_tiles, shared=one and one[2:],
                      **kw)
  wide = accum_dtype(dtype)
  y_TXD = y_PD[layout["pos"]].astype(wide)  # each (token, slot) pair's row: one gather
  if valid_TX is not None:
    y_TXD = jnp.where(valid_TX[..., None], y_TXD, 0.0)
  y_TD = jnp.einsum("txd,tx->td", y_TXD, w_TX.astype(wide))
  if shared is not None:
    y_TD = y_TD + y_PD[:x_TD.shape[0]].astype(wide)  # the shared blocks' rows: token t at row t
  return y_TD.astype(dtype)


def _layout_for_kernels(idx_TX, num_experts, block_rows, valid_TX, expert_offset, shared: bool, shared_index):
  """(``block_layout``, the gate / up kernel's row source: ``PairRows`` up to ``PAIR_ROWS_MAX_PAIRS``, else ``src``).

  With ``shared`` the shared expert's ``ceil(T / block_rows)`` blocks lead.
  """
  T, X = idx_TX.shape
  lead = -(-T // block_rows) if shared else 0
  by_pairs = T * X <= PAIR_ROWS_MAX_PAIRS
  # The barrier keeps the layout materialised: otherwise XLA fuses its computation into the combine's
  # gather and recomputes it for every output element (measured: +15 us per layer at batch 1).
  layout = jax.lax.optimization_barrier(block_layout(
      idx_TX, num_experts, block_rows, valid_TX=valid_TX, expert_offset=expert_offset, lead_blocks=lead,
      lead_id=shared_block_id(shared_index), with_src=not by_pairs))
  return layout, PairRows(layout["rows"], X, min(lead * block_rows, T)) if by_pairs else layout["src"]


def _one_expert(weights):
  """``[..]`` weights (arrays or ``quant.Int8Weight``s) as a one-expert ``[1, ..]`` stack."""
  return tuple(jax.tree.map(lambda a: a[None], w) for w in weights)


def experts_pallas_expert_parallel(x_TD, idx_TX, w_TX, w_gate_LEDF, w_up_LEDF, w_down_LEFD, layer, *,
                                   axis: str = "expert", **kw):
  """``experts_pallas`` with the experts split over the mesh axis ``axis`` (expert parallelism).

  Runs under the mesh set with ``jax.set_mesh``. The weights are ``[layers, E,
  ...]`` stacks (``layer`` picks one, traced is fine) whose expert dimension is
  split over ``axis``; tokens and routing are replicated. Each device runs the
  kernels on the pairs routed to its own experts, reading its local slice of
  the stack in place, and the partial outputs (rounded to x's dtype, as a
  single device's output is) are summed over ``axis`` in fp32, so every
  device returns the full ``[T, D]`` result.
  """
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  E = w_gate_LEDF.shape[1]
  n = jax.sharding.get_abstract_mesh().shape[axis]
  if E % n:
    raise ValueError(f"{E} experts do not split over the {n} devices of mesh axis {axis!r}")
  local = E // n
  dtype = x_TD.dtype

  def body(x, idx, w, wg, wu, wd, layer):
    first = jax.lax.axis_index(axis) * local
    mine = (idx >= first) & (idx < first + local)
    flat = [jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), w) for w in (wg, wu, wd)]  # a bitcast
    y = experts_pallas(x, jnp.where(mine, idx - first, 0), w, *flat,
                       num_experts=local, expert_offset=layer * local, valid_TX=mine, **kw)
    return jax.lax.psum(y.astype(accum_dtype(dtype)), axis)

  experts = P(None, axis)
  out = jax.shard_map(body, in_specs=(P(), P(), P(), experts, experts, experts, P()), out_specs=P(),
                      check_vma=False)(x_TD, idx_TX, w_TX, w_gate_LEDF, w_up_LEDF, w_down_LEFD, layer)
  return out.astype(dtype)
