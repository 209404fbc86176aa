"""Training throughput of the OPUT step at LLaDA-2.0-mini widths, MoE backends side by side in one run.

  python tools/bench_train.py                              # on the GPU: 4 layers (1 dense + 3 MoE), one 2048-token row
  python tools/bench_train.py --layers 6 --backends grouped --json OUT.json
  python tools/bench_train.py --tiny                       # tiny widths, any device (smoke test)
  python tools/bench_train.py --attention                  # also time attention at training length per implementation
  python tools/bench_train.py --profile 25                 # also list the step's kernels by device time

The step is ``train.py``'s (``trainer.jit_step``): the no-gradient rollout forward (every row on-policy,
so it runs), the training forward and backward over the ``[x_t ; x_0]`` input, remat, bf16 compute,
fp32 master weights, clipping and AdamW with ``configs/oput_mini.py``'s optimizer and objective, on
random weights and tokens. The full 20-layer model does not fit one GPU; its per-device memory on 8
devices is planned by ``tools/plan_train_memory.py``.

Reports per backend the median step time over rounds (``--iters`` steps each, state threaded, one sync
per round), tokens/s (sequence tokens: rows x length), useful TFLOP/s and MFU, counted as
``benchmarking.oput_step_flops`` says: 2 x active parameters per token for the rollout forward plus
6 x for the training forward and backward, attention only over the query-key pairs the mask allows,
the lm_head on the noisy half only, no remat recompute. MFU is given against the bf16 matmul rate
measured in the same run and against ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import oput_mini  # pylint: disable=wrong-import-position
from dmax_jax import sharding
from dmax_jax.model import moe, presets
from dmax_jax.training import diffusion
from dmax_jax.model import transformer as model
from dmax_jax.model import params as params_lib
from dmax_jax.training import trainer  # pylint: disable=wrong-import-position
from dmax_jax.apps.benchmarking import device_kernel_times, matmul_rate, oput_step_flops, time_calls  # pylint: disable=wrong-import-position
from dmax_jax.training.optim import make_optimizer  # pylint: disable=wrong-import-position

TINY = dict(vocab_size=4096, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=256, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4, n_group=4,
            topk_group=2, mask_token_id=4095, eos_token_id=4094, pad_token_id=4094)


class Run(NamedTuple):
  """One ``--backends`` entry, ``BACKEND[:ATTENTION][@ROWS][+tuned]``."""

  name: str  # as given
  backend: str
  attention: str
  rows: int  # rows per micro-step (``@ROWS``; default ``--rows``)
  accum: int  # micro-steps per step: the same global batch of ``--rows`` x ``--accum`` sequences
  tuned: bool  # use (or make) the ``--autotune`` file


def parse_run(run: str, args) -> Run:
  spec, _, rows = run.removesuffix("+tuned").partition("@")
  backend, _, attention = spec.partition(":")
  total = args.rows * args.accum
  rows = int(rows) if rows else args.rows
  if rows < 1 or total % rows:
    raise SystemExit(f"bench_train.py: error: --backends {run}: @{rows} must divide the global batch of {total} rows")
  return Run(run, backend, attention or "xla", rows, total // rows, run.endswith("+tuned"))


def model_cfg(args, run: Run):
  """The model of one run."""
  arch = TINY if args.tiny else {}
  return dataclasses.replace(presets.llada2_mini(compute_dtype="bfloat16", remat=True, moe_backend=run.backend,
                                                    attention=run.attention), num_hidden_layers=args.layers, **arch)


def make_batch(cfg, rows, accum, length, seed=0):
  """One global batch of ``accum`` micro-steps of ``rows`` (``trainer.shape_batch`` layout): random answers after a
  quarter-length prompt, every row on-policy."""
  rng = np.random.default_rng(seed)
  G = rows * accum
  ids = rng.integers(0, cfg.vocab_size - 16, (G, length)).astype(np.int32)
  plen = np.full((G,), length // 4, np.int32)
  batch = dict(ids=ids, prompt_len=plen, labels=diffusion.make_labels(ids, plen, cfg.eos_token_id),
               on_policy=np.ones((G,), bool))
  return trainer.shape_batch(batch, trainer.Plan(G, rows, accum, 1))


def bench_backend(args, run: Run, config, mesh):
  """(median seconds per step, per-round seconds, last loss, kernel profile or None) of one run."""
  cfg = model_cfg(args, run)
  tx, sched = make_optimizer(config.optim, 1000)
  state = trainer.fresh_state(config, cfg, tx, mesh)
  step = trainer.jit_step(cfg, trainer.objective_from(config), tx, sched, mesh, state)
  batch = trainer.put_batch(make_batch(cfg, run.rows, run.accum, args.length), mesh)
  holder = [state]

  def one_step(batch):
    holder[0], metrics = step(holder[0], batch)
    return metrics

  if run.tuned and args.autotune and moe.tokamax_module() is not None and not os.path.exists(args.autotune):
    t0 = time.perf_counter()
    result = moe.tokamax_module().autotune(step, holder[0], batch, progress_bar=False)
    with open(args.autotune, "w") as f:
      result.dump(f, prune_errors=True)
    print(f"  {run.name}: autotuned its tokamax kernels in {time.perf_counter() - t0:.1f} s -> {args.autotune}", flush=True)
  with kernel_tuning(args.autotune if run.tuned else None):
    return _time_backend(args, run.name, one_step, batch, holder)


def _time_backend(args, backend, one_step, batch, holder):
  t0 = time.perf_counter()
  metrics = jax.block_until_ready(one_step(batch))
  print(f"  {backend}: compiled and ran one step in {time.perf_counter() - t0:.1f} s, loss {float(metrics['loss']):.3f}",
        flush=True)
  rounds = time_calls(one_step, (batch,), warmup=1, iters=args.iters, rounds=args.rounds)
  profile = device_kernel_times(one_step, (batch,), calls=2) if args.profile else None
  loss = float(one_step(batch)["loss"])
  del holder[0]
  return statistics.median(rounds), rounds, loss, profile


def bench_attention(args, cfg, block_length):
  """Seconds of attention forward + backward over the ``[x_t ; x_0]`` mask at training length, per implementation."""
  B, S, H, G, R = args.rows, 2 * args.length, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  k = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(k[0], (B, S, H, R), jnp.bfloat16)
  kk = jax.random.normal(k[1], (B, S, G, R), jnp.bfloat16)
  v = jax.random.normal(k[2], (B, S, G, R), jnp.bfloat16)
  ct = jax.random.normal(k[3], (B, S, H, R), jnp.bfloat16)
  mask = jnp.broadcast_to(diffusion.bd_attention_mask(args.length, block_length), (B, S, S))
  impls = {"xla (model.attend)": lambda q, kk, v: model.attend(q, kk, v, mask),
           "cudnn (jax.nn, mask)": lambda q, kk, v: jax.nn.dot_product_attention(
               q, kk, v, mask=mask[:, None], implementation="cudnn")}
  tokamax = moe.tokamax_module()
  if tokamax is not None:
    impls["tokamax (mask)"] = lambda q, kk, v: tokamax.dot_product_attention(q, kk, v, mask=mask[:, None])
  out = {}
  want = None
  for name, fn in impls.items():
    f = jax.jit(lambda q, kk, v, fn=fn: jax.vjp(fn, q, kk, v)[1](ct) + (fn(q, kk, v),))
    try:
      got = f(q, kk, v)
      sec = statistics.median(time_calls(f, (q, kk, v), warmup=2, iters=5, rounds=args.rounds))
    except Exception as e:  # pylint: disable=broad-except  # an implementation that does not take this mask
      print(f"  attention {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
      continue
    want = want or got
    err = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
              for a, b in zip(got, want))
    out[name] = dict(ms=1e3 * sec, max_rel_err_vs_xla=err)
    print(f"  attention {name}: fwd+bwd {1e3 * sec:.3f} ms, rel L2 vs xla (out, dq, dk, dv) <= {err:.1e}", flush=True)
  return out


def kernel_tuning(path):
  """The tokamax autotuning result in ``path`` as a context (its kernel configs used within), else a no-op."""
  tokamax = moe.tokamax_module()
  if not path or tokamax is None or not os.path.exists(path):
    return contextlib.nullcontext()
  with open(path) as f:
    return tokamax.AutotuningResult.load(f)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny widths (smoke test on any device)")
  ap.add_argument("--backends", default="grouped:cudnn,grouped,dense",
                  help="runs, comma separated: BACKEND[:ATTENTION][@ROWS] (MoE backend, attention, rows per micro-step "
                  "of the same global batch); the first is compared with the last")
  ap.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense)")
  ap.add_argument("--length", type=int, default=None, help="sequence tokens per row (default 2048; tiny: 64)")
  ap.add_argument("--rows", type=int, default=1, help="sequences per micro-step")
  ap.add_argument("--accum", type=int, default=8, help="micro-steps per optimizer step (oput_mini: global batch 8 of "
                  "micro-batch 1)")
  ap.add_argument("--iters", type=int, default=3, help="steps per timed round")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 rate (H100/H200 SXM: 989)")
  ap.add_argument("--attention", action="store_true", help="also time attention at training length")
  ap.add_argument("--profile", type=int, default=0, metavar="N", help="list the N kernels taking the most time")
  ap.add_argument("--autotune", default=None, metavar="FILE",
                  help="runs named BACKEND...+tuned use tokamax's autotuned kernel configs from FILE; where FILE "
                  "does not exist, the first such run autotunes its step's tokamax kernels and writes it")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  args.length = args.length or (64 if args.tiny else 2048)
  config = oput_mini.get_config()
  config.init_from = "scratch"  # random weights (trainer.fresh_state)
  block_length = config.objective.block_length
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  rate = matmul_rate(1024 if args.tiny else 8192, warmup=2, iters=5, rounds=5)
  print(f"bf16 matmul rate (8192^3, random inputs): {rate / 1e12:.1f} TFLOP/s", flush=True)
  print("grouped matmul: " + moe.grouped_matmul_name(), flush=True)
  runs = [parse_run(name, args) for name in args.backends.split(",")]  # a bad entry fails before any compile
  cfg = model_cfg(args, parse_run("grouped", args))
  pairs = int(np.sum(np.asarray(diffusion.bd_attention_mask(args.length, block_length))))
  flops = oput_step_flops(cfg, args.rows * args.accum, args.length, pairs)
  print(f"model: {args.layers} layers ({cfg.num_dense_layers} dense), {params_lib.count_params(cfg) / 1e9:.2f} B "
        f"params; {args.accum} micro-steps of {args.rows} x {args.length} tokens per step, [x_t ; x_0] attention {pairs / (2 * args.length) ** 2:.1%}"
        f" allowed; useful work {flops / 1e12:.2f} TFLOP per step", flush=True)
  results = dict(device=dev.device_kind, jax=jax.__version__, matmul_tflops=rate / 1e12, layers=args.layers,
                 rows=args.rows, accum=args.accum, length=args.length, useful_tflop_per_step=flops / 1e12, backends={})
  for run in runs:
    backend = run.name
    try:
      sec, rounds, loss, profile = bench_backend(args, run, config, mesh)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: the other backends still run
      print(f"  {backend}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
      continue
    r = dict(step_ms=1e3 * sec, min_ms=1e3 * min(rounds), max_ms=1e3 * max(rounds), loss=loss, rows=run.rows,
             accum=run.accum,
             tokens_per_s=args.rows * args.accum * args.length / sec, useful_tflops=flops / sec / 1e12)
    r.update(mfu_measured=r["useful_tflops"] * 1e12 / rate, mfu_peak=r["useful_tflops"] / args.peak_tflops)
    results["backends"][backend] = r
    print(f"  {backend}: {r['step_ms']:.2f} ms per step, {r['tokens_per_s']:.0f} tokens/s, {100 * r['mfu_measured']:.1f}% MFU",
          flush=True)
    if profile:
      total = sum(t for t, _ in profile.values())
      print(f"\nprofile {backend}: {total / 1e3:.1f} ms of kernels per step")
      for name, (us, n) in list(profile.items())[:args.profile]:
        print(f"  {us / 1e3:9.3f} ms  {n:5.0f}x  {100 * us / total:5.1f}%  {name[:110]}")
      r["profile_top"] = [[name, us, n] for name, (us, n) in list(profile.items())[:args.profile]]
  if args.attention:
    results["attention"] = bench_attention(args, cfg, block_length)
  print(f"\n{'backend':16s} {'step ms':>9s} {'min':>8s} {'max':>8s} {'tokens/s':>9s} {'TFLOP/s':>8s} "
        f"{'MFU(meas)':>9s} {'MFU(peak)':>9s} {'loss':>7s}")
  rows = results["backends"]
  for name, r in rows.items():
    print(f"{name:16s} {r['step_ms']:9.2f} {r['min_ms']:8.2f} {r['max_ms']:8.2f} {r['tokens_per_s']:9.0f} "
          f"{r['useful_tflops']:8.1f} {100 * r['mfu_measured']:8.1f}% {100 * r['mfu_peak']:8.1f}% {r['loss']:7.3f}")
  names = list(rows)
  if len(names) > 1:
    results["speedup"] = rows[names[0]]["tokens_per_s"] / rows[names[-1]]["tokens_per_s"]
    print(f"{names[0]} / {names[-1]} tokens/s: {results['speedup']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
