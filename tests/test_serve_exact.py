"""Exact under concurrency: requests served together decode exactly as each prompt alone.

24 requests of mixed prompt lengths, max_tokens, strategies, thresholds and
temperatures arrive at random times over the real HTTP path (the official
``openai`` client, streaming and not) at a float64 server of 4 slots; every
response's token ids and forward count (NFE) equal ``decoding.generate`` on
that prompt alone, cut at max_tokens. In float64 the rounding of different
batch shapes stays ~1e-16, so equality is the algorithm's (the README's
"batch decodes like each prompt alone").
"""

import concurrent.futures
import dataclasses
import time

import jax
import numpy as np
import pytest

from conftest import TINY
from dmax_jax import decoding, forward
from dmax_jax.apps import runner
from dmax_jax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from dmax_jax.decoding import LowConfidence, SPD, Threshold
from dmax_jax.tokenizer import train_tokenizer
from serve_fixtures import start_server
from tiny_ckpt import TEXTS

openai = pytest.importorskip("openai")

K = 4  # block length: one reference layout per group below


def _settling_checkpoint(path):
  """The tiny fixture with sharper logits pulled towards each position's own input token (as a trained model's:
  SPD then settles) and an eos that takes over a frequent prediction (so requests end at eos too)."""
  cfg, params = load_hf_checkpoint(str(TINY))
  params = jax.tree.map(np.asarray, params)
  W = params["lm_head"] * 6.0 + params["embed"].T
  params["lm_head"] = W
  canvas = np.array([[5, 6, 7] + [cfg.mask_token_id] * 13, [9] * 6 + [cfg.mask_token_id] * 10])
  guess = np.asarray(forward(params, cfg, tokens=canvas)).argmax(-1)[canvas == cfg.mask_token_id]
  W[:, cfg.eos_token_id] = W[:, np.bincount(guess).argmax()] * 1.05
  save_hf_checkpoint(params, cfg, str(path))
  train_tokenizer(TEXTS, vocab_size=512, out_dir=str(path))
  return str(path)


def _requests():
  """24 requests: prompts of 1-7 ids (their alone layouts are one: K=4, one prefill block at most, five decoding
  blocks), so the references compile once per strategy."""
  rng = np.random.default_rng(7)
  out = []
  for i in range(24):
    P = int(rng.integers(1, 8))
    span = (17, 20) if P < 4 else (21, 24)  # prompt + max_tokens: five decoding blocks
    G = int(rng.integers(*span, endpoint=True)) - P
    name = ("spd", "threshold", "low_confidence")[i % 3]
    out.append(dict(ids=rng.integers(0, 500, P).tolist(), max_tokens=G, strategy=name,
                    threshold=float(rng.choice([0.3, 0.5, 0.7, 0.9])), temperature=0.8 if i % 8 == 5 else 0.0,
                    seed=int(rng.integers(0, 1000)), stream=bool(i % 2), delay=float(rng.uniform(0, 0.3))))
  return out


def _reference(params, cfg, r):
  template = {"spd": SPD(), "threshold": Threshold(), "low_confidence": LowConfidence(k=3)}[r["strategy"]]
  fields = {"temperature": r["temperature"]}
  if r["strategy"] != "low_confidence":
    fields["threshold"] = r["threshold"]
  g = decoding.generate(params, cfg, [r["ids"]], strategy=dataclasses.replace(template, **fields),
                        gen_length=r["max_tokens"], block_length=K, rng=jax.random.key(r["seed"]))[0]
  return g.tokens[:r["max_tokens"]], g.nfe


def _ask(client, r):
  time.sleep(r["delay"])
  extra = {"strategy": r["strategy"], "threshold": r["threshold"], "return_token_ids": True}
  kw = dict(model="tiny", prompt=r["ids"], max_tokens=r["max_tokens"], temperature=r["temperature"],
            seed=r["seed"], extra_body=extra)
  if not r["stream"]:
    resp = client.completions.create(**kw)
    return resp.choices[0].model_extra["token_ids"], resp.usage.model_extra["nfe"]
  ids, nfe = [], None
  for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
    for choice in chunk.choices:
      ids += choice.model_extra.get("token_ids") or []
    if chunk.usage is not None:
      nfe = chunk.usage.model_extra["nfe"]
  return ids, nfe


def test_concurrent_requests_equal_generate_alone(tmp_path):
  ckpt = _settling_checkpoint(tmp_path / "ckpt")
  url, engine, stop = start_server(ckpt, dtype="float64", block_length=K, max_slots=4, window=32,
                                   slot_buckets=(4,), row_buckets=(4,), k=3)
  try:
    requests = _requests()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
      served = list(pool.map(lambda r: _ask(client, r), requests))
    assert engine.stats()["running"] == 0
    with runner.precision("float64"):
      cfg, params, _ = runner.load_model(ckpt, "float64", "xla")  # as the server loads it
      expected = [_reference(params, cfg, r) for r in requests]
  finally:
    stop()
  mismatched = [(i, got, want) for i, (got, want) in enumerate(zip(served, expected)) if tuple(got) != want]
  assert not mismatched, mismatched[:3]
  # the workload covers what it claims: every strategy, sampling, eos and max_tokens endings, several slots busy
  assert {r["strategy"] for r in requests} == {"spd", "threshold", "low_confidence"}
  lengths = [len(ids) for ids, _ in served]
  assert any(n < r["max_tokens"] for n, r in zip(lengths, requests)), "no request ended at eos"
  assert any(n == r["max_tokens"] for n, r in zip(lengths, requests)), "no request ended at max_tokens"
