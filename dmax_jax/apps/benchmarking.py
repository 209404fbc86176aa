"""Timing helpers shared by the benchmark tools (tools/bench_*.py)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def time_calls(fn, args, *, warmup, iters, rounds):
  """Per-call seconds of ``rounds`` rounds of ``iters`` asynchronous calls (one sync per round).

  Returns the list of per-round means (take the median, min, max).
  """
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / iters)
  return per_call


def time_fn(fn, args, *, warmup, iters, rounds):
  """Median seconds per call (see ``time_calls``)."""
  return statistics.median(time_calls(fn, args, warmup=warmup, iters=iters, rounds=rounds))


def copy_bandwidths(nbytes, **timing):
  """Bytes/s (read + write counted) of three ways to stream a ``nbytes`` array once, by name.

  ``negate_bf16`` negates 2-byte elements, ``not_u32`` flips the bits of 4-byte
  elements, ``copy`` is an explicit device-to-device copy. Elementwise kernels
  reach different fractions of the peak depending on the element width, so the
  bandwidth limit uses the best of them (``copy_bandwidth``).
  """
  a = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  u = jax.lax.bitcast_convert_type(a.reshape(-1, 2), jnp.uint32)
  fns = dict(
      negate_bf16=(jax.jit(jnp.negative), a),
      not_u32=(jax.jit(jnp.invert), u),
      copy=(jax.jit(jnp.copy), a),
  )
  out = {}
  for name, (fn, x) in fns.items():
    y = fn(x)
    if y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer():
      continue  # returned the input buffer: nothing was streamed
    out[name] = 2 * x.nbytes / time_fn(fn, (x,), **timing)
  return out


def copy_bandwidth(nbytes, **timing):
  """The best streaming bandwidth of ``copy_bandwidths`` (bytes/s, read + write counted)."""
  return max(copy_bandwidths(nbytes, **timing).values())


def device_kernel_times(fn, args, *, calls=3):
  """Device time per call of each kernel ``fn`` launches, from a profiler trace.

  Runs ``fn(*args)`` once untraced, then ``calls`` times under ``jax.profiler``
  and sums the durations of the device's kernel events by name. Returns
  ``{kernel name: (microseconds per call, launches per call)}``; an empty dict
  where the backend records no device events (the CPU).
  """
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    (path,) = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path, "rb") as f:
      events = json.load(f)["traceEvents"]
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str(e.get("args", {}).get("name", ""))}
  total = collections.defaultdict(float)
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      total[e["name"]] += e.get("dur", 0.0)
      count[e["name"]] += 1
  return {k: (total[k] / calls, count[k] / calls) for k in sorted(total, key=total.get, reverse=True)}


def active_matmul_params(cfg) -> int:
  """Weights one token multiplies through in the layers (attention, dense MLPs, router, top-k and shared experts).

  The embedding (a row lookup) and the lm_head (counted apart) are left out.
  """
  D = cfg.hidden_size
  attn = D * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * D
  dense = 3 * D * cfg.intermediate_size
  moe = D * cfg.num_experts + 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.num_shared_experts)
  return cfg.num_hidden_layers * attn + cfg.num_dense_layers * dense + cfg.num_moe_layers * moe


def oput_step_flops(cfg, rows: int, length: int, allowed_pairs: int, rollout: bool = True) -> float:
  """Useful FLOPs of one OPUT step over ``rows`` sequences of ``length`` tokens (the ``[x_t ; x_0]`` input is 2x).

  Counted as: 2 x active parameters per input token for the rollout forward
  plus 6 x for the training forward and backward; attention (QK^T and PV,
  4 * heads * head_dim per pair) only over the ``allowed_pairs`` query-key
  pairs the mask allows, x1 for the rollout and x3 for training; the lm_head
  on the noisy half only; no remat recompute, no optimizer.
  """
  per_pass = (2 * rows * 2 * length * active_matmul_params(cfg)
              + 2 * rows * length * cfg.hidden_size * cfg.vocab_size
              + 4 * rows * allowed_pairs * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers)
  return (3 + (1 if rollout else 0)) * per_pass


def matmul_rate(n=8192, dtype=jnp.bfloat16, **timing):
  """FLOP/s of one ``n x n x n`` matrix product on random inputs (the device's practical matmul ceiling)."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in (0, 1))
  return 2 * n**3 / time_fn(jax.jit(jnp.matmul), (a, b), **timing)
