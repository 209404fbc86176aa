"""tools/evaluate.py: GSM8K scoring per (strategy, threshold), resumable, on the tiny model."""

import json

import pytest

from conftest import generate_as_cli_batches
from dmax_jax import decoding
from dmax_jax.apps import evaluate
from dmax_jax.checkpoints.hf import load_hf_checkpoint
from dmax_jax.apps.records import read_records
from dmax_jax.tokenizer import MATH_SUFFIX, load_tokenizer
from tiny_ckpt import make_checkpoint

GEN = ["--gen-length", "16", "--block-length", "8", "--no-progress", "--batch-size", "2"]
# Hand-written GSM8K-format lines (never the real data): answers 5, 7, 1000.
DATA = [
    {"question": "Tom has 2 apples and buys 3 more. How many apples?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"},
    "not json",
    {"question": "How much is 10 times 100?", "answer": "It is 1,000 dollars."},
    {"id": "k", "question": "How many grams in a kilogram?", "answer": "#### 1,000"},
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def data(tmp_path):
  path = tmp_path / "gsm.jsonl"
  path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in DATA))
  return str(path)


def test_summarize_by_hand():
  rows = [
      {"correct": True, "strict": True, "num_tokens": 10, "nfe": 5, "prefill_calls": 1, "tpf": 2.0, "seconds": 1.0},
      {"correct": False, "num_tokens": 6, "nfe": 1, "prefill_calls": 1, "tpf": 6.0, "seconds": 3.0},
  ]
  s = evaluate.summarize(rows, "spd", 0.5, of=4, rejected=1)  # one rejected, one failed: both count as wrong
  assert (s["n"], s["of"], s["rejected"]) == (2, 4, 1)
  assert s["accuracy"] == 1 / 4 and s["strict_accuracy"] == 1 / 4 and s["mean_tpf"] == 4.0
  assert s["tpf"] == 16 / 6 and s["tpf_with_prefill"] == 16 / 8 and s["tokens_per_second"] == 16 / 4
  table = evaluate.markdown_table([s])
  assert "| spd | 0.5 | 2/4 | 1 | 25.0% | 25.0% | 4.00 | 2.00 | 4.0 | 8.0 |" in table


def test_select_keys_on_prompt_and_every_setting():
  from dmax_jax.apps import runner  # pylint: disable=import-outside-toplevel

  reqs = [runner.Request(1, "", "q1", [5, 6]), runner.Request(2, "", "q2", [7])]
  a = {"strategy": "spd", "threshold": 0.5, "gen_length": 16}
  records = [dict(runner.identity(reqs[0], a), x=1), dict(runner.identity(reqs[1], a), x=2),
             dict(runner.identity(reqs[0], dict(a, gen_length=32)), x=3),  # another length
             dict(runner.identity(runner.Request(1, "", "q1", [5, 9]), a), x=4),  # same id, other prompt ids
             dict(runner.identity(runner.Request(3, "", "q3", [1]), a), x=5)]  # an id outside the set
  assert [r["x"] for r in evaluate.select(records, reqs, a)] == [1, 2]
  assert [r["x"] for r in evaluate.select(records, reqs, dict(a, gen_length=32))] == [3]


def test_score_adds_prediction_and_correctness():
  rec = evaluate.score({"output": "so 2 + 3 = 5.\n#### 5", "reference": "5"})
  assert rec["prediction"] == "5" and rec["correct"] is True and rec["strict"] is False  # no <<..>> step
  rec = evaluate.score({"output": "<<2+3=5>>5\n#### 5", "reference": "5"})
  assert rec["correct"] is True and rec["strict"] is True
  rec = evaluate.score({"output": "I think it is 1,000", "reference": "100"})
  assert rec["prediction"] == "1000" and rec["correct"] is False


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_evaluate_end_to_end_and_resume(tmp_path, ckpt, data, capsys):
  out = tmp_path / "eval" / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", data, "--output", str(out), "--strategies", "spd,threshold",
          "--thresholds", "0.5", *GEN]
  assert evaluate.main(argv) == 1  # two bad data lines
  err = capsys.readouterr().err
  assert f"error: {data}:3: not valid JSON" in err and f"error: {data}:4: reference answer has no '####'" in err
  records = read_records(str(out))
  keys = sorted((r["strategy"], r["threshold"], str(r["id"])) for r in records)
  assert keys == sorted((s, 0.5, i) for s in ("spd", "threshold") for i in ("1", "2", "k"))
  refs = {1: "5", 2: "7", "k": "1000"}
  for r in records:
    assert r["reference"] == refs[r["id"]]
    assert r["correct"] == (r["prediction"] == r["reference"])
  # the math prompt: chat template around question + MATH_SUFFIX
  cfg, params = load_hf_checkpoint(ckpt)
  tok = load_tokenizer(ckpt)
  questions = [d["question"] for d in DATA if isinstance(d, dict) and "####" in d["answer"]]  # ids 1, 2, "k"
  ids = [tok.encode(f"<role>HUMAN</role>{q}{MATH_SUFFIX}<|role_end|><role>ASSISTANT</role>") for q in questions]
  gens = generate_as_cli_batches(params, cfg, ids, strategy=decoding.SPD(threshold=0.5), gen_length=16,
                                 block_length=8)
  spd = {r["id"]: r["tokens"] for r in records if r["strategy"] == "spd"}
  assert [spd[1], spd[2], spd["k"]] == [g.tokens for g in gens]
  report = json.loads((tmp_path / "eval" / "rec.json").read_text())
  assert [(r["strategy"], r["threshold"], r["n"]) for r in report["results"]] == [("spd", 0.5, 3), ("threshold", 0.5, 3)]
  md_rows = [l for l in (tmp_path / "eval" / "rec.md").read_text().splitlines() if l.startswith("| ")]
  assert [l.split(" | ")[:4] for l in md_rows[2:]] == [["| spd", "0.5", "3/3", "0"], ["| threshold", "0.5", "3/3", "0"]]
  # killed midway: keep two records and a torn third; the rerun completes each key exactly once
  lines = out.read_bytes().split(b"\n")
  out.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:10])
  assert evaluate.main(argv) == 1
  again = read_records(str(out))
  assert sorted((r["strategy"], r["threshold"], str(r["id"])) for r in again) == keys
  assert {(r["strategy"], str(r["id"])): r["tokens"] for r in again} == {
      (r["strategy"], str(r["id"])): r["tokens"] for r in records}


def test_accuracy_counts_correct_answers(tmp_path, ckpt, data, monkeypatch):
  """With an engine that always answers 5, exactly the question whose answer is 5 is right."""
  tok = load_tokenizer(ckpt)

  _fake_engine(monkeypatch, tok)
  out = tmp_path / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", data, "--output", str(out), "--strategies", "spd",
          "--thresholds", "0.5,0.9", "--limit", "2", *GEN]
  assert evaluate.main(argv) == 1
  report = json.loads((tmp_path / "rec.json").read_text())["results"]
  assert [(r["threshold"], r["n"], r["accuracy"]) for r in report] == [(0.5, 2, 0.5), (0.9, 2, 0.5)]
  n_tokens = len(tok.encode("so the answer is\n#### 5"))
  assert report[0]["mean_tpf"] == pytest.approx(n_tokens / 4)
  assert report[0]["tpf_with_prefill"] == pytest.approx(n_tokens / 5)


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "beam"], "unknown strategy 'beam'"),
    (["--thresholds", "0.5,x"], "--thresholds must be comma-separated numbers"),
    (["--limit", "0"], "--limit must be positive"),
    (["--gen-length", "-1"], "--gen-length must be positive"),
    (["--output", "/tmp"], "/tmp: is a directory, not a file"),
])
def test_usage_errors(tmp_path, ckpt, data, capsys, extra, message):
  argv = ["--checkpoint", ckpt, "--data", data, "--output", str(tmp_path / "r.jsonl"), "--no-progress", *extra]
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def _fake_engine(monkeypatch, tok, answer="so the answer is\n#### 5", compile_seconds=0.0):
  """generate always answers ``answer``; prepare stands in for compilation (``compile_seconds`` long)."""
  import time  # pylint: disable=import-outside-toplevel

  calls = []

  def fake_prepare(params, config, prompts, **kw):
    del params, config, kw
    calls.append(("prepare", [list(p) for p in prompts]))
    time.sleep(compile_seconds)

  def fake_generate(params, config, prompts, **kw):
    del params, config, kw
    calls.append(("generate", [list(p) for p in prompts]))
    return [decoding.Generation(tok.encode(answer), 4, 1, None) for _ in prompts]

  monkeypatch.setattr(decoding, "prepare", fake_prepare)
  monkeypatch.setattr(decoding, "generate", fake_generate)
  return calls


def test_low_confidence_runs_once_across_thresholds_and_float64_is_scoped(tmp_path, ckpt, monkeypatch):
  """low_confidence has no threshold: a --thresholds sweep runs it once, with --k. --dtype float64 loads and decodes
  in x64 mode, which is off again once evaluate returns."""
  import jax  # pylint: disable=import-outside-toplevel

  tok = load_tokenizer(ckpt)
  seen = []

  def fake_generate(params, config, prompts, *, strategy, **kw):
    del kw
    seen.append((type(strategy).__name__, jax.config.jax_enable_x64, params["embed"].dtype.name, config.compute_dtype))
    return [decoding.Generation(tok.encode("so the answer is\n#### 5"), 4, 1, None) for _ in prompts]

  monkeypatch.setattr(decoding, "prepare", lambda *a, **kw: None)
  monkeypatch.setattr(decoding, "generate", fake_generate)
  data = tmp_path / "gsm.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in (DATA[0], DATA[1])))
  out = tmp_path / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", str(data), "--output", str(out), "--strategies", "low_confidence,spd",
          "--thresholds", "0.5,0.9", "--k", "3", "--dtype", "float64", *GEN]
  assert evaluate.main(argv) == 0
  assert not jax.config.jax_enable_x64
  assert set(seen) == {(name, True, "float64", "float64") for name in ("LowConfidence", "SPD")}
  report = json.loads((tmp_path / "rec.json").read_text())["results"]
  assert [(r["strategy"], r["threshold"], r["n"]) for r in report] == [
      ("low_confidence", None, 2), ("spd", 0.5, 2), ("spd", 0.9, 2)]
  assert {r["k"] for r in read_records(str(out)) if r["strategy"] == "low_confidence"} == {3}
  assert "| low_confidence | - | 2/2 |" in (tmp_path / "rec.md").read_text()


def test_rejected_questions_count_as_wrong_and_compile_time_is_not_timed(tmp_path, ckpt, monkeypatch, capsys):
  tok = load_tokenizer(ckpt)
  calls = _fake_engine(monkeypatch, tok, compile_seconds=0.3)
  data = tmp_path / "gsm.jsonl"
  lines = [DATA[0], DATA[1], {"question": "apples " * 300 + "?", "answer": "#### 5"}]  # the last is too long
  data.write_text("".join(json.dumps(d) + "\n" for d in lines))
  out = tmp_path / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", str(data), "--output", str(out), "--strategies", "spd", "--thresholds",
          "0.5", *GEN]
  assert evaluate.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and err[0].startswith(f"error: {data}:3: prompt of ") and err[1].startswith("report: ")
  (row,) = json.loads((tmp_path / "rec.json").read_text())["results"]
  assert (row["n"], row["of"], row["rejected"], row["accuracy"]) == (2, 3, 1, 1 / 3)  # only question 1's answer is 5
  md = (tmp_path / "rec.md").read_text()
  assert "1 of 3 questions rejected as too long, counted as wrong" in md and "| spd | 0.5 | 2/3 | 1 | 33.3% |" in md
  # each batch is compiled (prepared) before its timer starts: the 0.3 s never reach the figures
  assert [c[0] for c in calls] == ["prepare", "generate"] and calls[0][1] == calls[1][1]
  assert all(r["batch_seconds"] < 0.3 for r in read_records(str(out)))
  assert row["tokens_per_second"] > 2 * len(tok.encode("so the answer is\n#### 5")) / 0.3


def test_all_rejected_writes_no_report(tmp_path, ckpt, monkeypatch, capsys):
  _fake_engine(monkeypatch, load_tokenizer(ckpt))
  data = tmp_path / "gsm.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in (DATA[0], DATA[1])))
  out = tmp_path / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", str(data), "--output", str(out), "--strategies", "spd",
          "--no-progress", "--gen-length", "250", "--block-length", "8"]
  assert evaluate.main(argv) == 1
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"error: {data}: all 2 questions rejected, so no report was written; the first: "
                         f"{data}:1: prompt of ") and "max_position_embeddings 256" in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm.jsonl"]


def test_rerun_with_other_lengths_does_not_reuse_records(tmp_path, ckpt, monkeypatch):
  tok = load_tokenizer(ckpt)
  _fake_engine(monkeypatch, tok)
  data = tmp_path / "gsm.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in (DATA[0], DATA[1])))
  out = tmp_path / "rec.jsonl"
  argv = ["--checkpoint", ckpt, "--data", str(data), "--output", str(out), "--strategies", "spd", "--thresholds",
          "0.5", *GEN]
  assert evaluate.main(argv) == 0
  assert evaluate.main([*argv, "--gen-length", "24"]) == 0
  report = json.loads((tmp_path / "rec.json").read_text())
  assert report["gen_length"] == 24 and report["results"][0]["n"] == 2
  assert sorted(r["gen_length"] for r in read_records(str(out))) == [16, 16, 24, 24]
  assert evaluate.main(argv) == 0  # the first settings again: all reused
  assert len(read_records(str(out))) == 4
