"""What a decoding strategy is: one frozen pytree dataclass that carries its rules.

``generate`` runs every strategy through the same loop. At each step of a
block the loop predicts ``x0`` (argmax, or a Gumbel sample when
``temperature > 0``) and its probability ``p`` at every position, then asks
the strategy three questions, each a pure function of a ``StepView``:

- ``select(view)``: which positions take their prediction now ([B, K] bool);
- ``stop(view, new_x, steps)``: which sequences are done with the block ([B] bool);
- ``next_embeds(params, cfg, view, new_x)``: the next step's input embeddings ([B, K, D]).

Fields are traced by default, so a sweep over thresholds reuses one compiled
program; fields that change the program's structure (a ``top_k``, whether to
sample) are declared ``static``. A new strategy is one class in one file,
decorated with ``@strategy_dataclass(static=...)``, plus one line in ``registry.py``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmax_jax.model import transformer
from dmax_jax.model.config import accum_dtype


class StepView(NamedTuple):
  """What one decoding step has seen: the block before the step and the model's prediction for it."""

  x: jax.Array  # [B, K] block tokens before this step (mask id where masked)
  active: jax.Array  # [B, K] positions that were masks when the block began
  masked: jax.Array  # [B, K] positions still masked before this step
  x0: jax.Array  # [B, K] predicted token (never the mask id)
  p: jax.Array  # [B, K] its probability (noiseless softmax)
  probs: jax.Array  # [B, K, V] the whole distribution
  mask_id: int


class Strategy:
  """Base of every decoding strategy (see the module docstring for the three rules)."""

  temperature: float  # 0 = greedy; > 0 = Gumbel sampling at this temperature (static: it changes the program)

  def check(self) -> None:
    """Raises ValueError for settings the rules cannot run with (called before compiling)."""

  def select(self, view: StepView) -> jax.Array:
    raise NotImplementedError

  def stop(self, view: StepView, new_x: jax.Array, steps: jax.Array) -> jax.Array:
    raise NotImplementedError

  def next_embeds(self, params, cfg, view: StepView, new_x: jax.Array) -> jax.Array:
    return hard_embed(params, cfg, new_x)


def strategy_dataclass(*, static: tuple[str, ...] = ("temperature",)):
  """Class decorator: a frozen dataclass registered as a pytree whose ``static`` fields are compile-time constants."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name not in static]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(static))

  return wrap


def emb_dtype(params):
  """Decoding's input embeddings: float32 (float64 for float64 parameters)."""
  return accum_dtype(params["embed"].dtype)


def hard_embed(params, cfg, tokens_BK):
  """The token embeddings of ``tokens_BK`` in decoding's embedding dtype."""
  return transformer.embed(params, cfg, tokens_BK).astype(emb_dtype(params))


def still_masked(view: StepView, new_x_BK) -> jax.Array:
  """[B]: the block still holds a mask after this step."""
  return jnp.any(new_x_BK == view.mask_id, axis=-1)
