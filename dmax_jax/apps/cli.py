"""Command lines: ``decode.py`` (batch generation) and the flags it shares with ``tools/evaluate.py``.

Exit codes: 0 all prompts done, 1 some input lines failed (each reported as
``error: FILE:LINE: problem`` on stderr; the other lines still ran) or a write
failed (a full disk: the output keeps its complete records), 2 usage errors
(bad flags, missing files, unreadable checkpoint or output file).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from dmax_jax import decoding
from dmax_jax.apps import runner
from dmax_jax.apps import trace_html
from dmax_jax.apps.records import RecordsError, RecordWriter, check_writable
from dmax_jax.checkpoints.hf import CheckpointError
from dmax_jax.tokenizer import TokenizerError


def add_model_args(p: argparse.ArgumentParser):
  """The flags ``decode.py``, ``tools/evaluate.py`` and ``serve.py`` share, with one meaning and default: checkpoint,
  block length, SPD's stop rule, low_confidence's k, dtype, kernels."""
  p.add_argument("--checkpoint", required=True, help="converted checkpoint or Hugging Face directory (with tokenizer)")
  p.add_argument("--block-length", type=int, default=32, help="block length K (default 32)")
  p.add_argument("--confidence-stop", type=float, default=0.9, help="SPD: stop a block when all tokens reach this")
  p.add_argument("--k", type=int, default=6, help="low_confidence: tokens committed per step (default 6)")
  p.add_argument("--dtype", default="float32", choices=sorted(runner.DTYPES),
                 help="params and compute dtype (float64: JAX's x64 mode, for exactness checks on a CPU)")
  p.add_argument("--kernels", default="auto", choices=("auto",) + tuple(runner.KERNELS),
                 help="MoE and attention kernels: pallas (GPU decoding kernels), xla; auto (default): pallas on a GPU")


def add_decoding_args(p: argparse.ArgumentParser):
  """Flags of every tool that decodes in batches: ``add_model_args``, lengths, batch, sampling, progress."""
  add_model_args(p)
  p.add_argument("--gen-length", type=int, default=256, help="tokens to generate per prompt (default 256)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_positive(args, *flags: str):
  """UsageError for the first of ``flags`` (argparse names) that is not positive."""
  for flag in flags:
    if getattr(args, flag) <= 0:
      raise runner.UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")


def check_model_args(args):
  """``add_model_args``' checks: a positive block length, a confidence stop in [0, 1], k >= 1."""
  check_positive(args, "block_length")
  if not 0.0 <= args.confidence_stop <= 1.0:
    raise runner.UsageError(f"--confidence-stop must lie in [0, 1], got {args.confidence_stop}")
  if args.k < 1:
    raise runner.UsageError(f"--k must be >= 1, got {args.k}")


def check_decoding_args(args):
  check_positive(args, "gen_length", "batch_size")
  check_model_args(args)
  if args.temperature < 0:
    raise runner.UsageError(f"--temperature must be >= 0, got {args.temperature}")


def run_cli(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Optional[Sequence[str]]) -> int:
  """Parses ``argv`` and runs ``body``; run-level errors become ``error: ...`` and exit code 2."""
  args = parser.parse_args(argv)
  try:
    return body(args)
  except (runner.UsageError, RecordsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a write that failed (a full disk); what was written before it is complete
    print(f"error: {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted: finished records are saved; rerun the same command to resume", file=sys.stderr)
    return 130


def run_writer(action: Callable[[], Any], out: str) -> int:
  """Runs a conversion tool's ``action``: a ``CheckpointError`` becomes ``error: ...`` on stderr and exit status 2;
  a failed write (a full disk) names the file with exit status 1 (the output is removed, nothing half-written
  stays)."""
  try:
    action()
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {e.filename or out}: {e.strerror or e}; nothing was written to {out}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


def report_errors(errors: Sequence[str]):
  for e in errors:
    print(f"error: {e}", file=sys.stderr)


def report_notes(notes: Sequence[str]):
  for n in notes:
    print(f"warning: {n}", file=sys.stderr)


def decode_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="decode.py", description="Batch generation with SPD, threshold or low-confidence decoding.",
      epilog="Input JSONL lines hold one of: \"question\" (user turn, chat template, --math suffix), "
             "\"messages\" (conversation, chat template), \"prompt\" (raw text, no template); \"id\" optional.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", help="JSONL file of prompts")
  src.add_argument("--prompt", help="a single question (chat template applied)")
  p.add_argument("--output", help="JSONL of results (resumed if it exists); default: stdout")
  p.add_argument("--strategy", default="spd", choices=tuple(decoding.STRATEGIES))
  p.add_argument("--threshold", type=float, default=None,
                 help="decoding threshold (default: 0.5 spd, 0.95 threshold; low_confidence has none: see --k)")
  p.add_argument("--math", action="store_true", help="append the math suffix to questions")
  p.add_argument("--trace", metavar="FILE.html", help="write a step-by-step HTML trace of the decoded prompts")
  p.add_argument("--records", default="full", choices=runner.RECORD_FORMATS,
                 help="full: every field of a generation; training: {\"messages\": prompt + generated answer}, "
                      "the data format train.py reads (for self-distillation)")
  add_decoding_args(p)
  return p


def _decode(args) -> int:
  with runner.precision(args.dtype):  # float64: x64 mode from before the model loads until the last record
    return _decode_in_precision(args)


def _decode_in_precision(args) -> int:
  t0 = time.perf_counter()
  check_decoding_args(args)
  strategy = runner.make_strategy(args.strategy, args.threshold, args.confidence_stop, args.temperature, args.k)
  if args.input is not None and not os.path.isfile(args.input):
    raise runner.UsageError(f"{args.input}: no such file")
  if args.trace:
    check_writable(args.trace)
  with RecordWriter(args.output, runner.KEY_FIELDS, stream=sys.stdout) as writer:  # checked before the model loads
    config, params, tokenizer = runner.load_model(args.checkpoint, args.dtype, args.kernels)
    notes = []
    if args.input is not None:
      requests, errors = runner.read_prompts(args.input, tokenizer, args.math, notes)
    else:
      requests, errors = [], []
      fields = {"question": args.prompt}
      try:
        text, ids = runner.prompt_from_fields(fields, tokenizer, args.math)
        requests.append(runner.Request(1, "--prompt", text, ids, messages=runner.prompt_messages(fields, args.math)))
      except TokenizerError as e:
        raise runner.UsageError(str(e)) from None
      except ValueError as e:
        errors.append(f"--prompt: {e}")
    report_notes(notes)
    if args.records == "training":
      errors += [f"{r.where}: a raw 'prompt' has no conversation to train on (give 'question' or 'messages')"
                 for r in requests if r.messages is None]
      requests = [r for r in requests if r.messages is not None]
    requests, too_long = runner.check_prompts(requests, config, args.gen_length, args.block_length)
    errors += too_long
    report_errors(errors)
    settings = dict(runner.checkpoint_settings(args.checkpoint, args.dtype, args.seed, args.kernels), records=args.records)
    result = runner.run(
        requests, params=params, config=config, tokenizer=tokenizer, strategy=strategy, gen_length=args.gen_length,
        block_length=args.block_length, batch_size=args.batch_size, writer=writer, trace=bool(args.trace),
        seed=args.seed, progress=not args.no_progress, settings=settings, record_format=args.records)
  report_errors(result.errors)
  if args.trace and result.traces:
    trace_html.write(args.trace, result.traces, tokenizer, config.mask_token_id)
  elif args.trace:
    print(f"note: nothing was decoded in this run, so {args.trace} was not written", file=sys.stderr)
  failed = len(errors) + len(result.errors)
  print(f"{runner.summary_line(result, failed)}; total wall {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  return 1 if failed else 0


def decode_main(argv: Optional[Sequence[str]] = None) -> int:
  """``decode.py``'s entry point; returns the exit code."""
  return run_cli(_decode, decode_parser(), argv)
