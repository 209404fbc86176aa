"""Progress reporting for long library loops (training steps, checkpoint tensors) without any output here.

A library function that runs long takes ``progress``: None (or False) for
silence, or a *reporter factory* the application passes in, called as
``progress(total=, initial=, desc=, unit=)`` and returning an object with
``update(n)``, ``set_postfix(**fields)`` and ``close()`` (tqdm's interface:
``dmax_jax.apps.progress.bar`` is one).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol


class Reporter(Protocol):
  def update(self, n: int = 1) -> Any: ...

  def set_postfix(self, **fields) -> Any: ...

  def close(self) -> Any: ...


ReporterFactory = Callable[..., Reporter]


class _Silent:
  """A reporter that reports nothing."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **fields) -> None:
    del fields

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def reporter(progress: Optional[ReporterFactory], *, total: int, desc: str, unit: str, initial: int = 0):
  """The reporter ``progress`` makes for this loop (a silent one for None / False), usable as a context manager."""
  if not progress:
    return _Silent()
  if not callable(progress):
    raise TypeError(f"progress must be None or a reporter factory (e.g. dmax_jax.apps.progress.bar), got {progress!r}")
  return progress(total=total, initial=initial, desc=desc, unit=unit)
