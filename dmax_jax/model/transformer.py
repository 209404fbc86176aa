"""The LLaDA2-MoE forward pass as pure functions over the parameter pytree.

Shape letters: the package glossary (``dmax_jax/shapes.py``); here B batch, L
query length, S key length (cache or sequence), D model width, H attention
heads, G key/value heads, R head_dim, V vocab.

Attention masks are boolean, True = the query (row) may attend to the key
(column), so full, block-causal and the training ``[x_t ; x_0]`` attention are
all just masks. Dtypes: matmul inputs are in ``cfg.compute_dtype``; RMSNorm,
RoPE, the router, the attention softmax and the logits are float32 (float64
when the compute dtype is float64: ``config.accum_dtype``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model import moe
from dmax_jax.model.kernels import attention_pallas
from dmax_jax.model.config import ModelConfig, accum_dtype

_NEG = jnp.finfo(jnp.float32).min


class HalvesMask(NamedTuple):
  """A sequence's attention in two halves, the second of which never attends to the first.

  Queries ``[0, L1)`` attend every key under ``first`` ``[B, L1, S]``; queries
  ``[L1, S)`` attend keys ``[L1, S)`` only, under ``second`` ``[B, S - L1, S - L1]``.
  The same attention as the whole ``[S, S]`` mask with False in the second half's
  rows over the first half's columns, computed without that empty quarter (the
  training ``[x_t ; x_0]`` input: the clean half never sees the noisy one).
  """

  first: jax.Array
  second: jax.Array


class KVCache(NamedTuple):
  """Keys and values of every layer, ``[layers, B, S, G, R]`` per stack.

  ``dense`` and ``moe`` hold the two layer stacks (None when a stack is empty).
  A cached forward writes the keys/values of its queries at positions
  ``start .. start + L - 1`` and attends over the whole cache under a caller
  given ``[B, L, S]`` mask.
  """

  dense: Optional[dict]
  moe: Optional[dict]


class RowWrite(NamedTuple):
  """Per-row cache addressing for a cached forward (``start=RowWrite(...)`` instead of one position).

  Query row r writes its L keys/values into cache row ``slot[r]`` at positions ``start[r] .. start[r] + L - 1``
  and attends over cache row ``slot[r]`` under the caller's mask. Rows ``[0, direct)`` attend over cache rows
  ``[0, direct)`` in order (read in place: their ``slot`` only says where they write); later rows read the
  cache row ``slot`` names (a gather). The serving engine forwards every slot's block this way, each at its own
  position, plus extra rows (a prompt block, a finished block rewritten) into any slot's cache row.
  """

  slot: jax.Array  # [N] int32
  start: jax.Array  # [N] int32
  direct: int

  @property
  def read(self) -> jax.Array:
    """[N]: the cache row each query row attends over."""
    n = self.direct
    return jnp.concatenate([jnp.arange(n, dtype=jnp.int32), self.slot[n:]]) if n else self.slot


# XLA options for compiling decoding programs. On NVIDIA GPUs XLA's own Triton GEMMs read each
# layer's weights from a copy of its slice of the stacked parameters (an extra write and read of
# every attention / shared-expert weight per forward); cuBLAS reads the slice in place. Measured on
# one H100 (BENCHMARKS.md): 9.6 -> 9.3 ms per batch-1 decoding forward of LLaDA-2.0-mini.
# Other backends ignore the option.
DECODE_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def rms_norm(x, weight, eps):
  """RMSNorm in float32 (or wider), multiplied by its weight afterwards, cast back."""
  dtype = x.dtype
  wide = accum_dtype(dtype)
  x32 = x.astype(wide)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(wide) * x32).astype(dtype)


def rope_angles(positions_BL, cfg: ModelConfig, dtype):
  """The rotary angles ``[B, L, rotary_dim / 2]``: position times ``theta ** (-2i / rotary_dim)``."""
  rd = cfg.rotary_dim
  return positions_BL.astype(dtype)[..., None] * cfg.rope_theta ** (-jnp.arange(0, rd, 2, dtype=dtype) / rd)


def rope(x_BLHR, positions_BL, cfg: ModelConfig):
  """Partial rotary embedding (rotate-half form) on the first ``rotary_dim`` dims of each head."""
  rd = cfg.rotary_dim
  if rd == 0:
    return x_BLHR
  dtype = x_BLHR.dtype
  wide = accum_dtype(dtype)
  freqs = rope_angles(positions_BL, cfg, wide)  # [B, L, rd/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, rd]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x_BLHR.astype(wide)
  rot, passthrough = x32[..., :rd], x32[..., rd:]
  half = rd // 2
  rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  rot = rot * cos + rotated_half * sin
  return jnp.concatenate([rot, passthrough], axis=-1).astype(dtype)


def attend(q_BLHR, k_BSGR, v_BSGR, mask_BLS, implementation: str = "xla"):
  """Grouped-query softmax attention; scores and softmax in float32 (or wider).

  ``implementation="cudnn"``: cuDNN's fused flash attention with the boolean
  mask, which never writes the [L, S] scores to memory, where it runs (an
  NVIDIA GPU, bf16/fp16 inputs); ``"tokamax"``: tokamax's flash attention
  (its Mosaic GPU kernel on Hopper) there, where tokamax is installed;
  elsewhere, and for ``"xla"``, the plain einsum / softmax / einsum below.
  """
  fused = jax.default_backend() == "gpu" and q_BLHR.dtype in (jnp.bfloat16, jnp.float16)
  if implementation == "cudnn" and fused:
    return jax.nn.dot_product_attention(q_BLHR, k_BSGR, v_BSGR, mask=mask_BLS[:, None], implementation="cudnn")
  tokamax = moe.tokamax_module() if implementation == "tokamax" and fused else None
  if tokamax is not None:
    return tokamax.dot_product_attention(q_BLHR, k_BSGR, v_BSGR, mask=mask_BLS[:, None])
  B, L, H, R = q_BLHR.shape
  G = k_BSGR.shape[2]
  q = q_BLHR.reshape(B, L, G, H // G, R)
  scores = jnp.einsum("blgqr,bsgr->bgqls", q, k_BSGR, preferred_element_type=accum_dtype(q.dtype))
  scores = scores * (R**-0.5)
  scores = jnp.where(mask_BLS[:, None, None, :, :], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGR.dtype)
  out = jnp.einsum("bgqls,bsgr->blgqr", probs, v_BSGR)
  return out.reshape(B, L, H, R)


def _index(*idx):
  """Slice indices as one integer type (Python ints become int64 under ``jax.enable_x64``)."""
  return tuple(jnp.asarray(i, jnp.int32) for i in idx)


def _attention(p, x_BLD, positions_BL, cfg: ModelConfig, mask, kv):
  """Self-attention of one layer.

  Without ``kv`` the keys are this call's own (``mask`` [B, L, L]). With ``kv = (k_cache, v_cache, start, layer,
  (norm rows, their columns, RoPE's cos and sin))`` the new keys/values are written into layer ``layer`` of the
  stack's cache at ``start`` first and the queries attend over the whole cache under ``mask`` [B, L, S].
  Returns (output, updated (k_cache, v_cache) or None).
  """
  B, L, _ = x_BLD.shape
  H, R = cfg.num_attention_heads, cfg.head_dim
  dtype = x_BLD.dtype
  qkv = x_BLD @ p["qkv"].astype(dtype)
  # q/k norms, RoPE, the cache update and attention in two kernels where they run, else step by step
  out, new_kv = _fused_attention(qkv, positions_BL, cfg, mask, kv) or _stepwise_attention(
      p, qkv, positions_BL, cfg, mask, kv)
  return out.reshape(B, L, H * R) @ p["o"].astype(dtype), new_kv


def _stepwise_attention(p, qkv_BLC, positions_BL, cfg: ModelConfig, mask, kv):
  """``_attention`` from the projections: norms, RoPE, the cache update, attention. -> (out [B, L, H, R], kv)."""
  B, L, _ = qkv_BLC.shape
  H, G, R = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  qkv = qkv_BLC.reshape(B, L, H + 2 * G, R)
  q, k, v = qkv[:, :, :H], qkv[:, :, H : H + G], qkv[:, :, H + G :]
  if cfg.use_qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q = rope(q, positions_BL, cfg)
  k = rope(k, positions_BL, cfg)
  if kv is None:
    return _attend_under(q, k, v, mask, cfg.attention), None
  k_cache, v_cache, start, layer, _ = kv  # the whole stack's [layers, B, S, G, R] cache: new rows written in place
  if isinstance(start, RowWrite):
    return _row_attention(q, k, v, k_cache, v_cache, start, layer, mask, cfg.attention)
  at = _index(layer, 0, start, 0, 0)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], at)
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], at)
  if cfg.attention == "pallas" and not isinstance(mask, HalvesMask) and attention_pallas.supported(q, k_cache):
    return attention_pallas.cached_attention(q, k_cache, v_cache, layer, mask), (k_cache, v_cache)  # read in place
  dtype = qkv_BLC.dtype
  return _attend_under(q, k_cache[layer].astype(dtype), v_cache[layer].astype(dtype), mask, cfg.attention), (
      k_cache, v_cache)


def _row_attention(q_NLHR, k_NLGR, v_NLGR, k_cache, v_cache, rows: RowWrite, layer, mask_NLS, implementation):
  """The cache update and attention of a ``RowWrite`` forward. -> (out [N, L, H, R], (k_cache, v_cache))."""
  L = q_NLHR.shape[1]
  pos_NL = rows.start[:, None] + jnp.arange(L, dtype=jnp.int32)[None, :]
  slot_N1 = rows.slot[:, None]
  k_cache = k_cache.at[layer, slot_N1, pos_NL].set(k_NLGR.astype(k_cache.dtype))
  v_cache = v_cache.at[layer, slot_N1, pos_NL].set(v_NLGR.astype(v_cache.dtype))
  if implementation == "pallas" and attention_pallas.supported(q_NLHR, k_cache):  # every row's slot read in place
    return attention_pallas.cached_attention(q_NLHR, k_cache, v_cache, layer, mask_NLS, rows=rows.read), (
        k_cache, v_cache)
  dtype = q_NLHR.dtype
  k_all, v_all = k_cache[layer].astype(dtype), v_cache[layer].astype(dtype)
  n = rows.direct
  outs = []
  if n:
    outs.append(attend(q_NLHR[:n], k_all[:n], v_all[:n], mask_NLS[:n], implementation))
  if n < q_NLHR.shape[0]:
    extra = rows.slot[n:]
    outs.append(attend(q_NLHR[n:], k_all[extra], v_all[extra], mask_NLS[n:], implementation))
  return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0], (k_cache, v_cache)


def _fused_attention(qkv_BLC, positions_BL, cfg: ModelConfig, mask, kv):
  """``attention_pallas.write_and_attend`` where it applies (``attention="pallas"``, a cache, these shapes), else None."""
  if kv is None or cfg.attention != "pallas" or isinstance(mask, HalvesMask) or isinstance(kv[2], RowWrite):
    return None
  k_cache, v_cache, start, layer, (norms, cols, rotation) = kv
  prep = attention_pallas.QKPrep(
      norms=norms if cfg.use_qk_norm else None, q_col=cols.get("q_norm", 0), k_col=cols.get("k_norm", 0),
      eps=cfg.rms_norm_eps, rotation=rotation)  # None without rotary dims (``_body``)
  if not attention_pallas.supported_prepared(qkv_BLC, k_cache, prep):
    return None
  out, k_cache, v_cache = attention_pallas.write_and_attend(qkv_BLC, k_cache, v_cache, layer, start, mask, prep,
                                                            num_heads=cfg.num_attention_heads)
  return out, (k_cache, v_cache)


def _attend_under(q_BLHR, k_BSGR, v_BSGR, mask, implementation: str):
  """``attend`` under a [B, L, S] mask or a ``HalvesMask`` (each half attended alone, the empty quarter skipped)."""
  if not isinstance(mask, HalvesMask):
    return attend(q_BLHR, k_BSGR, v_BSGR, mask, implementation)
  L1 = mask.first.shape[1]
  return jnp.concatenate([attend(q_BLHR[:, :L1], k_BSGR, v_BSGR, mask.first, implementation),
                          attend(q_BLHR[:, L1:], k_BSGR[:, L1:], v_BSGR[:, L1:], mask.second, implementation)], axis=1)


def _dense_mlp(p, x_BLD):
  dtype = x_BLD.dtype
  h = jax.nn.silu(x_BLD @ p["gate"].astype(dtype)) * (x_BLD @ p["up"].astype(dtype))
  return h @ p["down"].astype(dtype)


def _layer(p, x_BLD, positions_BL, cfg: ModelConfig, kind: str, mask, kv, experts=(None, 0)):
  """One decoder layer: x + attn(norm(x)), then + mlp(norm(x)). Returns (x, new_kv, router).

  ``experts`` is (what ``moe.prepare_experts`` kept whole, this layer's index).
  """
  h = rms_norm(x_BLD, p["attn_norm"], cfg.rms_norm_eps)
  attn_out, new_kv = _attention(p, h, positions_BL, cfg, mask, kv)
  x_BLD = x_BLD + attn_out
  h = rms_norm(x_BLD, p["mlp_norm"], cfg.rms_norm_eps)
  if kind == "dense":
    mlp_out, router = _dense_mlp(p, h), None
  else:
    B, L, D = h.shape
    y, router = moe.moe_mlp(p, h.reshape(B * L, D), cfg, *experts)
    mlp_out = y.reshape(B, L, D)
    router = jax.tree.map(lambda a: a.reshape(B, L, -1), router)
  return x_BLD + mlp_out, new_kv, router


_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")


def _pack_norms(stack):
  """(stack less its norm vectors, them as one [layers, sum of widths] array, unpack(layer params, row), columns).

  XLA copies each per-layer slice of a scanned parameter out with its own
  launch, and these vectors are tiny: one array costs one copy instead of four.
  ``columns`` maps each norm's name to its first column (the attention kernels read q/k norms there).
  """
  names = [k for k in _NORMS if k in stack]
  widths = np.cumsum([stack[k].shape[-1] for k in names])[:-1]
  rest = {k: v for k, v in stack.items() if k not in names}

  def unpack(p, packed):
    return dict(p, **dict(zip(names, jnp.split(packed, widths, axis=-1))))

  columns = dict(zip(names, [0] + [int(w) for w in widths]))
  return rest, jnp.concatenate([stack[k] for k in names], axis=-1), unpack, columns


def _run_stack(stack, x, positions, cfg: ModelConfig, kind: str, mask, cache, start, rotation=None):
  """Runs a stack of layers (scan or Python loop). Returns (x, new cache stack, router per layer).

  The whole stack's cache rides in the carry and each layer writes its new rows
  in place (scanning over cache slices copies every layer's cache out and back).
  ``rotation``: RoPE's (cos, sin) at ``positions`` for the Pallas attention (computed once per forward).
  """
  num = jax.tree.leaves(stack)[0].shape[0]
  stack, whole = moe.prepare_experts(stack, cfg) if kind == "moe" else (stack, None)
  rest, norms, unpack, columns = _pack_norms(stack)

  def body(carry, xs):
    (x, c), (p, layer) = carry, xs
    kv = None if c is None else (c["k"], c["v"], start, layer, (norms, columns, rotation))
    x, new_kv, router = _layer(p, x, positions, cfg, kind, mask, kv, (whole, layer))
    return (x, None if new_kv is None else {"k": new_kv[0], "v": new_kv[1]}), router

  if cfg.remat:
    body = jax.checkpoint(body, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    def step(carry, p):  # the layer index rides in the carry and the norms are read at it: scanned
      (x, c, layer) = carry  # over, each would be copied out of its stack by a launch of its own per layer
      (x, c), router = body((x, c), (unpack(p, jax.lax.dynamic_index_in_dim(norms, layer, keepdims=False)), layer))
      return (x, c, layer + 1), router

    (x, cache, _), router = jax.lax.scan(step, (x, cache, jnp.int32(0)), rest)  # the stack less its norms
    return x, cache, router
  routers = []
  for i in range(num):
    (x, cache), router = body((x, cache), (jax.tree.map(lambda a, i=i: a[i], stack), i))
    routers.append(router)
  return x, cache, jax.tree.map(lambda *a: jnp.stack(a), *routers)


def embed(params, config: ModelConfig, tokens):
  """The input embeddings of ``tokens`` (rows of the embedding table)."""
  return jnp.take(params["embed"], tokens, axis=0)


def _inputs(params, cfg: ModelConfig, tokens, embeds, positions):
  if (tokens is None) == (embeds is None):
    raise ValueError("pass exactly one of tokens= or embeds=")
  x = embed(params, cfg, tokens) if embeds is None else embeds
  x = x.astype(jnp.dtype(cfg.compute_dtype))
  B, L, _ = x.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  positions = jnp.broadcast_to(positions, (B, L))
  return x, positions


def _body(params, cfg: ModelConfig, x, positions, mask, cache: Optional[KVCache], start):
  routers = {}
  new_cache = {}
  rotation = None
  if cache is not None and cfg.attention == "pallas" and cfg.rotary_dim:  # the kernels' RoPE tables, once per forward
    angles = rope_angles(positions, cfg, accum_dtype(x.dtype))
    rotation = (jnp.cos(angles), jnp.sin(angles))
  for kind in ("dense", "moe"):
    if kind not in params:
      new_cache[kind] = None
      continue
    stack_cache = None if cache is None else getattr(cache, kind)
    x, new_cache[kind], routers[kind] = _run_stack(params[kind], x, positions, cfg, kind, mask, stack_cache, start,
                                                   rotation)
  hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  out_cache = None if cache is None else KVCache(dense=new_cache["dense"], moe=new_cache["moe"])
  return hidden, out_cache, routers.get("moe")


def logits_from_hidden(params, cfg: ModelConfig, hidden_BLD):
  """The untied lm_head, accumulated and returned in float32 (or wider).

  In bf16/fp16 compute its gradient products run in that dtype too (``_low_precision_head``).
  """
  dtype = hidden_BLD.dtype
  w_DV = params["lm_head"].astype(dtype)
  if dtype in (jnp.bfloat16, jnp.float16):
    return _low_precision_head(hidden_BLD, w_DV)
  return jnp.einsum("bld,dv->blv", hidden_BLD, w_DV, preferred_element_type=accum_dtype(dtype))


@jax.custom_vjp
def _low_precision_head(h_BLD, w_DV):
  """float32 logits of bf16 (fp16) inputs, whose backward casts the logits' cotangent to the input dtype.

  Left to autodiff, the float32 cotangent makes both gradient products float32 GEMMs over the
  vocabulary (TF32 at best on a GPU); the inputs themselves are bf16, so their gradients keep
  nothing a bf16 cotangent loses beyond bf16's own rounding.
  """
  return jnp.einsum("bld,dv->blv", h_BLD, w_DV, preferred_element_type=jnp.float32)


def _low_precision_head_fwd(h_BLD, w_DV):
  return _low_precision_head(h_BLD, w_DV), (h_BLD, w_DV)


def _low_precision_head_bwd(res, ct_BLV):
  h_BLD, w_DV = res
  ct = ct_BLV.astype(h_BLD.dtype)
  dh = jnp.einsum("blv,dv->bld", ct, w_DV, preferred_element_type=jnp.float32).astype(h_BLD.dtype)
  dw = jnp.einsum("bld,blv->dv", h_BLD, ct, preferred_element_type=jnp.float32).astype(w_DV.dtype)
  return dh, dw


_low_precision_head.defvjp(_low_precision_head_fwd, _low_precision_head_bwd)


def _full_mask(mask, B, L):
  if mask is None:
    return jnp.ones((B, L, L), dtype=bool)
  if isinstance(mask, HalvesMask):
    L1 = jnp.shape(mask.first)[-2]
    return HalvesMask(_sized_mask(mask.first, B, (L1, L)), _sized_mask(mask.second, B, (L - L1, L - L1)))
  return _sized_mask(mask, B, (L, L))


def _sized_mask(mask, B, shape):
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (True = may attend), got {mask.dtype}")
  if mask.shape not in (shape, (B,) + shape):
    raise ValueError(f"mask must be [L, L] or [B, L, L] (a HalvesMask part: its [L1, L] or [L2, L2]) with shape "
                     f"{list(shape)} here, B={B}; got {list(mask.shape)}")
  return jnp.broadcast_to(mask, (B,) + shape)


def forward_hidden(params, config: ModelConfig, *, tokens=None, embeds=None, positions=None, mask=None):
  """Like ``forward`` but returns (final-norm hidden [B, L, D], router choices).

  Router choices are ``(ids, weights)``, each ``[moe_layers, B, L, top_k]``, or
  None when the model has no MoE layer.
  """
  x, positions = _inputs(params, config, tokens, embeds, positions)
  B, L, _ = x.shape
  hidden, _, router = _body(params, config, x, positions, _full_mask(mask, B, L), None, 0)
  return hidden, router


def forward(params, config: ModelConfig, *, tokens=None, embeds=None, positions=None, mask=None):
  """Logits ``[B, L, V]`` (float32) for token ids ``[B, L]`` or input embeddings ``[B, L, D]``.

  ``mask`` is boolean ``[L, L]`` or ``[B, L, L]`` (True = may attend), a
  ``HalvesMask``, or None for full bidirectional attention; ``positions`` ``[L]`` or ``[B, L]``, None for
  ``0..L-1``.
  """
  hidden, _ = forward_hidden(params, config, tokens=tokens, embeds=embeds, positions=positions, mask=mask)
  return logits_from_hidden(params, config, hidden)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """A zeroed KV cache for ``batch`` sequences of up to ``length`` positions."""
  dtype = jnp.dtype(dtype or config.compute_dtype)
  shape = (batch, length, config.num_key_value_heads, config.head_dim)

  def stack(n):
    if n == 0:
      return None
    return {"k": jnp.zeros((n,) + shape, dtype), "v": jnp.zeros((n,) + shape, dtype)}

  return KVCache(dense=stack(config.num_dense_layers), moe=stack(config.num_moe_layers))


def forward_cached(
    params, config: ModelConfig, cache: KVCache, *, start, kv_mask, tokens=None, embeds=None, positions=None,
    return_hidden: bool = False, return_router: bool = False,
):
  """A forward of L queries that writes their keys/values into ``cache`` at ``start``.

  The queries attend over the whole cache (length S) under ``kv_mask`` [B, L, S]
  (True = may attend); their own keys are in it, at ``start .. start + L - 1``.
  Returns (logits [B, L, V] float32, updated cache), or (hidden, cache) with
  ``return_hidden``; ``return_router`` appends the MoE routing (ids, weights),
  each ``[moe_layers, B, L, top_k]``.
  """
  x, positions = _inputs(params, config, tokens, embeds, positions)
  hidden, cache, router = _body(params, config, x, positions, kv_mask, cache, start)
  out = hidden if return_hidden else logits_from_hidden(params, config, hidden)
  return (out, cache, router) if return_router else (out, cache)


def block_causal_mask(length: int, block_length: int):
  """``[q, k]`` True iff ``k // block_length <= q // block_length``."""
  idx = jnp.arange(length) // block_length
  return idx[None, :] <= idx[:, None]
