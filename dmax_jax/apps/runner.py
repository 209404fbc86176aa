"""Batch generation: prompts in, one resumable JSONL record per prompt out.

Input lines (JSONL, one object a line; ``id`` optional, else the line number):

- ``{"question": TEXT}``: one user turn in the checkpoint's chat template,
  followed by the assistant generation prompt; ``--math`` appends
  ``MATH_SUFFIX`` (DMax's "Let's think step by step") to the question.
- ``{"messages": [{"role", "content"}, ...]}``: a whole conversation, rendered
  with the chat template and the generation prompt.
- ``{"prompt": TEXT}``: raw text, tokenized as is (no template, no suffix):
  for prompts that are already rendered, or for completion-style prompting.

A line has exactly one of the three. The CLI's ``--prompt TEXT`` is a
*question* (chat template), since that is what a person typing one means.

Records (one per prompt, written as soon as its batch finishes): id, prompt
(the input text; the rendered chat for ``messages``), output (decoded text up
to the first eos), tokens (generated ids), num_tokens, nfe (decoding
forwards), prefill_calls, tpf (num_tokens / nfe), seconds (this prompt's
share of its batch's decoding time, compilation excluded), batch_seconds,
batch_size, the decoding settings, and the key a rerun resumes by
(``KEY_FIELDS``): prompt_hash (a digest of the prompt's token ids, so the
text, chat template, suffix and tokenizer all count) and settings (every
setting the generation depends on: strategy fields, lengths, checkpoint path
and fingerprint, dtype, seed). A rerun skips only records whose key matches;
records made with other settings stay in the file and are not reused. The
"training" record format keeps just the key and ``messages`` (the prompt's
conversation plus the generated answer), which ``train.py`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax import decoding
from dmax_jax.checkpoints import converted as checkpoint
from dmax_jax.model.config import ConfigError
from dmax_jax.checkpoints.hf import CheckpointError
from dmax_jax.apps.records import RecordWriter
from dmax_jax.tokenizer import MATH_SUFFIX, ChatTemplateError, TokenizerError, load_tokenizer

PROMPT_FIELDS = ("question", "messages", "prompt")
# --dtype: params and compute dtype. float64 (exactness checks from the command line, on any CPU) runs under JAX's
# x64 mode, which only ``precision`` turns on, and only around its run
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# --kernels: the decoding forward's MoE backend and attention ("auto": the Pallas kernels on a GPU, XLA elsewhere)
KERNELS = {"xla": {}, "pallas": {"moe_backend": "pallas", "attention": "pallas"}}


def resolve_kernels(kernels: str) -> str:
  """``auto`` -> ``pallas`` on a GPU backend, else ``xla``; other names are checked."""
  if kernels == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if kernels not in KERNELS:
    raise UsageError(f"--kernels must be auto or one of {', '.join(KERNELS)}, got {kernels!r}")
  return kernels


class UsageError(ValueError):
  """A problem with the whole run (flags, checkpoint, files): exit code 2."""


def precision(dtype: str):
  """The context a run in ``dtype`` needs: JAX's x64 mode for float64 (scoped, so it never leaks into the rest of
  the process, e.g. other tests), nothing otherwise. Enter it before the model is loaded and keep it until the
  last generation has been read back."""
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


@dataclasses.dataclass
class Request:
  """One prompt to decode: where it came from, its text and token ids, extra record fields."""

  id: Any
  where: str  # "FILE:LINE" (or "--prompt") for error messages
  text: str
  ids: list[int]
  meta: dict = dataclasses.field(default_factory=dict)
  messages: Optional[list] = None  # the conversation the prompt renders (None for a raw "prompt")


@dataclasses.dataclass
class RunResult:
  """What one ``run`` did: its new records, their traces, the per-prompt errors, totals."""

  records: list[dict]
  traces: list[dict]
  errors: list[str]
  skipped: int
  seconds: float

  @property
  def tokens(self) -> int:
    return sum(r["num_tokens"] for r in self.records)

  @property
  def mean_tpf(self) -> float:
    return float(np.mean([r["tpf"] for r in self.records])) if self.records else 0.0

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- input

def prompt_from_fields(obj: Any, tokenizer, math: bool) -> tuple[str, list[int]]:
  """(display text, token ids) of one input object; ValueError names the problem."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  present = [k for k in PROMPT_FIELDS if k in obj]
  if not present:
    raise ValueError(f"no prompt field (one of {', '.join(PROMPT_FIELDS)})")
  if len(present) > 1:
    raise ValueError(f"more than one prompt field ({', '.join(present)}); give exactly one")
  field = present[0]
  value = obj[field]
  if field == "messages":
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
      raise ValueError("'messages' must be a list of {\"role\": str, \"content\": str}")
    if not value or not any(m["content"].strip() for m in value):
      raise ValueError("empty prompt ('messages' has no content)")
    text = tokenizer.render_chat(value, add_generation_prompt=True)
    return text, tokenizer.encode(text)
  if not isinstance(value, str):
    raise ValueError(f"'{field}' must be a string, got {type(value).__name__}")
  if not value.strip():
    raise ValueError(f"empty prompt ('{field}' is empty)")
  if field == "question":
    return value, tokenizer.prompt_ids(value, MATH_SUFFIX if math else "")
  return value, tokenizer.encode(value)


def prompt_messages(obj: dict, math: bool) -> Optional[list[dict]]:
  """The conversation a checked input object renders: its "messages", or its "question" as one user turn (with
  the math suffix when ``math``); None for a raw "prompt", which has no conversation."""
  if "messages" in obj:
    return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
  if "question" in obj:
    return [{"role": "user", "content": obj["question"] + (MATH_SUFFIX if math else "")}]
  return None


def line_id(obj, number: int):
  """A request's id: the object's "id" (a string or an integer) or else its line number."""
  if isinstance(obj, dict) and "id" in obj:
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
      raise ValueError(f"'id' must be a string or an integer, got {json.dumps(value)[:40]}")
    return value
  return number


def read_jsonl(path: str, parse, known: Optional[Sequence[str]] = None,
               notes: Optional[list] = None) -> tuple[list, list[str]]:
  """Applies ``parse(obj, line_number)`` to each non-blank line; returns (results, "FILE:LINE: problem" errors).

  ``parse`` returns a Request (or raises ValueError); ids must be unique.
  Lines must be UTF-8. With ``known`` (the fields the reader uses), fields
  outside it are collected into one note appended to ``notes``.
  """
  if not os.path.isfile(path):
    raise UsageError(f"{path}: no such file")
  results, errors, seen, unknown = [], [], {}, {}
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        errors.append(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        errors.append(f"{where}: not valid JSON ({e.msg})")
        continue
      if known is not None and isinstance(obj, dict):
        for field in obj:
          if field not in known:
            unknown.setdefault(field, number)
      try:
        request = parse(obj, number)
      except ChatTemplateError as e:
        raise UsageError(str(e)) from None
      except ValueError as e:
        errors.append(f"{where}: {e}")
        continue
      key = json.dumps(request.id)
      if key in seen:
        errors.append(f"{where}: duplicate id {key} (first on line {seen[key]})")
        continue
      seen[key] = number
      request.where = where
      results.append(request)
  if unknown and notes is not None:
    fields = ", ".join(f"{json.dumps(k)} (line {n})" for k, n in unknown.items())
    notes.append(f"{path}: ignoring unknown fields {fields}; the fields read are {', '.join(known)}")
  return results, errors


def read_prompts(path: str, tokenizer, math: bool = False,
                 notes: Optional[list] = None) -> tuple[list[Request], list[str]]:
  """The requests of a prompts JSONL file (see the module docstring) and its line errors."""

  def parse(obj, number):
    rid = line_id(obj, number)
    text, ids = prompt_from_fields(obj, tokenizer, math)
    return Request(rid, "", text, ids, messages=prompt_messages(obj, math))

  return read_jsonl(path, parse, ("id",) + PROMPT_FIELDS, notes)


def check_prompts(requests: Sequence[Request], config, gen_length: int, block_length: int):
  """Splits off requests the decoder cannot take (``decoding.prompt_problem``): (kept, errors)."""
  kept, errors = [], []
  for r in requests:
    problem = decoding.prompt_problem(r.ids, gen_length, block_length, config)
    if problem:
      errors.append(f"{r.where}: {problem}")
    else:
      kept.append(r)
  return kept, errors


# ---------------------------------------------------------------- model

def load_model(path: str, dtype: str = "float32", kernels: str = "xla"):
  """(config, params, tokenizer) of a checkpoint directory.

  A converted (Orbax) checkpoint or a Hugging Face directory
  (``dmax_jax.checkpoints.converted.load_any``). Params are cast to ``dtype``, which is
  also the compute dtype (float64 only inside ``precision("float64")``); ``kernels`` (a
  ``KERNELS`` name, or ``auto``) picks the forward's MoE backend and attention.
  """
  numerics = KERNELS[resolve_kernels(kernels)]
  if dtype not in DTYPES:
    raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if dtype == "float64" and not jax.config.jax_enable_x64:
    raise UsageError("--dtype float64 needs JAX's x64 mode: load and decode inside runner.precision('float64')")
  if not os.path.isdir(path):
    raise UsageError(f"{path}: no such checkpoint directory")
  try:
    tokenizer = load_tokenizer(path)
    config, params = checkpoint.load_any(path, dtype=DTYPES[dtype], compute_dtype=dtype, **numerics)
  except (CheckpointError, ConfigError, TokenizerError) as e:
    raise UsageError(str(e)) from None
  return config, params, tokenizer


def make_strategy(name: str, threshold: Optional[float] = None, confidence_stop: float = 0.9,
                  temperature: float = 0.0, k: Optional[int] = None):
  """The registered decoding strategy ``name`` (``decoding.STRATEGIES``) with the settings it has (the others are
  ignored: ``k`` is low_confidence's, ``threshold`` spd's and threshold's); None = the strategy's default."""
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise UsageError(f"threshold must lie in [0, 1], got {threshold}")
  try:
    strategy = decoding.make(name, threshold=threshold, confidence_stop=confidence_stop, temperature=temperature, k=k)
  except KeyError:
    raise UsageError(f"unknown strategy {name!r} ({' or '.join(decoding.STRATEGIES)})") from None
  try:
    strategy.check()
  except ValueError as e:
    raise UsageError(str(e)) from None
  return strategy


def strategy_fields(strategy) -> dict:
  """The record fields that name a strategy: {"strategy": "spd", "threshold": 0.5, ...}."""
  return {"strategy": decoding.name_of(strategy), **dataclasses.asdict(strategy)}


# ---------------------------------------------------------------- identity

KEY_FIELDS = ("id", "prompt_hash", "settings")  # what a finished record is resumed by
RECORD_FORMATS = ("full", "training")


def prompt_hash(ids: Sequence[int]) -> str:
  """A short digest of a prompt's token ids: it changes with the text, the chat template, the suffix, the tokenizer."""
  return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def checkpoint_fingerprint(path: str) -> str:
  """A digest of every file's relative path, size and modification time under ``path`` (cheap: nothing is read),
  so a checkpoint rewritten in place is told apart from the one a record was made with."""
  entries = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      entries.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def checkpoint_settings(path: str, dtype: str, seed: int, kernels: str = "xla") -> dict:
  """The run-level settings that change a generation besides the strategy and the lengths.

  ``kernels`` (resolved) changes the rounding, so the Pallas kernels' records are keyed apart; XLA's
  records keep the keys they had before the setting existed.
  """
  kernels = resolve_kernels(kernels)
  return {"checkpoint": os.path.abspath(path), "checkpoint_fingerprint": checkpoint_fingerprint(path),
          "dtype": dtype, "seed": seed, **({} if kernels == "xla" else {"kernels": kernels})}


def decoding_settings(strategy, gen_length: int, block_length: int, settings: Optional[dict] = None) -> dict:
  """Every setting a record's generation depends on (the ``settings`` field of its key)."""
  return {**strategy_fields(strategy), "gen_length": gen_length, "block_length": block_length, **(settings or {})}


def identity(request: Request, settings: dict) -> dict:
  """The key fields of ``request``'s record under ``settings`` (``decoding_settings``)."""
  return {"id": request.id, "prompt_hash": prompt_hash(request.ids), "settings": settings}


# ---------------------------------------------------------------- running

def _generate_batch(params, config, batch, settings, errors):
  """Generations of ``batch``; a batch the engine rejects is retried one by one to name the bad prompt."""
  try:
    return batch, decoding.generate(params, config, [r.ids for r in batch], **settings)
  except ValueError as e:
    if len(batch) == 1:
      errors.append(f"{batch[0].where}: {e}")
      return [], []
  kept, gens = [], []
  for r in batch:
    ok, g = _generate_batch(params, config, [r], settings, errors)
    kept += ok
    gens += g
  return kept, gens


def run(requests: Sequence[Request], *, params, config, tokenizer, strategy, gen_length: int, block_length: int,
        batch_size: int, writer: RecordWriter, trace: bool = False, seed: int = 0, desc: str = "prompts",
        progress: bool = True, annotate: Optional[Callable[[dict], dict]] = None, settings: Optional[dict] = None,
        record_format: str = "full") -> RunResult:
  """Decodes every request not yet in ``writer``, shortest prompts first, ``batch_size`` at a time.

  A request counts as done when ``writer`` holds its ``identity``: its id,
  its prompt's token ids and every decoding setting (``settings`` adds the
  run-level ones, e.g. ``checkpoint_settings``). Each batch's records are
  written (and fsynced) as soon as it finishes; ``annotate`` may add fields
  to a record before it is written. ``record_format`` "training" writes
  ``{"messages": the prompt's conversation + the generated answer}`` plus the
  key fields instead (the requests need ``messages``). Each batch shape's
  program is compiled before its timer starts, so seconds and tokens/s are
  decoding alone.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  if record_format not in RECORD_FORMATS:
    raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
  fields = strategy_fields(strategy)
  key_settings = decoding_settings(strategy, gen_length, block_length, settings)
  pending = [r for r in requests if not writer.has(identity(r, key_settings))]
  pending.sort(key=lambda r: len(r.ids))  # stable: equal lengths keep input order
  result = RunResult([], [], [], len(requests) - len(pending), 0.0)
  rng = jax.random.key(seed)
  bar = tqdm(total=len(requests), initial=result.skipped, desc=desc, unit="prompt", file=sys.stderr,
             disable=not progress, dynamic_ncols=True)
  engine = dict(strategy=strategy, gen_length=gen_length, block_length=block_length, trace=trace)
  for start in range(0, len(pending), batch_size):
    chunk = pending[start:start + batch_size]
    rng, key = jax.random.split(rng)
    try:
      decoding.prepare(params, config, [r.ids for r in chunk], **engine)  # compile outside the timer
    except ValueError:
      pass  # generate raises it again, prompt by prompt
    t0 = time.perf_counter()
    batch, gens = _generate_batch(params, config, chunk, dict(engine, rng=key), result.errors)
    seconds = time.perf_counter() - t0
    result.seconds += seconds
    records = [_record(r, g, tokenizer, fields, seconds, len(batch), gen_length, block_length)
               for r, g in zip(batch, gens)]
    records = [dict(rec, **identity(r, key_settings)) for r, rec in zip(batch, records)]
    if annotate is not None:
      records = [annotate(rec) for rec in records]
    if record_format == "training":
      writer.write([training_record(r, rec) for r, rec in zip(batch, records)])
    else:
      writer.write(records)
    result.records += records
    if trace:
      result.traces += [{"record": rec, "prompt_ids": r.ids, "steps": g.trace} for r, g, rec in zip(batch, gens, records)]
    bar.update(len(chunk))
    bar.set_postfix(tok_s=f"{result.tokens_per_second:.1f}", tpf=f"{result.mean_tpf:.2f}", refresh=False)
  bar.close()
  return result


def training_record(request: Request, record: dict) -> dict:
  """A record in ``train.py``'s data format: the prompt's conversation plus the generated answer (and the key)."""
  if request.messages is None:
    raise ValueError(f"{request.where}: a raw 'prompt' has no conversation to train on")
  answer = {"role": "assistant", "content": record["output"]}
  return {"messages": [*request.messages, answer], **{k: record[k] for k in KEY_FIELDS}}


def _record(request: Request, gen, tokenizer, fields, seconds, batch_size, gen_length, block_length) -> dict:
  return {
      "id": request.id, "prompt": request.text, "output": tokenizer.decode(gen.tokens),
      "tokens": list(gen.tokens), "num_tokens": len(gen.tokens), "nfe": gen.nfe,
      "prefill_calls": gen.prefill_calls, "tpf": len(gen.tokens) / max(gen.nfe, 1),
      "seconds": seconds / max(batch_size, 1), "batch_seconds": seconds, "batch_size": batch_size,
      **fields, "gen_length": gen_length, "block_length": block_length, **request.meta,
  }


def summary_line(result: RunResult, failed: Optional[int] = None) -> str:
  """The closing line of a run; ``failed`` counts every prompt that failed (default: those that failed in ``run``)."""
  failed = len(result.errors) if failed is None else failed
  return (f"{len(result.records)} prompts decoded ({result.skipped} already done, {failed} failed), "
          f"{result.tokens} tokens, mean TPF {result.mean_tpf:.2f}, {result.tokens_per_second:.1f} tokens/s, "
          f"wall {result.seconds:.1f} s")
