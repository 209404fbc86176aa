"""Hand-written kernels (Pallas) for the hot spots XLA lowers poorly.

- ``moe_pallas``: grouped expert matmuls that read each touched expert once
  and skip untouched experts (the decoding MoE path, ``moe_backend="pallas"``).
"""
