"""Training-state checkpoints: a small wrapper over an Orbax ``CheckpointManager``.

The state saved at a step is a dict

  {"params": pytree, "opt_state": pytree, "rng": PRNG key (typed or raw uint32),
   "data": int or small JSON dict (the data loader's position)}

API (what train.py calls)::

  ckpt = TrainCheckpointer(directory, max_to_keep=3)
  step = ckpt.latest_step()                     # None when there is no checkpoint
  state = ckpt.restore(step=None, abstract_state=abstract)   # latest by default
  ckpt.save(step, state, force=False)           # asynchronous; False if skipped
  ckpt.wait()                                   # block until pending saves are on disk
  ckpt.close()                                  # wait, then release (also ``with``)

``restore`` returns the same dict plus ``"step"``. ``abstract_state`` gives
the structure, shapes, dtypes and shardings to restore onto (a state of
``jax.ShapeDtypeStruct``s or real arrays, e.g. ``jax.eval_shape`` of the
init); "data" in it is ignored. Without it, arrays come back in the stored
structure (NamedTuples of optax states become dicts), so train.py should pass it.

Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices and writes continue in the background. Each step is written to a
temporary directory and renamed when complete, so a crash during a save
leaves the previous step as the latest usable one (its temporary directory
is removed when the next ``TrainCheckpointer`` opens the directory). Only the newest
``max_to_keep`` steps are kept.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

_ARRAYS, _META = "state", "meta"


def _is_typed_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class TrainCheckpointer:
  """Keeps the last ``max_to_keep`` training states under ``directory/<step>/``."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True,  # unfinished saves of a killed run
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_ARRAYS, _META))

  def latest_step(self) -> Optional[int]:
    """The newest complete step (unfinished saves do not count), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: dict, force: bool = False) -> bool:
    """Starts saving ``state`` at ``step``; returns whether a save was started.

    ``force`` saves even if the manager's policy would skip the step.
    """
    ocp = self._ocp
    rng = state["rng"]
    meta = {"step": int(step), "data": state.get("data"), "rng_impl": None}
    if _is_typed_key(rng):
      meta["rng_impl"] = str(jax.random.key_impl(rng))
      rng = jax.random.key_data(rng)
    arrays = {"params": state["params"], "opt_state": state["opt_state"], "rng": rng}
    return self._manager.save(
        int(step), args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}),
        force=force,
    )

  def restore(self, step: Optional[int] = None, abstract_state: Optional[dict] = None) -> dict:
    """Restores ``step`` (default: the latest) -> {params, opt_state, rng, data, step}."""
    ocp = self._ocp
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
    meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    if abstract_state is None:
      arrays_args = ocp.args.StandardRestore()
    else:
      rng = abstract_state["rng"]
      if _is_typed_key(rng):
        # The raw data has a trailing key axis; a sharding of the key's rank leaves it replicated.
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(rng.shape, rng.dtype))
        rng = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(rng, "sharding", None))
      target = {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"], "rng": rng}
      arrays_args = ocp.args.StandardRestore(target)
    arrays = self._manager.restore(step, args=ocp.args.Composite(**{_ARRAYS: arrays_args}))[_ARRAYS]
    rng = arrays["rng"]
    if meta.get("rng_impl"):
      rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
    return {"params": arrays["params"], "opt_state": arrays["opt_state"], "rng": rng, "data": meta["data"],
            "step": int(step)}

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

