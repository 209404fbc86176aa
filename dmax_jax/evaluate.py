"""GSM8K evaluation of a checkpoint across decoding strategies and thresholds.

Every question of a GSM8K-format JSONL file (``{"question", "answer"}``, the
answer ending in ``#### n``; ``id`` optional, else the line number) is
decoded with the math prompt (question + ``MATH_SUFFIX`` in the chat
template) under each (strategy, threshold), through ``runner.run``. Records go
to one JSONL file keyed by (strategy, threshold, id), so a killed evaluation
resumes where it stopped. Each record also holds ``reference``,
``prediction``, ``correct`` and ``strict`` (right answer and every
``<<expr=value>>`` step right: ``gsm8k.strictly_correct``). The report (JSON + Markdown) gives, per
(strategy, threshold): accuracy, mean TPF (tokens / decoding forwards, and
with the prefill forward counted as DMax's evaluation does), tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from dmax_jax import cli, gsm8k, runner
from dmax_jax.records import RecordWriter, read_records, record_key

KEY_FIELDS = ("strategy", "threshold", "id")


def read_gsm8k(path: str, tokenizer, limit: Optional[int] = None) -> tuple[list[runner.Request], list[str]]:
  """Requests (meta: the normalised reference) of a GSM8K-format file, and its line errors."""

  def parse(obj, number):
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("answer"), str):
      raise ValueError("needs a string 'answer' field")
    text, ids = runner.prompt_from_fields({"question": obj.get("question")}, tokenizer, math=True)
    return runner.Request(runner.line_id(obj, number), "", text, ids,
                          meta={"reference": gsm8k.reference_answer(obj["answer"])})

  requests, errors = runner.read_jsonl(path, parse)
  return (requests if limit is None else requests[:limit]), errors


def score(record: dict) -> dict:
  """The record with the extracted ``prediction`` and ``correct`` added."""
  prediction = gsm8k.extract_prediction(record["output"])
  return dict(record, prediction=prediction, correct=prediction == record["reference"],
              strict=gsm8k.strictly_correct(record["output"], record["reference"]))


def summarize(records: Sequence[dict], strategy: str, threshold: float, ids: Sequence) -> dict:
  """Metrics of one (strategy, threshold) over the records of ``ids``."""
  wanted = {record_key({"strategy": strategy, "threshold": threshold, "id": i}, KEY_FIELDS) for i in ids}
  rows = [r for r in records if record_key(r, KEY_FIELDS) in wanted]
  tokens = sum(r["num_tokens"] for r in rows)
  seconds = sum(r["seconds"] for r in rows)
  nfe = sum(r["nfe"] for r in rows)
  prefill = sum(r["prefill_calls"] for r in rows)
  return {
      "strategy": strategy, "threshold": threshold, "n": len(rows), "of": len(ids),
      "accuracy": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
      "strict_accuracy": float(np.mean([r.get("strict", False) for r in rows])) if rows else 0.0,
      "mean_tpf": float(np.mean([r["tpf"] for r in rows])) if rows else 0.0,
      "tpf": tokens / nfe if nfe else 0.0,
      "tpf_with_prefill": tokens / (nfe + prefill) if nfe + prefill else 0.0,
      "tokens_per_second": tokens / seconds if seconds else 0.0,
      "mean_tokens": tokens / len(rows) if rows else 0.0,
  }


def markdown_table(rows: Sequence[dict]) -> str:
  lines = ["| strategy | threshold | n | accuracy | strict | mean TPF | TPF (+prefill) | tokens/s | mean tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['strategy']} | {r['threshold']} | {r['n']}/{r['of']} | {100 * r['accuracy']:.1f}% | "
                 f"{100 * r['strict_accuracy']:.1f}% | {r['mean_tpf']:.2f} | {r['tpf_with_prefill']:.2f} | {r['tokens_per_second']:.1f} | "
                 f"{r['mean_tokens']:.1f} |")
  return "\n".join(lines) + "\n"


def _floats(text: str, flag: str) -> list[float]:
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise runner.UsageError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tools/evaluate.py", description="GSM8K accuracy, TPF and tokens/s per strategy.")
  p.add_argument("--data", required=True, help="GSM8K-format JSONL ({question, answer})")
  p.add_argument("--output", required=True, help="records JSONL (resumed if it exists)")
  p.add_argument("--report", help="report path prefix (writes PREFIX.json and PREFIX.md); default: --output's stem")
  p.add_argument("--strategies", default="spd,threshold", help="comma-separated: spd, threshold")
  p.add_argument("--thresholds", default="0.5,0.7,0.9", help="comma-separated thresholds")
  p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
  cli.add_decoding_args(p)
  return p


def _evaluate(args) -> int:
  t0 = time.perf_counter()
  cli.check_decoding_args(args)
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  configs = [(s, runner.make_strategy(s, t, args.confidence_stop, args.temperature))
             for s in strategies for t in _floats(args.thresholds, "--thresholds")]
  if not configs:
    raise runner.UsageError("no (strategy, threshold) to evaluate")
  if args.limit is not None and args.limit <= 0:
    raise runner.UsageError(f"--limit must be positive, got {args.limit}")
  if not os.path.isfile(args.data):
    raise runner.UsageError(f"{args.data}: no such file")
  config, params, tokenizer = runner.load_model(args.checkpoint, args.dtype)
  requests, errors = read_gsm8k(args.data, tokenizer, args.limit)
  requests, too_long = runner.check_prompts(requests, config, args.gen_length, args.block_length)
  errors += too_long
  cli.report_errors(errors)
  with RecordWriter(args.output, KEY_FIELDS) as writer:
    for name, strategy in configs:
      result = runner.run(
          requests, params=params, config=config, tokenizer=tokenizer, strategy=strategy,
          gen_length=args.gen_length, block_length=args.block_length, batch_size=args.batch_size, writer=writer,
          seed=args.seed, desc=f"{name} {strategy.threshold}", progress=not args.no_progress, annotate=score)
      cli.report_errors(result.errors)
      errors += result.errors
  records = read_records(args.output)
  ids = [r.id for r in requests]
  rows = [summarize(records, name, strategy.threshold, ids) for name, strategy in configs]
  prefix = args.report or os.path.splitext(args.output)[0]
  table = markdown_table(rows)
  with open(prefix + ".json", "w") as f:
    json.dump({"checkpoint": args.checkpoint, "data": args.data, "gen_length": args.gen_length,
               "block_length": args.block_length, "results": rows}, f, indent=2)
  with open(prefix + ".md", "w") as f:
    f.write(f"GSM8K `{args.data}` with `{args.checkpoint}` (gen length {args.gen_length}, block {args.block_length})\n\n")
    f.write(table)
  print(table, end="")
  print(f"report: {prefix}.json, {prefix}.md; total wall {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  return 1 if errors else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tools/evaluate.py``'s entry point; returns the exit code."""
  return cli.run_cli(_evaluate, parser(), argv)
