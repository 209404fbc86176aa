"""Writes a random LLaDA2-MoE Hugging Face checkpoint of any size, streaming (for benchmarks).

  python tools/make_random_hf.py --out DIR --layers 24 [--hidden 1024 --experts 64 --expert-width 512]

Tensors are generated one at a time while the safetensors shards are
written, so a checkpoint far bigger than RAM can be made.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402

from dmax_jax.model.config import ModelConfig  # noqa: E402
from dmax_jax.checkpoints.hf import save_hf_checkpoint  # noqa: E402
from dmax_jax.model.params import param_shapes  # noqa: E402


def mid_config(layers: int, hidden: int = 1024, experts: int = 64, expert_width: int = 512, vocab: int = 32768) -> ModelConfig:
  return ModelConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
      head_dim=128, intermediate_size=4 * hidden, first_k_dense_replace=1, moe_intermediate_size=expert_width,
      num_experts=experts, num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
      routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=600000.0, rms_norm_eps=1e-6,
      max_position_embeddings=4096, mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2,
  )


class RandomLeaf:
  """A leaf whose slices are fresh N(0, 0.02^2) draws, made only when indexed."""

  def __init__(self, shape, dtype, rng):
    self.shape, self.dtype, self._rng = tuple(shape), np.dtype(dtype), rng

  def __getitem__(self, index):
    shape = np.empty(self.shape, np.bool_)[index].shape if index is not Ellipsis else self.shape
    return (0.02 * self._rng.standard_normal(shape, np.float32)).astype(self.dtype)


def make_random_hf(out_dir: str, cfg: ModelConfig, dtype="bfloat16", shard_bytes: int = 2 * 10**9, seed: int = 0):
  import ml_dtypes  # pylint: disable=import-outside-toplevel

  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  rng = np.random.default_rng(seed)
  leaves = {}
  for key, sub in param_shapes(cfg).items():
    if isinstance(sub, dict):
      leaves[key] = {k: RandomLeaf(s, np_dtype, rng) for k, s in sub.items()}
    else:
      leaves[key] = RandomLeaf(sub, np_dtype, rng)
  save_hf_checkpoint(leaves, cfg, out_dir, shard_bytes=shard_bytes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--layers", type=int, required=True)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--expert-width", type=int, default=512)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = parser.parse_args(argv)
  make_random_hf(args.out, mid_config(args.layers, args.hidden, args.experts, args.expert_width), args.dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
