"""Training-state checkpoints: round trip, keep-last-N, atomicity under a crash mid-save."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmax_jax.training.checkpoint import TrainCheckpointer
from conftest import REPO



def _state(seed, data=None):
  params = {"w": jax.random.normal(jax.random.key(seed), (4, 3)), "b": {"c": jnp.arange(5.0) + seed}}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
  return {"params": params, "opt_state": opt_state, "rng": jax.random.key(seed + 100),
          "data": data if data is not None else {"epoch": seed, "offset": 10 * seed}}


def _assert_state_equal(got, want):
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])
  got_opt, want_opt = jax.tree.leaves(got["opt_state"]), jax.tree.leaves(want["opt_state"])
  assert len(got_opt) == len(want_opt)  # without an abstract state NamedTuples come back as lists
  for a, b in zip(got_opt, want_opt):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(want["rng"]))
  assert got["data"] == want["data"]


def test_round_trip_restores_structure_and_types(tmp_path):
  state = _state(1)
  with TrainCheckpointer(str(tmp_path), max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    abstract = jax.eval_shape(lambda: state | {"data": None})
    got = ckpt.restore(abstract_state=abstract)
  assert got["step"] == 7
  _assert_state_equal(got, state)
  assert type(got["opt_state"][0]) is type(state["opt_state"][0])  # optax NamedTuples come back
  assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.uniform(got["rng"], (3,)), jax.random.uniform(state["rng"], (3,)))


def test_raw_key_and_int_data_and_no_abstract(tmp_path):
  state = _state(2, data=1234) | {"rng": jax.random.PRNGKey(5)}
  with TrainCheckpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state)
    ckpt.wait()
    got = ckpt.restore(3)
  assert got["data"] == 1234 and got["step"] == 3
  np.testing.assert_array_equal(got["rng"], state["rng"])
  jax.tree.map(np.testing.assert_array_equal, got["params"], state["params"])


def test_keeps_last_n_and_restores_older_steps(tmp_path):
  with TrainCheckpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, _state(step))
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30]
    _assert_state_equal(ckpt.restore(20), _state(20))
  assert sorted(os.listdir(tmp_path)) == ["20", "30"]
  # A new manager on the same directory sees the same steps (resuming).
  with TrainCheckpointer(str(tmp_path), max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 30
    _assert_state_equal(ckpt.restore(), _state(30))


def test_restore_without_checkpoint_is_an_error(tmp_path):
  with TrainCheckpointer(str(tmp_path)) as ckpt:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore()


def test_half_written_step_dir_is_ignored(tmp_path):
  with TrainCheckpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _state(1))
  # What a save interrupted mid-way leaves: Orbax's temporary step dir with partial contents.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "_METADATA").write_text('{"tree_meta')
  with TrainCheckpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1
    _assert_state_equal(ckpt.restore(), _state(1))


_CRASH = textwrap.dedent("""
  import os, sys, jax, jax.numpy as jnp
  sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
  from test_train_checkpoint import _state
  from dmax_jax.training.checkpoint import TrainCheckpointer
  ckpt = TrainCheckpointer({d!r})
  ckpt.save(1, _state(1)); ckpt.wait()
  big = _state(2)
  big["params"]["big"] = jnp.ones((64, 1024, 1024))  # 256 MB: the write takes a while
  ckpt.save(2, big)
  print("saving", flush=True)
  os._exit(0)  # die mid-save: no wait, no finalisation
""")


def test_crash_during_async_save_leaves_previous_step(tmp_path):
  d = str(tmp_path / "ckpt")
  code = _CRASH.format(repo=str(REPO), tests=os.path.join(REPO, "tests"), d=d)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert "saving" in out.stdout, out.stderr[-2000:]
  assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(d)), os.listdir(d)  # the save really was cut off
  with TrainCheckpointer(d) as ckpt:
    assert ckpt.latest_step() == 1
    _assert_state_equal(ckpt.restore(), _state(1))
