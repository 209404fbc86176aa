"""Shared test fixtures: the golden LLaDA2 tiny checkpoint and small configs."""

import dataclasses
import os
from pathlib import Path

# The suite is mostly XLA compiling small programs on 2 CPU cores: without LLVM's backend optimisations a
# program compiles in about half the time (the tiny model's decoding program: 11 s -> 6 s) and these
# programs run in milliseconds either way. Set before JAX starts; subprocesses of the CLI tests inherit it.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np
import pytest

# Parity checks need true float32 matmuls on GPUs too (TF32 is ~1e-3 off).
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DMAX_SHARED", REPO.parent / "shared"))
TINY = SHARED / "fixtures" / "llada2_tiny"
GSM8K = SHARED / "data" / "gsm8k"


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if "gpu" in item.keywords and jax.default_backend() not in ("gpu", "cuda", "rocm"):
      item.add_marker(pytest.mark.skip(reason="needs a GPU (run on the device machine)"))


@pytest.fixture(scope="session")
def tiny_dir():
  if not TINY.exists():
    pytest.fail(f"golden fixture missing: {TINY} (set DMAX_SHARED to the shared/ folder)")
  return str(TINY)


@pytest.fixture(scope="session")
def golden(tiny_dir):
  return dict(np.load(os.path.join(tiny_dir, "golden.npz")))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
  import dmax_jax

  return dmax_jax.load_hf_checkpoint(tiny_dir)


def with_numerics(cfg, **kw):
  return dataclasses.replace(cfg, **kw)


def generate_as_cli_batches(params, cfg, prompts, *, batch_size=8, **kw):
  """``decoding.generate`` on the batches decode.py / evaluate.py form (shortest prompts first, stable,
  ``batch_size`` at a time), returned in the input order.

  Comparing a CLI's records with these is exact on any CPU: the same compiled program on the same inputs.
  (A prompt decoded alone runs another program, whose float32 rounding can differ by CPU and shape.)
  """
  from dmax_jax import decoding  # pylint: disable=import-outside-toplevel

  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out = [None] * len(prompts)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    for i, g in zip(chunk, decoding.generate(params, cfg, [prompts[i] for i in chunk], **kw)):
      out[i] = g
  return out
