"""tools/bench_train.py at tiny widths, and its useful-FLOP count against a hand computation."""

import pytest
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from dmax_jax.model import presets
from dmax_jax.training import diffusion
from dmax_jax.apps.benchmarking import active_matmul_params, oput_step_flops
from conftest import REPO


def test_useful_flops_by_hand():
  cfg = dataclasses.replace(
      presets.llada2_mini(), vocab_size=100, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
      num_key_value_heads=1, head_dim=4, intermediate_size=16, first_k_dense_replace=1, moe_intermediate_size=2,
      num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1)
  attn = 8 * (2 + 2) * 4 + 2 * 4 * 8  # qkv [8, 16] + o [8, 8]
  dense = 3 * 8 * 16
  moe = 8 * 4 + 3 * 8 * 2 * (2 + 1)  # router + 2 routed + 1 shared expert
  assert active_matmul_params(cfg) == 3 * attn + dense + 2 * moe
  # L = 4 tokens in blocks of 2
  pairs = int(np.sum(np.asarray(diffusion.bd_attention_mask(4, 2))))
  assert pairs == 2 * 4 + 2 * 2 + (4 + 8)  # noisy->noisy own block, noisy->clean earlier blocks, clean->clean up to own
  per_pass = 2 * (2 * 4) * (3 * attn + dense + 2 * moe) + 2 * 4 * 8 * 100 + 4 * pairs * 2 * 4 * 3
  assert oput_step_flops(cfg, 1, 4, pairs) == 4 * per_pass  # rollout forward (1x) + forward and backward (3x)
  assert oput_step_flops(cfg, 1, 4, pairs, rollout=False) == 3 * per_pass


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_bench_train_tiny_runs_both_backends(tmp_path):
  out = tmp_path / "train.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "tools/bench_train.py", "--tiny", "--layers", "2", "--length", "32",
                      "--accum", "2", "--iters", "1", "--rounds", "1", "--backends", "grouped,dense", "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  rows = res["backends"]
  assert set(rows) == {"grouped", "dense"}
  for row in rows.values():
    assert row["step_ms"] > 0 and row["useful_tflops"] > 0 and 0 < row["mfu_measured"]
    assert abs(row["tokens_per_s"] * row["step_ms"] / 1e3 - 2 * 32) < 1e-6 * 64  # 2 micro-steps of one 32-token row
  # the same steps from the same initial state: the backends agree up to bf16 rounding
  np.testing.assert_allclose(rows["grouped"]["loss"], rows["dense"]["loss"], rtol=2e-2)
  assert "tokens/s" in r.stdout
