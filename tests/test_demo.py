"""The demo: generated problems checked by re-computation, and the whole pipeline at toy size."""

import importlib
import json
import os
import re
import shlex

import pytest

from conftest import REPO
from configs import demo_cpu
from dmax_jax.apps import arith
from dmax_jax.apps import cli
from dmax_jax.apps import demo
from dmax_jax.apps import evaluate
from dmax_jax.apps import gsm8k

STEP = re.compile(r"<<([0-9+\-*/]+)=(\d+)>>(\d+)")


def test_problems_are_deterministic_and_differ_by_seed():
  assert arith.problems(20, 3) == arith.problems(20, 3)
  assert arith.problems(20, 3) != arith.problems(20, 4)


def test_every_step_carries_the_previous_result_and_is_right():
  orders = set()
  for p in arith.problems(400, 0, 4, 8):
    # The question, read independently: start, daily amount, days.
    start, amount, days = map(int, re.fullmatch(
        r"\w+ has (\d+) \w+s\. Each day (?:he|she) \w+ (\d+) more\. How many \w+s does \w+ have after (\d+) days\?",
        p["question"]).groups())
    assert 4 <= days <= 8
    lines = p["answer"].split("\n")
    assert len(lines) == days + 1
    total = start
    for day, line in enumerate(lines[:-1], 1):
      m = re.fullmatch(r"Day (\d+): <<(\d+)\+(\d+)=(\d+)>>(\d+)", line)
      assert m and int(m.group(1)) == day, line
      a, b, c, shown = (int(g) for g in m.groups()[1:])
      assert (a, b) in ((total, amount), (amount, total)), (total, line)  # the running total, in either order
      orders.add(a == total)
      assert a + b == c == shown and 10 <= c <= 99
      total = c
    assert total == start + days * amount and lines[-1] == f"#### {total}"
    assert gsm8k.reference_answer(p["answer"]) == str(total) and gsm8k.strictly_correct(p["answer"], str(total))
  assert orders == {True, False}  # both spellings occur


def test_week_adds_every_day_once_in_any_order_and_is_right():
  orders, spellings = set(), set()
  for p in arith.problems(400, 0, 4, 7, task="week", amounts=(2, 9)):
    # The question, read independently: the start and each named day's amount.
    start = int(re.match(r"\w+ has (\d+) \w+s\. ", p["question"]).group(1))
    found = {day: int(a) for day, a in re.findall(r"[Oo]n (\w+day) (?:(?:he|she) \w+ )?(\d+)", p["question"])}
    assert 4 <= len(found) <= 7 and list(found) == list(arith.DAYS[:len(found)])
    assert p["question"].endswith("now?") and all(2 <= a <= 9 for a in found.values())
    lines = p["answer"].split("\n")
    total, days = start, []
    for line in lines[:-1]:
      m = re.fullmatch(r"(\w+day): <<(\d+)\+(\d+)=(\d+)>>(\d+)", line)
      assert m, line
      day, (a, b, c, shown) = m.group(1), (int(g) for g in m.groups()[1:])
      assert (a, b) in ((total, found[day]), (found[day], total)), (total, line)
      spellings.add(a == total)
      assert a + b == c == shown and c <= 99
      total, days = c, days + [day]
    assert sorted(days) == sorted(found) and total == start + sum(found.values())  # every day exactly once
    assert lines[-1] == f"#### {total}" and gsm8k.strictly_correct(p["answer"], str(total))
    orders.add(tuple(days) == tuple(found))
  assert spellings == {True, False} and orders == {True, False}  # both spellings, in and out of order


def test_bag_adds_every_listed_amount_once_in_any_order_and_is_right():
  orders = set()
  for p in arith.problems(400, 0, 4, 8, task="bag", amounts=(2, 9)):
    start, count, listed = re.fullmatch(r"\w+ has (\d+) \w+s\. On (\w+) walks (?:he|she) \w+ ([\d, and]+) more\. "
                                        r"How many \w+s does \w+ have now\?", p["question"]).groups()
    found = [int(a) for a in re.findall(r"\d+", listed)]
    assert ["two", "three", "four", "five", "six", "seven", "eight"].index(count) + 2 == len(found)
    assert 4 <= len(found) <= 8 and all(2 <= a <= 9 for a in found)
    lines, total, added = p["answer"].split("\n"), int(start), []
    for line in lines[:-1]:
      a, b, c, shown = map(int, re.fullmatch(r"<<(\d+)\+(\d+)=(\d+)>>(\d+)", line).groups())
      assert total in (a, b) and a + b == c == shown and c <= 99, (total, line)
      added.append(b if a == total else a)
      total = c
    assert sorted(added) == sorted(found) and total == int(start) + sum(found)  # each amount exactly once
    assert lines[-1] == f"#### {total}" and gsm8k.strictly_correct(p["answer"], str(total))
    orders.add(added == found)
  assert orders == {True, False}


def _bag_lines(p):
  """(listed amounts, [(added amount, whether the running total came first)]) of a ``bag`` problem."""
  start, listed = re.fullmatch(r"\w+ has (\d+) \w+s\. On \w+ walks (?:he|she) \w+ ([\d, and]+) more\. "
                               r"How many \w+s does \w+ have now\?", p["question"]).groups()
  total, lines = int(start), []
  for line in p["answer"].split("\n")[:-1]:
    a, b, c = map(int, re.fullmatch(r"<<(\d+)\+(\d+)=(\d+)>>\d+", line).groups())
    first = a == total  # (amount == total reads the same both ways: counted as total first)
    lines.append((b if first else a, first))
    total = c
  return [int(a) for a in re.findall(r"\d+", listed)], lines


def test_bag_forms_follow_the_listed_order_and_total_first_as_often_as_asked():
  # Always the listed order, the total first: one form only.
  for p in arith.problems(200, 0, 4, 7, task="bag", forms=(1.0, 1.0)):
    found, lines = _bag_lines(p)
    assert [a for a, _ in lines] == found and all(first for _, first in lines)
  # listed_first q: the first line adds the first listed amount with probability q + (1 - q) / n
  # (n amounts, all different); total_first t: t of the sums start with the total (hand-computed, n = 4).
  q, t = 0.5, 0.7
  firsts, totals, sums = 0, 0, 0
  ps = [p for p in arith.problems(6000, 1, 4, 4, task="bag", forms=(q, t)) if len(set(_bag_lines(p)[0])) == 4]
  assert len(ps) > 2000
  for p in ps:
    found, lines = _bag_lines(p)
    firsts += lines[0][0] == found[0]
    totals += sum(first for _, first in lines)
    sums += len(lines)
  assert abs(firsts / len(ps) - (q + (1 - q) / 4)) < 0.03
  # A sum whose amount equals the total reads the same both ways (counted as total first), so allow a little over t.
  assert t - 0.03 < totals / sums < t + 0.05
  # The defaults are uniform and leave the generated data as it was.
  assert arith.UNIFORM_FORMS == (0.0, 0.5)
  assert arith.problems(50, 2, task="bag", forms=(0.0, 0.5)) == arith.problems(50, 2, task="bag")


def test_bag_forms_are_checked():
  for forms in ((1.5, 0.5), (0.5, -0.1)):
    with pytest.raises(ValueError, match="probabilities"):
      arith.problems(1, 0, task="bag", forms=forms)
  with pytest.raises(ValueError, match="need task 'bag'"):
    arith.problems(1, 0, task="week", forms=(0.5, 0.7))


def test_digits_adds_the_ones_digit_of_the_running_total_each_day():
  for p in arith.problems(400, 0, 4, 5, task="digits"):
    start, days = map(int, re.fullmatch(
        r"\w+ has (\d+) \w+s\. Each day (?:he|she) \w+ as many more as the ones digit of the number (?:he|she) has\. "
        r"How many \w+s does \w+ have after (\d+) days\?", p["question"]).groups())
    lines, total = p["answer"].split("\n"), start
    assert 4 <= days <= 5 and len(lines) == days + 1
    for day, line in enumerate(lines[:-1], 1):
      k, a, b, c, shown = map(int, re.fullmatch(r"Day (\d+): <<(\d+)\+(\d+)=(\d+)>>(\d+)", line).groups())
      ones = total - 10 * (total // 10)
      assert k == day and ones > 0 and (a, b) in ((total, ones), (ones, total)) and a + b == c == shown <= 99
      total = c
    assert lines[-1] == f"#### {total}" and gsm8k.strictly_correct(p["answer"], str(total))


def test_tens_adds_the_tens_digit_of_the_running_total_each_day():
  for p in arith.problems(400, 0, 4, 5, task="tens"):
    start, days = map(int, re.fullmatch(
        r"\w+ has (\d+) \w+s\. Each day (?:he|she) \w+ as many more as the tens digit of the number (?:he|she) has\. "
        r"How many \w+s does \w+ have after (\d+) days\?", p["question"]).groups())
    lines, total = p["answer"].split("\n"), start
    assert 20 <= start <= 150 and 4 <= days <= 5 and len(lines) == days + 1
    for day, line in enumerate(lines[:-1], 1):
      k, a, b, c, shown = map(int, re.fullmatch(r"Day (\d+): <<(\d+)\+(\d+)=(\d+)>>(\d+)", line).groups())
      tens = (total - 100 * (total // 100)) // 10
      assert k == day and tens > 0 and (a, b) in ((total, tens), (tens, total)) and a + b == c == shown <= 199
      total = c
    assert lines[-1] == f"#### {total}" and gsm8k.strictly_correct(p["answer"], str(total))


@pytest.mark.parametrize("kwargs, match", [(dict(task="months"), "task must be one of"),
                                            (dict(min_steps=1), "2 <= min_steps"),
                                            (dict(task="week", max_steps=8), "at most 7 days"),
                                            (dict(task="bag", max_steps=9), "at most 8 amounts"),
                                            (dict(amounts=(2, 20)), "amounts\\[1\\] \\* max_steps"),
                                            (dict(amounts=(5, 2)), "1 <= low <= high")])
def test_bad_task_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    arith.problems(3, 0, **kwargs)


def test_digits_test_split_holds_out_starts():
  def start(p):
    return int(re.match(r"\w+ has (\d+) ", p["question"]).group(1))

  train, test = arith.splits(2000, 100, 0, 4, 5, task="digits", hold_out="start")
  train_starts, test_starts = {start(p) for p in train}, {start(p) for p in test}
  assert not train_starts & test_starts and len(test_starts) >= 8 and len(train_starts) >= 3 * len(test_starts) - 8
  assert all(arith.heldout_start(s) for s in test_starts) and not any(arith.heldout_start(s) for s in train_starts)
  with pytest.raises(ValueError, match="part must be"):
    arith.problems(1, 0, task="digits", part="dev")
  with pytest.raises(ValueError, match="hold_out must be"):
    arith.splits(10, 2, 0, task="savings", hold_out="start")
  train, test = arith.splits(2000, 100, 0, 4, 5, task="digits")  # questions only: the chains repeat
  assert {start(p) for p in test} <= {start(p) for p in train}


def test_digits_test_split_holds_out_chains():
  """hold_out="chain": no test (start, days) pair occurs in training, but each test start does, with its other
  day count, and every test step (total -> total + its ones digit) is a step some training chain takes."""
  def pair(p):
    return int(re.match(r"\w+ has (\d+) ", p["question"]).group(1)), p["answer"].count("Day ")

  def steps(p):
    return {(int(a) if int(b) < 10 else int(b), int(c)) for a, b, c in re.findall(r"<<(\d+)\+(\d+)=(\d+)>>", p["answer"])}

  train, test = arith.splits(3000, 100, 0, 4, 5, task="digits", hold_out="chain")
  train_pairs, test_pairs = {pair(p) for p in train}, {pair(p) for p in test}
  assert not train_pairs & test_pairs and len(test_pairs) >= 10
  assert all(arith.heldout_chain(*q) for q in test_pairs) and not any(arith.heldout_chain(*q) for q in train_pairs)
  assert all((s, 9 - d) in train_pairs for s, d in test_pairs)  # days are 4 or 5: the other count is trained
  train_steps = set().union(*map(steps, train))
  assert set().union(*map(steps, test)) <= train_steps
  with pytest.raises(ValueError, match="hold_out must be"):
    arith.splits(10, 2, 0, task="week", hold_out="chain")


def test_step_count_range_is_respected():
  counts = {p["answer"].count("<<") for p in arith.problems(200, 1, 3, 5)}
  assert counts == {3, 4, 5}


def test_test_split_is_held_out():
  train, test = arith.splits(300, 50, 0)
  assert len(train) == 300 and len(test) == 50
  assert not {p["question"] for p in train} & {p["question"] for p in test}
  assert [p["id"] for p in test] == list(range(50))
  assert arith.splits(300, 50, 0) == (train, test)


def test_keep_generation():
  assert demo.keep_generation("nonsense", "all")
  assert demo.keep_generation("3*4=<<3*4=12>>12\n#### 12", "well_formed")
  assert not demo.keep_generation("3*4 is 12", "well_formed")
  with pytest.raises(demo.DemoError, match="config.distill.keep"):
    demo.keep_generation("x", "some")


def _row(model, strategy, threshold, acc, tpf):
  return {"model": model, "strategy": strategy, "threshold": threshold, "accuracy": acc, "tpf": tpf,
          "strict_accuracy": acc, "tpf_with_prefill": tpf, "tokens_per_second": 1.0}


def test_figures_a_b_c_and_ablation_by_hand():
  rows = [_row("base", "threshold", 0.95, 0.80, 2.0), _row("base", "threshold", 0.9, 0.81, 2.5),
          _row("base", "threshold", 0.5, 0.79, 3.5), _row("base", "threshold", 0.1, 0.40, 6.0),
          _row("oput", "spd", 0.9, 0.82, 3.0), _row("oput", "spd", 0.5, 0.80, 5.0), _row("oput", "spd", 0.0, 0.70, 7.0),
          _row("ablation", "spd", 0.9, 0.50, 1.0), _row("ablation", "spd", 0.5, 0.30, 1.2),
          _row("base", "spd", 0.5, 0.99, 9.0)]  # other curves never enter (a), (b), (c)
  fig = demo.figures(rows)
  # (a): best 0.9 (81%), most aggressive 0.1 (40%): 41 points.
  assert fig["a"]["best"]["threshold"] == 0.9 and fig["a"]["most_aggressive"]["threshold"] == 0.1
  assert fig["a"]["points_lost"] == pytest.approx(41.0)
  # (b): bar 80%; OPUT+SPD 0.5 (TPF 5) over base 0.9 (TPF 2.5; 0.95 also passes but is slower, 0.5 is at 79%).
  assert fig["b"]["oput_spd"]["threshold"] == 0.5 and fig["b"]["base_threshold"]["threshold"] == 0.9
  assert fig["b"]["ratio"] == pytest.approx(2.0)
  # (c): base 0.95 at 80% TPF 2 -> bar 79%: OPUT+SPD 0.5 at TPF 5.
  assert fig["c"]["ratio"] == pytest.approx(2.5)
  assert [(r["threshold"], r["oput_accuracy"], r["ablation_accuracy"]) for r in fig["ablation"]] == [
      (0.9, 0.82, 0.50), (0.5, 0.80, 0.30)]
  text = demo.summary(fig)
  assert "(b) TPF at matched accuracy (accuracy >= 80.0%): 2.00x" in text and "(c)" in text and "2.50x" in text
  assert "41.0 points lost" in text


def test_figures_without_a_passing_point_or_a_095_setting():
  rows = [_row("base", "threshold", 0.9, 0.80, 2.0), _row("oput", "spd", 0.5, 0.50, 5.0)]
  fig = demo.figures(rows)
  assert fig["b"]["ratio"] is None and fig["b"]["oput_spd"] is None and fig["c"] is None
  assert "n/a" in demo.summary(fig) and "(c) OPUT + SPD over base + threshold 0.95: not measured" in demo.summary(fig)


def test_bad_eval_runs_and_changed_settings_are_refused(tmp_path):
  config = toy_config()
  config.eval.runs = ("base:threshold", "oput:greedy")
  with pytest.raises(demo.DemoError, match="config.eval.runs: 'oput:greedy'"):
    demo.run(config, str(tmp_path), progress=False)
  config = toy_config()
  config.data.task = "months"
  with pytest.raises(demo.DemoError, match="config.data: task must be one of"):
    demo.run(config, str(tmp_path / "bad_task"), progress=False)
  assert not os.path.exists(tmp_path / "bad_task")  # nothing written: the fixed config is not refused later
  config = toy_config()
  demo.check_workdir(config, str(tmp_path))
  demo.check_workdir(config, str(tmp_path))  # same settings: fine
  config.oput.train.max_steps += 1
  with pytest.raises(demo.DemoError, match=r"other settings \(oput.train.max_steps differ\)"):
    demo.check_workdir(config, str(tmp_path))


def toy_config():
  c = demo_cpu.get_config()
  c.data.n_train, c.data.n_test = 64, 8
  c.model.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 intermediate_size=64, moe_intermediate_size=16, num_experts=4, n_group=2, topk_group=1)
  c.max_seq_len = 64
  c.sft.train.max_steps, c.sft.train.global_batch_size = 3, 8
  c.distill.n_prompts, c.distill.batch_size = 8, 8
  c.oput.train.max_steps, c.oput.train.global_batch_size = 2, 8
  c.eval.gen_length, c.eval.batch_size = 16, 8
  c.eval.threshold_thresholds = (0.5, 0.9)
  c.eval.spd_thresholds = (0.5,)
  return c


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """The toy pipeline run once: (workdir, config, printed text)."""
  workdir = str(tmp_path_factory.mktemp("demo") / "demo")
  config = toy_config()
  return workdir, config, demo.run(config, workdir, progress=False)


def test_pipeline_end_to_end_and_resume(toy_run):
  workdir, config, text = toy_run
  for path in ("config.json", "data/train.jsonl", "data/test.jsonl", "tokenizer/tokenizer.json",
               "tokenizer/tokenizer_config.json", "base/config.json", "base/tokenizer.json", "distill/oput.jsonl",
               "oput_model/config.json", "ablation_model/config.json", "report.json", "report.md", "tradeoff.png"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert len(open(os.path.join(workdir, "distill", "oput.jsonl")).readlines()) == 8  # keep="all"
  report = json.load(open(os.path.join(workdir, "report.json")))
  got = sorted((r["model"], r["strategy"], r["threshold"]) for r in report["results"])
  want = sorted([("base", "threshold", t) for t in (0.5, 0.9)] + [(m, "spd", 0.5) for m in ("oput", "ablation")])
  assert got == want
  assert all(r["n"] == r["of"] == 8 and r["tpf"] > 0 for r in report["results"])
  assert set(report["figures"]) == {"a", "b", "c", "ablation"} and report["figures"]["a"] is not None
  # One table, then the figures; the same in report.md.
  assert text.count("| model | strategy |") == 1 and text.count("\n| ") == 1 + 4
  assert "(a) base + threshold" in text and "(b)" in text and "(c)" in text
  assert open(os.path.join(workdir, "report.md")).read().endswith(text)
  # OPUT and the ablation both started from the base model and trained the same steps.
  for stage in ("oput", "ablation"):
    metrics = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2]
  # A second run finds every stage done and rebuilds the same table without training or decoding.
  mtime = os.path.getmtime(os.path.join(workdir, "base", "config.json"))
  assert demo.run(config, workdir, progress=False) == text
  assert os.path.getmtime(os.path.join(workdir, "base", "config.json")) == mtime
  assert len(open(os.path.join(workdir, "oput", "metrics.jsonl")).readlines()) == 2


def _readme_commands(prefix: str) -> list[str]:
  """README command lines starting with ``prefix`` (backslash continuations joined)."""
  text = (REPO / "README.md").read_text()
  lines = text.replace("\\\n", " ").split("\n")
  return [" ".join(line.split()) for line in lines if line.startswith(prefix)]


@pytest.mark.slow  # 14 s: keeps the default suite under ten minutes on 2 cores
def test_readme_decode_and_evaluate_commands_work_on_the_demo_output(toy_run, capsys):
  """The README's commands for the quick start's checkpoints, run as written on a toy demo's workdir.

  They run through the scripts' entry points in this process (decode.py and
  tools/evaluate.py only call these), which saves two JAX start-ups.
  """
  workdir = toy_run[0]
  entry = {"decode.py": cli.decode_main, "tools/evaluate.py": evaluate.main}
  commands = (_readme_commands("python decode.py --checkpoint runs/demo/")
              + _readme_commands("python tools/evaluate.py --checkpoint runs/demo/"))
  assert len(commands) == 2, commands
  for command in commands:
    argv = [a.replace("runs/demo", workdir) for a in shlex.split(command)]
    assert argv[0] == "python" and argv[1] in entry
    capsys.readouterr()
    code = entry[argv[1]](argv[2:] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, (command, err[-2000:])
    if argv[1] == "decode.py":
      record = json.loads(out.strip().splitlines()[-1])
      assert record["num_tokens"] > 0 and record["nfe"] > 0
    else:
      assert "| spd | 0.7 | 8/8 |" in out and "| threshold | 0.9 | 8/8 |" in out


TOY_FLAGS = ["--config.data.n_train=64", "--config.data.n_test=8", "--config.model.hidden_size=32",
             "--config.model.num_hidden_layers=2", "--config.model.num_attention_heads=2",
             "--config.model.num_key_value_heads=1", "--config.model.head_dim=16", "--config.model.intermediate_size=64",
             "--config.model.moe_intermediate_size=16", "--config.model.topk_group=1", "--config.max_seq_len=64",
             "--config.sft.train.max_steps=3", "--config.sft.train.global_batch_size=8", "--noprogress"]


def _run_demo(workdir, *flags):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  return subprocess.run([sys.executable, "tools/run_demo.py", "--config=configs/demo_cpu.py", f"--workdir={workdir}",
                         *TOY_FLAGS, *flags], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_run_demo_bad_task_is_one_line_and_writes_nothing(tmp_path):
  r = _run_demo(tmp_path / "w", "--config.data.task=months")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "error: config.data: task must be one of ['bag', 'digits', 'savings', 'tens', 'week'], got 'months'"), r.stderr[-2000:]
  assert "Traceback" not in r.stderr and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_run_demo_diverging_training_is_one_line(tmp_path):
  r = _run_demo(tmp_path / "w", "--config.sft.optim.lr=1e12")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
  assert not (tmp_path / "w" / "base").exists()  # no base model exported from a diverged run


def test_distillation_that_decodes_nothing_says_why_and_writes_no_data(toy_run, tmp_path):
  """Every prompt failing (here: prompt + generation past the model's positions) stops with the first reason."""
  workdir, config, _ = toy_run
  config = toy_config()
  config.eval.gen_length = 4096  # far past max_position_embeddings
  out = tmp_path / "w"
  with pytest.raises(demo.DemoError, match="distill: every prompt failed; the first: .*"):
    demo.distill(config, str(out), os.path.join(workdir, "base"), os.path.join(workdir, "data", "train.jsonl"),
                 progress=False)
  assert not (out / "distill" / "oput.jsonl").exists()


@pytest.mark.parametrize("name", ["demo_cpu", "demo_gpu", "demo_gpu_week"])
def test_shipped_demo_configs_pass_their_checks(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  demo.check_data(config)  # task, steps, amounts, hold-out and forms accepted
  assert ("base", "threshold") in demo.eval_runs(config) and ("oput", "spd") in demo.eval_runs(config)
