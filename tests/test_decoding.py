"""generate() against a plain NumPy re-statement of the spec, and its contracts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmax_jax
from dmax_jax.decoding import SPD, LowConfidence, Threshold, generate
from dmax_jax.decoding import engine
from dmax_jax.decoding.strategy import StepView
from decoding_reference import reference_decode

GEN = 16


@pytest.fixture(scope="module", autouse=True)
def x64():
  """Every exact-equality test here runs in float64.

  On a random model SPD keeps revising for many steps and amplifies rounding: in float32 a batch and
  a prompt alone (or the engine and the oracle) round differently (XLA picks kernels by shape and by
  CPU: AVX-512 and AVX2 machines differ) and, a few steps later, pick different tokens. In float64
  the same rounding stays ~1e-16 and the decisions are the algorithm's. ``test_float32_*`` below
  checks float32 against float64 within a stated tolerance.
  """
  with jax.enable_x64(True):
    yield


def _float64(cfg, params):
  return dataclasses.replace(cfg, compute_dtype="float64"), jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


@pytest.fixture(scope="module")
def sharp(tiny):
  """The fixture model in float64 with sharper logits (so thresholds decode several tokens a step)
  and an eos that takes over one frequent token (so eos early stop happens). Dense MoE backend;
  ``test_grouped_backend_same_tokens`` covers the grouped one."""
  cfg, params = tiny
  cfg, params = _float64(dataclasses.replace(cfg, moe_backend="dense"), params)
  params = dict(params)
  W = np.array(params["lm_head"]) * 6.0
  # A pull towards each position's own input token, as a trained model has: a decoded token then
  # tends to confirm itself, so SPD's revision loop settles.
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


# block 8 (24 s with its setup) is slow-marked to keep the default suite under ten minutes; block 4 checks both rules
@pytest.mark.parametrize("block_length", [pytest.param(8, marks=pytest.mark.slow), 4])
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


LOW_CONFIDENCE_KS = (1, 3, 5)  # 5 > a block of 4: every mask at once


def _per_row(ks):
  return LowConfidence(k=np.asarray(ks)[:, None])  # [B, 1]: one k per row


@pytest.fixture(scope="module")
def low_confidence_runs(sharp, prompts):
  """{k: generate of the whole batch, blocks of 4, every row at k}. k is traced and given as a [B, 1] array (one
  k per row), so these runs and ``test_low_confidence_per_row_k``'s share one compiled program (compiles are what
  these tests cost); the prompt decoded alone gives k as a scalar."""
  cfg, params = sharp
  compiled = len(engine._PROGRAMS)  # pylint: disable=protected-access
  runs = {k: generate(params, cfg, prompts, strategy=_per_row([k] * len(prompts)), gen_length=GEN, block_length=4)
          for k in LOW_CONFIDENCE_KS}
  assert len(engine._PROGRAMS) <= compiled + 1  # pylint: disable=protected-access
  return runs


def test_low_confidence_matches_reference(sharp, prompts, low_confidence_runs):
  cfg, params = sharp
  for k, out in low_confidence_runs.items():
    strategy = LowConfidence(k=k)
    for p, o in zip(prompts, out):
      assert (o.tokens, o.nfe) == reference_decode(params, cfg, p, strategy=strategy, gen_length=GEN,
                                                   block_length=4), (k, p)
      assert o.prefill_calls == int(len(p) >= 4)


def test_low_confidence_alone_equals_batch_and_decodes_k_per_step(sharp, prompts, low_confidence_runs):
  cfg, params = sharp
  (alone,) = generate(params, cfg, prompts[1:2], strategy=LowConfidence(k=3), gen_length=GEN, block_length=4,
                      trace=True)
  batch = low_confidence_runs[3][1]
  assert (alone.tokens, alone.nfe) == (batch.tokens, batch.nfe)
  assert len(alone.trace) == alone.nfe
  for s in alone.trace:
    masks_before = s.status.count("new") + s.status.count("mask")
    assert s.status.count("new") == min(3, masks_before)
    assert s.status.count("revised") == 0


def test_low_confidence_per_row_k(sharp, prompts, low_confidence_runs):
  """k as a [B, 1] array (one k per row): select equals each row's scalar call; generate's rows equal the
  scalar-k batches'."""
  rng = np.random.default_rng(1)
  B, K = 6, 8
  p = rng.choice([0.1, 0.25, 0.5, 0.75, 0.9], size=(B, K))  # few values: many ties
  masked = rng.random((B, K)) < 0.7
  x = np.where(masked, 511, 7)
  view = StepView(x=jnp.asarray(x), active=jnp.asarray(masked), masked=jnp.asarray(masked), x0=jnp.asarray(x),
                  p=jnp.asarray(p), probs=None, mask_id=511)
  ks = [1, 2, 3, 5, 8, 9]
  rows = np.asarray(_per_row(ks).select(view))
  for b, k in enumerate(ks):
    alone = np.asarray(LowConfidence(k=k).select(view))[b]
    np.testing.assert_array_equal(rows[b], alone)
    want = sorted(np.nonzero(masked[b])[0], key=lambda j: (-p[b, j], j))[:k]  # the rule, restated
    assert sorted(np.nonzero(alone)[0].tolist()) == sorted(int(j) for j in want)
  cfg, params = sharp
  ks = LOW_CONFIDENCE_KS[::-1]  # row i gets its own k
  per_row = generate(params, cfg, prompts, strategy=_per_row(ks), gen_length=GEN, block_length=4)
  for i, (k, o) in enumerate(zip(ks, per_row)):
    want = low_confidence_runs[k][i]
    assert (o.tokens, o.nfe) == (want.tokens, want.nfe), k


def test_low_confidence_check():
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="k must be"):
      LowConfidence(k=bad).check()
  LowConfidence(k=1).check()
  assert dmax_jax.decoding.make("low_confidence", threshold=0.3, k=4) == LowConfidence(k=4)


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


def test_sharp_model_really_runs_in_float64(sharp, prompts):
  cfg, params = sharp
  assert params["lm_head"].dtype == jnp.float64
  logits = dmax_jax.forward(params, cfg, tokens=jnp.asarray([prompts[0]]))
  assert logits.dtype == jnp.float64


@pytest.mark.slow  # ~20 s on 2 cores: the default suite stays under 10 minutes
def test_float32_agrees_with_float64_within_rounding(sharp, prompts):
  """float32 decoding computes the same confidences as float64 up to float32 rounding.

  Whole float32 decodes are not compared token for token: SPD's revision loop on a random model
  amplifies rounding step after step (see ``x64``). The first step of every sequence's first block
  sees the same canvas in both precisions, so its confidences must agree to ~1e-5: we allow 1e-4
  (float32's epsilon is 1.2e-7; the forward has a few hundred accumulations per output).
  """
  cfg64, params64 = sharp
  cfg32 = dataclasses.replace(cfg64, compute_dtype="float32")
  params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params64)
  strategy = SPD(threshold=0.5)
  kw = dict(strategy=strategy, gen_length=GEN, block_length=8, trace=True)
  want = generate(params64, cfg64, prompts, **kw)
  got = generate(params32, cfg32, prompts, **kw)
  alone = [generate(params32, cfg32, [p], **kw)[0] for p in prompts]
  for w, g, a in zip(want, got, alone):
    first64, first32, first_alone = w.trace[0], g.trace[0], a.trace[0]
    assert (first32.block, first32.step) == (first64.block, first64.step) == (0 + first64.block, 0)
    np.testing.assert_allclose(first32.confidence, first64.confidence, atol=1e-4)
    np.testing.assert_allclose(first_alone.confidence, first64.confidence, atol=1e-4)
