"""Per-device memory of one training step, read off the compiled, sharded program.

  python tools/plan_train_memory.py --config=configs/oput_mini.py --devices=8
  python tools/plan_train_memory.py --config=configs/oput_mini.py --devices=8 --config.mesh.fsdp=4 --config.mesh.expert=2

Lowers and compiles the exact step ``train.py`` runs (same config, mesh rules, optimizer, remat and
micro-batching) on abstract shapes: no weights, no data set and no accelerator are needed. On a host
without accelerators ``--devices`` emulated CPU devices stand in for the GPUs, so a single machine
can check that a mesh fits before a multi-GPU run. Reports, per device: the training state it holds
(fp32 parameters + AdamW moments, sharded), the temporaries the step needs (activations, gradients,
optimizer scratch) as XLA's buffer assignment plans them, and the total. XLA's CPU and GPU backends
fuse and schedule differently, so temporaries on a GPU differ somewhat from an emulated plan; the
state size is exact. With the grouped MoE backend, ``ragged_dot`` is planned by default as the fused
kernel tokamax runs on GPUs (operands and output only); ``--nokernel_stand_in`` plans XLA's own dense
expansion instead (tens of GiB per call: what a CPU would run).
"""

import contextlib
import os
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_integer("devices", 0, "emulated CPU devices when no accelerator is present (0: the real devices)")
flags.DEFINE_integer("steps", 1000, "planned run length (only shapes the learning-rate schedule)")
flags.DEFINE_bool("kernel_stand_in", True, "plan the grouped MoE's ragged_dot as a fused kernel (its operands and "
                  "output only, as tokamax's GPU kernels) instead of XLA's dense expansion (moe.kernel_memory_stand_in)")
flags.mark_flags_as_required(["config"])



def _size(n) -> str:
  return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def main(argv):
  del argv
  if flags.FLAGS.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={flags.FLAGS.devices}")
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from dmax_jax import sharding
  from dmax_jax.model import presets
  from dmax_jax.model import moe
  from dmax_jax.model import params as params_lib
  from dmax_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.training.optim import make_optimizer  # pylint: disable=import-outside-toplevel

  config = flags.FLAGS.config
  try:
    mesh = sharding.make_mesh(config.mesh.to_dict())
  except sharding.MeshError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if config.init_from in ("", None):  # no checkpoint at hand: the LLaDA-2.0-mini architecture itself
    cfg = presets.llada2_mini(**trainer.numerics(config))
  else:
    try:
      cfg = trainer.model_config(config)
    except trainer.TrainError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  tx, sched = make_optimizer(config.optim, flags.FLAGS.steps)
  obj = trainer.objective_from(config)
  t = config.train
  try:  # the batch geometry train.py would use (one global batch of examples stands in for the data)
    p = trainer.plan(config, mesh, num_examples=t.global_batch_size)
  except trainer.TrainError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  L = config.data.max_seq_len
  state = trainer.abstract_state(config, cfg, tx, mesh)
  step_fn = trainer.jit_step(cfg, obj, tx, sched, mesh, state)
  batch = trainer.abstract_batch(mesh, p, L)

  n_params = params_lib.count_params(cfg)
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
  print(f"model: {n_params / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts; "
        f"compute {cfg.compute_dtype}, remat {cfg.remat}")
  print(f"batch: {t.global_batch_size} sequences x {L} tokens = {p.accum} micro-steps of {p.micro_rows} rows")
  stand_in = flags.FLAGS.kernel_stand_in and cfg.moe_backend == "grouped"
  if stand_in:
    print("grouped MoE: ragged_dot planned as a fused kernel (operands and output only), not XLA's dense expansion")
  t0 = time.perf_counter()
  with moe.kernel_memory_stand_in() if stand_in else contextlib.nullcontext():
    compiled = step_fn.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  held = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(f"compiled in {time.perf_counter() - t0:.0f} s")
  print(f"per device: state {_size(held)} (parameters + optimizer moments), "
        f"step arguments {_size(mem.argument_size_in_bytes)}, temporaries {_size(mem.temp_size_in_bytes)}, "
        f"outputs not aliased to inputs {_size(mem.output_size_in_bytes - mem.alias_size_in_bytes)}")
  peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  print(f"per device peak (arguments + temporaries + new outputs): {_size(peak)}")


if __name__ == "__main__":
  app.run(main)
