"""The applications' progress bars: a tqdm reporter factory for the library's ``progress`` arguments."""

from __future__ import annotations

import sys


def bar(*, total: int, desc: str, unit: str, initial: int = 0):
  """A tqdm bar on stderr (``dmax_jax.progress.Reporter``)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def bar_if(enabled: bool):
  """``bar`` when ``enabled``, else None (silence), for a library function's ``progress``."""
  return bar if enabled else None
