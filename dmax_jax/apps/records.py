"""An append-only JSONL file of results that a killed run can resume.

Each record is written as one line, flushed and fsynced before the next
batch starts, so after a kill the file holds every finished record and at
most one torn last line. Opening the file again reports the keys already
present; the caller skips those and appends the rest (the first write drops
the torn line, or creates the file), so a run killed any number of times
ends with every record exactly once.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence


class RecordsError(ValueError):
  """An output file that cannot be used: not writable, a directory, or not resumable (a corrupt line)."""


def check_writable(path: str) -> None:
  """Raises RecordsError unless ``path`` can be written as a file (its folder exists or can be made)."""
  if os.path.isdir(path):
    raise RecordsError(f"{path}: is a directory, not a file")
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(folder):  # the nearest existing folder must let us create the rest
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise RecordsError(f"{path}: cannot be created ({folder} is not a directory)")
  if not os.access(folder if not os.path.exists(path) else path, os.W_OK):
    raise RecordsError(f"{path}: not writable")


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file renamed over it: a failed write (a full disk) leaves
  the old file, or none, never half a file; the OSError names ``path``."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(e.errno, e.strerror or str(e), path) from None


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
      check_writable(path)
      self.existing = read_records(path)
      self._file = None  # opened (and the file created) by the first write
    else:
      self._file = stream
    self.done = {record_key(r, self.key_fields) for r in self.existing}

  def has(self, record: dict) -> bool:
    return record_key(record, self.key_fields) in self.done

  def write(self, records: Iterable[dict]):
    """Appends ``records`` and syncs them; a failed write (a full disk) cuts the file back to its last complete
    record and raises OSError naming the file."""
    records = list(records)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if self.path is None:
      self._file.write(text)
      self._file.flush()
    else:
      if self._file is None:
        self._file = self._open()
      start = self._file.tell()
      try:
        data = memoryview(text.encode("utf-8"))
        while data:
          data = data[self._file.write(data):]
        os.fsync(self._file.fileno())
      except OSError as e:
        self._file.truncate(start)
        raise OSError(e.errno, e.strerror or str(e), self.path) from None
    self.done.update(record_key(record, self.key_fields) for record in records)

  def _open(self):
    try:
      _drop_torn_tail(self.path)
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      return open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing pending
    except OSError as e:
      raise OSError(e.errno, e.strerror or str(e), self.path) from None

  def close(self):
    if self.path is not None and self._file is not None:
      self._file.close()
      self._file = None

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
