"""Step-by-step traces of a generation: device buffers filled by the loop, ``TraceStep`` lists on the host."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmax_jax.decoding.strategy import StepView

STATUS = ("prompt", "mask", "new", "revised", "same")


@dataclasses.dataclass
class TraceStep:
  block: int  # block index from the start of the generation (0: the block holding the first generated token)
  step: int  # 0-based step within the block
  tokens: list  # the block's tokens after this step (mask id where still masked)
  status: list  # per position: "prompt" | "mask" | "new" | "revised" | "same"
  confidence: list  # per position: max softmax probability at this step (0 for prompt positions)


def record(view: StepView, new_x_BK, running_B) -> dict:
  """One step's trace record: tokens after it, a ``STATUS`` code per position, confidences, whether it ran."""
  status = jnp.select(
      [~view.active, new_x_BK == view.mask_id, view.masked, new_x_BK != view.x], [0, 1, 2, 3], 4)
  return dict(tokens=new_x_BK, status=status.astype(jnp.int8), conf=jnp.where(view.active, view.p, 0.0),
              valid=running_B)


def empty(K: int, B: int, conf_dtype) -> dict:
  """One block's buffers: steps x batch x positions."""
  return dict(tokens=jnp.zeros((K, B, K), jnp.int32), status=jnp.zeros((K, B, K), jnp.int8),
              conf=jnp.zeros((K, B, K), conf_dtype), valid=jnp.zeros((K, B), bool))


def store(buffers, rec, i):
  """``buffers`` with ``rec`` (a record, or a whole block's buffers) written at index ``i``."""
  return jax.tree.map(lambda buf, r: buf.at[i].set(r), buffers, rec)


def steps_of(traces, i: int) -> list[TraceStep]:
  """Sequence ``i``'s steps from the host copy of a generation's buffers (blocks x steps x batch x ...)."""
  D, K = traces["valid"].shape[:2]
  return [TraceStep(block=d, step=s, tokens=traces["tokens"][d, s, i].tolist(),
                    status=[STATUS[c] for c in traces["status"][d, s, i]],
                    confidence=traces["conf"][d, s, i].tolist())
          for d in range(D) for s in range(K) if traces["valid"][d, s, i]]
