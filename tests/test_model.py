"""The LLaDA2-MoE forward against the PyTorch reference's golden outputs, and its internal equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmax_jax
from dmax_jax.model import transformer as model_lib
from conftest import with_numerics

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["grouped", "dense"])
def test_golden_logits(tiny, golden, backend):
  cfg, params = tiny
  cfg = with_numerics(cfg, moe_backend=backend)
  ids, pos = golden["input_ids"], golden["position_ids"]
  np.testing.assert_allclose(dmax_jax.forward(params, cfg, tokens=ids, positions=pos), golden["logits_full"], **TOL)
  np.testing.assert_allclose(
      dmax_jax.forward(params, cfg, tokens=ids, positions=pos, mask=golden["mask_block_causal"]),
      golden["logits_block_causal"], **TOL)
  np.testing.assert_allclose(dmax_jax.forward(params, cfg, embeds=golden["inputs_embeds"]), golden["logits_embeds"], **TOL)
  hidden, _ = dmax_jax.forward_hidden(params, cfg, tokens=ids)
  np.testing.assert_allclose(hidden, golden["hidden_final"], **TOL)


def test_golden_router(tiny, golden):
  cfg, params = tiny
  _, (ids, weights) = dmax_jax.forward_hidden(params, cfg, tokens=golden["input_ids"])
  for layer in (1, 2):
    i = np.asarray(ids[layer - 1, 0])
    w = np.asarray(weights[layer - 1, 0])
    order = np.argsort(i, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(i, order, 1), golden[f"router_topk_idx_layer{layer}"])
    np.testing.assert_allclose(np.take_along_axis(w, order, 1), golden[f"router_topk_weight_layer{layer}"], atol=1e-5, rtol=0)


def _route_numpy(router, bias, x, n_group, topk_group, top_k, scale):
  """LLaDA2's group-limited routing restated with sorts (stable: ties go to the lower index)."""
  scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ router.astype(np.float64))))
  biased = scores + bias
  T, E = biased.shape
  per = E // n_group
  ids = np.zeros((T, top_k), np.int64)
  for t in range(T):
    groups = biased[t].reshape(n_group, per)
    group_score = np.sort(groups, axis=1)[:, ::-1][:, :min(2, per)].sum(axis=1)
    keep = np.argsort(-group_score, kind="stable")[:topk_group]
    masked = np.full(E, -np.inf)
    for g in keep:
      masked[g * per:(g + 1) * per] = biased[t, g * per:(g + 1) * per]
    ids[t] = np.argsort(-masked, kind="stable")[:top_k]
  chosen = np.take_along_axis(scores, ids, 1)
  return ids, chosen / chosen.sum(1, keepdims=True) * scale


@pytest.mark.parametrize("ties", [False, True])
def test_route_equals_numpy_restatement(ties):
  """Group scores, group choice and top-k against sorts in NumPy; with ``ties``, many equal scores."""
  from dmax_jax.model import presets
  from dmax_jax.model import moe
  cfg = presets.llada2_mini()
  rng = np.random.default_rng(3)
  T, D, E = 64, 32, cfg.num_experts
  x = rng.standard_normal((T, D)).astype(np.float32)
  router = rng.standard_normal((D, E)).astype(np.float32) / np.sqrt(D)
  bias = rng.standard_normal(E).astype(np.float32) * 0.01
  if ties:  # a handful of distinct router columns and tokens: equal scores within and across groups
    router = router[:, rng.integers(0, 4, E)]
    x = np.round(x)
    bias = np.zeros(E, np.float32)
  ids, w = moe.route(jnp.asarray(router), jnp.asarray(bias), jnp.asarray(x), cfg)
  want_ids, want_w = _route_numpy(router, bias, x, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                                  cfg.routed_scaling_factor)
  np.testing.assert_array_equal(np.sort(ids, 1), np.sort(want_ids, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), np.argsort(ids, 1), 1),
                             np.take_along_axis(want_w, np.argsort(want_ids, 1), 1), rtol=1e-5)


def test_embed_is_the_forward_input(tiny, golden):
  cfg, params = tiny
  ids = golden["input_ids"]
  e = dmax_jax.embed(params, cfg, ids)
  assert e.shape == ids.shape + (cfg.hidden_size,)
  np.testing.assert_array_equal(dmax_jax.forward(params, cfg, embeds=e), dmax_jax.forward(params, cfg, tokens=ids))
  mix = 0.6 * e + 0.4 * dmax_jax.embed(params, cfg, jnp.full_like(ids, cfg.mask_token_id))
  np.testing.assert_allclose(mix, golden["inputs_embeds"], rtol=1e-6, atol=1e-6)


def test_batched_mask_equals_shared_mask(tiny, golden):
  cfg, params = tiny
  m = golden["mask_block_causal"]
  a = dmax_jax.forward(params, cfg, tokens=golden["input_ids"], mask=m)
  b = dmax_jax.forward(params, cfg, tokens=golden["input_ids"], mask=np.stack([m, m]))
  np.testing.assert_array_equal(a, b)


def test_mask_really_blocks(tiny, golden):
  """Changing a token only changes the logits of queries allowed to see it."""
  cfg, params = tiny
  m = golden["mask_block_causal"]
  ids = golden["input_ids"].copy()
  a = np.asarray(dmax_jax.forward(params, cfg, tokens=ids, mask=m))
  ids[:, 20] = (ids[:, 20] + 1) % 500
  b = np.asarray(dmax_jax.forward(params, cfg, tokens=ids, mask=m))
  np.testing.assert_array_equal(a[:, :16], b[:, :16])  # blocks 0, 1 cannot see block 2
  assert np.abs(a[:, 16:] - b[:, 16:]).max() > 1e-3


def test_kv_cache_block_equals_block_causal(tiny, golden):
  cfg, params = tiny
  ids = golden["input_ids"]
  B, L = ids.shape
  K = 8
  want = dmax_jax.forward(params, cfg, tokens=ids, mask=golden["mask_block_causal"])
  S = 32  # room beyond the sequence, as a decoding cache has
  cache = dmax_jax.init_cache(cfg, B, S)
  step = jax.jit(dmax_jax.forward_cached, static_argnums=1)
  key_block = np.arange(S) // K
  for start in range(0, L, K):
    q_block = (start + np.arange(K)) // K
    kv_mask = np.broadcast_to(key_block[None, :] <= q_block[:, None], (B, K, S))
    pos = np.broadcast_to(np.arange(start, start + K), (B, K))
    got, cache = step(params, cfg, cache, tokens=ids[:, start:start + K], positions=pos, start=start, kv_mask=kv_mask)
    np.testing.assert_allclose(got, want[:, start:start + K], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_kv_cache_two_blocks_at_once(tiny, golden):
  """A 2K-query forward (previous block recomputed with the current one) matches too."""
  cfg, params = tiny
  ids = golden["input_ids"]
  B, L = ids.shape
  want = dmax_jax.forward(params, cfg, tokens=ids, mask=golden["mask_block_causal"])
  cache = dmax_jax.init_cache(cfg, B, L)
  blk = np.arange(L) // 8
  full = blk[None, :] <= blk[:, None]
  _, cache = dmax_jax.forward_cached(params, cfg, cache, tokens=ids[:, :8], start=0, kv_mask=np.broadcast_to(full[:8], (B, 8, L)))
  got, _ = dmax_jax.forward_cached(
      params, cfg, cache, tokens=ids[:, 8:], positions=np.arange(8, L), start=8, kv_mask=np.broadcast_to(full[8:], (B, 16, L)))
  np.testing.assert_allclose(got, want[:, 8:], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_scan_equals_loop(tiny, golden):
  cfg, params = tiny
  ids, m = golden["input_ids"], golden["mask_block_causal"]
  a = dmax_jax.forward(params, with_numerics(cfg, scan_layers=True), tokens=ids, mask=m)
  b = dmax_jax.forward(params, with_numerics(cfg, scan_layers=False), tokens=ids, mask=m)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_grouped_equals_dense_moe(tiny):
  cfg, params = tiny
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 40))
  a = dmax_jax.forward(params, with_numerics(cfg, moe_backend="grouped"), tokens=ids)
  b = dmax_jax.forward(params, with_numerics(cfg, moe_backend="dense"), tokens=ids)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_jit_equals_eager(tiny, golden):
  cfg, params = tiny
  ids = golden["input_ids"]
  with jax.disable_jit():
    eager = dmax_jax.forward(params, cfg, tokens=ids)
  jitted = jax.jit(dmax_jax.forward, static_argnums=1)(params, cfg, tokens=ids)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_remat_gradients_equal(tiny, golden):
  cfg, params = tiny
  ids = golden["input_ids"]

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(dmax_jax.forward(p, c, tokens=ids))[..., 0])

  g1 = jax.grad(loss)(params, with_numerics(cfg, remat=False))
  g2 = jax.grad(loss)(params, with_numerics(cfg, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_bf16_compute_close_and_fp32_logits(tiny, golden):
  cfg, params = tiny
  logits = dmax_jax.forward(params, with_numerics(cfg, compute_dtype="bfloat16"), tokens=golden["input_ids"])
  assert logits.dtype == jnp.float32
  err = np.linalg.norm(logits - golden["logits_full"]) / np.linalg.norm(golden["logits_full"])
  assert err < 6e-2, err  # bf16 rounding (~3e-2 here), far from a wrong model (~1)


def test_bad_mask_is_rejected(tiny, golden):
  cfg, params = tiny
  with pytest.raises(ValueError, match="boolean"):
    dmax_jax.forward(params, cfg, tokens=golden["input_ids"], mask=np.ones((24, 24), np.float32))
  with pytest.raises(ValueError, match=r"\[L, L\]"):
    dmax_jax.forward(params, cfg, tokens=golden["input_ids"], mask=np.ones((23, 23), bool))


def test_full_size_param_count_without_allocating():
  cfg = dmax_jax.llada2_mini()
  abstract = jax.eval_shape(lambda k: dmax_jax.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert n == dmax_jax.count_params(cfg) == 16_255_643_392
  assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) == 2 * n  # 32.5 GB in bf16
  assert abstract["moe"]["w_gate"].shape == (19, 256, 2048, 512)
  assert abstract["dense"]["qkv"].shape == (1, 2048, (16 + 8) * 128)


def test_model_helpers_match_hand_computation():
  """RMSNorm and the rotate-half RoPE on small hand-checked inputs."""
  x = jnp.array([[3.0, 4.0]])
  np.testing.assert_allclose(model_lib.rms_norm(x, jnp.array([1.0, 2.0]), 0.0), [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)
  cfg = dmax_jax.llada2_mini()
  q = jnp.arange(128, dtype=jnp.float32).reshape(1, 1, 1, 128)
  out = model_lib.rope(q, jnp.array([[1]]), cfg)
  # First frequency pair (dims 0 and 32) rotates by angle 1 rad; dims >= 64 pass through.
  c, s = np.cos(1.0), np.sin(1.0)
  np.testing.assert_allclose(out[0, 0, 0, 0], 0 * c - 32 * s, rtol=1e-5)
  np.testing.assert_allclose(out[0, 0, 0, 32], 32 * c + 0 * s, rtol=1e-5)
  np.testing.assert_array_equal(out[0, 0, 0, 64:], q[0, 0, 0, 64:])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "tokamax"])
def test_fused_attention_gradients_close_to_xla_gpu(impl):
  """Fused flash attention under the [x_t ; x_0] mask at training length: output and gradients vs plain XLA, bf16."""
  if impl == "tokamax":
    pytest.importorskip("tokamax")
  from dmax_jax.training import diffusion  # pylint: disable=import-outside-toplevel

  B, L, H, G, R = 2, 2048, 16, 4, 128
  k = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k[0], (B, 2 * L, H, R), jnp.bfloat16)
  kk, v = (jax.random.normal(kx, (B, 2 * L, G, R), jnp.bfloat16) for kx in k[1:3])
  ct = jax.random.normal(k[3], (B, 2 * L, H, R), jnp.bfloat16)
  mask = jnp.broadcast_to(diffusion.bd_attention_mask(L, 32), (B, 2 * L, 2 * L))

  def vjp(impl, q, kk, v, ct):
    out, pull = jax.vjp(lambda *a: model_lib.attend(*a, mask, impl), q, kk, v)
    return (out,) + pull(ct)

  fused = jax.jit(lambda *a: vjp(impl, *a))
  got, want = fused(q, kk, v, ct), jax.jit(lambda *a: vjp("xla", *a))(q, kk, v, ct)
  hlo = fused.lower(q, kk, v, ct).as_text()
  assert ("cudnn" if impl == "cudnn" else "mosaic") in hlo.lower()  # the fused kernel, not the XLA fallback
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.float32(a), np.float32(b)
    assert np.isfinite(a).all(), name
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, name


@pytest.mark.slow  # ~20 s on 2 cores: the default suite stays under 10 minutes
def test_halves_mask_equals_the_whole_mask(tiny):
  """The [x_t ; x_0] attention as two halves (no clean-over-noisy quarter): the same hidden states and gradients."""
  from dmax_jax.training import diffusion  # pylint: disable=import-outside-toplevel

  cfg, params = tiny
  L, K = 12, 4
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 500, (2, 2 * L)), jnp.int32)
  pos = diffusion.bd_positions(L)

  def hidden_sum(p, mask):
    h, _ = model_lib.forward_hidden(p, cfg, tokens=ids, positions=pos, mask=mask)
    return jnp.sum(h * jnp.cos(jnp.arange(h.size).reshape(h.shape))), h

  halves = model_lib.HalvesMask(*diffusion.bd_attention_halves(L, K))
  grad = jax.jit(jax.value_and_grad(hidden_sum, has_aux=True))
  (_, got), g_got = grad(params, halves)
  (_, want), g_want = grad(params, diffusion.bd_attention_mask(L, K))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  full = np.asarray(diffusion.bd_attention_mask(L, K))
  assert not full[L:, :L].any()  # the quarter the halves leave out is empty
  np.testing.assert_array_equal(np.asarray(halves.first), full[:L])
