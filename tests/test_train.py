"""Training: data pipeline, sharded step equivalence, kill-and-resume, overfitting, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmax_jax import data as data_lib
from dmax_jax.diffusion import IGNORE
from dmax_jax.tokenizer import train_tokenizer
from conftest import REPO, TINY



def _rows(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(0, 30, size=2))
    out.append({"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} makes {a + b}."})
  return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A trained 512-token tokenizer (eos 510, mask 511, like the fixture) and a small JSONL file."""
  root = tmp_path_factory.mktemp("train")
  rows = _rows(16)
  train_tokenizer([r["question"] + " " + r["answer"] for r in rows] * 8, 512, str(root / "tok"))
  with open(root / "data.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return root


def _env():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


# ------------------------------------------------------------------ configs


def test_oput_mini_is_the_dmax_recipe():
  from configs import oput_mini, sft_mini

  c = oput_mini.get_config()
  o, t = c.optim, c.train
  assert (o.lr, o.b1, o.b2, o.weight_decay, o.warmup_ratio, o.clip_norm) == (2e-6, 0.9, 0.999, 0.01, 0.03, 1.0)
  assert (t.global_batch_size, t.micro_batch_size, t.epochs) == (8, 1, 2)
  assert (c.data.max_seq_len, c.objective.block_size, c.objective.noise_low, c.objective.noise_high) == (2048, 32, 0.75, 0.75)
  assert c.compute_dtype == "bfloat16" and c.remat and c.objective.oput and not c.objective.only_masked
  assert c.moe_backend == "grouped"  # only the routed experts' work (BENCHMARKS.md)
  assert c.attention == "cudnn"
  assert not sft_mini.get_config().objective.oput


def test_schedule_warmup_then_cosine_to_zero():
  from dmax_jax.optim import schedule

  s = schedule(1.0, 100, 0.03)
  np.testing.assert_allclose([float(s(0)), float(s(1)), float(s(3))], [0.0, 1 / 3, 1.0], atol=1e-6)
  np.testing.assert_allclose(float(s(3 + 97 / 2)), 0.5, atol=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ data


def test_tokenize_pads_with_eos_and_prompt_is_a_prefix(workspace):
  from dmax_jax.tokenizer import load_tokenizer

  tok = load_tokenizer(str(workspace / "tok"))
  msgs = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3."}]
  ids, plen = data_lib.tokenize(tok, msgs, 64, 510)
  full = tok.chat_ids(msgs, add_generation_prompt=False)
  prompt = tok.chat_ids(msgs[:1], add_generation_prompt=True)
  assert plen == len(prompt) and full[:plen] == prompt
  np.testing.assert_array_equal(ids[: len(full)], full)
  assert (ids[len(full):] == 510).all() and ids.shape == (64,)
  short, plen_short = data_lib.tokenize(tok, msgs, 5, 510)
  np.testing.assert_array_equal(short, full[:5])
  assert plen_short == 5


def test_dataset_oput_duplicates_and_labels(workspace):
  from dmax_jax.tokenizer import load_tokenizer

  tok = load_tokenizer(str(workspace / "tok"))
  ds = data_lib.build_dataset(str(workspace / "data.jsonl"), tok, 80, 510, oput=True, eos_cap=4)
  assert len(ds) == 32 and ds.on_policy.sum() == 16
  np.testing.assert_array_equal(ds.ids[:16], ds.ids[16:])
  for i in range(len(ds)):
    lab, ids, plen = ds.labels[i], ds.ids[i], ds.prompt_len[i]
    assert (lab[:plen] == IGNORE).all()
    n_eos = (ids == 510).sum()
    assert (lab == 510).sum() == min(4, n_eos)  # eos cap (the template emits no eos of its own)
    assert (lab[plen:] != IGNORE).sum() == 80 - plen - (n_eos - min(4, n_eos))
  sft = data_lib.build_dataset(str(workspace / "data.jsonl"), tok, 80, 510, oput=False)
  assert len(sft) == 16 and not sft.on_policy.any()


def test_messages_format_equals_question_answer(workspace, tmp_path):
  from dmax_jax.tokenizer import load_tokenizer

  tok = load_tokenizer(str(workspace / "tok"))
  path = tmp_path / "m.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                                           {"role": "assistant", "content": "3."}]}) + "\n")
  qa = tmp_path / "qa.jsonl"
  qa.write_text(json.dumps({"question": "What is 1 plus 2?", "answer": "3."}) + "\n")
  a = data_lib.build_dataset(str(path), tok, 32, 510, oput=False)
  b = data_lib.build_dataset(str(qa), tok, 32, 510, oput=False)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.labels, b.labels)


def test_bad_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "a"}\n')
  with pytest.raises(data_lib.DataError, match=r"bad.jsonl:3: expected keys"):
    data_lib.read_conversations(str(path))
  path.write_text('{"question": "a", "answer": "b"}\n{oops\n')
  with pytest.raises(data_lib.DataError, match=r"bad.jsonl:2: not valid JSON"):
    data_lib.read_conversations(str(path))


def test_batches_are_seeded_epochs_and_resume_from_a_position():
  n = 10
  ds = data_lib.Dataset(ids=np.arange(n)[:, None], prompt_len=np.zeros(n, np.int32), labels=np.arange(n)[:, None],
                        on_policy=np.zeros(n, bool))
  stream = data_lib.batches(ds, 4, seed=7)
  got = [next(stream) for _ in range(5)]
  epoch0 = np.concatenate([b["ids"][:, 0] for b, _ in got[:2]])
  np.testing.assert_array_equal(epoch0, data_lib.permutation(n, 7, 0)[:8])  # the last 2 of epoch 0 are dropped
  assert [p for _, p in got[:3]] == [data_lib.DataPosition(0, 4), data_lib.DataPosition(0, 8), data_lib.DataPosition(1, 4)]
  assert not np.array_equal(data_lib.permutation(n, 7, 0), data_lib.permutation(n, 7, 1))
  resumed = data_lib.batches(ds, 4, seed=7, start=got[2][1])
  for (want, wpos), (have, hpos) in zip(got[3:], [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(want["ids"], have["ids"])
    assert wpos == hpos


# ------------------------------------------------------------------ sharded step

_SHARDED = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from configs import tiny
from dmax_jax import diffusion, sharding, trainer
from dmax_jax.optim import make_optimizer
c = tiny.get_config()
c.init_from = sys.argv[1]
c.moe_backend = "grouped"  # under a mesh: shard_map, each device running its own experts' rows
c.train.global_batch_size, c.train.micro_batch_size = 8, 1
# Adam's 1/sqrt(v) turns fp32 reduction-order noise in a near-zero gradient into a whole update; a larger
# eps keeps the update a smooth function of the gradient, so parameters compare at fp32 tolerance.
c.optim.eps = 1e-4
cfg = trainer.model_config(c)
rng = np.random.default_rng(0)
L = 24
ids = rng.integers(0, 500, size=(8, L)).astype(np.int32)
plen = rng.integers(3, 10, size=8).astype(np.int32)
for b in range(8):
  ids[b, rng.integers(14, L):] = cfg.eos_token_id
batch = {"ids": ids, "prompt_len": plen, "labels": diffusion.make_labels(ids, plen, cfg.eos_token_id, 4),
         "on_policy": np.arange(8) % 2 == 0}
out = {}
for name, axes, devices in [("one", {"data": 1}, jax.devices()[:1]),
                            ("data_fsdp", {"data": 4, "fsdp": 2}, jax.devices()),
                            ("expert_tensor", {"data": 2, "expert": 2, "tensor": 2}, jax.devices())]:
  mesh = sharding.make_mesh(axes, devices)
  rows = c.train.micro_batch_size * sharding.batch_size_multiple(mesh)
  plan = trainer.Plan(8, rows, 8 // rows, 10)
  tx, sched = make_optimizer(c.optim, plan.total_steps)
  state = trainer.fresh_state(c, cfg, tx, mesh)
  step = trainer.jit_step(cfg, trainer.objective_from(c), tx, sched, mesh, state)
  metrics = []
  for _ in range(2):
    state, m = step(state, trainer.put_batch(trainer.shape_batch(batch, plan), mesh))
    metrics.append({k: float(v) for k, v in m.items()})
  spec = state["params"]["moe"]["w_gate"].sharding.spec
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  np.savez(sys.argv[2] + f"/{name}.npz", **flat)
  out[name] = {"metrics": metrics, "accum": plan.accum, "w_gate_spec": str(spec)}
print("RESULT" + json.dumps(out))
"""


def test_sharded_step_equals_one_device(tmp_path):
  env = _env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_NUM_CPU_DEVICES"] = "8"
  proc = subprocess.run([sys.executable, "-c", _SHARDED, str(TINY), str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.split("RESULT")[-1])
  assert res["one"]["accum"] == 8 and res["data_fsdp"]["accum"] == 1 and res["expert_tensor"]["accum"] == 2
  assert "fsdp" in res["data_fsdp"]["w_gate_spec"] and "expert" in res["expert_tensor"]["w_gate_spec"]
  ref = np.load(tmp_path / "one.npz")
  for name in ("data_fsdp", "expert_tensor"):
    for a, b in zip(res["one"]["metrics"], res[name]["metrics"]):
      for k in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=f"{name} {k}")
    got = np.load(tmp_path / f"{name}.npz")
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=2e-6, err_msg=f"{name} {k}")
  assert res["one"]["metrics"][1]["loss"] != res["one"]["metrics"][0]["loss"]


# ------------------------------------------------------------------ end to end


def _train_cmd(workspace, workdir, *extra):
  return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.init_from={TINY}", f"--config.data.path={workspace / 'data.jsonl'}",
          f"--config.data.tokenizer={workspace / 'tok'}", "--config.data.max_seq_len=32",
          "--config.train.max_steps=6", "--config.train.save_every=2", "--config.train.async_save=True",
          *extra]


def _metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return rows, {r["step"]: r for r in rows}  # the last entry of each step wins


def _final_params(workdir, on_one_device=False):
  """The step-6 parameters; ``on_one_device`` restores a run saved from several devices onto this one."""
  from dmax_jax.train_checkpoint import TrainCheckpointer

  abstract = None
  if on_one_device:
    from configs import tiny  # pylint: disable=import-outside-toplevel
    from dmax_jax import sharding, trainer  # pylint: disable=import-outside-toplevel
    from dmax_jax.optim import make_optimizer  # pylint: disable=import-outside-toplevel

    config = tiny.get_config()
    config.init_from = str(TINY)
    mesh = sharding.make_mesh({"data": 1})
    abstract = trainer.abstract_state(config, trainer.model_config(config), make_optimizer(config.optim, 6)[0], mesh)
  ck = TrainCheckpointer(os.path.join(str(workdir), "checkpoints"), async_save=False)
  assert ck.latest_step() == 6
  state = ck.restore(abstract_state=abstract)
  ck.close()
  return state["params"]


def test_killed_run_resumes_to_the_same_result(workspace, tmp_path):
  env = _env()
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")  # the three runs compile the same step
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  full, crash = tmp_path / "full", tmp_path / "crash"
  subprocess.run(_train_cmd(workspace, full), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  killed = subprocess.run(_train_cmd(workspace, crash, "--config.train.debug_kill_at_step=5"), cwd=REPO, env=env,
                          capture_output=True, timeout=600)
  assert killed.returncode == -9
  rows, _ = _metrics(crash)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  subprocess.run(_train_cmd(workspace, crash), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  rows, by_step = _metrics(crash)
  restart = [r["step"] for r in rows][5]
  assert restart in (3, 5)  # resumed from checkpoint 2 or 4, not from scratch
  _, want = _metrics(full)
  assert sorted(by_step) == sorted(want) == list(range(1, 7))
  for s in want:
    assert by_step[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-6)
  import jax  # pylint: disable=import-outside-toplevel

  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8),
               _final_params(crash), _final_params(full))


def test_tiny_model_overfits_a_few_examples(workspace, tmp_path):
  from configs import tiny
  from dmax_jax import trainer

  c = tiny.get_config()  # a from-scratch tiny model
  c.data.path = str(workspace / "data.jsonl")
  c.data.tokenizer = str(workspace / "tok")
  c.data.max_seq_len = 32
  c.objective.oput = False
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 8
  c.train.epochs = 30  # 16 examples, 2 steps an epoch
  c.optim.lr = 1e-2
  c.optim.warmup_ratio = 0.05
  trainer.train(c, str(tmp_path), progress=False)
  losses = np.array([r["loss"] for r in _metrics(tmp_path)[0]])
  assert len(losses) == 60
  windows = losses.reshape(6, 10).mean(1)
  assert (np.diff(windows) < 0).all(), windows
  assert windows[-1] < 0.5 * windows[0], windows


def test_cli_one_line_errors(workspace, tmp_path):
  env = _env()
  missing = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       f"--config.init_from={tmp_path / 'nope'}", f"--config.data.path={workspace / 'data.jsonl'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: initial checkpoint not found (config.init_from)"
  assert "Traceback" not in missing.stderr
  no_data = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       f"--config.init_from={TINY}", f"--config.data.tokenizer={workspace / 'tok'}",
       f"--config.data.path={tmp_path / 'missing.jsonl'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert no_data.returncode == 2
  assert no_data.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: no such file"


def _free_port():
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(workspace, tmp_path):
  """Two JAX processes of 4 CPU devices each (the multi-host path: jax.distributed, per-process batch
  slices, collective checkpoints) give the losses and parameters of one process with 8 devices."""
  common = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2",
            "--config.train.global_batch_size=16", "--config.train.async_save=False"]
  one_env = _env()
  one_env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  one = tmp_path / "one"
  subprocess.run(_train_cmd(workspace, one, *common), cwd=REPO, env=one_env, check=True, capture_output=True,
                 timeout=900)
  two = tmp_path / "two"
  env = _env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  port = _free_port()
  procs = [subprocess.Popen(_train_cmd(workspace, two, *common, "--distributed", f"--coordinator=localhost:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for i, p in enumerate(procs):
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  _, want = _metrics(one)
  rows, got = _metrics(two)
  assert len(rows) == 6 and sorted(got) == list(range(1, 7))  # process 0 alone wrote the metrics
  for s in want:
    assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5)
  import jax  # pylint: disable=import-outside-toplevel

  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               _final_params(two, on_one_device=True), _final_params(one, on_one_device=True))
