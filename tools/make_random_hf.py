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

from dmax_jax.model import presets  # noqa: E402
from dmax_jax.model.config import ModelConfig  # noqa: E402
from dmax_jax.checkpoints.hf import save_hf_checkpoint  # noqa: E402
from dmax_jax.model.params import param_shapes  # noqa: E402


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
  cfg = presets.model_config(presets.mid(args.layers, args.hidden, args.experts, args.expert_width))
  make_random_hf(args.out, cfg, args.dtype)
  return 0


if __name__ == "__main__":
  sys.exit(main())
