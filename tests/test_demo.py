"""The demo: generated problems checked by re-computation, and the whole pipeline at toy size."""

import json
import os
import re

import pytest

from configs import demo_cpu
from dmax_jax import arith, demo, gsm8k

STEP = re.compile(r"<<([0-9+\-*/]+)=(\d+)>>(\d+)")


def test_problems_are_deterministic_and_differ_by_seed():
  assert arith.problems(20, 3) == arith.problems(20, 3)
  assert arith.problems(20, 3) != arith.problems(20, 4)


def test_every_annotation_and_final_answer_is_right():
  for p in arith.problems(400, 0):
    lines = p["answer"].split("\n")
    assert lines[-1].startswith("#### ")
    steps = [STEP.search(line) for line in lines[:-1]]
    assert steps and all(steps), p["answer"]
    for m in steps:
      a, op, b = re.fullmatch(r"(\d+)([+\-*/])(\d+)", m.group(1)).groups()
      value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
      assert value == int(m.group(2)) == int(m.group(3)), p["answer"]
      assert value >= 0
    final = gsm8k.reference_answer(p["answer"])
    assert final == steps[-1].group(2) and 0 <= int(final) < 1000
    # Every number the question gives is a plain integer the answer can use.
    assert all(n.isdigit() for n in re.findall(r"\d+", p["question"]))


def test_test_split_is_held_out():
  train, test = arith.splits(300, 50, 0)
  assert len(train) == 300 and len(test) == 50
  assert not {p["question"] for p in train} & {p["question"] for p in test}
  assert [p["id"] for p in test] == list(range(50))


def test_keep_generation():
  assert demo.keep_generation("nonsense", "all")
  assert demo.keep_generation("3*4=<<3*4=12>>12\n#### 12", "well_formed")
  assert not demo.keep_generation("3*4 is 12", "well_formed")
  with pytest.raises(demo.DemoError, match="config.distill.keep"):
    demo.keep_generation("x", "some")


def test_headline_compares_oput_spd_with_base_threshold():
  def row(model, strategy, threshold, acc, tpf):
    return {"model": model, "strategy": strategy, "threshold": threshold, "accuracy": acc, "tpf": tpf}

  rows = [row("base", "threshold", 0.9, 0.80, 1.5), row("base", "threshold", 0.5, 0.60, 3.0),
          row("base", "spd", 0.5, 0.81, 1.2), row("oput", "spd", 0.5, 0.70, 6.0), row("oput", "spd", 0.8, 0.795, 4.5)]
  text = demo.headline(rows)
  assert "base best accuracy 81.0%" in text and "(0.9): accuracy 80.0%, TPF 1.50" in text
  assert "threshold 0.8, accuracy 79.5%, TPF 4.50 (3.00x)" in text


def toy_config():
  c = demo_cpu.get_config()
  c.data.n_train, c.data.n_test = 64, 8
  c.tokenizer_vocab = 512
  c.model.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 intermediate_size=64, moe_intermediate_size=16, num_experts=4, n_group=2, topk_group=1)
  c.max_seq_len = 64
  c.sft.steps, c.sft.batch_size = 3, 8
  c.distill.n_prompts, c.distill.batch_size = 8, 8
  c.oput.steps, c.oput.batch_size = 2, 8
  c.eval.gen_length, c.eval.batch_size = 16, 8
  c.eval.threshold_thresholds = (0.5, 0.9)
  c.eval.spd_thresholds = (0.5,)
  return c


def test_pipeline_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path / "demo")
  config = toy_config()
  text = demo.run(config, workdir, progress=False)
  for path in ("data/train.jsonl", "data/test.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
               "base/config.json", "base/tokenizer.json", "distill/oput.jsonl", "oput_model/config.json",
               "report.json", "report.md", "tradeoff.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert len(open(os.path.join(workdir, "distill", "oput.jsonl")).readlines()) == 8  # keep="all"
  report = json.load(open(os.path.join(workdir, "report.json")))
  combos = {(r["model"], r["strategy"]) for r in report["results"]}
  assert combos == {("base", "threshold"), ("base", "spd"), ("oput", "threshold"), ("oput", "spd")}
  got = sorted((r["model"], r["strategy"], r["threshold"]) for r in report["results"])
  want = sorted([(m, "threshold", t) for m in ("base", "oput") for t in (0.5, 0.9)] +
                [(m, "spd", 0.5) for m in ("base", "oput")])
  assert got == want
  assert all(r["n"] == r["of"] == 8 and r["tpf"] > 0 for r in report["results"])
  assert text.count("\n| base |") == 3 and text.count("\n| oput |") == 3
  # The OPUT stage started from the base model and trained its own steps.
  oput_metrics = [json.loads(line) for line in open(os.path.join(workdir, "oput", "metrics.jsonl"))]
  assert [m["step"] for m in oput_metrics] == [1, 2]
  # A second run finds every stage done and rebuilds the same table without training or decoding.
  mtime = os.path.getmtime(os.path.join(workdir, "base", "config.json"))
  assert demo.run(config, workdir, progress=False) == text
  assert os.path.getmtime(os.path.join(workdir, "base", "config.json")) == mtime
  assert len(open(os.path.join(workdir, "oput", "metrics.jsonl")).readlines()) == 2
