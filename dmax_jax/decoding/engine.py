"""Block-wise diffusion decoding as one compiled program (``generate``).

The behaviour is ``shared/spec/decoding.md``. The whole generation of a batch
(prefill, every block, every step, early stop, counters) is one jitted XLA
program with a preallocated KV cache and no host round trip per step. The
rules of a step (which positions to decode, when a block ends, what to feed
back) are the strategy's (``strategy.py``); this module runs them.

Batches are laid out as ``layout.py`` describes. Within a block every
sequence runs its own number of steps; a sequence whose block has finished is
frozen (its tokens and counters stop changing) until the slowest one
finishes.

Per block, the first forward covers the previous block too (2K queries): that
rewrites the previous block's keys/values from its final hard tokens, as the
reference does, without an extra model call. Later steps forward the K
queries of the current block only.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.decoding import trace as trace_lib
from dmax_jax.decoding.layout import Layout, kv_mask, plan_batch, positions
from dmax_jax.decoding.strategy import Strategy, StepView, emb_dtype, hard_embed
from dmax_jax.decoding.trace import TraceStep
from dmax_jax.model import transformer
from dmax_jax.model.config import ModelConfig


@dataclasses.dataclass
class Generation:
  tokens: list  # generated ids up to and excluding the first eos
  nfe: int  # decoding forwards while this sequence was being decoded
  prefill_calls: int
  trace: Optional[list[TraceStep]] = None


class BlockState(NamedTuple):
  """One block being decoded."""

  x: jax.Array  # [B, K] block tokens
  active: jax.Array  # [B, K] positions that were masks when the block began
  emb: jax.Array  # [B, K, D] next input embeddings (float32, or float64 for float64 parameters)
  finished: jax.Array  # [B] this sequence is done with the block (or with everything)
  steps: jax.Array  # [B] steps taken in this block
  nfe: jax.Array  # [B]
  rng: jax.Array


class BlockLoop(NamedTuple):
  """The carry of the loop over one block's steps."""

  state: BlockState
  cache: Any  # transformer.KVCache
  trace: Optional[dict]  # this block's trace buffers (None unless tracing)
  step: jax.Array  # steps run so far


class DecodeLoop(NamedTuple):
  """The carry of the loop over blocks."""

  block: jax.Array  # decoding blocks done (d)
  canvas: jax.Array  # [B, S] tokens of the padded canvas
  cache: Any  # transformer.KVCache
  seq_done: jax.Array  # [B] the sequence has stopped (eos, or its last block)
  nfe: jax.Array  # [B]
  rng: jax.Array
  traces: Optional[dict]  # blocks x trace buffers (None unless tracing)


def choose(logits_BKV, mask_id: int, temperature: float, rng):
  """(x0, p, probs): argmax (or Gumbel sample when ``temperature > 0``) with the mask id forbidden, its noiseless
  probability, the distribution."""
  logits = logits_BKV.at[..., mask_id].set(-jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  if temperature > 0:
    logits = logits + temperature * jax.random.gumbel(rng, logits.shape, jnp.float32)
  x0 = jnp.argmax(logits, axis=-1)
  p = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  return x0.astype(jnp.int32), p, probs


def decode_step(st: BlockState, logits_BKV, params, cfg: ModelConfig, strategy: Strategy):
  """One step: predict, let the strategy select / stop / embed, freeze finished rows. -> (state, trace record)."""
  rng, step_rng = jax.random.split(st.rng)
  x0, p, probs = choose(logits_BKV, cfg.mask_token_id, strategy.temperature, step_rng)
  view = StepView(x=st.x, active=st.active, masked=st.x == cfg.mask_token_id, x0=x0, p=p, probs=probs,
                  mask_id=cfg.mask_token_id)
  running = ~st.finished
  new_x = jnp.where(strategy.select(view) & running[:, None], x0, st.x)
  steps = st.steps + running
  done = strategy.stop(view, new_x, steps)
  emb = jnp.where(running[:, None, None], strategy.next_embeds(params, cfg, view, new_x), st.emb)
  st = BlockState(x=new_x, active=st.active, emb=emb, finished=st.finished | done, steps=steps,
                  nfe=st.nfe + running, rng=rng)
  return st, trace_lib.record(view, new_x, running)


def _forward(params, cfg, layout: Layout, shift, cache, q_start, *, emb=None, tokens=None):
  """Forwards the queries from ``q_start`` into the cache; -> (hidden [B, Lq, D], cache)."""
  Lq = (emb if tokens is None else tokens).shape[1]
  return transformer.forward_cached(
      params, cfg, cache, start=q_start, kv_mask=kv_mask(layout, shift, q_start, Lq), tokens=tokens, embeds=emb,
      positions=positions(shift, q_start, Lq, layout.block_length), return_hidden=True)


def _block_logits(params, cfg, layout, shift, cache, q_start, emb):
  """Logits of the last K queries of a block forward (the block being decoded), and the cache."""
  hidden, cache = _forward(params, cfg, layout, shift, cache, q_start, emb=emb)
  return transformer.logits_from_hidden(params, cfg, hidden[:, -layout.block_length:]), cache


def decode_block(params, cfg, strategy, layout: Layout, shift, tracing: bool, st: BlockState, prev_BK, cache,
                 start):
  """Runs the steps of the block at ``start`` until every sequence has finished it (at most K steps)."""
  K = layout.block_length
  logits_at = functools.partial(_block_logits, params, cfg, layout, shift)
  step = functools.partial(decode_step, params=params, cfg=cfg, strategy=strategy)
  # First step: the previous block (its final hard tokens) and this one.
  emb2 = jnp.concatenate([hard_embed(params, cfg, prev_BK), st.emb], axis=1)
  logits, cache = logits_at(cache, start - K, emb2)
  st, rec = step(st, logits)
  tr = trace_lib.store(trace_lib.empty(K, layout.batch, emb_dtype(params)), rec, 0) if tracing else None

  def body(c: BlockLoop) -> BlockLoop:
    logits, cache = logits_at(c.cache, start, c.state.emb)
    st, rec = step(c.state, logits)
    return BlockLoop(st, cache, trace_lib.store(c.trace, rec, c.step) if tracing else None, c.step + 1)

  cond = lambda c: jnp.any(~c.state.finished) & (c.step < K)
  return jax.lax.while_loop(cond, body, BlockLoop(st, cache, tr, jnp.int32(1)))


def _next_block(params, cfg, strategy, layout: Layout, shift, n_dec, tracing: bool, c: DecodeLoop) -> DecodeLoop:
  """The outer loop's body: decode block ``first_block + c.block`` and write it into the canvas."""
  K = layout.block_length
  start = (layout.first_block + c.block) * K
  x = jax.lax.dynamic_slice_in_dim(c.canvas, start, K, axis=1)
  prev = jax.lax.dynamic_slice_in_dim(c.canvas, start - K, K, axis=1)
  finished = c.seq_done | (c.block >= n_dec)
  st = BlockState(x=x, active=x == cfg.mask_token_id, emb=hard_embed(params, cfg, x), finished=finished,
                  steps=jnp.zeros((layout.batch,), jnp.int32), nfe=c.nfe, rng=c.rng)
  done = decode_block(params, cfg, strategy, layout, shift, tracing, st, prev, c.cache, start)
  st, ran = done.state, ~finished
  hit_eos = jnp.any(st.active & (st.x == cfg.eos_token_id), axis=-1)
  canvas = jax.lax.dynamic_update_slice_in_dim(c.canvas, jnp.where(ran[:, None], st.x, x), start, axis=1)
  return DecodeLoop(block=c.block + 1, canvas=canvas, cache=done.cache,
                    seq_done=c.seq_done | (ran & hit_eos) | (c.block + 1 >= n_dec), nfe=st.nfe, rng=st.rng,
                    traces=trace_lib.store(c.traces, done.trace, c.block) if tracing else None)


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "trace"),
                   compiler_options=transformer.DECODE_COMPILER_OPTIONS)
def _decode(params, cfg: ModelConfig, strategy: Strategy, layout: Layout, canvas, shift, n_dec, rng, trace: bool):
  """The whole generation of a laid-out batch: -> (canvas, nfe, traces)."""
  B, K = layout.batch, layout.block_length
  cache = transformer.init_cache(cfg, B, layout.canvas_length)
  Lp = layout.first_block * K  # prefill every block before the first decoding block
  _, cache = _forward(params, cfg, layout, shift, cache, 0, tokens=canvas[:, :Lp])
  traces = None
  if trace:
    traces = jax.tree.map(lambda a: jnp.zeros((layout.num_blocks,) + a.shape, a.dtype),
                          trace_lib.empty(K, B, emb_dtype(params)))
  init = DecodeLoop(block=jnp.int32(0), canvas=canvas, cache=cache, seq_done=jnp.zeros((B,), bool),
                    nfe=jnp.zeros((B,), jnp.int32), rng=rng, traces=traces)
  body = functools.partial(_next_block, params, cfg, strategy, layout, shift, n_dec, trace)
  out = jax.lax.while_loop(lambda c: (c.block < layout.num_blocks) & jnp.any(~c.seq_done), body, init)
  return out.canvas, out.nfe, out.traces


# ---------------------------------------------------------------- compiled programs

_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()  # compiled decoding programs, most recent last
_MAX_PROGRAMS = 64


@dataclasses.dataclass(frozen=True)
class Program:
  """A compiled generation of one batch, ready to run: the public hook for benchmarks.

  ``program()`` runs the whole generation (prefill, every block and step) on
  the device and returns its raw outputs ``(canvas [B, S], nfe [B], traces)``
  without waiting for them; ``executable(*args)`` is the same call, for
  timing helpers that take a function and its arguments. The routing the
  program uses is the config's (``ModelConfig.routing``).
  """

  executable: Any  # jax.stages.Compiled
  args: tuple  # (params, strategy, canvas, shift, n_dec, rng) on the device
  layout: Layout
  plan: dict  # the host-side plan (``layout.plan_batch``)

  def __call__(self):
    return self.executable(*self.args)


def compile_program(params, config: ModelConfig, prompts, *, strategy: Strategy, gen_length: int,
                    block_length: int = 32, rng=None, trace: bool = False) -> Program:
  """The compiled program ``generate`` runs for this batch (compiled on first use, then cached).

  Raises what ``generate`` would for a bad batch: ValueError naming the
  prompt, TypeError for something that is not a strategy.
  """
  if not isinstance(strategy, Strategy):
    raise TypeError(f"strategy must be a decoding strategy (SPD(...), Threshold(...)), got {strategy!r}")
  strategy.check()
  layout, plan = plan_batch([list(map(int, p)) for p in prompts], gen_length, block_length, config)
  real = jnp.result_type(float)  # float32, or float64 under jax.enable_x64
  strategy = jax.tree.map(lambda v: jnp.asarray(v, real), strategy)  # traced fields only; static ones stay
  rng = jax.random.key(0) if rng is None else rng
  args = (params, strategy, jnp.asarray(plan["canvas"]), jnp.asarray(plan["shift"]), jnp.asarray(plan["n_dec"]), rng)
  return Program(_executable(config, layout, trace, args), args, layout, plan)


def _executable(config, layout, trace, args):
  leaves, treedef = jax.tree.flatten(args)
  key = (config, layout, trace, treedef, jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
         tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    params, strategy, *rest = args
    _PROGRAMS[key] = _decode.lower(params, config, strategy, layout, *rest, trace).compile()
    while len(_PROGRAMS) > _MAX_PROGRAMS:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def prepare(params, config: ModelConfig, prompts, *, strategy: Strategy, gen_length: int, block_length: int = 32,
            trace: bool = False) -> None:
  """Compiles the program ``generate`` runs for this batch without running it, so that a timer around
  ``generate`` measures decoding alone. Raises what ``generate`` would for a bad batch."""
  compile_program(params, config, prompts, strategy=strategy, gen_length=gen_length, block_length=block_length,
                  trace=trace)


def generate(params, config: ModelConfig, prompts, *, strategy: Strategy, gen_length: int, block_length: int = 32,
             rng=None, trace: bool = False) -> list[Generation]:
  """Decodes a batch of prompts (lists of token ids, any lengths) with a decoding strategy (SPD, Threshold, ...).

  Returns one ``Generation`` per prompt: the generated ids up to (excluding)
  the first eos, the decoding forwards (NFE) spent on it, its prefill calls
  and, with ``trace=True``, every step of every block.
  """
  program = compile_program(params, config, prompts, strategy=strategy, gen_length=gen_length,
                            block_length=block_length, rng=rng, trace=trace)
  canvas, nfe, traces = jax.device_get(program())
  plan, K = program.plan, program.layout.block_length
  out = []
  for i in range(program.layout.batch):
    o = int(plan["shift"][i]) * K
    gen = canvas[i, o + plan["prompt_len"][i] : o + plan["canvas_len"][i]]
    eos = np.nonzero(gen == config.eos_token_id)[0]
    gen = gen[: eos[0]] if len(eos) else gen
    out.append(Generation(tokens=gen.tolist(), nfe=int(nfe[i]), prefill_calls=int(plan["first"][i] > 0),
                          trace=trace_lib.steps_of(traces, i) if trace else None))
  return out
