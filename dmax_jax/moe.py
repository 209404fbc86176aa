"""Mixture of experts: routing, dispatch, expert matmuls, combine.

Shape letters: T tokens (flattened batch x length), D model width, E experts,
F expert width, X experts per token (top-k).

Two (three) interchangeable backends compute the routed experts:
- ``dense``: every expert on every token, weighted by a [T, E] combine matrix.
  Plain and obviously right; the reference the other backends are tested
  against.
- ``grouped``: (token, expert) pairs sorted by expert and pushed through a
  grouped matmul (``jax.lax.ragged_dot``), then scattered back.
- ``pallas``: the grouped layout with a Pallas kernel that skips empty
  experts (see ``dmax_jax/kernels``), for small token counts on the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig, accum_dtype


def route(router_w_DE, expert_bias_E, x_TD, cfg: ModelConfig):
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
  G = cfg.n_group
  grouped_TGN = biased_TE.reshape(T, G, E // G)
  # A group's score is the sum of its two best biased scores (the best, plus the best of the rest).
  best_TG = jnp.max(grouped_TGN, axis=-1)
  group_score_TG = best_TG
  if E // G > 1:
    first_best = jnp.arange(E // G) == jnp.argmax(grouped_TGN, axis=-1)[..., None]
    group_score_TG = best_TG + jnp.max(jnp.where(first_best, -jnp.inf, grouped_TGN), axis=-1)
  # Keep the topk_group best groups, ties to the lower index (as lax.top_k), by counting the groups
  # ranked ahead of each: elementwise work XLA fuses, instead of a sort-based top_k and a scatter.
  ahead_TGG = (group_score_TG[:, None, :] > group_score_TG[:, :, None]) | (
      (group_score_TG[:, None, :] == group_score_TG[:, :, None]) & (jnp.arange(G)[None, :] < jnp.arange(G)[:, None]))
  keep_TG = jnp.sum(ahead_TGG, axis=-1) < cfg.topk_group
  keep_TE = jnp.repeat(keep_TG, E // G, axis=1)
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
  gate_TEF = jnp.einsum("td,edf->tef", x_TD, w_gate_EDF.astype(dtype))
  up_TEF = jnp.einsum("td,edf->tef", x_TD, w_up_EDF.astype(dtype))
  h_TEF = _swiglu(gate_TEF, up_TEF)
  y_TED = jnp.einsum("tef,efd->ted", h_TEF, w_down_EFD.astype(dtype))
  y_TD = jnp.einsum("ted,te->td", y_TED.astype(combine_TE.dtype), combine_TE)
  return y_TD.astype(dtype)


def sort_by_expert(idx_TX, num_experts):
  """Orders the T*X (token, expert) pairs by expert.

  Returns (order [T*X]: pair index of each sorted row, token [T*X]: the token
  of each sorted row, group_sizes [E]: rows per expert).
  """
  flat = idx_TX.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = order // idx_TX.shape[1]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, token, group_sizes


def experts_grouped(x_TD, idx_TX, w_TX, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Grouped backend: sorted (token, expert) rows through ``ragged_dot``."""
  dtype = x_TD.dtype
  T, X = idx_TX.shape
  order, token, group_sizes = sort_by_expert(idx_TX, w_gate_EDF.shape[0])
  xs_RD = x_TD[token]
  gate_RF = jax.lax.ragged_dot(xs_RD, w_gate_EDF.astype(dtype), group_sizes)
  up_RF = jax.lax.ragged_dot(xs_RD, w_up_EDF.astype(dtype), group_sizes)
  ys_RD = jax.lax.ragged_dot(_swiglu(gate_RF, up_RF), w_down_EFD.astype(dtype), group_sizes)
  return combine_sorted(ys_RD, order, w_TX, T).astype(dtype)


def combine_sorted(ys_RD, order, w_TX, T):
  """Un-sorts expert outputs and sums them per token with the combine weights (fp32)."""
  X = w_TX.shape[1]
  unsorted = jnp.zeros_like(ys_RD).at[order].set(ys_RD)
  y_TXD = unsorted.reshape(T, X, -1).astype(w_TX.dtype)
  return jnp.einsum("txd,tx->td", y_TXD, w_TX)


def expert_parallel_size(axis: str = "expert") -> int:
  """Devices along ``axis`` of the mesh set with ``jax.set_mesh`` (1 without one).

  The ``pallas`` backend splits the experts over this axis when it is > 1
  (``moe_pallas.experts_pallas_expert_parallel``); the other backends leave
  partitioning to XLA.
  """
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def moe_mlp(p, x_TD, cfg: ModelConfig):
  """Routed experts plus the shared expert for one MoE layer.

  ``p`` holds one layer's MoE weights (see ``params.py``). Returns (y [T, D],
  (ids [T, X], weights [T, X])).
  """
  idx_TX, w_TX = route(p["router"], p["expert_bias"], x_TD, cfg)
  if cfg.moe_backend == "dense":
    routed = experts_dense(x_TD, idx_TX, w_TX, p["w_gate"], p["w_up"], p["w_down"])
  elif cfg.moe_backend == "grouped":
    routed = experts_grouped(x_TD, idx_TX, w_TX, p["w_gate"], p["w_up"], p["w_down"])
  elif cfg.moe_backend == "pallas":
    from dmax_jax.kernels import moe_pallas  # pylint: disable=import-outside-toplevel

    if "experts_stacked" in p:  # every layer's experts, split over the mesh's expert axis
      routed = moe_pallas.experts_pallas_expert_parallel(x_TD, idx_TX, w_TX, *p["experts_stacked"], p["layer"])
    elif "experts_flat" in p:  # every layer's experts, read in place (see model._run_stack)
      wg, wu, wd = p["experts_flat"]
      routed = moe_pallas.experts_pallas(x_TD, idx_TX, w_TX, wg, wu, wd, num_experts=cfg.num_experts,
                                         expert_offset=p["layer"] * cfg.num_experts)
    elif expert_parallel_size() > 1:
      routed = moe_pallas.experts_pallas_expert_parallel(
          x_TD, idx_TX, w_TX, p["w_gate"][None], p["w_up"][None], p["w_down"][None], 0)
    else:
      routed = moe_pallas.experts_pallas(x_TD, idx_TX, w_TX, p["w_gate"], p["w_up"], p["w_down"])
  else:
    raise ValueError(f"unknown moe_backend {cfg.moe_backend!r}")
  y = routed
  if cfg.num_shared_experts:
    dtype = x_TD.dtype
    shared = jnp.einsum(
        "tf,fd->td",
        _swiglu(x_TD @ p["shared_gate"].astype(dtype), x_TD @ p["shared_up"].astype(dtype)),
        p["shared_down"].astype(dtype),
    )
    y = y + shared
  return y, (idx_TX, w_TX)
