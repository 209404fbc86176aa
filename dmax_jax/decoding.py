"""STAND-IN decoding engine (slow, NumPy, one sequence at a time) for the CLI tests.

The real engine (one jit-compiled while loop over a KV cache) replaces this
file at merge; it keeps exactly this API. This version states the rules of
``shared/spec/decoding.md`` as plainly as possible: every step runs a full
forward of the canvas up to the current block under the block-causal mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.model import block_causal_mask, forward


@dataclasses.dataclass(frozen=True)
class SPD:
  """Soft Parallel Decoding: left-to-right frontier above ``threshold``, soft self-revision."""

  threshold: float = 0.5
  confidence_stop: float = 0.9
  top_k: int = 1
  temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class Threshold:
  """LLaDA-2.0's mask-to-token baseline: unmask everything above ``threshold``, never revise."""

  threshold: float = 0.95
  temperature: float = 0.0


@dataclasses.dataclass
class TraceStep:
  block: int
  step: int
  tokens: list[int]
  status: list[str]
  confidence: list[float]


@dataclasses.dataclass
class Generation:
  tokens: list[int]
  nfe: int
  prefill_calls: int
  trace: Optional[list[TraceStep]]


def _check(config: ModelConfig, prompts, gen_length: int, block_length: int):
  if gen_length <= 0:
    raise ValueError(f"gen_length must be positive, got {gen_length}")
  if block_length <= 0:
    raise ValueError(f"block_length must be positive, got {block_length}")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty")
    if len(p) + gen_length > config.max_position_embeddings:
      raise ValueError(
          f"prompt {i}: {len(p)} prompt tokens + gen_length {gen_length} exceed max_position_embeddings "
          f"{config.max_position_embeddings}")


@functools.partial(jax.jit, static_argnums=(1, 3))
def _logits(params, config, embeds_1LD, block_length):
  L = embeds_1LD.shape[1]
  return forward(params, config, embeds=embeds_1LD, mask=block_causal_mask(L, block_length))[0]


def _bucket(length, block_length):
  n = block_length
  while n < max(length, 64):
    n *= 2
  return n


def _choose(logits_KV, mask_id, temperature, rng):
  logits_KV = np.array(logits_KV, dtype=np.float64)
  logits_KV[:, mask_id] = -np.inf
  probs = np.exp(logits_KV - logits_KV.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if temperature > 0:
    gumbel = -np.log(-np.log(rng.uniform(1e-20, 1.0, size=logits_KV.shape)))
    x0 = np.argmax(logits_KV / temperature + gumbel, axis=-1)
  else:
    x0 = np.argmax(logits_KV, axis=-1)
  return x0, probs[np.arange(len(x0)), x0], probs


def _soft_embeds(E, probs_KV, top_k, mask_id):
  """Top-k mix of token embeddings plus the mask's residual, rescaled to the mixed norm."""
  idx = np.argsort(-probs_KV, axis=-1)[:, :top_k]
  w = np.take_along_axis(probs_KV, idx, axis=-1)
  res = 1.0 - w.sum(-1, keepdims=True)
  norms = np.linalg.norm(E, axis=-1)
  s = np.einsum("kt,ktd->kd", w, E[idx]) + res * E[mask_id]
  target = (w * norms[idx]).sum(-1) + res[:, 0] * norms[mask_id]
  return s * (target / (np.linalg.norm(s, axis=-1) + 1e-6))[:, None]


def _generate_one(params, config, E, prompt, strategy, gen_length, K, rng, trace):
  mask_id, eos = config.mask_token_id, config.eos_token_id
  P = len(prompt)
  T = math.ceil((P + gen_length) / K) * K
  x = np.array(list(prompt) + [mask_id] * (T - P))
  first = P // K
  nfe, steps = 0, [] if trace else None
  for b in range(first, T // K):
    s, e = b * K, (b + 1) * K
    is_prompt = np.arange(s, e) < P
    active = ~is_prompt
    emb = E[x[s:e]]
    for step in range(K):
      # Padded to a power-of-two length (one compile per bucket); under the
      # block-causal mask the padding never reaches the current block.
      canvas = np.concatenate([E[x[:s]], emb])
      canvas = np.pad(canvas, ((0, _bucket(T, K) - e), (0, 0)))[None]
      logits = _logits(params, config, jnp.asarray(canvas, params["embed"].dtype), K)[s:e]
      nfe += 1
      x0, p, probs = _choose(logits, mask_id, strategy.temperature, rng)
      masked = x[s:e] == mask_id
      old = x[s:e].copy()
      new = np.zeros(K, bool)
      if isinstance(strategy, Threshold):
        bar = min(strategy.threshold, p[masked].max() - 1e-5)
        new = masked & (p >= bar)
        x[s:e][new] = x0[new]
      else:
        for i in np.flatnonzero(masked):
          if p[i] < strategy.threshold:
            break
          new[i] = True
        if masked.any() and not new.any():
          new[np.flatnonzero(masked)[0]] = True
        update = new | (active & ~masked)
        x[s:e][update] = x0[update]
      if trace:
        status = np.where(is_prompt, "prompt", np.where(new, "new", np.where(
            x[s:e] == mask_id, "mask", np.where(x[s:e] != old, "revised", "same"))))
        steps.append(TraceStep(b, step, [int(t) for t in x[s:e]], [str(t) for t in status],
                               [0.0 if q else float(c) for q, c in zip(is_prompt, p)]))
      left = (x[s:e] == mask_id).any()
      if isinstance(strategy, Threshold):
        if not left:
          break
        continue
      changed = (x[s:e] != old).any()
      if not left and ((p[active] >= strategy.confidence_stop).all() or not changed):
        break
      soft = active & (x[s:e] != mask_id)
      emb = E[x[s:e]]
      emb[soft] = _soft_embeds(E, probs[soft], strategy.top_k, mask_id)
    if (x[max(s, P):e] == eos).any():
      x[e:] = eos
      break
  out = list(x[P:])
  if eos in out:
    out = out[:out.index(eos)]
  return Generation([int(t) for t in out], nfe, 1 if first > 0 else 0, steps)


def generate(params, config: ModelConfig, prompts: list[list[int]], *, strategy, gen_length: int,
             block_length: int = 32, rng=None, trace: bool = False) -> list[Generation]:
  """Decodes each prompt (stand-in: naive, sequential); see shared/spec/decoding.md."""
  _check(config, prompts, gen_length, block_length)
  seed = 0 if rng is None else int(np.asarray(jax.random.key_data(rng)).ravel()[-1])
  np_rng = np.random.default_rng(seed)
  E = np.asarray(params["embed"], dtype=np.float32)
  return [_generate_one(params, config, E, p, strategy, gen_length, block_length, np_rng, trace) for p in prompts]
