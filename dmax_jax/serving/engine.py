"""The serving engine: requests in, one event per committed block out, continuous batching over slots.

``Engine`` owns the device state (``slots.py``) and one scheduler thread. A
submitted request waits in a bounded queue until a slot is free, which is at
the next launch after one frees: it never waits for a batch to drain. Its
prompt blocks go in as extra rows of the next launches' first steps, beside
the others' decoding; once they are all in, it decodes block by block at its
own pace; each committed block is reported at once (``BlockEvent``), then one
``FinishEvent``. A launch runs on the device until some slot commits a block,
so the host works once per committed block (per step, under load), not per
forward.

Every (slot bucket, extra-row bucket) program is compiled by ``start``: none
is compiled under load. A launch uses the smallest bucket that holds the
highest busy slot (new requests take the lowest free slot) and the rows it
needs.

The library prints nothing: callers read ``stats`` and the events.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.decoding.layout import prompt_problem
from dmax_jax.decoding.strategy import Strategy
from dmax_jax.model import transformer
from dmax_jax.model.config import ModelConfig
from dmax_jax.serving import slots as slots_lib


DEFAULT_CACHE_LENGTH = 2048  # positions per slot when no window is given (a power of two: the attention kernel's
# key splits and chunks divide it)


class QueueFull(RuntimeError):
  """The request queue holds ``max_queue`` requests: try again later."""


class RequestError(ValueError):
  """A request the engine cannot take; ``param`` names the offending field."""

  def __init__(self, message: str, param: Optional[str] = None):
    super().__init__(message)
    self.param = param


class EngineClosed(RuntimeError):
  """The engine is shutting down and admits nothing more."""


@dataclasses.dataclass(frozen=True)
class BlockEvent:
  """A committed block: the ids it generated (after the prompt, up to an eos, within max_tokens)."""

  tokens: list
  nfe: int  # decoding forwards of the request so far


@dataclasses.dataclass(frozen=True)
class FinishEvent:
  """The request's end: ``finish_reason`` "stop" (eos), "length", "cancelled" or "error"."""

  finish_reason: str
  tokens: list  # every generated id
  nfe: int
  error: Optional[str] = None
  prompt_tokens: int = 0
  seconds: float = 0.0  # from submit to finish
  first_block_seconds: Optional[float] = None  # from submit to the first committed block


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """How the engine is laid out. ``window``: positions a request may use (prompt plus ``max_tokens`` in whole
  blocks; None = ``DEFAULT_CACHE_LENGTH`` less one block, at most the model's ``max_position_embeddings``).
  ``slot_buckets``: slot counts a launch may run (None = powers of 4 up to ``max_slots``, and ``max_slots``).
  ``steps_per_launch``: at most this many steps run between two looks at the queue when no block commits."""

  block_length: int = 32
  max_slots: int = 8
  max_queue: int = 256
  window: Optional[int] = None
  slot_buckets: Optional[tuple] = None
  row_buckets: Optional[tuple] = None
  steps_per_launch: int = 8
  moe_backends: tuple = ()  # ((fewest slots, moe_backend), ...): the MoE backend of buckets from that size up

  def rows(self, B: int) -> tuple:
    """Extra-row counts compiled for a slot bucket of B: a quarter and a half of B (the blocks committed at a
    step, rewritten, and a few prompt blocks) and max(8, B) (many prompt blocks); or ``row_buckets``."""
    return tuple(sorted(set(self.row_buckets or (max(1, B // 4), max(2, B // 2), max(8, B)))))

  def backend(self, B: int, default: str) -> str:
    chosen = [b for n, b in sorted(self.moe_backends) if n <= B]
    return chosen[-1] if chosen else default


def slot_buckets(max_slots: int) -> tuple:
  sizes = set(itertools.takewhile(lambda b: b < max_slots, (4**i for i in range(16))))
  return tuple(sorted(sizes | {max_slots}))


@dataclasses.dataclass(eq=False)
class Handle:
  """A submitted request (the caller keeps it to cancel)."""

  ids: list
  max_tokens: int
  kind: int
  threshold: float
  temperature: float
  seed: int
  on_event: Callable
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  # scheduler state
  slot: Optional[int] = None
  canvas: Optional[np.ndarray] = None  # [S] physical canvas
  first: int = 0  # physical index of the first decoding block
  last: int = 0  # physical index of the last block
  prefilled: int = 1  # next physical prompt block to write
  cur: int = 0  # physical block being decoded
  tokens: list = dataclasses.field(default_factory=list)
  nfe: int = 0
  eos: bool = False
  raw: int = 0  # generated ids before the first eos, max_tokens aside
  cancel_requested: bool = False
  first_block: Optional[float] = None
  finished: bool = False


class Engine:
  """Continuous batching of block-diffusion decoding (see the module docstring)."""

  def __init__(self, params, model_config: ModelConfig, strategies: dict, *, config: Optional[EngineConfig] = None):
    ec = config or EngineConfig()
    self.params, self.config, self.engine_config = params, model_config, ec
    K = ec.block_length
    if K <= 0:
      raise ValueError(f"block_length must be positive, got {K}")
    if ec.max_slots <= 0 or ec.max_queue < 0 or ec.steps_per_launch <= 0:
      raise ValueError("max_slots and steps_per_launch must be positive, max_queue >= 0")
    window = DEFAULT_CACHE_LENGTH - K if ec.window is None else ec.window  # the cache: window + one padding block
    window = min(window, model_config.max_position_embeddings) // K * K
    if window < K:
      raise ValueError(f"a window of {window} positions holds no block of {K}")
    self.window = window
    self.shape = slots_lib.Shape(slots=ec.max_slots, block_length=K, window=window)
    if not strategies:
      raise ValueError("no decoding strategy given")
    self.strategy_names = list(strategies)
    real = self._real = jnp.result_type(float)  # float64 under jax.enable_x64 at construction (kept for the thread)
    for s in strategies.values():
      if not isinstance(s, Strategy):
        raise TypeError(f"not a decoding strategy: {s!r}")
      s.check()
    self._templates = tuple(jax.tree.map(lambda v: jnp.asarray(v, real), s) for s in strategies.values())
    self._defaults = {n: getattr(s, "threshold", None) for n, s in strategies.items()}
    self.buckets = tuple(ec.slot_buckets or slot_buckets(ec.max_slots))
    if ec.row_buckets and max(ec.row_buckets) < ec.max_slots:
      raise ValueError(f"row buckets {ec.row_buckets} must reach max_slots {ec.max_slots} (a step may commit in "
                       "every slot)")
    if max(self.buckets) != ec.max_slots or min(self.buckets) <= 0:
      raise ValueError(f"slot buckets {self.buckets} must be positive and end at max_slots {ec.max_slots}")
    self._programs = {}
    self._admit = None
    self._lock = threading.Condition()
    self._queue: collections.deque = collections.deque()
    self._cancels: set = set()
    self._slots: list = [None] * ec.max_slots
    self._rewrites: list = []  # handles whose block was committed by the last launch
    self._closing = False
    self._thread: Optional[threading.Thread] = None
    self._state = None
    self.counters = collections.Counter()
    self.launch_seconds = 0.0  # time from a launch's call to its results on the host (the device's work)
    self.host_seconds = 0.0  # the scheduler's time per launch, the launch included: host work = the difference

  # ---------------------------------------------------------------- start-up

  def _compile(self):
    params, cfg, shape, ec = self.params, self.config, self.shape, self.engine_config
    st = jax.eval_shape(lambda: slots_lib.init_state(params, cfg, shape))
    K = shape.block_length
    lowered = {}
    for B in self.buckets:
      cfg_B = dataclasses.replace(cfg, moe_backend=ec.backend(B, cfg.moe_backend))
      for R in ec.rows(B):
        rows = slots_lib.Rows(jax.ShapeDtypeStruct((R, K), jnp.int32), jax.ShapeDtypeStruct((R,), jnp.int32),
                              jax.ShapeDtypeStruct((R,), jnp.int32))
        fn = jax.jit(lambda p, s, st, rows, cancel, n, B=B, c=cfg_B: slots_lib.launch(p, c, shape, s, B, st, rows,
                                                                                       cancel, n),
                     donate_argnums=(2,), compiler_options=transformer.DECODE_COMPILER_OPTIONS)
        lowered[(B, R)] = fn.lower(params, self._templates, st, rows, jax.ShapeDtypeStruct((shape.slots,), bool),
                                   jax.ShapeDtypeStruct((), jnp.int32))
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)
    admit = jax.jit(lambda p, st, *a: slots_lib.admit(p, cfg, shape, st, *a), donate_argnums=(1,))
    lowered["admit"] = admit.lower(params, st, scalar(jnp.int32), jax.ShapeDtypeStruct((shape.length,), jnp.int32),
                                   scalar(jnp.int32), scalar(jnp.int32), scalar(jnp.int32), scalar(self._real),
                                   scalar(jnp.float32), jax.eval_shape(lambda: jax.random.key(0)))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
      self._programs = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))
    self._admit = self._programs.pop("admit")

  def start(self) -> "Engine":
    """Compiles every program (blocking), allocates the state and starts the scheduler thread."""
    self._compile()
    self._state = slots_lib.init_state(self.params, self.config, self.shape)
    self._thread = threading.Thread(target=self._run, name="dmax-engine", daemon=True)
    self._thread.start()
    return self

  # ---------------------------------------------------------------- requests

  def problem(self, prompt_ids: Sequence[int], max_tokens: int) -> Optional[str]:
    """Why this request cannot run here (the prompt's ids, or its canvas past the window), or None."""
    if max_tokens <= 0:
      return f"max_tokens must be positive, got {max_tokens}"
    return prompt_problem(prompt_ids, max_tokens, self.shape.block_length, self.config, window=self.window)

  def submit(self, prompt_ids: Sequence[int], *, max_tokens: int, strategy: str, threshold: Optional[float] = None,
             temperature: float = 0.0, seed: int = 0, on_event: Callable = lambda e: None) -> Handle:
    """Queues a request; its events go to ``on_event`` (called from the engine's thread).

    Raises RequestError for a request that cannot run, QueueFull when the
    queue is full, EngineClosed once shutting down.
    """
    if strategy not in self.strategy_names:
      raise RequestError(f"unknown strategy {strategy!r} (one of {', '.join(self.strategy_names)})", "strategy")
    if threshold is None:
      threshold = self._defaults[strategy]
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
      raise RequestError(f"threshold must lie in [0, 1], got {threshold}", "threshold")
    if not temperature >= 0:
      raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 <= int(seed) < 2**32:  # jax.random.key keeps 32 bits of a seed without x64
      raise RequestError(f"seed must lie in [0, 2**32), got {seed}", "seed")
    ids = [int(t) for t in prompt_ids]
    problem = self.problem(ids, max_tokens)
    if problem:  # the prompt's fault if it cannot run with a single token to generate
      raise RequestError(problem, "prompt" if self.problem(ids, 1) else "max_tokens")
    h = Handle(ids=ids, max_tokens=int(max_tokens), kind=self.strategy_names.index(strategy),
               threshold=float(threshold or 0.0), temperature=float(temperature), seed=int(seed), on_event=on_event)
    with self._lock:
      if self._closing:
        raise EngineClosed("the server is shutting down")
      if len(self._queue) >= self.engine_config.max_queue:
        raise QueueFull(f"the queue holds {len(self._queue)} requests")
      self._queue.append(h)
      self.counters["requests_total"] += 1
      self._lock.notify_all()
    return h

  def cancel(self, h: Handle) -> None:
    """Ends ``h`` with FinishEvent("cancelled") (within a step); a finished request is left alone."""
    with self._lock:
      if not h.finished:
        h.cancel_requested = True
        self._cancels.add(h)
        self._lock.notify_all()

  def stats(self) -> dict:
    with self._lock:
      running = sum(h is not None for h in self._slots)
      return {"queue_depth": len(self._queue), "running": running, "slots": self.engine_config.max_slots,
              "requests_total": self.counters["requests_total"], "forwards_total": self.counters["forwards"],
              "tokens_total": self.counters["tokens"], "launches_total": self.counters["launches"],
              "steps_total": self.counters["steps"], "launch_seconds_total": self.launch_seconds,
              "scheduler_seconds_total": self.host_seconds}

  def shutdown(self, cancel: bool = False, timeout: Optional[float] = None) -> None:
    """Admits nothing more; finishes (or, with ``cancel``, cancels) every request; stops the thread."""
    with self._lock:
      self._closing = True
      if cancel:
        for h in list(self._queue) + [h for h in self._slots if h is not None]:
          h.cancel_requested = True
          self._cancels.add(h)
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  # ---------------------------------------------------------------- scheduler

  def _idle(self) -> bool:
    return not self._queue and all(h is None for h in self._slots) and not self._cancels

  def _run(self):
    while True:
      with self._lock:
        while self._idle() and not self._closing:
          self._lock.wait()
        if self._closing and self._idle():
          return
        cancels, self._cancels = self._cancels, set()
        admitted = self._take_slots()
      t0 = time.perf_counter()
      try:
        self._launch(cancels, admitted)
      except Exception as e:  # pylint: disable=broad-except
        self._fail_all(e)
      self.host_seconds += time.perf_counter() - t0

  def _take_slots(self) -> list:
    """Moves queued requests into free slots (lowest first); cancelled queued requests end here."""
    taken = []
    for h in list(self._queue):
      if h.cancel_requested:
        self._queue.remove(h)
        self._finish(h, "cancelled")
        continue
      if None not in self._slots:
        break
      self._queue.remove(h)
      slot = self._slots.index(None)
      self._slots[slot] = h
      h.slot = slot
      try:
        self._plan(h)
      except Exception as e:  # pylint: disable=broad-except
        self._slots[slot] = None
        self._finish(h, "error", error=f"{type(e).__name__}: {e}")
        continue
      taken.append(h)
    return taken

  def _plan(self, h: Handle) -> None:
    """The request's physical canvas and block indices (``decoding.layout``'s, one block in)."""
    K, cfg = self.shape.block_length, self.config
    P = len(h.ids)
    T = -(-(P + h.max_tokens) // K) * K
    canvas = np.full((self.shape.length,), cfg.eos_token_id, np.int32)
    canvas[K:K + P] = h.ids
    canvas[K + P:K + T] = cfg.mask_token_id
    h.canvas, h.first, h.last, h.prefilled = canvas, P // K + 1, T // K, 1
    h.cur = h.first

  def _launch(self, cancels: set, admitted: list):
    K, M = self.shape.block_length, self.shape.slots
    cancel = np.zeros((M,), bool)
    for h in cancels:
      if h.slot is not None and not h.finished:
        cancel[h.slot] = True
        self._release(h)
      if not h.finished:
        self._finish(h, "cancelled")
    rewrites = [h for h in self._rewrites if not h.finished]
    self._rewrites = []
    busy = [i for i, h in enumerate(self._slots) if h is not None]
    if not busy and not cancel.any():
      return
    B = next(b for b in self.buckets if b > (max(busy) if busy else 0))
    R_max = max(self.engine_config.rows(B))
    rows = [(h.canvas[(h.cur - 1) * K:h.cur * K], h.slot, h.cur - 1) for h in rewrites]
    ready = []
    for h in self._slots:  # prompt blocks, in slot order, as many as fit
      if h is None or h.prefilled > h.first or h.finished:
        continue
      while h.prefilled < h.first and len(rows) < R_max:
        b = h.prefilled
        rows.append((h.canvas[b * K:(b + 1) * K], h.slot, b))
        h.prefilled += 1
      if h.prefilled == h.first:
        h.prefilled += 1  # every prompt block is in (or goes in with this launch): it decodes from this launch on
        ready.append(h)
    R = next(r for r in self.engine_config.rows(B) if r >= len(rows))
    for h in ready:
      self._state = self._admit(self.params, self._state, np.int32(h.slot), h.canvas, np.int32(h.first),
                                np.int32(h.last), np.int32(h.kind), np.asarray(h.threshold, self._real),
                                np.float32(h.temperature), jax.random.key(h.seed))
    tokens = np.full((R, K), self.config.eos_token_id, np.int32)  # rows past ``rows`` write into the trash row
    slot = np.full((R,), self.shape.trash, np.int32)
    block = np.ones((R,), np.int32)
    for i, (t, s, b) in enumerate(rows):
      tokens[i], slot[i], block[i] = t, s, b
    extra = slots_lib.Rows(tokens, slot, block)
    t0 = time.perf_counter()
    self._state, out = self._programs[(B, R)](self.params, self._templates, self._state, extra, cancel,
                                              np.int32(self.engine_config.steps_per_launch))
    out = jax.device_get(out)
    self.launch_seconds += time.perf_counter() - t0
    steps = int(out.steps)
    self.counters["launches"] += 1
    self.counters["steps"] += steps
    self._collect(B, out)

  def _collect(self, B: int, out):
    """Reports what the launch committed; frees the slots of finished requests."""
    K = self.shape.block_length
    now = time.perf_counter()
    with self._lock:
      decoding = [h for h in self._slots[:B] if h is not None and h.prefilled > h.first]
    for h in decoding:
      i = h.slot
      self.counters["forwards"] += int(out.nfe[i]) - h.nfe
      h.nfe = int(out.nfe[i])
      if not out.committed[i]:
        continue
      start = max((h.cur - 1) * K, len(h.ids)) - (h.cur - 1) * K  # the block's generated positions
      h.canvas[h.cur * K:(h.cur + 1) * K] = out.x[i]  # the block's final tokens (rewritten at the next launch)
      new = []
      for t in out.x[i][start:].tolist():
        if t == self.config.eos_token_id:
          h.eos = True
          break
        new.append(t)
      h.raw += len(new)
      new = new[:max(0, h.max_tokens - len(h.tokens))]
      h.tokens += new
      self.counters["tokens"] += len(new)
      if h.first_block is None:
        h.first_block = now - h.submitted
      self._emit(h, BlockEvent(tokens=new, nfe=h.nfe))
      if out.done[i]:
        self._release(h)
        self._finish(h, "stop" if h.eos and h.raw < h.max_tokens else "length")
      else:
        h.cur += 1
        self._rewrites.append(h)

  def _release(self, h: Handle):
    with self._lock:
      if h.slot is not None and self._slots[h.slot] is h:
        self._slots[h.slot] = None
        self._lock.notify_all()

  def _emit(self, h: Handle, event):
    try:
      h.on_event(event)
    except Exception:  # pylint: disable=broad-except
      h.cancel_requested = True  # a caller that cannot take events has gone: free its slot
      with self._lock:
        self._cancels.add(h)

  def _finish(self, h: Handle, reason: str, error: Optional[str] = None):
    if h.finished:
      return
    h.finished = True
    self._emit(h, FinishEvent(finish_reason=reason, tokens=list(h.tokens), nfe=h.nfe, error=error,
                              prompt_tokens=len(h.ids), seconds=time.perf_counter() - h.submitted,
                              first_block_seconds=h.first_block))

  def _fail_all(self, e: Exception):
    """A launch failed: every request in a slot ends with an error and the state starts afresh."""
    with self._lock:
      failed = [h for h in self._slots if h is not None]
      self._slots = [None] * self.shape.slots
      self._rewrites = []
    for h in failed:
      self._finish(h, "error", error=f"{type(e).__name__}: {e}")
    self._state = slots_lib.init_state(self.params, self.config, self.shape)
