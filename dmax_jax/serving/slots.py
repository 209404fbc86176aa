"""The serving engine's device side: slots, their state, and the compiled programs that advance them.

A slot holds one request: its canvas (``shared/spec/decoding.md``), its own
region of the KV cache, and the block it is decoding, each slot at its own
block and step. The cache has ``slots + 1`` rows (the last one, ``trash``,
takes the writes of rows that do no work) of ``S = window + K`` positions: a
slot's canvas starts one block in (physical block 0 is padding no query sees),
so every block has a block before it, as in ``decoding.layout``; positions
given to the model are those of the unpadded canvas.

One launch (``launch``) runs, for the slots ``[0, B)`` of a bucket:

1. slots whose block was committed at the end of the last launch start their
   next block;
2. a first step that forwards every slot's block plus ``R`` extra rows, each
   one block of hard tokens into some slot's cache row: a prompt block
   (prefill, interleaved with the others' decoding) or a block that was just
   committed (its keys/values rewritten from its final tokens, as
   ``decoding.engine`` does inside the next block's first forward);
3. more steps, slots only, until some slot commits a block (its strategy stops
   it), or ``max_steps`` steps have run.

A step does what ``decoding.engine.decode_step`` does for one sequence, with
each row's own strategy (one of the engine's, by index), threshold,
temperature and random key, so every request computes what it would alone:
its tokens and forward count are ``generate``'s on that prompt alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dmax_jax.decoding.strategy import Strategy, StepView, emb_dtype, hard_embed
from dmax_jax.model import transformer
from dmax_jax.model.config import ModelConfig


class SlotState(NamedTuple):
  """Every slot's decoding state on the device (leading axis M = slots; the cache has one more row)."""

  cache: Any  # transformer.KVCache, [layers, M + 1, S, G, R] per stack
  canvas: jax.Array  # [M, S] tokens at physical positions
  cur: jax.Array  # [M] physical index of the block being decoded
  last: jax.Array  # [M] physical index of the canvas's last block
  x: jax.Array  # [M, K] the current block's tokens
  active: jax.Array  # [M, K] positions that were masks when the block began
  emb: jax.Array  # [M, K, D] the next forward's input embeddings
  steps: jax.Array  # [M] steps taken in the current block
  nfe: jax.Array  # [M] decoding forwards of the request
  running: jax.Array  # [M] the slot is decoding a request
  advance: jax.Array  # [M] its block was committed by the last launch: the next block starts at the next one
  rng: jax.Array  # [M] random keys
  kind: jax.Array  # [M] index of the request's strategy in the engine's list
  threshold: jax.Array  # [M] the request's threshold (strategies that have one)
  temperature: jax.Array  # [M] float32, 0 = greedy


class Rows(NamedTuple):
  """Extra rows of a launch's first step: blocks of hard tokens written into slots' cache rows."""

  tokens: jax.Array  # [R, K]
  slot: jax.Array  # [R] cache row (the trash row for padding rows)
  block: jax.Array  # [R] physical block index


class Commit(NamedTuple):
  """What a launch reports for the slots of its bucket (after its last step)."""

  committed: jax.Array  # [B] the slot's block ended at the last step
  done: jax.Array  # [B] ... and the request with it (eos in the block, or its last block)
  x: jax.Array  # [B, K] the block's tokens
  nfe: jax.Array  # [B]
  steps: jax.Array  # [] steps the launch ran


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static shape of the engine's state."""

  slots: int  # M
  block_length: int  # K
  window: int  # positions a request may use (a multiple of K)

  @property
  def length(self) -> int:  # S: the padding block plus the window
    return self.window + self.block_length

  @property
  def trash(self) -> int:
    return self.slots


def init_state(params, cfg: ModelConfig, shape: Shape) -> SlotState:
  """Every slot free; the cache zeroed."""
  M, K, S = shape.slots, shape.block_length, shape.length
  real = emb_dtype(params)
  return SlotState(
      cache=transformer.init_cache(cfg, M + 1, S), canvas=jnp.full((M, S), cfg.eos_token_id, jnp.int32),
      cur=jnp.ones((M,), jnp.int32), last=jnp.ones((M,), jnp.int32), x=jnp.zeros((M, K), jnp.int32),
      active=jnp.zeros((M, K), bool), emb=jnp.zeros((M, K, cfg.hidden_size), real),
      steps=jnp.zeros((M,), jnp.int32),
      nfe=jnp.zeros((M,), jnp.int32), running=jnp.zeros((M,), bool), advance=jnp.zeros((M,), bool),
      rng=jax.random.split(jax.random.key(0), M), kind=jnp.zeros((M,), jnp.int32),
      threshold=jnp.zeros((M,), jnp.result_type(float)), temperature=jnp.zeros((M,), jnp.float32))


# ---------------------------------------------------------------- admission

def admit(params, cfg: ModelConfig, shape: Shape, st: SlotState, slot, canvas_S, cur, last, kind, threshold,
          temperature, rng) -> SlotState:
  """``st`` with request state in ``slot``: its canvas, its first decoding block ``cur`` (physical) set up."""
  K = shape.block_length
  x = jax.lax.dynamic_slice_in_dim(canvas_S, cur * K, K)
  put = lambda a, v: a.at[slot].set(v)
  return st._replace(
      canvas=put(st.canvas, canvas_S), cur=put(st.cur, cur), last=put(st.last, last), x=put(st.x, x),
      active=put(st.active, x == cfg.mask_token_id), emb=put(st.emb, hard_embed(params, cfg, x[None])[0]),
      steps=put(st.steps, 0), nfe=put(st.nfe, 0), running=put(st.running, True), advance=put(st.advance, False),
      rng=put(st.rng, rng), kind=put(st.kind, kind), threshold=put(st.threshold, threshold),
      temperature=put(st.temperature, temperature))


# ---------------------------------------------------------------- one step

def _row_mask(shape: Shape, block_N):
  """[N, K, S]: a row's queries see its slot's keys from the first real block through its own block."""
  K = shape.block_length
  key = jnp.arange(shape.length)
  visible = (key[None, :] >= K) & (key[None, :] < ((block_N + 1) * K)[:, None])
  return jnp.broadcast_to(visible[:, None, :], (block_N.shape[0], K, shape.length))


def _row_positions(shape: Shape, block_N):
  """[N, K]: the rows' positions in their unpadded canvases (the padding block's clamp to 0)."""
  K = shape.block_length
  return jnp.maximum((block_N - 1)[:, None] * K + jnp.arange(K)[None, :], 0).astype(jnp.int32)


def _forward_rows(params, cfg, shape: Shape, cache, emb_ND, slot_N, block_N, direct: int):
  """The rows' forward: writes their keys/values, returns the final-norm hidden of rows [0, direct)."""
  K = shape.block_length
  rows = transformer.RowWrite(slot=slot_N.astype(jnp.int32), start=(block_N * K).astype(jnp.int32), direct=direct)
  hidden, cache = transformer.forward_cached(
      params, cfg, cache, start=rows, kv_mask=_row_mask(shape, block_N), embeds=emb_ND,
      positions=_row_positions(shape, block_N), return_hidden=True)
  return hidden[:direct], cache


def choose_rows(logits_BKV, mask_id: int, temperature_B, rng_B):
  """``decoding.engine.choose`` with a temperature and a key per row: -> (x0, p, probs)."""
  logits = logits_BKV.at[..., mask_id].set(-jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)

  def noisy(lg):
    g = jax.vmap(lambda k: jax.random.gumbel(k, (1,) + lg.shape[1:], jnp.float32)[0])(rng_B)
    return lg + temperature_B[:, None, None] * g

  logits = jax.lax.cond(jnp.any(temperature_B > 0), noisy, lambda lg: lg, logits)
  x0 = jnp.argmax(logits, axis=-1)
  p = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  return x0.astype(jnp.int32), p, probs


def _by_kind(kind_B, values: Sequence[jax.Array]):
  """values[kind[b]][b] for every row b."""
  out = values[0]
  for i, v in enumerate(values[1:], start=1):
    sel = (kind_B == i).reshape((-1,) + (1,) * (v.ndim - 1))
    out = jnp.where(sel, v, out)
  return out


def _per_row(strategy: Strategy, threshold_B):
  """The strategy with the rows' thresholds ([B, 1]) where it has one."""
  if any(f.name == "threshold" for f in dataclasses.fields(strategy)):
    return dataclasses.replace(strategy, threshold=threshold_B[:, None])  # the state's and templates' real dtype
  return strategy


def _rules(params, cfg, strategies, st: SlotState, B: int, x0, p, probs):
  """Every row's own strategy applied to its prediction: -> (new_x, block done, next embeddings)."""
  x, running = st.x[:B], st.running[:B]
  view = StepView(x=x, active=st.active[:B], masked=x == cfg.mask_token_id, x0=x0, p=p, probs=probs,
                  mask_id=cfg.mask_token_id)
  kind = st.kind[:B]
  rules = [_per_row(s, st.threshold[:B]) for s in strategies]
  select = _by_kind(kind, [r.select(view) for r in rules])
  new_x = jnp.where(select & running[:, None], x0, x)
  steps = st.steps[:B] + running
  done = _by_kind(kind, [r.stop(view, new_x, steps) for r in rules]) & running
  emb = _by_kind(kind, [r.next_embeds(params, cfg, view, new_x) for r in rules])
  return new_x, done, jnp.where(running[:, None, None], emb, st.emb[:B]), steps


def _step(params, cfg: ModelConfig, shape: Shape, strategies, B: int, st: SlotState, rows: Rows | None):
  """One step of slots [0, B) (plus ``rows``): forward, each row's rules, commits. -> (state, Commit less steps)."""
  K = shape.block_length
  running = st.running[:B]
  cur = st.cur[:B]
  slot = jnp.where(running, jnp.arange(B), shape.trash)  # idle slots write into the trash row
  emb, block = st.emb[:B], cur
  if rows is not None:
    emb = jnp.concatenate([emb, hard_embed(params, cfg, rows.tokens).astype(emb.dtype)], axis=0)
    slot, block = jnp.concatenate([slot, rows.slot]), jnp.concatenate([block, rows.block])
  hidden, cache = _forward_rows(params, cfg, shape, st.cache, emb, slot, block, B)
  logits = transformer.logits_from_hidden(params, cfg, hidden)
  keys = jax.vmap(jax.random.split)(st.rng[:B])  # [B, 2]: as decode_step splits its key each step
  x0, p, probs = choose_rows(logits, cfg.mask_token_id, st.temperature[:B], keys[:, 1])
  new_x, done_block, new_emb, steps = _rules(params, cfg, strategies, st, B, x0, p, probs)
  hit_eos = jnp.any(st.active[:B] & (new_x == cfg.eos_token_id), axis=-1)
  done = done_block & (hit_eos | (cur >= st.last[:B]))
  canvas_rows = jax.vmap(lambda c, b, v: jax.lax.dynamic_update_slice_in_dim(c, v, b * K, 0))(
      st.canvas[:B], cur, new_x)
  head = lambda a, v: a.at[:B].set(v)
  st = st._replace(
      cache=cache, canvas=head(st.canvas, jnp.where(done_block[:, None], canvas_rows, st.canvas[:B])),
      x=head(st.x, new_x), emb=head(st.emb, new_emb), steps=head(st.steps, steps),
      nfe=head(st.nfe, st.nfe[:B] + running), running=head(st.running, running & ~done),
      advance=head(st.advance, done_block & ~done), rng=head(st.rng, jnp.where(running, keys[:, 0], st.rng[:B])))
  return st, (done_block, done, new_x, st.nfe[:B])


def _start_blocks(params, cfg, shape: Shape, st: SlotState, cancel_M) -> SlotState:
  """Cancels ``cancel_M``'s slots; slots whose block was committed start their next block."""
  K = shape.block_length
  running = st.running & ~cancel_M
  go = st.advance & running
  cur = st.cur + go
  nxt = jax.vmap(lambda c, b: jax.lax.dynamic_slice_in_dim(c, b * K, K))(st.canvas, cur)
  x = jnp.where(go[:, None], nxt, st.x)
  return st._replace(
      running=running, advance=jnp.zeros_like(st.advance), cur=cur, x=x,
      active=jnp.where(go[:, None], x == cfg.mask_token_id, st.active),
      emb=jnp.where(go[:, None, None], hard_embed(params, cfg, x).astype(st.emb.dtype), st.emb),
      steps=jnp.where(go, 0, st.steps))


def launch(params, cfg: ModelConfig, shape: Shape, strategies, B: int, st: SlotState, rows: Rows | None, cancel_M,
           max_steps) -> tuple[SlotState, Commit]:
  """One launch over slots [0, B) (module docstring): -> (state, what the last step committed)."""
  st = _start_blocks(params, cfg, shape, st, cancel_M)
  step = functools.partial(_step, params, cfg, shape, strategies, B)
  st, out = step(st, rows)

  def more(c):
    st, out, n = c
    return ~jnp.any(out[0]) & (n < max_steps) & jnp.any(st.running[:B])

  def body(c):
    st, _, n = c
    st, out = step(st, None)
    return st, out, n + 1

  st, out, n = jax.lax.while_loop(more, body, (st, out, jnp.int32(1)))
  return st, Commit(*out, steps=n)
