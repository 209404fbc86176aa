"""Low-confidence remasking with a fixed number of tokens per step (``docs/decoding_rules.md``, low confidence)."""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from dmax_jax.decoding.strategy import Strategy, StepView, still_masked, strategy_dataclass


@strategy_dataclass()
class LowConfidence(Strategy):
  """Commit the ``k`` most confident still-masked positions each step (all of them when fewer are left; ties go to
  the lower position); never revise; hard token embeddings; a block ends when no mask is left.

  ``k`` is traced, not static: one compiled program serves every k, and ``select`` takes ``k`` as a scalar or as
  a ``[B, 1]`` integer array (one k per row, as a serving engine passes per-request settings).
  """

  k: int = 6
  temperature: float = 0.0

  def check(self):
    if isinstance(self.k, bool) or (isinstance(self.k, float) and not float(self.k).is_integer()):
      raise ValueError(f"LowConfidence k must be an integer, got {self.k!r}")
    if isinstance(self.k, (numbers.Integral, float)) and self.k < 1:
      raise ValueError(f"LowConfidence k must be >= 1, got {self.k}")

  def select(self, view: StepView):
    """Masked positions whose rank among the masked ones (by confidence, highest first; ties by position) is < k."""
    K = view.x.shape[-1]
    pos = jnp.arange(K)
    p_i, p_j = view.p[..., :, None], view.p[..., None, :]  # [B, K (i), K (j)]
    ahead = (p_j > p_i) | ((p_j == p_i) & (pos[None, :] < pos[:, None]))  # j is ranked before i
    rank = jnp.sum(ahead & view.masked[..., None, :], axis=-1)  # [B, K]: masked positions ranked before i
    return view.masked & (rank < jnp.asarray(self.k))

  def stop(self, view: StepView, new_x, steps):
    del steps
    return ~still_masked(view, new_x)
