"""Block-diffusion SFT / OPUT training.

  python train.py --config=configs/oput_mini.py --workdir=DIR \
      --config.init_from=CKPT --config.data.path=DATA.jsonl [--config.train.max_steps=100 ...]

Resumes automatically from the latest checkpoint in DIR/checkpoints; writes
DIR/metrics.jsonl (loss, grad_norm, lr, tokens_per_s, step_time per step), the
same scalars as TensorBoard events in DIR/tensorboard, and at the end
DIR/final: the trained params checkpoint with its tokenizer, which decode.py,
tools/evaluate.py and tools/export_hf.py take.
Several hosts: start one process per host with ``--distributed`` (README).

Exit status: 0 done, 2 a bad setup (flags, config values, files; nothing
trained), 1 a run that failed (a non-finite loss, a failed write); errors are
one line on stderr.
"""

import difflib
import importlib.util
import logging as std_logging
import os
import sys
import threading

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics")
flags.DEFINE_bool("progress", True, "show a progress bar (--noprogress: none)")
flags.DEFINE_bool("distributed", False, "join a multi-process run (one process per host; see README)")
flags.DEFINE_string("coordinator", None, "with --distributed: process 0's host:port (default: from the cluster)")
flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes (default: from the cluster)")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's id (default: from the cluster)")
flags.mark_flags_as_required(["config", "workdir"])

LOG_FILE = "train.log"  # WORKDIR/train.log: library warnings and errors


def _fail(message: str, status: int):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _unknown_override(argv, config) -> str:
  """The first ``--config.a.b=...`` in ``argv`` naming a key ``config`` lacks, with the nearest keys."""
  for arg in argv[1:]:
    if not arg.startswith(("--config.", "--noconfig.")):
      continue
    path = arg.split("=", 1)[0].split("config.", 1)[1]
    node, done = config, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(part, keys, n=3)
        hint = f" (did you mean {', '.join('config.' + '.'.join(done + [k]) for k in near)}?)" if near else ""
        return f"--config.{path}: the config has no key config.{'.'.join(done + [part])}{hint}"
      node, done = node[part], done + [part]
  return ""


def _config_file(argv) -> str:
  """The ``--config`` file named in ``argv`` (without a ``:args`` suffix), or ""."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return ""


def _load_config_file(path: str):
  spec = importlib.util.spec_from_file_location("train_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config_error(argv, parse_error: Exception = None) -> str:
  """The one-line usage error of ``argv`` ("" if none): config file, unknown override key, other flags."""
  path = _config_file(argv)
  if path and not os.path.isfile(path):
    return f"{path}: no such config file (--config)"
  config = flags.FLAGS["config"].value  # config_flags keeps a file's load error in place of the config
  if path and not isinstance(config, ml_collections.ConfigDict):
    try:  # parsing stopped before the file was read, or it failed to load: load it here for the message
      config = _load_config_file(path)
    except Exception as e:  # pylint: disable=broad-except
      return f"{path}: cannot load the config file (--config): {type(e).__name__}: {e}".splitlines()[0]
  if parse_error is None:
    return ""
  unknown = _unknown_override(argv, config) if isinstance(config, ml_collections.ConfigDict) else ""
  return unknown or (str(parse_error).strip().splitlines() or [type(parse_error).__name__])[0]


def parse_flags(argv):
  """absl flag parsing where every usage error (bad flag, config file or override) is one line, exit status 2."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_config_error(argv, e), 2)
  error = _config_error(argv)
  if error:
    _fail(error, 2)
  return rest


class _LazyLog:
  """A file stream that creates its file (and folder) on the first write: no log file when nothing is logged.

  Writes that fail (a full disk) or come after ``close`` (objects collected at exit) are dropped.
  """

  def __init__(self, path: str):
    self.path, self._f, self._closed = path, None, False

  def write(self, text: str) -> None:
    if self._closed:
      return
    try:
      if self._f is None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.path, "a")
      self._f.write(text)
    except OSError:
      pass  # the run's own error line says what failed

  def flush(self) -> None:
    try:
      if self._f is not None and not self._closed:
        self._f.flush()
    except OSError:
      pass

  def close(self) -> None:
    self._closed = True
    if self._f is not None:
      self._f.close()


def _log_to_file(path: str) -> None:
  """Library logs (Orbax's save errors, warnings) and background threads' tracebacks go to ``path``, not stderr.

  stderr keeps the progress bar and this script's one-line messages.
  """
  logging.get_absl_handler().python_handler.setStream(_LazyLog(path))
  std_logging.captureWarnings(True)  # e.g. JAX's "error writing persistent compilation cache entry"

  # Errors that the libraries' threads cannot raise to the caller (tensorstore's callbacks after an
  # asynchronous save failed); the failure itself reaches the caller and is reported in one line.
  sys.unraisablehook = lambda args: logging.error(
      "%s", args.err_msg or "unraisable exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
  threading.excepthook = lambda args: logging.error(
      "in thread %s", args.thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  log_path = os.path.join(flags.FLAGS.workdir, LOG_FILE)
  _log_to_file(log_path)
  if flags.FLAGS.distributed:
    from dmax_jax import distributed  # pylint: disable=import-outside-toplevel

    distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  import jax  # pylint: disable=import-outside-toplevel

  from dmax_jax.apps.progress import bar_if  # pylint: disable=import-outside-toplevel
  from dmax_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from dmax_jax.sharding import MeshError  # pylint: disable=import-outside-toplevel

  from dmax_jax.model import moe  # pylint: disable=import-outside-toplevel

  if flags.FLAGS.config.moe_backend == "grouped" and jax.default_backend() == "gpu" and moe.tokamax_module() is None:
    print(f"warning: tokamax cannot be imported ({moe.tokamax_import_error()}): the grouped MoE runs "
          "jax.lax.ragged_dot, which XLA lowers densely on GPUs (pip install -e '.[cuda]')", file=sys.stderr)
  try:
    trainer.train(flags.FLAGS.config, flags.FLAGS.workdir, progress=bar_if(flags.FLAGS.progress),
                  on_resume=lambda step: print(f"resuming from step {step}", flush=True))
  except (trainer.TrainError, MeshError) as e:
    _fail(str(e), 2)
  except trainer.TrainFailed as e:
    _fail(f"{e}{f' (details in {log_path})' if os.path.exists(log_path) else ''}", 1)
  final = os.path.join(flags.FLAGS.workdir, trainer.FINAL_DIR)
  if os.path.isdir(final) and jax.process_index() == 0:
    print(f"wrote {final}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
