"""Shared test fixtures: the golden LLaDA2 tiny checkpoint and small configs."""

import dataclasses
import os
from pathlib import Path

import jax
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
