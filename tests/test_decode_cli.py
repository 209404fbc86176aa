"""decode.py end to end on the tiny fixture model with a freshly trained 512-token tokenizer."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, generate_as_cli_batches
from dmax_jax import decoding
from dmax_jax.decoding import engine
from dmax_jax.apps import runner
from dmax_jax.apps.cli import decode_main
from dmax_jax.checkpoints.hf import load_hf_checkpoint
from dmax_jax.apps.records import RecordWriter, read_records
from dmax_jax.tokenizer import MATH_SUFFIX, load_tokenizer
from tiny_ckpt import make_checkpoint

GEN = ["--gen-length", "16", "--block-length", "8", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(ckpt):
  cfg, params = load_hf_checkpoint(ckpt)
  return cfg, params, load_tokenizer(ckpt)


def write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


GOOD = [
    {"question": "What is 2 + 3?"},
    {"id": "fox", "prompt": "The quick brown fox"},
    {"id": "chat", "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                                {"role": "user", "content": "how are you?"}]},
]


def expected_ids(tok):
  """The prompt ids each GOOD line must be decoded from (restated from the documented input rules)."""
  return {
      1: tok.encode("<role>HUMAN</role>What is 2 + 3?" + MATH_SUFFIX + "<|role_end|><role>ASSISTANT</role>"),
      "fox": tok.encode("The quick brown fox"),
      "chat": tok.encode("<role>HUMAN</role>hello<|role_end|><role>ASSISTANT</role>hi<|role_end|>"
                         "<role>HUMAN</role>how are you?<|role_end|><role>ASSISTANT</role>"),
  }


def _decode_matches_generate(tmp_path, ckpt, model, kernels):
  cfg, params, tok = model
  cfg = dataclasses.replace(cfg, **runner.KERNELS[kernels])
  inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
  out = tmp_path / "out.jsonl"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "2", "--math",
                    "--strategy", "threshold", "--threshold", "0.3", "--kernels", kernels, *GEN])
  assert rc == 0
  records = read_records(str(out))
  assert sorted(map(str, (r["id"] for r in records))) == ["1", "chat", "fox"]
  ids = expected_ids(tok)
  names = [1, "fox", "chat"]  # GOOD's order
  gens = dict(zip(names, generate_as_cli_batches(params, cfg, [ids[n] for n in names], batch_size=2,
                                                 strategy=decoding.Threshold(threshold=0.3), gen_length=16,
                                                 block_length=8)))
  for rec in records:
    gen = gens[rec["id"]]
    assert rec["tokens"] == gen.tokens and rec["nfe"] == gen.nfe and rec["prefill_calls"] == gen.prefill_calls
    assert rec["output"] == tok.decode(gen.tokens)
    assert rec["num_tokens"] == len(gen.tokens) and rec["tpf"] == pytest.approx(len(gen.tokens) / gen.nfe)
    assert rec["strategy"] == "threshold" and rec["threshold"] == 0.3 and rec["seconds"] > 0
  assert [r["prompt"] for r in records if r["id"] == "fox"] == ["The quick brown fox"]


def test_decode_end_to_end_matches_generate(tmp_path, ckpt, model):
  _decode_matches_generate(tmp_path, ckpt, model, "xla")


def test_decode_float64_low_confidence_matches_generate_in_float64(tmp_path, ckpt):
  """--dtype float64 (x64 mode scoped to the run) with --strategy low_confidence --k: the records' tokens and nfe
  are generate's in float64, exactly; x64 is off again afterwards (nothing leaks into the tests that follow)."""
  inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
  out = tmp_path / "out.jsonl"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "3", "--math",
                    "--strategy", "low_confidence", "--k", "3", "--dtype", "float64", *GEN])  # one batch: one compile
  assert rc == 0
  assert not jax.config.jax_enable_x64 and jnp.zeros(1, float).dtype == jnp.float32
  records = {r["id"]: r for r in read_records(str(out))}
  with pytest.raises(runner.UsageError, match="x64"):  # float64 params outside x64 would silently be float32
    runner.load_model(ckpt, "float64")
  with jax.enable_x64(True):
    cfg, params = load_hf_checkpoint(ckpt, dtype=jnp.float64, compute_dtype="float64")
    assert params["embed"].dtype == jnp.float64
    ids = expected_ids(load_tokenizer(ckpt))
    names = [1, "fox", "chat"]  # GOOD's order
    compiled = len(engine._PROGRAMS)  # pylint: disable=protected-access
    gens = generate_as_cli_batches(params, cfg, [ids[n] for n in names], batch_size=3,
                                   strategy=decoding.LowConfidence(k=3), gen_length=16, block_length=8)
    assert len(engine._PROGRAMS) == compiled  # pylint: disable=protected-access  # (it ran the CLI's program)
  for name, gen in zip(names, gens):
    rec = records[name]
    assert (rec["tokens"], rec["nfe"]) == (gen.tokens, gen.nfe), name
    assert rec["strategy"] == "low_confidence" and rec["k"] == 3 and rec["settings"]["dtype"] == "float64"


@pytest.mark.gpu
def test_decode_with_the_pallas_kernels_matches_generate_gpu(tmp_path, ckpt, model):
  """What --kernels auto picks on a GPU: prefill and decoding through the Pallas MoE and attention kernels."""
  _decode_matches_generate(tmp_path, ckpt, model, "pallas")


def test_single_prompt_to_stdout(ckpt, capsys):
  rc = decode_main(["--checkpoint", ckpt, "--prompt", "What is 2 + 3?", *GEN])
  assert rc == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  rec = json.loads(line)
  assert rec["id"] == 1 and rec["prompt"] == "What is 2 + 3?" and rec["nfe"] >= 2


def test_resume_after_torn_kill_writes_each_record_once(tmp_path, ckpt):
  prompts = [{"id": i, "question": q} for i, q in enumerate(["one", "two plus two", "three", "hello there"])]
  inp = write_jsonl(tmp_path / "in.jsonl", prompts)
  out = tmp_path / "out.jsonl"
  args = ["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "1", *GEN]
  assert decode_main(args) == 0
  full = {r["id"]: r["tokens"] for r in read_records(str(out))}
  lines = out.read_bytes().split(b"\n")
  out.write_bytes(lines[0] + b"\n" + lines[1][: len(lines[1]) // 2])  # first record + a torn second line
  assert decode_main(args) == 0
  records = read_records(str(out))
  assert sorted(r["id"] for r in records) == [0, 1, 2, 3]
  assert {r["id"]: r["tokens"] for r in records} == full
  assert decode_main(args) == 0  # a third run has nothing left to do
  assert len(read_records(str(out))) == 4


@pytest.mark.slow
def test_resume_after_real_kill(tmp_path, ckpt):
  prompts = [{"id": i, "question": f"question {i}"} for i in range(6)]
  inp = write_jsonl(tmp_path / "in.jsonl", prompts)
  out = tmp_path / "out.jsonl"
  args = ["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "1", *GEN]
  proc = subprocess.Popen([sys.executable, str(REPO / "decode.py"), *args], cwd=REPO, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert 1 <= len(read_records(str(out))) < 6
  assert decode_main(args) == 0
  assert sorted(r["id"] for r in read_records(str(out))) == list(range(6))


def test_bad_lines_are_reported_and_the_rest_runs(tmp_path, ckpt, capsys):
  inp = write_jsonl(tmp_path / "in.jsonl", [
      {"id": "ok1", "question": "What is 2 + 3?"},
      "this is not json",
      {"id": "nofield", "text": "hello"},
      {"id": "empty", "question": "   "},
      {"id": "long", "prompt": "hello there " * 200},
      {"id": "ok2", "prompt": "The quick brown fox"},
      {"id": "ok1", "question": "duplicate"},
  ])
  out = tmp_path / "out.jsonl"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(out), *GEN])
  assert rc == 1
  lines = capsys.readouterr().err.splitlines()
  err = [line for line in lines if line.startswith("error:")]
  assert lines[-1].startswith("2 prompts decoded (0 already done, 5 failed)")  # the count agrees with exit 1
  assert len(err) == 5
  assert any(e.startswith(f"error: {inp}:2: not valid JSON") for e in err)
  assert any(e.startswith(f"error: {inp}:3: no prompt field") for e in err)
  assert any(e.startswith(f"error: {inp}:4: empty prompt") for e in err)
  assert any(e.startswith(f"error: {inp}:5: prompt of") and "max_position_embeddings 256" in e for e in err)
  assert any(e.startswith(f"error: {inp}:7: duplicate id") for e in err)
  assert sorted(r["id"] for r in read_records(str(out))) == ["ok1", "ok2"]


@pytest.mark.parametrize("extra, message", [
    (["--gen-length", "0"], "--gen-length must be positive"),
    (["--input", "/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["--threshold", "1.5"], "threshold must lie in [0, 1]"),
    (["--strategy", "low_confidence", "--k", "0"], "--k must be >= 1"),
])
def test_usage_errors_exit_2(ckpt, capsys, extra, message):
  argv = ["--checkpoint", ckpt, "--gen-length", "16", *extra]
  if "--input" not in extra:
    argv += ["--prompt", "hi"]
  assert decode_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {err[0][7:]}"] and message in err[0]


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_prompt_the_engine_rejects_fails_alone(tmp_path, ckpt, monkeypatch, capsys):
  """A batch the engine rejects is retried prompt by prompt; only the bad one fails."""
  texts = ["hello there, how are you today? hello", "The quick brown fox", "Tom has 1,000 apples and sells them"]
  lengths = [len(load_tokenizer(ckpt).encode(t)) for t in texts]
  assert len(set(lengths)) == 3
  real = decoding.generate

  def picky(params, config, prompts, **kw):
    if any(len(p) == lengths[1] for p in prompts):
      raise ValueError("prompts of this length are not allowed")
    return real(params, config, prompts, **kw)

  monkeypatch.setattr(decoding, "generate", picky)
  inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": t} for i, t in enumerate(texts)])
  out = tmp_path / "out.jsonl"
  assert decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "3", *GEN]) == 1
  assert f"error: {inp}:2: prompts of this length are not allowed" in capsys.readouterr().err
  assert sorted(r["id"] for r in read_records(str(out))) == [0, 2]


def test_missing_checkpoint_exit_2(tmp_path, capsys):
  assert decode_main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
  assert "no such checkpoint directory" in capsys.readouterr().err


def test_corrupt_output_exit_2(tmp_path, ckpt, capsys):
  out = tmp_path / "out.jsonl"
  out.write_text('{"id": 1}\ngarbage\n{"id": 2}\n')
  assert decode_main(["--checkpoint", ckpt, "--prompt", "hi", "--output", str(out), *GEN]) == 2
  assert f"error: {out}:2: not a JSON record" in capsys.readouterr().err


@pytest.mark.slow  # 8 s: keeps the default suite under ten minutes on 2 cores
def test_trace_html_shows_every_step(tmp_path, ckpt, model, capsys):
  cfg, params, tok = model
  inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
  html_path = tmp_path / "trace.html"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(tmp_path / "o.jsonl"),
                    "--trace", str(html_path), "--math", *GEN])
  assert rc == 0
  page = html_path.read_text()
  ids = expected_ids(tok)
  gens = generate_as_cli_batches(params, cfg, [ids[1], ids["fox"]], strategy=decoding.SPD(), gen_length=16,
                                 block_length=8, trace=True)
  steps = [s for g in gens for s in g.trace]
  assert page.count('<tr class="step') == len(steps) == sum(g.nfe for g in gens)
  assert page.count('<span class="t ') == 8 * len(steps) + 5  # 8 tokens a step, plus the 5-entry legend
  for status in ("prompt", "mask", "new", "same"):
    assert page.count(f'<span class="t {status}"') == sum(s.status.count(status) for s in steps) + 1
  assert "http://" not in page and "https://" not in page and "<script src" not in page
  assert "id fox" in page and "id 1" in page
  # blocks are numbered from the start of the generation (block 1 holds the first generated token)
  for g, prompt in zip(gens, (ids[1], ids["fox"])):
    assert sorted({s.block for s in g.trace}) == list(range(-(-(len(prompt) + 16) // 8) - len(prompt) // 8))
  assert len(ids[1]) > 8 and page.count("<h3>block 1 (") == 2 and "<h3>block 0 (" not in page
  # a rerun has nothing to decode: the page stays as it was
  assert decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(tmp_path / "o.jsonl"),
                      "--trace", str(html_path), "--math", *GEN]) == 0
  assert html_path.read_text() == page
  assert f"note: nothing was decoded in this run, so {html_path} was not written" in capsys.readouterr().err


def test_record_writer_drops_torn_tail(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_bytes(b'{"id": 1, "x": 1}\n{"id": "1", "x": 2}\n{"id": 3, "x"')
  with RecordWriter(str(path), ("id",)) as w:
    assert [r["x"] for r in w.existing] == [1, 2]
    assert w.has({"id": 1}) and w.has({"id": "1"}) and not w.has({"id": 3})
    w.write([{"id": 3, "x": 3}])
  assert path.read_text().splitlines()[-1] == '{"id": 3, "x": 3}'
  assert [r["x"] for r in read_records(str(path))] == [1, 2, 3]


# ---- resume by settings, failures, outputs (each bad input: one line, nothing half-written) ----

def _stderr_lines(capsys) -> list[str]:
  err = capsys.readouterr().err
  assert "Traceback" not in err and "WARNING" not in err, err
  return err.strip().splitlines()


def test_resume_keys_on_every_setting(tmp_path, ckpt, capsys):
  """A rerun reuses a record only when the prompt and every setting match; other records stay, unused."""
  inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "question": "one plus one"}, {"id": "b", "question": "hi"}])
  out = tmp_path / "out.jsonl"
  base = ["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "2", *GEN]

  def run(*extra):
    assert decode_main([*base, *extra]) == 0
    return _stderr_lines(capsys)[-1]

  assert run().startswith("2 prompts decoded (0 already done, 0 failed)")
  assert run().startswith("0 prompts decoded (2 already done, 0 failed)")
  copy = shutil.copytree(ckpt, tmp_path / "same_weights_elsewhere")
  assert run("--kernels", "xla").startswith("0 prompts decoded (2 already done")  # what auto picks on the CPU
  changes = (["--threshold", "0.7"], ["--confidence-stop", "0.8"], ["--seed", "1"], ["--kernels", "pallas"],
             ["--checkpoint", str(copy)], ["--math"])  # --kernels and --math compile programs of their own
  for changed in changes:
    assert run(*changed).startswith("2 prompts decoded (0 already done, 0 failed)"), changed
  records = read_records(str(out))
  assert len(records) == 2 * (1 + len(changes))
  assert len({json.dumps(r["settings"], sort_keys=True) for r in records}) == len(changes)  # --math: same settings
  assert len({r["prompt_hash"] for r in records}) == 4  # --math changes both prompts' ids
  assert {r["settings"]["checkpoint"] for r in records} == {ckpt, str(copy)}
  assert run("--confidence-stop", "0.8").startswith("0 prompts decoded (2 already done")


def test_checkpoint_fingerprint_follows_the_files(tmp_path):
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  (tmp_path / "params").mkdir()
  (tmp_path / "params" / "w").write_bytes(b"1234")
  (tmp_path / "config.json").write_text("{}")
  first = runner.checkpoint_fingerprint(str(tmp_path))
  assert runner.checkpoint_fingerprint(str(tmp_path)) == first
  os.utime(tmp_path / "params" / "w", ns=(1, 1))  # rewritten in place: same size, new time
  assert runner.checkpoint_fingerprint(str(tmp_path)) != first
  settings = runner.checkpoint_settings(str(tmp_path), "float32", 0)
  assert settings["checkpoint"] == str(tmp_path) and settings["checkpoint_fingerprint"] != first


def test_output_problems_are_caught_before_the_model_loads(tmp_path, ckpt, capsys, monkeypatch):
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")

  monkeypatch.setattr(runner, "load_model", no_load)
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  cases = {
      ("--output", str(tmp_path)): f"error: {tmp_path}: is a directory, not a file",
      ("--output", str(a_file / "out.jsonl")): f"error: {a_file / 'out.jsonl'}: cannot be created ({a_file} is not a directory)",
      ("--trace", str(tmp_path)): f"error: {tmp_path}: is a directory, not a file",
  }
  for extra, message in cases.items():
    assert decode_main(["--checkpoint", ckpt, "--prompt", "hi", *extra, *GEN]) == 2, extra
    assert _stderr_lines(capsys) == [message]
  assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_disk_full_keeps_complete_records_and_resumes(tmp_path, ckpt, capsys, monkeypatch):
  prompts = [{"id": i, "question": q} for i, q in enumerate(["one", "two plus two", "three"])]
  inp = write_jsonl(tmp_path / "in.jsonl", prompts)
  out = tmp_path / "out.jsonl"
  args = ["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "1", *GEN]
  real_fsync, calls = os.fsync, []

  def fsync(fd):
    calls.append(fd)
    if len(calls) >= 2:  # the second batch's records do not fit
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)

  monkeypatch.setattr(os, "fsync", fsync)
  assert decode_main(args) == 1
  assert _stderr_lines(capsys) == [f"error: {out}: No space left on device"]
  assert out.read_bytes().count(b"\n") == 1 and out.read_bytes().endswith(b"\n")  # one whole record, no torn line
  assert [r["id"] for r in read_records(str(out))] == [0]
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert decode_main(args) == 0
  assert sorted(r["id"] for r in read_records(str(out))) == [0, 1, 2]


def test_non_utf8_lines_and_unknown_fields(tmp_path, ckpt, capsys):
  inp = tmp_path / "in.jsonl"
  inp.write_bytes(b'{"id": "a", "question": "hello", "tags": ["x"]}\n'
                  b'{"id": "b", "question": "caf\xe9 au lait"}\n'
                  b'{"id": "c", "prompt": "The quick brown fox", "tags": [], "source": "web"}\n')
  out = tmp_path / "out.jsonl"
  assert decode_main(["--checkpoint", ckpt, "--input", str(inp), "--output", str(out), *GEN]) == 1
  warning, error, summary = _stderr_lines(capsys)
  assert warning == (f'warning: {inp}: ignoring unknown fields "tags" (line 1), "source" (line 3); '
                     "the fields read are id, question, messages, prompt")
  assert error == f"error: {inp}:2: not UTF-8 text (byte 0xe9 at column 29)"
  assert summary.startswith("2 prompts decoded (0 already done, 1 failed)")
  assert sorted(r["id"] for r in read_records(str(out))) == ["a", "c"]


def _with_template(ckpt, path, template):
  shutil.copytree(ckpt, path)
  cfg = json.loads((path / "tokenizer_config.json").read_text())
  cfg["chat_template"] = template
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return str(path)


def test_chat_templates_get_what_transformers_gives_them(tmp_path, ckpt, capsys):
  template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns here') }}"
              "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.content == 'skip' %}{% continue %}"
              "{% endif %}<role>HUMAN</role>{{ m.content | tojson }}<|role_end|>{% endfor %}"
              "{{ strftime_now('%Y') | length }}<role>ASSISTANT</role>")
  path = _with_template(ckpt, tmp_path / "ckpt", template)
  inp = write_jsonl(tmp_path / "in.jsonl", [
      {"id": "ok", "messages": [{"role": "user", "content": "skip"}, {"role": "user", "content": "say \"hi\""},
                                {"role": "user", "content": "never rendered"}]},
      {"id": "sys", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
  ])
  out = tmp_path / "out.jsonl"
  assert decode_main(["--checkpoint", path, "--input", inp, "--output", str(out), *GEN]) == 1
  lines = _stderr_lines(capsys)
  assert lines[0] == (f"error: {inp}:2: the chat template of {path}/tokenizer_config.json refused it: "
                      "no system turns here")
  (rec,) = read_records(str(out))
  assert rec["prompt"] == '<role>HUMAN</role>"say \\"hi\\""<|role_end|>4<role>ASSISTANT</role>'

  hostile = _with_template(ckpt, tmp_path / "hostile", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
  broken = _with_template(ckpt, tmp_path / "broken", "{% for %}")
  for bad, problem in ((hostile, "the chat template tried something unsafe, stopped by the sandbox"),
                       (broken, "the chat template does not compile (line 1")):
    for source in (["--input", inp], ["--prompt", "hi"]):
      assert decode_main(["--checkpoint", bad, *source, "--output", str(tmp_path / "o.jsonl"), *GEN]) == 2
      (line,) = _stderr_lines(capsys)
      assert line.startswith(f"error: {bad}/tokenizer_config.json: {problem}"), line
  assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
  from dmax_jax.checkpoints.converted import convert_hf  # pylint: disable=import-outside-toplevel

  out = str(tmp_path_factory.mktemp("conv") / "ckpt")
  convert_hf(ckpt, out, progress=False)
  return out


def test_converted_checkpoint_loads_quietly_and_broken_ones_give_one_line(tmp_path, converted, capsys):
  r = subprocess.run([sys.executable, "decode.py", "--checkpoint", converted, "--prompt", "hi", *GEN], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "prompts decoded" in r.stderr, r.stderr  # the summary alone
  from test_checkpoint import broken_copies  # pylint: disable=import-outside-toplevel

  broken = broken_copies(converted, tmp_path / "in")
  r = subprocess.run([sys.executable, "decode.py", "--checkpoint", broken["chunk"][0], "--prompt", "hi", *GEN],
                     cwd=REPO, capture_output=True, text=True, timeout=300)  # a real process: nothing after the line
  assert r.returncode == 2 and r.stderr.splitlines() == [
      f"error: {broken['chunk'][0]}/params/moe.w_up: cannot read the stored parameters (Error reading local file "
      f"\"{broken['chunk'][1]}\": ZSTD_decompressStream() failed: Unknown frame descriptor; at byte 0; "
      "at uncompressed byte 0)"], r.stderr[-2000:]
  for case, (path, victim) in broken.items():
    out = tmp_path / f"{case}.jsonl"
    assert decode_main(["--checkpoint", path, "--prompt", "hi", "--output", str(out), *GEN]) == 2, case
    (line,) = _stderr_lines(capsys)
    assert line.startswith("error: ") and victim in line, (case, line)
    assert not out.exists(), case


@pytest.mark.slow  # 23-31 s: keeps the default suite under ten minutes on 2 cores
def test_self_distillation_decode_then_train(tmp_path, ckpt):
  """decode.py --records training writes what train.py reads: the conversation plus the generated answer."""
  from dmax_jax.training.data import read_conversations  # pylint: disable=import-outside-toplevel

  questions = ["What is 2 + 3?", "hello there", "Tom has 5 apples", "the lazy dog"]
  lines = [{"question": q} for q in questions[:3]] + [{"messages": [{"role": "user", "content": questions[3]}]}]
  inp = write_jsonl(tmp_path / "in.jsonl", lines)
  data, full = tmp_path / "distill.jsonl", tmp_path / "full.jsonl"
  assert decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(full), "--math", *GEN]) == 0
  assert decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(data), "--records", "training",
                      "--math", *GEN]) == 0
  records = read_records(str(data))
  outputs = {r["id"]: r["output"] for r in read_records(str(full))}
  want = [[{"role": "user", "content": q + (MATH_SUFFIX if i < 3 else "")}, {"role": "assistant", "content": outputs[i + 1]}]
          for i, q in enumerate(questions)]
  assert sorted(map(json.dumps, read_conversations(str(data)))) == sorted(map(json.dumps, want))
  assert all(set(rec) == {"id", "messages", "prompt_hash", "settings"} for rec in records)
  work = tmp_path / "work"
  r = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={work}",
                      f"--config.init_from={ckpt}", f"--config.data.path={data}", "--config.data.max_seq_len=32",
                      "--config.train.max_steps=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  steps = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [s["step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) for s in steps)
