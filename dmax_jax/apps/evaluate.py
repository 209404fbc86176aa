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
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from dmax_jax import decoding
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


def table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
  """A Markdown table: ``header`` then one row of ``cells`` per entry."""
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def markdown_table(rows: Sequence[dict]) -> str:
  header = ("strategy", "threshold", "decoded", "rejected", "accuracy", "strict", "mean TPF", "TPF (+prefill)",
            "tokens/s", "mean tokens")
  return table(header, [(r["strategy"], "-" if r["threshold"] is None else str(r["threshold"]), f"{r['n']}/{r['of']}",
                         str(r["rejected"]),
                         f"{100 * r['accuracy']:.1f}%", f"{100 * r['strict_accuracy']:.1f}%", f"{r['mean_tpf']:.2f}",
                         f"{r['tpf_with_prefill']:.2f}", f"{r['tokens_per_second']:.1f}", f"{r['mean_tokens']:.1f}")
                        for r in rows])


@dataclasses.dataclass
class Evaluation:
  """What ``evaluate`` did: a summary row per strategy, the per-question problems, where the report went."""

  rows: list[dict]  # ``summarize`` per strategy, in the order given
  table: str  # the rows as a Markdown table
  errors: list[str]  # "FILE:LINE: problem" per question that failed or was rejected, and run-level problems
  notes: list[str]  # warnings (unknown input fields)
  questions: int
  rejected: int  # questions rejected as too long before decoding
  report: Optional[str]  # the report prefix (PREFIX.json, PREFIX.md); None when no report was written


def evaluate(*, checkpoint: str, data: str, output: str, strategies: Sequence, report: Optional[str] = None,
             gen_length: int = 256, block_length: int = 32, batch_size: int = 8, dtype: str = "float32",
             kernels: str = "auto", seed: int = 0, limit: Optional[int] = None, progress: bool = True) -> Evaluation:
  """Decodes every question of ``data`` under each strategy (``decoding`` strategy objects) into ``output``
  (resumed) and writes the report to ``report`` (default: ``output``'s stem) unless nothing could be decoded.

  Raises ``runner.UsageError`` for run-level problems (files, checkpoint, settings).
  """
  if not strategies:
    raise runner.UsageError("no (strategy, threshold) to evaluate")
  if limit is not None and limit <= 0:
    raise runner.UsageError(f"limit must be positive, got {limit}")
  if not os.path.isfile(data):
    raise runner.UsageError(f"{data}: no such file")
  prefix = report or os.path.splitext(output)[0]
  for path in (prefix + ".json", prefix + ".md"):
    check_writable(path)
  run = dict(gen_length=gen_length, block_length=block_length)
  # float64: x64 mode from before the model loads until the last generation (scoped: nothing leaks out)
  with runner.precision(dtype), RecordWriter(output, runner.KEY_FIELDS) as writer:  # checked before the model loads
    config, params, tokenizer = runner.load_model(checkpoint, dtype, kernels)
    notes = []
    questions, errors = read_gsm8k(data, tokenizer, limit, notes)
    requests, too_long = runner.check_prompts(questions, config, gen_length, block_length)
    result = Evaluation([], "", errors, notes, len(questions), len(too_long), None)
    if questions and not requests:
      errors.append(f"{data}: all {len(questions)} questions rejected, so no report was written; the first: "
                    f"{too_long[0]}")
      return result
    errors += too_long
    key = runner.checkpoint_settings(checkpoint, dtype, seed, kernels)
    for strategy in strategies:
      out = runner.run(requests, params=params, config=config, tokenizer=tokenizer, strategy=strategy,
                       batch_size=batch_size, writer=writer, seed=seed, progress=progress, annotate=score,
                       settings=key, desc=f"{decoding.name_of(strategy)} {_threshold(strategy)}", **run)
      errors += out.errors
  records = read_records(output)
  result.rows = [summarize(select(records, requests, runner.decoding_settings(st, settings=key, **run)),
                           decoding.name_of(st), _threshold(st), len(questions), len(too_long)) for st in strategies]
  if not any(r["n"] for r in result.rows):
    errors.append(f"{data}: no question could be decoded, so no report was written")
    return result
  result.table, result.report = markdown_table(result.rows), prefix
  _write_report(result, checkpoint=checkpoint, data=data, **run)
  return result


def _threshold(strategy):
  """The threshold a strategy is swept over (None for a strategy without one: low_confidence, whose k is in its
  records' settings)."""
  return getattr(strategy, "threshold", None)


def _write_report(result: Evaluation, *, checkpoint, data, gen_length, block_length) -> None:
  prefix = result.report
  report = {"checkpoint": checkpoint, "data": data, "gen_length": gen_length, "block_length": block_length,
            "questions": result.questions, "rejected": result.rejected, "results": result.rows}
  write_atomic(prefix + ".json", json.dumps(report, indent=2))
  rejected = (f"; {result.rejected} of {result.questions} questions rejected as too long, counted as wrong"
              if result.rejected else "")
  write_atomic(prefix + ".md", f"GSM8K `{data}` with `{checkpoint}` (gen length {gen_length}, "
                               f"block {block_length}{rejected})\n\n{result.table}")


# ---------------------------------------------------------------- command line


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
  p.add_argument("--strategies", default="spd,threshold", help=f"comma-separated: {', '.join(decoding.STRATEGIES)}")
  p.add_argument("--thresholds", default="0.5,0.7,0.9",
                 help="comma-separated thresholds (spd, threshold; low_confidence runs once, with --k)")
  p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
  cli.add_decoding_args(p)
  return p


def _evaluate(args) -> int:
  t0 = time.perf_counter()
  cli.check_decoding_args(args)
  if args.limit is not None and args.limit <= 0:
    raise runner.UsageError(f"--limit must be positive, got {args.limit}")
  names = [s.strip() for s in args.strategies.split(",") if s.strip()]
  strategies = []
  for s in names:
    for t in _floats(args.thresholds, "--thresholds"):
      strategy = runner.make_strategy(s, t, args.confidence_stop, args.temperature, args.k)
      if strategy not in strategies:  # a strategy without a threshold (low_confidence) runs once, not per threshold
        strategies.append(strategy)
  result = evaluate(checkpoint=args.checkpoint, data=args.data, output=args.output, strategies=strategies,
                    report=args.report, gen_length=args.gen_length, block_length=args.block_length,
                    batch_size=args.batch_size, dtype=args.dtype, kernels=args.kernels, seed=args.seed, limit=args.limit,
                    progress=not args.no_progress)
  cli.report_notes(result.notes)
  cli.report_errors(result.errors)
  if result.report is None:
    return 1
  print(result.table, end="")
  print(f"report: {result.report}.json, {result.report}.md; total wall {time.perf_counter() - t0:.1f} s",
        file=sys.stderr)
  return 1 if result.errors else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``tools/evaluate.py``'s entry point; returns the exit code."""
  return cli.run_cli(_evaluate, parser(), argv)
