"""Training data: JSONL conversations -> padded token arrays -> seeded batches.

A line is ``{"question": ..., "answer": ...}`` or ``{"messages": [{"role",
"content"}, ...]}`` (the last message is the assistant's answer, the ones
before it the prompt). Each example is tokenized with the checkpoint's chat
template: prompt ids = the prompt turns with the generation prompt, full ids =
all turns; the full ids are padded with eos to ``max_seq_len`` (longer ones
truncated).

Batches follow a per-epoch permutation seeded by ``(seed, epoch)``; where the
stream stands is a ``DataPosition(epoch, index)`` that checkpoints save, so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional

import numpy as np

from dmax_jax.training.diffusion import EOS_LABEL_CAP, make_labels


class DataError(ValueError):
  """Unusable training data; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """The next batch starts at example ``index`` of epoch ``epoch``'s permutation."""

  epoch: int = 0
  index: int = 0

  def to_array(self) -> np.ndarray:
    return np.array([self.epoch, self.index], np.int64)

  @classmethod
  def from_array(cls, a) -> "DataPosition":
    a = np.asarray(a)
    return cls(int(a[0]), int(a[1]))


def _conversation(row, where: str) -> list[dict]:
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "messages" in row:
    msgs = row["messages"]
    ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    )
    if not ok:
      raise DataError(f"{where}: 'messages' must be a list of >= 2 {{'role', 'content'}} objects")
    if msgs[-1]["role"] != "assistant":
      raise DataError(f"{where}: the last message must have role 'assistant', got {msgs[-1]['role']!r}")
    return msgs
  if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
  raise DataError(f"{where}: expected keys 'question' and 'answer' (strings) or 'messages'")


def read_conversations(path: str) -> list[list[dict]]:
  """All conversations of a JSONL file; a bad line raises ``DataError`` naming file:line."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
      out.append(_conversation(row, where))
  if not out:
    raise DataError(f"{path}: no examples")
  return out


def tokenize(tokenizer, messages: list[dict], max_seq_len: int, eos_id: int, prompt_suffix: str = ""):
  """(ids [max_seq_len] int32, prompt_len) of one conversation."""
  if prompt_suffix:
    messages = messages[:-2] + [dict(messages[-2], content=messages[-2]["content"] + prompt_suffix)] + messages[-1:]
  prompt = tokenizer.chat_ids(messages[:-1], add_generation_prompt=True)
  full = tokenizer.chat_ids(messages, add_generation_prompt=False)
  ids = np.full((max_seq_len,), eos_id, np.int32)
  n = min(len(full), max_seq_len)
  ids[:n] = full[:n]
  return ids, min(len(prompt), max_seq_len)


@dataclasses.dataclass
class Dataset:
  """Tokenized examples: ids [N, L], prompt_len [N], labels [N, L], on_policy [N]."""

  ids: np.ndarray
  prompt_len: np.ndarray
  labels: np.ndarray
  on_policy: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx) -> dict:
    return {"ids": self.ids[idx], "prompt_len": self.prompt_len[idx], "labels": self.labels[idx],
            "on_policy": self.on_policy[idx]}


def build_dataset(
    path: str, tokenizer, max_seq_len: int, eos_id: int, *, oput: bool, prompt_suffix: str = "",
    eos_cap: int = EOS_LABEL_CAP,
) -> Dataset:
  """Reads and tokenizes a JSONL file; with ``oput`` every example appears twice (on- and off-policy)."""
  convs = read_conversations(path)
  pairs = [tokenize(tokenizer, c, max_seq_len, eos_id, prompt_suffix) for c in convs]
  ids = np.stack([p[0] for p in pairs])
  prompt_len = np.array([p[1] for p in pairs], np.int32)
  on_policy = np.zeros(len(ids), bool)
  if oput:
    ids = np.concatenate([ids, ids])
    prompt_len = np.concatenate([prompt_len, prompt_len])
    on_policy = np.concatenate([np.ones(len(on_policy), bool), on_policy])
  labels = make_labels(ids, prompt_len, eos_id, eos_cap)
  return Dataset(ids=ids, prompt_len=prompt_len, labels=labels, on_policy=on_policy)


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of a permutation is dropped)."""
  return n // batch_size


def batches(ds: Dataset, batch_size: int, seed: int, start: DataPosition = DataPosition()) -> Iterator[tuple[dict, DataPosition]]:
  """Endless (batch, position after it) pairs from ``start``; epochs reshuffle."""
  if steps_per_epoch(len(ds), batch_size) == 0:
    raise DataError(f"the data set has {len(ds)} examples, fewer than one batch of {batch_size}")
  epoch, index = start.epoch, start.index
  perm: Optional[np.ndarray] = None
  while True:
    if index + batch_size > len(ds):
      epoch, index, perm = epoch + 1, 0, None
    if perm is None:
      perm = permutation(len(ds), seed, epoch)
    idx = perm[index : index + batch_size]
    index += batch_size
    yield ds.take(idx), DataPosition(epoch, index)
