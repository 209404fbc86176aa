"""tools/evaluate.py: GSM8K scoring per (strategy, threshold), resumable, on the tiny model."""

import json

import pytest

from dmax_jax import decoding, evaluate
from dmax_jax.hf import load_hf_checkpoint
from dmax_jax.records import read_records
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
      {"strategy": "spd", "threshold": 0.5, "id": 1, "correct": True, "strict": True, "num_tokens": 10, "nfe": 5,
       "prefill_calls": 1, "tpf": 2.0, "seconds": 1.0},
      {"strategy": "spd", "threshold": 0.5, "id": 2, "correct": False, "num_tokens": 6, "nfe": 1, "prefill_calls": 1,
       "tpf": 6.0, "seconds": 3.0},
      {"strategy": "spd", "threshold": 0.7, "id": 1, "correct": False, "num_tokens": 1, "nfe": 1, "prefill_calls": 1,
       "tpf": 1.0, "seconds": 1.0},  # another threshold
      {"strategy": "spd", "threshold": 0.5, "id": 9, "correct": False, "num_tokens": 1, "nfe": 1, "prefill_calls": 1,
       "tpf": 1.0, "seconds": 1.0},  # an id outside the evaluated set
  ]
  s = evaluate.summarize(rows, "spd", 0.5, [1, 2, 3])
  assert (s["n"], s["of"]) == (2, 3)
  assert s["accuracy"] == 0.5 and s["strict_accuracy"] == 0.5 and s["mean_tpf"] == 4.0
  assert s["tpf"] == 16 / 6 and s["tpf_with_prefill"] == 16 / 8 and s["tokens_per_second"] == 16 / 4
  table = evaluate.markdown_table([s])
  assert "| spd | 0.5 | 2/3 | 50.0% | 50.0% | 4.00 | 2.00 | 4.0 | 8.0 |" in table


def test_score_adds_prediction_and_correctness():
  rec = evaluate.score({"output": "so 2 + 3 = 5.\n#### 5", "reference": "5"})
  assert rec["prediction"] == "5" and rec["correct"] is True and rec["strict"] is False  # no <<..>> step
  rec = evaluate.score({"output": "<<2+3=5>>5\n#### 5", "reference": "5"})
  assert rec["correct"] is True and rec["strict"] is True
  rec = evaluate.score({"output": "I think it is 1,000", "reference": "100"})
  assert rec["prediction"] == "1000" and rec["correct"] is False


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
  ids = tok.encode(f"<role>HUMAN</role>What is 3 + 4?{MATH_SUFFIX}<|role_end|><role>ASSISTANT</role>")
  (gen,) = decoding.generate(params, cfg, [ids], strategy=decoding.SPD(threshold=0.5), gen_length=16, block_length=8)
  assert [r["tokens"] for r in records if r["id"] == 2 and r["strategy"] == "spd"] == [gen.tokens]
  report = json.loads((tmp_path / "eval" / "rec.json").read_text())
  assert [(r["strategy"], r["threshold"], r["n"]) for r in report["results"]] == [("spd", 0.5, 3), ("threshold", 0.5, 3)]
  md_rows = [l for l in (tmp_path / "eval" / "rec.md").read_text().splitlines() if l.startswith("| ")]
  assert [l.split(" | ")[:3] for l in md_rows[2:]] == [["| spd", "0.5", "3/3"], ["| threshold", "0.5", "3/3"]]
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

  def fake_generate(params, config, prompts, **kw):
    del params, config, kw
    return [decoding.Generation(tok.encode("so the answer is\n#### 5"), 4, 1, None) for _ in prompts]

  monkeypatch.setattr(decoding, "generate", fake_generate)
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
])
def test_usage_errors(tmp_path, ckpt, data, capsys, extra, message):
  argv = ["--checkpoint", ckpt, "--data", data, "--output", str(tmp_path / "r.jsonl"), "--no-progress", *extra]
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
