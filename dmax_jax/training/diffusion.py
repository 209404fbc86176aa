"""Block-diffusion training primitives, independent of the model.

Shape letters: the package glossary (``dmax_jax/shapes.py``); here B batch, L
sequence length (one half of the ``[x_t ; x_0]`` input, which is 2L long),
V vocab. Glossary:

- x_0: the clean token ids (prompt, answer, eos padding).
- prompt: the leading positions that are never noised and never labelled.
- answer positions: every position after the prompt (the answer and its eos
  padding); noise may mask any of them.
- x_t: x_0 with each answer position replaced by the mask id with prob. t.
- labels: x_0 at the positions the loss covers, ``IGNORE`` elsewhere.
- block: K consecutive positions of one half; ``blk(i) = i // K``.

Every function here is pure and works on a whole batch; ``jax.jit`` them from
the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100  # label of a position the loss skips
EOS_LABEL_CAP = 32  # of the trailing eos run, only the first 32 positions keep a label


def answer_mask(prompt_len_B, length: int):
  """``[B, L]`` True at answer positions (index >= the example's prompt length)."""
  return jnp.arange(length)[None, :] >= jnp.asarray(prompt_len_B)[:, None]


def make_labels(ids_BL, prompt_len_B, eos_id: int, eos_cap: int = EOS_LABEL_CAP):
  """Labels: ``ids`` at answer positions, ``IGNORE`` at the prompt and past the eos cap.

  The trailing run of ``eos_id`` (the eos the answer ends with plus the
  padding) keeps labels on its first ``eos_cap`` positions only. Works on
  NumPy and JAX arrays alike (returns the same kind).
  """
  xp = jnp if isinstance(ids_BL, jax.Array) else np
  ids_BL = xp.asarray(ids_BL)
  L = ids_BL.shape[-1]
  idx_L = xp.arange(L)
  is_eos = (ids_BL == eos_id).astype(xp.int32)
  # trailing[i] = 1 iff ids[i:] are all eos (reverse cumulative product).
  trailing = xp.flip(xp.cumprod(xp.flip(is_eos, -1), axis=-1), -1)
  run_start_B = L - trailing.sum(-1)
  past_cap = idx_L[None, :] >= (run_start_B + eos_cap)[:, None]
  in_prompt = idx_L[None, :] < xp.asarray(prompt_len_B)[:, None]
  return xp.where(in_prompt | past_cap, IGNORE, ids_BL).astype(xp.int32)


def add_noise(rng_B, ids_BL, maskable_BL, mask_id: int, low: float, high: float):
  """Masks each maskable position with probability ``t ~ U[low, high]`` (one t per example).

  ``rng_B`` holds one PRNG key per example, so an example's noise does not
  depend on the batch it sits in. Returns (x_t [B, L], masked [B, L] bool, t [B]).
  """
  L = ids_BL.shape[1]

  def draw(key):
    key_t, key_m = jax.random.split(key)
    return jax.random.uniform(key_t, (), minval=low, maxval=high), jax.random.uniform(key_m, (L,))

  t_B, u_BL = jax.vmap(draw)(rng_B)
  masked_BL = (u_BL < t_B[:, None]) & maskable_BL
  x_t = jnp.where(masked_BL, mask_id, ids_BL)
  return x_t, masked_BL, t_B


def bd_attention_mask(length: int, block_length: int):
  """The ``[2L, 2L]`` boolean attention of the ``[x_t ; x_0]`` layout (True = may attend).

  Rows/columns ``0..L-1`` are the noisy half, ``L..2L-1`` the clean half:
  noisy->noisy same block; noisy->clean clean blocks strictly before;
  clean->clean blocks up to and including; clean->noisy never.
  """
  blk = jnp.arange(length) // block_length
  q, k = blk[:, None], blk[None, :]
  noisy_noisy = q == k
  noisy_clean = k < q
  clean_clean = k <= q
  clean_noisy = jnp.zeros((length, length), bool)
  top = jnp.concatenate([noisy_noisy, noisy_clean], axis=1)
  bottom = jnp.concatenate([clean_noisy, clean_clean], axis=1)
  return jnp.concatenate([top, bottom], axis=0)


def bd_attention_halves(length: int, block_length: int):
  """``bd_attention_mask`` as its two non-empty parts: (noisy rows over all ``2L`` columns ``[L, 2L]``,
  clean rows over the clean columns ``[L, L]``); the clean rows' noisy columns are all False."""
  full = bd_attention_mask(length, block_length)
  return full[:length], full[length:, length:]


def bd_positions(length: int):
  """Position ids ``[0..L-1, 0..L-1]`` of the two halves, ``[2L]``."""
  idx = jnp.arange(length, dtype=jnp.int32)
  return jnp.concatenate([idx, idx])


def bd_inputs(x_t_BL, x_0_BL):
  """The model input ``[x_t ; x_0]``, ``[B, 2L]``."""
  return jnp.concatenate([x_t_BL, x_0_BL], axis=1)


def oput_substitute(x_t_BL, masked_BL, logits_BLV, on_policy_B):
  """OPUT: the argmax prediction written into the masked positions of on-policy examples.

  ``logits_BLV`` are the noisy-half logits of a rollout forward. Off-policy
  rows and unmasked positions keep ``x_t``. No gradient flows through the
  predictions (argmax has none; stop_gradient makes that explicit).
  """
  pred_BL = jnp.argmax(jax.lax.stop_gradient(logits_BLV), axis=-1).astype(x_t_BL.dtype)
  write_BL = masked_BL & jnp.asarray(on_policy_B, bool)[:, None]
  return jnp.where(write_BL, pred_BL, x_t_BL)
