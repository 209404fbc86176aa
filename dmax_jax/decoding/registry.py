"""Every decoding strategy by name: what ``decode.py``, ``tools/evaluate.py`` and the demo offer."""

from __future__ import annotations

import dataclasses

from dmax_jax.decoding.low_confidence import LowConfidence
from dmax_jax.decoding.spd import SPD
from dmax_jax.decoding.strategy import Strategy
from dmax_jax.decoding.threshold import Threshold

STRATEGIES: dict[str, type] = {
    "spd": SPD,
    "threshold": Threshold,
    "low_confidence": LowConfidence,
}


def make(name: str, **settings) -> Strategy:
  """The strategy ``name`` with ``settings`` (fields it lacks are ignored, None keeps the default).

  Raises KeyError for an unknown name.
  """
  cls = STRATEGIES[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in settings.items() if k in fields and v is not None})


def name_of(strategy: Strategy) -> str:
  """The registry name of a strategy object."""
  for name, cls in STRATEGIES.items():
    if type(strategy) is cls:  # pylint: disable=unidiomatic-typecheck
      return name
  raise KeyError(f"{type(strategy).__name__} is not in the strategy registry")
