"""Timing helpers shared by the benchmark tools (tools/bench_*.py)."""

from __future__ import annotations

import statistics
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


def copy_bandwidth(nbytes, **timing):
  """Bytes/s of an elementwise negate of a ``nbytes`` bf16 array (read + write counted)."""
  a = jnp.ones((nbytes // 2,), jnp.bfloat16)
  seconds = time_fn(jax.jit(jnp.negative), (a,), **timing)
  return 2 * a.nbytes / seconds


def uniform_routing(key, T, E, X):
  """Top-X distinct experts per token, uniformly at random; combine weights normalised to 1."""
  ki, kw = jax.random.split(key)
  idx = jnp.argsort(jax.random.uniform(ki, (T, E)), axis=1)[:, :X].astype(jnp.int32)
  w = jax.random.uniform(kw, (T, X), minval=0.1, maxval=1.0)
  return idx, w / w.sum(axis=1, keepdims=True)
