"""Decoding with the weights split over 8 emulated CPU devices gives the single-device tokens.

Token equality is exact as an algorithm, so it is checked in float64: in float32 the split sums round
differently from one device's, and SPD's revision loop on a random model amplifies that until a token
flips (by how much depends on the CPU's vector width).

Experts are split over the ``expert`` axis and heads / widths over ``tensor`` by the same
``dmax_jax.sharding`` rules training uses; XLA partitions the compiled decoding program, except the
Pallas MoE kernels, which run expert-parallel under ``shard_map`` when a mesh is set.
Runs in a subprocess because the device count is fixed when JAX starts.
"""

import pytest
import os
import subprocess
import sys
import textwrap

from conftest import REPO, TINY

SCRIPT = textwrap.dedent("""
  import dataclasses, sys
  import numpy as np, jax, jax.numpy as jnp
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_enable_x64", True)
  import dmax_jax
  from dmax_jax import sharding
  from dmax_jax.decoding import SPD, Threshold, generate
  assert jax.device_count() == 8
  cfg, params = dmax_jax.load_hf_checkpoint(sys.argv[1], moe_backend="grouped")
  cfg = dataclasses.replace(cfg, compute_dtype="float64")
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), dict(params))
  assert params["lm_head"].dtype == jnp.float64
  # sharper logits with a pull to each position's own token, as in test_decoding's model
  params["lm_head"] = jnp.asarray(np.array(params["lm_head"]) * 6.0 + np.array(params["embed"]).T)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 510, n).tolist() for n in (3, 13, 8, 5)]
  for axes, strategy in [(dict(expert=4, tensor=2), Threshold(threshold=0.5)), (dict(expert=8), SPD(threshold=0.5))]:
    mesh = sharding.make_mesh(axes)
    sharded = jax.device_put(params, sharding.tree_shardings(mesh, params))
    assert len(sharded["moe"]["w_gate"].sharding.device_set) == 8
    want = generate(params, cfg, prompts, strategy=strategy, gen_length=16, block_length=8)
    got = generate(sharded, cfg, prompts, strategy=strategy, gen_length=16, block_length=8)
    assert [(o.tokens, o.nfe) for o in got] == [(o.tokens, o.nfe) for o in want], axes
  # The Pallas backend splits the experts itself (shard_map over the mesh's expert axis, a psum of the
  # partial outputs) when a mesh is set; single-device dense decoding is the reference.
  pcfg, dcfg = (dataclasses.replace(cfg, moe_backend=b) for b in ("pallas", "dense"))
  want = generate(params, dcfg, prompts, strategy=SPD(threshold=0.5), gen_length=16, block_length=8)
  for axes in (dict(expert=8), dict(expert=2, tensor=2, data=2)):
    mesh = sharding.make_mesh(axes)
    sharded = jax.device_put(params, sharding.tree_shardings(mesh, params))
    with jax.set_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(lambda p: dmax_jax.forward(p, pcfg, tokens=jnp.ones((1, 4), jnp.int32)))(sharded))
      assert "shard_map" in jaxpr and "psum" in jaxpr, axes
      got = generate(sharded, pcfg, prompts, strategy=SPD(threshold=0.5), gen_length=16, block_length=8)
    assert [(o.tokens, o.nfe) for o in got] == [(o.tokens, o.nfe) for o in want], axes
  print("OK")
""")


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_expert_and_tensor_sharded_decoding_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY)], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
