"""serve.py under load beside decode.py's static batching and bench_decode's forward: ``python tools/bench_serve.py --help``.

Examples (``dmax_jax.apps.bench_serve`` says what each figure is):

  # the GPU demo's checkpoint on its test questions, tokens and accuracy checked against tools/evaluate.py
  python tools/bench_serve.py --checkpoint runs/demo_gpu/oput_model --data runs/demo_gpu/data/test.jsonl \\
      --strategy spd --threshold 0.7 --max-tokens 128 --concurrency 1,8,32,64 \\
      --compare-eval runs/demo_gpu/eval/oput/spd.records.jsonl --json runs/bench_serve/demo.json
  # LLaDA-2.0-mini-sized random weights (tools/make_bench_checkpoint.py), LowConfidence(k)
  python tools/bench_serve.py --checkpoint ckpt/mini-random --random-weights --strategy low_confidence --k 6 \\
      --dtype bfloat16 --concurrency 1,8,32,64,128 --json runs/bench_serve/mini.json
"""

import sys

try:
  from dmax_jax.apps.bench_serve import main
except ModuleNotFoundError as e:
  if (e.name or "").split(".")[0] != "dmax_jax":
    raise
  sys.exit("error: the dmax_jax package is not importable; install it from the repository root: pip install -e .")

if __name__ == "__main__":
  sys.exit(main())
