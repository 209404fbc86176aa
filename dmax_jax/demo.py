"""The DMax pipeline in small, on generated arithmetic: data -> SFT -> self-distillation -> OPUT -> evaluation.

Stages (each writes under ``workdir`` and is skipped when its output exists;
training and decoding also resume inside a stage after a kill):

  data/train.jsonl, data/test.jsonl   generated problems (``dmax_jax.arith``), held-out test split
  tokenizer/                          byte-level BPE trained on the training text, LLaDA2 chat template
  sft/ -> base/                       (1) block-diffusion SFT from scratch; base/ = params checkpoint + tokenizer
  distill/oput.jsonl                  (2) the base model's own answers to training prompts (threshold decoding)
  oput/ -> oput_model/                (3) OPUT fine-tuning from base/ on distill/oput.jsonl
  eval/{base,oput}/{spd,threshold}.*  (4) ``tools/evaluate.py`` per model and strategy over the threshold sweep
  report.json, report.md, tradeoff.png   the four combinations side by side; accuracy against TPF

A stage is skipped on the existence of its output alone: after changing the
config, use a fresh workdir (or delete the stages to redo).

Self-distillation keeps every generation by default (``distill.keep="all"``),
as DMax kept its own; ``"well_formed"`` keeps only those with a ``#### n``
line. Neither filters on correctness: OPUT learns the base model's own
trajectories, right or wrong.

The demo config (``configs/demo_cpu.py``, ``configs/demo_gpu.py``) names the
task, model and the stages' hyper-parameters; the training configs are
``configs/base.py`` with those values filled in.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax

from dmax_jax import arith, decoding, evaluate, gsm8k, runner
from dmax_jax.records import RecordWriter, read_records
from dmax_jax.tokenizer import LLADA2_CHAT_TEMPLATE, MATH_SUFFIX, compile_chat_template, train_tokenizer

MODELS = ("base", "oput")
STRATEGIES = ("threshold", "spd")


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


def make_data(config, workdir: str) -> tuple[str, str]:
  """Writes the generated train and test splits; returns their paths."""
  train_path, test_path = (os.path.join(workdir, "data", f"{s}.jsonl") for s in ("train", "test"))
  if not _done(test_path, "data"):
    train, test = arith.splits(config.data.n_train, config.data.n_test, config.seed)
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
    train_tokenizer([_render(c) for c in chat], config.tokenizer_vocab, out)
  return out


def train_config(config, *, data_path: str, tokenizer_dir: str, init_from: str, objective, steps: int,
                 batch_size: int, lr: float, warmup_ratio: float):
  """A ``configs/base.py`` training config for one demo stage."""
  from configs import base  # pylint: disable=import-outside-toplevel

  c = base.get_config()
  c.init_from = init_from
  if init_from == "scratch":
    c.model.update(config.model.to_dict())
    c.model.vocab_size = config.tokenizer_vocab
    c.model.eos_token_id = c.model.pad_token_id = config.tokenizer_vocab - 2
    c.model.mask_token_id = config.tokenizer_vocab - 1
  c.compute_dtype = config.compute_dtype
  c.moe_backend = config.moe_backend
  c.remat = False
  c.data.path = data_path
  c.data.tokenizer = tokenizer_dir
  c.data.max_seq_len = config.max_seq_len
  c.data.prompt_suffix = MATH_SUFFIX  # the evaluation's prompt (tools/evaluate.py appends it too)
  c.objective.update(objective)
  c.objective.block_size = config.block_length
  c.optim.lr = lr
  c.optim.warmup_ratio = warmup_ratio
  c.optim.weight_decay = 0.0
  c.train.global_batch_size = batch_size
  c.train.micro_batch_size = batch_size
  c.train.max_steps = steps
  c.train.seed = config.seed
  c.train.save_every = max(steps // 4, 1)
  c.train.keep_checkpoints = 1
  c.train.async_save = False
  c.mesh.data = 1  # one device: the demo's model is far too small to split
  return c


def train_stage(name: str, tcfg, workdir: str, out: str, tokenizer_dir: str, progress: bool) -> str:
  """Runs (or resumes) training in ``workdir/name`` and exports the final params to ``workdir/out``."""
  from dmax_jax import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.checkpoint import save_checkpoint  # pylint: disable=import-outside-toplevel

  out_dir = os.path.join(workdir, out)
  if _done(os.path.join(out_dir, "config.json"), name):
    return out_dir
  t0 = time.perf_counter()
  state = trainer.train(tcfg, os.path.join(workdir, name), progress=progress)
  save_checkpoint(state["params"], trainer.model_config(tcfg), out_dir, tokenizer_dir=tokenizer_dir)
  _log(f"{name}: {tcfg.train.max_steps} steps in {time.perf_counter() - t0:.0f} s -> {out_dir}")
  return out_dir


def sft(config, workdir, train_path, tokenizer_dir, progress=True) -> str:
  s = config.sft
  tcfg = train_config(
      config, data_path=train_path, tokenizer_dir=tokenizer_dir, init_from="scratch", steps=s.steps,
      batch_size=s.batch_size, lr=s.lr, warmup_ratio=s.warmup_ratio,
      objective=dict(oput=False, noise_low=s.noise_low, noise_high=s.noise_high, only_masked=s.only_masked))
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
  with RecordWriter(os.path.join(workdir, "distill", "records.jsonl"), ("id",)) as writer:
    result = runner.run(requests, params=params, config=model_cfg, tokenizer=tok, strategy=strategy,
                        gen_length=config.eval.gen_length, block_length=config.block_length,
                        batch_size=d.batch_size, writer=writer, seed=config.seed, desc="distill", progress=progress)
  _log(runner.summary_line(result))
  records = {r["id"]: r for r in read_records(os.path.join(workdir, "distill", "records.jsonl"))}
  kept = [{"question": rows[i]["question"], "answer": records[i]["output"]}
          for i in range(len(rows)) if i in records and keep_generation(records[i]["output"], d.keep)]
  correct = sum(gsm8k.is_correct(records[i]["output"], gsm8k.reference_answer(rows[i]["answer"])) for i in records)
  _log(f"distill: kept {len(kept)}/{len(rows)} generations ({d.keep}); {correct} of them reach the right answer")
  arith.write_jsonl(kept, out)
  return out


def oput(config, workdir, data_path, base_dir, tokenizer_dir, progress=True) -> str:
  o = config.oput
  tcfg = train_config(
      config, data_path=data_path, tokenizer_dir=tokenizer_dir, init_from=base_dir, steps=o.steps,
      batch_size=o.batch_size, lr=o.lr, warmup_ratio=o.warmup_ratio,
      objective=dict(oput=True, noise_low=o.noise, noise_high=o.noise, only_masked=False))
  return train_stage("oput", tcfg, workdir, "oput_model", tokenizer_dir, progress)


def _fmt(values) -> str:
  return ",".join(str(float(v)) for v in values)


def eval_paths(workdir: str, model: str, strategy: str) -> tuple[str, str]:
  """(records JSONL, report prefix) of one model and strategy."""
  d = os.path.join(workdir, "eval", model)
  return os.path.join(d, f"{strategy}.records.jsonl"), os.path.join(d, strategy)


def thresholds(config, strategy: str) -> list[float]:
  return [float(t) for t in (config.eval.spd_thresholds if strategy == "spd" else config.eval.threshold_thresholds)]


def warm_up(config, ckpt: str, test_path: str, strategy: str) -> None:
  """Compiles the decoding program of the evaluation's first batch shape, so no sweep point's tokens/s pays for it.

  The program depends on the model config, the strategy's kind and the batch
  layout (not on the threshold or the params' values), so one call serves both
  models and the whole sweep of a strategy.
  """
  e = config.eval
  model_cfg, params, tok = runner.load_model(ckpt, e.dtype)
  requests, _ = evaluate.read_gsm8k(test_path, tok)
  first = sorted(requests, key=lambda r: len(r.ids))[: e.batch_size]  # the order runner.run decodes in
  decoding.generate(params, model_cfg, [r.ids for r in first], gen_length=e.gen_length,
                    block_length=config.block_length, rng=jax.random.key(config.seed),
                    strategy=runner.make_strategy(strategy, None, e.confidence_stop))


def evaluate_all(config, workdir: str, test_path: str, models: dict, progress: bool = True) -> list[dict]:
  """Runs ``tools/evaluate.py`` (its library entry point) per model and strategy; returns all rows."""
  e = config.eval
  rows, warm = [], set()
  for model, ckpt in models.items():
    for strategy in STRATEGIES:
      records, prefix = eval_paths(workdir, model, strategy)
      if not _done(prefix + ".json", f"eval {model} {strategy}"):
        if strategy not in warm:
          warm_up(config, ckpt, test_path, strategy)
          warm.add(strategy)
        os.makedirs(os.path.dirname(records), exist_ok=True)
        argv = ["--checkpoint", ckpt, "--data", test_path, "--output", records, "--report", prefix,
                "--strategies", strategy, "--thresholds", _fmt(thresholds(config, strategy)),
                "--gen-length", str(e.gen_length), "--block-length", str(config.block_length),
                "--batch-size", str(e.batch_size), "--confidence-stop", str(e.confidence_stop),
                "--dtype", e.dtype, "--seed", str(config.seed)]
        if not progress:
          argv.append("--no-progress")
        code = evaluate.main(argv)
        if code != 0:
          raise DemoError(f"evaluation of {model} with {strategy} failed (exit code {code}); see the errors above")
      with open(prefix + ".json") as f:
        rows += [dict(r, model=model) for r in json.load(f)["results"]]
  return rows


# ---------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
  lines = ["| model | strategy | threshold | accuracy | TPF | TPF (+prefill) | tokens/s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['strategy']} | {r['threshold']:g} | {100 * r['accuracy']:.1f}% | "
                 f"{r['tpf']:.2f} | {r['tpf_with_prefill']:.2f} | {r['tokens_per_second']:.0f} |")
  return "\n".join(lines) + "\n"


def headline(rows: list[dict]) -> str:
  """The DMax comparison: OPUT+SPD against base+threshold at the base model's best accuracy."""
  base_thr = [r for r in rows if (r["model"], r["strategy"]) == ("base", "threshold")]
  oput_spd = [r for r in rows if (r["model"], r["strategy"]) == ("oput", "spd")]
  if not base_thr or not oput_spd:
    return ""
  best_base = max(r["accuracy"] for r in rows if r["model"] == "base")
  ref = max(base_thr, key=lambda r: (r["accuracy"], r["tpf"]))
  near = [r for r in oput_spd if r["accuracy"] >= best_base - 0.02]
  text = (f"base best accuracy {100 * best_base:.1f}%; base+threshold at its best ({ref['threshold']:g}): "
          f"accuracy {100 * ref['accuracy']:.1f}%, TPF {ref['tpf']:.2f}.")
  if near:
    top = max(near, key=lambda r: r["tpf"])
    text += (f" OPUT+SPD within 2 points of it: threshold {top['threshold']:g}, accuracy {100 * top['accuracy']:.1f}%,"
             f" TPF {top['tpf']:.2f} ({top['tpf'] / max(ref['tpf'], 1e-9):.2f}x).")
  else:
    text += " No OPUT+SPD setting stays within 2 points of the base model's best accuracy."
  return text


def plot(rows: list[dict], path: str) -> Optional[str]:
  """Accuracy against TPF, one curve per (model, strategy); None if matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for model in MODELS:
    for strategy, marker in zip(STRATEGIES, ("o", "s")):
      pts = sorted((r["tpf"], 100 * r["accuracy"], r["threshold"]) for r in rows
                   if (r["model"], r["strategy"]) == (model, strategy))
      if not pts:
        continue
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if model == "oput" else "--",
              label=f"{'OPUT' if model == 'oput' else 'base'} + {'SPD' if strategy == 'spd' else 'threshold'}")
      for x, y, t in pts:
        ax.annotate(f"{t:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("tokens per forward (TPF)")
  ax.set_ylabel("accuracy on held-out problems (%)")
  ax.set_title("Accuracy vs parallelism (labels: threshold)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(config, workdir: str, rows: list[dict], seconds: dict) -> str:
  """report.json / report.md / tradeoff.png; returns the Markdown table."""
  table = markdown(rows)
  summary = headline(rows)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({"config": config.to_dict(), "stage_seconds": seconds, "headline": summary, "results": rows}, f,
              indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(f"DMax demo: {config.data.n_test} held-out arithmetic problems, gen length {config.eval.gen_length}, "
            f"block {config.block_length}\n\n{table}\n{summary}\n")
  png = plot(rows, os.path.join(workdir, "tradeoff.png"))
  if png is None:
    _log("matplotlib not installed: no tradeoff.png (pip install matplotlib)")
  return table + ("\n" + summary + "\n" if summary else "")


# ---------------------------------------------------------------- all


def run(config, workdir: str, progress: bool = True) -> str:
  """Runs every stage not yet done; returns the printed report text."""
  times = {}
  t = time.perf_counter()

  def lap(name):
    nonlocal t
    now = time.perf_counter()
    times[name] = round(now - t, 1)
    t = now

  os.makedirs(workdir, exist_ok=True)
  train_path, test_path = make_data(config, workdir)
  tok_dir = make_tokenizer(config, workdir, train_path)
  lap("data+tokenizer")
  base_dir = sft(config, workdir, train_path, tok_dir, progress)
  lap("sft")
  distilled = distill(config, workdir, base_dir, train_path, progress)
  lap("distill")
  oput_dir = oput(config, workdir, distilled, base_dir, tok_dir, progress)
  lap("oput")
  rows = evaluate_all(config, workdir, test_path, {"base": base_dir, "oput": oput_dir}, progress)
  lap("eval")
  text = write_report(config, workdir, rows, times)
  _log("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  return text

