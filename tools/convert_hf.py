"""Hugging Face LLaDA2-MoE checkpoint -> dmax_jax params checkpoint (Orbax), streaming.

  python tools/convert_hf.py --hf HF_DIR --out CKPT_DIR [--dtype bfloat16|float32]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from dmax_jax.checkpoint import convert_hf
from dmax_jax.hf import CheckpointError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
  parser.add_argument("--out", required=True, help="new output directory (must not hold files)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
  args = parser.parse_args(argv)
  try:
    convert_hf(args.hf, args.out, dtype=args.dtype)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
