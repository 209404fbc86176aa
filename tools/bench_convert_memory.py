"""Peak memory of HF -> Orbax conversion (and export back) as the layer count grows.

  python tools/bench_convert_memory.py --layers 6 24 [--workdir /tmp/bench] [--hidden 1024 --experts 64]

For each layer count: writes a random bf16 Hugging Face checkpoint
(tools/make_random_hf.py), converts it with tools/convert_hf.py and exports
it back with tools/export_hf.py, each in a fresh process whose peak RSS
(``ru_maxrss``) and wall time are measured. Prints a Markdown table and
deletes the files unless --keep.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)


def measure(argv: list[str]) -> tuple[float, float]:
  """Runs argv in a child process -> (peak RSS in GiB, seconds)."""
  start = time.time()
  env = dict(os.environ, PYTHONPATH=os.path.dirname(TOOLS))
  out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, check=True, env=env)
  rss_kb, rc = out.stdout.split()[-2:]
  if rc != "0":
    raise RuntimeError(f"{argv} failed: {out.stderr[-2000:]}")
  return int(rss_kb) / 2**20, time.time() - start


def dir_gib(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**30


def bench(layers: int, workdir: str, model_args: list[str], keep: bool = False) -> dict:
  hf, ckpt, back = (os.path.join(workdir, f"{name}{layers}") for name in ("hf", "ckpt", "back"))
  for d in (hf, ckpt, back):
    shutil.rmtree(d, ignore_errors=True)
  py = sys.executable
  subprocess.run([py, os.path.join(TOOLS, "make_random_hf.py"), "--out", hf, "--layers", str(layers), *model_args], check=True)
  row = {"layers": layers, "hf_gib": dir_gib(hf)}
  row["convert_rss"], row["convert_s"] = measure([py, os.path.join(TOOLS, "convert_hf.py"), "--hf", hf, "--out", ckpt, "--dtype", "bfloat16"])
  row["ckpt_gib"] = dir_gib(ckpt)
  row["export_rss"], row["export_s"] = measure([py, os.path.join(TOOLS, "export_hf.py"), "--checkpoint", ckpt, "--out", back, "--shard-size", "2GB"])
  if not keep:
    for d in (hf, ckpt, back):
      shutil.rmtree(d, ignore_errors=True)
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[6, 24])
  parser.add_argument("--workdir", default="/tmp/dmax_bench_convert")
  parser.add_argument("--hidden", default="1024")
  parser.add_argument("--experts", default="64")
  parser.add_argument("--expert-width", default="512")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  model_args = ["--hidden", args.hidden, "--experts", args.experts, "--expert-width", args.expert_width]
  baseline, _ = measure([sys.executable, "-c", "import jax, tensorstore, orbax.checkpoint, dmax_jax.checkpoints.converted"])
  print(f"baseline (imports only): {baseline:.2f} GiB peak RSS")
  print("| layers | HF size (GiB) | convert peak RSS (GiB) | convert time (s) | Orbax size (GiB) | export peak RSS (GiB) | export time (s) |")
  print("|---|---|---|---|---|---|---|")
  for layers in args.layers:
    r = bench(layers, args.workdir, model_args, args.keep)
    print(f"| {r['layers']} | {r['hf_gib']:.2f} | {r['convert_rss']:.2f} | {r['convert_s']:.0f} | {r['ckpt_gib']:.2f} "
          f"| {r['export_rss']:.2f} | {r['export_s']:.0f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(TOOLS))
  sys.exit(main())
