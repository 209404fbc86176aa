"""Block-diffusion SFT and OPUT losses.

Shape letters: the package glossary (``dmax_jax/shapes.py``); B batch, L half length, V vocab.

The losses return a *sum* of per-position cross-entropies and the number of
positions it covers, so a step can divide once by the labelled-position count
of the whole global batch: the result does not depend on how the batch is
split into micro-batches or over devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmax_jax.training import diffusion
from dmax_jax.model.config import ModelConfig
from dmax_jax.model.transformer import HalvesMask, forward_hidden, logits_from_hidden


@dataclasses.dataclass(frozen=True)
class Objective:
  """How a batch becomes a loss (the diffusion part of a training config)."""

  block_length: int = 32  # K of the [x_t ; x_0] attention
  noise_low: float = 0.75  # t ~ U[noise_low, noise_high] per example
  noise_high: float = 0.75
  oput: bool = True  # on-policy rows get the rollout substitution
  only_masked: bool = False  # False = DMax: every labelled answer position; True = masked positions only


def loss_weights(labels_BL, masked_BL=None, only_masked: bool = False):
  """``[B, L]`` bool: the positions the loss covers."""
  w = labels_BL != diffusion.IGNORE
  if only_masked:
    w = w & masked_BL
  return w


def cross_entropy_sum(logits_BLV, labels_BL, weight_BL):
  """(sum of -log p(label) over weighted positions, number of weighted positions), float32."""
  logits32 = logits_BLV.astype(jnp.float32)
  logp_BLV = jax.nn.log_softmax(logits32, axis=-1)
  safe_labels = jnp.where(weight_BL, labels_BL, 0)
  nll_BL = -jnp.take_along_axis(logp_BLV, safe_labels[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(weight_BL, nll_BL, 0.0))
  return total, jnp.sum(weight_BL).astype(jnp.float32)


def bd_sft_loss(logits_BLV, labels_BL, masked_BL=None, only_masked: bool = False):
  """Block-diffusion SFT loss: mean cross-entropy over the covered positions."""
  total, count = cross_entropy_sum(logits_BLV, labels_BL, loss_weights(labels_BL, masked_BL, only_masked))
  return total / jnp.maximum(count, 1.0)


def noisy_logits(params, cfg: ModelConfig, x_t_BL, x_0_BL, block_length: int):
  """Logits of the noisy half of the ``[x_t ; x_0]`` forward, ``[B, L, V]`` float32."""
  L = x_t_BL.shape[1]
  hidden, _ = forward_hidden(
      params, cfg, tokens=diffusion.bd_inputs(x_t_BL, x_0_BL), positions=diffusion.bd_positions(L),
      mask=HalvesMask(*diffusion.bd_attention_halves(L, block_length)),  # the clean half never attends the noisy one
  )
  return logits_from_hidden(params, cfg, hidden[:, :L])


def rollout(params, cfg: ModelConfig, x_t_BL, x_0_BL, masked_BL, on_policy_B, block_length: int):
  """OPUT's no-gradient rollout: the noisy half with on-policy masks replaced by argmax guesses.

  Skipped (``lax.cond``) when no row of the batch is on-policy.
  """
  params = jax.lax.stop_gradient(params)

  def guess(x_t):
    logits = noisy_logits(params, cfg, x_t, x_0_BL, block_length)
    return diffusion.oput_substitute(x_t, masked_BL, logits, on_policy_B)

  return jax.lax.cond(jnp.any(on_policy_B), guess, lambda x_t: x_t, x_t_BL)


def corrupt(rng_B, batch, cfg: ModelConfig, obj: Objective):
  """Noise a batch ({"ids", "prompt_len", ...}) with one key per row -> (x_t, masked)."""
  maskable = diffusion.answer_mask(batch["prompt_len"], batch["ids"].shape[1])
  x_t, masked, _ = diffusion.add_noise(rng_B, batch["ids"], maskable, cfg.mask_token_id, obj.noise_low, obj.noise_high)
  return x_t, masked


def loss_sum(params, cfg: ModelConfig, obj: Objective, batch, rng_B):
  """(cross-entropy sum, covered-position count) of one micro-batch.

  ``batch``: ids [B, L] int32 (x_0), prompt_len [B], labels [B, L],
  on_policy [B] bool. Row b's noise comes from ``rng_B[b]``; for OPUT the on-policy
  rows are rolled out first (no gradient), then the loss is taken with
  gradient on the substituted input.
  """
  x_0 = batch["ids"]
  x_t, masked = corrupt(rng_B, batch, cfg, obj)
  if obj.oput:
    x_t = rollout(params, cfg, x_t, x_0, masked, batch["on_policy"], obj.block_length)
  logits = noisy_logits(params, cfg, x_t, x_0, obj.block_length)
  weight = loss_weights(batch["labels"], masked, obj.only_masked)
  return cross_entropy_sum(logits, batch["labels"], weight)
