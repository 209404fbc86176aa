"""Weight-only int8 quantization of the MoE experts (routed and shared), for decoding.

A quantized ``[..., K, N]`` weight (``y = x @ W``, K the contraction) is an
``Int8Weight``: int8 ``values`` stored transposed, ``[..., N, K]`` (K
contiguous, the layout int8 tensor-core operands are read in: measured on an
H200, the decoding kernels read it 25% faster than ``[..., K, N]``), and
float32 ``scale`` of shape ``[..., K // group, N]``, symmetric (no zero point):

  W ~= swapaxes(values, -1, -2) * scale   (scale broadcast over each group of ``group`` rows along K)

``Int8Weight.shape`` is the logical ``[..., K, N]``. ``group = K`` (the
default, ``group_size=None``) is one scale per output channel (``scale [...,
1, N]``); a smaller ``group_size`` dividing K gives per-group scales along K.
Each group's scale is ``max |w| / 127`` and values are ``round(w / scale)`` in
[-127, 127]. qwix's ``QArray`` holds the same numbers (``scale`` has the
weight's rank and tiles it); qwix itself is not used because its ``astype``
does not dequantize and the Pallas kernel needs the raw arrays anyway.

``Int8Weight`` is a pytree whose children are keyed ``values`` and ``scale``
(dict keys), so a layer scan slices both along the layer axis, ``jax.tree.map``
reshapes both (leading axes only: the last two differ), and a checkpoint
stores them as the leaves ``moe.w_gate.values`` and ``moe.w_gate.scale``
(``VALUES_LAYOUT`` in its config entry). Activations stay in the compute dtype;
the ``pallas`` MoE backend reads the int8 values and applies the scales to its
fp32 accumulators (``kernels/moe_pallas.py``), the other backends dequantize
first (``dequantize``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# The parameters quantized by ``quantize_params`` (leaves of the ``moe`` stack): routed and shared experts.
QUANTIZED = ("w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")
METHODS = ("int8",)
CONFIG_KEY = "dmax_quantization"  # config.json entry of a quantized checkpoint: {"method", "group_size", "leaves"}
QMAX = 127
VALUES_LAYOUT = "NK"  # config entry "values_layout": int8 values stored [..., N, K] (earlier checkpoints: [..., K, N])


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """int8 ``values [..., N, K]`` and float32 ``scale [..., K // group, N]`` of a ``[..., K, N]`` weight."""

  values: Any
  scale: Any

  shape = property(lambda self: values_shape(self.values.shape))  # the swap of the last two axes undoes itself
  ndim = property(lambda self: len(self.values.shape))

  @property
  def group(self) -> int:
    """Rows of K that share one scale (K itself: per output channel)."""
    return self.values.shape[-1] // self.scale.shape[-2]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.values.shape)) * 1 + int(np.prod(self.scale.shape)) * np.dtype(self.scale.dtype).itemsize

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.DictKey("values"), self.values), (jax.tree_util.DictKey("scale"), self.scale)), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


def is_quantized(w) -> bool:
  return isinstance(w, Int8Weight)


def _xp(w):
  return np if isinstance(w, np.ndarray) else jnp


def quantize(w, group_size: Optional[int] = None) -> Int8Weight:
  """``[..., K, N]`` float weight -> ``Int8Weight`` (per output channel, or per ``group_size`` rows of K).

  NumPy in, NumPy out (conversion writes one tensor at a time on the host);
  jax arrays stay on their device.
  """
  xp = _xp(w)
  K, N = w.shape[-2:]
  group = K if group_size is None else int(group_size)
  if group <= 0 or K % group:
    raise ValueError(f"group_size {group_size} does not divide the contraction dimension {K}")
  w32 = w.astype(xp.float32).reshape(w.shape[:-2] + (K // group, group, N))
  amax = xp.max(xp.abs(w32), axis=-2)  # [..., G, N]
  # times the float32 reciprocal, not divided: XLA turns a division by a constant into that product, and the
  # host (conversion) and device (quantizing at load) must produce the same bits
  scale = xp.where(amax > 0, amax * np.float32(1 / QMAX), np.float32(1)).astype(xp.float32)
  values = xp.clip(xp.round(w32 / scale[..., None, :]), -QMAX, QMAX).astype(xp.int8).reshape(w.shape)
  values = xp.swapaxes(values, -1, -2)
  return Int8Weight(np.ascontiguousarray(values) if xp is np else values, scale)


def dequantize(w, dtype=jnp.float32):
  """The dense weight in ``dtype`` (a plain array is just cast): ``values * scale`` computed in float32."""
  if not is_quantized(w):
    return w.astype(dtype)
  xp = _xp(w.values)
  K, N = w.shape[-2:]
  G = w.scale.shape[-2]
  v = xp.swapaxes(w.values, -1, -2).astype(xp.float32).reshape(w.shape[:-2] + (G, K // G, N))
  return (v * w.scale.astype(xp.float32)[..., None, :]).reshape(w.shape).astype(dtype)


def quantize_params(params, method: str = "int8", group_size: Optional[int] = None):
  """``params`` with the MoE stack's expert weights (``QUANTIZED``) replaced by ``Int8Weight``s (jit-able)."""
  if method not in METHODS:
    raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
  if "moe" not in params:
    return params
  moe = {k: quantize(v, group_size) if k in QUANTIZED and not is_quantized(v) else v
         for k, v in params["moe"].items()}
  return dict(params, moe=moe)


def dequantize_params(params, dtype=jnp.float32):
  """``params`` with every ``Int8Weight`` replaced by its dense weight in ``dtype``."""
  return jax.tree.map(lambda w: dequantize(w, dtype) if is_quantized(w) else w, params, is_leaf=is_quantized)


def spec_of(params) -> Optional[dict]:
  """The ``config.json`` quantization entry describing ``params`` (None if nothing is quantized)."""
  flat, _ = jax.tree.flatten_with_path(params, is_leaf=is_quantized)
  quantized = {".".join(str(k.key) for k in path): w for path, w in flat if is_quantized(w)}
  if not quantized:
    return None
  smaller = {w.group for w in quantized.values() if w.group < w.shape[-2]}  # per-group leaves
  group_size = smaller.pop() if len(smaller) == 1 else None
  if smaller or any(w.group != (w.shape[-2] if group_size is None else group_size) for w in quantized.values()):
    raise ValueError(f"quantized leaves use different groups: { {k: w.group for k, w in quantized.items()} }")
  return {"method": "int8", "group_size": group_size, "leaves": sorted(quantized), "values_layout": VALUES_LAYOUT}


def scale_shape(shape, group_size: Optional[int]) -> tuple[int, ...]:
  """The scale's shape for a ``[..., K, N]`` weight of ``shape``."""
  K = shape[-2]
  group = K if group_size is None else group_size
  if K % group:
    raise ValueError(f"group_size {group_size} does not divide the contraction dimension {K} of {tuple(shape)}")
  return tuple(shape[:-2]) + (K // group, shape[-1])


def values_shape(shape) -> tuple[int, ...]:
  """The stored int8 values' shape for a ``[..., K, N]`` weight of ``shape``: ``[..., N, K]``."""
  return tuple(shape[:-2]) + (shape[-1], shape[-2])


def weight_bytes(shape, group_size: Optional[int] = None, quantized: bool = True, dense_itemsize: int = 2) -> int:
  """Bytes one weight of ``shape`` occupies: int8 values plus float32 scales, or ``dense_itemsize`` per element."""
  n = int(np.prod(shape))
  if not quantized:
    return n * dense_itemsize
  return n + 4 * int(np.prod(scale_shape(shape, group_size)))
