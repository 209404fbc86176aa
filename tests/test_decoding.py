"""generate() against a plain NumPy re-statement of the spec, and its contracts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmax_jax
from dmax_jax.decoding import SPD, Threshold, generate
from decoding_reference import reference_decode

GEN = 16


@pytest.fixture(scope="module")
def sharp(tiny):
  """The fixture model with sharper logits (so thresholds decode several tokens a step) and an eos
  that takes over one frequent token (so eos early stop happens).

  Exact token equality runs on the dense MoE backend: on a random model SPD keeps revising for many
  steps and amplifies float rounding, and the grouped backend's matmuls round differently when other
  sequences share the batch (XLA picks kernels by shape). ``test_grouped_backend_same_tokens``
  covers the fast backend.
  """
  cfg, params = tiny
  cfg = dataclasses.replace(cfg, moe_backend="dense")
  params = dict(params)
  W = np.array(params["lm_head"]) * 6.0
  # A pull towards each position's own input token, as a trained model has: a decoded token then
  # tends to confirm itself, so SPD's revision loop settles instead of amplifying float rounding.
  W += np.array(params["embed"]).T
  params["lm_head"] = jnp.asarray(W)
  # eos takes over the token the model most often predicts for masked positions.
  canvas = np.array([[5, 6, 7] + [cfg.mask_token_id] * 29, [9] * 13 + [cfg.mask_token_id] * 19])
  guess = np.asarray(dmax_jax.forward(params, cfg, tokens=canvas)).argmax(-1)[canvas == cfg.mask_token_id]
  W[:, cfg.eos_token_id] = W[:, np.bincount(guess).argmax()] * 1.1
  params["lm_head"] = jnp.asarray(W)
  return cfg, params


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 510, n).tolist() for n in (3, 13, 8)]  # end mid-block for K = 4 and 8


@pytest.mark.parametrize("block_length", [8, 4])
@pytest.mark.parametrize("kind", ["spd", "threshold"])
def test_generate_matches_reference(sharp, prompts, block_length, kind):
  cfg, params = sharp
  for tau in (0.0, 0.3, 0.9):
    strategy = SPD(threshold=tau) if kind == "spd" else Threshold(threshold=tau)
    out = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=block_length)
    for p, o in zip(prompts, out):
      want_tokens, want_nfe = reference_decode(params, cfg, p, strategy=strategy, gen_length=GEN, block_length=block_length)
      assert o.tokens == want_tokens, (tau, p)
      assert o.nfe == want_nfe, (tau, p)
      assert o.prefill_calls == int(len(p) >= block_length)


@pytest.mark.parametrize("strategy", [SPD(threshold=0.5), Threshold(threshold=0.5)])
def test_eos_early_stop_matches_reference(sharp, prompts, strategy):
  cfg, params = sharp
  params = dict(params)
  W = np.array(params["lm_head"])
  W[:, cfg.eos_token_id] *= 1.3  # eos now wins often: sequences stop early
  params["lm_head"] = jnp.asarray(W)
  out = generate(params, cfg, prompts, strategy=strategy, gen_length=24, block_length=8)
  stopped = 0
  for p, o in zip(prompts, out):
    assert (o.tokens, o.nfe) == reference_decode(params, cfg, p, strategy=strategy, gen_length=24, block_length=8)
    assert cfg.eos_token_id not in o.tokens
    stopped += len(o.tokens) < -(-(len(p) + 24) // 8) * 8 - len(p)
  assert stopped > 0  # the early-stop path really ran


def test_spd_top2_matches_reference(sharp, prompts):
  cfg, params = sharp
  strategy = SPD(threshold=0.5, top_k=2)
  out = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=4)
  for p, o in zip(prompts, out):
    assert (o.tokens, o.nfe) == reference_decode(params, cfg, p, strategy=strategy, gen_length=GEN, block_length=4)


def test_batch_equals_each_alone(sharp, prompts):
  cfg, params = sharp
  strategy = SPD(threshold=0.5)
  batch = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=8)
  for p, b in zip(prompts, batch):
    (alone,) = generate(params, cfg, [p], strategy=strategy, gen_length=GEN, block_length=8)
    assert (alone.tokens, alone.nfe) == (b.tokens, b.nfe)


def test_threshold_one_decodes_one_token_per_step(sharp, prompts):
  cfg, params = sharp
  (out,) = generate(params, cfg, prompts[:1], strategy=Threshold(threshold=1.0), gen_length=GEN, block_length=8, trace=True)
  assert out.trace
  for step in out.trace:
    assert step.status.count("new") == 1
  assert out.nfe == len(out.trace)


def test_spd_zero_threshold_decodes_whole_block_first(sharp, prompts):
  cfg, params = sharp
  (out,) = generate(params, cfg, prompts[1:2], strategy=SPD(threshold=0.0), gen_length=GEN, block_length=8, trace=True)
  first_steps = [s for s in out.trace if s.step == 0]
  assert len(first_steps) >= 2
  for s in first_steps:
    assert "mask" not in s.status
    assert s.status.count("new") == sum(st != "prompt" for st in s.status)


def test_trace_is_consistent(sharp, prompts):
  cfg, params = sharp
  (out,) = generate(params, cfg, prompts[2:], strategy=SPD(threshold=0.5), gen_length=GEN, block_length=8, trace=True)
  assert len(out.trace) == out.nfe
  prev = None
  for s in out.trace:
    if prev is not None and prev.block == s.block:
      for a, b, st in zip(prev.tokens, s.tokens, s.status):
        assert st != "same" or a == b
        assert st != "revised" or a != b
    prev = s


def test_sampling_is_seeded(sharp, prompts):
  cfg, params = sharp
  strategy = SPD(threshold=0.5, temperature=1.0)
  a = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=8, rng=jax.random.key(1))
  b = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=8, rng=jax.random.key(1))
  c = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=8, rng=jax.random.key(2))
  assert [o.tokens for o in a] == [o.tokens for o in b]
  assert [o.tokens for o in a] != [o.tokens for o in c]


def test_bad_inputs(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="prompt 1: no tokens"):
    generate(params, cfg, [[1, 2], []], strategy=SPD(), gen_length=8, block_length=8)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(params, cfg, [[1] * 250], strategy=SPD(), gen_length=8, block_length=8)
  with pytest.raises(ValueError, match="gen_length must be positive"):
    generate(params, cfg, [[1]], strategy=SPD(), gen_length=0, block_length=8)
  with pytest.raises(TypeError):
    generate(params, cfg, [[1]], strategy="spd", gen_length=8)


def test_grouped_backend_same_tokens(sharp, prompts):
  cfg, params = sharp
  strategy = Threshold(threshold=0.5)
  want = generate(params, cfg, prompts, strategy=strategy, gen_length=GEN, block_length=8)
  got = generate(params, dataclasses.replace(cfg, moe_backend="grouped"), prompts, strategy=strategy, gen_length=GEN,
                 block_length=8)
  assert [(o.tokens, o.nfe) for o in got] == [(o.tokens, o.nfe) for o in want]
