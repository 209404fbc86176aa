"""decode.py end to end on the tiny fixture model with a freshly trained 512-token tokenizer."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from dmax_jax import decoding
from dmax_jax.cli import decode_main
from dmax_jax.hf import load_hf_checkpoint
from dmax_jax.records import RecordWriter, read_records
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


def test_decode_end_to_end_matches_generate(tmp_path, ckpt, model):
  cfg, params, tok = model
  inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
  out = tmp_path / "out.jsonl"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(out), "--batch-size", "2", "--math",
                    "--strategy", "threshold", "--threshold", "0.3", *GEN])
  assert rc == 0
  records = read_records(str(out))
  assert sorted(map(str, (r["id"] for r in records))) == ["1", "chat", "fox"]
  for rec in records:
    ids = expected_ids(tok)[rec["id"]]
    (gen,) = decoding.generate(params, cfg, [ids], strategy=decoding.Threshold(threshold=0.3), gen_length=16,
                               block_length=8)
    assert rec["tokens"] == gen.tokens and rec["nfe"] == gen.nfe and rec["prefill_calls"] == gen.prefill_calls
    assert rec["output"] == tok.decode(gen.tokens)
    assert rec["num_tokens"] == len(gen.tokens) and rec["tpf"] == pytest.approx(len(gen.tokens) / gen.nfe)
    assert rec["strategy"] == "threshold" and rec["threshold"] == 0.3 and rec["seconds"] > 0
  assert [r["prompt"] for r in records if r["id"] == "fox"] == ["The quick brown fox"]


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
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
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
])
def test_usage_errors_exit_2(ckpt, capsys, extra, message):
  argv = ["--checkpoint", ckpt, "--gen-length", "16", *extra]
  if "--input" not in extra:
    argv += ["--prompt", "hi"]
  assert decode_main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {err[0][7:]}"] and message in err[0]


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


def test_trace_html_shows_every_step(tmp_path, ckpt, model):
  cfg, params, tok = model
  inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
  html_path = tmp_path / "trace.html"
  rc = decode_main(["--checkpoint", ckpt, "--input", inp, "--output", str(tmp_path / "o.jsonl"),
                    "--trace", str(html_path), "--math", *GEN])
  assert rc == 0
  page = html_path.read_text()
  ids = expected_ids(tok)
  gens = decoding.generate(params, cfg, [ids[1], ids["fox"]], strategy=decoding.SPD(), gen_length=16,
                           block_length=8, trace=True)
  steps = [s for g in gens for s in g.trace]
  assert page.count('<tr class="step') == len(steps) == sum(g.nfe for g in gens)
  assert page.count('<span class="t ') == 8 * len(steps) + 5  # 8 tokens a step, plus the 5-entry legend
  for status in ("prompt", "mask", "new", "same"):
    assert page.count(f'<span class="t {status}"') == sum(s.status.count(status) for s in steps) + 1
  assert "http://" not in page and "https://" not in page and "<script src" not in page
  assert "id fox" in page and "id 1" in page


def test_record_writer_drops_torn_tail(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_bytes(b'{"id": 1, "x": 1}\n{"id": "1", "x": 2}\n{"id": 3, "x"')
  with RecordWriter(str(path), ("id",)) as w:
    assert [r["x"] for r in w.existing] == [1, 2]
    assert w.has({"id": 1}) and w.has({"id": "1"}) and not w.has({"id": 3})
    w.write([{"id": 3, "x": 3}])
  assert path.read_text().splitlines()[-1] == '{"id": 3, "x": 3}'
  assert [r["x"] for r in read_records(str(path))] == [1, 2, 3]
