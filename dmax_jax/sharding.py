"""Every sharding decision: the device mesh and one PartitionSpec per tensor.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style splits of heads / MLP width / vocabulary
  expert  routed experts split across devices (the batch is split too)

The batch dimension is split over ``BATCH_AXES``. A parameter dimension is
only split over an axis whose size divides it (otherwise it stays whole), so
the same rules serve a 1-CPU run, 8 emulated CPU devices and a GPU cluster.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Per parameter name (last key of its path): the mesh axis of each trailing dim
# (stacked layer stacks carry one more leading, unsplit, layer dim).
_RULES = {
    "embed": ("tensor", "fsdp"),  # [V, D]
    "lm_head": ("fsdp", "tensor"),  # [D, V]
    "qkv": ("fsdp", "tensor"),  # [D, (H + 2G) R]
    "o": ("tensor", "fsdp"),  # [H R, D]
    "gate": ("fsdp", "tensor"),  # [D, I]
    "up": ("fsdp", "tensor"),
    "down": ("tensor", "fsdp"),  # [I, D]
    "shared_gate": ("fsdp", "tensor"),  # [D, S]
    "shared_up": ("fsdp", "tensor"),
    "shared_down": ("tensor", "fsdp"),  # [S, D]
    "router": ("fsdp", None),  # [D, E]
    "w_gate": ("expert", "fsdp", "tensor"),  # [E, D, F]
    "w_up": ("expert", "fsdp", "tensor"),
    "w_down": ("expert", "tensor", "fsdp"),  # [E, F, D]
}


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one ``-1`` entry to the remaining devices; checks the product."""
  sizes = {a: int(axes.get(a, 1)) for a in AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise MeshError(f"mesh: {num_devices} devices do not split into {sizes}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"mesh: {sizes} needs {math.prod(sizes.values())} devices, have {num_devices}")
  return sizes


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over ``devices`` (default: all) with the four axes in ``AXES`` order."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(axes, len(devices))
  grid = np.array(devices).reshape([sizes[a] for a in AXES])
  return Mesh(grid, AXES)


def _fit(mesh: Mesh, shape, axes) -> P:
  """The spec with every axis that does not divide its dimension dropped."""
  out = []
  for dim, axis in zip(shape, axes):
    names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    names = tuple(n for n in names if mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    out.append(names if names and dim % size == 0 else None)
  return P(*[(n[0] if isinstance(n, tuple) and len(n) == 1 else n) for n in out])


def param_spec(mesh: Mesh, name: str, shape) -> P:
  """The spec of a parameter (or its optimizer moments) called ``name`` with ``shape``."""
  rule = _RULES.get(name)
  if rule is None or len(shape) < len(rule):
    return P()
  lead = (None,) * (len(shape) - len(rule))
  return _fit(mesh, shape, lead + rule)


def _leaf_name(path) -> tuple[str, bool]:
  """(the parameter's name, whether the leaf is an int8 weight's ``values``, stored with its last two axes swapped)."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  keys = [k for k in keys if isinstance(k, str)]
  part = keys[-1] if len(keys) > 1 and keys[-1] in ("values", "scale") else None  # an int8 weight's parts split as it
  if part:
    keys = keys[:-1]
  return (keys[-1] if keys else ""), part == "values"


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for a params tree or anything holding params-like leaves (optimizer state).

  Leaves are matched by their last dict key; unknown leaves are replicated.
  """
  def one(path, leaf):
    name, swapped = _leaf_name(path)
    shape = np.shape(leaf)
    if not swapped:
      return NamedSharding(mesh, param_spec(mesh, name, shape))
    spec = tuple(param_spec(mesh, name, shape[:-2] + (shape[-1], shape[-2])))
    spec += (None,) * (len(shape) - len(spec))
    return NamedSharding(mesh, P(*spec[:-2], spec[-1], spec[-2]))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_spec(mesh: Mesh, ndim: int, batch_dim: int = 0) -> P:
  """Spec of a batch array: its ``batch_dim`` split over ``BATCH_AXES``."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
  spec = [None] * ndim
  spec[batch_dim] = axes
  return P(*spec)


def batch_size_multiple(mesh: Mesh) -> int:
  """The number of batch shards: a micro-batch must be a multiple of it."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_shardings(mesh: Mesh, batch, batch_dim: int = 0):
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(mesh, np.ndim(x), batch_dim)), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
