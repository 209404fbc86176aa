"""Kernels for the hot spots XLA lowers poorly (Pallas, or library kernels composed).

- ``moe_pallas``: grouped expert matmuls that read each touched expert once
  and skip untouched experts (the decoding MoE path, ``moe_backend="pallas"``).
- ``attention_pallas``: a decoding forward's attention over the KV-cache
  stack in one kernel, reading the layer's keys and values in place
  (``attention="pallas"``).
- ``grouped_matmul``: the grouped MoE matmul on Hopper GPUs, forward and
  backward, from tokamax's and JAX's Mosaic GPU kernels (the training path,
  ``moe_backend="grouped"``).
"""

import jax


def interpret_default(interpret) -> bool:
  """A kernel's ``interpret`` argument: None -> interpret on the CPU backend (where Pallas has no compiled path)."""
  return jax.default_backend() == "cpu" if interpret is None else interpret
