"""GSM8K evaluation across strategies and thresholds: ``python tools/evaluate.py --help``.

Example: ``python tools/evaluate.py --checkpoint ckpt/ --data gsm8k/test.jsonl --output eval/records.jsonl
--strategies spd,threshold --thresholds 0.5,0.7,0.9`` (writes eval/records.json and eval/records.md).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmax_jax.apps.evaluate import main  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(main())
