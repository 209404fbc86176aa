"""tools/bench_serve.py: the SSE parser, the workloads, the statistics, the eval matcher, the client against a fake
server, the static decode's child, random_model; end to end on the tiny checkpoint (slow: serve.py compiles)."""

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, generate_as_cli_batches
from dmax_jax import decoding
from dmax_jax.apps import bench_serve, evaluate, loadgen, runner
from dmax_jax.apps.random_model import random_model, write_bench_checkpoint
from dmax_jax.model import params as params_lib
from dmax_jax.tokenizer import load_tokenizer
from tiny_ckpt import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


# ---------------------------------------------------------------- SSE


def _events(chunks):
  d = loadgen.SSEDecoder()
  out = []
  for c in chunks:
    out += d.feed(c)
  return out + d.close()


def test_sse_decoder_splits_anywhere():
  payloads = [json.dumps({"choices": [{"text": "héllo ✓", "token_ids": [1, 2]}]}, ensure_ascii=False), "[DONE]"]
  stream = b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)
  assert _events([stream]) == payloads
  for cut in range(1, len(stream)):  # every split point, inside multi-byte characters too
    assert _events([stream[:cut], stream[cut:]]) == payloads
  assert _events([bytes([b]) for b in stream]) == payloads


def test_sse_decoder_fields_comments_crlf_and_an_unterminated_event():
  stream = b": keep-alive\r\nevent: message\r\ndata: a\r\ndata:b\r\nid: 7\r\n\r\n\n\ndata: last"
  assert _events([stream]) == ["a\nb", "last"]
  assert _events([b"\n\n: only a comment\n\n"]) == []


def test_apply_event_reads_a_stream_like_serve_py_sends():
  r = loadgen.Response(id=0)
  chunks = [
      {"choices": [{"index": 0, "text": "", "finish_reason": None, "token_ids": []}], "usage": None},  # held back
      {"choices": [{"index": 0, "text": "ab", "finish_reason": None, "token_ids": [5, 6]}], "usage": None},
      {"choices": [{"index": 0, "text": "c", "finish_reason": None, "token_ids": [7]}], "usage": None},
      {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "token_ids": []}], "usage": None, "nfe": 4},
      {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "nfe": 4}},
  ]
  for t, c in enumerate(chunks):
    loadgen.apply_event(r, json.dumps(c), 0.1 * (t + 1))
  assert not r.done
  loadgen.apply_event(r, "[DONE]", 0.6)
  r.latency = 0.6
  assert r.ok and r.tokens == [5, 6, 7] and r.text == "abc" and r.nfe == 4 and r.num_tokens == 3
  assert r.first_chunk == pytest.approx(0.1) and r.ttfb == pytest.approx(0.2) and r.finish_reason == "stop"
  bad = loadgen.Response(id=1)
  loadgen.apply_event(bad, json.dumps({"error": {"message": "boom", "type": "server_error"}}), 0.1)
  loadgen.apply_event(bad, "[DONE]", 0.2)
  assert not bad.ok and bad.error == "boom"
  empty = loadgen.Response(id=2)  # eos at once: no token ids; the first chunk counts
  loadgen.apply_event(empty, json.dumps({"choices": [{"text": "", "finish_reason": "stop", "token_ids": []}]}), 0.3)
  assert empty.ttfb == pytest.approx(0.3)


# ---------------------------------------------------------------- workloads and statistics


def test_synthetic_workload_is_seeded_nested_and_follows_its_distribution():
  kw = dict(vocab=512, exclude=[510, 511], max_tokens=256)
  a = loadgen.synthetic_workload(5000, seed=3, **kw)
  assert a == loadgen.synthetic_workload(5000, seed=3, **kw)
  assert loadgen.synthetic_workload(100, seed=3, **kw) == a[:100]  # levels share their first requests
  assert [r.ids for r in loadgen.synthetic_workload(100, seed=4, **kw)] != [r.ids for r in a[:100]]
  lengths = np.array([len(r.ids) for r in a])
  lo, hi, mean, sd = (loadgen.SYNTHETIC[k] for k in ("low", "high", "mean", "sd"))
  assert lengths.min() >= lo and lengths.max() <= hi
  assert abs(lengths.mean() - mean) < 1.5 and abs(lengths.std() - sd) < 1.5  # clipping at -1.8 sd moves it little
  ids = np.concatenate([r.ids for r in a])
  assert ids.min() >= 0 and ids.max() < 510 and not np.isin(ids, [510, 511]).any()
  assert {r.max_tokens for r in a} == {256}


def test_synthetic_workload_mixed_max_tokens_and_room_in_the_window():
  a = loadgen.synthetic_workload(4000, seed=0, vocab=100, max_tokens=256, min_tokens=64, mixed=True)
  m = np.array([r.max_tokens for r in a])
  assert m.min() == 64 and m.max() == 256 and abs(m.mean() - 160) < 3
  b = loadgen.synthetic_workload(300, seed=0, vocab=100, max_tokens=40, mean=60, sd=30, low=4, high=200,
                                 block_length=8, positions=64)
  assert all(loadgen.fits(len(r.ids), r.max_tokens, 8, 64) for r in b) and max(len(r.ids) for r in b) == 24
  with pytest.raises(ValueError, match="no room"):
    loadgen.synthetic_workload(1, seed=0, vocab=100, max_tokens=60, low=8, block_length=8, positions=64)


def test_data_workload_sends_exactly_evaluates_prompts(ckpt, tmp_path):
  data = tmp_path / "q.jsonl"
  data.write_text("".join(json.dumps(o) + "\n" for o in [
      {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
      {"id": "fox", "question": "The quick brown fox jumps 12 times.", "answer": "#### 12"},
      {"question": "hello there"}]))
  tok = load_tokenizer(ckpt)
  reqs, errors = loadgen.data_workload(str(data), tok, max_tokens=16)
  assert not errors and [r.id for r in reqs] == [1, "fox", 3]
  want, _ = evaluate.read_gsm8k(str(data), tok)  # the third line has no answer: evaluate refuses it
  assert [r.ids for r in reqs[:2]] == [r.ids for r in want]
  assert reqs[2].ids == runner.prompt_from_fields({"question": "hello there"}, tok, math=True)[1]
  assert [r.reference for r in reqs] == ["5", "12", None]
  cycled, _ = loadgen.data_workload(str(data), tok, 5, max_tokens=16)
  assert [r.id for r in cycled] == [1, "fox", 3, "1#1", "fox#1"] and cycled[3].ids == cycled[0].ids


def test_arrival_times():
  assert loadgen.arrival_times(5, math.inf, 0).tolist() == [0.0] * 5
  t = loadgen.arrival_times(20000, 50.0, 1)
  assert t[0] == 0 and np.all(np.diff(t) >= 0) and abs(np.diff(t).mean() - 1 / 50) < 1e-3
  assert np.array_equal(t, loadgen.arrival_times(20000, 50.0, 1))


def test_percentile_hand_computed():
  """Linear interpolation between order statistics: position q/100 * (n - 1) in the sorted list."""
  assert loadgen.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)  # between 2 and 3
  assert loadgen.percentile([10.0, 20.0], 99) == pytest.approx(19.9)
  assert loadgen.percentile([7.0], 99) == 7.0
  assert loadgen.percentile([1.0, 2.0, 3.0], 0) == 1.0 and loadgen.percentile([1.0, 2.0, 3.0], 100) == 3.0
  assert math.isnan(loadgen.percentile([], 50))
  with pytest.raises(ValueError):
    loadgen.percentile([1.0], 101)


def test_parse_metric():
  text = ("# HELP dmax_running_slots slots holding a request\n# TYPE dmax_running_slots gauge\n"
          "dmax_running_slots_total 9.0\ndmax_running_slots 3.0\ndmax_queue_depth 12.0\n")
  assert loadgen.parse_metric(text, "dmax_running_slots") == 3.0
  assert loadgen.parse_metric(text, "dmax_queue_depth") == 12.0 and loadgen.parse_metric(text, "nope") is None


# ---------------------------------------------------------------- comparisons and the table


def _record(ids, tokens, output, settings, reference="5"):
  return {"id": 0, "prompt_hash": runner.prompt_hash(ids), "tokens": tokens, "output": output, "reference": reference,
          "settings": settings}


def test_eval_matcher_picks_the_settings_and_counts():
  spd = {"strategy": "spd", "threshold": 0.5, "confidence_stop": 0.9, "top_k": 1, "temperature": 0.0,
         "gen_length": 4, "block_length": 4}
  mine = dict(spd, checkpoint="/c", dtype="float32")
  reqs = [loadgen.Request(i, [1, 2, i], 4, reference=ref) for i, ref in enumerate(["5", "6", "7", "8", "9"])]
  records = [
      _record([1, 2, 0], [9, 9, 9, 9, 3], "x #### 5", mine),  # longer than max_tokens: compared on its first 4
      _record([1, 2, 1], [4, 4], "#### 6", mine),
      _record([1, 2, 2], [1], "#### 0", mine),
      _record([1, 2, 3], [2], "#### 8", mine),
      _record([1, 2, 0], [0], "#### 5", dict(spd, checkpoint="/c", dtype="bfloat16")),  # another group
      _record([1, 2, 0], [0], "#### 5", dict(mine, threshold=0.9)),  # other strategy settings
  ]
  by_hash, chosen, groups = bench_serve.select_eval_records(records, spd, {"dtype": "float32"})
  assert groups == 2 and chosen == mine and by_hash[runner.prompt_hash([1, 2, 0])]["tokens"] == [9, 9, 9, 9, 3]
  rows = [{"tokens": [9, 9, 9, 9], "text": "#### 4", "error": None},  # same tokens, server text wrong
          {"tokens": [4, 4], "text": "#### 7", "error": None},  # same tokens, text scored as it came
          {"tokens": [2], "text": "#### 7", "error": None},  # differs: server right, eval wrong
          {"tokens": [], "text": "", "error": "HTTP 500"},  # failed
          {"tokens": [1], "text": "#### 9", "error": None}]  # no eval record
  m = bench_serve.compare_eval(reqs, rows, by_hash)
  assert (m["compared"], m["same"], m["differ"], m["server_failed"], m["no_eval_record"]) == (3, 2, 1, 1, 1)
  assert m["differing_ids"] == [2] and m["eval_longer_than_max_tokens"] == 1 and m["scored"] == 3
  assert m["server_accuracy"] == pytest.approx(1 / 3) and m["eval_accuracy"] == pytest.approx(2 / 3)
  args = bench_serve.parser().parse_args(["--checkpoint", "x", "--threshold", "0.5", "--max-tokens", "4",
                                          "--block-length", "4"])
  assert bench_serve.expected_eval_settings(args) == spd


def test_same_as_static_and_table_rows():
  server = [{"id": 0, "tokens": [1, 2], "error": None}, {"id": "a", "tokens": [3], "error": None},
            {"id": 2, "tokens": [], "error": "boom"}]
  static = [{"id": 0, "tokens": [1, 2]}, {"id": "a", "tokens": [4]}, {"id": 2, "tokens": [5]}]
  assert bench_serve.same_as_static(server, static) == {"compared": 2, "same": 1, "differing_ids": ["a"]}
  summary = {"server": {"8": {"output_tok_s": 1000.0, "tpf": 5.0, "requests_s": 4.0, "ttfb_p50": 0.05,
                              "ttfb_p99": 0.1, "e2e_p50": 0.5, "e2e_p99": 1.0, "occupancy": 7.5}},
             "static": {"8": {"static_tok_s": 500.0}}, "forward": {"8": {"forward_s": 0.02}}}
  (row,) = bench_serve.table_rows([8], summary)
  assert row == ["8", "1000.0", "4.00", "50", "100", "500", "1000", "7.5", "5.00", "500.0", "2.00", "20.00",
                 "2000", "0.50"]
  assert summary["server"]["8"]["x_ideal"] == pytest.approx(0.5)
  (empty,) = bench_serve.table_rows([1], {"server": {}, "static": {}, "forward": {}})
  assert empty[1:] == ["-"] * (len(bench_serve.COLUMNS) - 1)
  assert len(bench_serve.format_table([row, empty]).splitlines()) == 3


def test_pick_forward_takes_the_fastest_row_at_the_batch():
  rows = [{"what": "forward 32/512", "batch": 8, "median": 0.03, "backend": "pallas"},
          {"what": "forward 32/512", "batch": 8, "median": 0.02, "backend": "grouped"},
          {"what": "forward 32/512", "batch": 1, "median": 0.01, "backend": "grouped"},
          {"what": "prefill 512", "batch": 8, "median": 0.001, "backend": "grouped"}]
  assert bench_serve.pick_forward(rows, 8)["median"] == 0.02 and bench_serve.pick_forward(rows, 64) is None


# ---------------------------------------------------------------- the client against a fake server


class FakeServer:
  """An ASGI app speaking serve.py's streaming shape: ``max_tokens`` ids (prompt[0] + i) in blocks of 4."""

  def __init__(self, delay=0.02):
    self.delay, self.in_flight, self.max_in_flight, self.bodies = delay, 0, 0, []

  async def __call__(self, scope, receive, send):
    path = scope["path"]
    if path == "/metrics":
      await self._reply(send, 200, f"dmax_running_slots {self.in_flight}.0\ndmax_queue_depth 0.0\n".encode())
      return
    body = b""
    while True:
      msg = await receive()
      body += msg.get("body", b"")
      if not msg.get("more_body"):
        break
    req = json.loads(body)
    self.bodies.append(req)
    if req["max_tokens"] == 13:
      await self._reply(send, 400, json.dumps({"error": {"message": "unlucky"}}).encode())
      return
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
      ids = [req["prompt"][0] + i for i in range(req["max_tokens"])]
      for i in range(0, len(ids), 4):
        await asyncio.sleep(self.delay)
        chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None, "token_ids": ids[i:i + 4]}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
      nfe = 2 * len(range(0, len(ids), 4))
      tail = [{"choices": [{"index": 0, "text": "", "finish_reason": "length", "token_ids": []}], "nfe": nfe},
              {"choices": [], "usage": {"completion_tokens": len(ids), "nfe": nfe}}]
      data = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in tail) + b"data: [DONE]\n\n"
      await send({"type": "http.response.body", "body": data, "more_body": False})
    finally:
      self.in_flight -= 1

  @staticmethod
  async def _reply(send, status, body):
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def fake_server(app):
  import uvicorn

  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  sock.listen(128)
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
  thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
  thread.start()
  deadline = time.monotonic() + 20
  while not server.started and time.monotonic() < deadline:
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_run_level_against_a_fake_server():
  pytest.importorskip("httpx")
  pytest.importorskip("uvicorn")
  app = FakeServer()
  reqs = [loadgen.Request(i, [100 * i + 1, 7], m) for i, m in enumerate([8, 12, 4, 13, 9, 16, 8, 8, 5, 12])]
  with fake_server(app) as url:
    responses, samples = loadgen.run_level(url, "m", reqs, concurrency=3, fields={"strategy": "spd", "threshold": 0.7},
                                           sample_s=0.01)
  assert app.max_in_flight == 3  # the semaphore holds at most c in flight, and the level fills them
  assert [r.id for r in responses] == list(range(10))
  failed = responses[3]
  assert not failed.ok and failed.error.startswith("HTTP 400")
  for q, r in zip(reqs, responses):
    if q.max_tokens == 13:
      continue
    assert r.ok and r.tokens == [q.ids[0] + i for i in range(q.max_tokens)] and r.num_tokens == q.max_tokens
    assert r.nfe == 2 * -(-q.max_tokens // 4) and 0 < r.ttfb < r.latency
  body = app.bodies[0]
  assert body["stream"] and body["return_token_ids"] and body["stream_options"] == {"include_usage": True}
  assert (body["strategy"], body["threshold"], body["model"]) == ("spd", 0.7, "m") and body["prompt"] == reqs[0].ids
  s = loadgen.summarize(reqs, responses, samples, 3)
  ok = [r for r in responses if r.ok]
  assert s["failed"] == 1 and s["completion_tokens"] == sum(q.max_tokens for q in reqs if q.max_tokens != 13)
  assert s["tpf"] == pytest.approx(s["completion_tokens"] / sum(r.nfe for r in ok))
  wall = max(r.sent + r.latency for r in ok) - min(r.sent for r in ok)
  assert s["output_tok_s"] == pytest.approx(s["completion_tokens"] / wall)
  assert s["ttfb_p50"] == pytest.approx(loadgen.percentile([r.ttfb for r in ok], 50))
  assert 0 < s["occupancy"] <= 3
  with fake_server(FakeServer(delay=0.0)) as url:  # Poisson arrivals: each request waits for its send time
    paced, _ = loadgen.run_level(url, "m", reqs[:6], concurrency=6, rate=40.0, seed=5)
  offsets = loadgen.arrival_times(6, 40.0, 5)
  sent = np.array([r.sent for r in paced]) - paced[0].sent
  assert np.all(sent >= offsets - 1e-3) and np.all(sent <= offsets + 0.1)


# ---------------------------------------------------------------- the static decode, random weights


def test_static_worker_decodes_like_decode_py(ckpt, tmp_path):
  prompts = [[5, 6, 7, 8, 9], [8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34, 35]]  # one shape
  settings = dict(checkpoint=ckpt, dtype="float32", kernels="xla", random_weights=False, routing=None, strategy="spd",
                  threshold=0.5, confidence_stop=0.9, k=None, block_length=4, seed=0)
  spec = {"settings": settings, "batch_size": 2,
          "requests": [{"id": i, "ids": p, "max_tokens": m} for i, (p, m) in enumerate(zip(prompts, [8, 6, 8, 3]))]}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  assert bench_serve.static_worker(str(tmp_path / "spec.json"), str(tmp_path / "out.json")) == 0
  out = json.loads((tmp_path / "out.json").read_text())
  cfg, params, _ = runner.load_model(ckpt, "float32", "xla")
  want = generate_as_cli_batches(params, cfg, prompts, batch_size=2, strategy=decoding.SPD(threshold=0.5),
                                 gen_length=8, block_length=4)
  assert out["gen_length"] == 8 and out["seconds"] > 0 and not out["errors"]
  assert [r["tokens"] for r in out["requests"]] == [list(g.tokens) for g in want]
  assert [r["nfe"] for r in out["requests"]] == [g.nfe for g in want]


def test_random_model_and_the_bench_checkpoint(tmp_path):
  mini = write_bench_checkpoint(str(tmp_path / "mini"), "mini")
  cfg = bench_serve.load_config(str(tmp_path / "mini"))
  assert bench_serve.is_mini_shaped(cfg) and mini["vocab_size"] == 157184
  assert load_tokenizer(str(tmp_path / "mini")).vocab_size == 1024
  tiny = str(tmp_path / "tiny")
  write_bench_checkpoint(tiny, "tiny")
  assert not bench_serve.is_mini_shaped(bench_serve.load_config(tiny))
  config, params, tokenizer = random_model(tiny, "float32", "xla", "uniform")
  assert config.routing == "uniform" and config.compute_dtype == "float32" and tokenizer.vocab_size == 512
  shapes = params_lib.param_shapes(config)
  assert jax_shapes(params) == jax_shapes(shapes, from_shapes=True)
  assert {x.dtype.name for x in leaves(params)} == {"float32"}
  with pytest.raises(runner.UsageError, match="no such checkpoint"):
    random_model(str(tmp_path / "missing"))
  with pytest.raises(runner.UsageError, match="routing"):
    random_model(tiny, routing="random")


def leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def jax_shapes(tree, from_shapes=False):
  import jax

  if from_shapes:
    return [tuple(s) for s in jax.tree.leaves(tree, is_leaf=params_lib.is_shape)]
  return [tuple(x.shape) for x in jax.tree.leaves(tree)]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # serve.py compiles its programs at start (about a minute on 2 cores in float64)
def test_bench_serve_end_to_end_on_the_tiny_checkpoint(ckpt, tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "tools/bench_serve.py", "--checkpoint", ckpt, "--concurrency", "1,2", "--requests", "4",
         "--max-tokens", "16", "--block-length", "8", "--prompt-mean", "20", "--prompt-sd", "5", "--prompt-min", "8",
         "--prompt-max", "40", "--dtype", "float64", "--kernels", "xla", "--json", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["device"]["platform"] == "cpu" and res["workload"]["pool"]["requests"] == 4
  for c in ("1", "2"):
    level = res["server"][c]
    assert level["failed"] == 0 and level["completion_tokens"] == 4 * 16 and level["output_tok_s"] > 0
    assert level["same_as_static"] == {"compared": 4, "same": 4, "differing_ids": []}  # float64: exact
    assert res["static"][c]["useful_tokens"] == 64 and res["static"][c]["static_tok_s"] > 0
  assert "bench_decode not run: no GPU here (cpu)" in res["notes"]
  assert "x static" in r.stdout and len((tmp_path / "bench.requests.jsonl").read_text().splitlines()) == 16
  port = int(res["server_command"].split("--port ")[1].split()[0])
  with socket.socket() as s:  # the server was stopped
    assert s.connect_ex(("127.0.0.1", port)) != 0
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 0 and "every level is already in the results" in again.stderr


def test_forward_phase_reads_bench_decodes_json(tmp_path, monkeypatch):
  """On a GPU, for a mini-shaped checkpoint: one bench_decode child for the missing batches, its fastest row kept."""
  ckpt = str(tmp_path / "mini")
  write_bench_checkpoint(ckpt, "mini")
  args = bench_serve.parser().parse_args(["--checkpoint", ckpt, "--random-weights", "--concurrency", "1,8",
                                          "--backends", "pallas,grouped", "--dtype", "bfloat16"])
  plan = bench_serve.make_plan(args, [])
  assert plan.per_level == {1: 64, 8: 64} and plan.max_slots == 8 and plan.window % 32 == 0
  flags = bench_serve.server_flags(plan, 1234)
  assert flags[flags.index("--routing") + 1] == "uniform" and "--random-weights" in flags
  state = bench_serve.State(None, "key", fresh=False)
  state.put("forward", 1, {"forward_s": 0.004})  # already measured: not asked for again
  calls = []

  def fake_run_child(cmd, what, env=None):
    del what, env
    calls.append(cmd)
    rows = [{"what": "forward 32/512", "batch": 8, "median": m, "backend": b, "weights": "bf16", "attention": "pallas"}
            for b, m in (("pallas", 0.03), ("grouped", 0.025))]
    with open(cmd[cmd.index("--json") + 1], "w") as f:
      json.dump({"device": "NVIDIA H100", "rows": rows}, f)

  monkeypatch.setattr(bench_serve, "run_child", fake_run_child)
  bench_serve.run_forward_phase(plan, state, {"platform": "cpu"})
  assert not calls and "no GPU here" in state.summary["notes"][0]
  bench_serve.run_forward_phase(plan, state, {"platform": "gpu"})
  (cmd,) = calls
  assert cmd[cmd.index("--batches") + 1] == "8" and cmd[cmd.index("--backends") + 1] == "pallas,grouped"
  assert {"--no-spd", "--no-prefill"} <= set(cmd) and cmd[cmd.index("--routing") + 1] == "uniform"
  got = state.summary["forward"]["8"]
  assert got["forward_s"] == 0.025 and got["backend"] == "grouped" and len(got["rows"]) == 2


def test_engine_rates_from_the_first_and_last_samples_in_the_window():
  """Host ms per launch = (scheduler - launch seconds) / launches between the window's first and last samples."""
  samples = [(0.5, 1, 0, (0.0, 0.0, 0.0, 0.0)),  # before the window: ignored
             (1.0, 2, 0, (10.0, 40.0, 0.20, 0.23)),
             (2.0, 2, 0, (20.0, 70.0, 0.50, 0.54)),
             (3.0, 2, 0, (30.0, 100.0, 0.80, 0.86)),
             (4.0, 2, 0, (99.0, 999.0, 9.0, 9.9))]  # after it: ignored
  r = loadgen.engine_rates(samples, 1.0, 3.0)
  assert r["steps_per_launch"] == pytest.approx(60 / 20)
  assert r["device_ms_per_step"] == pytest.approx(1000 * 0.60 / 60)
  assert r["host_ms_per_launch"] == pytest.approx(1000 * (0.63 - 0.60) / 20)
  assert loadgen.engine_rates(samples[:2], 1.0, 3.0) == {}  # one sample: no rate
