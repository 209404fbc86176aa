"""Model configuration: the LLaDA2-MoE architecture as a frozen dataclass.

The architecture fields mirror the Hugging Face ``config.json`` of
LLaDA-2.0-mini (keys of the same name). Every shape the model uses is read
from here; nothing is derived where the checkpoint gives a value
(``head_dim`` in particular is not ``hidden_size // num_attention_heads`` in
general).

Besides the architecture, a few *numerics* fields say how to run it
(``compute_dtype``, ``moe_backend``, ``scan_layers``, ``remat``, ``attention``, ``routing``). They never
change the parameters, only how the forward computes; change them with
``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

MODEL_TYPES = ("llada2_moe", "llada2_moe_veomni")
MOE_BACKENDS = ("grouped", "dense", "pallas")
ATTENTIONS = ("xla", "cudnn", "tokamax", "pallas")
ROUTINGS = ("learned", "uniform")


class ConfigError(ValueError):
  """A config.json that is not a usable LLaDA2-MoE config."""


def accum_dtype(dtype):
  """The dtype of the numerically sensitive parts (norms, RoPE, router, softmax, logits) for a
  compute dtype: float32 for bf16 / fp32 compute, float64 for float64 compute (exact-equality tests
  run the whole model in float64 under ``jax.enable_x64``)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return jnp.promote_types(dtype, jnp.float32)


_HF_REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "n_group",
    "topk_group", "routed_scaling_factor", "partial_rotary_factor", "rope_theta", "rms_norm_eps",
    "max_position_embeddings", "eos_token_id",
)


def _check_hf_dict(d: Mapping[str, Any], source: str) -> None:
  """ConfigError unless ``d`` is a LLaDA2-MoE ``config.json`` this model implements, with every key it needs."""
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"{source}: model_type {model_type!r} is not LLaDA2-MoE (expected one of {MODEL_TYPES})")
  if d.get("tie_word_embeddings", False):
    raise ConfigError(f"{source}: tie_word_embeddings=true is not LLaDA2-MoE (the lm_head is untied)")
  if d.get("use_bias", False) or d.get("use_qkv_bias", False):
    raise ConfigError(f"{source}: biases (use_bias/use_qkv_bias) are not supported by LLaDA2-MoE")
  if d.get("rope_scaling"):
    raise ConfigError(f"{source}: rope_scaling {d['rope_scaling']!r} is not supported")
  for key in _HF_REQUIRED:
    if key not in d:
      raise ConfigError(f"{source}: missing key {key!r}")


def _token_ids(d: Mapping[str, Any], source: str) -> tuple[int, int]:
  """(eos id, mask id) of a ``config.json`` dict."""
  eos = d["eos_token_id"]
  if isinstance(eos, list):
    eos = eos[0]
  mask_id = d.get("mask_token_id")
  if mask_id is None:
    # LLaDA-2.0-mini's config.json does not carry it; its tokenizer's <|mask|> is 156895.
    if d["vocab_size"] != 157184:
      raise ConfigError(f"{source}: missing key 'mask_token_id' (the id of the <|mask|> token)")
    mask_id = 156895
  return eos, mask_id



@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """LLaDA2-MoE hyper-parameters plus how to run the forward."""

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int  # width of the dense SwiGLU layers
  first_k_dense_replace: int  # layers [0, k) are dense, the rest MoE
  moe_intermediate_size: int  # width of one routed expert
  num_experts: int
  num_experts_per_tok: int
  n_group: int
  topk_group: int
  num_shared_experts: int
  routed_scaling_factor: float
  partial_rotary_factor: float
  rope_theta: float
  rms_norm_eps: float
  max_position_embeddings: int
  mask_token_id: int
  eos_token_id: int
  pad_token_id: int
  use_qk_norm: bool = True
  # ---- numerics (not part of the checkpoint) ----
  compute_dtype: str = "float32"  # matmul inputs; norms, router, softmax, logits stay fp32 (fp64 with fp64)
  moe_backend: str = "grouped"  # "grouped" (sorted tokens, grouped matmul), "dense" (reference), "pallas"
  scan_layers: bool = True  # lax.scan over stacked layers; False = Python loop (tests only)
  remat: bool = False  # rematerialise each layer in the backward pass
  routing: str = "learned"  # "learned" (the router), "uniform" (random top-k: benchmarks force a balanced load)
  # "xla" (einsum + fp32 softmax), "cudnn" or "tokamax" (fused flash attention on NVIDIA GPUs in bf16, else xla),
  # "pallas" (the cached forward's attention as one kernel reading the cache stack in place; else xla)
  attention: str = "xla"

  def __post_init__(self):
    if self.moe_backend not in MOE_BACKENDS:
      raise ConfigError(f"moe_backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
    if self.routing not in ROUTINGS:
      raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
    if self.attention not in ATTENTIONS:
      raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    if self.num_experts % self.n_group:
      raise ConfigError("num_experts must be a multiple of n_group")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      raise ConfigError("first_k_dense_replace must lie in [0, num_hidden_layers]")
    if self.rotary_dim % 2:
      raise ConfigError("int(head_dim * partial_rotary_factor) must be even")

  # ---- derived quantities (from given fields only, never a replacement for one) ----
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.num_shared_experts

  @property
  def qkv_size(self) -> int:
    return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json", **numerics) -> "ModelConfig":
    """Builds a config from a Hugging Face ``config.json`` dict."""
    _check_hf_dict(d, source)
    eos, mask_id = _token_ids(d, source)
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    try:
      return cls(
          vocab_size=int(d["vocab_size"]),
          hidden_size=int(d["hidden_size"]),
          num_hidden_layers=int(d["num_hidden_layers"]),
          num_attention_heads=int(d["num_attention_heads"]),
          num_key_value_heads=int(d["num_key_value_heads"]),
          head_dim=int(head_dim),
          intermediate_size=int(d["intermediate_size"]),
          first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
          moe_intermediate_size=int(d["moe_intermediate_size"]),
          num_experts=int(d["num_experts"]),
          num_experts_per_tok=int(d["num_experts_per_tok"]),
          n_group=int(d["n_group"]),
          topk_group=int(d["topk_group"]),
          num_shared_experts=int(d.get("num_shared_experts", 0) or 0),
          routed_scaling_factor=float(d["routed_scaling_factor"]),
          partial_rotary_factor=float(d["partial_rotary_factor"]),
          rope_theta=float(d["rope_theta"]),
          rms_norm_eps=float(d["rms_norm_eps"]),
          max_position_embeddings=int(d["max_position_embeddings"]),
          mask_token_id=int(mask_id),
          eos_token_id=int(eos),
          pad_token_id=int(d.get("pad_token_id", eos) if d.get("pad_token_id") is not None else eos),
          use_qk_norm=bool(d.get("use_qk_norm", True)),
          **numerics,
      )
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents for this architecture."""
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "first_k_dense_replace": self.first_k_dense_replace,
        "moe_intermediate_size": self.moe_intermediate_size,
        "num_experts": self.num_experts,
        "num_experts_per_tok": self.num_experts_per_tok,
        "n_group": self.n_group,
        "topk_group": self.topk_group,
        "num_shared_experts": self.num_shared_experts,
        "routed_scaling_factor": self.routed_scaling_factor,
        "partial_rotary_factor": self.partial_rotary_factor,
        "rotary_dim": self.rotary_dim,
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "mask_token_id": self.mask_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "use_qk_norm": self.use_qk_norm,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "rope_scaling": None,
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True,
        "use_rmsnorm": True,
    }

  def architecture_dict(self) -> dict[str, Any]:
    """The architecture fields alone (what a checkpoint stores)."""
    numerics = {"compute_dtype", "moe_backend", "scan_layers", "remat", "attention", "routing"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in numerics}


def load_hf_config(path: str, **numerics) -> ModelConfig:
  """Reads ``config.json`` from a checkpoint directory (or the file itself)."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path}: no such file")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  return ModelConfig.from_hf_dict(d, source=path, **numerics)
