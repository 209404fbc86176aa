"""A directory for random-weights benchmarks: config.json of a preset plus a small tokenizer, no weights.

  python tools/make_bench_checkpoint.py --preset mini --out ckpt/mini-random

``serve.py --random-weights`` and ``tools/bench_serve.py --random-weights`` draw the params from its config.json
on the device (``dmax_jax.apps.random_model``). The tokenizer's ids are a subset of the model's vocabulary: a
random model's other ids decode to nothing, which is fine for speed.
"""

import argparse
import sys

try:
  from dmax_jax.apps import random_model, runner
except ModuleNotFoundError as e:
  if (e.name or "").split(".")[0] != "dmax_jax":
    raise
  sys.exit("error: the dmax_jax package is not importable; install it from the repository root: pip install -e .")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="mini", choices=random_model.PRESETS,
                 help="mini: LLaDA-2.0-mini (default); tiny: the two-layer test model")
  p.add_argument("--out", required=True, help="directory to write (config.json, tokenizer files)")
  p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary (default 1024; tiny: the model's)")
  args = p.parse_args(argv)
  try:
    config = random_model.write_bench_checkpoint(args.out, args.preset, args.vocab)
  except runner.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({args.preset}: {config['num_hidden_layers']} layers, vocab {config['vocab_size']}, "
        f"{config['max_position_embeddings']} positions)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
