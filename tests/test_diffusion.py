"""Contract tests of the block-diffusion training primitives and losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.training import diffusion
from dmax_jax.training import losses
from dmax_jax.training.diffusion import IGNORE
from dmax_jax.model.transformer import forward


def test_bd_attention_mask_small_case():
  # L = 4, block 2: noisy rows 0..3 (blocks 0,0,1,1), clean rows 4..7 (blocks 0,0,1,1).
  want = np.array([
      # noisy keys  | clean keys
      [1, 1, 0, 0,   0, 0, 0, 0],  # noisy 0: own block; no earlier clean block
      [1, 1, 0, 0,   0, 0, 0, 0],
      [0, 0, 1, 1,   1, 1, 0, 0],  # noisy 2: own block + clean block 0
      [0, 0, 1, 1,   1, 1, 0, 0],
      [0, 0, 0, 0,   1, 1, 0, 0],  # clean 0: clean block 0 only, never noisy
      [0, 0, 0, 0,   1, 1, 0, 0],
      [0, 0, 0, 0,   1, 1, 1, 1],  # clean 2: clean blocks 0 and 1
      [0, 0, 0, 0,   1, 1, 1, 1],
  ], bool)
  np.testing.assert_array_equal(np.asarray(diffusion.bd_attention_mask(4, 2)), want)


def test_bd_attention_mask_uneven_tail_and_positions():
  # L = 5, block 2: the last block holds one position.
  m = np.asarray(diffusion.bd_attention_mask(5, 2))
  assert m.shape == (10, 10)
  assert m[4, 4] and not m[4, 3]  # noisy 4 alone in block 2
  np.testing.assert_array_equal(m[4, 5:], [1, 1, 1, 1, 0])  # clean blocks 0, 1 before it
  np.testing.assert_array_equal(m[9, 5:], [1, 1, 1, 1, 1])
  assert not m[5:, :5].any()
  np.testing.assert_array_equal(np.asarray(diffusion.bd_positions(3)), [0, 1, 2, 0, 1, 2])


def test_labels_prompt_ignored_and_eos_cap():
  E = 9
  ids = np.array([
      [1, 2, 3, 4, E, 5, E, E, E, E],  # an eos inside the answer keeps its label
      [1, 2, 3, 4, 5, 6, 7, 8, 8, 8],  # truncated: no trailing eos
      [1, 2, E, E, E, E, E, E, E, E],  # prompt of 2, answer is eos only
  ])
  labels = diffusion.make_labels(ids, np.array([3, 2, 2]), eos_id=E, eos_cap=2)
  I = IGNORE
  want = np.array([
      [I, I, I, 4, E, 5, E, E, I, I],
      [I, I, 3, 4, 5, 6, 7, 8, 8, 8],
      [I, I, E, E, I, I, I, I, I, I],
  ])
  np.testing.assert_array_equal(labels, want)
  # The same on device arrays.
  np.testing.assert_array_equal(np.asarray(diffusion.make_labels(jnp.asarray(ids), jnp.array([3, 2, 2]), E, 2)), want)


def test_labels_default_cap_is_32():
  ids = np.full((1, 50), 7)
  ids[0, :5] = 1
  labels = diffusion.make_labels(ids, np.array([3]), eos_id=7)
  assert (labels[0] != IGNORE).sum() == 2 + 32


def test_noise_never_masks_prompt_and_rate_matches_t():
  B, L = 64, 200
  ids = jnp.ones((B, L), jnp.int32)
  prompt = jnp.arange(B) % 50
  maskable = diffusion.answer_mask(prompt, L)
  keys = jax.random.split(jax.random.PRNGKey(0), B)
  noise = jax.jit(diffusion.add_noise, static_argnums=(3, 4, 5))
  x_t, masked, t = noise(keys, ids, maskable, 99, 0.75, 0.75)
  x_t, masked, t = map(np.asarray, (x_t, masked, t))
  for b in range(B):
    assert not masked[b, : int(prompt[b])].any()
  np.testing.assert_array_equal(x_t == 99, masked)
  np.testing.assert_allclose(t, 0.75)
  rate = masked.sum() / np.asarray(maskable).sum()
  assert abs(rate - 0.75) < 0.01
  # t drawn per example in [low, high]; t = 1 masks every answer position.
  _, m1, _ = noise(keys, ids, maskable, 99, 1.0, 1.0)
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(maskable))
  _, _, t2 = noise(keys, ids, maskable, 99, 0.2, 0.4)
  assert 0.2 <= np.asarray(t2).min() and np.asarray(t2).max() <= 0.4 and np.asarray(t2).std() > 0.02


def test_noise_of_a_row_depends_only_on_its_key():
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  ids = jnp.zeros((4, 32), jnp.int32)
  maskable = jnp.ones((4, 32), bool)
  noise = jax.jit(diffusion.add_noise, static_argnums=(3, 4, 5))
  _, m_all, _ = noise(keys, ids, maskable, 1, 0.5, 0.5)
  _, m_two, _ = noise(keys[2:], ids[2:], maskable[2:], 1, 0.5, 0.5)
  np.testing.assert_array_equal(np.asarray(m_all[2:]), np.asarray(m_two))


def test_oput_substitution_touches_exactly_masked_on_policy_positions():
  rng = np.random.default_rng(0)
  B, L, V, M = 3, 6, 10, 9
  logits = rng.normal(size=(B, L, V)).astype(np.float32)
  logits[..., M] = -10.0  # the rollout takes a plain argmax; a trained model never predicts the mask
  x_t = rng.integers(0, 8, size=(B, L))
  masked = rng.random((B, L)) < 0.5
  masked[:, 0] = True
  x_t[masked] = M
  on_policy = np.array([True, False, True])
  out = np.asarray(diffusion.oput_substitute(jnp.asarray(x_t), jnp.asarray(masked), jnp.asarray(logits), on_policy))
  write = masked & on_policy[:, None]
  np.testing.assert_array_equal(out[~write], x_t[~write])
  np.testing.assert_array_equal(out[write], logits.argmax(-1)[write])
  assert not (out[on_policy] == M).any()  # on-policy rows hold no mask any more
  np.testing.assert_array_equal(out[1], x_t[1])


def _np_bd_mask(L, K):
  m = np.zeros((2 * L, 2 * L), bool)
  for q in range(2 * L):
    for k in range(2 * L):
      bq, bk = (q % L) // K, (k % L) // K
      if q < L:
        m[q, k] = bq == bk if k < L else bk < bq
      else:
        m[q, k] = k >= L and bk <= bq
  return m


def _np_loss(logits, labels, weight):
  logits = logits.astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.where(weight, labels, 0)[..., None], -1)[..., 0]
  return (nll * weight).sum() / weight.sum()


@pytest.fixture(scope="module")
def dense_tiny(tiny):
  cfg, params = tiny
  return dataclasses.replace(cfg, moe_backend="dense"), params  # the quickest backend to compile on CPU


@pytest.fixture(scope="module")
def fixture_batch(tiny):
  cfg, _ = tiny
  rng = np.random.default_rng(1)
  B, L = 2, 16
  ids = rng.integers(0, 500, size=(B, L)).astype(np.int32)
  ids[0, 12:] = cfg.eos_token_id
  prompt = np.array([4, 6], np.int32)
  labels = diffusion.make_labels(ids, prompt, cfg.eos_token_id, eos_cap=2)
  masked = (rng.random((B, L)) < 0.6) & (np.arange(L)[None] >= prompt[:, None])
  x_t = np.where(masked, cfg.mask_token_id, ids)
  return ids, prompt, labels, masked, x_t


@pytest.mark.parametrize("only_masked", [False, True])
def test_sft_loss_on_fixture_matches_numpy(dense_tiny, fixture_batch, only_masked):
  cfg, params = dense_tiny
  ids, _, labels, masked, x_t = fixture_batch
  L, K = ids.shape[1], 4
  full = jax.jit(lambda p, t, pos, m: forward(p, cfg, tokens=t, positions=pos, mask=m))(
      params, np.concatenate([x_t, ids], 1), np.concatenate([np.arange(L), np.arange(L)]), _np_bd_mask(L, K))
  weight = (labels != IGNORE) & (masked if only_masked else True)
  want = _np_loss(np.asarray(full)[:, :L], labels, weight)
  @jax.jit
  def loss(p, x_t, ids, labels, masked):
    return losses.bd_sft_loss(losses.noisy_logits(p, cfg, x_t, ids, K), labels, masked, only_masked=only_masked)

  got = loss(params, x_t, ids, labels, masked)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert 3.0 < want < 12.0  # a real cross-entropy over 512 tokens, not a degenerate one


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_oput_gradient_equals_gradient_with_substituted_constants(dense_tiny, fixture_batch):
  cfg, params = dense_tiny
  ids, prompt, labels, _, _ = fixture_batch
  obj = losses.Objective(block_length=4, noise_low=0.6, noise_high=0.6, oput=True)
  batch = {"ids": jnp.asarray(ids), "prompt_len": jnp.asarray(prompt), "labels": jnp.asarray(labels),
           "on_policy": jnp.array([True, False])}
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, k: losses.loss_sum(p, cfg, obj, b, k), has_aux=True))
  (total, count), g = grad_fn(params, batch, keys)

  # The same loss with the rollout done outside and its tokens fed in as constants.
  @jax.jit
  def substituted(p, b, k):
    x_t, masked = losses.corrupt(k, b, cfg, obj)
    roll = losses.noisy_logits(p, cfg, x_t, b["ids"], 4)
    return x_t, masked, diffusion.oput_substitute(x_t, masked, roll, b["on_policy"])

  x_t, masked, x_sub = map(np.asarray, substituted(params, batch, keys))
  changed = x_sub != x_t
  assert changed[0].sum() == masked[0].sum() > 0 and not changed[1].any()

  def const_loss(p, x_sub):
    logits = losses.noisy_logits(p, cfg, x_sub, batch["ids"], 4)
    return losses.cross_entropy_sum(logits, batch["labels"], batch["labels"] != IGNORE)[0]

  want_total, want_g = jax.jit(jax.value_and_grad(const_loss))(params, x_sub)
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-6)
  assert float(count) == (labels != IGNORE).sum()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7), g, want_g)


def test_off_policy_batch_skips_rollout(dense_tiny, fixture_batch):
  cfg, params = dense_tiny
  ids, prompt, labels, _, _ = fixture_batch
  batch = {"ids": jnp.asarray(ids), "prompt_len": jnp.asarray(prompt), "labels": jnp.asarray(labels),
           "on_policy": jnp.array([False, False])}
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  def run(obj):
    return jax.jit(lambda p, b, k: losses.loss_sum(p, cfg, obj, b, k))(params, batch, keys)

  oput, sft = run(losses.Objective(block_length=4, oput=True)), run(losses.Objective(block_length=4, oput=False))
  np.testing.assert_allclose(float(oput[0]), float(sft[0]), rtol=1e-6)
