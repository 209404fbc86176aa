"""Hugging Face LLaDA2-MoE checkpoint -> dmax_jax params checkpoint (Orbax), streaming.

  python tools/convert_hf.py --hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32] [--quantize int8 [--group-size N]]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from dmax_jax.apps.cli import run_writer  # pylint: disable=wrong-import-position
from dmax_jax.apps.progress import bar  # pylint: disable=wrong-import-position
from dmax_jax.checkpoints.converted import convert_hf  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
  parser.add_argument("--out", required=True, help="new output directory (must not hold files)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
  parser.add_argument("--quantize", default=None, choices=["int8"],
                      help="store the routed and shared experts as int8 with float32 scales (weight-only)")
  parser.add_argument("--group-size", type=int, default=None,
                      help="with --quantize: one scale per this many rows of the contraction (default: per output channel)")
  args = parser.parse_args(argv)
  return run_writer(lambda: convert_hf(args.hf, args.out, dtype=args.dtype, progress=bar, quantize=args.quantize,
                                       group_size=args.group_size), args.out)


if __name__ == "__main__":
  sys.exit(main())
