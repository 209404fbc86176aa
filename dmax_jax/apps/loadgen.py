"""The load generator of ``tools/bench_serve.py``: workloads, the streaming client, one concurrency level, its stats.

Workloads (``Request``: prompt token ids and ``max_tokens``), both seeded:

- ``data_workload``: the questions of a GSM8K-format JSONL file rendered exactly as ``tools/evaluate.py`` renders
  them (``runner.prompt_from_fields({"question": q}, tokenizer, math=True)``: one user turn in the checkpoint's
  chat template plus the math suffix), sent as token ids so the server decodes evaluate's prompt;
- ``synthetic_workload``: GSM8K-like prompts of random token ids (``SYNTHETIC``: prompt lengths N(75, 24)
  rounded and clipped to [32, 224], about a GSM8K test question in a LLaDA-2 style tokenizer with the chat
  template and the math suffix), ids uniform over the tokenizer's range less the special ids.

``max_tokens``: fixed, or with ``mixed`` uniform over the integers of [``min_tokens``, ``max_tokens``] per request.

``run_level`` sends a workload to a live server: open-loop arrivals (all at t = 0 for an infinite rate, else a
Poisson process: exponential gaps of mean 1/rate), at most ``concurrency`` requests in flight (a semaphore: an
arrival waits for a free place, and its timers start when it is sent), each a streamed ``POST /v1/completions``
with ``return_token_ids``. Per request: time to first block (send to the first chunk carrying generated token
ids), end-to-end latency (send to ``[DONE]``), completion tokens, NFE. ``GET /metrics`` is sampled meanwhile for
the running-slots gauge (slot occupancy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Any, Optional, Sequence

import numpy as np

# The synthetic prompt-length distribution: a normal rounded to integers and clipped (GSM8K's test questions are
# 46 +- 18 words, 240 +- 98 characters: about 60 +- 24 tokens at 4 characters a token, plus 15 tokens of chat
# template and math suffix).
SYNTHETIC = dict(mean=75.0, sd=24.0, low=32, high=224)
METRIC_RUNNING = "dmax_running_slots"  # serve.py's gauge of slots holding a request
METRIC_QUEUE = "dmax_queue_depth"
# serve.py's engine counters: host work per launch = scheduler - launch seconds over launches
ENGINE_COUNTERS = ("dmax_engine_launches_total", "dmax_engine_steps_total", "dmax_engine_launch_seconds_total",
                   "dmax_engine_scheduler_seconds_total")


@dataclasses.dataclass
class Request:
  """One request of a workload."""

  id: Any
  ids: list
  max_tokens: int
  question: Optional[str] = None  # data workloads
  reference: Optional[str] = None  # the normalised GSM8K answer, when the data has one


# ---------------------------------------------------------------- workloads

def draw_max_tokens(rng: np.random.Generator, n: int, max_tokens: int, min_tokens: int, mixed: bool) -> list[int]:
  """``n`` max_tokens: all ``max_tokens``, or uniform integers in [min_tokens, max_tokens] when ``mixed``."""
  if not mixed:
    return [int(max_tokens)] * n
  return [int(m) for m in rng.integers(min_tokens, max_tokens + 1, size=n)]


def fits(prompt_len: int, max_tokens: int, block_length: int, positions: int) -> bool:
  """Whether a request's canvas (prompt + max_tokens in whole blocks) fits ``positions``."""
  return -(-(prompt_len + max_tokens) // block_length) * block_length <= positions


def synthetic_workload(n: int, *, seed: int, vocab: int, exclude: Sequence[int] = (), max_tokens: int = 256,
                       min_tokens: int = 64, mixed: bool = False, mean: float = SYNTHETIC["mean"],
                       sd: float = SYNTHETIC["sd"], low: int = SYNTHETIC["low"], high: int = SYNTHETIC["high"],
                       block_length: int = 32, positions: Optional[int] = None) -> list[Request]:
  """``n`` requests of random ids in [0, vocab) less ``exclude``; prompt lengths round(N(mean, sd)) clipped to
  [low, high], and further to what leaves room for the request's max_tokens in ``positions``. Deterministic in
  ``seed``; a longer workload with the same seed starts with the shorter one's requests."""
  if n <= 0:
    raise ValueError(f"the workload needs at least one request, got {n}")
  if not 0 < low <= high:
    raise ValueError(f"prompt lengths need 0 < low <= high, got [{low}, {high}]")
  allowed = np.setdiff1d(np.arange(vocab), np.asarray(list(exclude), np.int64))
  if allowed.size == 0:
    raise ValueError(f"no token id left in [0, {vocab}) once the special ids are left out")
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):  # one request's draws at a time: a prefix of the workload does not depend on n
    m = draw_max_tokens(rng, 1, max_tokens, min_tokens, mixed)[0]
    top = high
    if positions is not None:
      top = min(high, positions // block_length * block_length - m)
      if top < low:
        raise ValueError(f"max_tokens {m} leaves no room for a prompt of {low} tokens in {positions} positions "
                         f"(blocks of {block_length})")
    length = int(np.clip(np.rint(rng.normal(mean, sd)), low, top))
    ids = rng.choice(allowed, size=length).tolist()
    out.append(Request(id=i, ids=[int(t) for t in ids], max_tokens=m))
  return out


def data_workload(path: str, tokenizer, n: Optional[int] = None, *, seed: int = 0, max_tokens: int = 256,
                  min_tokens: int = 64, mixed: bool = False) -> tuple[list[Request], list[str]]:
  """The questions of a GSM8K-format file as requests (evaluate's prompts), cycled or cut to ``n``; and the
  file's line errors. A line needs a "question"; "answer" (``#### n``) gives the reference; "id" is kept."""
  from dmax_jax.apps import gsm8k, runner  # pylint: disable=import-outside-toplevel

  def parse(obj, number):
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    text, ids = runner.prompt_from_fields({"question": obj.get("question")}, tokenizer, math=True)
    reference = gsm8k.reference_answer(obj["answer"]) if isinstance(obj.get("answer"), str) else None
    return runner.Request(runner.line_id(obj, number), "", text, ids, meta={"reference": reference})

  parsed, errors = runner.read_jsonl(path, parse, ("id", "question", "answer"))
  if not parsed:
    return [], errors
  n = len(parsed) if n is None else n
  rng = np.random.default_rng(seed)
  tokens = draw_max_tokens(rng, n, max_tokens, min_tokens, mixed)
  out = []
  for i in range(n):
    r = parsed[i % len(parsed)]
    rid = r.id if i < len(parsed) else f"{r.id}#{i // len(parsed)}"
    out.append(Request(id=rid, ids=list(r.ids), max_tokens=tokens[i], question=r.text, reference=r.meta["reference"]))
  return out, errors


def describe(requests: Sequence[Request]) -> dict:
  """What a workload turned out to be: request count, prompt-length and max_tokens statistics."""
  p = np.array([len(r.ids) for r in requests], float)
  m = np.array([r.max_tokens for r in requests], float)
  stat = lambda a: dict(mean=float(a.mean()), sd=float(a.std()), min=int(a.min()), max=int(a.max()))  # pylint: disable=unnecessary-lambda-assignment
  return dict(requests=len(requests), prompt_tokens=stat(p), max_tokens=stat(m))


def arrival_times(n: int, rate: float, seed: int) -> np.ndarray:
  """Send times (seconds from the start) of ``n`` requests: all 0 for an infinite rate, else a Poisson process of
  ``rate`` requests/s starting at 0 (exponential gaps of mean 1/rate)."""
  if math.isinf(rate):
    return np.zeros(n)
  if not rate > 0:
    raise ValueError(f"the request rate must be positive, got {rate}")
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
  return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


# ---------------------------------------------------------------- statistics

def percentile(xs: Sequence[float], q: float) -> float:
  """``numpy.percentile`` (linear interpolation), nan for no data."""
  if not 0 <= q <= 100:
    raise ValueError(f"a percentile lies in [0, 100], got {q}")
  return float(np.percentile(xs, q)) if len(xs) else float("nan")


# ---------------------------------------------------------------- server-sent events

class SSEDecoder:
  """An incremental ``text/event-stream`` parser: ``feed`` bytes as they arrive, get the data of each complete
  event (its ``data:`` lines joined by newlines). Comments and other fields are skipped; lines end in LF or CRLF."""

  def __init__(self):
    self._tail = b""
    self._data: list[str] = []

  def feed(self, chunk: bytes) -> list[str]:
    lines = (self._tail + chunk).split(b"\n")
    self._tail = lines.pop()  # after the last newline: incomplete
    events = []
    for line in lines:
      if line.endswith(b"\r"):
        line = line[:-1]
      if not line:
        if self._data:
          events.append("\n".join(self._data))
          self._data = []
        continue
      if line.startswith(b":"):
        continue
      field, _, value = line.partition(b":")
      if field == b"data":
        value = value[1:] if value.startswith(b" ") else value
        self._data.append(value.decode("utf-8"))
    return events

  def close(self) -> list[str]:
    """The data of an event the stream ended in without its blank line."""
    events = self.feed(b"\n\n") if self._tail or self._data else []
    self._tail, self._data = b"", []
    return events


@dataclasses.dataclass
class Response:
  """What the client saw of one streamed request; times are seconds from its send."""

  id: Any
  sent: float = 0.0  # perf_counter at send
  first_block: Optional[float] = None  # the first chunk with generated token ids
  first_chunk: Optional[float] = None
  latency: Optional[float] = None  # to [DONE] (or the end of the stream)
  tokens: list = dataclasses.field(default_factory=list)
  text: str = ""
  completion_tokens: Optional[int] = None  # from the usage chunk
  nfe: Optional[int] = None
  finish_reason: Optional[str] = None
  done: bool = False
  error: Optional[str] = None

  @property
  def ok(self) -> bool:
    return self.done and self.error is None

  @property
  def ttfb(self) -> Optional[float]:
    """Time to first block; a reply that generated nothing (eos at once) counts its first chunk."""
    return self.first_block if self.first_block is not None else self.first_chunk

  @property
  def num_tokens(self) -> int:
    return self.completion_tokens if self.completion_tokens is not None else len(self.tokens)


def apply_event(r: Response, data: str, t: float) -> None:
  """Updates ``r`` with one SSE event's data received ``t`` seconds after the send."""
  if data.strip() == "[DONE]":
    r.done = True
    return
  try:
    obj = json.loads(data)
  except json.JSONDecodeError:
    r.error = f"an event that is not JSON: {data[:200]!r}"
    return
  if not isinstance(obj, dict):
    r.error = f"an event that is not a JSON object: {data[:200]!r}"
    return
  if "error" in obj:
    err = obj["error"]
    r.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    return
  if r.first_chunk is None:
    r.first_chunk = t
  for choice in obj.get("choices") or []:
    ids = choice.get("token_ids") or []
    if ids and r.first_block is None:
      r.first_block = t
    r.tokens += ids
    r.text += choice.get("text") or ""
    if choice.get("finish_reason"):
      r.finish_reason = choice["finish_reason"]
  if obj.get("nfe") is not None:
    r.nfe = int(obj["nfe"])
  usage = obj.get("usage")
  if isinstance(usage, dict):
    r.completion_tokens = usage.get("completion_tokens", r.completion_tokens)
    if usage.get("nfe") is not None:
      r.nfe = int(usage["nfe"])


def request_body(model: str, req: Request, fields: dict) -> dict:
  """The JSON body of a streamed completion of ``req``'s token ids (``fields``: strategy, threshold, ...)."""
  return {"model": model, "prompt": list(req.ids), "max_tokens": req.max_tokens, "stream": True,
          "stream_options": {"include_usage": True}, "return_token_ids": True, **fields}


async def stream_completion(client, base_url: str, body: dict, headers: dict, rid: Any) -> Response:
  """Sends one streamed completion and reads it to the end."""
  import httpx  # pylint: disable=import-outside-toplevel

  r = Response(id=rid)
  r.sent = t0 = time.perf_counter()
  try:
    async with client.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers) as resp:
      if resp.status_code != 200:
        text = (await resp.aread()).decode("utf-8", "replace")
        r.error = f"HTTP {resp.status_code}: {text[:300]}"
        return r
      decoder = SSEDecoder()
      async for chunk in resp.aiter_raw():
        now = time.perf_counter() - t0
        for data in decoder.feed(chunk):
          apply_event(r, data, now)
      for data in decoder.close():
        apply_event(r, data, time.perf_counter() - t0)
  except httpx.HTTPError as e:
    r.error = f"{type(e).__name__}: {e}"
  finally:
    r.latency = time.perf_counter() - t0
  if not r.done and r.error is None:
    r.error = "the stream ended before [DONE]"
  return r


def parse_metric(text: str, name: str) -> Optional[float]:
  """The value of an unlabelled sample ``name`` in Prometheus text, None if absent."""
  for line in text.splitlines():
    if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
      try:
        return float(line.rsplit(" ", 1)[1])
      except (IndexError, ValueError):
        return None
  return None


async def sample_metrics(client, base_url: str, headers: dict, samples: list, stop: asyncio.Event,
                         every_s: float) -> None:
  """Appends (perf_counter, running slots, queue depth, engine counters) from ``/metrics`` every ``every_s`` until
  ``stop``."""
  import httpx  # pylint: disable=import-outside-toplevel

  while not stop.is_set():
    try:
      resp = await client.get(f"{base_url}/metrics", headers=headers)
      if resp.status_code == 200:
        samples.append((time.perf_counter(), parse_metric(resp.text, METRIC_RUNNING),
                        parse_metric(resp.text, METRIC_QUEUE),
                        tuple(parse_metric(resp.text, name) for name in ENGINE_COUNTERS)))
    except httpx.HTTPError:
      pass
    try:
      await asyncio.wait_for(stop.wait(), every_s)
    except asyncio.TimeoutError:
      pass


async def run_level_async(base_url: str, model: str, requests: Sequence[Request], *, concurrency: int,
                          rate: float = math.inf, seed: int = 0, fields: Optional[dict] = None,
                          api_key: Optional[str] = None, sample_s: float = 0.1,
                          read_timeout_s: float = 3600.0) -> tuple[list[Response], list]:
  """(responses in request order, /metrics samples) of one level (see the module docstring)."""
  import httpx  # pylint: disable=import-outside-toplevel

  if concurrency <= 0:
    raise ValueError(f"concurrency must be positive, got {concurrency}")
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  fields = fields or {}
  arrivals = arrival_times(len(requests), rate, seed)
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  timeout = httpx.Timeout(60.0, read=read_timeout_s)
  samples: list = []
  stop = asyncio.Event()
  async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client, \
      httpx.AsyncClient(timeout=httpx.Timeout(10.0), trust_env=False) as probe:
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one(i: int, req: Request) -> Response:
      delay = start + arrivals[i] - time.perf_counter()
      if delay > 0:
        await asyncio.sleep(delay)
      async with slots:
        return await stream_completion(client, base_url, request_body(model, req, fields), headers, req.id)

    sampler = asyncio.ensure_future(sample_metrics(probe, base_url, headers, samples, stop, sample_s))
    try:
      responses = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    finally:
      stop.set()
      await sampler
  return list(responses), samples


def run_level(*args, **kwargs) -> tuple[list[Response], list]:
  """``run_level_async`` from synchronous code."""
  return asyncio.run(run_level_async(*args, **kwargs))


def engine_rates(samples: Sequence, begin: float, end: float) -> dict:
  """From the engine counters of the first and last ``/metrics`` samples in [begin, end]: steps per launch, the
  device's ms per step (launch seconds over steps) and the host's ms per launch (scheduler less launch seconds)."""
  inside = [s[3] for s in samples if begin <= s[0] <= end and len(s) > 3 and None not in s[3]]
  if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
    return {}
  launches, steps, launch_s, sched_s = (b - a for a, b in zip(inside[0], inside[-1]))
  return dict(steps_per_launch=steps / launches, device_ms_per_step=1000 * launch_s / max(steps, 1),
              host_ms_per_launch=1000 * (sched_s - launch_s) / launches)


def summarize(requests: Sequence[Request], responses: Sequence[Response], samples: Sequence,
              concurrency: int) -> dict:
  """One level's figures: output tokens/s and requests/s over the wall from the first send to the last finish,
  time to first block and end-to-end latency percentiles (seconds), mean TPF (tokens / NFE summed over requests),
  mean running slots over the wall (``/metrics`` samples), failures."""
  ok = [r for r in responses if r.ok]
  out = dict(concurrency=concurrency, requests=len(responses), failed=len(responses) - len(ok),
             errors=sorted({r.error for r in responses if r.error})[:5])
  if not ok:
    return out
  begin = min(r.sent for r in ok)
  end = max(r.sent + r.latency for r in ok)
  wall = end - begin
  tokens = sum(r.num_tokens for r in ok)
  nfe = sum(r.nfe or 0 for r in ok)
  ttfb = [r.ttfb for r in ok if r.ttfb is not None]
  e2e = [r.latency for r in ok]
  running = [s[1] for s in samples if begin <= s[0] <= end and s[1] is not None]
  out.update(wall_s=wall, completion_tokens=tokens, nfe=nfe, output_tok_s=tokens / wall if wall > 0 else 0.0,
             requests_s=len(ok) / wall if wall > 0 else 0.0, tpf=tokens / nfe if nfe else 0.0,
             ttfb_p50=percentile(ttfb, 50), ttfb_p99=percentile(ttfb, 99), e2e_p50=percentile(e2e, 50),
             e2e_p99=percentile(e2e, 99), ttfb_mean=float(np.mean(ttfb)) if ttfb else float("nan"),
             e2e_mean=float(np.mean(e2e)), occupancy=float(np.mean(running)) if running else None,
             occupancy_samples=len(running),
             **engine_rates(samples, begin, end),
             mean_max_tokens=float(np.mean([q.max_tokens for q in requests])),
             hit_max_tokens=sum(r.num_tokens >= q.max_tokens for q, r in zip(requests, responses) if r.ok))
  return out
