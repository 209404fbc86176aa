"""``serve.py``: an OpenAI-compatible HTTP server over the serving engine (``dmax_jax.serving``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), ``GET /health`` (never needs the key; 503 while shutting down) and ``GET /metrics``
(Prometheus text).

What a request may hold (anything else, or a field of the wrong JSON type, is a 400 naming it in ``param``):

- ``model`` (required; the served name, else 404 ``model_not_found``);
- completions: ``prompt``, a string (tokenized raw, like decode.py's ``"prompt"`` input) or a list of token
  ids; chat: ``messages``, ``[{"role": str, "content": str}, ...]``, rendered with the checkpoint's chat
  template plus the generation prompt (like decode.py's ``"messages"`` input; no math suffix: put it in the
  message to get what decode.py ``--math`` does to a ``"question"``);
- ``max_tokens`` (chat: or ``max_completion_tokens``; default ``--gen-length``, cut to what the window has
  left when not given), ``temperature`` (0 = greedy, up to 2), ``seed`` (default ``--seed``), ``stop`` (a
  string or up to 4), ``stream``, ``stream_options.include_usage``;
- DMax fields: ``strategy`` (a registry name; default ``--strategy``), ``threshold`` (in [0, 1]; default the
  command line's for the default strategy, else the strategy's own) and ``return_token_ids`` (a bool: each
  choice, and each streamed chunk, then carries ``token_ids``, the generated ids);
- standard fields accepted at the value that changes nothing: ``n`` (1), ``top_p`` (1),
  ``frequency_penalty`` and ``presence_penalty`` (0), ``user`` (ignored). The official ``openai`` client
  sends only the fields it is given.

Replies have OpenAI's shapes plus ``usage.nfe`` (the decoding forwards spent on the request). A stop string
cuts the text before it (finish_reason "stop"), ends the engine request, and ``completion_tokens`` /
``token_ids`` count the tokens up to the one that completed it. Streams send one chunk per committed block
(its text delta; text that could still be the start of a stop string, or an incomplete UTF-8 character, is
held back to a later chunk), a final chunk with the finish_reason and ``nfe``, a usage chunk (``choices``
empty) when ``stream_options.include_usage`` is true, then ``data: [DONE]``. A stream's status line goes out
with its first block, so a request that fails before it gets a plain error reply (500); a failure after it
arrives as a ``data: {"error": ...}`` chunk before ``[DONE]``.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 401 missing or wrong key
(``Authorization: Bearer KEY``), 404 unknown model or path, 429 queue full (``Retry-After``), 500 a failure
of that request only, 503 shutting down. SIGTERM (or Ctrl-C) stops admitting, lets running requests finish
for up to ``--shutdown-grace`` seconds, cancels what is left, and exits 0.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import os
import signal
import socket
import sys
import time
import uuid
from typing import Callable, Optional, Sequence, Union

MAX_STOPS = 4
RETRY_AFTER_S = 1
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# time to first block and end-to-end latency, seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


# ---------------------------------------------------------------- errors

class ApiError(Exception):
  """An OpenAI-style error reply."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # pylint: disable=redefined-builtin
               param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

  def response(self):
    from fastapi.responses import JSONResponse  # pylint: disable=import-outside-toplevel

    return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


def server_error(message: str, code: Optional[str] = None) -> ApiError:
  return ApiError(500, message, type="server_error", code=code)


# ---------------------------------------------------------------- request bodies

def _models():
  """The pydantic request models (built on first use, so the module imports without the serve extra)."""
  from pydantic import BaseModel, ConfigDict  # pylint: disable=import-outside-toplevel

  class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

  class StreamOptions(Strict):
    include_usage: Optional[bool] = None

  class Common(Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    strategy: Optional[str] = None
    threshold: Optional[float] = None
    return_token_ids: Optional[bool] = None
    n: Optional[int] = None
    top_p: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    user: Optional[str] = None

  class Completion(Common):
    prompt: Union[str, list[int]]

  class Message(Strict):
    role: str
    content: str

  class Chat(Common):
    messages: list[Message]
    max_completion_tokens: Optional[int] = None

  return Completion, Chat


_MODELS = None
# wrong-type messages for fields whose pydantic message would list every union member
_EXPECTED = {"prompt": "a string or a list of token ids (integers)", "stop": "a string or a list of strings",
             "messages": "a list of {\"role\": string, \"content\": string}",
             "stream_options": "an object {\"include_usage\": bool}"}


def parse_body(raw: bytes, chat: bool):
  """The validated request model of a JSON body; ApiError 400 names the first bad field."""
  global _MODELS  # pylint: disable=global-statement
  from pydantic import ValidationError  # pylint: disable=import-outside-toplevel

  if _MODELS is None:
    _MODELS = _models()
  try:
    obj = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise bad_request(f"the body is not valid JSON ({e})", code="invalid_json") from None
  if not isinstance(obj, dict):
    raise bad_request(f"the body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
  try:
    return _MODELS[1 if chat else 0].model_validate(obj)
  except ValidationError as e:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
      where = ".".join(loc)
      raise bad_request(f"unknown field '{where}'", param=field, code="unknown_field") from None
    if err["type"] == "missing":
      raise bad_request(f"missing required field '{'.'.join(loc)}'", param=field, code="missing_field") from None
    if field in _EXPECTED:
      raise bad_request(f"'{field}' must be {_EXPECTED[field]}", param=field, code="invalid_type") from None
    raise bad_request(f"'{'.'.join(loc)}': {err['msg']}", param=field, code="invalid_type") from None


@dataclasses.dataclass
class Defaults:
  """The command line's per-request defaults."""

  strategy: str = "spd"
  threshold: Optional[float] = None  # for the default strategy; None = the strategy's own
  max_tokens: int = 256
  temperature: float = 0.0
  seed: int = 0


@dataclasses.dataclass
class Job:
  """One checked request: what the engine is given and what the reply needs."""

  prompt_ids: list[int]
  max_tokens: int
  strategy: str
  threshold: Optional[float]
  temperature: float
  seed: int
  stops: list[str]
  stream: bool
  include_usage: bool
  return_token_ids: bool


def _check_neutral(body):
  if body.n is not None and body.n != 1:
    raise bad_request("only n = 1 is supported", param="n")
  if body.top_p is not None and body.top_p != 1:
    raise bad_request("only top_p = 1 is supported (sampling draws from the whole distribution)", param="top_p")
  for name in ("frequency_penalty", "presence_penalty"):
    if getattr(body, name) not in (None, 0):
      raise bad_request(f"only {name} = 0 is supported", param=name)


def _stops(stop) -> list[str]:
  stops = [stop] if isinstance(stop, str) else list(stop or [])
  if len(stops) > MAX_STOPS:
    raise bad_request(f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
  if any(not s for s in stops):
    raise bad_request("'stop' strings must not be empty", param="stop")
  return stops


# ---------------------------------------------------------------- text

class TextTracker:
  """The text of a generation so far, cut at the first stop string, and what of it may be sent yet.

  ``add`` takes a block's new tokens and returns the new text that is final: it holds back a trailing
  incomplete UTF-8 character (U+FFFD) and any ending that could still become a stop string. A stop string
  cuts the text before it and the tokens after the one that completed it (``stopped``).
  """

  def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
    self.decode, self.stops = decode, list(stops)
    self.tokens: list[int] = []
    self.text = ""
    self.sent = 0  # characters of ``text`` already handed out
    self.stopped = False

  def _find(self, text: str) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
    return min(hits) if hits else None

  def _cut(self, start: int) -> bool:
    """Cuts at the first stop string, which appeared after token ``start``; False if there is none."""
    if self._find(self.text) is None:
      return False
    for n in range(start + 1, len(self.tokens) + 1):
      text = self.decode(self.tokens[:n])
      at = self._find(text)
      if at is not None:
        self.tokens, self.text, self.stopped = self.tokens[:n], text[:at], True
        return True
    raise AssertionError("a stop string in the whole text but in none of its prefixes")

  def _held(self) -> int:
    """Characters at the end of ``text`` that are not final yet."""
    text = self.text
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
      end -= 1
    hold = 0
    for s in self.stops:
      for n in range(min(len(s) - 1, end), hold, -1):
        if text.endswith(s[:n], 0, end):
          hold = n
          break
    return len(text) - end + hold

  def _take(self, final: bool) -> str:
    upto = len(self.text) if (final or self.stopped) else len(self.text) - self._held()
    delta = self.text[self.sent:upto] if upto > self.sent else ""
    self.sent = max(self.sent, upto)
    return delta

  def add(self, tokens: Sequence[int]) -> str:
    if self.stopped:
      return ""
    start = len(self.tokens)
    self.tokens += list(tokens)
    self.text = self.decode(self.tokens)
    self._cut(start)
    return self._take(final=False)

  def finish(self, tokens: Optional[Sequence[int]] = None) -> str:
    """The rest of the text once the generation ended (``tokens``: all its tokens, if known)."""
    if not self.stopped and tokens is not None and list(tokens) != self.tokens:
      self.tokens = list(tokens)
      self.text = self.decode(self.tokens)
      self._cut(0)
    return self._take(final=True)


# ---------------------------------------------------------------- metrics

class Metrics:
  """Prometheus metrics of one app, in its own registry."""

  def __init__(self, engine):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # pylint: disable=import-outside-toplevel

    self.registry = CollectorRegistry()
    self._tokens = self._nfe = 0
    r = self.registry
    self.requests = Counter("dmax_requests", "HTTP requests answered, by endpoint and status",
                            ["endpoint", "status"], registry=r)
    self.completion_tokens = Counter("dmax_completion_tokens", "tokens returned by finished requests", registry=r)
    self.request_nfe = Counter("dmax_request_nfe", "decoding forwards (NFE) spent on finished requests", registry=r)
    self.first_block = Histogram("dmax_time_to_first_block_seconds", "arrival to the first committed block",
                                 buckets=LATENCY_BUCKETS, registry=r)
    self.latency = Histogram("dmax_request_latency_seconds", "arrival to the last token (end to end)",
                             buckets=LATENCY_BUCKETS, registry=r)
    tpf = Gauge("dmax_tokens_per_forward", "completion tokens per decoding forward over finished requests "
                "(dmax_completion_tokens_total / dmax_request_nfe_total)", registry=r)
    tpf.set_function(self._tpf)
    r.register(_EngineCollector(engine))

  def finished(self, seconds: float, tokens: int, nfe: int):
    """A request that ended well: its latency, tokens and forwards."""
    self.latency.observe(seconds)
    self.completion_tokens.inc(tokens)
    self.request_nfe.inc(nfe)
    self._tokens += tokens
    self._nfe += nfe

  def _tpf(self) -> float:
    return self._tokens / self._nfe if self._nfe else 0.0

  def text(self) -> bytes:
    from prometheus_client import generate_latest  # pylint: disable=import-outside-toplevel

    return generate_latest(self.registry)


class _EngineCollector:
  """The engine's own counts, read at each scrape."""

  def __init__(self, engine):
    self.engine = engine

  def collect(self):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # pylint: disable=import-outside-toplevel

    s = self.engine.stats()
    yield GaugeMetricFamily("dmax_queue_depth", "requests waiting for a slot", value=s["queue_depth"])
    yield GaugeMetricFamily("dmax_running_slots", "slots holding a request", value=s["running"])
    yield GaugeMetricFamily("dmax_slots", "slots of the engine", value=s["slots"])
    yield CounterMetricFamily("dmax_engine_requests", "requests the engine took", value=s["requests_total"])
    yield CounterMetricFamily("dmax_generated_tokens", "tokens the engine generated (cancelled requests too)",
                              value=s["tokens_total"])
    yield CounterMetricFamily("dmax_forwards", "decoding forwards the engine ran", value=s["forwards_total"])
    yield CounterMetricFamily("dmax_engine_launches", "device launches (each runs steps until a block commits)",
                              value=s["launches_total"])
    yield CounterMetricFamily("dmax_engine_steps", "device steps (one forward of every busy slot each)",
                              value=s["steps_total"])
    yield CounterMetricFamily("dmax_engine_launch_seconds", "time from a launch's call to its results on the host",
                              value=s["launch_seconds_total"])
    yield CounterMetricFamily("dmax_engine_scheduler_seconds", "the scheduler's time, launches included (the "
                              "difference is host work)", value=s["scheduler_seconds_total"])


class _CountRequests:
  """ASGI middleware: counts every reply by endpoint and status (streams when they end)."""

  def __init__(self, app, counter):
    self.app, self.counter = app, counter

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    status = [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    path = scope.get("path", "")
    endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
    try:
      await self.app(scope, receive, send_status)
    finally:
      self.counter.labels(endpoint, str(status[0])).inc()


# ---------------------------------------------------------------- the engine, seen from asyncio

class ClientGone(Exception):
  """The client of a request went away before its reply."""


class EngineRun:
  """One engine request: its events arrive from the engine thread into an asyncio queue."""

  def __init__(self, engine, job: Job):
    from dmax_jax.serving import EngineClosed, QueueFull, RequestError  # pylint: disable=import-outside-toplevel

    self.engine = engine
    self.events: asyncio.Queue = asyncio.Queue()
    self.finished = False
    loop = asyncio.get_running_loop()

    def on_event(event):  # the engine thread
      with contextlib.suppress(RuntimeError):  # the loop is gone (the server stopped)
        loop.call_soon_threadsafe(self.events.put_nowait, event)

    try:
      self.handle = engine.submit(job.prompt_ids, max_tokens=job.max_tokens, strategy=job.strategy,
                                  threshold=job.threshold, temperature=job.temperature, seed=job.seed,
                                  on_event=on_event)
    except QueueFull:
      raise ApiError(429, "the server's queue is full; retry later", type="rate_limit_error", code="queue_full",
                     headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except RequestError as e:
      raise bad_request(str(e), param=getattr(e, "param", None)) from None
    except EngineClosed:
      raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None

  async def next(self, request=None, poll_s: float = 0.1):
    """The next event; with ``request``, cancels the run when its client goes away (raising ClientGone)."""
    from dmax_jax.serving import FinishEvent  # pylint: disable=import-outside-toplevel

    while True:
      if request is None:
        event = await self.events.get()
      else:
        try:
          event = await asyncio.wait_for(self.events.get(), poll_s)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self.cancel()
            raise ClientGone() from None
          continue
      if isinstance(event, FinishEvent):
        self.finished = True
      return event

  def cancel(self):
    if not self.finished:
      self.finished = True
      self.engine.cancel(self.handle)


@functools.lru_cache(maxsize=None)
def _event_stream_class():
  from starlette.responses import Response  # pylint: disable=import-outside-toplevel

  class EventStream(Response):
    """An SSE response that streams ``chunks`` (bytes) and calls ``on_close`` when it ends, however it ends;
    a client that goes away stops the stream at once, not at the next chunk."""

    media_type = "text/event-stream"

    def __init__(self, chunks, on_close: Callable[[], None]):  # pylint: disable=super-init-not-called
      self.chunks, self.on_close = chunks, on_close
      self.status_code = 200
      self.background = None
      self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope, receive, send):
      async def stream():
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.chunks:
          await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

      async def watch():
        while (await receive())["type"] != "http.disconnect":
          pass

      task, watcher = asyncio.ensure_future(stream()), asyncio.ensure_future(watch())
      try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client went away first
          self.on_close()
          task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
          await task
      finally:
        watcher.cancel()
        task.cancel()
        self.on_close()
        with contextlib.suppress(asyncio.CancelledError, OSError, RuntimeError):
          await self.chunks.aclose()

  return EventStream


def event_stream(chunks, on_close: Callable[[], None]):
  """The streamed reply of ``chunks`` (an async iterator of bytes); ``on_close`` runs once it ends."""
  return _event_stream_class()(chunks, on_close)


def sse(obj) -> bytes:
  return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ---------------------------------------------------------------- the app

class Service:
  """What the endpoints share: the engine, the tokenizer, the defaults, the metrics, the open/closed state."""

  def __init__(self, engine, tokenizer, *, model_name: str, api_key: Optional[str], defaults: Defaults,
               strategies: Sequence[str]):
    self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
    self.defaults, self.strategies = defaults, list(strategies)
    self.metrics = Metrics(engine)
    self.accepting = True
    self.active = 0  # admitted requests whose reply has not ended
    self.created = int(time.time())

  # ---- checks
  def check_key(self, request):
    if self.api_key is None:
      return
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if not auth:
      raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
      raise ApiError(401, "incorrect API key", code="invalid_api_key")

  def check_open(self):
    if not self.accepting:
      raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")

  def check_model(self, model: str):
    if model != self.model_name:
      raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                     param="model", code="model_not_found")

  def prompt_ids(self, body, chat: bool) -> tuple[list[int], str]:
    """(token ids, the field they came from)."""
    from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel
    from dmax_jax.tokenizer import TemplateRaised, TokenizerError  # pylint: disable=import-outside-toplevel

    if chat:
      fields, param = {"messages": [m.model_dump() for m in body.messages]}, "messages"
    elif isinstance(body.prompt, list):
      if not body.prompt:
        raise bad_request("empty prompt ('prompt' has no tokens)", param="prompt")
      return list(body.prompt), "prompt"
    else:
      fields, param = {"prompt": body.prompt}, "prompt"
    try:
      return runner.prompt_from_fields(fields, self.tokenizer, False)[1], param
    except TemplateRaised as e:
      raise bad_request(str(e), param=param) from None
    except TokenizerError as e:
      raise server_error(str(e), code="chat_template") from None
    except ValueError as e:
      raise bad_request(str(e), param=param) from None

  def max_tokens(self, body, chat: bool, ids: list[int], param: str) -> int:
    given, name = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:
      if given is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
      given, name = body.max_completion_tokens, "max_completion_tokens"
    if given is not None and given < 1:
      raise bad_request(f"'{name}' must be at least 1, got {given}", param=name)
    problem = self.engine.problem(ids, 1)
    if problem:
      raise bad_request(f"the prompt cannot be served: {problem}", param=param, code="context_length_exceeded")
    if given is None:  # the default, cut to what the window has left
      given = self.defaults.max_tokens
      if self.engine.problem(ids, given):
        given = max(1, min(given, self.engine.window - len(ids)))
    problem = self.engine.problem(ids, given)
    if problem:
      raise bad_request(f"'{name}' of {given} does not fit: {problem}", param=name, code="context_length_exceeded")
    return given

  def job(self, body, chat: bool) -> Job:
    self.check_model(body.model)
    _check_neutral(body)
    stops = _stops(body.stop)
    if body.stream_options is not None and not body.stream:
      raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")
    temperature = self.defaults.temperature if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
      raise bad_request(f"'temperature' must lie in [0, 2], got {temperature}", param="temperature")
    strategy = self.defaults.strategy if body.strategy is None else body.strategy
    if strategy not in self.strategies:
      raise bad_request(f"unknown strategy '{strategy}' (one of {', '.join(self.strategies)})", param="strategy")
    threshold = body.threshold
    if threshold is None and strategy == self.defaults.strategy:
      threshold = self.defaults.threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
      raise bad_request(f"'threshold' must lie in [0, 1], got {threshold}", param="threshold")
    seed = self.defaults.seed if body.seed is None else body.seed
    if not 0 <= seed < 2**32:  # jax.random.key keeps 32 bits of a seed (without x64)
      raise bad_request(f"'seed' must lie in [0, 2**32), got {seed}", param="seed")
    ids, param = self.prompt_ids(body, chat)
    max_tokens = self.max_tokens(body, chat, ids, param)
    return Job(ids, max_tokens, strategy, threshold, temperature, seed, stops, bool(body.stream),
               bool(body.stream_options and body.stream_options.include_usage), bool(body.return_token_ids))

  # ---- replies
  def usage(self, job: Job, tokens: int, nfe: int) -> dict:
    n = len(job.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": tokens, "total_tokens": n + tokens, "nfe": nfe}

  def finished(self, arrived: float, tokens: int, nfe: int):
    self.metrics.finished(time.perf_counter() - arrived, tokens, nfe)

  @staticmethod
  def failure(event) -> Optional[ApiError]:
    if event.finish_reason == "error":
      return server_error(f"the request failed in the engine: {event.error or 'unknown error'}", code="engine_error")
    if event.finish_reason == "cancelled":
      return ApiError(503, "the request was cancelled: the server is shutting down", type="server_error",
                      code="cancelled")
    return None

  async def complete(self, request, chat: bool):
    arrived = time.perf_counter()
    self.check_key(request)
    self.check_open()
    body = parse_body(await request.body(), chat)
    job = self.job(body, chat)
    run = EngineRun(self.engine, job)
    streaming = False
    self.active += 1
    try:
      first = await run.next(request)
      failure = self.failure(first) if run.finished else None
      if failure:
        raise failure
      if not run.finished:
        self.metrics.first_block.observe(time.perf_counter() - arrived)
      if not job.stream:
        return await self.whole(job, run, chat, first, arrived, request)
      streaming = True
      return event_stream(self.stream(job, run, chat, first, arrived), self._closer(run))
    finally:
      if not streaming:  # a stream releases its run and count when it ends
        run.cancel()
        self.active -= 1

  def _closer(self, run: EngineRun):
    done = [False]

    def close():
      run.cancel()
      if not done[0]:
        done[0] = True
        self.active -= 1

    return close

  async def whole(self, job: Job, run: EngineRun, chat: bool, event, arrived: float, request):
    from dmax_jax.serving import BlockEvent  # pylint: disable=import-outside-toplevel
    from fastapi.responses import JSONResponse  # pylint: disable=import-outside-toplevel

    text = TextTracker(self.tokenizer.decode, job.stops)
    nfe = 0
    while True:
      if isinstance(event, BlockEvent):
        text.add(event.tokens)
        nfe = event.nfe
        if text.stopped:
          run.cancel()
          reason = "stop"
          break
      else:
        if self.failure(event):
          raise self.failure(event)
        text.finish(event.tokens)
        nfe, reason = event.nfe, ("stop" if text.stopped else event.finish_reason)
        break
      event = await run.next(request)
    self.finished(arrived, len(text.tokens), nfe)
    choice = {"index": 0, **({"message": {"role": "assistant", "content": text.text}} if chat else {"text": text.text}),
              "finish_reason": reason, "logprobs": None}
    if job.return_token_ids:
      choice["token_ids"] = list(text.tokens)
    return JSONResponse({"id": _new_id(chat), "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.model_name, "choices": [choice],
                         "usage": self.usage(job, len(text.tokens), nfe)})

  async def stream(self, job: Job, run: EngineRun, chat: bool, event, arrived: float):
    """The SSE chunks of a streamed reply, from the first event on; a failure ends it with an error chunk."""
    try:
      async for chunk in self._chunks(job, run, chat, event, arrived):
        yield chunk
    except Exception as e:  # pylint: disable=broad-except
      run.cancel()
      yield sse(server_error(f"internal error: {type(e).__name__}: {e}").body())
      yield b"data: [DONE]\n\n"

  async def _chunks(self, job: Job, run: EngineRun, chat: bool, event, arrived: float):
    from dmax_jax.serving import BlockEvent  # pylint: disable=import-outside-toplevel

    head = {"id": _new_id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name}
    extra = {"usage": None} if job.include_usage else {}
    text = TextTracker(self.tokenizer.decode, job.stops)
    role = [chat]

    def chunk(delta: str, token_ids: list[int], reason=None, **top):
      if chat:
        d = {"role": "assistant", "content": delta} if role[0] else ({"content": delta} if reason is None else {})
        role[0] = False
        choice = {"index": 0, "delta": d}
      else:
        choice = {"index": 0, "text": delta}
      choice.update(finish_reason=reason, logprobs=None)
      if job.return_token_ids:
        choice["token_ids"] = token_ids
      return sse({**head, "choices": [choice], **extra, **top})

    nfe = 0
    while True:
      if isinstance(event, BlockEvent):
        seen = len(text.tokens)
        delta = text.add(event.tokens)
        nfe = event.nfe
        yield chunk(delta, text.tokens[seen:])
        if text.stopped:
          run.cancel()
          reason = "stop"
          break
      else:
        failure = self.failure(event)
        if failure:
          yield sse(failure.body())
          yield b"data: [DONE]\n\n"
          return
        seen = len(text.tokens)
        delta = text.finish(event.tokens)
        nfe, reason = event.nfe, ("stop" if text.stopped else event.finish_reason)
        if delta or len(text.tokens) > seen:
          yield chunk(delta, text.tokens[seen:])
        break
      event = await run.next()
    self.finished(arrived, len(text.tokens), nfe)
    yield chunk("", [], reason, nfe=nfe)
    if job.include_usage:
      yield sse({**head, "choices": [], "usage": self.usage(job, len(text.tokens), nfe)})
    yield b"data: [DONE]\n\n"

  def health(self) -> tuple[int, dict]:
    s = self.engine.stats()
    status = "ok" if self.accepting else "shutting_down"
    return (200 if self.accepting else 503), {"status": status, "model": self.model_name, "slots": s["slots"],
                                               "running": s["running"], "queue_depth": s["queue_depth"]}

  def model_card(self) -> dict:
    return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dmax_jax"}


def _new_id(chat: bool) -> str:
  return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def create_app(engine, tokenizer, *, model_name: str, api_key: Optional[str] = None, strategy: str = "spd",
               threshold: Optional[float] = None, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
               strategies: Optional[Sequence[str]] = None):
  """The FastAPI app serving ``engine`` (a started ``dmax_jax.serving.Engine``) under ``model_name``.

  ``strategy``, ``threshold``, ``max_tokens``, ``temperature`` and ``seed`` are the defaults of requests that
  do not give them; ``strategies`` the names a request may pick (default: the decoding registry's). With
  ``api_key``, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer api_key``. ``app.state.service`` is
  the ``Service`` (``accepting = False`` makes new requests 503; ``active`` counts unfinished replies).
  """
  from fastapi import FastAPI, Request  # pylint: disable=import-outside-toplevel
  from fastapi.responses import JSONResponse, Response  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

  if strategies is None:
    from dmax_jax import decoding  # pylint: disable=import-outside-toplevel

    strategies = tuple(decoding.STRATEGIES)
  defaults = Defaults(strategy, threshold, max_tokens, temperature, seed)
  service = Service(engine, tokenizer, model_name=model_name, api_key=api_key, defaults=defaults,
                    strategies=strategies)
  app = FastAPI(title="dmax_jax", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.service = service
  app.add_middleware(_CountRequests, counter=service.metrics.requests)

  @app.exception_handler(ApiError)
  async def api_error(_request, exc: ApiError):
    return exc.response()

  @app.exception_handler(HTTPException)
  async def http_error(_request, exc: HTTPException):
    code = "not_found" if exc.status_code == 404 else ("method_not_allowed" if exc.status_code == 405 else None)
    return ApiError(exc.status_code, str(exc.detail), param=None, code=code, headers=exc.headers).response()

  async def guarded(call):
    try:
      return await call()
    except ApiError:
      raise
    except ClientGone:
      return Response(status_code=499)  # nobody reads it; counted as nginx's "client closed request"
    except Exception as e:  # pylint: disable=broad-except
      return server_error(f"internal error: {type(e).__name__}: {e}").response()

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await guarded(lambda: service.complete(request, chat=False))

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await guarded(lambda: service.complete(request, chat=True))

  @app.get("/v1/models")
  async def models(request: Request):
    service.check_key(request)
    return {"object": "list", "data": [service.model_card()]}

  @app.get("/v1/models/{model:path}")
  async def model(request: Request, model: str):
    service.check_key(request)
    service.check_model(model)
    return service.model_card()

  @app.get("/health")
  async def health():
    status, body = service.health()
    return JSONResponse(body, status_code=status)

  @app.get("/metrics")
  async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST  # pylint: disable=import-outside-toplevel

    service.check_key(request)
    return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

  return app


# ---------------------------------------------------------------- running the server

class QuietServer:
  """uvicorn's ``Server`` with its signal handling left to the caller (``serve_forever`` drains on SIGTERM)."""

  @staticmethod
  def make(app, *, graceful_s: float = 5.0):
    import uvicorn  # pylint: disable=import-outside-toplevel

    class _Server(uvicorn.Server):
      @contextlib.contextmanager
      def capture_signals(self):  # uvicorn >= 0.29: ours, not uvicorn's (which would re-raise SIGTERM at exit)
        yield

      def install_signal_handlers(self):  # older uvicorn
        pass

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(1, int(graceful_s)))
    return _Server(config)


def listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket on ``host:port`` (port 0: a free one); UsageError if it cannot be had."""
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    sock.setblocking(False)
  except OSError as e:
    raise runner.UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
  return sock


def url_of(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://{f'[{host}]' if ':' in host else host}:{port}"


async def serve_forever(server, sock: socket.socket, service: Service, engine, *, grace_s: float,
                        ready: Callable[[], None], stop: Optional[asyncio.Event] = None) -> int:
  """Serves until SIGTERM / SIGINT (or ``stop`` is set): then answers 503 to new requests, lets running ones
  finish for up to ``grace_s`` seconds (a second signal: at once), cancels what is left, shuts the engine
  down and returns 0."""
  loop = asyncio.get_running_loop()
  stop = stop or asyncio.Event()
  hurry = asyncio.Event()

  def on_signal():
    (hurry if stop.is_set() else stop).set()

  with contextlib.ExitStack() as signals:
    for sig in (signal.SIGTERM, signal.SIGINT):
      with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(sig, on_signal)
        signals.callback(loop.remove_signal_handler, sig)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
      await asyncio.sleep(0.02)
    if serving.done():
      serving.result()
      return 1
    ready()
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
    service.accepting = False
    deadline = loop.time() + grace_s
    while service.active and loop.time() < deadline and not hurry.is_set() and not serving.done():
      await asyncio.sleep(0.05)
    await loop.run_in_executor(None, lambda: engine.shutdown(cancel=True))
    deadline = loop.time() + 5.0  # the cancelled requests' replies
    while service.active and loop.time() < deadline and not serving.done():
      await asyncio.sleep(0.05)
    server.should_exit = True
    stopped.cancel()
    await serving
  return 0


def serve_parser() -> argparse.ArgumentParser:
  from dmax_jax import decoding  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps import cli  # pylint: disable=import-outside-toplevel

  p = argparse.ArgumentParser(
      prog="serve.py", description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions) decoding "
      "with continuous batching over slots, one block at a time.",
      epilog="Requests may set the DMax fields \"strategy\" and \"threshold\" (defaults below) and "
             "\"return_token_ids\". SIGTERM: stop admitting, finish running requests, exit 0.")
  cli.add_model_args(p)
  p.add_argument("--model-name", default=None, help="the served model's name (default: the checkpoint folder's name)")
  p.add_argument("--strategy", default="spd", choices=tuple(decoding.STRATEGIES), help="default strategy (spd)")
  p.add_argument("--threshold", type=float, default=None,
                 help="default threshold of --strategy (default: 0.5 spd, 0.95 threshold)")
  p.add_argument("--gen-length", type=int, default=256, help="max_tokens of requests that give none (default 256)")
  p.add_argument("--temperature", type=float, default=0.0, help="temperature of requests that give none (0 = greedy)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed of requests that give none (default 0)")
  p.add_argument("--moe-backends", default="auto",
                 help="the MoE backend by slot bucket, e.g. 1:pallas,32:grouped (buckets of 32 slots and more run "
                      "grouped); auto (default): with the Pallas kernels, grouped from 32 slots up where tokamax is "
                      "installed (BENCHMARKS.md), else the --kernels backend everywhere")
  p.add_argument("--slot-buckets", default=None,
                 help="slot counts compiled, e.g. 1,8,64 (default: powers of 4 below --max-slots, and --max-slots)")
  p.add_argument("--steps-per-launch", type=int, default=8,
                 help="device steps between two looks at the queue when no block commits (default 8)")
  p.add_argument("--random-weights", action="store_true",
                 help="benchmarks only: random weights of the checkpoint's config.json (its tokenizer) instead of its "
                      "weights")
  p.add_argument("--routing", default="learned", choices=("learned", "uniform"),
                 help="benchmarks only: uniform = uniform random top-k experts per token (as a trained router "
                      "touches), with --random-weights")
  p.add_argument("--max-slots", type=int, default=8, help="requests decoded at once (default 8)")
  p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default 256)")
  p.add_argument("--window", type=int, default=None,
                 help="prompt + max_tokens a request may use, in tokens (default: 2048 less one block, at most the model's positions)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
  p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
  p.add_argument("--api-key", default=os.environ.get("DMAX_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $DMAX_API_KEY, else none)")
  p.add_argument("--mesh", default="", help="split the weights over a device mesh, e.g. expert=8 or expert=4,tensor=2")
  p.add_argument("--shutdown-grace", type=float, default=30.0,
                 help="seconds running requests get to finish after SIGTERM before they are cancelled (default 30)")
  return p


def _check_args(args):
  from dmax_jax.apps import cli, runner  # pylint: disable=import-outside-toplevel

  cli.check_positive(args, "gen_length", "max_slots", "max_queue", "steps_per_launch")
  cli.check_model_args(args)
  if args.window is not None and args.window <= 0:
    raise runner.UsageError(f"--window must be positive, got {args.window}")
  if not 0.0 <= args.temperature <= 2.0:
    raise runner.UsageError(f"--temperature must lie in [0, 2], got {args.temperature}")
  if not 0 <= args.seed < 2**32:
    raise runner.UsageError(f"--seed must lie in [0, 2**32), got {args.seed}")
  if not 0 <= args.port < 65536:
    raise runner.UsageError(f"--port must lie in [0, 65535], got {args.port}")
  if args.shutdown_grace < 0:
    raise runner.UsageError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
  if args.api_key is not None and not args.api_key.strip():
    raise runner.UsageError("--api-key must not be empty")


def strategy_templates(default: str, threshold: Optional[float], confidence_stop: float, temperature: float,
                       k: Optional[int] = None) -> dict:
  """One strategy per registry name, built from the command line like decode.py's (``threshold`` for ``default``
  only: the others keep their own; a request's threshold replaces it)."""
  from dmax_jax import decoding  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise runner.UsageError(f"--threshold must lie in [0, 1], got {threshold}")
  return {name: runner.make_strategy(name, threshold if name == default else None, confidence_stop, temperature, k)
          for name in decoding.STRATEGIES}


def slot_counts(text: Optional[str], max_slots: int) -> Optional[tuple]:
  """``--slot-buckets``: increasing positive counts ending at ``max_slots`` (None: the engine's default)."""
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  if text is None:
    return None
  try:
    counts = tuple(sorted({int(t) for t in text.split(",")}))
  except ValueError:
    counts = ()
  if not counts or counts[0] < 1 or counts[-1] != max_slots:
    raise runner.UsageError(f"--slot-buckets {text}: positive slot counts, the largest --max-slots ({max_slots})")
  return counts


def moe_backends(text: str, config) -> tuple:
  """``--moe-backends``: ((fewest slots, backend), ...) for ``EngineConfig.moe_backends``."""
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel
  from dmax_jax.model import moe  # pylint: disable=import-outside-toplevel
  from dmax_jax.model.config import MOE_BACKENDS  # pylint: disable=import-outside-toplevel

  if text == "auto":
    large = config.moe_backend == "pallas" and moe.tokamax_module() is not None
    return ((32, "grouped"),) if large else ()
  out = []
  for part in text.split(","):
    size, _, backend = part.partition(":")
    if not size.strip().isdigit() or int(size) < 1 or backend not in MOE_BACKENDS:
      raise runner.UsageError(f"--moe-backends: {part!r} is not SLOTS:BACKEND (backends: {', '.join(MOE_BACKENDS)})")
    out.append((int(size), backend))
  return tuple(out)


def parse_mesh(text: str):
  """A device mesh from ``expert=8,tensor=2``; UsageError names the problem."""
  from dmax_jax import sharding  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  try:
    axes = {}
    for part in text.split(","):
      name, _, size = part.partition("=")
      axes[name.strip()] = int(size)
    unknown = set(axes) - set(sharding.AXES)
    if unknown:
      raise ValueError(f"unknown axis {sorted(unknown)[0]!r} (axes: {', '.join(sharding.AXES)})")
    return sharding.make_mesh(axes)
  except (ValueError, sharding.MeshError) as e:
    raise runner.UsageError(f"--mesh {text}: {e}") from None


def _serve(args) -> int:
  import jax  # pylint: disable=import-outside-toplevel

  _check_args(args)
  try:
    import fastapi, prometheus_client, uvicorn  # noqa: F401  pylint: disable=import-outside-toplevel,multiple-imports,unused-import
  except ImportError as e:
    from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

    raise runner.UsageError(f"serve.py needs the serve extra ({e}): pip install -e '.[serve]'") from None

  from dmax_jax import sharding  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel
  from dmax_jax.serving import Engine, EngineConfig  # pylint: disable=import-outside-toplevel
  from dmax_jax.tokenizer import ChatTemplateError, TemplateRaised  # pylint: disable=import-outside-toplevel

  if args.dtype == "float64":
    jax.config.update("jax_enable_x64", True)  # before anything is traced, for the whole process
  strategies = strategy_templates(args.strategy, args.threshold, args.confidence_stop, args.temperature, args.k)
  mesh = parse_mesh(args.mesh) if args.mesh else None
  sock = listen(args.host, args.port)  # before the model loads: a taken port fails at once
  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  if args.random_weights:
    from dmax_jax.apps.random_model import random_model  # pylint: disable=import-outside-toplevel

    config, params, tokenizer = random_model(args.checkpoint, args.dtype, args.kernels, args.routing)
  else:
    config, params, tokenizer = runner.load_model(args.checkpoint, args.dtype, args.kernels)
  try:
    tokenizer.render_chat([{"role": "user", "content": "hi"}])
  except TemplateRaised:
    pass  # the template refuses this conversation, not every one
  except ChatTemplateError as e:
    raise runner.UsageError(str(e)) from None
  if mesh is not None:
    try:
      params = jax.device_put(params, sharding.tree_shardings(mesh, params))
    except ValueError as e:
      raise runner.UsageError(f"--mesh {args.mesh}: {e}") from None
  try:
    engine = Engine(params, config, strategies, config=EngineConfig(
        block_length=args.block_length, max_slots=args.max_slots, max_queue=args.max_queue, window=args.window,
        steps_per_launch=args.steps_per_launch, moe_backends=moe_backends(args.moe_backends, config),
        slot_buckets=slot_counts(args.slot_buckets, args.max_slots)))
  except ValueError as e:
    raise runner.UsageError(str(e)) from None
  say(f"compiling for {args.max_slots} slots, blocks of {args.block_length}, window {engine.window} "
      "(this takes a while)")
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    engine.start()
    app = create_app(engine, tokenizer, model_name=name, api_key=args.api_key, strategy=args.strategy,
                     threshold=args.threshold, max_tokens=args.gen_length, temperature=args.temperature,
                     seed=args.seed, strategies=tuple(strategies))
    server = QuietServer.make(app)
    banner = f"serving {name} on {url_of(sock)} (slots {args.max_slots}, window {engine.window})"
    try:
      code = asyncio.run(serve_forever(server, sock, app.state.service, engine, grace_s=args.shutdown_grace,
                                       ready=lambda: say(banner)))
    finally:
      engine.shutdown(cancel=True)
  say("stopped")
  return code


def say(line: str):
  print(line, file=sys.stderr, flush=True)


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
  """``serve.py``'s entry point; returns the exit code (2: bad flags or checkpoint, one ``error:`` line)."""
  from dmax_jax.apps.cli import run_cli  # pylint: disable=import-outside-toplevel

  return run_cli(_serve, serve_parser(), argv)
