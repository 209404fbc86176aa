"""``tools/bench_serve.py``: the server under load, beside decode.py's static batching and bench_decode's forward.

One run, one phase after another (never two models in device memory at once):

1. ``server``: starts ``python serve.py --checkpoint DIR ...`` (its flags from ours, then whatever follows ``--``
   on our command line), waits for ``GET /health`` (start-up compiles every program), sends an untimed warm-up
   (``--warmup`` requests of one block each, all at once), then for each concurrency level c sends the level's
   requests (``loadgen.run_level``: open-loop arrivals at ``--rate``, at most c in flight), and stops the server
   with SIGTERM (also on Ctrl-C and errors). Requests per level: ``--requests``, else every question of
   ``--data``, else max(4c, 64) synthetic ones (a prefix of one seeded pool, so levels share their first requests).
2. ``static``: decode.py's static batching on the same requests at batch size c (for c <= ``--static-max``): a
   subprocess (``python -m dmax_jax.apps.bench_serve static``) loads the same model and runs ``runner.run``,
   decode.py's loop (shortest prompts first, c at a time, each batch shape compiled before its timer), on the
   same token ids with gen length = the level's largest max_tokens. Useful tokens of a request are its
   generated tokens cut at its own max_tokens: static batching runs every batch to its longest request, which is
   its cost.
3. ``forward``: ``tools/bench_decode.py --batches LEVELS --no-spd --no-prefill --routing uniform`` (on a GPU,
   for a checkpoint of LLaDA-2.0-mini's shape, the only one it times): the fastest (backend, weights, attention)
   row's forward seconds at batch c give the ideal output tok/s = c * TPF (the server's, at that level) / forward.

Reported per level: output tok/s (completion tokens / wall from the first send to the last finish), requests/s,
time to first block and end-to-end latency p50 / p99 (from the send, after the concurrency semaphore), mean
running slots (``/metrics`` sampled every 0.1 s), TPF (tokens / NFE over the level), static tok/s and the ratio,
forward ms, ideal tok/s and the ratio; and how many responses equal the static decode's tokens. With
``--compare-eval EVAL.jsonl`` (records of ``tools/evaluate.py`` on the same ``--data``), each level's responses
are matched to the records of the same prompt and strategy settings: identical token lists, and the accuracy of
both (``gsm8k`` answer extraction against the data's answers).

``--json OUT`` writes the summary (the command, the device, the workload and its distribution, every figure) to
OUT and each request's tokens and timings to OUT's stem + ``.requests.jsonl``; it is also the run's state: the
same command again (after a kill, or a time limit) skips the levels and phases OUT already holds, measured with
the same settings on the same kind of device (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

from dmax_jax.apps import loadgen

PHASES = ("server", "static", "forward")
REPO = Path(__file__).resolve().parents[2]  # serve.py and tools/ of a checkout
DEVICE_PROBE = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
                "'device_kind': d.device_kind, 'devices': jax.device_count(), 'jax': jax.__version__}))")


def say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
  """A run that cannot go on: one line for the user (exit status 2)."""


# ---------------------------------------------------------------- child processes

def child_env() -> dict:
  """The environment of the children (server, static decode, bench_decode): ours."""
  return dict(os.environ)


def device_info() -> dict:
  """The device a child process sees (platform, device kind, count), from a short JAX probe (no preallocation)."""
  env = dict(child_env(), XLA_PYTHON_CLIENT_PREALLOCATE="false")
  r = subprocess.run([sys.executable, "-c", DEVICE_PROBE], env=env, capture_output=True, text=True, timeout=600,
                     check=False)
  if r.returncode != 0:
    raise BenchError(f"cannot query the device: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def free_port(host: str = "127.0.0.1") -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def serve_command(flags: Sequence[str]) -> list:
  """``python serve.py FLAGS`` from a checkout, else the same entry point through ``-c``."""
  script = REPO / "serve.py"
  if script.is_file():
    return [sys.executable, str(script), *flags]
  return [sys.executable, "-c", "import sys; from dmax_jax.apps.serve import serve_main; sys.exit(serve_main())",
          *flags]


class ServerProcess:
  """``serve.py`` as a child process: its output goes to our stderr (prefixed), its last lines are kept for
  errors; ``stop`` sends SIGTERM (the server drains and exits) and kills it if it has not exited in time."""

  def __init__(self, cmd: Sequence[str], url: str, api_key: Optional[str] = None):
    self.cmd, self.url, self.api_key = list(cmd), url, api_key
    self.proc: Optional[subprocess.Popen] = None
    self.tail: deque = deque(maxlen=40)
    self._reader: Optional[threading.Thread] = None

  def __enter__(self):
    self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=child_env(), text=True, errors="replace", bufsize=1)
    self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
    self._reader.start()
    return self

  def __exit__(self, *exc):
    self.stop()

  def _read(self):
    for line in self.proc.stdout:
      line = line.rstrip("\n")
      self.tail.append(line)
      say(f"  server| {line}")

  def _died(self) -> BenchError:
    time.sleep(0.2)  # the reader's last lines
    tail = "\n".join(self.tail)
    return BenchError(f"the server exited with status {self.proc.returncode} before it was ready; its last "
                      f"output:\n{tail}")

  def wait_ready(self, timeout_s: float, every_s: float = 30.0) -> None:
    """Waits for ``GET /health`` to answer 200, saying how long it has waited every ``every_s``."""
    import httpx  # pylint: disable=import-outside-toplevel

    start = last = time.monotonic()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
      while True:
        if self.proc.poll() is not None:
          raise self._died()
        try:
          if client.get(f"{self.url}/health").status_code == 200:
            return
        except httpx.HTTPError:
          pass
        now = time.monotonic()
        if now - start > timeout_s:
          raise BenchError(f"the server was not ready after {timeout_s:.0f} s (--startup-timeout)")
        if now - last >= every_s:
          last = now
          say(f"waiting for the server (loading and compiling): {now - start:.0f} s")
        time.sleep(0.5)

  def model_name(self) -> str:
    import httpx  # pylint: disable=import-outside-toplevel

    headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
    resp = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=10.0, trust_env=False)
    if resp.status_code != 200:
      raise BenchError(f"GET /v1/models answered {resp.status_code}: {resp.text[:200]}")
    return resp.json()["data"][0]["id"]

  def stop(self, timeout_s: float = 60.0) -> None:
    if self.proc is None or self.proc.poll() is not None:
      return
    self.proc.send_signal(signal.SIGTERM)
    try:
      self.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      say(f"the server did not exit {timeout_s:.0f} s after SIGTERM: killing it")
      self.proc.kill()
      self.proc.wait()
    if self._reader is not None:
      self._reader.join(5)


def run_child(cmd: Sequence[str], what: str, env: Optional[dict] = None) -> None:
  """Runs a child to its end, its output on our stderr; a failure is a BenchError; Ctrl-C stops it."""
  say(f"{what}: {shlex.join(cmd)}")
  proc = subprocess.Popen(cmd, env=env or child_env(), stdin=subprocess.DEVNULL)
  try:
    code = proc.wait()
  finally:
    if proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  if code != 0:
    raise BenchError(f"{what} failed (exit status {code})")


# ---------------------------------------------------------------- the static decode (a child process)

def static_worker(spec_path: str, out_path: str) -> int:
  """``python -m dmax_jax.apps.bench_serve static SPEC OUT``: decode.py's ``runner.run`` over the spec's token
  ids at batch size ``batch_size``; writes the decoding seconds (compilation excluded) and each request's tokens."""
  import io  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps.random_model import random_model  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps.records import RecordWriter  # pylint: disable=import-outside-toplevel

  with open(spec_path) as f:
    spec = json.load(f)
  s = spec["settings"]
  with runner.precision(s["dtype"]):
    if s["random_weights"]:
      config, params, tokenizer = random_model(s["checkpoint"], s["dtype"], s["kernels"], s["routing"] or "uniform")
    else:
      config, params, tokenizer = runner.load_model(s["checkpoint"], s["dtype"], s["kernels"])
    strategy = runner.make_strategy(s["strategy"], s["threshold"], s["confidence_stop"], 0.0, s["k"])
    requests = [runner.Request(r["id"], f"request {r['id']}", "", r["ids"]) for r in spec["requests"]]
    gen_length = max(r["max_tokens"] for r in spec["requests"])
    t0 = time.perf_counter()
    result = runner.run(requests, params=params, config=config, tokenizer=tokenizer, strategy=strategy,
                        gen_length=gen_length, block_length=s["block_length"], batch_size=spec["batch_size"],
                        writer=RecordWriter(None, runner.KEY_FIELDS, stream=io.StringIO()), seed=s["seed"],
                        progress=False)
    wall = time.perf_counter() - t0
  by_id = {json.dumps(rec["id"]): rec for rec in result.records}
  out = {"seconds": result.seconds, "wall_s": wall, "gen_length": gen_length, "batch_size": spec["batch_size"],
         "errors": result.errors, "device_kind": jax.devices()[0].device_kind, "requests": []}
  for r in spec["requests"]:
    rec = by_id.get(json.dumps(r["id"]))
    out["requests"].append({"id": r["id"], "tokens": rec["tokens"] if rec else None, "nfe": rec["nfe"] if rec else None})
  with open(out_path, "w") as f:
    json.dump(out, f)
  return 0


# ---------------------------------------------------------------- settings, workload, state

@dataclasses.dataclass
class Plan:
  """What a run measures, worked out from the flags before anything starts."""

  args: argparse.Namespace
  server_extra: list
  config: object  # ModelConfig of the checkpoint
  tokenizer: object
  levels: list
  pool: list  # loadgen.Request, the largest level's requests (every level takes a prefix)
  per_level: dict  # c -> number of requests
  window: int
  max_slots: int
  workload: dict  # what the JSON says about the workload
  fields: dict  # strategy / threshold sent with each request

  def requests(self, c: int) -> list:
    return self.pool[:self.per_level[c]]

  def settings(self) -> dict:
    """Everything the figures depend on besides the levels (the resume key)."""
    a = self.args
    return dict(checkpoint=os.path.abspath(a.checkpoint), data=os.path.abspath(a.data) if a.data else None,
                seed=a.seed, requests=a.requests, rate=a.rate if math.isfinite(a.rate) else "inf",
                max_tokens=a.max_tokens, min_tokens=a.min_tokens, mixed=a.mixed, prompt=self.workload.get("distribution"),
                strategy=a.strategy, threshold=a.threshold, k=a.k, confidence_stop=a.confidence_stop,
                block_length=a.block_length, dtype=a.dtype, kernels=a.kernels, random_weights=a.random_weights,
                routing=a.routing, max_slots=self.max_slots, window=self.window, server_extra=self.server_extra,
                backends=a.backends, weights=a.weights)


def _levels(text: str) -> list:
  try:
    levels = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise BenchError(f"--concurrency must be comma-separated integers, got {text!r}") from None
  if not levels or min(levels) <= 0:
    raise BenchError(f"--concurrency needs positive levels, got {text!r}")
  return sorted(set(levels))


def make_plan(args, server_extra) -> Plan:
  from dmax_jax.tokenizer import EOS_TOKEN, MASK_TOKEN, TokenizerError, load_tokenizer  # pylint: disable=import-outside-toplevel

  levels = _levels(args.concurrency)
  for flag in ("max_tokens", "min_tokens", "block_length"):
    if getattr(args, flag) <= 0:
      raise BenchError(f"--{flag.replace('_', '-')} must be positive")
  if args.mixed and args.min_tokens > args.max_tokens:
    raise BenchError(f"--min-tokens {args.min_tokens} exceeds --max-tokens {args.max_tokens}")
  if args.requests is not None and args.requests <= 0:
    raise BenchError(f"--requests must be positive, got {args.requests}")
  if args.routing and not args.random_weights:
    raise BenchError("--routing goes with --random-weights (a checkpoint's weights route with its router)")
  if args.compare_eval and not args.data:
    raise BenchError("--compare-eval needs --data (the questions the evaluation decoded)")
  if args.compare_eval and args.mixed:
    raise BenchError("--compare-eval needs one max_tokens for every request (the evaluation's gen length): drop --mixed")
  if args.compare_eval and not os.path.isfile(args.compare_eval):
    raise BenchError(f"{args.compare_eval}: no such file")
  if not os.path.isdir(args.checkpoint):
    raise BenchError(f"{args.checkpoint}: no such checkpoint directory")
  config = load_config(args.checkpoint)
  try:
    tokenizer = load_tokenizer(args.checkpoint)
  except TokenizerError as e:
    raise BenchError(str(e)) from None
  K = args.block_length
  positions = config.max_position_embeddings if args.window is None else min(args.window, config.max_position_embeddings)
  positions = positions // K * K  # what the server's window holds
  largest = max(levels)
  if args.data:
    if not os.path.isfile(args.data):
      raise BenchError(f"{args.data}: no such file")
    pool, errors = loadgen.data_workload(args.data, tokenizer, args.requests, seed=args.seed, max_tokens=args.max_tokens,
                                         min_tokens=args.min_tokens, mixed=args.mixed)
    for e in errors[:5]:
      say(f"warning: {e}")
    if errors:
      say(f"warning: {len(errors)} lines of {args.data} skipped")
    kept = [r for r in pool if loadgen.fits(len(r.ids), r.max_tokens, K, positions)]
    if len(kept) < len(pool):
      say(f"warning: {len(pool) - len(kept)} questions left out: prompt + max_tokens exceed {positions} positions")
    pool = kept
    if not pool:
      raise BenchError(f"{args.data}: no question to send")
    per_level = {c: len(pool) for c in levels}
    distribution = {"kind": "data", "file": args.data, "prompt": "evaluate's: chat template + math suffix"}
  else:
    n = {c: args.requests or max(4 * c, 64) for c in levels}
    special = {config.eos_token_id, config.mask_token_id, config.pad_token_id}
    special |= {t for t in (tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(MASK_TOKEN)) if t is not None}
    vocab = min(tokenizer.vocab_size, config.vocab_size)
    prompt = dict(mean=args.prompt_mean, sd=args.prompt_sd, low=args.prompt_min, high=args.prompt_max)
    try:
      pool = loadgen.synthetic_workload(max(n.values()), seed=args.seed, vocab=vocab, exclude=sorted(special),
                                        max_tokens=args.max_tokens, min_tokens=args.min_tokens, mixed=args.mixed,
                                        block_length=K, positions=positions, **prompt)
    except ValueError as e:
      raise BenchError(str(e)) from None
    per_level = n
    distribution = {"kind": "synthetic", "prompt_length": f"round(N({args.prompt_mean}, {args.prompt_sd})) clipped to "
                    f"[{args.prompt_min}, {args.prompt_max}] (and to the window less max_tokens)", **prompt,
                    "token_ids": f"uniform over [0, {vocab}) less the special ids {sorted(special)}"}
  distribution["max_tokens"] = (f"uniform integers in [{args.min_tokens}, {args.max_tokens}]" if args.mixed
                                else f"{args.max_tokens} for every request")
  need = max(-(-(len(r.ids) + r.max_tokens) // K) * K for r in pool)
  window = args.window or need
  max_slots = args.max_slots or largest
  fields = {"strategy": args.strategy, **({"threshold": args.threshold} if args.threshold is not None else {})}
  workload = {"distribution": distribution, "requests_per_level": {str(c): per_level[c] for c in levels},
              "pool": loadgen.describe(pool), "arrivals": "all at t = 0" if math.isinf(args.rate) else
              f"Poisson, {args.rate} requests/s", "in_flight": "at most c (a semaphore; timers start at the send)"}
  return Plan(args, server_extra, config, tokenizer, levels, pool, per_level, window, max_slots, workload, fields)


def load_config(path: str):
  """The ModelConfig of a checkpoint directory's config.json (no weights read); BenchError naming the problem."""
  from dmax_jax.model.config import ConfigError, load_hf_config  # pylint: disable=import-outside-toplevel

  try:
    return load_hf_config(path)
  except ConfigError as e:
    raise BenchError(str(e)) from None


def fingerprint(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class State:
  """The run's results so far, kept in ``--json OUT`` (summary) and OUT's stem + ``.requests.jsonl``."""

  def __init__(self, path: Optional[str], key: str, fresh: bool):
    self.path = path
    self.summary = {"fingerprint": key, "server": {}, "static": {}, "forward": {}, "notes": []}
    self.requests: dict = {}  # (phase, c) -> [per-request dict]
    if path and os.path.exists(path) and not fresh:
      with open(path) as f:
        old = json.load(f)
      if old.get("fingerprint") != key:
        raise BenchError(f"{path} holds results of other settings (or of an older workload): give another --json, or "
                         "--fresh to overwrite it")
      self.summary.update({k: old.get(k, v) for k, v in self.summary.items()})
      self.summary["device"] = old.get("device")
      if os.path.exists(self.requests_path):
        with open(self.requests_path) as f:
          for line in f:
            if line.strip():
              row = json.loads(line)
              self.requests.setdefault((row["phase"], row["c"]), []).append(row)

  @property
  def requests_path(self) -> str:
    return os.path.splitext(self.path)[0] + ".requests.jsonl"

  def has(self, phase: str, c: int) -> bool:
    return str(c) in self.summary[phase]

  def put(self, phase: str, c: int, summary: dict, rows: Optional[list] = None) -> None:
    self.summary[phase][str(c)] = summary
    if rows is not None:
      self.requests[(phase, c)] = [dict(row, phase=phase, c=c) for row in rows]
    self.save()

  def save(self) -> None:
    if not self.path:
      return
    from dmax_jax.apps.records import write_atomic  # pylint: disable=import-outside-toplevel

    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    write_atomic(self.path, json.dumps(self.summary, indent=2, default=str) + "\n")
    lines = [json.dumps(row) for key in sorted(self.requests) for row in self.requests[key]]
    write_atomic(self.requests_path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- phases

def server_flags(plan: Plan, port: int) -> list:
  a = plan.args
  flags = ["--checkpoint", a.checkpoint, "--host", "127.0.0.1", "--port", str(port), "--strategy", a.strategy,
           "--block-length", str(a.block_length), "--dtype", a.dtype, "--kernels", a.kernels, "--max-slots",
           str(plan.max_slots), "--max-queue", str(max(256, max(plan.per_level.values()))), "--window",
           str(plan.window), "--gen-length", str(a.max_tokens), "--confidence-stop", str(a.confidence_stop),
           "--shutdown-grace", "5"]
  if a.threshold is not None:
    flags += ["--threshold", str(a.threshold)]
  if a.k is not None:
    flags += ["--k", str(a.k)]
  if a.random_weights:
    flags += ["--random-weights", "--routing", a.routing or "uniform"]
  return flags + plan.server_extra


def response_row(req: loadgen.Request, r: loadgen.Response) -> dict:
  return {"id": req.id, "prompt_tokens": len(req.ids), "max_tokens": req.max_tokens, "tokens": r.tokens,
          "text": r.text, "completion_tokens": r.num_tokens, "nfe": r.nfe, "ttfb": r.ttfb, "latency": r.latency,
          "finish_reason": r.finish_reason, "error": r.error if not r.ok else None}


def run_server_phase(plan: Plan, state: State) -> None:
  todo = [c for c in plan.levels if not state.has("server", c)]
  if not todo:
    say("server: every level is already in the results")
    return
  a = plan.args
  port = a.port or free_port()
  cmd = serve_command(server_flags(plan, port))
  state.summary["server_command"] = shlex.join(cmd)
  url = f"http://127.0.0.1:{port}"
  say(f"starting the server: {shlex.join(cmd)}")
  with ServerProcess(cmd, url, a.api_key) as server:
    server.wait_ready(a.startup_timeout)
    model = server.model_name()
    say(f"server ready ({url}, model {model!r})")
    run = dict(fields=plan.fields, api_key=a.api_key, rate=a.rate)
    warm = min(a.warmup if a.warmup is not None else max(plan.levels), len(plan.pool))
    if warm > 0:
      requests = [dataclasses.replace(r, max_tokens=min(r.max_tokens, a.block_length)) for r in plan.pool[:warm]]
      t0 = time.perf_counter()
      responses, _ = loadgen.run_level(url, model, requests, concurrency=warm, fields=plan.fields, api_key=a.api_key)
      failed = [r for r in responses if not r.ok]
      if failed:
        raise BenchError(f"{len(failed)} of {warm} warm-up requests failed; the first: {failed[0].error}")
      say(f"warm-up: {warm} requests of one block in {time.perf_counter() - t0:.1f} s")
    for c in todo:
      requests = plan.requests(c)
      say(f"level c={c}: {len(requests)} requests")
      responses, samples = loadgen.run_level(url, model, requests, concurrency=c, seed=a.seed + c, **run)
      summary = loadgen.summarize(requests, responses, samples, c)
      summary["slots"] = plan.max_slots
      if summary["failed"]:
        say(f"warning: c={c}: {summary['failed']} requests failed: {summary['errors']}")
      if "output_tok_s" in summary:
        say(f"level c={c}: {summary['output_tok_s']:.1f} output tok/s, TPF {summary['tpf']:.2f}, "
            f"TTFB p50 {summary['ttfb_p50']:.3f} s, e2e p50 {summary['e2e_p50']:.3f} s")
      if "host_ms_per_launch" in summary:
        say(f"level c={c}: engine {summary['steps_per_launch']:.2f} steps a launch, device "
            f"{summary['device_ms_per_step']:.2f} ms a step, host {summary['host_ms_per_launch']:.2f} ms a launch")
      state.put("server", c, summary, [response_row(q, r) for q, r in zip(requests, responses)])


def run_static_phase(plan: Plan, state: State) -> None:
  a = plan.args
  todo = [c for c in plan.levels if c <= a.static_max and not state.has("static", c)]
  skipped = [c for c in plan.levels if c > a.static_max]
  if skipped:
    note(state, f"static batching not run at c > {a.static_max} (--static-max): {skipped}")
  s = dict(checkpoint=a.checkpoint, dtype=a.dtype, kernels=a.kernels, random_weights=a.random_weights,
           routing=a.routing, strategy=a.strategy, threshold=a.threshold, confidence_stop=a.confidence_stop, k=a.k,
           block_length=a.block_length, seed=a.seed)
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    for c in todo:
      requests = plan.requests(c)
      spec_path, out_path = os.path.join(tmp, f"static{c}.json"), os.path.join(tmp, f"static{c}.out.json")
      with open(spec_path, "w") as f:
        json.dump({"settings": s, "batch_size": min(c, len(requests)),
                   "requests": [{"id": r.id, "ids": r.ids, "max_tokens": r.max_tokens} for r in requests]}, f)
      cmd = [sys.executable, "-m", "dmax_jax.apps.bench_serve", "static", spec_path, out_path]
      state.summary["static_command"] = shlex.join(cmd[:-2] + ["SPEC.json", "OUT.json"])
      run_child(cmd, f"static batching at batch size {c}")
      with open(out_path) as f:
        out = json.load(f)
      rows, useful, generated, nfe = [], 0, 0, 0
      for q, r in zip(requests, out["requests"]):
        tokens = r["tokens"] or []
        useful += min(len(tokens), q.max_tokens)
        generated += len(tokens)
        nfe += r["nfe"] or 0
        rows.append({"id": q.id, "tokens": tokens[:q.max_tokens], "generated": len(tokens), "nfe": r["nfe"]})
      seconds = out["seconds"]
      summary = dict(batch_size=out["batch_size"], gen_length=out["gen_length"], seconds=seconds, wall_s=out["wall_s"],
                     useful_tokens=useful, generated_tokens=generated, nfe=nfe,
                     static_tok_s=useful / seconds if seconds else 0.0,
                     generated_tok_s=generated / seconds if seconds else 0.0, errors=out["errors"][:5],
                     device_kind=out["device_kind"])
      say(f"static c={c}: {summary['static_tok_s']:.1f} useful tok/s ({generated} generated, {useful} useful, "
          f"{seconds:.2f} s)")
      state.put("static", c, summary, rows)


def is_mini_shaped(config) -> bool:
  """Whether ``config`` has LLaDA-2.0-mini's shapes (what bench_decode times), positions aside."""
  from dmax_jax.model import presets  # pylint: disable=import-outside-toplevel

  mine, mini = config.architecture_dict(), presets.llada2_mini().architecture_dict()
  return all(mine[k] == v for k, v in mini.items() if k != "max_position_embeddings")


def pick_forward(rows: Sequence[dict], batch: int) -> Optional[dict]:
  """The fastest forward row of bench_decode's JSON at ``batch``."""
  rows = [r for r in rows if r.get("what") == "forward 32/512" and r.get("batch") == batch]
  return min(rows, key=lambda r: r["median"]) if rows else None


def run_forward_phase(plan: Plan, state: State, device: dict) -> None:
  a = plan.args
  if device.get("platform") != "gpu":
    note(state, f"bench_decode not run: no GPU here ({device.get('platform')})")
    return
  if not is_mini_shaped(plan.config):
    note(state, "bench_decode not run: it times LLaDA-2.0-mini's shapes, and this checkpoint has others")
    return
  script = REPO / "tools" / "bench_decode.py"
  if not script.is_file():
    note(state, f"bench_decode not run: {script} not found (run from a checkout)")
    return
  todo = [c for c in plan.levels if not state.has("forward", c)]
  if not todo:
    return
  if a.dtype != "bfloat16" or a.kernels == "xla":
    note(state, f"bench_decode times bf16 weights with --backends {a.backends}; the server ran {a.dtype}, kernels "
                f"{a.kernels}")
  with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
    out_path = os.path.join(tmp, "bench_decode.json")
    cmd = [sys.executable, str(script), "--batches", ",".join(map(str, todo)), "--no-spd", "--no-prefill",
           "--routing", "uniform", "--backends", a.backends, "--weights", a.weights, "--json", out_path]
    state.summary["bench_decode_command"] = shlex.join(cmd)
    run_child(cmd, "bench_decode")
    with open(out_path) as f:
      out = json.load(f)
  for c in todo:
    row = pick_forward(out["rows"], c)
    if row is None:
      note(state, f"bench_decode gave no forward row at batch {c}")
      continue
    state.put("forward", c, dict(forward_s=row["median"], backend=row["backend"], weights=row["weights"],
                                 attention=row["attention"], device_kind=out.get("device"),
                                 rows=[{k: r.get(k) for k in ("backend", "weights", "attention", "median")}
                                       for r in out["rows"] if r.get("batch") == c]))


def note(state: State, text: str) -> None:
  if text not in state.summary["notes"]:
    state.summary["notes"].append(text)
    say(f"note: {text}")


# ---------------------------------------------------------------- comparisons

def same_as_static(server_rows: Sequence[dict], static_rows: Sequence[dict]) -> dict:
  """How many requests got the same tokens from the server as from the static decode (cut at max_tokens)."""
  static = {json.dumps(r["id"]): r["tokens"] for r in static_rows}
  pairs = [(r, static.get(json.dumps(r["id"]))) for r in server_rows if r.get("error") is None]
  pairs = [(r, s) for r, s in pairs if s is not None]
  differ = [r["id"] for r, s in pairs if r["tokens"] != s]
  return dict(compared=len(pairs), same=len(pairs) - len(differ), differing_ids=differ[:20])


def expected_eval_settings(args) -> dict:
  """The ``settings`` fields an evaluate record must have to be compared with this run's responses."""
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  strategy = runner.make_strategy(args.strategy, args.threshold, args.confidence_stop, 0.0, args.k)
  return {**runner.strategy_fields(strategy), "gen_length": args.max_tokens, "block_length": args.block_length}


def select_eval_records(records: Sequence[dict], expected: dict, prefer: dict) -> tuple[dict, dict, int]:
  """({prompt_hash: record} of the settings group to compare with, its settings, number of groups that matched).

  Records must match ``expected``; of the groups that do (other checkpoint, dtype, kernels...), the one matching
  most of ``prefer`` and then the largest is taken."""
  groups: dict = {}
  for rec in records:
    s = rec.get("settings") or {}
    if all(s.get(k) == v for k, v in expected.items()) and "tokens" in rec and "prompt_hash" in rec:
      groups.setdefault(json.dumps(s, sort_keys=True), []).append(rec)
  if not groups:
    return {}, {}, 0
  score = lambda item: (sum(json.loads(item[0]).get(k) == v for k, v in prefer.items()), len(item[1]))  # pylint: disable=unnecessary-lambda-assignment
  key, recs = max(groups.items(), key=score)
  return {r["prompt_hash"]: r for r in recs}, json.loads(key), len(groups)


def compare_eval(requests: Sequence[loadgen.Request], rows: Sequence[dict], by_hash: dict) -> dict:
  """Server responses (``rows``, in ``requests``' order) against evaluate's records of the same prompts: identical
  token lists (the record's cut at the request's max_tokens, as the server cuts), and the accuracy of both over the
  questions compared (``gsm8k.extract_prediction`` of the texts against the data's reference answers)."""
  from dmax_jax.apps import gsm8k, runner  # pylint: disable=import-outside-toplevel

  compared = same = missing = failed = scored = right_server = right_eval = longer = 0
  differing = []
  for q, row in zip(requests, rows):
    rec = by_hash.get(runner.prompt_hash(q.ids))
    if rec is None:
      missing += 1
      continue
    if row.get("error") is not None:
      failed += 1
      continue
    compared += 1
    longer += len(rec["tokens"]) > q.max_tokens
    if row["tokens"] == rec["tokens"][:q.max_tokens]:
      same += 1
    else:
      differing.append(q.id)
    reference = q.reference if q.reference is not None else rec.get("reference")
    if reference is not None:
      scored += 1
      right_server += gsm8k.extract_prediction(row["text"]) == reference
      right_eval += gsm8k.extract_prediction(rec.get("output", "")) == reference
  return dict(compared=compared, same=same, differ=len(differing), differing_ids=differing[:20],
              same_fraction=same / compared if compared else None, no_eval_record=missing, server_failed=failed,
              eval_longer_than_max_tokens=longer, scored=scored,
              server_accuracy=right_server / scored if scored else None,
              eval_accuracy=right_eval / scored if scored else None)


def comparisons(plan: Plan, state: State) -> None:
  """Fills each server level's ``same_as_static`` and ``compare_eval`` from the per-request results."""
  a = plan.args
  eval_records = None
  if a.compare_eval:
    from dmax_jax.apps.records import read_records  # pylint: disable=import-outside-toplevel

    expected = expected_eval_settings(a)
    prefer = {"dtype": a.dtype, "checkpoint": os.path.abspath(a.checkpoint)}
    eval_records, chosen, groups = select_eval_records(read_records(a.compare_eval), expected, prefer)
    if not eval_records:
      note(state, f"--compare-eval: no record of {a.compare_eval} has the settings {expected}")
    else:
      state.summary["compare_eval_settings"] = chosen
      if groups > 1:
        note(state, f"--compare-eval: {groups} groups of records match the strategy and lengths; compared with "
                    f"the one of {chosen.get('checkpoint')} ({chosen.get('dtype')}, kernels "
                    f"{chosen.get('kernels', 'xla')})")
  for c in plan.levels:
    if not state.has("server", c) or ("server", c) not in state.requests:
      continue
    rows = state.requests[("server", c)]
    level = state.summary["server"][str(c)]
    if ("static", c) in state.requests:
      level["same_as_static"] = same_as_static(rows, state.requests[("static", c)])
    if eval_records:
      level["compare_eval"] = compare_eval(plan.requests(c), rows, eval_records)
  state.save()


# ---------------------------------------------------------------- report

COLUMNS = ("c", "out tok/s", "req/s", "TTFB p50", "TTFB p99", "e2e p50", "e2e p99", "occ", "TPF", "static tok/s",
           "x static", "fwd ms", "ideal tok/s", "x ideal")


def table_rows(levels: Sequence[int], summary: dict) -> list:
  """One row of ``COLUMNS`` per level (a dash where a figure is missing); the ratio columns are computed here."""
  fmt = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # pylint: disable=unnecessary-lambda-assignment
  rows = []
  for c in levels:
    s = summary["server"].get(str(c), {})
    st = summary["static"].get(str(c), {})
    fw = summary["forward"].get(str(c), {})
    tok_s, tpf = s.get("output_tok_s"), s.get("tpf")
    static = st.get("static_tok_s")
    forward = fw.get("forward_s")
    ideal = c * tpf / forward if forward and tpf else None
    ms = lambda v: None if v is None else 1e3 * v  # pylint: disable=unnecessary-lambda-assignment
    rows.append([str(c), fmt(tok_s, ".1f"), fmt(s.get("requests_s"), ".2f"), fmt(ms(s.get("ttfb_p50")), ".0f"),
                 fmt(ms(s.get("ttfb_p99")), ".0f"), fmt(ms(s.get("e2e_p50")), ".0f"), fmt(ms(s.get("e2e_p99")), ".0f"),
                 fmt(s.get("occupancy"), ".1f"), fmt(tpf, ".2f"), fmt(static, ".1f"),
                 fmt(tok_s / static if tok_s and static else None, ".2f"), fmt(ms(forward), ".2f"), fmt(ideal, ".0f"),
                 fmt(tok_s / ideal if tok_s and ideal else None, ".2f")])
    if ideal is not None:
      s["ideal_tok_s"], s["x_ideal"] = ideal, (tok_s / ideal if tok_s else None)
    if static:
      s["x_static"] = tok_s / static if tok_s else None
  return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]
  line = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # pylint: disable=unnecessary-lambda-assignment
  return "\n".join([line(COLUMNS)] + [line(r) for r in rows])


def report(plan: Plan, state: State) -> str:
  rows = table_rows(plan.levels, state.summary)
  state.save()
  lines = [f"device: {state.summary.get('device', {}).get('device_kind')}; checkpoint {plan.args.checkpoint}"
           f"{' (random weights)' if plan.args.random_weights else ''}; strategy {plan.args.strategy}"
           f"{'' if plan.args.threshold is None else f' {plan.args.threshold}'}"
           f"{'' if plan.args.k is None else f' k={plan.args.k}'}; dtype {plan.args.dtype}; slots {plan.max_slots}",
           "times in ms; occ = mean running slots; TPF = tokens / forwards; x static = out tok/s / static tok/s; "
           "ideal = c * TPF / forward",
           format_table(rows)]
  for c in plan.levels:
    s = state.summary["server"].get(str(c), {})
    extra = []
    if s.get("failed"):
      extra.append(f"{s['failed']} requests failed")
    if "same_as_static" in s:
      m = s["same_as_static"]
      extra.append(f"same tokens as static {m['same']}/{m['compared']}")
    if "compare_eval" in s:
      m = s["compare_eval"]
      acc = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # pylint: disable=unnecessary-lambda-assignment
      longer = m["eval_longer_than_max_tokens"]
      extra.append(f"same tokens as evaluate {m['same']}/{m['compared']} ({m['differ']} differ, "
                   f"{m['no_eval_record']} without a record"
                   f"{f', {longer} records cut to max_tokens' if longer else ''}); accuracy server "
                   f"{acc(m['server_accuracy'])}, evaluate {acc(m['eval_accuracy'])} over {m['scored']}")
    if extra:
      lines.append(f"c={c}: " + "; ".join(extra))
  lines += [f"note: {n}" for n in state.summary["notes"]]
  return "\n".join(lines)


# ---------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
  from dmax_jax import decoding  # pylint: disable=import-outside-toplevel
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  p = argparse.ArgumentParser(
      prog="tools/bench_serve.py", description="serve.py under load (open-loop arrivals, concurrency levels) beside "
      "decode.py's static batching and bench_decode's forward, on the same requests.",
      epilog="Flags after a lone -- go to serve.py as they are (e.g. -- --mesh expert=8).")
  p.add_argument("--checkpoint", required=True, help="checkpoint directory (with --random-weights: config.json and "
                 "tokenizer only, e.g. from tools/make_bench_checkpoint.py)")
  w = p.add_argument_group("workload")
  w.add_argument("--data", help="GSM8K-format JSONL: its questions rendered as tools/evaluate.py renders them "
                 "(default: synthetic GSM8K-like prompts of random ids)")
  w.add_argument("--requests", type=int, default=None,
                 help="requests per level (default: every --data question, else max(4c, 64))")
  w.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each request (default 256)")
  w.add_argument("--mixed", action="store_true", help="max_tokens uniform in [--min-tokens, --max-tokens] per request")
  w.add_argument("--min-tokens", type=int, default=64, help="the smallest max_tokens with --mixed (default 64)")
  w.add_argument("--prompt-mean", type=float, default=loadgen.SYNTHETIC["mean"], help="synthetic prompt length mean")
  w.add_argument("--prompt-sd", type=float, default=loadgen.SYNTHETIC["sd"], help="... standard deviation")
  w.add_argument("--prompt-min", type=int, default=loadgen.SYNTHETIC["low"], help="... clipped below at")
  w.add_argument("--prompt-max", type=int, default=loadgen.SYNTHETIC["high"], help="... clipped above at")
  w.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
  ld = p.add_argument_group("load")
  ld.add_argument("--concurrency", default="1,8,32,128", help="levels: most requests in flight (default 1,8,32,128)")
  ld.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (default inf: all at once)")
  ld.add_argument("--warmup", type=int, default=None,
                  help="untimed warm-up requests of one block, sent at once (default: the largest level; 0: none)")
  d = p.add_argument_group("decoding (server and static decode alike)")
  d.add_argument("--strategy", default="spd", choices=tuple(decoding.STRATEGIES))
  d.add_argument("--threshold", type=float, default=None, help="the strategy's threshold (default: its own)")
  d.add_argument("--k", type=int, default=None, help="low_confidence: tokens per step (default: its own, 6)")
  d.add_argument("--confidence-stop", type=float, default=0.9, help="SPD's stop rule (default 0.9)")
  d.add_argument("--block-length", type=int, default=32, help="block length (default 32)")
  d.add_argument("--dtype", default="float32", choices=sorted(runner.DTYPES), help="params and compute dtype")
  d.add_argument("--kernels", default="auto", choices=("auto",) + tuple(runner.KERNELS))
  d.add_argument("--random-weights", action="store_true",
                 help="params drawn from the checkpoint's config.json (serve.py --random-weights; random_model)")
  d.add_argument("--routing", default=None, choices=("learned", "uniform"),
                 help="with --random-weights: the MoE routing (default uniform: random top-k, as bench_decode)")
  s = p.add_argument_group("server")
  s.add_argument("--max-slots", type=int, default=None, help="serve.py --max-slots (default: the largest level)")
  s.add_argument("--window", type=int, default=None,
                 help="serve.py --window (default: the longest request's prompt + max_tokens, in whole blocks)")
  s.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
  s.add_argument("--startup-timeout", type=float, default=3600.0, help="seconds to wait for /health (default 3600)")
  s.add_argument("--api-key", default=os.environ.get("DMAX_API_KEY"),
                 help="the server's key (default $DMAX_API_KEY, which the server reads too)")
  b = p.add_argument_group("baselines and output")
  b.add_argument("--phases", default=",".join(PHASES), help=f"what to run (default {','.join(PHASES)})")
  b.add_argument("--no-baselines", action="store_true", help="the server phase only")
  b.add_argument("--static-max", type=int, default=64, help="static batching at levels up to this (default 64)")
  b.add_argument("--backends", default="pallas", help="bench_decode --backends (default pallas)")
  b.add_argument("--weights", default="bf16", help="bench_decode --weights (default bf16)")
  b.add_argument("--compare-eval", metavar="EVAL.jsonl",
                 help="tools/evaluate.py records of --data: compare tokens and accuracy with the server's")
  b.add_argument("--json", metavar="OUT", help="summary JSON (and OUT's stem + .requests.jsonl); also the resume state")
  b.add_argument("--fresh", action="store_true", help="ignore (and overwrite) the results already in --json")
  return p


def _on_sigterm(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def bench(argv: Sequence[str]) -> int:
  argv = list(argv)
  server_extra = argv[argv.index("--") + 1:] if "--" in argv else []
  args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  phases = [t.strip() for t in args.phases.split(",") if t.strip()]
  if set(phases) - set(PHASES):
    raise BenchError(f"--phases: comma-separated {', '.join(PHASES)}, got {args.phases!r}")
  if args.no_baselines:
    phases = [p for p in phases if p == "server"]
  try:
    import httpx  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise BenchError("bench_serve needs httpx: pip install httpx (the test extra has it)") from None
  plan = make_plan(args, server_extra)
  state = State(args.json, fingerprint(plan.settings()), args.fresh)
  state.summary.update(command=shlex.join(["python", "tools/bench_serve.py", *argv]), settings=plan.settings(),
                       workload=plan.workload, levels=plan.levels)
  say("device: probing")
  device = device_info()
  old = state.summary.get("device")
  if old and old.get("device_kind") != device.get("device_kind"):
    raise BenchError(f"{args.json} was measured on {old.get('device_kind')}, this machine has "
                     f"{device.get('device_kind')}: give another --json, or --fresh")
  state.summary["device"] = device
  say(f"device: {device['device_kind']} ({device['platform']}); workload: {json.dumps(plan.workload['pool'])}")
  state.save()
  if "server" in phases:
    run_server_phase(plan, state)
  if "static" in phases:
    run_static_phase(plan, state)
  if "forward" in phases:
    run_forward_phase(plan, state, device)
  comparisons(plan, state)
  print(report(plan, state))
  if args.json:
    say(f"results: {args.json}, {state.requests_path}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tools/bench_serve.py``'s entry point (and ``static SPEC OUT``, the static decode's child process)."""
  from_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["static"]:
    return static_worker(*argv[1:3])
  if from_command_line:  # this process only drives: the device is the children's (tests keep their own JAX)
    import jax  # pylint: disable=import-outside-toplevel

    jax.config.update("jax_platforms", "cpu")
  previous = signal.signal(signal.SIGTERM, _on_sigterm)  # a SIGTERM stops the server too
  try:
    return bench(argv)
  except BenchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: the server was stopped; rerun the same command (with --json) to resume", file=sys.stderr)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  sys.exit(main())
