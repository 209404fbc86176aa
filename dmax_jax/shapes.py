"""The package's shape letters, defined once.

An array's name ends with the letters of its axes (``x_BLD`` is batch x
length x model width); einsum strings use the same letters in lower case.

Model (``model/``):
  B  batch                               V  vocabulary
  L  sequence / query length             D  model width (hidden size)
  S  key length (the cache, or L)        H  attention heads
  G  key/value heads                     R  head_dim
  I  dense SwiGLU width                  C  shared-expert width
  E  routed experts                      F  one routed expert's width
  X  experts per token (top-k)           T  tokens (B x L flattened)
  M  (token, expert) rows sorted by expert, M = T x X
  J, N  a grouped matmul's input and output widths (``moe.ragged_dot``)
  P, Q  the Pallas kernels' padded rows and row blocks (P = Q x block_rows)

Blocks (training and decoding):
  K  block length (``block_length`` everywhere: configs, objective, decoding)
  the ``[x_t ; x_0]`` training input is 2L long (each half L)

Training steps (``training/trainer.py``):
  A  accumulation micro-steps; a step's batch is ``[A, B, L]``

Router groups (``moe.learned_route``):
  Y  expert groups (``n_group``)         Z  experts in a group (E / Y)

Layer stacks (``model/params.py``): a leading axis of layers where a tensor is
stacked (the dense and the MoE layers are two stacks).
"""
