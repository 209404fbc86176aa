"""Hugging Face LLaDA2-MoE checkpoints: the key table, a lazy safetensors reader, loading.

The table maps every parameter leaf slice of ``params.py`` to one Hugging Face
tensor name, with whether it is transposed (PyTorch ``[out, in]`` vs our
``[in, out]``). Loading, streaming conversion and export all walk this one
table, so the two layouts can never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model.config import ConfigError, ModelConfig, load_hf_config
from dmax_jax.model.params import is_shape, layer_shapes, param_shapes

SUPPORTED_DTYPES = ("F32", "F16", "BF16", "F64")
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and where it goes: ``params[leaf[0]][leaf[1]][index]``."""

  hf_name: str
  leaf: tuple[str, ...]
  index: tuple[int, ...]  # (layer,) or (layer, expert) within the stacked leaf; () for top-level leaves
  transpose: bool
  shape: tuple[int, ...]  # the HF tensor's shape


_ATTN = {
    "attn_norm": ("input_layernorm.weight", False),
    "qkv": ("attention.query_key_value.weight", True),
    "q_norm": ("attention.query_layernorm.weight", False),
    "k_norm": ("attention.key_layernorm.weight", False),
    "o": ("attention.dense.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
}
_DENSE = {
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_MOE = {
    "router": ("mlp.gate.weight", True),
    "expert_bias": ("mlp.gate.expert_bias", False),
    "shared_gate": ("mlp.shared_experts.gate_proj.weight", True),
    "shared_up": ("mlp.shared_experts.up_proj.weight", True),
    "shared_down": ("mlp.shared_experts.down_proj.weight", True),
}
_EXPERT = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


def _hf_shape(shape, transpose):
  return tuple(reversed(shape)) if transpose else tuple(shape)


def weight_table(cfg: ModelConfig, merged_experts: bool = False) -> list[Entry]:
  """Every HF tensor of the checkpoint, in file order (layer by layer).

  ``merged_experts``: experts stored as ``mlp.experts.{gate,up,down}_proj``
  ``[E, out, in]`` (dFactory's layout) instead of one tensor per expert.
  """
  entries = [Entry("model.word_embeddings.weight", ("embed",), (), False, (cfg.vocab_size, cfg.hidden_size))]
  for i in range(cfg.num_hidden_layers):
    kind = "dense" if i < cfg.first_k_dense_replace else "moe"
    j = i if kind == "dense" else i - cfg.first_k_dense_replace
    shapes = layer_shapes(cfg, kind)
    prefix = f"model.layers.{i}."
    table = dict(_ATTN)
    table.update(_DENSE if kind == "dense" else {k: v for k, v in _MOE.items() if k in shapes})
    for leaf, (name, t) in table.items():
      entries.append(Entry(prefix + name, (kind, leaf), (j,), t, _hf_shape(shapes[leaf], t)))
    if kind == "moe":
      for leaf, proj in _EXPERT.items():
        per_expert = shapes[leaf][1:]
        if merged_experts:
          hf = (cfg.num_experts,) + _hf_shape(per_expert, True)
          entries.append(Entry(f"{prefix}mlp.experts.{proj}", (kind, leaf), (j,), True, hf))
        else:
          for e in range(cfg.num_experts):
            entries.append(
                Entry(f"{prefix}mlp.experts.{e}.{proj}.weight", (kind, leaf), (j, e), True, _hf_shape(per_expert, True))
            )
  entries.append(Entry("model.norm.weight", ("final_norm",), (), False, (cfg.hidden_size,)))
  entries.append(Entry("lm_head.weight", ("lm_head",), (), True, (cfg.vocab_size, cfg.hidden_size)))
  return entries


def to_hf_layout(entry: Entry, value: np.ndarray) -> np.ndarray:
  """Our slice -> the HF tensor (transposing the last two axes where needed)."""
  return np.swapaxes(value, -1, -2) if entry.transpose else value


from_hf_layout = to_hf_layout  # the HF tensor -> our slice: the same swap undoes itself


def _read_header(fpath):
  """(data start, {tensor name: info}) of a safetensors file, checked for size and dtypes."""
  size = os.path.getsize(fpath)
  try:
    with open(fpath, "rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      if header_len <= 0 or 8 + header_len > size:
        raise ValueError(f"header length {header_len} does not fit in {size} bytes")
      header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from None
  if size < 8 + header_len + end:
    raise CheckpointError(f"{fpath}: truncated ({size} bytes, header needs {8 + header_len + end})")
  for name, info in header.items():
    if info.get("dtype") not in SUPPORTED_DTYPES:
      raise CheckpointError(f"{fpath}: tensor {name!r} has unsupported dtype {info.get('dtype')} (need one of {SUPPORTED_DTYPES})")
  return 8 + header_len, header


class SafetensorsReader:
  """Lazily reads tensors from one safetensors file or an index of shards.

  Nothing is read until ``get``; each call returns one tensor as a NumPy
  array, so a caller can stream a checkpoint tensor by tensor.
  """

  def __init__(self, path: str):
    if not os.path.isdir(path):
      raise CheckpointError(f"{path}: no such checkpoint directory")
    files = sorted(os.listdir(path))
    index_path = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    self.path = path
    self._layout: dict[str, tuple[int, dict]] = {}  # shard -> (data start, header)
    self._where: dict[str, str] = {}
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
      shard_names = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      shard_names = ["model.safetensors"]
      weight_map = None
    else:
      pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
      if pickled:
        raise CheckpointError(
            f"{os.path.join(path, pickled[0])}: pickle-based PyTorch checkpoints are not read (unsafe);"
            " convert it to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
      shards = [f for f in files if f.endswith(".safetensors")]
      if not shards:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
      shard_names, weight_map = shards, None
    for shard in shard_names:
      fpath = os.path.join(path, shard)
      if not os.path.exists(fpath):
        raise CheckpointError(f"{fpath}: shard named in {os.path.basename(index_path)} is missing")
      self._layout[shard] = _read_header(fpath)
      for name in self._layout[shard][1]:
        self._where[name] = shard
    if weight_map is not None:
      for name, shard in weight_map.items():
        if self._where.get(name) != shard:
          raise CheckpointError(f"{os.path.join(path, shard)}: tensor {name!r} named in the index is not in it")

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def file_of(self, name: str) -> str:
    return os.path.join(self.path, self._where[name])

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"{self.path}: missing tensor {name!r}")
    start, header = self._layout[self._where[name]]
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = np.dtype(_NP_DTYPES[info["dtype"]])
    # Plain reads, not safetensors' mmap: mapped pages stay resident and would grow with the files.
    with open(self.file_of(name), "rb") as f:
      f.seek(start + begin)
      data = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
    return data.reshape(info["shape"])


def detect_merged_experts(cfg: ModelConfig, names) -> bool:
  if cfg.num_moe_layers == 0:
    return False
  i = cfg.first_k_dense_replace
  return f"model.layers.{i}.mlp.experts.gate_proj" in set(names)


def iter_checked(reader: SafetensorsReader, cfg: ModelConfig) -> Iterator[tuple[Entry, np.ndarray]]:
  """Yields (entry, tensor) for every table entry, checking names and shapes.

  Raises CheckpointError for a missing tensor, an unexpected one (checked
  first, so nothing is read from a checkpoint that cannot load), or a shape
  that is not the config's.
  """
  names = reader.names()
  table = weight_table(cfg, merged_experts=detect_merged_experts(cfg, names))
  expected = {e.hf_name for e in table}
  for name in names:
    if name not in expected:
      raise CheckpointError(f"{reader.file_of(name)}: unexpected tensor {name!r} (not part of LLaDA2-MoE with this config)")
  for e in table:
    if e.hf_name not in reader:
      raise CheckpointError(f"{reader.path}: missing tensor {e.hf_name!r}")
  for e in table:
    t = reader.get(e.hf_name)
    if tuple(t.shape) != e.shape:
      raise CheckpointError(f"{reader.file_of(e.hf_name)}: tensor {e.hf_name!r} has shape {tuple(t.shape)}, expected {e.shape}")
    yield e, t


def _get_leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def load_hf_checkpoint(path: str, dtype=jnp.float32, sharding=None, **numerics):
  """Loads a Hugging Face LLaDA2-MoE checkpoint directory -> (config, params).

  Tensors are read one at a time and written into preallocated stacked host
  arrays of ``dtype``, which are then placed on ``sharding`` (a
  ``jax.sharding.Sharding`` for every leaf or a matching pytree of them;
  None: the default device) straight from the host.
  ``numerics`` are ``ModelConfig`` run options (compute_dtype, moe_backend, ...).
  """
  try:
    cfg = load_hf_config(path, **numerics)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None
  reader = SafetensorsReader(path)
  np_dtype = np.dtype(jnp.dtype(dtype))
  host = jax.tree.map(lambda s: np.empty(s, np_dtype), param_shapes(cfg), is_leaf=is_shape)
  for e, t in iter_checked(reader, cfg):
    target = _get_leaf(host, e.leaf)
    value = from_hf_layout(e, t).astype(np_dtype)
    if e.index:
      target[e.index] = value
    else:
      target[...] = value
  params = jax.tree.map(jnp.asarray, host) if sharding is None else jax.device_put(host, sharding)
  return cfg, params


_SAFETENSORS_DTYPES = {np.dtype(v).name: k for k, v in _NP_DTYPES.items()}


def _write_safetensors(fpath: str, specs, values) -> None:
  """Writes one safetensors file streaming: the header from ``specs`` [(name, shape, dtype)]
  first, then each array of the iterable ``values`` (same order) as it arrives."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dt in specs:
    nbytes = int(np.prod(shape)) * dt.itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dt.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(fpath, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for (name, shape, dt), value in zip(specs, values, strict=True):
      if value.shape != tuple(shape) or value.dtype != dt:
        raise ValueError(f"{fpath}: {name} is {value.dtype}{value.shape}, header says {dt}{tuple(shape)}")
      f.write(np.ascontiguousarray(value).tobytes())


def _shards(table: list, nbytes, shard_bytes: int) -> list[list]:
  """``table``'s entries cut, in order, into shards of at most ``shard_bytes`` (a bigger tensor fills one alone)."""
  shards: list[list] = [[]]
  size = 0
  for e in table:
    if shards[-1] and size + nbytes(e) > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes(e)
  return shards


def _write_weights(params, table: list, out_dtype, tmp: str, shard_bytes: int) -> None:
  """The safetensors shards of ``table`` (and the index, for several) in ``tmp``, one tensor in memory at a time."""
  nbytes = lambda e: int(np.prod(e.shape)) * out_dtype(e).itemsize  # noqa: E731
  shards = _shards(table, nbytes, shard_bytes)
  n = len(shards)
  weight_map = {}

  def pull(e):
    leaf = _get_leaf(params, e.leaf)
    value = np.asarray(leaf[e.index] if e.index else leaf[...]).astype(out_dtype(e), copy=False)
    return to_hf_layout(e, value)

  for k, entries in enumerate(shards):
    fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    _write_safetensors(os.path.join(tmp, fname), [(e.hf_name, e.shape, out_dtype(e)) for e in entries],
                       (pull(e) for e in entries))
    weight_map.update({e.hf_name: fname for e in entries})
  if n > 1:
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(map(nbytes, table))}, "weight_map": weight_map}, f, indent=2)


def save_hf_checkpoint(
    params, cfg: ModelConfig, out_dir: str, *, shard_bytes: int = 5 * 10**9, merged_experts: bool = False,
    dtype=None, extra_files: Optional[dict[str, str]] = None, config: Optional[dict] = None,
):
  """Writes params as a Hugging Face checkpoint: config.json + safetensors shards.

  One ``model.safetensors`` when everything fits in ``shard_bytes``, else
  ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
  ``params`` leaves may be any array type NumPy can read slices of (device
  arrays, NumPy arrays, lazily read tensorstore views); they are pulled and
  written one HF tensor at a time, so only one tensor is ever in memory.
  The directory is written under a temporary name and renamed at the end,
  so a crash leaves no half-written checkpoint.
  ``extra_files`` maps file names to source paths copied beside the weights;
  ``config`` is the ``config.json`` to write (default ``cfg.to_hf_dict()``).
  """
  import shutil  # pylint: disable=import-outside-toplevel

  if shard_bytes <= 0:
    raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
  if os.path.exists(out_dir):
    raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
  tmp = out_dir.rstrip("/") + ".partial"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    out_dtype = lambda e: np.dtype(jnp.dtype(dtype) if dtype is not None else _get_leaf(params, e.leaf).dtype)  # noqa: E731
    _write_weights(params, weight_table(cfg, merged_experts=merged_experts), out_dtype, tmp, shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_hf_dict() if config is None else config, f, indent=2)
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
