"""Soft Parallel Decoding (DMax; ``shared/spec/decoding.md``, SPD)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmax_jax.decoding.strategy import Strategy, StepView, emb_dtype, hard_embed, still_masked, strategy_dataclass


@strategy_dataclass(static=("top_k", "temperature"))
class SPD(Strategy):
  """A left-to-right frontier of confident tokens, self-revision of every decoded token, and soft embeddings:
  a decoded position is fed back as the confidence-weighted mix of its top-k token embeddings and the mask's."""

  threshold: float = 0.5
  confidence_stop: float = 0.9
  top_k: int = 1
  temperature: float = 0.0

  def check(self):
    if not 1 <= self.top_k:
      raise ValueError("SPD top_k must be >= 1")

  def select(self, view: StepView):
    """Masked positions left of the first one below the threshold (at least the first masked one), plus every
    position decoded earlier in the block (revised to the new prediction)."""
    K = view.x.shape[-1]
    pos = jnp.arange(K)
    below = view.masked & (view.p < self.threshold)
    first_below = jnp.min(jnp.where(below, pos, K), axis=-1, keepdims=True)
    newly = view.masked & (pos < first_below)
    first_masked = jnp.min(jnp.where(view.masked, pos, K), axis=-1, keepdims=True)
    none = ~jnp.any(newly, axis=-1, keepdims=True)
    newly = jnp.where(none, view.masked & (pos == first_masked), newly)
    return newly | (view.active & ~view.masked)

  def stop(self, view: StepView, new_x, steps):
    """No mask left and (every generated position confident, or nothing changed); or K steps taken."""
    confident = jnp.all(jnp.where(view.active, view.p >= self.confidence_stop, True), axis=-1)
    unchanged = jnp.all(new_x == view.x, axis=-1)
    return (~still_masked(view, new_x) & (confident | unchanged)) | (steps >= view.x.shape[-1])

  def next_embeds(self, params, cfg, view: StepView, new_x):
    soft = soft_embed(params, cfg, view.probs, view.x0, view.p, self.top_k)
    decoded = view.active & (new_x != view.mask_id)
    return jnp.where(decoded[..., None], soft, hard_embed(params, cfg, new_x))


def soft_embed(params, cfg, probs_BKV, x0_BK, p_BK, top_k: int):
  """Confidence-weighted mix of token and mask embeddings, rescaled to the mixed norm."""
  table = params["embed"]
  e_mask = table[cfg.mask_token_id].astype(emb_dtype(params))
  n_mask = jnp.linalg.norm(e_mask)
  if top_k == 1:
    ids = x0_BK[..., None]
    w = p_BK[..., None]
  else:
    w, ids = jax.lax.top_k(probs_BKV, top_k)
  e_tok = jnp.take(table, ids, axis=0).astype(e_mask.dtype)  # [B, K, k, D]
  rest = 1.0 - jnp.sum(w, axis=-1)
  mix = jnp.einsum("bkj,bkjd->bkd", w, e_tok) + rest[..., None] * e_mask
  target = jnp.einsum("bkj,bkj->bk", w, jnp.linalg.norm(e_tok, axis=-1)) + rest * n_mask
  return mix * (target / (jnp.linalg.norm(mix, axis=-1) + 1e-6))[..., None]
