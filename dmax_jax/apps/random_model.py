"""A model with random weights from a checkpoint directory's ``config.json`` and tokenizer, for speed benchmarks.

``random_model(DIR, "bfloat16", "auto", "uniform")`` reads only ``DIR/config.json`` and ``DIR``'s tokenizer and
draws the params on the device (``params.init_params``, jitted: nothing goes through the host), so a
LLaDA-2.0-mini-sized server or static decode starts without 32 GB of weights on disk
(``tools/make_bench_checkpoint.py`` writes such a directory). The same ``seed``, dtype and device give the same
params in every process. ``routing="uniform"`` replaces the router's choice by uniform random top-k per token
(``ModelConfig.routing``, as ``tools/bench_decode.py`` times it), which touches about as many experts as a trained
model does; random router weights route random hidden states to few experts.
"""

from __future__ import annotations

import os

import jax

from dmax_jax.apps import runner
from dmax_jax.model import params as params_lib
from dmax_jax.model.config import ROUTINGS, ConfigError, load_hf_config
from dmax_jax.tokenizer import TokenizerError, load_tokenizer


def random_model(checkpoint_dir: str, dtype: str = "bfloat16", kernels: str = "auto", routing: str = "uniform",
                 seed: int = 0):
  """(config, params, tokenizer): ``runner.load_model``'s triple with params drawn at random.

  ``dtype`` (a ``runner.DTYPES`` name) is the params' and the compute dtype (float64 only inside
  ``runner.precision("float64")``); ``kernels`` (``runner.KERNELS`` or ``auto``) picks the forward's MoE backend
  and attention; ``routing`` is "uniform" or "learned". Raises ``runner.UsageError`` naming the problem.
  """
  numerics = runner.KERNELS[runner.resolve_kernels(kernels)]
  if dtype not in runner.DTYPES:
    raise runner.UsageError(f"--dtype must be one of {', '.join(runner.DTYPES)}, got {dtype!r}")
  if dtype == "float64" and not jax.config.jax_enable_x64:
    raise runner.UsageError("--dtype float64 needs JAX's x64 mode: run inside runner.precision('float64')")
  if routing not in ROUTINGS:
    raise runner.UsageError(f"--routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
  if not os.path.isdir(checkpoint_dir):
    raise runner.UsageError(f"{checkpoint_dir}: no such checkpoint directory")
  try:
    tokenizer = load_tokenizer(checkpoint_dir)
    config = load_hf_config(checkpoint_dir, compute_dtype=dtype, routing=routing, **numerics)
  except (ConfigError, TokenizerError) as e:
    raise runner.UsageError(str(e)) from None
  params = jax.jit(lambda key: params_lib.init_params(config, key, runner.DTYPES[dtype]))(jax.random.key(seed))
  return config, params, tokenizer


PRESETS = ("mini", "tiny")  # LLaDA-2.0-mini; the two-layer test model
# What the bench tokenizer is trained on (it only has to render the chat template and decode; a random model's
# output ids past its vocabulary decode to nothing)
_TEXTS = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? Let's think step by step.",
          "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
          "How much did she earn? 12 / 60 = 0.2 per minute, 0.2 * 50 = 10. The answer is 10.",
          "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs, "
          "her parents give her $15 and her grandparents twice as much as her parents.") * 20


def write_bench_checkpoint(out_dir: str, preset: str = "mini", vocab_size: int = 1024) -> dict:
  """Writes ``config.json`` of ``preset`` and a small trained tokenizer (``vocab_size`` ids, a subset of the
  model's vocabulary) to ``out_dir``: a directory ``random_model`` reads (it holds no weights). Returns the
  config dict written."""
  import json  # pylint: disable=import-outside-toplevel

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dmax_jax.checkpoints.converted import hf_config_dict  # pylint: disable=import-outside-toplevel
  from dmax_jax.model import presets  # pylint: disable=import-outside-toplevel
  from dmax_jax.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel

  if preset not in PRESETS:
    raise runner.UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
  cfg = presets.llada2_mini() if preset == "mini" else presets.model_config(presets.TINY)
  if preset == "tiny":
    vocab_size = cfg.vocab_size  # the tokenizer's eos / mask ids are the model's
  if not 8 <= vocab_size <= cfg.vocab_size:
    raise runner.UsageError(f"--vocab must lie in [8, {cfg.vocab_size}] (the model's vocabulary), got {vocab_size}")
  os.makedirs(out_dir, exist_ok=True)
  train_tokenizer(_TEXTS, vocab_size=vocab_size, out_dir=out_dir)
  config = hf_config_dict(cfg, dtype=jnp.bfloat16)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return config
