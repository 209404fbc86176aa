"""Params checkpoints: HF -> Orbax -> HF round trips, restore, and the CLIs' errors on bad input."""

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dmax_jax.checkpoints import converted as ckpt_lib
from dmax_jax.model.config import load_hf_config
from dmax_jax.checkpoints.hf import SafetensorsReader, load_hf_checkpoint, save_hf_checkpoint
from dmax_jax.model.transformer import forward
from conftest import REPO

TOL = dict(rtol=1e-4, atol=1e-4)


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _hf_tensors(path):
  reader = SafetensorsReader(path)
  return {n: reader.get(n) for n in reader.names()}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("conv") / "ckpt")
  ckpt_lib.convert_hf(tiny_dir, out, progress=False)
  return out


def test_round_trip_is_bit_identical(tiny_dir, converted, tmp_path):
  out = str(tmp_path / "hf")
  ckpt_lib.export_hf(converted, out, progress=False)
  want, got = _hf_tensors(tiny_dir), _hf_tensors(out)
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    assert got[name].dtype == w.dtype == np.float32 and got[name].shape == w.shape, name
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  assert load_hf_config(out) == load_hf_config(tiny_dir)
  # every key of the source config.json (dtype, use_cache, ...) and its generation_config.json survive
  source = json.load(open(os.path.join(tiny_dir, "config.json")))
  assert {"dtype", "use_cache", "transformers_version"} <= set(source)
  for path in (converted, out):
    assert json.load(open(os.path.join(path, "config.json"))) == source, path
    with open(os.path.join(path, "generation_config.json"), "rb") as f, \
        open(os.path.join(tiny_dir, "generation_config.json"), "rb") as g:
      assert f.read() == g.read(), path
  bf16 = str(tmp_path / "hf_bf16")
  ckpt_lib.export_hf(converted, bf16, dtype="bfloat16", progress=False)
  assert json.load(open(os.path.join(bf16, "config.json"))) == dict(source, dtype="bfloat16")

def test_load_checkpoint_reproduces_golden_logits(converted, golden):
  cfg, params = ckpt_lib.load_checkpoint(converted)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = forward(params, cfg, tokens=golden["input_ids"], positions=golden["position_ids"])
  np.testing.assert_allclose(logits, golden["logits_full"], **TOL)


def test_load_checkpoint_onto_sharding_and_dtype(converted, tiny):
  mesh = jax.make_mesh((1,), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  cfg, params = ckpt_lib.load_checkpoint(converted, dtype=jnp.bfloat16, sharding=replicated, moe_backend="dense")
  assert cfg.moe_backend == "dense"
  for x, ref in zip(jax.tree.leaves(params), jax.tree.leaves(tiny[1])):
    assert x.sharding == replicated and x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref.astype(jnp.bfloat16)))
  # A pytree of shardings: one spec per leaf.
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  tree = jax.tree.map(lambda _: row, tiny[1])
  _, params = ckpt_lib.load_checkpoint(converted, sharding=tree)
  assert all(x.sharding == row for x in jax.tree.leaves(params))


def test_leaves_are_chunked_per_hf_tensor(converted, tiny):
  cfg = tiny[0]
  meta = json.load(open(os.path.join(converted, "params", "moe.w_gate", ".zarray")))
  assert meta["chunks"] == [1, 1, cfg.hidden_size, cfg.moe_intermediate_size]
  meta = json.load(open(os.path.join(converted, "params", "moe.qkv", ".zarray")))
  assert meta["chunks"] == [1, cfg.hidden_size, cfg.qkv_size]


def test_metadata_matches_what_orbax_writes(converted, tiny, tmp_path):
  """Our hand-written _METADATA describes the tree the way Orbax itself does."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  ref = str(tmp_path / "orbax")
  ocp.PyTreeCheckpointer(use_ocdbt=False).save(ref, tiny[1])
  ours = json.load(open(os.path.join(converted, "params", "_METADATA")))
  theirs = json.load(open(os.path.join(ref, "_METADATA")))
  assert ours["tree_metadata"].keys() == theirs["tree_metadata"].keys()
  for key, entry in theirs["tree_metadata"].items():
    assert ours["tree_metadata"][key]["key_metadata"] == entry["key_metadata"]
    assert ours["tree_metadata"][key]["value_metadata"]["value_type"] == entry["value_metadata"]["value_type"]
  for flag in ("use_ocdbt", "use_zarr3"):
    assert ours[flag] == theirs[flag]


def test_sharded_hf_input(tiny, tmp_path):
  cfg, params = tiny
  hf = str(tmp_path / "hf")
  save_hf_checkpoint(params, cfg, hf, shard_bytes=200_000)
  assert len([f for f in os.listdir(hf) if f.endswith(".safetensors")]) > 3
  ckpt_lib.convert_hf(hf, str(tmp_path / "ckpt"), progress=False)
  _assert_trees_equal(ckpt_lib.load_checkpoint(str(tmp_path / "ckpt"))[1], params)


def test_merged_expert_hf_input(tiny, tmp_path):
  cfg, params = tiny
  hf = str(tmp_path / "hf")
  save_hf_checkpoint(params, cfg, hf, merged_experts=True)
  names = SafetensorsReader(hf).names()
  assert "model.layers.1.mlp.experts.gate_proj" in names and "model.layers.1.mlp.experts.0.gate_proj.weight" not in names
  ckpt_lib.convert_hf(hf, str(tmp_path / "ckpt"), progress=False)
  _assert_trees_equal(ckpt_lib.load_checkpoint(str(tmp_path / "ckpt"))[1], params)


def test_bf16_conversion_and_export(tiny_dir, tiny, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  assert _tool("convert_hf").main(["--hf", tiny_dir, "--out", ckpt, "--dtype", "bfloat16"]) == 0
  _, params = ckpt_lib.load_checkpoint(ckpt)
  _assert_trees_equal(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny[1]))
  hf = str(tmp_path / "hf")
  assert _tool("export_hf").main(["--checkpoint", ckpt, "--out", hf]) == 0
  want = _hf_tensors(tiny_dir)
  for name, got in _hf_tensors(hf).items():
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want[name].astype(jnp.bfloat16), err_msg=name)


def test_sharded_export_and_tokenizer_files(tiny_dir, tmp_path):
  hf_in = tmp_path / "hf_in"
  shutil.copytree(tiny_dir, hf_in)
  for name in ckpt_lib.TOKENIZER_FILES[:2]:
    (hf_in / name).write_text(json.dumps({"file": name}))
  ckpt, hf_out = str(tmp_path / "ckpt"), str(tmp_path / "hf_out")
  ckpt_lib.convert_hf(str(hf_in), ckpt, progress=False)
  assert _tool("export_hf").main(["--checkpoint", ckpt, "--out", hf_out, "--shard-size", "300KB"]) == 0
  files = sorted(os.listdir(hf_out))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 1 and all(f.startswith("model-") and f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
  for f in shards:
    assert os.path.getsize(os.path.join(hf_out, f)) <= 300_000 + 10_000  # shard bytes + header
  index = json.load(open(os.path.join(hf_out, "model.safetensors.index.json")))
  assert set(index["weight_map"].values()) == set(shards)
  for name in ckpt_lib.TOKENIZER_FILES[:2]:
    assert json.load(open(os.path.join(ckpt, name))) == json.load(open(os.path.join(hf_out, name))) == {"file": name}
  assert "special_tokens_map.json" not in files
  want, got = _hf_tensors(tiny_dir), _hf_tensors(hf_out)
  assert sorted(got) == sorted(want) and all(np.array_equal(got[n], want[n]) for n in want)


def test_save_checkpoint_from_memory(tiny, golden, tmp_path):
  cfg, params = tiny
  path = str(tmp_path / "final")
  ckpt_lib.save_checkpoint(jax.tree.map(jnp.asarray, params), cfg, path)
  cfg2, params2 = ckpt_lib.load_checkpoint(path)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  with pytest.raises(ckpt_lib.CheckpointError, match="already exists"):
    ckpt_lib.save_checkpoint(params, cfg, path)
  bad = dict(params, final_norm=params["final_norm"][:-1])
  with pytest.raises(ckpt_lib.CheckpointError, match="final_norm has shape"):
    ckpt_lib.save_checkpoint(bad, cfg, str(tmp_path / "bad"))
  assert sorted(os.listdir(tmp_path)) == ["final"]


# ---- bad input: one-line error, exit 2, nothing half-written ----

def _run_cli(tool, args):
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *args],
                        capture_output=True, text=True, timeout=120)


def _rewrite(src, dst, edit):
  """Copies the HF checkpoint src to dst with its tensors passed through ``edit(dict)``."""
  os.makedirs(dst)
  shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
  save_file(edit(_hf_tensors(src)), os.path.join(dst, "model.safetensors"))


def _bad_inputs(tiny_dir, tiny, root):
  cases = {"missing": (str(root / "nope"), "no such checkpoint directory")}
  trunc = root / "trunc"
  shutil.copytree(tiny_dir, trunc)
  data = (trunc / "model.safetensors").read_bytes()
  os.chmod(trunc / "model.safetensors", 0o644)
  (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
  cases["truncated"] = (str(trunc / "model.safetensors"), "truncated (")
  shard = root / "shard"
  save_hf_checkpoint(tiny[1], tiny[0], str(shard), shard_bytes=300_000)
  os.remove(shard / "model-00002-of-00005.safetensors")
  cases["shard"] = (str(shard / "model-00002-of-00005.safetensors"), "missing")
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  _rewrite(tiny_dir, root / "shape", lambda t: t | {name: t[name][:, :-1].copy()})
  cases["shape"] = (str(root / "shape" / "model.safetensors"), "has shape")
  _rewrite(tiny_dir, root / "int8", lambda t: t | {name: t[name].astype(np.int8)})
  cases["int8"] = (str(root / "int8" / "model.safetensors"), "unsupported dtype I8")
  return cases


def test_convert_bad_input_errors(tiny_dir, tiny, tmp_path):
  cases = _bad_inputs(tiny_dir, tiny, tmp_path / "in")
  for case, (path, problem) in cases.items():
    hf = path if os.path.isdir(path) or case == "missing" else os.path.dirname(path)
    out = tmp_path / f"out_{case}"
    r = _run_cli("convert_hf", ["--hf", hf, "--out", str(out)])
    assert r.returncode == 2, (case, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if not l.startswith("convert:")]  # minus the progress bar
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and problem in lines[0], (case, r.stderr)
    assert not out.exists() and not (tmp_path / f"out_{case}.partial").exists(), case


def test_convert_refuses_existing_checkpoint(tiny_dir, converted):
  before = sorted(os.listdir(converted))
  r = _run_cli("convert_hf", ["--hf", tiny_dir, "--out", converted])
  assert r.returncode == 2 and r.stderr.strip() == f"error: {converted}: already exists and is not empty; choose a new output directory"
  assert sorted(os.listdir(converted)) == before and not os.path.exists(converted + ".partial")


def test_export_bad_input_errors(tiny_dir, converted, tmp_path):
  r = _run_cli("export_hf", ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such checkpoint directory"
  r = _run_cli("export_hf", ["--checkpoint", tiny_dir, "--out", str(tmp_path / "o")])
  assert r.returncode == 2 and "not a params checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  r = _run_cli("export_hf", ["--checkpoint", converted, "--out", tiny_dir])
  assert r.returncode == 2 and r.stderr.strip() == f"error: {tiny_dir}: already exists; choose a new output directory"
  assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.partial")


def _error_lines(err: str, progress: str) -> list[str]:
  """stderr minus the progress bar's lines (tqdm redraws with carriage returns)."""
  assert "Traceback" not in err and "WARNING" not in err, err
  return [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not l.startswith(progress)]


def broken_copies(converted, root) -> dict:
  """Damaged copies of a params checkpoint: {case: (directory, the file the error must name)}."""
  cases = {}
  for case in ("chunk", "metadata", "zarray"):
    bad = root / case
    shutil.copytree(converted, bad)
    if case == "chunk":
      victim = bad / "params" / "moe.w_up" / "0.3.0.0"
      victim.write_bytes(b"garbage")
    elif case == "metadata":
      victim = bad / "params" / "_METADATA"
      victim.write_bytes(victim.read_bytes()[:100])
    else:
      victim = bad / "params" / "embed" / ".zarray"
      victim.write_text('{"shape": [')
    cases[case] = (str(bad), str(victim))
  return cases


def test_broken_checkpoints_give_one_line_on_export(converted, tmp_path, capsys):
  export = _tool("export_hf")
  for case, (path, victim) in broken_copies(converted, tmp_path / "in").items():
    out = tmp_path / f"out_{case}"
    assert export.main(["--checkpoint", path, "--out", str(out)]) == 2, case
    (line,) = _error_lines(capsys.readouterr().err, "export:")
    assert line.startswith("error: ") and victim in line, (case, line)
    assert not out.exists() and not (tmp_path / f"out_{case}.partial").exists(), case
  assert export.main(["--checkpoint", converted, "--out", str(tmp_path / "o"), "--shard-size", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --shard-size must be positive, got 0 bytes"
  assert not (tmp_path / "o").exists()


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_convert_and_export(tiny_dir, converted, tmp_path, capsys, monkeypatch):
  """A write that fails (ENOSPC) gives one line and exit 1, and leaves neither the output nor its staging copy."""
  from dmax_jax.checkpoints import hf  # pylint: disable=import-outside-toplevel

  calls = []
  real_write = ckpt_lib.ParamsWriter.write

  def fill_up(self, *args):
    calls.append(1)
    if len(calls) > 3:
      _disk_full()
    return real_write(self, *args)

  monkeypatch.setattr(ckpt_lib.ParamsWriter, "write", fill_up)
  out = tmp_path / "ckpt"
  assert _tool("convert_hf").main(["--hf", tiny_dir, "--out", str(out)]) == 1
  (line,) = _error_lines(capsys.readouterr().err, "convert:")
  assert line == f"error: {out}: No space left on device; nothing was written to {out}"
  assert sorted(os.listdir(tmp_path)) == []

  real_shard = hf._write_safetensors

  def half_shard(fpath, specs, values):
    if calls.count(2) >= 1:
      with open(fpath, "wb") as f:
        f.write(b"half a shard")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fpath)
    calls.append(2)
    return real_shard(fpath, specs, values)

  monkeypatch.setattr(hf, "_write_safetensors", half_shard)
  out = tmp_path / "hf"
  assert _tool("export_hf").main(["--checkpoint", converted, "--out", str(out), "--shard-size", "300KB"]) == 1
  (line,) = _error_lines(capsys.readouterr().err, "export:")
  assert line.startswith(f"error: {out}.partial/model-00002-of-") and line.endswith(
      f": No space left on device; nothing was written to {out}")
  assert sorted(os.listdir(tmp_path)) == []


def test_load_checkpoint_errors(tmp_path, converted):
  with pytest.raises(ckpt_lib.CheckpointError, match="no such checkpoint directory"):
    ckpt_lib.load_checkpoint(str(tmp_path / "nope"))
  bad = tmp_path / "bad"
  shutil.copytree(converted, bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["num_hidden_layers"] = 4
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ckpt_lib.CheckpointError, match="does not match config.json"):
    ckpt_lib.load_checkpoint(str(bad))


def test_streamed_safetensors_match_the_library_reader(tiny, tmp_path):
  """save_hf_checkpoint's own safetensors writer produces files the safetensors library reads."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  cfg, params = tiny
  save_hf_checkpoint(params, cfg, str(tmp_path / "hf"), dtype=jnp.bfloat16)
  ref = load_hf_checkpoint(str(tmp_path / "hf"))[1]
  _assert_trees_equal(ref, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params))
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"}
    np.testing.assert_array_equal(f.get_tensor("model.norm.weight"), np.asarray(params["final_norm"]).astype(jnp.bfloat16))


@pytest.mark.slow
def test_conversion_memory_does_not_grow_with_layers(tmp_path):
  """Peak RSS of convert/export stays flat from 2 to 12 layers (tools/bench_convert_memory.py, scaled down)."""
  bench = _tool("bench_convert_memory")
  model = ["--hidden", "512", "--experts", "32", "--expert-width", "256"]
  small, large = (bench.bench(n, str(tmp_path), model) for n in (2, 12))
  grown = large["hf_gib"] - small["hf_gib"]
  assert grown > 0.2
  for key in ("convert_rss", "export_rss"):
    assert large[key] - small[key] < 0.1 * grown, (key, small, large)


def test_load_any_reads_both_formats(tiny_dir, converted, tiny):
  from dmax_jax.checkpoints.converted import is_converted, load_any

  assert is_converted(converted) and not is_converted(tiny_dir)
  cfg_a, a = load_any(converted)
  cfg_b, b = load_any(tiny_dir, compute_dtype="bfloat16")
  assert cfg_a == tiny[0] and cfg_b.compute_dtype == "bfloat16"
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(tiny[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
