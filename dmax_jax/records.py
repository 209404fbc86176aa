"""An append-only JSONL file of results that a killed run can resume.

Each record is written as one line, flushed and fsynced before the next
batch starts, so after a kill the file holds every finished record and at
most one torn last line. Opening the file again drops that torn line and
reports the keys already present; the caller skips those and appends the
rest, so a run killed any number of times ends with every record exactly
once.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence


class RecordsError(ValueError):
  """An output file that cannot be resumed (a corrupt line before the last)."""


def record_key(record: dict, fields: Sequence[str]) -> tuple:
  """The identity of a record: its ``fields`` as JSON text (so 1 and "1" stay different)."""
  return tuple(json.dumps(record.get(f), sort_keys=True) for f in fields)


def read_records(path: str) -> list[dict]:
  """Every complete record of ``path`` (missing file: none); a torn last line is ignored."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  records = []
  for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline (torn or empty)
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise RecordsError(f"{path}:{number}: not a JSON record ({e.msg}); the file is not one this tool wrote") from None
  return records


class RecordWriter:
  """Appends records to a JSONL file, skipping keys that are already there."""

  def __init__(self, path: Optional[str], key_fields: Sequence[str], stream=None):
    """``path`` None writes to ``stream`` (e.g. stdout) and resumes nothing."""
    self.path, self.key_fields = path, tuple(key_fields)
    self.existing: list[dict] = []
    if path is not None:
      self.existing = read_records(path)
      _drop_torn_tail(path)
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")
    else:
      self._file = stream
    self.done = {record_key(r, self.key_fields) for r in self.existing}

  def has(self, record: dict) -> bool:
    return record_key(record, self.key_fields) in self.done

  def write(self, records: Iterable[dict]):
    for record in records:
      self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
      self.done.add(record_key(record, self.key_fields))
    self._file.flush()
    if self.path is not None:
      os.fsync(self._file.fileno())

  def close(self):
    if self.path is not None:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _drop_torn_tail(path: str):
  """Truncates ``path`` after its last newline (the rest is a line cut short by a kill)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
      f.truncate(keep)
      f.flush()
      os.fsync(f.fileno())
