"""The DMax demo end to end: ``python tools/run_demo.py --config=configs/demo_cpu.py --workdir=runs/demo``.

Trains a small LLaDA2-MoE on generated arithmetic (block-diffusion SFT),
self-distils it, fine-tunes it with OPUT and prints the accuracy / TPF /
tokens-per-second table of base and OPUT models under threshold decoding and
SPD (also WORKDIR/report.{json,md} and WORKDIR/tradeoff.png). Rerunning the
command skips finished stages and resumes an interrupted one.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", None, "demo config file (configs/demo_cpu.py, configs/demo_gpu.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for every stage's outputs (rerun to resume)")
flags.DEFINE_bool("progress", True, "show progress bars")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from dmax_jax.apps import demo
  from dmax_jax.apps import runner
  from dmax_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.sharding import MeshError  # pylint: disable=import-outside-toplevel

  try:
    print(demo.run(flags.FLAGS.config, flags.FLAGS.workdir, progress=flags.FLAGS.progress), end="")
  except (demo.DemoError, trainer.TrainError, MeshError, runner.UsageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except trainer.TrainFailed as e:  # a run that went wrong (e.g. a non-finite loss), not a user mistake
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
