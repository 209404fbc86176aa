"""A plain NumPy/Python re-statement of shared/spec/decoding.md (and docs/decoding_rules.md), the test oracle.

No KV cache, no batching, no JAX control flow: every step runs the model on
the whole canvas up to the end of the current block under the block-causal
mask, one sequence at a time. Only the model forward itself comes from
dmax_jax (it is tested separately against the PyTorch golden outputs).
"""

import functools

import jax
import numpy as np

import dmax_jax


@functools.lru_cache(maxsize=None)
def _jitted_forward(cfg):
  return jax.jit(lambda params, emb, mask: dmax_jax.forward(params, cfg, embeds=emb, mask=mask))


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def reference_decode(params, cfg, prompt, *, strategy, gen_length, block_length):
  """Returns (generated tokens up to eos, nfe)."""
  K, mask_id, eos = block_length, cfg.mask_token_id, cfg.eos_token_id
  table = np.asarray(params["embed"])
  table = table.astype(np.promote_types(table.dtype, np.float32))  # float64 parameters stay float64
  P = len(prompt)
  T = -(-(P + gen_length) // K) * K
  x = np.array(list(prompt) + [mask_id] * (T - P))
  nfe = 0
  spd = type(strategy).__name__ == "SPD"
  low_confidence = type(strategy).__name__ == "LowConfidence"

  def model(emb, end):
    blk = np.arange(end) // K
    mask = blk[None, :] <= blk[:, None]
    logits = np.asarray(_jitted_forward(cfg)(params, emb[None, :end], mask))[0]
    logits = logits.astype(np.float64)
    logits[:, mask_id] = -np.inf
    return logits

  for b in range(P // K, T // K):
    lo, hi = b * K, (b + 1) * K
    active = x[lo:hi] == mask_id
    emb = table[x[:hi]].copy()
    for step in range(K):
      logits = model(emb, hi)[lo:hi]
      nfe += 1
      probs = _softmax(logits)
      x0 = probs.argmax(-1)
      p = probs.max(-1)
      blk = x[lo:hi].copy()
      masked = blk == mask_id
      if low_confidence:  # the k most confident masked positions, ties to the lower position
        for j in sorted(np.nonzero(masked)[0], key=lambda j: (-p[j], j))[: int(strategy.k)]:
          blk[j] = x0[j]
      elif not spd:
        conf = np.where(masked, p, -np.inf)
        thr = min(strategy.threshold, conf.max() - 1e-5)
        for j in range(K):
          if masked[j] and conf[j] >= thr:
            blk[j] = x0[j]
      if not spd:
        x[lo:hi] = blk
        emb[lo:hi] = table[blk]
        if not (blk == mask_id).any():
          break
        continue
      newly = []
      for j in range(K):  # the left-to-right frontier
        if not masked[j]:
          continue
        if p[j] >= strategy.threshold:
          newly.append(j)
        else:
          break
      if not newly and masked.any():
        newly = [int(np.nonzero(masked)[0][0])]
      new = blk.copy()
      for j in range(K):
        if j in newly or (active[j] and not masked[j]):
          new[j] = x0[j]
      changed = (new != blk).any()
      x[lo:hi] = new
      no_mask = not (new == mask_id).any()
      confident = all(p[j] >= strategy.confidence_stop for j in range(K) if active[j])
      if no_mask and (confident or not changed):
        break
      e_mask = table[mask_id]
      for j in range(K):
        if active[j] and new[j] != mask_id:
          if strategy.top_k == 1:
            ids, w = [x0[j]], [p[j]]
          else:
            ids = np.argsort(-probs[j])[: strategy.top_k]
            w = probs[j][ids]
          rest = 1.0 - sum(w)
          s = sum(wi * table[t] for wi, t in zip(w, ids)) + rest * e_mask
          target = sum(wi * np.linalg.norm(table[t]) for wi, t in zip(w, ids)) + rest * np.linalg.norm(e_mask)
          emb[lo + j] = s * target / (np.linalg.norm(s) + 1e-6)
        else:
          emb[lo + j] = table[new[j]]
    if (x[lo:hi][active] == eos).any():
      break
  gen = x[P:]
  stop = np.nonzero(gen == eos)[0]
  return (gen[: stop[0]] if len(stop) else gen).tolist(), nfe
