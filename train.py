"""Block-diffusion SFT / OPUT training.

  python train.py --config=configs/oput_mini.py --workdir=DIR \
      --config.init_from=CKPT --config.data.path=DATA.jsonl [--config.train.max_steps=100 ...]

Resumes automatically from the latest checkpoint in DIR/checkpoints; writes
DIR/metrics.jsonl (loss, grad_norm, lr, tokens_per_s, step_time per step).
Several hosts: start one process per host with ``--distributed`` (README).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
flags.DEFINE_bool("distributed", False, "join a multi-process run (one process per host; see README)")
flags.DEFINE_string("coordinator", None, "with --distributed: process 0's host:port (default: from the cluster)")
flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes (default: from the cluster)")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's id (default: from the cluster)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if flags.FLAGS.distributed:
    from dmax_jax import distributed  # pylint: disable=import-outside-toplevel

    distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  from dmax_jax import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.sharding import MeshError  # pylint: disable=import-outside-toplevel

  try:
    trainer.train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (trainer.TrainError, MeshError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
