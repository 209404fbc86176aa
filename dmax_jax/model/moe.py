"""Mixture of experts: routing, dispatch, expert matmuls, combine.

Shape letters: the package glossary (``dmax_jax/shapes.py``); here T tokens
(flattened batch x length), D model width, E experts, F expert width, X experts
per token (top-k), M = T*X sorted (token, expert) rows, J and N a grouped
matmul's input and output widths.

``moe_mlp`` is the one entry point (training and decoding both call it). The
routed experts run through one of three backends (``cfg.moe_backend``), each of
which prepares its own weight layout (``prepare_experts``):
- ``grouped``: (token, expert) pairs sorted by expert and pushed through a
  grouped matmul in both directions, gate/up and down (``ragged_dot``: Mosaic
  GPU kernels of tokamax and JAX on Hopper, ``kernels.grouped_matmul``;
  ``tokamax.ragged_dot`` or ``jax.lax.ragged_dot`` elsewhere), then
  combined back per token. Under a device mesh (``jax.set_mesh``) it runs in
  ``shard_map``: tokens split over the data axes, each device computing the
  rows of its own experts (``expert`` axis) and its slice of the expert width
  (``tensor``), weights gathered over ``fsdp``, partial outputs summed.
- ``dense``: every expert on every token, weighted by a [T, E] combine matrix.
  Plain and obviously right; the reference the other backends are tested
  against.
- ``pallas``: the grouped layout with a Pallas-Triton kernel that skips empty
  experts (see ``dmax_jax/model/kernels``), forward only, for decoding on the GPU.
  Inside a layer scan it reads every layer's experts in place from one
  flattened (or, expert-parallel, stacked) array instead of a per-layer slice.

Expert weights (routed and shared) may be weight-only int8 (``quant.Int8Weight``):
the ``pallas`` kernels read the int8 values and scales themselves (the shared
expert then runs through them too); ``grouped`` and ``dense`` dequantize first.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dmax_jax.model import quant
from dmax_jax.model.config import ModelConfig, accum_dtype
from dmax_jax.model.kernels import grouped_matmul

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def route(router_w_DE, expert_bias_E, x_TD, cfg: ModelConfig):
  """The routing ``cfg.routing`` names: LLaDA2's router ("learned"), or uniform random top-k ("uniform",
  for benchmarks: every expert equally loaded whatever the weights). -> (ids [T, X] int32, weights [T, X])."""
  if cfg.routing == "uniform":
    return uniform_route(router_w_DE, x_TD, cfg)
  return learned_route(router_w_DE, expert_bias_E, x_TD, cfg)


def uniform_routing(key, T: int, E: int, X: int):
  """Top-X distinct experts per token, uniformly at random; combine weights normalised to 1."""
  ki, kw = jax.random.split(key)
  # the X smallest draws, smallest first: argsort's first X columns, through top_k as the router's top-k (a full
  # sort was ~5 us per layer on an H200, a cost the router's own selection does not have)
  idx = jax.lax.top_k(-jax.random.uniform(ki, (T, E)), X)[1].astype(jnp.int32)
  w = jax.random.uniform(kw, (T, X), minval=0.1, maxval=1.0)
  return idx, w / w.sum(axis=1, keepdims=True)


def uniform_route(router_w_DE, x_TD, cfg: ModelConfig):
  """``uniform_routing`` scaled like the router's weights; a different draw per layer (keyed by its router)."""
  seed = jax.lax.bitcast_convert_type(router_w_DE[0, 0].astype(jnp.float32), jnp.uint32)
  idx, w = uniform_routing(jax.random.key(seed), x_TD.shape[0], cfg.num_experts, cfg.num_experts_per_tok)
  return idx, w * cfg.routed_scaling_factor


def learned_route(router_w_DE, expert_bias_E, x_TD, cfg: ModelConfig):
  """LLaDA2's router: fp32 sigmoid scores, bias for selection only, group-limited top-k.

  Returns (expert ids [T, X] int32, combine weights [T, X] float32). Ids are in
  the order of the biased selection score (highest first).
  """
  if x_TD.dtype == router_w_DE.dtype == jnp.bfloat16:
    # bf16 x bf16 products are exact in fp32: a bf16 matmul accumulating in fp32 computes the
    # same fp32 logits as upcasting first, without a (several times slower) fp32 GEMM.
    logits_TE = jnp.einsum("td,de->te", x_TD, router_w_DE, preferred_element_type=jnp.float32)
  else:
    wide = accum_dtype(x_TD.dtype)
    x32 = x_TD.astype(wide)
    w32 = router_w_DE.astype(wide)
    logits_TE = jnp.einsum("td,de->te", x32, w32, precision=jax.lax.Precision.HIGHEST)
  scores_TE = jax.nn.sigmoid(logits_TE)
  biased_TE = scores_TE + expert_bias_E.astype(logits_TE.dtype)

  T, E = biased_TE.shape
  Y = cfg.n_group
  grouped_TYZ = biased_TE.reshape(T, Y, E // Y)
  # A group's score is the sum of its two best biased scores (the best, plus the best of the rest).
  best_TY = jnp.max(grouped_TYZ, axis=-1)
  group_score_TY = best_TY
  if E // Y > 1:
    first_best = jnp.arange(E // Y) == jnp.argmax(grouped_TYZ, axis=-1)[..., None]
    group_score_TY = best_TY + jnp.max(jnp.where(first_best, -jnp.inf, grouped_TYZ), axis=-1)
  # Keep the topk_group best groups, ties to the lower index (as lax.top_k), by counting the groups
  # ranked ahead of each: elementwise work XLA fuses, instead of a sort-based top_k and a scatter.
  ahead_TYY = (group_score_TY[:, None, :] > group_score_TY[:, :, None]) | (
      (group_score_TY[:, None, :] == group_score_TY[:, :, None]) & (jnp.arange(Y)[None, :] < jnp.arange(Y)[:, None]))
  keep_TY = jnp.sum(ahead_TYY, axis=-1) < cfg.topk_group
  keep_TE = jnp.repeat(keep_TY, E // Y, axis=1)
  masked_TE = jnp.where(keep_TE, biased_TE, -jnp.inf)
  _, idx_TX = jax.lax.top_k(masked_TE, cfg.num_experts_per_tok)

  chosen_TX = jnp.take_along_axis(scores_TE, idx_TX, axis=1)
  weights_TX = chosen_TX / (jnp.sum(chosen_TX, axis=-1, keepdims=True) + 1e-20)
  weights_TX = weights_TX * cfg.routed_scaling_factor
  return idx_TX.astype(jnp.int32), weights_TX


def _swiglu(gate, up):
  return jax.nn.silu(gate) * up


def experts_dense(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Reference backend: every expert on every token."""
  dtype = x_TD.dtype
  T = x_TD.shape[0]
  E = w_gate_EDF.shape[0]
  combine_TE = jnp.zeros((T, E), w_TX.dtype).at[jnp.arange(T)[:, None], idx_TX].add(w_TX)
  gate_TEF = jnp.einsum("td,edf->tef", x_TD, quant.dequantize(w_gate_EDF, dtype))  # int8 experts: dequantized
  up_TEF = jnp.einsum("td,edf->tef", x_TD, quant.dequantize(w_up_EDF, dtype))
  h_TEF = _swiglu(gate_TEF, up_TEF)
  y_TED = jnp.einsum("tef,efd->ted", h_TEF, quant.dequantize(w_down_EFD, dtype))
  y_TD = jnp.einsum("ted,te->td", y_TED.astype(combine_TE.dtype), combine_TE)
  return y_TD.astype(dtype)


@functools.cache
def _import_tokamax():
  """(the tokamax module or None, why it could not be imported or "")."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # not installed (CPU installs), or one of its imports missing (xprof needs fire)
    return None, f"{type(e).__name__}: {e}"
  return tokamax, ""


def tokamax_module():
  """The tokamax module, or None where it cannot be imported (``tokamax_import_error`` says why)."""
  return _import_tokamax()[0]


def tokamax_import_error() -> str:
  """Why ``import tokamax`` failed ("" where it works)."""
  return _import_tokamax()[1]


def grouped_matmul_name() -> str:
  """What ``ragged_dot`` runs on this device, in words (the apps print it)."""
  tokamax = tokamax_module()
  if tokamax is None:
    return f"jax.lax.ragged_dot (tokamax: {tokamax_import_error()})"
  if grouped_matmul.ready():
    return (f"tokamax {tokamax.__version__} Mosaic GPU ragged_dot, measured tiles; weight gradient: JAX's "
            "transposed_ragged_dot")
  return f"tokamax {tokamax.__version__} ragged_dot"


_MEMORY_STAND_IN = [False]


@contextlib.contextmanager
def kernel_memory_stand_in():
  """Within this context ``ragged_dot`` compiles to a stand-in with a fused kernel's memory footprint.

  For planning memory only (``tools/plan_train_memory.py``), never for
  running: its outputs are zeros. XLA's own ``ragged_dot`` (the CPU's, and
  tokamax's XLA fallback) expands the product densely over all E groups,
  tens of GiB per call at LLaDA-2.0-mini training sizes, while tokamax's GPU
  kernels read their operands and write their output and nothing else; the
  stand-in (host callbacks, forward and backward) asks XLA for exactly those
  buffers.
  """
  _MEMORY_STAND_IN[0] = True
  try:
    yield
  finally:
    _MEMORY_STAND_IN[0] = False


@jax.custom_vjp
def _stand_in_ragged_dot(x_MJ, w_EJN, group_sizes_E):
  out = jax.ShapeDtypeStruct((x_MJ.shape[0], w_EJN.shape[2]), x_MJ.dtype)
  return jax.pure_callback(lambda *_: np.zeros(out.shape, out.dtype), out, x_MJ, w_EJN, group_sizes_E)


def _stand_in_fwd(x_MJ, w_EJN, group_sizes_E):
  return _stand_in_ragged_dot(x_MJ, w_EJN, group_sizes_E), (x_MJ, w_EJN, group_sizes_E)


def _stand_in_bwd(res, ct_MN):
  x, w, g = res
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
  dx, dw = jax.pure_callback(lambda *_: tuple(np.zeros(s.shape, s.dtype) for s in shapes), shapes, x, w, g, ct_MN)
  return x * 0 + dx, w * 0 + dw, None  # "* 0 +": the cotangents vary over the mesh axes their inputs vary over


_stand_in_ragged_dot.defvjp(_stand_in_fwd, _stand_in_bwd)


def ragged_dot(x_MJ, w_EJN, group_sizes_E):
  """``[M, N]``: rows ``x`` in consecutive groups, group e multiplied by ``w[e]``; rows past the groups are 0.

  On Hopper GPUs in bf16: ``kernels.grouped_matmul`` (tokamax's Mosaic GPU
  kernel with measured launch settings, and JAX's transposed ragged dot for the
  weight gradient, since tokamax's is wrong there). Elsewhere
  ``tokamax.ragged_dot`` where tokamax is installed (XLA off Hopper); otherwise
  ``jax.lax.ragged_dot``, which XLA lowers densely over all E groups on NVIDIA
  GPUs (BENCHMARKS.md).
  """
  if _MEMORY_STAND_IN[0]:
    return _stand_in_ragged_dot(x_MJ, w_EJN, group_sizes_E)
  tokamax = tokamax_module()
  if tokamax is None:
    return jax.lax.ragged_dot(x_MJ, w_EJN, group_sizes_E)
  if grouped_matmul.applies(x_MJ, w_EJN):
    return grouped_matmul.ragged_dot(x_MJ, w_EJN, group_sizes_E)
  return tokamax.ragged_dot(x_MJ, w_EJN, group_sizes_E)


def sort_by_expert(idx_TX, num_experts):
  """Orders the T*X (token, expert) pairs by expert.

  Ids outside ``[0, num_experts)`` belong to no group and sort last. Returns
  (order [T*X]: pair index of each sorted row, so its token is ``order // X``;
  group_sizes [E]: rows per expert).
  """
  flat = idx_TX.reshape(-1)
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")
  return order, group_sizes


def inverse_permutation(order):
  """``inv`` with ``inv[order[m]] = m`` (the sorted row of each pair)."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)


# Dispatch and combine move rows by a permutation. Written as plain indexing, XLA differentiates each
# gather into a scatter-add (it cannot know the indices are a permutation); these carry their own
# backward, which is the inverse permutation's gather: no scatter in either direction.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch_rows(x_TD, order, inv, X):
  """Sorted rows ``[T*X, D]``: row m is token ``order[m] // X``."""
  return x_TD[order // X]


def _dispatch_fwd(x_TD, order, inv, X):
  return dispatch_rows(x_TD, order, inv, X), (order, inv)


def _dispatch_bwd(X, res, ct_MD):
  order, inv = res
  ct_TXD = ct_MD[inv].reshape(-1, X, ct_MD.shape[-1])  # back to (token, slot) order, then summed per token
  return ct_TXD.sum(axis=1, dtype=accum_dtype(ct_MD.dtype)).astype(ct_MD.dtype), None, None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def unsort_rows(ys_MD, order, inv):
  """Rows back in (token, slot) order: row p is sorted row ``inv[p]``."""
  return ys_MD[inv]


def _unsort_fwd(ys_MD, order, inv):
  return ys_MD[inv], (order, inv)


def _unsort_bwd(res, ct_PD):
  order, _ = res
  return ct_PD[order], None, None


unsort_rows.defvjp(_unsort_fwd, _unsort_bwd)


def _grouped_rows(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Routed output [T, D] in float32 of the pairs whose id is in ``[0, E)``; other pairs add nothing."""
  dtype = x_TD.dtype
  T, X = idx_TX.shape
  E = w_gate_EDF.shape[0]
  order, group_sizes = sort_by_expert(idx_TX, E)
  inv = inverse_permutation(order)
  xs_MD = dispatch_rows(x_TD, order, inv, X)
  gate_MF = ragged_dot(xs_MD, quant.dequantize(w_gate_EDF, dtype), group_sizes)  # int8 experts: dequantized
  up_MF = ragged_dot(xs_MD, quant.dequantize(w_up_EDF, dtype), group_sizes)
  ys_MD = ragged_dot(_swiglu(gate_MF, up_MF), quant.dequantize(w_down_EFD, dtype), group_sizes)
  valid_TX = (idx_TX >= 0) & (idx_TX < E)
  return combine_sorted(ys_MD, order, inv, jnp.where(valid_TX, w_TX, 0.0), valid_TX)


def combine_sorted(ys_MD, order, inv, w_TX, valid_TX):
  """Un-sorts expert outputs and sums them per token with the combine weights (fp32) -> [T, D].

  Rows of pairs where ``valid_TX`` is False are dropped (whatever they hold).
  """
  T, X = w_TX.shape
  y_TXD = unsort_rows(ys_MD, order, inv).reshape(T, X, -1).astype(w_TX.dtype)
  y_TXD = jnp.where(valid_TX[..., None], y_TXD, 0.0)
  return jnp.einsum("txd,tx->td", y_TXD, w_TX)


def _mesh_axes(mesh, names, dim):
  """The axes of ``names`` with more than one device if together they divide ``dim``, else ()."""
  axes = tuple(a for a in names if dict(mesh.shape).get(a, 1) > 1)
  return axes if dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def experts_grouped(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Grouped backend: sorted (token, expert) rows through ``ragged_dot``; split over the mesh if one is set.

  Under a mesh of several devices this runs in ``shard_map``: the tokens are
  split over the ``data`` and ``fsdp`` axes, the experts over ``expert`` (each
  device sorts and multiplies only the rows routed to its own experts) and the
  expert width over ``tensor``; weights are gathered over ``fsdp`` (ZeRO-3) and
  the partial outputs summed over ``expert`` and ``tensor`` in float32.
  """
  dtype = x_TD.dtype
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _grouped_rows(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD).astype(dtype)
  E, _, F = w_gate_EDF.shape
  tokens = _mesh_axes(mesh, ("data", "fsdp"), x_TD.shape[0]) or None
  experts = _mesh_axes(mesh, ("expert",), E)
  width = _mesh_axes(mesh, ("tensor",), F)
  local = E // math.prod(mesh.shape[a] for a in experts)

  def body(x, idx, w, wg, wu, wd):
    first = jax.lax.axis_index(experts) * local if experts else 0
    if experts + width:  # each device's rows differ: x's cotangent is then summed over these axes
      x = jax.lax.pcast(x, experts + width, to="varying")
    y = _grouped_rows(x, idx - first, w, wg, wu, wd)  # ids of other devices' experts fall outside [0, local)
    return jax.lax.psum(y, experts + width) if experts + width else y

  e, t = experts or None, width or None
  rows = P(tokens)
  # cast (int8: dequantize) first: gathered over fsdp in dtype
  weights = (quant.dequantize(w, dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  out = jax.shard_map(body, in_specs=(rows, rows, rows, P(e, None, t), P(e, None, t), P(e, t, None)),
                      out_specs=rows)(x_TD, idx_TX, w_TX, *weights)
  return out.astype(dtype)


def expert_parallel_size(axis: str = "expert") -> int:
  """Devices along ``axis`` of the mesh set with ``jax.set_mesh`` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def prepare_experts(stack, cfg: ModelConfig):
  """A MoE layer stack ``[layers, ...]`` -> (what a layer scan slices per layer, what every layer reads whole).

  ``grouped`` and ``dense`` slice their ``[E, ...]`` experts per layer. The
  ``pallas`` kernels read the whole ``[layers * E, ...]`` flattened stack at the
  layer's offset instead (slicing a layer out would copy ~1.6 GB per layer at
  LLaDA-2.0-mini size), or, expert-parallel, each device's local slice of the
  ``[layers, E, ...]`` stack. Where the kernels take the shared expert along
  (``_shared_merges``) its ``[layers, ...]`` stacks are kept whole too, read at
  the layer's index in place (a scan would copy each layer's slice out first).
  """
  if cfg.moe_backend != "pallas":
    return stack, None
  per_layer = {k: v for k, v in stack.items() if k not in EXPERT_WEIGHTS}
  weights = tuple(stack[k] for k in EXPERT_WEIGHTS)
  if expert_parallel_size() > 1:
    return per_layer, ("stacked", weights, None)
  shared = None
  if _shared_merges(stack, cfg, stack["w_gate"]):  # the kernels read this layer's shared expert from the stack too
    shared = tuple(stack[k] for k in SHARED_WEIGHTS)
    per_layer = {k: v for k, v in per_layer.items() if k not in SHARED_WEIGHTS}
  return per_layer, ("flat", tuple(_flatten_layers(w) for w in weights), shared)


def _flatten_layers(w):
  """``[layers, E, ...]`` -> ``[layers * E, ...]`` (an int8 weight's values and scales alike)."""
  return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), w)


# The pallas backend runs the shared expert inside the routed experts' kernels (``experts_pallas(shared=...)``)
# where it can (one device's experts, the routed experts' width and kind); False: its own calls.
SHARED_IN_ROUTED_KERNELS = True
SHARED_WEIGHTS = ("shared_gate", "shared_up", "shared_down")


def _shared_merges(p, cfg: ModelConfig, routed_gate) -> bool:
  """Whether the pallas kernels take the shared expert in ``p`` along (``SHARED_IN_ROUTED_KERNELS``)."""
  return bool(SHARED_IN_ROUTED_KERNELS and cfg.num_shared_experts
              and cfg.shared_intermediate_size == cfg.moe_intermediate_size
              and quant.is_quantized(p["shared_gate"]) == quant.is_quantized(routed_gate))


def _routed(p, x_TD, idx_TX, w_TX, cfg: ModelConfig, whole, layer):
  """(the routed experts' output [T, D] through ``cfg.moe_backend``, whether the shared expert's is in it).

  ``p`` holds the layer's own weights; ``whole`` is what ``prepare_experts``
  kept whole for every layer (None: the experts are in ``p``) and ``layer``
  this layer's index in it.
  """
  if cfg.moe_backend == "dense":
    return experts_dense(x_TD, idx_TX, w_TX, *(p[k] for k in EXPERT_WEIGHTS)), False
  if cfg.moe_backend == "grouped":
    return experts_grouped(x_TD, idx_TX, w_TX, *(p[k] for k in EXPERT_WEIGHTS)), False
  if cfg.moe_backend != "pallas":
    raise ValueError(f"unknown moe_backend {cfg.moe_backend!r}")
  from dmax_jax.model.kernels import moe_pallas  # pylint: disable=import-outside-toplevel

  if whole is None:  # one layer's [E, ...] experts (and its shared expert, unstacked: experts_pallas takes both)
    shared = tuple(p[k] for k in SHARED_WEIGHTS) if _shared_merges(p, cfg, p["w_gate"]) else None
    whole, layer = ("stacked", tuple(jax.tree.map(lambda a: a[None], p[k]) for k in EXPERT_WEIGHTS), shared), 0
  kind, weights, shared = whole
  if kind == "stacked" and expert_parallel_size() > 1:
    return moe_pallas.experts_pallas_expert_parallel(x_TD, idx_TX, w_TX, *weights, layer), False
  if kind == "stacked":
    weights = tuple(_flatten_layers(w) for w in weights)
  return moe_pallas.experts_pallas(x_TD, idx_TX, w_TX, *weights, num_experts=cfg.num_experts,
                                   expert_offset=layer * cfg.num_experts, shared=shared,
                                   shared_index=layer), shared is not None


def moe_mlp(p, x_TD, cfg: ModelConfig, whole=None, layer=0):
  """Routed experts plus the shared expert for one MoE layer.

  ``p`` holds one layer's MoE weights (see ``params.py``), less what
  ``prepare_experts`` keeps in ``whole`` (``layer``: this layer's index there).
  Returns (y [T, D], (ids [T, X], weights [T, X])).
  """
  idx_TX, w_TX = route(p["router"], p["expert_bias"], x_TD, cfg)
  y, shared_done = _routed(p, x_TD, idx_TX, w_TX, cfg, whole, layer)
  if not cfg.num_shared_experts or shared_done:
    return y, (idx_TX, w_TX)
  if cfg.moe_backend == "pallas" and quant.is_quantized(p["shared_gate"]):
    from dmax_jax.model.kernels import moe_pallas  # pylint: disable=import-outside-toplevel

    # int8 shared expert: the kernels read its int8 weights (XLA would write them out dequantized first)
    y = y + moe_pallas.shared_expert_pallas(x_TD, *(p[k] for k in SHARED_WEIGHTS))
  else:
    dtype = x_TD.dtype
    shared = jnp.einsum(
        "tf,fd->td",
        _swiglu(x_TD @ quant.dequantize(p["shared_gate"], dtype), x_TD @ quant.dequantize(p["shared_up"], dtype)),
        quant.dequantize(p["shared_down"], dtype),
    )
    y = y + shared
  return y, (idx_TX, w_TX)
