"""The optimizer: AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import optax


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
  return int(total_steps * warmup_ratio)


def schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
  """0 -> ``lr`` linearly over the warmup, then cosine to 0 at ``total_steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps(total_steps, warmup_ratio),
      decay_steps=max(total_steps, 1), end_value=0.0,
  )


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW) from a config with lr, b1, b2, eps, weight_decay, warmup_ratio, clip_norm."""
  sched = schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_ratio)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.adamw(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay),
  )
  return tx, sched
