"""Routed experts as two Pallas grouped matmuls that skip untouched experts.

Shape letters as in ``dmax_jax/moe.py`` (T tokens, D model width, E experts,
F expert width, X experts per token), plus R = T*X sorted (token, expert)
rows, P padded rows, B row blocks (P = B * block_rows).

Why: decoding runs the MoE on a few dozen tokens, so a layer is bound by
reading expert weights. ``jax.lax.ragged_dot`` is lowered by XLA on NVIDIA
GPUs to a dense product over all E experts and a dense einsum computes
every expert too; both read every expert's weights. Here each touched
expert's weights are read once (from HBM; repeated row blocks of one expert
find them in L2) and untouched experts cost nothing.

Layout (all static shapes, jit-able):
1. The R (token, expert) pairs are sorted by expert and each expert's group
   is padded to a multiple of ``block_rows`` rows, so every row block belongs
   to one expert. The number of blocks is bounded statically by
   ``B = (R + min(E, R) * (block_rows - 1)) // block_rows``; blocks past the
   used ones are skipped inside the kernels (``pl.when``).
2. Kernel A (grid: row block x F tile): ``h = silu(x @ Wg[e]) * (x @ Wu[e])``
   with fp32 accumulation and SwiGLU in fp32, cast to the compute dtype.
3. Kernel B (grid: row block x D tile): ``y = h @ Wd[e]``.
   The row-block axis is the fastest-varying grid axis, so row blocks of one
   expert run side by side and share the weight tile through L2.
4. Padded rows are dropped, rows un-sorted and combined with the routing
   weights in fp32 (``moe.combine_sorted``).

Weights are cast to x's dtype tile by tile inside the kernels, so fp32
parameters cost a read of the touched experts only (the other backends cast
every expert first). The expert of a row block is read inside the kernel
from a small int32 array: the Triton backend has no scalar prefetch, so the weight refs are
whole arrays and the kernel slices ``w[e, d0:d0+bk, f0:f0+tF]`` itself.
Tiles are powers of two (Triton's constraint on loaded blocks); Triton's dot
needs ``block_rows >= 16``. Forward only (no VJP): this is the decoding path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dmax_jax import moe


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


def block_layout(idx_TX, num_experts: int, block_rows: int):
  """Sorted, padded row layout of the (token, expert) pairs.

  Returns a dict of int32 arrays:
    order [R], token [R]: as ``moe.sort_by_expert`` (pair index / token of each sorted row);
    pos [R]: the padded row of each sorted row;
    src [P]: the token each padded row reads, T for a padding row;
    expert [B]: the expert of each row block (clipped to E-1 past the used blocks);
    used [1]: the number of used row blocks (they come first).
  """
  T, X = idx_TX.shape
  R = T * X
  E = num_experts
  bm = block_rows
  B = num_row_blocks(R, E, bm)
  order, token, size_E = moe.sort_by_expert(idx_TX, E)
  blocks_E = (size_E + bm - 1) // bm
  block_end_E = jnp.cumsum(blocks_E)
  block_start_E = block_end_E - blocks_E
  row_start_E = jnp.cumsum(size_E) - size_E
  expert_R = idx_TX.reshape(-1)[order]
  pos = block_start_E[expert_R] * bm + jnp.arange(R, dtype=jnp.int32) - row_start_E[expert_R]
  src = jnp.full((B * bm,), T, jnp.int32).at[pos].set(token.astype(jnp.int32))
  # compare_all: the default searchsorted method lowers to a sequential loop on GPU.
  expert_B = jnp.searchsorted(block_end_E, jnp.arange(B), side="right", method="compare_all")
  return dict(
      order=order.astype(jnp.int32),
      token=token.astype(jnp.int32),
      pos=pos.astype(jnp.int32),
      src=src,
      expert=jnp.minimum(expert_B, E - 1).astype(jnp.int32),
      used=block_end_E[-1:].astype(jnp.int32),
  )


def _row_block_kernel(expert_ref, used_ref, rows_ref, *refs, bk):
  """One row block x one output tile of ``rows @ W[e]`` for each weight ref.

  With one weight (w_down) the product is the output; with two (w_gate,
  w_up) the output is ``silu(rows @ Wg[e]) * (rows @ Wu[e])``, in fp32.
  The contraction runs in ``bk`` chunks with fp32 accumulators.
  """
  *w_refs, out_ref = refs
  b = pl.program_id(0)
  j = pl.program_id(1)
  bm, tn = out_ref.shape
  K = rows_ref.shape[1]

  @pl.when(b < used_ref[0])
  def _():
    e = expert_ref[b]
    n0 = pl.multiple_of(j * tn, tn)

    def body(k, accs):
      k0 = pl.multiple_of(k * bk, bk)
      x = rows_ref[:, pl.ds(k0, bk)]
      return tuple(
          acc + jnp.dot(x, w_ref[e, pl.ds(k0, bk), pl.ds(n0, tn)].astype(x.dtype),
                        preferred_element_type=jnp.float32)
          for acc, w_ref in zip(accs, w_refs))

    zeros = tuple(jnp.zeros((bm, tn), jnp.float32) for _ in w_refs)
    accs = jax.lax.fori_loop(0, K // bk, body, zeros)
    if len(accs) == 2:
      g, u = accs
      y = g / (1.0 + jnp.exp(-g)) * u
    else:
      (y,) = accs
    out_ref[...] = y.astype(out_ref.dtype)


def _row_block_call(name, rows_PK, expert_B, used, weights, out_cols, *, block_rows, tile, tile_k,
                    interpret, num_warps, num_stages):
  """Runs ``_row_block_kernel`` on a (row block, output tile) grid; the row-block axis varies fastest."""
  P, K = rows_PK.shape
  whole = pl.BlockSpec()  # whole array: the kernel slices it
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel

    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(
      functools.partial(_row_block_kernel, bk=tile_k),
      out_shape=jax.ShapeDtypeStruct((P, out_cols), rows_PK.dtype),
      grid=(P // block_rows, out_cols // tile),
      in_specs=[whole, whole, pl.BlockSpec((block_rows, K), lambda b, j: (b, 0))] + [whole] * len(weights),
      out_specs=pl.BlockSpec((block_rows, tile), lambda b, j: (b, j)),
      interpret=interpret,
      compiler_params=params,
      name=name,
  )(expert_B, used, rows_PK, *weights)


def grouped_swiglu(xs_PD, expert_B, used, w_gate_EDF, w_up_EDF, *, tile_f, **kw):
  """Kernel A over padded rows: ``h [P, F] = silu(xs @ Wg[e]) * (xs @ Wu[e])`` per row block, in xs's dtype."""
  F = w_gate_EDF.shape[2]
  return _row_block_call("moe_gate_up", xs_PD, expert_B, used, (w_gate_EDF, w_up_EDF), F,
                         tile=tile_f, **kw)


def grouped_down(h_PF, expert_B, used, w_down_EFD, *, tile_d, **kw):
  """Kernel B over padded rows: ``y [P, D] = h @ Wd[e]`` per row block."""
  D = w_down_EFD.shape[2]
  return _row_block_call("moe_down", h_PF, expert_B, used, (w_down_EFD,), D, tile=tile_d, **kw)


def experts_pallas(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD, *, block_rows=16, interpret=None,
                   tile_f=128, tile_d=128, tile_k=128, num_warps=4, num_stages=3, num_experts=None, expert_offset=0):
  """Routed-expert output [T, D], same contract as ``moe.experts_dense``.

  Expert weights are cast to x's dtype, matmuls accumulate in fp32, SwiGLU
  runs in fp32, combine weights are applied in fp32 and the result is
  returned in x's dtype. ``interpret`` defaults to True on the CPU backend.
  The weights may hold several layers' experts flattened to ``[layers * E, ...]``:
  then ``num_experts`` is E and ``expert_offset`` (traced is fine) is the
  layer's first row, so a scan over layers reads its slice in place instead
  of copying it out of the stacked parameter first.
  ``tile_f`` / ``tile_d`` / ``tile_k`` are upper bounds on the F tile of
  kernel A, the D tile of kernel B and the contraction chunk of both;
  ``num_warps`` / ``num_stages`` are Triton's launch settings. The defaults
  were the fastest of ``tools/bench_moe.py --sweep`` on one H100 (jax 0.11.2,
  LLaDA-2.0-mini shapes, bf16): 0.43 ms at T=32, 0.70 ms at T=256, 1.25x and
  1.27x the touched-weight bytes over the measured copy bandwidth.
  """
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  dtype = x_TD.dtype
  T, D = x_TD.shape
  _, _, F = w_gate_EDF.shape
  E = num_experts or w_gate_EDF.shape[0]
  if not interpret and (block_rows < 16 or block_rows & (block_rows - 1)):
    raise ValueError(f"block_rows must be a power of two >= 16 on the GPU, got {block_rows}")
  layout = block_layout(idx_TX, E, block_rows)
  layout["expert"] = layout["expert"] + expert_offset
  xs_PD = jnp.take(x_TD, layout["src"], axis=0, mode="fill", fill_value=0)
  kw = dict(block_rows=block_rows, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
  h_PF = grouped_swiglu(xs_PD, layout["expert"], layout["used"], w_gate_EDF, w_up_EDF, tile_f=_tile(F, tile_f),
                        tile_k=_tile(D, tile_k), **kw)
  y_PD = grouped_down(h_PF, layout["expert"], layout["used"], w_down_EFD, tile_d=_tile(D, tile_d),
                      tile_k=_tile(F, tile_k), **kw)
  ys_RD = y_PD[layout["pos"]]
  return moe.combine_sorted(ys_RD, layout["order"], w_TX, T).astype(dtype)
