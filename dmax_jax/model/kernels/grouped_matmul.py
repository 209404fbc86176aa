"""The MoE's grouped matmul on Hopper GPUs (H100 / H200), forward and backward, from library kernels.

``rows [M, J] x w [E, J, N] -> [M, N]``, rows sorted into consecutive groups
(``group_sizes [E]``), group e multiplied by ``w[e]``; rows past the groups
give 0 and get no gradient.

- Forward and input gradient: tokamax's Mosaic GPU ``ragged_dot`` kernel. At
  training sizes (tens of rows per expert and more) it runs with the launch
  settings measured fastest at the OPUT step's shapes (``_tuned``); tokamax's
  own heuristic (64 x 64 tiles) ran those shapes 1.3-1.8x slower on an H200.
- Weight gradient: JAX's Mosaic GPU transposed ragged dot
  (``jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu``). tokamax
  0.0.17's own weight-gradient kernel (its "ragged contracting" dot) is wrong
  on an H200 for every group that spans more than one of its K blocks (about
  17% relative error on such groups, 2-6% over a whole layer; BENCHMARKS.md),
  so tokamax's VJP is not used.

``applies`` says where this path runs; elsewhere ``moe.ragged_dot`` uses
tokamax's or XLA's ``ragged_dot`` as before. The library parses no flags and
the module has no state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# rows per expert from which the tuned launch settings apply (decoding sizes keep tokamax's heuristic)
_TUNED_MIN_ROWS_PER_GROUP = 64
# contraction width from which a product counts as wide (128-wide K steps, 4 stages, a persistent grid)
_WIDE_K = 1024


@dataclasses.dataclass(frozen=True)
class WeightGradTiles:
  """Launch settings of the weight-gradient kernel (output tile ``m x n``, ``k`` rows per step)."""

  m: int = 128
  n: int = 128
  k: int = 64
  stages: int = 4
  grid_block_n: int = 1


WEIGHT_GRAD_TILES = WeightGradTiles()


@functools.cache
def _modules():
  """(tokamax's Mosaic GPU ragged-dot module, JAX's transposed ragged dot) or None where either is missing."""
  try:
    # pylint: disable=import-outside-toplevel
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    from tokamax._src.ops.ragged_dot import base as tokamax_base
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu
  except ImportError:
    return None
  return pallas_mosaic_gpu, tokamax_base, transposed_ragged_dot_mgpu


def _is_hopper() -> bool:
  dev = jax.devices()[0]
  return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def ready() -> bool:
  """Whether this device is a Hopper GPU and both libraries' kernels can be imported."""
  return _is_hopper() and _modules() is not None


def applies(x_MJ, w_EJN) -> bool:
  """Whether ``ragged_dot`` below runs these operands: a Hopper GPU, both bf16 (or both fp16), the kernels
  importable, and widths the kernels' tiles divide."""
  J, N = w_EJN.shape[1:]
  return (x_MJ.dtype == w_EJN.dtype and x_MJ.dtype in (jnp.bfloat16, jnp.float16) and J % 64 == 0
          and N % 64 == 0 and ready())


def _tuned(rows: int, groups: int, k: int):
  """tokamax launch settings for a ``[rows, k] x [groups, k, n]`` product (None: tokamax's heuristic).

  Measured on an H200 at 262,144 rows over 256 experts (BENCHMARKS.md): 128-row tiles throughout; a wide
  contraction (k >= 1024) wants 128-wide K steps, 4 stages and a persistent grid, a narrow one 64-wide steps,
  2 stages and one program per tile.
  """
  if rows < _TUNED_MIN_ROWS_PER_GROUP * groups:
    return None
  pmg = _modules()[0]
  wide = k >= _WIDE_K
  return pmg.Config(block_m=128, block_n=64, block_k=128 if wide else 64, num_stages=4 if wide else 2, split_k=1,
                    persistent=wide, grid_minor_dim=pmg.common.MatmulDimension.M, grid_tile_width=1)


def _product(x_MJ, w, group_sizes_E, transpose_rhs=False):
  """tokamax's kernel: ``x @ w[e]`` per group, or with ``transpose_rhs`` ``x @ w[e].T`` (w then ``[E, N, J]``)."""
  pmg, base, _ = _modules()
  E = w.shape[0]
  k = w.shape[2] if transpose_rhs else w.shape[1]
  dims = base.TRANS_RHS_RAGGED_DOT_DIM_NUMS if transpose_rhs else base.DEFAULT_RAGGED_DOT_DIM_NUMS
  M = x_MJ.shape[0]
  op = pmg.PallasMosaicGpuRaggedDot(config=_tuned(M, E, k))
  out = op(_pad_rows(x_MJ), w, group_sizes=group_sizes_E, ragged_dot_dimension_numbers=dims)[:M]
  # the kernel writes only the groups' rows: the rest of the buffer is whatever memory held (NaN possibly)
  in_groups = jnp.arange(M) < jnp.sum(group_sizes_E)
  return jnp.where(in_groups[:, None], out, jnp.zeros((), out.dtype))


def _pad_rows(a, multiple: int = 8):
  """``a`` with zero rows appended up to a multiple of ``multiple`` (the kernels tile rows by 8)."""
  pad = -a.shape[0] % multiple
  return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def weight_grad(x_MJ, ct_MN, group_sizes_E, tiles: WeightGradTiles = WEIGHT_GRAD_TILES):
  """``[E, J, N]``: ``x[group e].T @ ct[group e]`` per group (JAX's transposed ragged dot)."""
  J, N = x_MJ.shape[1], ct_MN.shape[1]
  tm = tiles.m if J % tiles.m == 0 else 64
  tn = tiles.n if N % tiles.n == 0 else 64
  return _modules()[2].transposed_ragged_dot(
      _pad_rows(x_MJ), _pad_rows(ct_MN), group_sizes=group_sizes_E.astype(jnp.int32), block_m=tm, block_n=tn, block_k=tiles.k,
      max_concurrent_steps=tiles.stages, grid_block_n=tiles.grid_block_n)


@jax.custom_vjp
def ragged_dot(x_MJ, w_EJN, group_sizes_E):
  """``[M, N]`` (see the module docstring); only where ``applies(x_MJ, w_EJN)``."""
  return _product(x_MJ, w_EJN, group_sizes_E)


def _fwd(x_MJ, w_EJN, group_sizes_E):
  return _product(x_MJ, w_EJN, group_sizes_E), (x_MJ, w_EJN, group_sizes_E)


def _bwd(res, ct_MN):
  x_MJ, w_EJN, group_sizes_E = res
  ct_MN = ct_MN.astype(x_MJ.dtype)
  dx_MJ = _product(ct_MN, w_EJN, group_sizes_E, transpose_rhs=True)
  dw_EJN = weight_grad(x_MJ, ct_MN, group_sizes_E).astype(w_EJN.dtype)
  return dx_MJ, dw_EJN, None


ragged_dot.defvjp(_fwd, _bwd)
