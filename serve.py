"""An OpenAI-compatible server over the serving engine: ``python serve.py --help``.

Example: ``python serve.py --checkpoint ckpt/mini --port 8000``, then
``curl localhost:8000/v1/completions -d '{"model": "mini", "prompt": "What is 12 * 7?"}'``.
"""

import sys

from dmax_jax.apps.serve import serve_main

if __name__ == "__main__":
  sys.exit(serve_main())
