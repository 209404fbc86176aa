"""GSM8K evaluation of a checkpoint across decoding strategies and thresholds.

Every question of a GSM8K-format JSONL file (``{"question", "answer"}``, the
answer ending in ``#### n``; ``id`` optional, else the line number) is
decoded with the math prompt (question + ``MATH_SUFFIX`` in the chat
template) under each (strategy, threshold), through ``runner.run``. Records go
to one JSONL file keyed like ``decode.py``'s (``runner.KEY_FIELDS``: the id,
the prompt's token ids and every decoding setting, the checkpoint included),
so a killed evaluation resumes where it stopped and a rerun with other
settings never reuses a record made with different ones. Each record also
holds ``reference``, ``prediction``, ``correct`` and ``strict`` (right answer and
every ``<<expr=value>>`` step right: ``gsm8k.strictly_correct``). The report (JSON +
Markdown) gives, per (strategy, threshold): accuracy over every question
(those rejected as too long, or failed, count as wrong, and their number is
given), strict accuracy, mean TPF (tokens / decoding forwards, and with the prefill forward
counted as DMax's evaluation does), tokens/s of decoding (compilation
excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from dmax_jax.apps import cli
from dmax_jax.apps import gsm8k
from dmax_jax.apps import runner
from dmax_jax.apps.records import RecordWriter, check_writable, read_records, record_key, write_atomic

FIELDS = ("id", "question", "answer")  # what a GSM8K line gives


def read_gsm8k(path: str, tokenizer, limit: Optional[int] = None,
               notes: Optional[list] = None) -> tuple[list[runner.Request], list[str]]:
  """Requests (meta: the normalised reference) of a GSM8K-format file, and its line errors."""

  def parse(obj, number):
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("answer"), str):
      raise ValueError("needs a string 'answer' field")
    text, ids = runner.prompt_from_fields({"question": obj.get("question")}, tokenizer, math=True)
    return runner.Request(runner.line_id(obj, number), "", text, ids,
                          meta={"reference": gsm8k.reference_answer(obj["answer"])})

  requests, errors = runner.read_jsonl(path, parse, FIELDS, notes)
  return (requests if limit is None else requests[:limit]), errors


def score(record: dict) -> dict:
  """The record with the extracted ``prediction`` and ``correct`` added."""
  prediction = gsm8k.extract_prediction(record["output"])
  return dict(record, prediction=prediction, correct=prediction == record["reference"],
              strict=gsm8k.strictly_correct(record["output"], record["reference"]))


def select(records: Sequence[dict], requests: Sequence[runner.Request], settings: dict) -> list[dict]:
  """The records of ``requests`` made with ``settings`` (``runner.decoding_settings``)."""
  wanted = {record_key(runner.identity(r, settings), runner.KEY_FIELDS) for r in requests}
  return [r for r in records if record_key(r, runner.KEY_FIELDS) in wanted]


def summarize(rows: Sequence[dict], strategy: str, threshold: float, of: int, rejected: int = 0) -> dict:
  """Metrics of one (strategy, threshold) from its records ``rows``, out of ``of`` questions.

  Accuracy counts every question without a record (rejected as too long, or
  failed) as wrong; ``rejected`` is how many were rejected before decoding.
  The speed figures are over the decoded records.
  """
  tokens = sum(r["num_tokens"] for r in rows)
  seconds = sum(r["seconds"] for r in rows)
  nfe = sum(r["nfe"] for r in rows)
  prefill = sum(r["prefill_calls"] for r in rows)
  return {
      "strategy": strategy, "threshold": threshold, "n": len(rows), "of": of, "rejected": rejected,
      "accuracy": sum(bool(r["correct"]) for r in rows) / of if of else 0.0,
      "strict_accuracy": sum(bool(r.get("strict", False)) for r in rows) / of if of else 0.0,
      "mean_tpf": float(np.mean([r["tpf"] for r in rows])) if rows else 0.0,
      "tpf": tokens / nfe if nfe else 0.0,
      "tpf_with_prefill": tokens / (nfe + prefill) if nfe + prefill else 0.0,
      "tokens_per_second": tokens / seconds if seconds else 0.0,
      "mean_tokens": tokens / len(rows) if rows else 0.0,
  }


def markdown_table(rows: Sequence[dict]) -> str:
  lines = ["| strategy | threshold | decoded | rejected | accuracy | strict | mean TPF | TPF (+prefill) | tokens/s "
           "| mean tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['strategy']} | {r['threshold']} | {r['n']}/{r['of']} | {r['rejected']} | "
                 f"{100 * r['accuracy']:.1f}% | {100 * r['strict_accuracy']:.1f}% | {r['mean_tpf']:.2f} | "
                 f"{r['tpf_with_prefill']:.2f} | {r['tokens_per_second']:.1f} | {r['mean_tokens']:.1f} |")
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
  prefix = args.report or os.path.splitext(args.output)[0]
  for path in (prefix + ".json", prefix + ".md"):
    check_writable(path)
  with RecordWriter(args.output, runner.KEY_FIELDS) as writer:  # checked before the model loads
    config, params, tokenizer = runner.load_model(args.checkpoint, args.dtype)
    notes = []
    questions, errors = read_gsm8k(args.data, tokenizer, args.limit, notes)
    cli.report_notes(notes)
    requests, too_long = runner.check_prompts(questions, config, args.gen_length, args.block_length)
    if questions and not requests:
      cli.report_errors(errors)
      cli.report_errors([f"{args.data}: all {len(questions)} questions rejected, so no report was written; "
                         f"the first: {too_long[0]}"])
      return 1
    errors += too_long
    cli.report_errors(errors)
    checkpoint = runner.checkpoint_settings(args.checkpoint, args.dtype, args.seed)
    for name, strategy in configs:
      result = runner.run(
          requests, params=params, config=config, tokenizer=tokenizer, strategy=strategy,
          gen_length=args.gen_length, block_length=args.block_length, batch_size=args.batch_size, writer=writer,
          seed=args.seed, desc=f"{name} {strategy.threshold}", progress=not args.no_progress, annotate=score,
          settings=checkpoint)
      cli.report_errors(result.errors)
      errors += result.errors
  records = read_records(args.output)
  rows = []
  for name, strategy in configs:
    settings = runner.decoding_settings(strategy, args.gen_length, args.block_length, checkpoint)
    rows.append(summarize(select(records, requests, settings), name, strategy.threshold, len(questions),
                          len(too_long)))
  if not any(r["n"] for r in rows):
    cli.report_errors([f"{args.data}: no question could be decoded, so no report was written"])
    return 1
  table = markdown_table(rows)
  report = {"checkpoint": args.checkpoint, "data": args.data, "gen_length": args.gen_length,
            "block_length": args.block_length, "questions": len(questions), "rejected": len(too_long),
            "results": rows}
  write_atomic(prefix + ".json", json.dumps(report, indent=2))
  rejected = (f"; {len(too_long)} of {len(questions)} questions rejected as too long, counted as wrong"
              if too_long else "")
  write_atomic(prefix + ".md", f"GSM8K `{args.data}` with `{args.checkpoint}` (gen length {args.gen_length}, "
                               f"block {args.block_length}{rejected})\n\n{table}")
  print(table, end="")
  print(f"report: {prefix}.json, {prefix}.md; total wall {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  return 1 if errors else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tools/evaluate.py``'s entry point; returns the exit code."""
  return cli.run_cli(_evaluate, parser(), argv)
