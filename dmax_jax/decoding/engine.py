"""Block-wise diffusion decoding: Soft Parallel Decoding (DMax) and the threshold baseline.

The behaviour is ``shared/spec/decoding.md``. The whole generation of a batch
(prefill, every block, every step, early stop, counters) is one jitted XLA
program with a preallocated KV cache and no host round trip per step.

Batching. Sequence i has a canvas of ``T_i = ceil((P_i + G) / K) * K``
positions (prompt, then masks) cut into blocks of K from position 0. To let
every sequence of a batch work on the same cache block at the same time, each
canvas is shifted right by whole blocks so that all first decoding blocks
line up at block ``F`` of a common padded layout; the padding is never
attended to and positions stay those of the unpadded canvas, so each sequence
computes exactly what it would alone. Within a block every sequence runs its
own number of steps; a sequence whose block has finished is frozen (its
tokens and counters stop changing) until the slowest one finishes.

Per block, the first forward covers the previous block too (2K queries): that
rewrites the previous block's keys/values from its final hard tokens, as the
reference does, without an extra model call. Later steps forward the K
queries of the current block only.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model import transformer as model_lib
from dmax_jax.model.config import ModelConfig, accum_dtype


@dataclasses.dataclass(frozen=True)
class SPD:
  """Soft Parallel Decoding: left-to-right frontier, self-revision, soft embeddings."""

  threshold: float = 0.5
  confidence_stop: float = 0.9
  top_k: int = 1
  temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class Threshold:
  """LLaDA-2.0's mask-to-token baseline: unmask everything above the threshold, never revise."""

  threshold: float = 0.95
  temperature: float = 0.0


@dataclasses.dataclass
class TraceStep:
  block: int  # block index from the start of the generation (0: the block holding the first generated token)
  step: int  # 0-based step within the block
  tokens: list  # the block's tokens after this step (mask id where still masked)
  status: list  # per position: "prompt" | "mask" | "new" | "revised" | "same"
  confidence: list  # per position: max softmax probability at this step (0 for prompt positions)


@dataclasses.dataclass
class Generation:
  tokens: list  # generated ids up to and excluding the first eos
  nfe: int  # decoding forwards while this sequence was being decoded
  prefill_calls: int
  trace: Optional[list] = None


STATUS = ("prompt", "mask", "new", "revised", "same")


class Layout(NamedTuple):
  """Static shape of a batch in the padded layout."""

  K: int  # block length
  F: int  # index of the first decoding block (blocks [0, F) are prefilled)
  D: int  # decoding blocks of the longest sequence
  B: int

  @property
  def S(self):
    return (self.F + self.D) * self.K


def prompt_problem(prompt: Sequence[int], gen_length: int, block_length: int, cfg: ModelConfig) -> Optional[str]:
  """Why ``prompt`` cannot be decoded with these settings, or None.

  The canvas is the prompt plus ``gen_length`` rounded up to whole blocks; it
  must fit the model's positions.
  """
  if len(prompt) == 0:
    return "no tokens"
  if any((t < 0 or t >= cfg.vocab_size) for t in prompt):
    return f"token ids outside [0, {cfg.vocab_size})"
  canvas = -(-(len(prompt) + gen_length) // block_length) * block_length
  if canvas > cfg.max_position_embeddings:
    return (f"prompt of {len(prompt)} tokens + gen length {gen_length} (canvas of {canvas} in blocks of "
            f"{block_length}) exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
  return None


def plan_batch(prompts: Sequence[Sequence[int]], gen_length: int, block_length: int, cfg: ModelConfig):
  """Host-side layout: padded canvas, per-sequence shifts and block counts."""
  if gen_length <= 0:
    raise ValueError(f"gen_length must be positive, got {gen_length}")
  if block_length <= 0:
    raise ValueError(f"block_length must be positive, got {block_length}")
  if not prompts:
    raise ValueError("no prompts given")
  K = block_length
  for i, p in enumerate(prompts):
    problem = prompt_problem(p, gen_length, block_length, cfg)
    if problem:
      raise ValueError(f"prompt {i}: {problem}")
  P = np.array([len(p) for p in prompts])
  T = -(-(P + gen_length) // K) * K
  first = P // K  # first block holding a mask
  F = max(1, int(first.max()))
  n_dec = T // K - first
  D = int(n_dec.max())
  layout = Layout(K=K, F=F, D=D, B=len(prompts))
  shift = F - first  # blocks of padding in front of each canvas
  canvas = np.full((layout.B, layout.S), cfg.eos_token_id, np.int32)
  for i, p in enumerate(prompts):
    o = shift[i] * K
    canvas[i, o : o + P[i]] = p
    canvas[i, o + P[i] : o + T[i]] = cfg.mask_token_id
  return layout, dict(canvas=canvas, shift=shift.astype(np.int32), n_dec=n_dec.astype(np.int32),
                      prompt_len=P.astype(np.int32), canvas_len=T.astype(np.int32), first=first.astype(np.int32))


def _emb_dtype(params):
  """Decoding's input embeddings: float32 (float64 for float64 parameters)."""
  return accum_dtype(params["embed"].dtype)


def _hard_embed(params, cfg, tokens):
  return model_lib.embed(params, cfg, tokens).astype(_emb_dtype(params))


def _soft_embed(params, cfg, probs_BKV, x0_BK, p_BK, top_k: int):
  """Confidence-weighted mix of token and mask embeddings, rescaled to the mixed norm."""
  table = params["embed"]
  e_mask = table[cfg.mask_token_id].astype(_emb_dtype(params))
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


class BlockState(NamedTuple):
  x: jax.Array  # [B, K] block tokens
  active: jax.Array  # [B, K] positions that were masks when the block began
  emb: jax.Array  # [B, K, D] next input embeddings (float32, or float64 for float64 parameters)
  finished: jax.Array  # [B] this sequence is done with the block (or with everything)
  steps: jax.Array  # [B] steps taken in this block
  nfe: jax.Array  # [B]
  rng: jax.Array


def _choose(logits_BKV, cfg, sample, temperature, rng):
  """(x0, p, probs): argmax (or Gumbel sample) with the mask id forbidden, its noiseless prob."""
  logits = logits_BKV.at[..., cfg.mask_token_id].set(-jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  if sample:
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    x0 = jnp.argmax(logits + temperature * g, axis=-1)
  else:
    x0 = jnp.argmax(logits, axis=-1)
  p = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  return x0.astype(jnp.int32), p, probs


class Rule(NamedTuple):
  """The static part of a strategy (what the compiled program branches on)."""

  spd: bool
  top_k: int
  sample: bool


def _split_strategy(strategy):
  """-> (static Rule, traced hyper-parameters), so a threshold sweep reuses one compiled program."""
  spd = isinstance(strategy, SPD)
  rule = Rule(spd=spd, top_k=strategy.top_k if spd else 1, sample=strategy.temperature > 0)
  real = jnp.result_type(float)  # float32, or float64 under jax.enable_x64
  hp = dict(threshold=jnp.asarray(strategy.threshold, real), temperature=jnp.asarray(strategy.temperature, real),
            confidence_stop=jnp.asarray(strategy.confidence_stop if spd else 0.0, real))
  return rule, hp


def _update(st: BlockState, logits_BKV, params, cfg, rule: Rule, hp, K):
  """One decoding step's choose / update / stop test / new embeddings. Returns (state, trace record)."""
  rng, step_rng = jax.random.split(st.rng)
  x0, p, probs = _choose(logits_BKV, cfg, rule.sample, hp["temperature"], step_rng)
  masked = st.x == cfg.mask_token_id
  running = ~st.finished
  pos = jnp.arange(K)
  if not rule.spd:
    conf = jnp.where(masked, p, -jnp.inf)
    thr = jnp.minimum(hp["threshold"], jnp.max(conf, axis=-1, keepdims=True) - 1e-5)
    newly = masked & (conf >= thr)
    change = newly
  else:
    below = masked & (p < hp["threshold"])
    first_below = jnp.min(jnp.where(below, pos, K), axis=-1, keepdims=True)
    newly = masked & (pos < first_below)
    first_masked = jnp.min(jnp.where(masked, pos, K), axis=-1, keepdims=True)
    none = ~jnp.any(newly, axis=-1, keepdims=True)
    newly = jnp.where(none, masked & (pos == first_masked), newly)
    change = newly | (st.active & ~masked)
  new_x = jnp.where(change, x0, st.x)
  new_x = jnp.where(running[:, None], new_x, st.x)
  steps = st.steps + running
  still_masked = jnp.any(new_x == cfg.mask_token_id, axis=-1)
  if not rule.spd:
    done = ~still_masked
    new_emb = _hard_embed(params, cfg, new_x)
  else:
    confident = jnp.all(jnp.where(st.active, p >= hp["confidence_stop"], True), axis=-1)
    unchanged = jnp.all(new_x == st.x, axis=-1)
    done = (~still_masked & (confident | unchanged)) | (steps >= K)
    soft = _soft_embed(params, cfg, probs, x0, p, rule.top_k)
    decoded = st.active & (new_x != cfg.mask_token_id)
    new_emb = jnp.where(decoded[..., None], soft, _hard_embed(params, cfg, new_x))
  new_emb = jnp.where(running[:, None, None], new_emb, st.emb)
  status = jnp.where(
      ~st.active, 0,
      jnp.where(new_x == cfg.mask_token_id, 1, jnp.where(masked, 2, jnp.where(new_x != st.x, 3, 4))))
  record = dict(tokens=new_x, status=status.astype(jnp.int8), conf=jnp.where(st.active, p, 0.0), valid=running)
  st = BlockState(x=new_x, active=st.active, emb=new_emb, finished=st.finished | done, steps=steps,
                  nfe=st.nfe + running, rng=rng)
  return st, record


def _kv_mask(layout: Layout, shift_B, q_start, Lq):
  """[B, Lq, S]: block-causal over the padded canvas, padding keys hidden."""
  K, S = layout.K, layout.S
  key = jnp.arange(S)
  q_blk = (q_start + jnp.arange(Lq)) // K
  causal = (key // K)[None, :] <= q_blk[:, None]
  valid = key[None, :] >= (shift_B * K)[:, None]
  return causal[None] & valid[:, None, :]


def _positions(shift_B, q_start, Lq, K):
  return jnp.maximum(q_start + jnp.arange(Lq)[None, :] - (shift_B * K)[:, None], 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "rule", "layout", "trace"),
                   compiler_options=model_lib.DECODE_COMPILER_OPTIONS)
def _generate_jit(params, cfg: ModelConfig, rule: Rule, hp, layout: Layout, canvas, shift, n_dec, rng, trace: bool):
  K, F, D, B = layout.K, layout.F, layout.D, layout.B
  cache = model_lib.init_cache(cfg, B, layout.S)

  # Prefill every block before the first decoding block.
  Lp = F * K
  _, cache = model_lib.forward_cached(
      params, cfg, cache, start=0, kv_mask=_kv_mask(layout, shift, 0, Lp), tokens=canvas[:, :Lp],
      positions=_positions(shift, 0, Lp, K), return_hidden=True)

  def forward_block(cache, emb, q_start, Lq):
    hidden, cache = model_lib.forward_cached(
        params, cfg, cache, start=q_start, kv_mask=_kv_mask(layout, shift, q_start, Lq), embeds=emb,
        positions=_positions(shift, q_start, Lq, K), return_hidden=True)
    return model_lib.logits_from_hidden(params, cfg, hidden[:, -K:]), cache

  # Per-step trace buffers of one block (steps x batch x positions), only when asked for.
  empty_trace = dict(
      tokens=jnp.zeros((K, B, K), jnp.int32), status=jnp.zeros((K, B, K), jnp.int8),
      conf=jnp.zeros((K, B, K), _emb_dtype(params)), valid=jnp.zeros((K, B), bool)) if trace else None

  def block_body(d, carry):
    canvas, cache, seq_done, nfe, rng, traces = carry
    b = F + d
    start = b * K
    x = jax.lax.dynamic_slice_in_dim(canvas, start, K, axis=1)
    prev = jax.lax.dynamic_slice_in_dim(canvas, start - K, K, axis=1)
    finished = seq_done | (d >= n_dec)
    st = BlockState(x=x, active=x == cfg.mask_token_id, emb=_hard_embed(params, cfg, x), finished=finished,
                    steps=jnp.zeros((B,), jnp.int32), nfe=nfe, rng=rng)
    tr = empty_trace

    def record(tr, rec, i):
      if not trace:
        return tr
      return jax.tree.map(lambda buf, r: buf.at[i].set(r), tr, rec)

    # First step: previous block (final hard tokens) + current block.
    emb2 = jnp.concatenate([_hard_embed(params, cfg, prev), st.emb], axis=1)
    logits, cache = forward_block(cache, emb2, start - K, 2 * K)
    st, rec = _update(st, logits, params, cfg, rule, hp, K)
    tr = record(tr, rec, 0)

    def cond(c):
      st, _, _, i = c
      return jnp.any(~st.finished) & (i < K)

    def body(c):
      st, cache, tr, i = c
      logits, cache = forward_block(cache, st.emb, start, K)
      st, rec = _update(st, logits, params, cfg, rule, hp, K)
      return st, cache, record(tr, rec, i), i + 1

    st, cache, tr, _ = jax.lax.while_loop(cond, body, (st, cache, tr, jnp.int32(1)))
    ran = ~finished
    hit_eos = jnp.any(st.active & (st.x == cfg.eos_token_id), axis=-1)
    seq_done = seq_done | (ran & hit_eos) | (d + 1 >= n_dec)
    canvas = jax.lax.dynamic_update_slice_in_dim(canvas, jnp.where(ran[:, None], st.x, x), start, axis=1)
    if trace:
      traces = jax.tree.map(lambda buf, t: buf.at[d].set(t), traces, tr)
    return canvas, cache, seq_done, st.nfe, st.rng, traces

  traces = jax.tree.map(lambda a: jnp.zeros((D,) + a.shape, a.dtype), empty_trace)
  init = (canvas, cache, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), rng, traces)

  def outer_cond(c):
    d, carry = c
    return (d < D) & jnp.any(~carry[2])

  def outer_body(c):
    d, carry = c
    return d + 1, block_body(d, carry)

  _, (canvas, _, _, nfe, _, traces) = jax.lax.while_loop(outer_cond, outer_body, (jnp.int32(0), init))
  return canvas, nfe, traces


_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()  # compiled decoding programs, most recent last
_MAX_PROGRAMS = 64


def _inputs(params, config, prompts, strategy, gen_length, block_length, rng):
  """Checks a batch and lays it out: (layout, plan, static rule, the program's arguments)."""
  if not isinstance(strategy, (SPD, Threshold)):
    raise TypeError(f"strategy must be SPD(...) or Threshold(...), got {strategy!r}")
  if isinstance(strategy, SPD) and not 1 <= strategy.top_k:
    raise ValueError("SPD top_k must be >= 1")
  prompts = [list(map(int, p)) for p in prompts]
  layout, plan = plan_batch(prompts, gen_length, block_length, config)
  if rng is None:
    rng = jax.random.key(0)
  rule, hp = _split_strategy(strategy)
  args = (params, hp, jnp.asarray(plan["canvas"]), jnp.asarray(plan["shift"]), jnp.asarray(plan["n_dec"]), rng)
  return layout, plan, rule, args


def _program(config, rule, layout, trace, args):
  """The compiled program for these static settings and argument types, compiled ahead of time on first use."""
  leaves, treedef = jax.tree.flatten(args)
  key = (config, rule, layout, trace, treedef, jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
         tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    params, hp, *rest = args
    _PROGRAMS[key] = _generate_jit.lower(params, config, rule, hp, layout, *rest, trace).compile()
    while len(_PROGRAMS) > _MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def prepare(params, config: ModelConfig, prompts, *, strategy, gen_length: int, block_length: int = 32,
            trace: bool = False) -> None:
  """Compiles the program ``generate`` runs for this batch (its shapes and static settings) without running it,
  so that a timer around ``generate`` measures decoding alone. Raises what ``generate`` would for a bad batch."""
  layout, _, rule, args = _inputs(params, config, prompts, strategy, gen_length, block_length, None)
  _program(config, rule, layout, trace, args)


def generate(params, config: ModelConfig, prompts, *, strategy, gen_length: int, block_length: int = 32, rng=None,
             trace: bool = False) -> list[Generation]:
  """Decodes a batch of prompts (lists of token ids, any lengths) with SPD or the threshold baseline.

  Returns one ``Generation`` per prompt: the generated ids up to (excluding)
  the first eos, the decoding forwards (NFE) spent on it, its prefill calls
  and, with ``trace=True``, every step of every block.
  """
  layout, plan, rule, args = _inputs(params, config, prompts, strategy, gen_length, block_length, rng)
  canvas, nfe, traces = _program(config, rule, layout, trace, args)(*args)
  canvas, nfe = np.asarray(canvas), np.asarray(nfe)
  traces = jax.tree.map(np.asarray, traces) if trace else None
  out = []
  K = layout.K
  for i in range(layout.B):
    o = int(plan["shift"][i]) * K
    gen = canvas[i, o + plan["prompt_len"][i] : o + plan["canvas_len"][i]]
    eos = np.nonzero(gen == config.eos_token_id)[0]
    gen = gen[: eos[0]] if len(eos) else gen
    steps = None
    if trace:
      steps = []
      for d in range(layout.D):
        for s in range(K):
          if traces["valid"][d, s, i]:
            steps.append(TraceStep(
                block=d, step=s, tokens=traces["tokens"][d, s, i].tolist(),
                status=[STATUS[c] for c in traces["status"][d, s, i]], confidence=traces["conf"][d, s, i].tolist()))
    out.append(Generation(tokens=gen.tolist(), nfe=int(nfe[i]), prefill_calls=int(plan["first"][i] > 0), trace=steps))
  return out
