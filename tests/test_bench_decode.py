"""tools/bench_decode.py end to end at tiny shapes, on one device and split over 8 emulated devices."""

import pytest
import json
import os
import subprocess
import sys

from conftest import REPO


def _run(tmp_path, *args, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "tools/bench_decode.py", "--tiny", "--rounds", "1", "--loop", "2",
                      "--batches", "1", "--json", str(out), *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(out.read_text()), r.stdout


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_mesh_split_forward_agrees_and_reports_rows(tmp_path):
  res, stdout = _run(tmp_path, "--mesh", "expert=4,tensor=2", "--no-spd", "--routing", "raw", devices=8)
  assert res["mesh"]["expert"] == 4 and res["mesh"]["tensor"] == 2
  agree = res["split_vs_one_device"]
  # bf16 compute: the split forward must be as close to the fp32 one-device reference as the one-device
  # bf16 forward is (their errors are bf16 rounding of the same function; its size varies by CPU), and
  # a wrong split (a missing reduction, a swapped shard) is off by O(1).
  assert agree["split_vs_ref"] <= 1.5 * agree["one_device_vs_ref"] + 1e-3, agree
  assert agree["one_device_vs_ref"] < 0.1 and agree["rel_l2"] < 0.1, agree
  assert agree["split_argmax_vs_ref"] >= agree["one_device_argmax_vs_ref"] - 0.05, agree
  forward = [r for r in res["rows"] if r["what"] == "forward 32/512"]
  assert len(forward) == 1 and forward[0]["experts_per_layer"] > 0 and forward[0]["ratio"] > 0
  assert "forward 32/512" in stdout


def _usage_error(*args):
  """stderr of a bench_decode run that must stop with a one-line usage error (exit 2, no traceback)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "tools/bench_decode.py", "--tiny", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return r.stderr


def test_bad_mesh_is_a_one_line_error():
  assert "--mesh expert=3" in _usage_error("--mesh", "expert=3")


def _int8_rows(rows):
  return {(r["what"], r["weights"]): r for r in rows}


@pytest.mark.slow  # 14-31 s: keeps the default suite under ten minutes on 2 cores
def test_int8_rows_beside_bf16(tmp_path):
  """int8 experts: forward rows with fewer bytes read than bf16, their limit, ratio, tokens/s and speed-up."""
  res, stdout = _run(tmp_path, "--weights", "bf16,int8", "--routing", "uniform", "--no-spd")
  rows = _int8_rows(res["rows"])
  bf16, int8 = rows["forward 32/512", "bf16"], rows["forward 32/512", "int8"]
  assert int8["experts_per_layer"] == bf16["experts_per_layer"] > 0  # same routing
  assert 0.5 * bf16["bytes"] < int8["bytes"] < 0.9 * bf16["bytes"]
  assert int8["limit"] == pytest.approx(int8["bytes"] / res["copy_bw"])
  assert int8["ratio"] > 0 and int8["implied_tok_s"] > 0 and int8["vs_bf16"] > 0
  assert "prefill 512" in {w for w, _ in rows} and "int8" in stdout and "x bf16" in stdout


@pytest.mark.slow  # ~2 min on 2 cores
def test_int8_spd_loop(tmp_path):
  res, _ = _run(tmp_path, "--weights", "bf16,int8", "--routing", "uniform", "--only-spd")
  rows = _int8_rows(res["rows"])
  assert rows["spd loop", "int8"]["forwards"] > 0 and rows["spd loop", "int8"]["vs_bf16"] > 0
  assert rows["spd loop", "bf16"]["forwards_per_s"] > 0


@pytest.mark.slow  # ~15 s on 2 cores
def test_attention_rows_side_by_side(tmp_path):
  """--attention times each implementation as its own rows (off the GPU, cudnn falls back to XLA's attention)."""
  res, stdout = _run(tmp_path, "--attention", "xla,cudnn", "--routing", "uniform", "--no-spd", "--no-prefill")
  assert {r["attention"] for r in res["rows"]} == {"xla", "cudnn"}
  assert all(r["ratio"] > 0 for r in res["rows"]) and "cudnn" in stdout


def test_bad_attention_is_a_one_line_error():
  assert "--attention" in _usage_error("--attention", "xla,flash")
