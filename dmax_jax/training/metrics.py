"""Training metrics: one JSON line per step (``metrics.jsonl``) and TensorBoard scalars (``tensorboard/``).

Both logs hold each step once, in increasing order, also across resumes:
opening a log at ``start_step`` (the restored checkpoint's step, 0 for a new
run) drops what an earlier process wrote past it, since those steps are about
to be trained again. ``metrics.jsonl`` is rewritten atomically (temporary
file, then rename); the TensorBoard writer marks ``start_step + 1`` as a purge
step, which makes TensorBoard discard the older events from there on.

Non-finite values are written as JSON ``null`` (bare ``NaN`` is not JSON) and
left out of TensorBoard (a gap in the curve).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def json_safe(row: Mapping[str, Any]) -> dict:
  """``row`` with every non-finite float replaced by None (JSON ``null``)."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics file; an unfinished last line (a killed run) is skipped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def truncate_metrics(path: str, last_step: int) -> None:
  """Keeps the rows of steps ``<= last_step`` (atomically: a temporary file renamed over ``path``)."""
  if not os.path.exists(path):
    return
  keep = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in keep)
  os.replace(tmp, path)


class MetricsLog:
  """``with MetricsLog(workdir, start_step) as log: log.write({"step": s, "loss": ...})``.

  ``enabled=False`` (every process but the first on several hosts) writes nothing.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not enabled:
      return
    truncate_metrics(self.path, start_step)
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step + 1)

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends one step's row (which must hold "step"); every other finite number becomes a TensorBoard scalar."""
    if self._file is None:
      return
    self._file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      step = int(row["step"])
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"train/{k}", float(v), step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "MetricsLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
