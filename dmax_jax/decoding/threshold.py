"""LLaDA-2.0's mask-to-token baseline (``shared/spec/decoding.md``, threshold decoding)."""

from __future__ import annotations

import jax.numpy as jnp

from dmax_jax.decoding.strategy import Strategy, StepView, still_masked, strategy_dataclass


@strategy_dataclass()
class Threshold(Strategy):
  """Unmask every masked position whose confidence reaches ``threshold`` (at least the most confident one);
  never revise; hard token embeddings; a block ends when no mask is left."""

  threshold: float = 0.95
  temperature: float = 0.0

  def select(self, view: StepView):
    conf = jnp.where(view.masked, view.p, -jnp.inf)
    bar = jnp.minimum(self.threshold, jnp.max(conf, axis=-1, keepdims=True) - 1e-5)
    return view.masked & (conf >= bar)

  def stop(self, view: StepView, new_x, steps):
    del steps
    return ~still_masked(view, new_x)
