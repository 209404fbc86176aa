"""Hugging Face checkpoint loading: layouts and one-line errors for bad checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dmax_jax
from dmax_jax.checkpoints.hf import CheckpointError


def _copy(tiny_dir, tmp_path, name="ckpt"):
  out = tmp_path / name
  out.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(tiny_dir, f), out / f)
  return out


def _rewrite(path, edit):
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"))


def _one_line(err):
  msg = str(err.value)
  assert "\n" not in msg
  return msg


def test_sharded_and_merged_layouts_load_identically(tiny_dir, tiny, tmp_path):
  cfg, params = tiny
  for kw, name in [(dict(shard_bytes=200_000), "sharded"), (dict(merged_experts=True), "merged")]:
    dmax_jax.save_hf_checkpoint(params, cfg, str(tmp_path / name), **kw)
    _, got = dmax_jax.load_hf_checkpoint(str(tmp_path / name))
    for a, b in zip(jax_leaves(got), jax_leaves(params)):
      np.testing.assert_array_equal(a, b)
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_missing_tensor(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  _rewrite(p, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'" in _one_line(e)


def test_unexpected_tensor(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  _rewrite(p, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in _one_line(e)


def test_wrong_shape(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  _rewrite(p, lambda t: t.update({"model.norm.weight": np.ones((63,), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "'model.norm.weight' has shape (63,), expected (64,)" in _one_line(e)


def test_not_llada2_config(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  cfg = json.loads((p / "config.json").read_text())
  cfg["model_type"] = "llama"
  (p / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "config.json: model_type 'llama' is not LLaDA2-MoE" in _one_line(e)
  del cfg["model_type"]
  cfg["model_type"] = "llada2_moe"
  del cfg["num_experts"]
  (p / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "missing key 'num_experts'" in _one_line(e)


def test_pickle_checkpoint_is_refused(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  os.remove(p / "model.safetensors")
  (p / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  msg = _one_line(e)
  assert "pytorch_model.bin" in msg and "convert it to safetensors" in msg


def test_garbage_file_is_not_readable(tiny_dir, tmp_path):
  p = _copy(tiny_dir, tmp_path)
  (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(CheckpointError) as e:
    dmax_jax.load_hf_checkpoint(str(p))
  assert "model.safetensors: not a readable safetensors file" in _one_line(e)
