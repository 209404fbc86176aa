"""The DMax pipeline in small, on generated arithmetic: data -> SFT -> self-distillation -> OPUT -> evaluation.

Stages (each writes under ``workdir`` and is skipped when its output exists;
training and decoding also resume inside a stage after a kill):

  data/train.jsonl, data/test.jsonl   generated problems (``dmax_jax.apps.arith``), held-out test split
  tokenizer/                          byte-level BPE trained on the training text, LLaDA2 chat template
  sft/ -> base/                       (1) block-diffusion SFT from scratch; base/ = params checkpoint + tokenizer
  distill/oput.jsonl                  (2) the base model's own answers to training prompts (threshold decoding)
  oput/ -> oput_model/                (3) OPUT fine-tuning from base/ on distill/oput.jsonl
  ablation/ -> ablation_model/        (3') the ablation: plain block-diffusion SFT from base/ on the same data,
                                           same steps, batch, learning rate and noise as OPUT
  eval/MODEL/STRATEGY.*               (4) ``tools/evaluate.py`` per (model, strategy) of ``eval.runs``
  report.json, report.md, tradeoff.png   every curve side by side, figures (a), (b), (c); accuracy against TPF

``workdir/config.json`` records the settings a workdir was made with; a rerun
with other settings stops with one line instead of mixing results (use a
fresh workdir). A stage is skipped when its output exists.

Self-distillation keeps every generation by default (``distill.keep="all"``),
as DMax kept its own; ``"well_formed"`` keeps only those with a ``#### n``
line. Neither filters on correctness: OPUT learns the base model's own
trajectories, right or wrong.

The demo config (``configs/demo_cpu.py``, ``configs/demo_gpu.py``) names the
task, the model and the decoding settings; its training stages (``sft``,
``oput``) are ordinary training configs (``dmax_jax.training.config``), to
which the demo adds this run's paths (``stage_config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import ml_collections

from dmax_jax import decoding
from dmax_jax.apps import arith, evaluate, gsm8k, runner
from dmax_jax.apps.records import RecordWriter, read_records
from dmax_jax.tokenizer import LLADA2_CHAT_TEMPLATE, MATH_SUFFIX, compile_chat_template, train_tokenizer

MODELS = ("base", "oput", "ablation")
# the demo sweeps each curve over thresholds, so it offers the strategies that have one (not low_confidence)
STRATEGIES = tuple(name for name, cls in decoding.STRATEGIES.items()
                   if "threshold" in {f.name for f in dataclasses.fields(cls)})
LABELS = {"base": "base", "oput": "OPUT", "ablation": "SFT on distilled (ablation)", "threshold": "threshold",
          "spd": "SPD"}


class DemoError(ValueError):
  """A user error in the demo setup (bad config value); the message names it."""


def _log(msg: str) -> None:
  print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _done(path: str, name: str) -> bool:
  if os.path.exists(path):
    _log(f"{name}: done ({path} exists), skipped")
    return True
  _log(f"{name}: running")
  return False


# ---------------------------------------------------------------- stages


def check_data(config) -> None:
  """Raises DemoError naming the bad ``config.data`` setting (task, steps, amounts, hold-out), before anything is
  written."""
  d = config.data
  try:
    arith.splits(1, 1, config.seed, d.min_steps, d.max_steps, d.task, d.amounts, d.hold_out, forms(config))
  except ValueError as e:
    raise DemoError(f"config.data: {e}") from None


def forms(config) -> tuple[float, float]:
  """``config.data``'s (listed_first, total_first) (``arith.bag_problem``); configs without them prefer no form."""
  d, (listed, total) = config.data, arith.UNIFORM_FORMS
  return float(d.get("listed_first", listed)), float(d.get("total_first", total))


def make_data(config, workdir: str) -> tuple[str, str]:
  """Writes the generated train and test splits; returns their paths."""
  train_path, test_path = (os.path.join(workdir, "data", f"{s}.jsonl") for s in ("train", "test"))
  if not _done(test_path, "data"):
    d = config.data
    check_data(config)
    train, test = arith.splits(d.n_train, d.n_test, config.seed, d.min_steps, d.max_steps, d.task, d.amounts,
                               d.hold_out, forms(config))
    arith.write_jsonl(train, train_path)
    arith.write_jsonl(test, test_path)
  return train_path, test_path


def _render(messages: list[dict]) -> str:
  """A conversation in the chat template (the text the tokenizer will see in training and decoding)."""
  return compile_chat_template(LLADA2_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=False)


def make_tokenizer(config, workdir: str, train_path: str) -> str:
  """Trains the BPE tokenizer on the training questions (with the math suffix) and answers."""
  out = os.path.join(workdir, "tokenizer")
  if not _done(os.path.join(out, "tokenizer.json"), "tokenizer"):
    rows = [json.loads(line) for line in open(train_path, encoding="utf-8")]
    chat = [[{"role": "user", "content": r["question"] + MATH_SUFFIX}, {"role": "assistant", "content": r["answer"]}]
            for r in rows]
    train_tokenizer([_render(c) for c in chat], config.tokenizer_vocab, out, split_digits=True)
  return out


def stage_config(stage, *, data_path: str, tokenizer_dir: str, init_from: str = "", **objective):
  """A demo stage's training config (``config.sft`` / ``config.oput``: ordinary training configs) as a plain copy
  with this run's paths filled in; ``init_from`` (when given) and ``objective`` keys replace the stage's."""
  c = ml_collections.ConfigDict(stage.to_dict())  # references to the demo-wide keys resolved
  c.data.path = data_path
  c.data.tokenizer = tokenizer_dir
  if init_from:
    c.init_from = init_from
  c.objective.update(objective)
  return c


def train_stage(name: str, tcfg, workdir: str, out: str, tokenizer_dir: str, progress: bool) -> str:
  """Runs (or resumes) training in ``workdir/name`` and exports the final params to ``workdir/out``."""
  from dmax_jax.apps.progress import bar_if  # pylint: disable=import-outside-toplevel
  from dmax_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.checkpoints.converted import save_checkpoint  # pylint: disable=import-outside-toplevel

  out_dir = os.path.join(workdir, out)
  if _done(os.path.join(out_dir, "config.json"), name):
    return out_dir
  t0 = time.perf_counter()
  state = trainer.train(tcfg, os.path.join(workdir, name), progress=bar_if(progress))
  save_checkpoint(state["params"], trainer.model_config(tcfg), out_dir, tokenizer_dir=tokenizer_dir)
  _log(f"{name}: {tcfg.train.max_steps} steps in {time.perf_counter() - t0:.0f} s -> {out_dir}")
  return out_dir


def sft(config, workdir, train_path, tokenizer_dir, progress=True) -> str:
  tcfg = stage_config(config.sft, data_path=train_path, tokenizer_dir=tokenizer_dir)
  return train_stage("sft", tcfg, workdir, "base", tokenizer_dir, progress)


def keep_generation(output: str, keep: str) -> bool:
  """Whether a distilled generation goes into the OPUT data (``keep``: "all" or "well_formed")."""
  if keep == "all":
    return True
  if keep == "well_formed":
    return "####" in output and gsm8k.extract_prediction(output) is not None
  raise DemoError(f"config.distill.keep must be 'all' or 'well_formed', got {keep!r}")


def distill(config, workdir: str, base_dir: str, train_path: str, progress: bool = True) -> str:
  """Decodes training prompts with the base model; its outputs become the OPUT data set."""
  out = os.path.join(workdir, "distill", "oput.jsonl")
  if _done(out, "distill"):
    return out
  d = config.distill
  keep_generation("", d.keep)  # validate before decoding
  model_cfg, params, tok = runner.load_model(base_dir, config.eval.dtype)
  rows = [json.loads(line) for line in open(train_path, encoding="utf-8")][: d.n_prompts]
  requests = [runner.Request(i, f"{train_path}:{i + 1}", r["question"], tok.prompt_ids(r["question"], MATH_SUFFIX))
              for i, r in enumerate(rows)]
  strategy = runner.make_strategy("threshold", d.threshold)
  with RecordWriter(os.path.join(workdir, "distill", "records.jsonl"), runner.KEY_FIELDS) as writer:
    result = runner.run(requests, params=params, config=model_cfg, tokenizer=tok, strategy=strategy,
                        gen_length=config.eval.gen_length, block_length=config.block_length,
                        batch_size=d.batch_size, writer=writer, seed=config.seed, desc="distill", progress=progress)
  _log(runner.summary_line(result))
  records = {r["id"]: r for r in read_records(os.path.join(workdir, "distill", "records.jsonl"))}
  if not records and result.errors:  # e.g. prompt + gen length past the model's positions: say so, write nothing
    raise DemoError(f"distill: every prompt failed; the first: {result.errors[0]}")
  kept = [{"question": rows[i]["question"], "answer": records[i]["output"]}
          for i in range(len(rows)) if i in records and keep_generation(records[i]["output"], d.keep)]
  correct = sum(gsm8k.is_correct(records[i]["output"], gsm8k.reference_answer(rows[i]["answer"])) for i in records)
  _log(f"distill: kept {len(kept)}/{len(rows)} generations ({d.keep}); {correct} of them reach the right answer")
  arith.write_jsonl(kept, out)
  return out


def oput(config, workdir, data_path, base_dir, tokenizer_dir, progress=True) -> str:
  return _fine_tune(config, "oput", "oput_model", True, workdir, data_path, base_dir, tokenizer_dir, progress)


def ablation(config, workdir, data_path, base_dir, tokenizer_dir, progress=True) -> str:
  """The paper's control: the base trained further with plain block-diffusion SFT on OPUT's data, same budget."""
  return _fine_tune(config, "ablation", "ablation_model", False, workdir, data_path, base_dir, tokenizer_dir,
                    progress)


def _fine_tune(config, name, out, on_policy, workdir, data_path, base_dir, tokenizer_dir, progress) -> str:
  """Trains from base/ on the distilled data with ``config.oput`` (its steps, batch, learning rate, fixed noise).

  ``on_policy``: OPUT (half the batch sees its own argmax guesses where the
  masks were); else the same data and noise with masks only (plain SFT).
  """
  tcfg = stage_config(config.oput, data_path=data_path, tokenizer_dir=tokenizer_dir, init_from=base_dir,
                      oput=on_policy)
  return train_stage(name, tcfg, workdir, out, tokenizer_dir, progress)


def eval_paths(workdir: str, model: str, strategy: str) -> tuple[str, str]:
  """(records JSONL, report prefix) of one model and strategy."""
  d = os.path.join(workdir, "eval", model)
  return os.path.join(d, f"{strategy}.records.jsonl"), os.path.join(d, strategy)


def thresholds(config, strategy: str) -> list[float]:
  """The thresholds ``strategy`` is swept over: ``config.eval.STRATEGY_thresholds``."""
  return [float(t) for t in config.eval[f"{strategy}_thresholds"]]


def eval_runs(config) -> list[tuple[str, str]]:
  """The (model, strategy) pairs of ``config.eval.runs`` ("model:strategy" strings), checked."""
  runs = []
  for item in config.eval.runs:
    model, _, strategy = str(item).partition(":")
    if model not in MODELS or strategy not in STRATEGIES:
      raise DemoError(f"config.eval.runs: {item!r} is not MODEL:STRATEGY with MODEL in {MODELS} and STRATEGY in "
                      f"{STRATEGIES}")
    runs.append((model, strategy))
  for need in (("base", "threshold"), ("oput", "spd")):
    if need not in runs:
      raise DemoError(f"config.eval.runs must include {':'.join(need)} (the comparison the report is about)")
  return runs


def evaluate_all(config, workdir: str, test_path: str, models: dict, progress: bool = True) -> list[dict]:
  """Runs the evaluation (``evaluate.evaluate``, what ``tools/evaluate.py`` runs) per (model, strategy); returns
  all rows. Each run's table is in eval/MODEL/STRATEGY.md; the demo prints one table at the end."""
  e = config.eval
  rows = []
  for model, strategy in eval_runs(config):
    records, prefix = eval_paths(workdir, model, strategy)
    if not _done(prefix + ".json", f"eval {model} {strategy}"):  # (runner.run compiles outside its timers)
      os.makedirs(os.path.dirname(records), exist_ok=True)
      result = evaluate.evaluate(
          checkpoint=models[model], data=test_path, output=records, report=prefix,
          strategies=[runner.make_strategy(strategy, t, e.confidence_stop) for t in thresholds(config, strategy)],
          gen_length=e.gen_length, block_length=config.block_length, batch_size=e.batch_size, dtype=e.dtype,
          seed=config.seed, progress=progress)
      for line in [f"warning: {n}" for n in result.notes] + [f"error: {err}" for err in result.errors]:
        print(line, file=sys.stderr)
      if result.errors or result.report is None:
        raise DemoError(f"evaluation of {model} with {strategy} failed; see the errors above")
    with open(prefix + ".json") as f:
      rows += [dict(r, model=model) for r in json.load(f)["results"]]
  return rows


# ---------------------------------------------------------------- report


def curve(rows: Sequence[dict], model: str, strategy: str) -> list[dict]:
  """One (model, strategy)'s sweep points, most careful (highest threshold) first."""
  return sorted((r for r in rows if (r["model"], r["strategy"]) == (model, strategy)), key=lambda r: -r["threshold"])


def _point(r: Optional[dict]) -> Optional[dict]:
  return None if r is None else {k: r[k] for k in ("model", "strategy", "threshold", "accuracy", "tpf")}


def _fastest_above(points: Sequence[dict], bar: float) -> Optional[dict]:
  """The highest-TPF point whose accuracy is at least ``bar`` (None if none is)."""
  ok = [r for r in points if r["accuracy"] >= bar - 1e-9]
  return max(ok, key=lambda r: (r["tpf"], r["accuracy"])) if ok else None


def _ratio(top: Optional[dict], ref: Optional[dict]) -> Optional[float]:
  return top["tpf"] / ref["tpf"] if top and ref and ref["tpf"] > 0 else None


def figures(rows: Sequence[dict]) -> dict:
  """The issue's figures, from the sweep rows (accuracies as fractions, one point = 0.01).

  (a) base + threshold at its best setting (highest accuracy, then TPF) and
      at its most aggressive one (lowest threshold), and the points lost;
  (b) TPF at matched accuracy: the fastest OPUT + SPD point with accuracy >=
      best base + threshold accuracy - 1 point, over the fastest base +
      threshold point meeting the same bar;
  (c) the paper's comparison: the fastest OPUT + SPD point within 1 point of
      base + threshold 0.95's accuracy, over base + threshold 0.95's TPF;
  ablation: OPUT + SPD against the ablation + SPD at each shared threshold.
  """
  base, spd = curve(rows, "base", "threshold"), curve(rows, "oput", "spd")
  out = {"a": None, "b": None, "c": None, "ablation": []}
  if not base or not spd:
    return out
  best = max(base, key=lambda r: (r["accuracy"], r["tpf"]))
  aggressive = min(base, key=lambda r: r["threshold"])
  out["a"] = {"best": _point(best), "most_aggressive": _point(aggressive),
              "points_lost": 100 * (best["accuracy"] - aggressive["accuracy"])}
  bar = best["accuracy"] - 0.01
  top, ref = _fastest_above(spd, bar), _fastest_above(base, bar)
  out["b"] = {"bar": bar, "oput_spd": _point(top), "base_threshold": _point(ref), "ratio": _ratio(top, ref)}
  at95 = [r for r in base if abs(r["threshold"] - 0.95) < 1e-9]
  if at95:
    top = _fastest_above(spd, at95[0]["accuracy"] - 0.01)
    out["c"] = {"bar": at95[0]["accuracy"] - 0.01, "oput_spd": _point(top), "base_threshold": _point(at95[0]),
                "ratio": _ratio(top, at95[0])}
  abl = {r["threshold"]: r for r in curve(rows, "ablation", "spd")}
  out["ablation"] = [{"threshold": r["threshold"], "oput_accuracy": r["accuracy"], "oput_tpf": r["tpf"],
                      "ablation_accuracy": abl[r["threshold"]]["accuracy"], "ablation_tpf": abl[r["threshold"]]["tpf"]}
                     for r in spd if r["threshold"] in abl]
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def _describe(p: Optional[dict]) -> str:
  if p is None:
    return "none"
  return f"{LABELS[p['model']]} + {LABELS.get(p['strategy'], p['strategy'])} {p['threshold']:g} ({_pct(p['accuracy'])}, TPF {p['tpf']:.2f})"


def summary(fig: dict) -> str:
  """(a), (b), (c) and the ablation in words, one line each."""
  lines = []
  if fig["a"]:
    a = fig["a"]
    lines.append(f"(a) base + threshold: best {_describe(a['best'])}; most aggressive {_describe(a['most_aggressive'])}:"
                 f" {a['points_lost']:.1f} points lost")
  for key, name in (("b", "TPF at matched accuracy"), ("c", "OPUT + SPD over base + threshold 0.95")):
    f = fig[key]
    if f is None:
      lines.append(f"({key}) {name}: not measured (needs base + threshold"
                   f"{' 0.95' if key == 'c' else ''} and OPUT + SPD points)")
      continue
    ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.2f}x"
    lines.append(f"({key}) {name} (accuracy >= {_pct(f['bar'])}): {ratio} = {_describe(f['oput_spd'])} / "
                 f"{_describe(f['base_threshold'])}")
  if fig["ablation"]:
    pairs = ", ".join(f"{r['threshold']:g}: {_pct(r['oput_accuracy'])} vs {_pct(r['ablation_accuracy'])}"
                      for r in fig["ablation"])
    lines.append(f"ablation + SPD against OPUT + SPD at the same thresholds (OPUT vs ablation): {pairs}")
  return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
  header = ("model", "strategy", "threshold", "accuracy", "strict", "TPF", "TPF (+prefill)", "tokens/s")
  return evaluate.table(header, [(r["model"], r["strategy"], f"{r['threshold']:g}", _pct(r["accuracy"]),
                                  _pct(r.get("strict_accuracy", 0.0)), f"{r['tpf']:.2f}", f"{r['tpf_with_prefill']:.2f}",
                                  f"{r['tokens_per_second']:.0f}") for r in rows])


STYLE = {("base", "threshold"): ("tab:blue", "o", "--"), ("base", "spd"): ("tab:gray", "v", ":"),
         ("oput", "threshold"): ("tab:green", "s", ":"), ("oput", "spd"): ("tab:red", "s", "-"),
         ("ablation", "spd"): ("tab:orange", "^", "-.")}


def _place_labels(ax, renderer, labels) -> None:
  """Threshold labels next to their points, each at the first offset where it overlaps no label or marker.

  ``labels``: (text, (x, y), bold) in priority order; one that fits nowhere is left out.
  """
  taken = [ax.transData.transform(xy) for _, xy, _ in labels]
  boxes = []
  for text, xy, bold in labels:
    for dx, dy in ((5, 4), (5, -11), (-5, 4), (-5, -11), (8, -3), (-8, -3), (0, 9), (0, -15)):
      ann = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=8 if bold else 7,
                        fontweight="bold" if bold else "normal", ha="left" if dx >= 0 else "right")
      box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
      hits_marker = any(box.x0 - 3 <= px <= box.x1 + 3 and box.y0 - 3 <= py <= box.y1 + 3 for px, py in taken)
      inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and ax.get_window_extent(renderer).contains(
          box.x1, box.y1)
      if inside and not hits_marker and not any(box.overlaps(b) for b in boxes):
        boxes.append(box)
        break
      ann.remove()


def plot(rows: list[dict], fig_data: dict, path: str) -> Optional[str]:
  """Accuracy against TPF, one curve per (model, strategy), thresholds and operating points named.

  None if matplotlib is missing.
  """
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(7.5, 5))
  labels = []
  for (model, strategy), (color, marker, line) in STYLE.items():
    pts = sorted(curve(rows, model, strategy), key=lambda r: r["tpf"])
    if not pts:
      continue
    ax.plot([r["tpf"] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, linestyle=line, color=color,
            label=f"{LABELS[model]} + {LABELS.get(strategy, strategy)}")
    labels += [(f"{r['threshold']:g}", (r["tpf"], 100 * r["accuracy"]), False) for r in pts]
  named = []
  for key, caption in (("b", "(b)"), ("c", "(c)")):
    f = fig_data.get(key)
    if f and f["oput_spd"] and f["base_threshold"]:
      for p in (f["oput_spd"], f["base_threshold"]):
        named.append((p["tpf"], 100 * p["accuracy"]))
      ax.annotate("", xy=(f["oput_spd"]["tpf"], 100 * f["oput_spd"]["accuracy"]),
                  xytext=(f["base_threshold"]["tpf"], 100 * f["base_threshold"]["accuracy"]),
                  arrowprops=dict(arrowstyle="->", color="black", alpha=0.5))
      mid = ((f["oput_spd"]["tpf"] + f["base_threshold"]["tpf"]) / 2,
             100 * (f["oput_spd"]["accuracy"] + f["base_threshold"]["accuracy"]) / 2)
      if f["ratio"] is not None:
        labels.insert(0, (f"{caption} {f['ratio']:.2f}x", mid, True))
  if named:
    ax.scatter([x for x, _ in named], [y for _, y in named], s=140, facecolors="none", edgecolors="black", zorder=3,
               label="operating points of (b), (c)")
  ax.set_xlabel("tokens per forward (TPF)")
  ax.set_ylabel("accuracy on held-out problems (%)")
  ax.set_title("Accuracy vs parallelism (point labels: threshold)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  ax.margins(x=0.08, y=0.08)
  fig.tight_layout()
  fig.canvas.draw()
  _place_labels(ax, fig.canvas.get_renderer(), labels)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(config, workdir: str, rows: list[dict], seconds: dict) -> str:
  """report.json / report.md / tradeoff.png; returns the text printed at the end (one table, then the figures)."""
  table = markdown(rows)
  fig = figures(rows)
  text = table + "\n" + summary(fig)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({"config": config.to_dict(), "stage_seconds": seconds, "figures": fig, "results": rows}, f, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(f"DMax demo: {config.data.n_test} held-out problems ({config.data.min_steps}-{config.data.max_steps} "
            f"steps), gen length {config.eval.gen_length}, block {config.block_length}. TPF = generated non-eos "
            f"tokens / decoding forwards; strict = right answer and every <<a op b=c>> step right.\n\n{text}")
  png = plot(rows, fig, os.path.join(workdir, "tradeoff.png"))
  if png is None:
    _log("matplotlib not installed: no tradeoff.png (pip install matplotlib)")
  return text


# ---------------------------------------------------------------- all


def check_workdir(config, workdir: str) -> None:
  """Records the settings in ``workdir/config.json``; refuses a workdir made with other settings."""
  path = os.path.join(workdir, "config.json")
  settings = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as they read back
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise DemoError(f"{path}: unreadable ({e}); use a fresh --workdir") from None
    if old != settings:
      diff = sorted(_changed(old, settings))
      raise DemoError(f"{workdir} was made with other settings ({', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}"
                      f" differ); use a fresh --workdir or the config it was made with")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=2)
  os.replace(path + ".tmp", path)


def _changed(a, b, prefix="") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [k for key in sorted(set(a) | set(b)) for k in _changed(a.get(key), b.get(key), f"{prefix}{key}.")]
  return [] if a == b else [prefix.rstrip(".")]


def run(config, workdir: str, progress: bool = True) -> str:
  """Runs every stage not yet done; returns the printed report text."""
  times = {}
  t = time.perf_counter()

  def lap(name):
    nonlocal t
    now = time.perf_counter()
    times[name] = round(now - t, 1)
    t = now

  eval_runs(config)  # a bad eval.runs fails now, not after training
  check_data(config)  # and so does a bad task, before the workdir records these settings
  check_workdir(config, workdir)
  train_path, test_path = make_data(config, workdir)
  tok_dir = make_tokenizer(config, workdir, train_path)
  lap("data+tokenizer")
  base_dir = sft(config, workdir, train_path, tok_dir, progress)
  lap("sft")
  distilled = distill(config, workdir, base_dir, train_path, progress)
  lap("distill")
  models = {"base": base_dir, "oput": oput(config, workdir, distilled, base_dir, tok_dir, progress)}
  lap("oput")
  if any(m == "ablation" for m, _ in eval_runs(config)):
    models["ablation"] = ablation(config, workdir, distilled, base_dir, tok_dir, progress)
    lap("ablation")
  rows = evaluate_all(config, workdir, test_path, models, progress)
  lap("eval")
  text = write_report(config, workdir, rows, times)
  _log("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  return text
