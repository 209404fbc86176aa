"""The training loop: state, the jitted step, checkpoints, resume and metrics.

Train state (a dict, saved whole by ``TrainCheckpointer``):
  params         fp32 master weights (the forward casts to ``compute_dtype``)
  opt_state      optax state of clip -> AdamW
  step           completed optimizer steps
  data_position  [epoch, index] of the next batch (see ``data.DataPosition``)
  rng            the run's base PRNG key; step s uses fold_in(rng, s)

One step takes a global batch of G sequences laid out ``[A, M, L]``: A
micro-steps (gradient accumulation, a ``lax.scan``) of M = micro_batch_size x
batch shards rows each. Every row's noise comes from fold_in(step key, row),
and the loss is the cross-entropy sum over the global batch divided by its
labelled-position count, so the step is the same for any A and any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmax_jax import data as data_lib
from dmax_jax import losses, sharding
from dmax_jax.config import ModelConfig, load_hf_config
from dmax_jax.checkpoint import load_any
from dmax_jax.hf import CheckpointError
from dmax_jax.optim import make_optimizer
from dmax_jax.params import init_params
from dmax_jax.tokenizer import load_tokenizer
from dmax_jax.train_checkpoint import TrainCheckpointer

METRICS_FILE = "metrics.jsonl"


class TrainError(ValueError):
  """A user error in the training setup (missing checkpoint, bad data, bad sizes)."""


# ---------------------------------------------------------------- the step


def objective_from(config) -> losses.Objective:
  o = config.objective
  return losses.Objective(
      block_size=o.block_size, noise_low=o.noise_low, noise_high=o.noise_high, oput=o.oput, only_masked=o.only_masked
  )


def make_step_fn(cfg: ModelConfig, obj: losses.Objective, tx: optax.GradientTransformation, schedule):
  """``step(state, batch) -> (state, metrics)`` (not jitted); ``batch`` leaves are ``[A, M, ...]``."""

  def micro(params, step_key, acc, mb):
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(mb["row"])

    def f(p):
      total, count = losses.loss_sum(p, cfg, obj, mb, keys)
      return total, count

    (total, count), g = jax.value_and_grad(f, has_aux=True)(params)
    g_acc, t_acc, c_acc = acc
    return jax.tree.map(jnp.add, g_acc, g), t_acc + total, c_acc + count

  def step(state, batch):
    params = state["params"]
    step_key = jax.random.fold_in(state["rng"], state["step"])
    zeros = jax.tree.map(jnp.zeros_like, params)
    acc0 = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (g_sum, total, count), _ = jax.lax.scan(lambda acc, mb: (micro(params, step_key, acc, mb), None), acc0, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(
        state, params=optax.apply_updates(params, updates), opt_state=opt_state, step=state["step"] + 1
    )
    metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "labelled": count}
    return new_state, metrics

  return step


# ---------------------------------------------------------------- setup


def _numerics(config) -> dict:
  return dict(compute_dtype=config.compute_dtype, remat=config.remat, moe_backend=config.moe_backend,
              scan_layers=config.scan_layers, attention=config.get("attention", "xla"))


def model_config(config) -> ModelConfig:
  """The model config: from ``config.model`` for scratch runs, else the checkpoint's config.json."""
  if config.init_from == "scratch":
    try:
      return ModelConfig(**config.model.to_dict(), **_numerics(config))
    except (TypeError, ValueError) as e:
      raise TrainError(f"config.model: {e}") from None
  path = config.init_from
  if not os.path.isdir(path):
    raise TrainError(f"{path}: initial checkpoint not found (config.init_from)")
  try:
    return load_hf_config(path, **_numerics(config))
  except ValueError as e:
    raise TrainError(str(e)) from None


def initial_params(config, cfg: ModelConfig, shardings):
  """fp32 master weights: random (scratch), a converted params checkpoint, or a Hugging Face directory."""
  if config.init_from == "scratch":
    init = jax.jit(lambda r: init_params(cfg, r), out_shardings=shardings)
    return init(jax.random.PRNGKey(config.train.seed))
  path = config.init_from
  try:
    _, params = load_any(path, dtype=jnp.float32, sharding=shardings)
  except (CheckpointError, ValueError) as e:
    raise TrainError(str(e)) from None
  return params


def load_data(config, cfg: ModelConfig) -> data_lib.Dataset:
  d = config.data
  if not d.path:
    raise TrainError("config.data.path: no training data given")
  tok_dir = d.tokenizer or config.init_from
  if tok_dir == "scratch":
    raise TrainError("config.data.tokenizer: a scratch run needs a tokenizer directory")
  try:
    tok = load_tokenizer(tok_dir)
    return data_lib.build_dataset(
        d.path, tok, d.max_seq_len, cfg.eos_token_id, oput=config.objective.oput, prompt_suffix=d.prompt_suffix
    )
  except ValueError as e:  # DataError, TokenizerError
    raise TrainError(str(e)) from None


@dataclasses.dataclass
class Plan:
  """Batch geometry and run length."""

  global_batch: int
  micro_rows: int  # rows of one micro-step (micro_batch_size x batch shards)
  accum: int
  total_steps: int


def plan(config, mesh, num_examples: int) -> Plan:
  t = config.train
  shards = sharding.batch_size_multiple(mesh)
  micro_rows = t.micro_batch_size * shards
  if t.global_batch_size % micro_rows:
    raise TrainError(
        f"config.train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x batch shards"
        f" = {t.micro_batch_size} x {shards}"
    )
  per_epoch = data_lib.steps_per_epoch(num_examples, t.global_batch_size)
  if per_epoch == 0:
    raise TrainError(f"{config.data.path}: {num_examples} examples, fewer than one global batch ({t.global_batch_size})")
  total = t.max_steps if t.max_steps > 0 else t.epochs * per_epoch
  return Plan(t.global_batch_size, micro_rows, t.global_batch_size // micro_rows, total)


def shape_batch(batch: dict, p: Plan) -> dict:
  """Host batch [G, ...] -> [A, M, ...] plus each row's index in the global batch."""
  out = {k: np.asarray(v) for k, v in batch.items()}
  out["row"] = np.arange(p.global_batch, dtype=np.int32)
  return {k: v.reshape((p.accum, p.micro_rows) + v.shape[1:]) for k, v in out.items()}


def state_shardings(mesh, state):
  out = {"params": sharding.tree_shardings(mesh, state["params"]),
         "opt_state": sharding.tree_shardings(mesh, state["opt_state"])}
  for k in ("step", "rng"):
    out[k] = sharding.replicated(mesh)
  return out


def build(config, mesh):
  """The model config, tokenized data, batch plan, optimizer and schedule of a run."""
  cfg = model_config(config)
  ds = load_data(config, cfg)
  p = plan(config, mesh, len(ds))
  tx, sched = make_optimizer(config.optim, p.total_steps)
  return cfg, ds, p, tx, sched


def fresh_state(config, cfg, tx, mesh):
  abstract = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
  p_shard = sharding.tree_shardings(mesh, abstract)
  params = initial_params(config, cfg, p_shard)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_state = jax.jit(tx.init, out_shardings=sharding.tree_shardings(mesh, opt_abstract))(params)
  rep = sharding.replicated(mesh)
  return {
      "params": params,
      "opt_state": opt_state,
      "step": _put(np.zeros((), np.int32), rep),
      "rng": _put(np.asarray(jax.random.PRNGKey(config.train.seed)), rep),
  }


def _to_saved(state, pos):
  """Train state -> what ``TrainCheckpointer`` stores (the data position as JSON)."""
  return {"params": state["params"], "opt_state": state["opt_state"], "rng": state["rng"],
          "data": [int(v) for v in pos.to_array()]}


def _from_saved(saved, mesh):
  """Saved state -> (train state, data position)."""
  state = {"params": saved["params"], "opt_state": saved["opt_state"], "rng": saved["rng"],
           "step": _put(np.asarray(saved["step"], np.int32), sharding.replicated(mesh))}
  return state, data_lib.DataPosition.from_array(saved["data"])


def abstract_state(config, cfg, tx, mesh):
  def make():
    params = init_params(cfg, jax.random.PRNGKey(0))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(config.train.seed)}

  shapes = jax.eval_shape(make)
  shard = state_shardings(mesh, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)


def jit_step(cfg, obj, tx, sched, mesh, state_like):
  """The jitted step, traced under ``mesh`` (the grouped MoE splits its experts over the mesh itself)."""
  step = make_step_fn(cfg, obj, tx, sched)

  def step_in_mesh(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(state, batch)

  st_shard = state_shardings(mesh, state_like)
  return jax.jit(step_in_mesh, in_shardings=(st_shard, None), out_shardings=(st_shard, None), donate_argnums=(0,))


def _put(x: np.ndarray, shard) -> jax.Array:
  """A host value that every process holds alike -> a global array (each process fills its own devices)."""
  return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])


def put_batch(batch: dict, mesh) -> dict:
  """Host arrays of the whole global batch -> global device arrays.

  Every process holds the same global batch (the data order is a pure
  function of the seed and position) and places only the slices its own
  devices hold, so one code path serves one GPU, one host and many hosts.
  """
  return jax.tree.map(_put, batch, _batch_shardings(mesh, batch))


def _batch_shardings(mesh, batch):
  """Shardings of a shaped ``[A, M, ...]`` batch: the micro-batch rows (dim 1) split over the batch axes."""
  return sharding.batch_shardings(mesh, batch, batch_dim=1)


def abstract_batch(mesh, p: Plan, seq_len: int) -> dict:
  """Shapes, dtypes and shardings of one step's batch (``put_batch(shape_batch(...))``), for ahead-of-time compiles."""
  G = p.global_batch
  host = shape_batch(data_lib.Dataset(ids=np.zeros((G, seq_len), np.int32), prompt_len=np.zeros(G, np.int32),
                                      labels=np.zeros((G, seq_len), np.int32), on_policy=np.zeros(G, bool)).take(
                                          np.arange(G)), p)
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), host,
                      _batch_shardings(mesh, host))


# ---------------------------------------------------------------- the loop


def train(config, workdir: str, progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) training in ``workdir``; returns the final state."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(config.mesh.to_dict())
  cfg, ds, p, tx, sched = build(config, mesh)
  obj = objective_from(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                           async_save=config.train.async_save)
  if ckpt.latest_step() is not None:
    state, pos = _from_saved(ckpt.restore(abstract_state=abstract_state(config, cfg, tx, mesh)), mesh)
  else:
    state, pos = fresh_state(config, cfg, tx, mesh), data_lib.DataPosition()
  step_fn = jit_step(cfg, obj, tx, sched, mesh, state)
  start = int(state["step"])
  stream = data_lib.batches(ds, p.global_batch, config.train.seed, pos)
  tokens_per_step = p.global_batch * config.data.max_seq_len
  save_every = config.train.save_every
  kill_at = config.train.debug_kill_at_step
  lead = jax.process_index() == 0  # on several hosts, one writes the metrics and shows progress
  with open(os.path.join(workdir, METRICS_FILE) if lead else os.devnull, "a") as mlog, \
      tqdm(total=p.total_steps, initial=start, desc="train", unit="step", disable=not (progress and lead)) as bar:
    for step in range(start + 1, p.total_steps + 1):
      host_batch, pos = next(stream)
      t0 = time.perf_counter()
      state, m = step_fn(state, put_batch(shape_batch(host_batch, p), mesh))
      m = {k: float(v) for k, v in m.items()}
      dt = time.perf_counter() - t0
      row = {"step": step, "epoch": pos.epoch, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
             "tokens_per_s": tokens_per_step / dt, "step_time": dt}
      mlog.write(json.dumps(row) + "\n")
      mlog.flush()
      bar.set_postfix(loss=f"{m['loss']:.4f}", gnorm=f"{m['grad_norm']:.3f}", lr=f"{m['lr']:.2e}",
                      tok_s=f"{row['tokens_per_s']:.0f}")
      bar.update(1)
      if save_every and step % save_every == 0:
        ckpt.save(step, _to_saved(state, pos))
      if kill_at and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, for the resume test
  ckpt.wait()
  if ckpt.latest_step() != p.total_steps:
    ckpt.save(p.total_steps, _to_saved(state, pos), force=True)
  ckpt.wait()
  ckpt.close()
  return state
