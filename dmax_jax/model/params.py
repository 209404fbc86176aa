"""The parameter pytree: its layout, shapes and random initialisation.

Parameters are a plain nested dict of arrays. Layers of one kind are stacked
along a leading layer axis so the forward can ``lax.scan`` over them:

  embed        [V, D]            token embeddings
  dense/...    [Ld, ...]         the first ``first_k_dense_replace`` layers
  moe/...      [Lm, ...]         the MoE layers
  final_norm   [D]
  lm_head      [D, V]            untied output projection

Each layer stack holds the attention weights
  attn_norm [D], qkv [D, (H + 2G) * R], q_norm [R], k_norm [R], o [H * R, D], mlp_norm [D]
and either the dense SwiGLU MLP
  gate [D, I], up [D, I], down [I, D]
or the MoE block
  router [D, E], expert_bias [E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D],
  shared_gate [D, C], shared_up [D, C], shared_down [C, D]
(shape letters: the package glossary, ``dmax_jax/shapes.py``). Linear weights are stored
``[in, out]`` (``y = x @ W``), the transpose of PyTorch's layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model.config import ModelConfig


def _attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  D, R = cfg.hidden_size, cfg.head_dim
  return {
      "attn_norm": (D,),
      "qkv": (D, cfg.qkv_size),
      "q_norm": (R,),
      "k_norm": (R,),
      "o": (cfg.num_attention_heads * R, D),
      "mlp_norm": (D,),
  }


def layer_shapes(cfg: ModelConfig, kind: str) -> dict[str, tuple[int, ...]]:
  """Shapes of one layer's weights (no layer axis); ``kind`` is "dense" or "moe"."""
  D = cfg.hidden_size
  shapes = _attention_shapes(cfg)
  if kind == "dense":
    I = cfg.intermediate_size
    shapes.update(gate=(D, I), up=(D, I), down=(I, D))
  elif kind == "moe":
    E, F = cfg.num_experts, cfg.moe_intermediate_size
    shapes.update(router=(D, E), expert_bias=(E,), w_gate=(E, D, F), w_up=(E, D, F), w_down=(E, F, D))
    if cfg.num_shared_experts:
      C = cfg.shared_intermediate_size
      shapes.update(shared_gate=(D, C), shared_up=(D, C), shared_down=(C, D))
  else:
    raise ValueError(kind)
  return shapes


def param_shapes(cfg: ModelConfig) -> dict:
  """The full parameter tree as nested dicts of shape tuples."""
  tree = {"embed": (cfg.vocab_size, cfg.hidden_size)}
  if cfg.num_dense_layers:
    tree["dense"] = {k: (cfg.num_dense_layers,) + s for k, s in layer_shapes(cfg, "dense").items()}
  if cfg.num_moe_layers:
    tree["moe"] = {k: (cfg.num_moe_layers,) + s for k, s in layer_shapes(cfg, "moe").items()}
  tree["final_norm"] = (cfg.hidden_size,)
  tree["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
  return tree


def is_shape(x) -> bool:
  """Whether ``x`` is a shape tuple: the leaves of ``param_shapes`` trees (``is_leaf=is_shape``)."""
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """``jax.ShapeDtypeStruct`` leaves for every parameter (nothing allocated)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=is_shape)


def count_params(cfg: ModelConfig) -> int:
  leaves = jax.tree.leaves(param_shapes(cfg), is_leaf=is_shape)
  return int(sum(math.prod(s) for s in leaves))


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
  """Random initialisation for training from scratch.

  Embeddings N(0, 1); linear weights N(0, 1/fan_in) (the down projections
  and the attention output scaled by 1/sqrt(2 * layers) so the residual
  stream does not grow with depth); lm_head N(0, 1/D); norms 1; expert bias 0.
  """
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=is_shape)
  keys = jax.random.split(rng, len(flat))
  depth_scale = 1.0 / math.sqrt(2.0 * cfg.num_hidden_layers)
  out = []
  for (path, shape), key in zip(flat, keys):
    name = path[-1].key
    if name in ("attn_norm", "q_norm", "k_norm", "mlp_norm", "final_norm"):
      leaf = jnp.ones(shape, dtype)
    elif name == "expert_bias":
      leaf = jnp.zeros(shape, dtype)
    elif name == "embed":
      leaf = jax.random.normal(key, shape, dtype)
    else:
      fan_in = shape[-2]
      std = 1.0 / math.sqrt(fan_in)
      if name in ("o", "down", "w_down", "shared_down"):
        std *= depth_scale
      leaf = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def param_bytes(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
  return count_params(cfg) * np.dtype(dtype).itemsize


# The weights the forward only ever reads as ``w.astype(compute_dtype)`` operands of a matmul.
# (Norms, the router and the expert bias are read in float32; the embedding is gathered row by row.)
MATMUL_WEIGHTS = frozenset({"qkv", "o", "gate", "up", "down", "w_gate", "w_up", "w_down",
                            "shared_gate", "shared_up", "shared_down", "lm_head"})


def compute_copy(params, dtype):
  """``params`` with its matmul weights cast to ``dtype`` once (the rest as they are).

  A training step differentiates this copy instead of the float32 master weights: the forward
  would cast them anyway, on every pass (rollout, forward, remat recompute), and the gradient
  of a cast is its cotangent cast back, so the gradients are the same numbers.
  """
  dtype = jnp.dtype(dtype)

  def cast(path, leaf):
    low = jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.dtype(leaf.dtype).itemsize > dtype.itemsize
    return leaf.astype(dtype) if low and getattr(path[-1], "key", None) in MATMUL_WEIGHTS else leaf

  return jax.tree.map_with_path(cast, params)
