"""Batch generation with SPD or threshold decoding: ``python decode.py --help``.

Example: ``python decode.py --checkpoint ckpt/ --input prompts.jsonl --output out.jsonl --math``.
"""

import sys

from dmax_jax.apps.cli import decode_main

if __name__ == "__main__":
  sys.exit(decode_main())
