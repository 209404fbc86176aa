"""serve.py's HTTP front end against a live server: the real engine on the tiny checkpoint, 4 slots.

One in-process server per module (``serve_fixtures.start_server``); the SIGTERM test runs ``python serve.py``
as a subprocess, started with the module so that it compiles while the in-process server does.
"""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import serve_fixtures
from conftest import REPO
from dmax_jax.apps import serve
from dmax_jax.apps.serve import TextTracker, create_app
from dmax_jax.serving import BlockEvent, FinishEvent
from tiny_ckpt import make_checkpoint

BLOCK, SLOTS, WINDOW = 8, 4, 64
MODEL = serve_fixtures.MODEL_NAME


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def sigterm_server(ckpt):
  """``python serve.py`` in a subprocess (one slot), started before the in-process server compiles."""
  proc = subprocess.Popen(
      [sys.executable, "serve.py", "--checkpoint", ckpt, "--port", "0", "--max-slots", "1", "--block-length",
       str(BLOCK), "--window", str(WINDOW), "--kernels", "xla", "--model-name", "sub"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def live(ckpt, sigterm_server):
  del sigterm_server  # compiling beside us
  url, engine, stop = serve_fixtures.start_server(ckpt, block_length=BLOCK, max_slots=SLOTS, window=WINDOW,
                                                  slot_buckets=(SLOTS,))
  yield url, engine
  stop()


@pytest.fixture(scope="module")
def url(live):
  return live[0]


@pytest.fixture(scope="module")
def engine(live):
  return live[1]


@pytest.fixture(scope="module")
def tokenizer(ckpt):
  from dmax_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def wait_idle(engine, timeout_s=10.0):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    s = engine.stats()
    if s["running"] == 0 and s["queue_depth"] == 0:
      return True
    time.sleep(0.01)
  return False


# ---------------------------------------------------------------- the text of a stream

def _bytes_decode(ids):
  return bytes(ids).decode("utf-8", errors="replace")


def test_text_tracker_holds_back_stop_prefixes_and_incomplete_characters():
  t = TextTracker(_bytes_decode, ["END", "XY"])
  assert t.add(list(b"ab")) == "ab"
  assert t.add(list(b"cE")) == "c"  # "E" may start "END"
  assert t.add(list(b"Nx")) == "ENx"  # it did not
  euro = list("\u20ac".encode())
  assert t.add(euro[:2]) == ""  # an incomplete character waits
  assert t.add(euro[2:] + list(b"X")) == "\u20ac"  # and "X" may start "XY"
  assert t.add(list(b"!")) == "X!"
  assert t.add(list(b"qqENDrest")) == "qq" and t.stopped
  assert t.text == "abcENx\u20acX!qq" and _bytes_decode(t.tokens) == "abcENx\u20acX!qqEND"  # up to the completing token
  assert t.add(list(b"more")) == "" and t.finish() == ""


def test_text_tracker_finish_releases_what_was_held():
  t = TextTracker(_bytes_decode, ["END"])
  assert t.add(list(b"xEN")) == "x"
  assert t.finish(list(b"xEN")) == "EN" and not t.stopped
  t = TextTracker(_bytes_decode, [])
  assert t.add(list(b"a\xe2")) == "a"
  assert t.finish(list(b"a\xe2")) == "\ufffd"  # what decoding the whole generation gives


def test_text_tracker_cuts_a_stop_spanning_blocks():
  t = TextTracker(_bytes_decode, ["STOP"])
  assert t.add(list(b"aST")) == "a"
  assert t.add(list(b"OPb")) == "" and t.stopped and t.text == "a" and bytes(t.tokens) == b"aSTOP"


# ---------------------------------------------------------------- happy paths (the official client)

def test_completion_stream_and_whole_agree(client, tokenizer, engine):
  kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=20, extra_body={"return_token_ids": True})
  whole = client.completions.create(**kw)
  (choice,) = whole.choices
  ids = choice.model_extra["token_ids"]
  assert whole.object == "text_completion" and whole.model == MODEL and whole.id.startswith("cmpl-")
  assert choice.text == tokenizer.decode(ids) and choice.finish_reason in ("stop", "length")
  assert choice.logprobs is None and 0 < len(ids) <= 20
  usage = whole.usage
  assert usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
  assert usage.completion_tokens == len(ids) and usage.total_tokens == usage.prompt_tokens + len(ids)
  assert usage.model_extra["nfe"] >= 1

  chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
  *blocks, final, usage_chunk = chunks
  assert "".join(c.choices[0].text for c in blocks) == choice.text
  assert [t for c in blocks for t in c.choices[0].model_extra["token_ids"]] == ids
  assert all(c.choices[0].finish_reason is None for c in blocks) and 1 <= len(blocks) <= -(-(20 + 8) // BLOCK)
  assert final.choices[0].finish_reason == choice.finish_reason and final.choices[0].text == ""
  assert final.model_extra["nfe"] == usage.model_extra["nfe"]
  assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == usage.model_dump()
  assert wait_idle(engine)


def test_chat_renders_the_template_like_decode_py(client, tokenizer, engine):
  messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": "how are you?"}]
  whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                         extra_body={"return_token_ids": True})
  (choice,) = whole.choices
  assert whole.object == "chat.completion" and choice.message.role == "assistant"
  assert choice.message.content == tokenizer.decode(choice.model_extra["token_ids"])
  rendered = tokenizer.encode("<role>HUMAN</role>hello<|role_end|><role>ASSISTANT</role>hi<|role_end|>"
                              "<role>HUMAN</role>how are you?<|role_end|><role>ASSISTANT</role>")
  assert whole.usage.prompt_tokens == len(rendered)

  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
  assert chunks[-1].choices[0].finish_reason == choice.finish_reason and chunks[-1].usage is None
  assert chunks[-1].model_extra["nfe"] == whole.usage.model_extra["nfe"]
  assert wait_idle(engine)


def test_stop_strings_cut_the_text_and_free_the_slot(client, tokenizer, engine):
  base = dict(model=MODEL, prompt="hello there", max_tokens=40, extra_body={"return_token_ids": True})
  full = client.completions.create(**base).choices[0]
  text = full.text
  assert len(text) >= 6, text
  stop = text[4:6]
  want = text[:text.index(stop)]
  cut = client.completions.create(stop=[stop, "\u2603never"], **base)
  c = cut.choices[0]
  assert c.text == want and c.finish_reason == "stop"
  ids = c.model_extra["token_ids"]
  assert ids == full.model_extra["token_ids"][:len(ids)] and cut.usage.completion_tokens == len(ids)
  assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])  # up to the completing token
  streamed = list(client.completions.create(stop=stop, stream=True, **base))
  assert "".join(s.choices[0].text for s in streamed) == want
  assert all(stop not in s.choices[0].text for s in streamed) and streamed[-1].choices[0].finish_reason == "stop"
  assert wait_idle(engine)


def test_max_tokens_defaults_to_gen_length_cut_to_the_window(client):
  assert client.completions.create(model=MODEL, prompt="hello").usage.completion_tokens <= 16  # --gen-length
  ids = list(range(1, WINDOW - 3))  # room for 4 tokens
  out = client.completions.create(model=MODEL, prompt=ids, extra_body={"return_token_ids": True})
  assert out.usage.prompt_tokens == len(ids) and 1 <= out.usage.completion_tokens <= 4


def test_models_and_health(client, url):
  assert [m.id for m in client.models.list().data] == [MODEL]
  assert client.models.retrieve(MODEL).id == MODEL
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("other")
  r = httpx.get(url + "/health")
  assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["slots"] == SLOTS


def test_metrics_parse_as_prometheus_text(url, client):
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=import-outside-toplevel

  client.completions.create(model=MODEL, prompt="hello", max_tokens=8)
  httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ""})
  r = httpx.get(url + "/metrics")
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
  families = {f.name: f for f in text_string_to_metric_families(r.text)}
  for name, kind in [("dmax_requests", "counter"), ("dmax_queue_depth", "gauge"), ("dmax_running_slots", "gauge"),
                     ("dmax_generated_tokens", "counter"), ("dmax_forwards", "counter"),
                     ("dmax_tokens_per_forward", "gauge"), ("dmax_time_to_first_block_seconds", "histogram"),
                     ("dmax_request_latency_seconds", "histogram")]:
    assert families[name].type == kind, name
  requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["dmax_requests"].samples
              if s.name == "dmax_requests_total"}
  assert requests[("/v1/completions", "200")] >= 1 and requests[("/v1/completions", "400")] >= 1
  tpf = families["dmax_tokens_per_forward"].samples[0].value
  assert tpf > 0
  assert [s.value for s in families["dmax_running_slots"].samples] == [0]


# ---------------------------------------------------------------- bad input

def _error(r, status, param=None, code=None):
  assert r.status_code == status, r.text
  body = r.json()
  assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
  assert body["error"]["message"]
  assert body["error"]["param"] == param, body
  if code is not None:
    assert body["error"]["code"] == code, body
  return body["error"]


OK = {"model": MODEL, "prompt": "hello", "max_tokens": 8}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,param,code", [
    ("/v1/completions", {**OK, "bogus": 1}, "bogus", "unknown_field"),
    ("/v1/completions", {**OK, "max_tokens": "8"}, "max_tokens", "invalid_type"),
    ("/v1/completions", {**OK, "max_tokens": 8.5}, "max_tokens", "invalid_type"),
    ("/v1/completions", {**OK, "prompt": 5}, "prompt", "invalid_type"),
    ("/v1/completions", {**OK, "prompt": ["hello"]}, "prompt", "invalid_type"),
    ("/v1/completions", {**OK, "stream": "yes"}, "stream", "invalid_type"),
    ("/v1/completions", {**OK, "stop": [1]}, "stop", "invalid_type"),
    ("/v1/completions", {**OK, "temperature": "hot"}, "temperature", "invalid_type"),
    ("/v1/completions", {**OK, "return_token_ids": 1}, "return_token_ids", "invalid_type"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True, "x": 1}}, "stream_options", None),
    ("/v1/completions", {"prompt": "hello"}, "model", "missing_field"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "prompt": "hi"}, "prompt", "unknown_field"),
    ("/v1/completions", {**OK, "max_completion_tokens": 8}, "max_completion_tokens", "unknown_field"),
    ("/v1/completions", {**OK, "prompt": ""}, "prompt", None),
    ("/v1/completions", {**OK, "prompt": "   "}, "prompt", None),
    ("/v1/completions", {**OK, "prompt": []}, "prompt", None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": ""}]}, "messages", None),
    ("/v1/completions", {**OK, "prompt": [1, 2, 100000]}, "prompt", None),
    ("/v1/completions", {**OK, "prompt": list(range(1, WINDOW + 2))}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**OK, "max_tokens": WINDOW}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": WINDOW}, "max_completion_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens", None),
    ("/v1/completions", {**OK, "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", {**OK, "n": 2}, "n", None),
    ("/v1/completions", {**OK, "top_p": 0.5}, "top_p", None),
    ("/v1/completions", {**OK, "presence_penalty": 1.0}, "presence_penalty", None),
    ("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ("/v1/completions", {**OK, "stop": ""}, "stop", None),
    ("/v1/completions", {**OK, "temperature": 3.0}, "temperature", None),
    ("/v1/completions", {**OK, "seed": -1}, "seed", None),
    ("/v1/completions", {**OK, "strategy": "beam"}, "strategy", None),
    ("/v1/completions", {**OK, "threshold": 1.5}, "threshold", None),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, "stream_options", None),
])
def test_bad_requests_are_400_naming_the_field(url, path, body, param, code):
  err = _error(httpx.post(url + path, json=body), 400, param, code)
  assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies_are_400(url, raw):
  _error(httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"}), 400,
         None, "invalid_json")


def test_accepted_neutral_fields(client):
  out = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, n=1, top_p=1, user="me",
                                  frequency_penalty=0, presence_penalty=0, seed=3, temperature=0)
  assert out.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_and_path_are_404(url, client):
  err = _error(httpx.post(url + "/v1/completions", json={**OK, "model": "gpt-5"}), 404, "model", "model_not_found")
  assert "tiny" in err["message"]
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
  _error(httpx.get(url + "/v1/nothing"), 404, None, "not_found")
  _error(httpx.get(url + "/v1/completions"), 405, None, "method_not_allowed")


# ---------------------------------------------------------------- keys, queue, failures

@pytest.fixture(scope="module")
def keyed(engine, tokenizer):
  """A second app over the same engine that needs a key."""
  url, stop = serve_fixtures.serve_app(create_app(engine, tokenizer, model_name=MODEL, api_key="sesame"))
  yield url
  stop()


def test_api_key(keyed):
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
    _error(httpx.post(keyed + "/v1/completions", json=OK, headers=headers), 401, None, "invalid_api_key")
    _error(httpx.get(keyed + "/v1/models", headers=headers), 401, None, "invalid_api_key")
    _error(httpx.get(keyed + "/metrics", headers=headers), 401, None, "invalid_api_key")
  assert httpx.get(keyed + "/health").status_code == 200
  assert httpx.get(keyed + "/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0).models.list()
  good = openai.OpenAI(base_url=keyed + "/v1", api_key="sesame", max_retries=0)
  assert good.completions.create(model=MODEL, prompt="hello", max_tokens=4).usage.completion_tokens >= 1


def test_queue_full_is_429_with_retry_after(ckpt, tokenizer):
  """An engine whose scheduler never started, with room for one waiting request: the second is refused."""
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel
  from dmax_jax.serving import Engine, EngineConfig  # pylint: disable=import-outside-toplevel

  config, params, _ = runner.load_model(ckpt, "float32", "xla")
  idle = Engine(params, config, serve.strategy_templates("spd", None, 0.9, 0.0),
                config=EngineConfig(block_length=BLOCK, max_slots=1, max_queue=1, window=WINDOW))
  cancelled = []
  cancel = idle.cancel
  idle.cancel = lambda h: (cancelled.append(h), cancel(h))
  url, stop = serve_fixtures.serve_app(create_app(idle, tokenizer, model_name=MODEL))
  try:
    def wait():
      with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=OK, timeout=1.0)

    waiting = threading.Thread(target=wait)
    waiting.start()
    deadline = time.monotonic() + 5
    while idle.stats()["queue_depth"] < 1 and time.monotonic() < deadline:
      time.sleep(0.01)
    r = httpx.post(url + "/v1/completions", json=OK)
    err = _error(r, 429, None, "queue_full")
    assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
      openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(**OK)
    waiting.join()
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:  # its client gave up: the app cancels it
      time.sleep(0.01)
    assert len(cancelled) == 1
  finally:
    stop()


class _Faulty:
  """The engine, except that prompts holding a marked token fail in the engine (an error FinishEvent, after
  one block when ``late``) and never reach it."""

  def __init__(self, engine, mark: int, late: bool = False):
    self._engine, self.mark, self.late = engine, mark, late

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def submit(self, prompt_ids, *, on_event, **kw):
    if self.mark not in prompt_ids:
      return self._engine.submit(prompt_ids, on_event=on_event, **kw)

    def fail():
      time.sleep(0.05)
      if self.late:
        on_event(BlockEvent(tokens=[5, 6], nfe=3))
      on_event(FinishEvent(finish_reason="error", tokens=[5, 6] if self.late else [], nfe=3,
                           error="RuntimeError: injected"))

    threading.Thread(target=fail, daemon=True).start()
    return object()

  def cancel(self, handle):
    if type(handle) is not object:  # pylint: disable=unidiomatic-typecheck  (object(): a failing request's handle)
      self._engine.cancel(handle)


def test_a_request_failing_in_the_engine_is_500_and_others_go_on(engine, tokenizer):
  """The app's side: an error FinishEvent (before any block) is a 500, streaming or not."""
  mark = tokenizer.encode("fox")[0]
  url, stop = serve_fixtures.serve_app(create_app(_Faulty(engine, mark), tokenizer, model_name=MODEL))
  try:
    results = {}

    def post(name, prompt, **kw):
      results[name] = httpx.post(url + "/v1/completions", json={**OK, "prompt": prompt, "max_tokens": 24, **kw},
                                 timeout=30)

    threads = [threading.Thread(target=post, args=("bad", "fox fox")),
               threading.Thread(target=post, args=("good", "hello there")),
               threading.Thread(target=post, args=("bad_stream", "fox", ), kwargs={"stream": True})]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    err = _error(results["bad"], 500, None, "engine_error")
    assert err["type"] == "server_error" and "injected" in err["message"]
    _error(results["bad_stream"], 500, None, "engine_error")  # failed before its first block: still a 500
    assert results["good"].status_code == 200 and results["good"].json()["usage"]["completion_tokens"] >= 1
  finally:
    stop()


def test_a_request_failing_in_the_real_engine_is_500_and_others_go_on(url, engine, tokenizer, monkeypatch):
  """The engine's own failure path: planning a marked request's slot raises in the engine's thread."""
  mark = tokenizer.encode("fox")[0]
  plan = engine._plan  # pylint: disable=protected-access

  def failing(h):
    if mark in h.ids:
      raise RuntimeError("injected in the engine")
    return plan(h)

  monkeypatch.setattr(engine, "_plan", failing)
  results = {}

  def post(name, prompt, **kw):
    results[name] = httpx.post(url + "/v1/completions", json={**OK, "prompt": prompt, "max_tokens": 24, **kw},
                               timeout=30)

  threads = [threading.Thread(target=post, args=("bad", "fox fox")), threading.Thread(target=post, args=("good", "hi")),
             threading.Thread(target=post, args=("bad_stream", "fox"), kwargs={"stream": True})]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for name in ("bad", "bad_stream"):
    err = _error(results[name], 500, None, "engine_error")
    assert "injected in the engine" in err["message"]
  assert results["good"].status_code == 200 and results["good"].json()["usage"]["completion_tokens"] >= 1
  assert wait_idle(engine)


def test_a_stream_failing_after_its_first_block_ends_with_an_error_chunk(engine, tokenizer):
  mark = tokenizer.encode("fox")[0]
  url, stop = serve_fixtures.serve_app(create_app(_Faulty(engine, mark, late=True), tokenizer, model_name=MODEL))
  try:
    r = httpx.post(url + "/v1/completions", json={**OK, "prompt": "fox", "stream": True})
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == tokenizer.decode([5, 6])
    assert json.loads(events[-2])["error"]["code"] == "engine_error"
  finally:
    stop()


def test_an_app_failure_is_500_for_that_request_only(engine, tokenizer):
  class Broken:
    def __getattr__(self, name):
      return getattr(tokenizer, name)

    def encode(self, text):
      if "boom" in text:
        raise RuntimeError("tokenizer exploded")
      return tokenizer.encode(text)

  url, stop = serve_fixtures.serve_app(create_app(engine, Broken(), model_name=MODEL))
  try:
    err = _error(httpx.post(url + "/v1/completions", json={**OK, "prompt": "boom"}), 500)
    assert err["type"] == "server_error" and "tokenizer exploded" in err["message"]
    assert httpx.post(url + "/v1/completions", json=OK).status_code == 200
  finally:
    stop()


# ---------------------------------------------------------------- clients that go away

def _spy_events(engine, monkeypatch, block_s=0.1):
  """Records every request's events (wrapping the engine's submit), taking ``block_s`` of the engine's thread
  per committed block so that a request outlasts its client."""
  seen = []
  submit = engine.submit

  def spying(ids, *, on_event, **kw):
    events = []
    seen.append(events)

    def record(e):
      events.append(e)
      on_event(e)
      if isinstance(e, BlockEvent):
        time.sleep(block_s)

    return submit(ids, on_event=record, **kw)

  monkeypatch.setattr(engine, "submit", spying)
  return seen


LONG = {"model": MODEL, "prompt": "hello", "max_tokens": WINDOW - BLOCK, "strategy": "threshold", "threshold": 1.0}


def test_a_client_leaving_mid_stream_frees_its_slot(url, engine, monkeypatch):
  seen = _spy_events(engine, monkeypatch)
  with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}) as r:
    assert r.status_code == 200
    first = next(r.iter_lines())
    assert first.startswith("data: ")
  assert wait_idle(engine, 5)
  (events,) = seen
  assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"
  assert sum(len(e.tokens) for e in events[:-1]) < LONG["max_tokens"]


def test_a_client_leaving_before_the_reply_frees_its_slot(url, engine, monkeypatch):
  seen = _spy_events(engine, monkeypatch)
  with pytest.raises(httpx.ReadTimeout):
    httpx.post(url + "/v1/completions", json=LONG, timeout=0.3)
  assert wait_idle(engine, 5)
  (events,) = seen
  assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "cancelled"


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("flags,message", [
    (["--threshold", "2"], "--threshold must lie in [0, 1], got 2.0"),
    (["--max-slots", "0"], "--max-slots must be positive, got 0"),
    (["--port", "70000"], "--port must lie in [0, 65535], got 70000"),
    (["--mesh", "bogus=2"], "--mesh bogus=2: unknown axis 'bogus'"),
])
def test_bad_flags_are_one_line_and_exit_2(ckpt, capsys, flags, message):
  assert serve.serve_main(["--checkpoint", ckpt, "--port", "0", *flags]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: {message}"), line


def test_unreadable_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
  assert serve.serve_main(["--checkpoint", str(tmp_path / "none"), "--port", "0"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'none'}: no such checkpoint directory"]


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(sigterm_server):
  """SIGTERM: new requests get 503 while the admitted ones finish; a second SIGTERM cancels what is left (as the
  end of --shutdown-grace does: their replies are 503 "cancelled"); the process exits 0."""
  proc = sigterm_server
  deadline = time.monotonic() + 240
  lines = []
  while time.monotonic() < deadline:
    line = proc.stderr.readline()
    assert line, f"serve.py ended before serving: {''.join(lines)}{proc.stderr.read()}"
    lines.append(line)
    if line.startswith("serving "):
      break
  assert lines[0].startswith("compiling for 1 slots, blocks of 8, window 64"), lines
  assert lines[-1].startswith("serving sub on http://127.0.0.1:") and "(slots 1, window 64)" in lines[-1], lines
  url = lines[-1].split(" on ")[1].split(" ")[0]
  replies = []  # one slot: the requests run one after another, about 0.2 s each (on an idle machine)

  def post():
    replies.append(httpx.post(url + "/v1/completions", json={**LONG, "model": "sub"}, timeout=60))

  threads = [threading.Thread(target=post) for _ in range(12)]
  for t in threads:
    t.start()
  deadline = time.monotonic() + 30
  while httpx.get(url + "/health").json()["queue_depth"] < 6:
    assert time.monotonic() < deadline, "the requests did not queue up"
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  while (health := httpx.get(url + "/health")).status_code == 200:  # until the signal is seen
    assert time.monotonic() < deadline, "SIGTERM was not seen"
    time.sleep(0.005)
  refused = httpx.post(url + "/v1/completions", json={**OK, "model": "sub"})
  while sum(r.status_code == 200 for r in replies) < 2:
    assert time.monotonic() < deadline, "nothing finished after SIGTERM"
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  for t in threads:
    t.join()
  _error(refused, 503, None, "shutting_down")
  assert health.status_code == 503 and health.json()["status"] == "shutting_down"
  done = [r for r in replies if r.status_code == 200]
  assert len(done) >= 2 and all(r.json()["choices"][0]["finish_reason"] == "length" for r in done)
  cancelled = [r for r in replies if r.status_code != 200 and r.json()["error"]["code"] == "cancelled"]
  assert cancelled and all(_error(r, 503, None, "cancelled") for r in cancelled)
  late = [r for r in replies if r not in done and r not in cancelled]  # sent after the first SIGTERM
  assert all(_error(r, 503, None, "shutting_down") for r in late)
  assert proc.wait(60) == 0
  assert proc.stderr.read().strip().splitlines()[-1] == "stopped"
