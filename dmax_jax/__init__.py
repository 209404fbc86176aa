"""dmax_jax: DMax (On-Policy Uniform Training and Soft Parallel Decoding) for LLaDA2-MoE in JAX."""

from dmax_jax.model.config import ConfigError, ModelConfig, load_hf_config
from dmax_jax.model.presets import llada2_mini
from dmax_jax.checkpoints.converted import load_checkpoint, save_checkpoint
from dmax_jax.decoding import SPD, Generation, Threshold, TraceStep, generate
from dmax_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from dmax_jax.tokenizer import load_tokenizer
from dmax_jax.model.transformer import (
    KVCache,
    block_causal_mask,
    embed,
    forward,
    forward_cached,
    forward_hidden,
    init_cache,
    logits_from_hidden,
)
from dmax_jax.model.params import abstract_params, count_params, init_params, param_bytes

__all__ = [
    "SPD",
    "Generation",
    "Threshold",
    "TraceStep",
    "generate",
    "load_checkpoint",
    "save_checkpoint",
    "save_hf_checkpoint",
    "load_tokenizer",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "abstract_params",
    "block_causal_mask",
    "count_params",
    "embed",
    "forward",
    "forward_cached",
    "forward_hidden",
    "init_cache",
    "init_params",
    "llada2_mini",
    "load_hf_checkpoint",
    "load_hf_config",
    "logits_from_hidden",
    "param_bytes",
]
