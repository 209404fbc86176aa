"""dmax_jax params checkpoint -> Hugging Face safetensors (separate experts, sharded), streaming.

  python tools/export_hf.py --checkpoint CKPT_DIR --out HF_DIR [--shard-size 5GB] [--dtype bfloat16]
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from dmax_jax.apps.cli import run_writer  # pylint: disable=wrong-import-position
from dmax_jax.apps.progress import bar  # pylint: disable=wrong-import-position
from dmax_jax.checkpoints.converted import export_hf  # pylint: disable=wrong-import-position

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="params checkpoint directory (from convert_hf or training)")
  parser.add_argument("--out", required=True, help="new Hugging Face output directory")
  parser.add_argument("--shard-size", type=parse_size, default="5GB", help="bytes per safetensors shard")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the stored dtype")
  args = parser.parse_args(argv)
  if args.shard_size <= 0:
    print(f"error: --shard-size must be positive, got {args.shard_size} bytes", file=sys.stderr)
    return 2
  return run_writer(lambda: export_hf(args.checkpoint, args.out, shard_bytes=args.shard_size, dtype=args.dtype,
                                      progress=bar), args.out)


if __name__ == "__main__":
  sys.exit(main())
