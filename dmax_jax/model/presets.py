"""Every architecture preset in one place (``ModelConfig`` architecture fields).

- ``LLADA2_MINI``: LLaDA-2.0-mini / DMax-16B, from its ``config.json``;
- ``mid(layers, ...)``: LLaDA-2.0-mini's proportions at any depth and width (random checkpoints for benchmarks);
- ``TINY``: a two-layer model trained from scratch on CPU in seconds (``configs/tiny.py``, tests);
- ``DEMO_CPU``, ``DEMO_GPU``: the demo's models (``configs/demo_*.py``); their token ids come from the
  tokenizer the demo trains (``token_ids``).

Numerics (``compute_dtype``, ``moe_backend``, ...) are not part of a preset:
pass them to ``model_config``.
"""

from __future__ import annotations

from dmax_jax.model.config import ModelConfig

_LLADA2_SHAPE = dict(  # what every LLaDA2-MoE preset here shares
    first_k_dense_replace=1, num_shared_experts=1, routed_scaling_factor=2.5, partial_rotary_factor=0.5,
    rms_norm_eps=1e-6)

LLADA2_MINI = dict(
    _LLADA2_SHAPE, vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, intermediate_size=5120, moe_intermediate_size=512, num_experts=256,
    num_experts_per_tok=8, n_group=8, topk_group=4, rope_theta=600000.0, max_position_embeddings=16384,
    mask_token_id=156895, eos_token_id=156892, pad_token_id=156892)

TINY = dict(  # one dense layer then one MoE layer; eos 510, mask 511 (tokenizer.train_tokenizer at vocab 512)
    _LLADA2_SHAPE, vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, n_group=4,
    topk_group=2, rope_theta=10000.0, max_position_embeddings=256, mask_token_id=511, eos_token_id=510,
    pad_token_id=510)

DEMO_CPU = dict(  # one dense layer then one MoE layer, D 64; positions: prompt (50) + gen length 88, in blocks of 16
    _LLADA2_SHAPE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
    rope_theta=10000.0, max_position_embeddings=144)

DEMO_GPU = dict(  # ~30M parameters: one dense layer then seven MoE layers; prompt 41 + gen length 136, blocks of 32
    DEMO_CPU, hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
    intermediate_size=1024, moe_intermediate_size=192, num_experts=16, num_experts_per_tok=4, n_group=4,
    topk_group=2, max_position_embeddings=256)


def token_ids(vocab_size: int) -> dict:
  """The token-id fields for a tokenizer of ``vocab_size`` that ends with eos then mask (``train_tokenizer``)."""
  return dict(vocab_size=vocab_size, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 2,
              mask_token_id=vocab_size - 1)


def mid(layers: int, hidden: int = 1024, experts: int = 64, expert_width: int = 512, vocab: int = 32768) -> dict:
  """LLaDA-2.0-mini's proportions at another size (``tools/make_random_hf.py``)."""
  return dict(
      _LLADA2_SHAPE, **token_ids(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
      num_key_value_heads=2, head_dim=128, intermediate_size=4 * hidden, moe_intermediate_size=expert_width,
      num_experts=experts, num_experts_per_tok=8, n_group=8, topk_group=4, rope_theta=600000.0,
      max_position_embeddings=4096)


def model_config(preset: dict, **numerics) -> ModelConfig:
  """A preset (with any numerics) as a ``ModelConfig``."""
  return ModelConfig(**preset, **numerics)


def llada2_mini(**numerics) -> ModelConfig:
  """The LLaDA-2.0-mini (and DMax-16B) architecture, from its config.json."""
  return model_config(LLADA2_MINI, **numerics)
