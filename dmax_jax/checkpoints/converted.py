"""Params-only checkpoints: streaming Hugging Face conversion, restore, export.

A converted checkpoint is a directory

  CKPT/config.json        the model config (Hugging Face ``config.json`` keys)
  CKPT/params/            an Orbax PyTree checkpoint of the parameter tree
  CKPT/tokenizer*.json    tokenizer files copied from the source, if any

``params/`` uses Orbax's non-OCDBT layout: ``_METADATA`` plus one zarr (v2,
zstd) array per leaf, named by its dotted key path (``moe.w_gate``). Each
array is chunked by HF tensor: one chunk per layer (and per expert) slice, so
conversion can write, and export can read, one Hugging Face tensor at a time.
Conversion therefore never holds more than a few tensors in memory however
many layers there are, and ``orbax.checkpoint`` restores the result like any
checkpoint it wrote itself. ``load_checkpoint`` checks the tree against
Orbax's metadata and reads each leaf with tensorstore straight onto a device
sharding, so that a damaged chunk is one clean error naming its leaf.

Everything is written under ``CKPT.partial`` and renamed at the end, so a
failure leaves no half-written checkpoint behind.

An int8 checkpoint (``convert_hf(..., quantize="int8")``, or ``save_checkpoint``
of params holding ``quant.Int8Weight``s) stores each quantized weight as two
leaves, ``moe.w_gate.values`` (int8) and ``moe.w_gate.scale`` (float32), and
names them in config.json's ``dmax_quantization`` entry; ``load_checkpoint``
returns them as ``Int8Weight``s again.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model import quant
from dmax_jax.model.config import ConfigError, ModelConfig, load_hf_config
from dmax_jax.checkpoints.hf import (
    CheckpointError, SafetensorsReader, from_hf_layout, iter_checked, load_hf_checkpoint, save_hf_checkpoint,
    weight_table,
)
from dmax_jax.model.params import is_shape, param_shapes
from dmax_jax.progress import ReporterFactory, reporter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)  # copied through conversion and export unchanged
DTYPE_KEYS = ("dtype", "torch_dtype")  # Hugging Face's name for the stored dtype (new and old transformers)
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
MAX_CHUNK_BYTES = 64 * 2**20  # split chunks of big top-level leaves (embed, lm_head) below this
_PENDING_WRITES = 4  # tensors in flight while converting (overlaps reading with compressing)


def _leaf_paths(cfg: ModelConfig, quantization: Optional[dict] = None) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every stored leaf's key path -> its full shape (a quantized weight: its ``values`` and ``scale`` leaves)."""
  flat, _ = jax.tree.flatten_with_path(_stored_shapes(cfg, quantization), is_leaf=is_shape)
  return {tuple(k.key for k in path): shape for path, shape in flat}


def _stored_shapes(cfg: ModelConfig, quantization: Optional[dict] = None) -> dict:
  """``param_shapes`` with each quantized weight's shape replaced by ``{"values": shape, "scale": shape}``."""
  shapes = param_shapes(cfg)
  for name in (quantization or {}).get("leaves", ()):
    *parents, last = name.split(".")
    node = shapes
    for k in parents:
      node = node[k]
    node[last] = {"values": quant.values_shape(node[last]),
                  "scale": quant.scale_shape(node[last], quantization["group_size"])}
  return shapes


def _leaf_dtypes(cfg: ModelConfig, dtype, quantization: Optional[dict] = None) -> dict[tuple[str, ...], np.dtype]:
  """Every stored leaf's dtype: int8 values, float32 scales, ``dtype`` for the rest."""
  special = {"values": np.dtype(np.int8), "scale": np.dtype(np.float32)} if quantization else {}
  return {leaf: special.get(leaf[-1], np.dtype(dtype)) for leaf in _leaf_paths(cfg, quantization)}


def read_quantization(path: str) -> Optional[dict]:
  """The ``dmax_quantization`` entry of a checkpoint's config.json (None: not quantized), checked."""
  config = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
  try:
    with open(config) as f:
      spec = json.load(f).get(quant.CONFIG_KEY)
  except (OSError, ValueError, AttributeError):
    return None  # reported by the config loader
  if spec is None:
    return None
  if (not isinstance(spec, dict) or spec.get("method") not in quant.METHODS or not isinstance(spec.get("leaves"), list)
      or not (spec.get("group_size") is None or isinstance(spec.get("group_size"), int))):
    raise CheckpointError(f"{config}: {quant.CONFIG_KEY} must be {{\"method\": one of {quant.METHODS}, "
                          f"\"group_size\": null or an int, \"leaves\": [...]}}, got {spec!r}")
  if spec.get("values_layout") != quant.VALUES_LAYOUT:
    raise CheckpointError(f"{config}: int8 values stored in the earlier [K, N] layout (no \"values_layout\": "
                          f"\"{quant.VALUES_LAYOUT}\"); convert the checkpoint again with this version")
  return spec


def chunk_shapes(cfg: ModelConfig, dtype, quantization: Optional[dict] = None) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The zarr chunk of every leaf: one Hugging Face tensor (separate-expert layout).

  Stacked leaves get ``(1, [1,] *rest)`` (one layer, one expert); top-level
  leaves are split along their first axis to stay under ``MAX_CHUNK_BYTES``.
  """
  depth = collections.defaultdict(int)
  for e in weight_table(cfg, merged_experts=False):
    depth[e.leaf] = max(depth[e.leaf], len(e.index))
  itemsize = np.dtype(dtype).itemsize
  out = {}
  for leaf, shape in _leaf_paths(cfg, quantization).items():
    if leaf[-1] in ("values", "scale") and leaf[:-1] in depth:
      depth[leaf] = depth[leaf[:-1]]  # a quantized weight's leaves: chunked as the weight
    chunk = (1,) * depth[leaf] + shape[depth[leaf]:]
    if depth[leaf] == 0 and len(shape) > 1:
      row_bytes = math.prod(shape[1:]) * itemsize
      chunk = (max(1, min(shape[0], MAX_CHUNK_BYTES // row_bytes)),) + shape[1:]
    out[leaf] = chunk
  return out


def _zarr_dtype(dtype) -> str:
  dtype = np.dtype(dtype)
  return "bfloat16" if dtype == jnp.bfloat16 else dtype.str


def _leaf_spec(params_dir: str, leaf: tuple[str, ...]) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(params_dir, ".".join(leaf))}}


class ParamsWriter:
  """Creates the zarr leaves of an Orbax params checkpoint and writes them slice by slice.

  ``write(leaf, index, value)`` stores ``value`` at ``params[leaf][index]``;
  at most ``_PENDING_WRITES`` writes are in flight. ``finish()`` waits for
  them and writes Orbax's ``_METADATA``, after which ``ocp`` can restore it.
  """

  def __init__(self, params_dir: str, cfg: ModelConfig, dtype, quantization: Optional[dict] = None):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    self.dir = params_dir
    self.dtype = np.dtype(dtype)
    self.dtypes = _leaf_dtypes(cfg, self.dtype, quantization)
    self._pending = collections.deque()
    os.makedirs(params_dir, exist_ok=True)
    chunks = chunk_shapes(cfg, self.dtype, quantization)
    self.arrays = {}
    for leaf, shape in _leaf_paths(cfg, quantization).items():
      spec = _leaf_spec(params_dir, leaf)
      spec["metadata"] = {
          "shape": list(shape), "chunks": list(chunks[leaf]), "dtype": _zarr_dtype(self.dtypes[leaf]),
          "compressor": {"id": "zstd", "level": 1},
      }
      self.arrays[leaf] = ts.open(spec, create=True).result()

  def write(self, leaf: tuple[str, ...], index: tuple[int, ...], value) -> None:
    value = np.asarray(value, self.dtypes[leaf])
    target = self.arrays[leaf][index] if index else self.arrays[leaf]
    if tuple(target.shape) != value.shape:
      raise CheckpointError(f"{self.dir}: {'.'.join(leaf)}{list(index)} needs shape {tuple(target.shape)}, got {value.shape}")
    self._pending.append((target.write(value), leaf, value))  # the value stays alive until written
    while len(self._pending) > _PENDING_WRITES:
      self._wait_one()

  def _wait_one(self) -> None:
    future, leaf, _ = self._pending.popleft()
    try:
      future.result()
    except ValueError as e:  # tensorstore reports I/O failures (a full disk) as ValueError
      raise OSError(0, f"cannot write ({str(e).splitlines()[0]})", os.path.join(self.dir, ".".join(leaf))) from None

  def __enter__(self) -> "ParamsWriter":
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:  # let writes still in flight land before the staging directory is removed
      for future, _, _ in self._pending:
        try:
          future.result()
        except Exception:  # pylint: disable=broad-except
          pass
      self._pending.clear()
    return False

  def finish(self) -> None:
    while self._pending:
      self._wait_one()
    tree = {}
    for leaf in self.arrays:
      tree[str(leaf)] = {
          "key_metadata": [{"key": k, "key_type": 2} for k in leaf],  # 2 = dict key
          "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
      }
    metadata = {
        "tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None,
    }
    with open(os.path.join(self.dir, "_METADATA"), "w") as f:
      json.dump(metadata, f)


class _Staging:
  """``with _Staging(out) as tmp:`` writes into ``out.partial``, renamed to ``out`` on success."""

  def __init__(self, out_dir: str):
    out_dir = out_dir.rstrip("/")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
      raise CheckpointError(f"{out_dir}: already exists and is not empty; choose a new output directory")
    self.out, self.tmp = out_dir, out_dir + ".partial"

  def __enter__(self) -> str:
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      if os.path.isdir(self.out):
        os.rmdir(self.out)  # empty (checked above)
      os.rename(self.tmp, self.out)
    else:
      shutil.rmtree(self.tmp, ignore_errors=True)
    return False


def _side_files(src_dir: Optional[str]) -> dict[str, str]:
  """The tokenizer and generation-config files of ``src_dir`` that exist: {name: path}."""
  paths = {name: os.path.join(src_dir, name) for name in SIDE_FILES} if src_dir else {}
  return {name: p for name, p in paths.items() if os.path.isfile(p)}


def _copy_side_files(src_dir: Optional[str], dst_dir: str) -> None:
  for name, path in _side_files(src_dir).items():
    shutil.copyfile(path, os.path.join(dst_dir, name))


def hf_config_dict(cfg: ModelConfig, source: Optional[str] = None, dtype=None) -> dict:
  """The ``config.json`` to write for ``cfg``: the source's keys kept (``dtype``, ``use_cache``, ``auto_map``...),
  the architecture's filled in where the source lacks them; ``dtype`` (if given) updates the stored-dtype key."""
  out = cfg.to_hf_dict()
  if source is not None:
    path = os.path.join(source, CONFIG_FILE) if os.path.isdir(source) else source
    with open(path) as f:
      out.update(json.load(f))  # parsed into cfg already, so the architecture keys agree
  if dtype is not None:
    for key in [k for k in DTYPE_KEYS if k in out] or ["torch_dtype"]:
      out[key] = jnp.dtype(dtype).name
  return out


def _write_config(config: dict, out_dir: str) -> None:
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def _load_config(path: str, **numerics) -> ModelConfig:
  try:
    return load_hf_config(path, **numerics)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None


def _write_tensor(writer, leaf, index, value, quantized: bool, group_size: Optional[int]) -> None:
  """One converted tensor into its leaf; an int8 leaf's values and scales into their two leaves."""
  if quantized:
    q = quant.quantize(np.asarray(value, np.float32), group_size)
    writer.write(leaf + ("values",), index, q.values)
    writer.write(leaf + ("scale",), index, q.scale)
  else:
    writer.write(leaf, index, value)


def convert_hf(hf_dir: str, out_dir: str, dtype=jnp.float32, progress: Optional[ReporterFactory] = None,
               quantize: Optional[str] = None, group_size: Optional[int] = None) -> ModelConfig:
  """Hugging Face checkpoint directory -> params checkpoint, one tensor at a time.

  Every tensor's name and shape is checked (``iter_checked``) and written
  into its slice of the stacked leaf; peak memory is a few tensors (the
  largest being the embedding), independent of the number of layers.
  ``progress``: a reporter factory (``dmax_jax.progress``), None for none.
  ``quantize="int8"`` stores the routed and shared experts (``quant.QUANTIZED``)
  as int8 with per-output-channel scales (``group_size``: per group of that
  many rows along the contraction), each tensor quantized as it is read.
  """
  staging = _Staging(out_dir)
  reader = SafetensorsReader(hf_dir)  # checks the directory, the index, every shard's size and dtypes
  cfg = _load_config(hf_dir)
  spec = _quantization_spec(cfg, quantize, group_size)
  quantized = {tuple(name.split(".")) for name in (spec or {}).get("leaves", ())}
  with staging as tmp:
    with ParamsWriter(os.path.join(tmp, PARAMS_DIR), cfg, jnp.dtype(dtype), spec) as writer:
      with reporter(progress, total=len(reader.names()), desc="convert", unit="tensor") as bar:
        for e, tensor in iter_checked(reader, cfg):
          _write_tensor(writer, e.leaf, e.index, from_hf_layout(e, tensor), e.leaf in quantized, group_size)
          bar.update(1)
      writer.finish()
    _write_config(_with_quantization(hf_config_dict(cfg, hf_dir), spec), tmp)
    _copy_side_files(hf_dir, tmp)
  return cfg


def _with_quantization(config: dict, spec: Optional[dict]) -> dict:
  """``config.json``'s dict with the int8 spec under ``quant.CONFIG_KEY`` (unchanged for float weights)."""
  return dict(config, **{quant.CONFIG_KEY: spec}) if spec else config


def _quantization_spec(cfg: ModelConfig, method: Optional[str], group_size: Optional[int]) -> Optional[dict]:
  """The config.json entry for quantizing ``cfg``'s experts with ``method`` (None: no quantization)."""
  if method is None:
    if group_size is not None:
      raise CheckpointError("a quantization group size needs a quantization method (int8)")
    return None
  if method not in quant.METHODS:
    raise CheckpointError(f"quantization must be one of {quant.METHODS}, got {method!r}")
  moe = param_shapes(cfg).get("moe", {})
  leaves = [k for k in quant.QUANTIZED if k in moe]
  for k in leaves:
    try:
      quant.scale_shape(moe[k][1:], group_size)
    except ValueError as e:
      raise CheckpointError(f"moe.{k}: {e}") from None
  return {"method": method, "group_size": group_size, "leaves": [f"moe.{k}" for k in leaves],
          "values_layout": quant.VALUES_LAYOUT}


def save_checkpoint(params, cfg: ModelConfig, path: str, tokenizer_dir: Optional[str] = None, dtype=None) -> None:
  """Writes in-memory params (device or host arrays) as a params checkpoint.

  The layout is ``convert_hf``'s; leaves are pulled to the host one layer
  slice at a time and stored in ``dtype`` (default: the params' dtype). Single-process only (any number of local devices); use
  ``train_checkpoint`` for multi-host training state.
  """
  if jax.process_count() > 1:
    raise CheckpointError(f"{path}: save_checkpoint writes from one process; use train_checkpoint on multi-host runs")
  try:
    spec = quant.spec_of(params)  # int8 weights are stored as they are (values and scales), whatever ``dtype``
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None
  want = _leaf_paths(cfg, spec)
  flat, _ = jax.tree.flatten_with_path(params)
  leaves = {tuple(k.key for k in p): x for p, x in flat}
  if set(leaves) != set(want):
    raise CheckpointError(f"{path}: params do not match the config (leaves {sorted(set(leaves) ^ set(want))})")
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(jax.tree.leaves(params)[0].dtype)
  with _Staging(path) as tmp:
    with ParamsWriter(os.path.join(tmp, PARAMS_DIR), cfg, dtype, spec) as writer:
      for leaf, x in leaves.items():
        if tuple(x.shape) != want[leaf]:
          raise CheckpointError(f"{path}: params leaf {'.'.join(leaf)} has shape {tuple(x.shape)}, expected {want[leaf]}")
        if len(x.shape) > 1 and leaf[0] in ("dense", "moe"):
          for j in range(x.shape[0]):
            writer.write(leaf, (j,), np.asarray(x[j]))
        else:
          writer.write(leaf, (), np.asarray(x))
      writer.finish()
    _write_config(_with_quantization(hf_config_dict(cfg), spec), tmp)
    _copy_side_files(tokenizer_dir, tmp)


def _check_dir(path: str) -> None:
  """A params checkpoint directory whose ``_METADATA`` is readable JSON (else CheckpointError)."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint directory")
  metadata = os.path.join(path, PARAMS_DIR, "_METADATA")
  if not os.path.exists(metadata):
    raise CheckpointError(f"{path}: not a params checkpoint (no {PARAMS_DIR}/_METADATA)")
  try:
    with open(metadata) as f:
      tree = json.load(f).get("tree_metadata")
  except (ValueError, AttributeError, OSError) as e:
    raise CheckpointError(f"{metadata}: not a readable Orbax metadata file ({e})") from None
  if not isinstance(tree, dict):
    raise CheckpointError(f"{metadata}: not a readable Orbax metadata file (no tree_metadata)")


def _store_problem(e: BaseException) -> str:
  """The first line of a tensorstore/Orbax read error (Orbax wraps the one that names the file)."""
  e = e.__cause__ or e
  if not str(e):
    return type(e).__name__
  return str(e).splitlines()[0].split(" [tensorstore_spec=")[0].removeprefix("FAILED_PRECONDITION: ")


def _broadcast_sharding(sharding, shapes):
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: sharding, shapes, is_leaf=is_shape)
  return sharding


def is_converted(path: str) -> bool:
  """Whether ``path`` is a converted (Orbax params) checkpoint rather than a Hugging Face directory."""
  return os.path.isdir(os.path.join(path, PARAMS_DIR))


def load_any(path: str, dtype=None, sharding=None, quantize: Optional[str] = None, group_size: Optional[int] = None,
             **numerics) -> tuple[ModelConfig, Any]:
  """(config, params) from a converted checkpoint or a Hugging Face safetensors directory.

  A converted checkpoint restores straight onto ``sharding``; a Hugging Face
  one is read tensor by tensor on the host, then placed on it. An int8
  checkpoint loads as int8; ``quantize="int8"`` quantizes the experts of any
  other at load (``quant.quantize_params``).
  """
  if is_converted(path):
    cfg, params = load_checkpoint(path, dtype=dtype, sharding=sharding, **numerics)
  else:
    cfg, params = load_hf_checkpoint(path, dtype=dtype or jnp.float32, sharding=sharding, **numerics)
  if quantize is not None:
    _quantization_spec(cfg, quantize, group_size)  # checks the method and group size
    params = jax.jit(lambda p: quant.quantize_params(p, quantize, group_size))(params)
  return cfg, params


def load_checkpoint(path: str, dtype=None, sharding=None, **numerics) -> tuple[ModelConfig, Any]:
  """Restores a params checkpoint -> (config, params).

  ``dtype``: cast on restore (None keeps the stored dtype). ``sharding``: a
  ``jax.sharding.Sharding`` for every leaf or a pytree of them matching the
  params; each device reads its own shard from disk (no full host copy).
  ``numerics`` are ``ModelConfig`` run options (compute_dtype, moe_backend, ...).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel

  _check_dir(path)
  cfg = _load_config(os.path.join(path, CONFIG_FILE), **numerics)
  spec = read_quantization(path)
  params_dir = epath.Path(os.path.abspath(path)) / PARAMS_DIR
  # Opened one by one first: Orbax opens them concurrently and, when one fails, leaves the others pending to
  # print errors until the process exits. Each leaf is read with tensorstore below for the same reason.
  stores = _open_leaves(str(params_dir), cfg, spec)
  try:  # the handler reads the tree metadata a params checkpoint has (the Checkpointer would want a step file too)
    stored, _ = jax.tree.flatten_with_path(ocp.PyTreeCheckpointHandler().metadata(params_dir).tree)
  except Exception as e:  # pylint: disable=broad-exception-caught  # Orbax/tensorstore raise plain Exceptions
    raise CheckpointError(f"{params_dir}: cannot read the parameter metadata ({_store_problem(e)})") from None
  got = {tuple(k.key for k in p): tuple(m.shape) for p, m in stored}
  want = _leaf_paths(cfg, spec)
  for leaf in sorted(set(want) | set(got)):
    if want.get(leaf) != got.get(leaf):
      raise CheckpointError(f"{params_dir}: leaf {'.'.join(leaf)} is stored with shape {got.get(leaf)}, "
                            f"which does not match {CONFIG_FILE} ({want.get(leaf)})")
  shapes = _stored_shapes(cfg, spec)
  if spec and sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
    raise CheckpointError(f"{path}: an int8 checkpoint loads onto one sharding for every leaf, not a tree of them")
  shardings = _broadcast_sharding(sharding, shapes)
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))

  def read(path, shape, leaf_sharding):
    leaf = tuple(k.key for k in path)
    cast = None if spec and leaf[-1] in ("values", "scale") else np_dtype  # int8 weights load as stored
    return _read_leaf(stores[leaf], os.path.join(str(params_dir), ".".join(leaf)), shape, leaf_sharding, cast)

  params = jax.tree.map_with_path(read, shapes, shardings, is_leaf=is_shape)
  return cfg, _as_int8_weights(params, spec)


def _as_int8_weights(params, spec: Optional[dict]):
  """The ``{"values", "scale"}`` dicts of a restored int8 checkpoint as ``quant.Int8Weight``s."""
  for name in (spec or {}).get("leaves", ()):
    *parents, last = name.split(".")
    node = params
    for k in parents:
      node = node[k]
    node[last] = quant.Int8Weight(node[last]["values"], node[last]["scale"])
  return params


def _read_leaf(store, where: str, shape, sharding, dtype):
  """One stored leaf as a global array on ``sharding``: each addressable device's shard read from disk once."""
  shards = {}

  def read(index):
    key = tuple((i.start, i.stop, i.step) for i in index)
    if key not in shards:
      try:
        shards[key] = store[index].read().result()
      except ValueError as e:  # a damaged chunk
        raise CheckpointError(f"{where}: cannot read the stored parameters ({_store_problem(e)})") from None
    return shards[key] if dtype is None else shards[key].astype(dtype)

  return jax.make_array_from_callback(tuple(shape), sharding, read)


def _open_leaves(params_dir: str, cfg: ModelConfig, quantization: Optional[dict] = None) -> dict:
  """Every leaf's zarr array (tensorstore), checked against the config's shape."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  stores = {}
  for leaf, shape in _leaf_paths(cfg, quantization).items():
    try:
      stores[leaf] = ts.open(_leaf_spec(params_dir, leaf), open=True).result()
    except ValueError as e:
      raise CheckpointError(f"{params_dir}: cannot open leaf {'.'.join(leaf)} ({_store_problem(e)})") from None
    if tuple(stores[leaf].shape) != shape:
      raise CheckpointError(f"{params_dir}: leaf {'.'.join(leaf)} is stored with shape {tuple(stores[leaf].shape)}, "
                            f"which does not match {CONFIG_FILE} ({shape})")
  return stores


class _LazyLeaf:
  """A stored leaf that reads only the slice it is indexed with (and ticks a progress bar)."""

  def __init__(self, store, bar, where: str):
    self._store, self._bar, self._where = store, bar, where
    self.shape = tuple(store.shape)
    self.dtype = np.dtype(store.dtype.numpy_dtype)

  def __getitem__(self, index):
    try:
      value = self._store[index].read().result()
    except ValueError as e:  # a damaged chunk
      raise CheckpointError(f"{self._where}: cannot read the stored parameters ({_store_problem(e)})") from None
    self._bar.update(1)
    return value


def export_hf(checkpoint: str, out_dir: str, shard_bytes: int = 5 * 10**9, dtype=None,
              progress: Optional[ReporterFactory] = None) -> None:
  """Params checkpoint -> Hugging Face safetensors (separate experts), one tensor at a time.

  ``progress``: a reporter factory (``dmax_jax.progress``), None for none.
  """
  _check_dir(checkpoint)
  cfg = _load_config(os.path.join(checkpoint, CONFIG_FILE))
  if read_quantization(checkpoint):
    raise CheckpointError(f"{checkpoint}: an int8 checkpoint; export the unquantized checkpoint it was made from")
  if os.path.exists(out_dir):
    raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
  params_dir = os.path.join(os.path.abspath(checkpoint), PARAMS_DIR)
  stores = _open_leaves(params_dir, cfg)
  bar = reporter(progress, total=len(weight_table(cfg)), desc="export", unit="tensor")
  leaves = {}
  for leaf, store in stores.items():
    node = leaves
    for k in leaf[:-1]:
      node = node.setdefault(k, {})
    node[leaf[-1]] = _LazyLeaf(store, bar, os.path.join(params_dir, ".".join(leaf)))
  config = hf_config_dict(cfg, os.path.join(checkpoint, CONFIG_FILE), dtype)
  with bar:
    save_hf_checkpoint(leaves, cfg, out_dir, shard_bytes=shard_bytes, dtype=dtype,
                       extra_files=_side_files(checkpoint), config=config)
