"""The training loop: state, the jitted step, checkpoints, resume and metrics.

Train state (a dict, saved whole by ``TrainCheckpointer``):
  params         fp32 master weights (the forward casts to ``compute_dtype``)
  opt_state      optax state of clip -> AdamW
  step           completed optimizer steps
  data_position  [epoch, index] of the next batch (see ``data.DataPosition``)
  rng            the run's base PRNG key; step s uses fold_in(rng, s)

One step takes a global batch of A x B sequences laid out ``[A, B, L]``: A
micro-steps (gradient accumulation, a ``lax.scan``) of B = micro_batch_size x
batch shards rows each (shape letters: ``dmax_jax/shapes.py``). Every row's noise comes from fold_in(step key, row),
and the loss is the cross-entropy sum over the global batch divided by its
labelled-position count, so the step is the same for any A and any mesh.

A run ends with ``WORKDIR/final``: the parameters as a params checkpoint
(the layout ``tools/convert_hf.py`` writes) with the tokenizer, which
``decode.py``, ``tools/evaluate.py`` and ``tools/export_hf.py`` take.

Errors: ``TrainError`` for a bad setup (nothing trained), ``TrainFailed`` for
a run that started and could not go on (a non-finite loss, a failed write);
neither leaves a half-written checkpoint or a non-finite one behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import shutil
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmax_jax.training import data as data_lib
from dmax_jax import sharding
from dmax_jax.training import losses
from dmax_jax.checkpoints.converted import load_any, save_checkpoint
from dmax_jax.model.config import MOE_BACKENDS, ModelConfig, load_hf_config
from dmax_jax.checkpoints.hf import CheckpointError
from dmax_jax.training.optim import make_optimizer
from dmax_jax.model.params import compute_copy, init_params
from dmax_jax.progress import ReporterFactory, reporter
from dmax_jax.tokenizer import load_tokenizer
from dmax_jax.training.checkpoint import TrainCheckpointer
from dmax_jax.training.metrics import METRICS_FILE, MetricsLog

FINAL_DIR = "final"  # WORKDIR/final: the trained params checkpoint plus tokenizer


class TrainError(ValueError):
  """A user error in the training setup (missing checkpoint, bad data, bad sizes)."""


class TrainFailed(RuntimeError):
  """A run that started but could not go on (non-finite loss or parameters, a failed write)."""


# ---------------------------------------------------------------- config checks

_INF = math.inf
# key: (holds, what it must be). Every number a run reads, with the range it makes sense in.
_RANGES = {
    "optim.lr": (lambda v: 0 < v < _INF, "a finite number > 0"),
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": (lambda v: 0 < v < _INF, "a finite number > 0"),
    "optim.weight_decay": (lambda v: 0 <= v < _INF, "a finite number >= 0"),
    "optim.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.clip_norm": (lambda v: 0 < v < _INF, "a finite number > 0"),
    "train.global_batch_size": (lambda v: v >= 1, ">= 1"),
    "train.micro_batch_size": (lambda v: v >= 1, ">= 1"),
    "train.max_steps": (lambda v: v >= 0, ">= 0 (0 = run config.train.epochs)"),
    "train.epochs": (lambda v: v >= 0, ">= 0"),
    "train.save_every": (lambda v: v >= 0, ">= 0 (0 = final checkpoint only)"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.debug_kill_at_step": (lambda v: v >= 0, ">= 0"),
    "data.max_seq_len": (lambda v: v >= 2, ">= 2"),
    "objective.block_length": (lambda v: v >= 1, ">= 1"),
    "objective.noise_low": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "objective.noise_high": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "compute_dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "moe_backend": (lambda v: v in MOE_BACKENDS, " or ".join(MOE_BACKENDS)),
}


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      raise TrainError(f"config.{key}: missing (every config starts from dmax_jax.training.config.defaults, as configs/base.py does)")
    node = node[part]
  return node


def check_config(config) -> None:
  """Raises ``TrainError`` naming the first key whose value is out of range."""
  for key, (holds, want) in _RANGES.items():
    v = _get(config, key)
    ok = isinstance(v, str) if key in ("compute_dtype", "moe_backend") else (
        isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v))
    if not (ok and holds(v)):
      raise TrainError(f"config.{key}={v!r}: must be {want}")
  if config.objective.noise_low > config.objective.noise_high:
    raise TrainError(f"config.objective.noise_low={config.objective.noise_low!r}: must be <= "
                     f"config.objective.noise_high={config.objective.noise_high!r}")
  if config.train.max_steps == 0 and config.train.epochs == 0:
    raise TrainError("config.train.epochs=0: must be >= 1 when config.train.max_steps is 0")


# ---------------------------------------------------------------- the step


def objective_from(config) -> losses.Objective:
  o = config.objective
  return losses.Objective(
      block_length=o.block_length, noise_low=o.noise_low, noise_high=o.noise_high, oput=o.oput, only_masked=o.only_masked
  )


def make_step_fn(cfg: ModelConfig, obj: losses.Objective, tx: optax.GradientTransformation, schedule):
  """``step(state, batch) -> (state, metrics)`` (not jitted); ``batch`` leaves are ``[A, B, ...]``."""

  def micro(weights, step_key, mb):
    """(gradient w.r.t. ``weights``, cross-entropy sum, covered positions) of one micro-batch."""
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(mb["row"])
    (total, count), g = jax.value_and_grad(lambda w: losses.loss_sum(w, cfg, obj, mb, keys), has_aux=True)(weights)
    return g, total, count

  def accumulate(params, weights, step_key, batch):
    """Gradient sums in the master weights' dtype over the ``A`` micro-batches (one: no accumulator)."""
    if jax.tree.leaves(batch)[0].shape[0] == 1:
      g, total, count = micro(weights, step_key, jax.tree.map(lambda a: a[0], batch))
      return jax.tree.map(lambda p, b: b.astype(p.dtype), params, g), total, count

    def add(acc, mb):
      g, total, count = micro(weights, step_key, mb)
      g_acc, t_acc, c_acc = acc
      return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g), t_acc + total, c_acc + count), None

    acc0 = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(add, acc0, batch)[0]

  def step(state, batch):
    params = state["params"]
    step_key = jax.random.fold_in(state["rng"], state["step"])
    weights = compute_copy(params, cfg.compute_dtype)  # cast once per step, not on every pass of every micro-step
    g_sum, total, count = accumulate(params, weights, step_key, batch)
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


def numerics(config) -> dict:
  """The ``ModelConfig`` numerics fields a training config sets (how to run the model, not what it is)."""
  return dict(compute_dtype=config.compute_dtype, remat=config.remat, moe_backend=config.moe_backend,
              scan_layers=config.scan_layers, attention=config.get("attention", "xla"))


def model_config(config) -> ModelConfig:
  """The model config: from ``config.model`` for scratch runs, else the checkpoint's config.json."""
  if config.init_from == "scratch":
    try:
      return ModelConfig(**config.model.to_dict(), **numerics(config))
    except (TypeError, ValueError) as e:
      raise TrainError(f"config.model: {e}") from None
  path = config.init_from
  if not os.path.isdir(path):
    raise TrainError(f"{path}: initial checkpoint not found (config.init_from)")
  try:
    return load_hf_config(path, **numerics(config))
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


def tokenizer_dir(config) -> str:
  """The run's tokenizer directory: ``config.data.tokenizer``, else the ``init_from`` checkpoint's."""
  tok_dir = config.data.tokenizer or config.init_from
  if tok_dir == "scratch":
    raise TrainError("config.data.tokenizer: a scratch run needs a tokenizer directory")
  return tok_dir


def load_data(config, cfg: ModelConfig) -> data_lib.Dataset:
  d = config.data
  if not d.path:
    raise TrainError("config.data.path: no training data given")
  if d.max_seq_len > cfg.max_position_embeddings:
    raise TrainError(f"config.data.max_seq_len={d.max_seq_len}: must be <= the model's max_position_embeddings "
                     f"({cfg.max_position_embeddings})")
  tok_dir = tokenizer_dir(config)
  try:
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
      raise TrainError(f"{tok_dir}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                       f"{cfg.vocab_size}; use the model's own tokenizer (config.data.tokenizer)")
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
  """Host batch [A x B, ...] -> [A, B, ...] plus each row's index in the global batch."""
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
  """Shardings of a shaped ``[A, B, ...]`` batch: the micro-batch rows (dim 1) split over the batch axes."""
  return sharding.batch_shardings(mesh, batch, batch_dim=1)


def abstract_batch(mesh, p: Plan, seq_len: int) -> dict:
  """Shapes, dtypes and shardings of one step's batch (``put_batch(shape_batch(...))``), for ahead-of-time compiles."""
  n = p.global_batch
  host = shape_batch(data_lib.Dataset(ids=np.zeros((n, seq_len), np.int32), prompt_len=np.zeros(n, np.int32),
                                      labels=np.zeros((n, seq_len), np.int32), on_policy=np.zeros(n, bool)).take(
                                          np.arange(n)), p)
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), host,
                      _batch_shardings(mesh, host))


# ---------------------------------------------------------------- writes


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _reason(e: BaseException) -> str:
  """Why a write failed, in a few words: the OS error when one is named (tensorstore names it in its message)."""
  code = getattr(e, "errno", None)
  if not code:
    m = _OS_ERROR_CODE.search(str(e))
    code = int(m.group(1)) if m else None
  return os.strerror(code) if code else (str(e).splitlines() or [type(e).__name__])[0][:300]


@contextlib.contextmanager
def _writing(what: str, errors=(OSError, ValueError, RuntimeError)):
  """Turns a failed write under ``what`` (disk full, no permission) into a one-line ``TrainFailed``.

  Orbax and tensorstore report I/O errors as ``ValueError``/``RuntimeError``
  (an asynchronous save's error surfaces at the next save or wait), plain
  file writes as ``OSError``.
  """
  try:
    yield
  except (TrainFailed, TrainError):
    raise
  except errors as e:
    raise TrainFailed(f"{what}: write failed ({_reason(e)})") from None


def _save(ckpt: TrainCheckpointer, step: int, state, pos, force: bool = False) -> None:
  """Saves ``state`` as checkpoint ``step``, unless its parameters are not finite."""
  if not bool(_all_finite(state["params"])):
    raise TrainFailed(f"{ckpt.directory}: step {step}: the parameters are not finite; not saved (latest checkpoint: step "
                      f"{ckpt.latest_step()})")
  with _writing(ckpt.directory):
    ckpt.save(step, _to_saved(state, pos), force=force)


def _abandon(ckpt: TrainCheckpointer, lead: bool) -> None:
  """After a failure: lets finished saves complete, and removes unfinished ones (Orbax's ``*.orbax-checkpoint-tmp``)."""
  try:
    ckpt.close()
  except Exception:  # pylint: disable=broad-except
    pass  # the failure being reported is the one that counts
  if lead:
    for path in glob.glob(os.path.join(ckpt.directory, "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)


def write_final(params, cfg: ModelConfig, workdir: str, tok_dir: str) -> str:
  """``workdir/final``: the params checkpoint (``convert_hf``'s layout) plus the tokenizer, replaced atomically.

  It is written beside the old one and renamed over it, so ``final`` is
  always either the previous complete result or the new one.
  """
  final = os.path.join(workdir, FINAL_DIR)
  new, old = final + ".new", final + ".old"
  for path in (new, new + ".partial", old):
    shutil.rmtree(path, ignore_errors=True)
  with _writing(final):
    save_checkpoint(params, cfg, new, tokenizer_dir=tok_dir)
    if os.path.exists(final):
      os.rename(final, old)
    os.rename(new, final)
  shutil.rmtree(old, ignore_errors=True)
  return final


# ---------------------------------------------------------------- the loop


def train(config, workdir: str, progress: Optional[ReporterFactory] = None,
          on_resume: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
  """Runs (or resumes) training in ``workdir``; returns the final state.

  ``on_resume(step)`` is called when the run continues from checkpoint
  ``step``. On one process the run ends by writing ``workdir/final``
  (``write_final``); several processes leave the training checkpoints only.
  ``progress``: a reporter factory (``dmax_jax.progress``) for the steps, None for none.
  """
  check_config(config)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  cfg, ds, p, tx, sched = build(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0  # on several hosts, one writes the metrics and shows progress
  ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                           async_save=config.train.async_save)
  try:
    if ckpt.latest_step() is not None:
      state, pos = _from_saved(ckpt.restore(abstract_state=abstract_state(config, cfg, tx, mesh)), mesh)
      if on_resume is not None:
        on_resume(int(state["step"]))
    else:
      state, pos = fresh_state(config, cfg, tx, mesh), data_lib.DataPosition()
    run = _Run(config, workdir, ckpt, jit_step(cfg, objective_from(config), tx, sched, mesh, state), p, mesh, lead)
    state, pos = run.steps(state, pos, data_lib.batches(ds, p.global_batch, config.train.seed, pos), progress)
    run.finish(state, pos)
  except BaseException:
    _abandon(ckpt, lead)
    raise
  if jax.process_count() == 1:
    write_final(state["params"], cfg, workdir, tokenizer_dir(config))
  return state


@dataclasses.dataclass
class _Run:
  """One training run's fixed parts: what each step needs besides the state and the batch."""

  config: Any
  workdir: str
  ckpt: TrainCheckpointer
  step_fn: Callable
  plan: Any  # the batch plan of ``build``
  mesh: Any
  lead: bool

  def steps(self, state, pos, stream, progress):
    """Runs the steps left (metrics, saves, the non-finite check); -> (state, data position)."""
    p, train_cfg = self.plan, self.config.train
    start = int(state["step"])
    metrics_path = os.path.join(self.workdir, METRICS_FILE)
    with _writing(metrics_path, OSError):
      mlog = MetricsLog(self.workdir, start, enabled=self.lead)
    with mlog, reporter(progress if self.lead else None, total=p.total_steps, initial=start, desc="train",
                        unit="step") as bar:
      for step in range(start + 1, p.total_steps + 1):
        host_batch, pos = next(stream)
        state, row = self._step(state, host_batch, step, pos)
        with _writing(metrics_path, OSError):
          mlog.write(row)
        self._check_finite(row, step)
        bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm']:.3f}", lr=f"{row['lr']:.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if train_cfg.save_every and step % train_cfg.save_every == 0:
          _save(self.ckpt, step, state, pos)
        if train_cfg.debug_kill_at_step and step == train_cfg.debug_kill_at_step:
          os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, for the resume test
    return state, pos

  def _step(self, state, host_batch, step: int, pos):
    t0 = time.perf_counter()
    state, m = self.step_fn(state, put_batch(shape_batch(host_batch, self.plan), self.mesh))
    m = {k: float(v) for k, v in m.items()}
    dt = time.perf_counter() - t0
    tokens = self.plan.global_batch * self.config.data.max_seq_len
    return state, {"step": step, "epoch": pos.epoch, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                   "tokens_per_s": tokens / dt, "step_time": dt}

  def _check_finite(self, row: dict, step: int) -> None:
    if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
      with _writing(self.ckpt.directory):
        self.ckpt.wait()
      raise TrainFailed(f"{self.workdir}: step {step}: the loss is {row['loss']} (gradient norm {row['grad_norm']}); "
                        f"stopped without saving it (latest checkpoint: step {self.ckpt.latest_step()}; try a lower "
                        "config.optim.lr)")

  def finish(self, state, pos) -> None:
    """Waits for the saves in flight, saves the last step if it is not saved yet, closes the checkpointer."""
    with _writing(self.ckpt.directory):
      self.ckpt.wait()
    if self.ckpt.latest_step() != self.plan.total_steps:
      _save(self.ckpt, self.plan.total_steps, state, pos, force=True)
    with _writing(self.ckpt.directory):
      self.ckpt.close()
