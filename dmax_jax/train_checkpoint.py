"""Training-state checkpoints in a work directory (Orbax ``CheckpointManager``).

The state is a pytree ``{params, opt_state, step, data_position, rng}`` of
arrays. Saves are asynchronous by default and commit atomically, so a process
killed mid-save leaves the previous checkpoint as the latest one. Restores go
onto an abstract target (``jax.ShapeDtypeStruct`` with shardings), so each
device reads only its shards.

(Minimal version of the shared API; the checkpoint helper owns the full one.)
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp


class TrainCheckpointer:
  """``TrainCheckpointer(workdir, keep=N, async_save=True)``: save / restore / latest_step."""

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def save(self, step: int, state: dict, force: bool = False) -> bool:
    return self._mgr.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step: Optional[int] = None, abstract_state: Any = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
    return self._mgr.restore(step, args=args)

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()
