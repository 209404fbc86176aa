"""The padded batch layout of block-wise decoding, computed on the host.

Sequence i has a canvas of ``T_i = ceil((P_i + G) / K) * K`` positions
(prompt, then masks) cut into blocks of K from position 0. To let every
sequence of a batch work on the same cache block at the same time, each
canvas is shifted right by whole blocks so that all first decoding blocks
line up at block ``first_block`` of a common padded layout; the padding is
never attended to and positions stay those of the unpadded canvas, so each
sequence computes exactly what it would alone.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from dmax_jax.model.config import ModelConfig


class Layout(NamedTuple):
  """Static shape of a batch in the padded layout."""

  block_length: int  # K
  first_block: int  # index of the first decoding block (blocks before it are prefilled)
  num_blocks: int  # decoding blocks of the longest sequence
  batch: int  # B

  @property
  def canvas_length(self) -> int:
    return (self.first_block + self.num_blocks) * self.block_length


def prompt_problem(prompt: Sequence[int], gen_length: int, block_length: int, cfg: ModelConfig,
                   window: Optional[int] = None) -> Optional[str]:
  """Why ``prompt`` cannot be decoded with these settings, or None.

  The canvas is the prompt plus ``gen_length`` rounded up to whole blocks; it
  must fit the model's positions, or ``window`` positions when given (a
  serving engine's, at most the model's).
  """
  if len(prompt) == 0:
    return "no tokens"
  if any((t < 0 or t >= cfg.vocab_size) for t in prompt):
    return f"token ids outside [0, {cfg.vocab_size})"
  canvas = -(-(len(prompt) + gen_length) // block_length) * block_length
  limit = (f"the model's max_position_embeddings {cfg.max_position_embeddings}" if window is None else
           f"the window of {window} positions")
  if canvas > (cfg.max_position_embeddings if window is None else window):
    return (f"prompt of {len(prompt)} tokens + gen length {gen_length} (canvas of {canvas} in blocks of "
            f"{block_length}) exceeds {limit}")
  return None


def _check(prompts, gen_length: int, block_length: int, cfg: ModelConfig) -> None:
  if gen_length <= 0:
    raise ValueError(f"gen_length must be positive, got {gen_length}")
  if block_length <= 0:
    raise ValueError(f"block_length must be positive, got {block_length}")
  if not prompts:
    raise ValueError("no prompts given")
  for i, p in enumerate(prompts):
    problem = prompt_problem(p, gen_length, block_length, cfg)
    if problem:
      raise ValueError(f"prompt {i}: {problem}")


def plan_batch(prompts: Sequence[Sequence[int]], gen_length: int, block_length: int, cfg: ModelConfig):
  """Host-side layout: padded canvas, per-sequence shifts and block counts. ValueError names a bad prompt."""
  _check(prompts, gen_length, block_length, cfg)
  K = block_length
  P = np.array([len(p) for p in prompts])
  T = -(-(P + gen_length) // K) * K
  first = P // K  # first block holding a mask
  F = max(1, int(first.max()))
  n_dec = T // K - first
  layout = Layout(block_length=K, first_block=F, num_blocks=int(n_dec.max()), batch=len(prompts))
  shift = F - first  # blocks of padding in front of each canvas
  canvas = np.full((layout.batch, layout.canvas_length), cfg.eos_token_id, np.int32)
  for i, p in enumerate(prompts):
    o = shift[i] * K
    canvas[i, o : o + P[i]] = p
    canvas[i, o + P[i] : o + T[i]] = cfg.mask_token_id
  return layout, dict(canvas=canvas, shift=shift.astype(np.int32), n_dec=n_dec.astype(np.int32),
                      prompt_len=P.astype(np.int32), canvas_len=T.astype(np.int32), first=first.astype(np.int32))


def kv_mask(layout: Layout, shift_B, q_start, Lq):
  """[B, Lq, S]: block-causal over the padded canvas (S = its length), padding keys hidden."""
  K = layout.block_length
  key = jnp.arange(layout.canvas_length)
  q_blk = (q_start + jnp.arange(Lq)) // K
  causal = (key // K)[None, :] <= q_blk[:, None]
  valid = key[None, :] >= (shift_B * K)[:, None]
  return causal[None] & valid[:, None, :]


def positions(shift_B, q_start, Lq, K):
  """[B, Lq]: the queries' positions in each unpadded canvas."""
  return jnp.maximum(q_start + jnp.arange(Lq)[None, :] - (shift_B * K)[:, None], 0).astype(jnp.int32)
