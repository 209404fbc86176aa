"""Training: data pipeline, sharded step equivalence, kill-and-resume, overfitting, CLI errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dmax_jax.training import data as data_lib
from dmax_jax.training.diffusion import IGNORE
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


def _env(compile_cache=None):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if compile_cache:  # runs of the same config compile the same step: compile it once
    env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


# ------------------------------------------------------------------ configs


def test_oput_mini_is_the_dmax_recipe():
  from configs import oput_mini, sft_mini

  c = oput_mini.get_config()
  o, t = c.optim, c.train
  assert (o.lr, o.b1, o.b2, o.weight_decay, o.warmup_ratio, o.clip_norm) == (2e-6, 0.9, 0.999, 0.01, 0.03, 1.0)
  assert (t.global_batch_size, t.micro_batch_size, t.epochs) == (8, 1, 2)
  assert (c.data.max_seq_len, c.objective.block_length, c.objective.noise_low, c.objective.noise_high) == (2048, 32, 0.75, 0.75)
  assert c.compute_dtype == "bfloat16" and c.remat and c.objective.oput and not c.objective.only_masked
  assert c.moe_backend == "grouped"  # only the routed experts' work (BENCHMARKS.md)
  assert c.attention == "tokamax"  # fused flash attention under the mask (BENCHMARKS.md)
  assert not sft_mini.get_config().objective.oput


def test_schedule_warmup_then_cosine_to_zero():
  from dmax_jax.training.optim import schedule

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
from dmax_jax import sharding
from dmax_jax.training import diffusion
from dmax_jax.training import trainer
from dmax_jax.training.optim import make_optimizer
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


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
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


def _strict_json(line):
  return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def _metrics(workdir):
  rows = [_strict_json(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return rows, {r["step"]: r for r in rows}


def _final_params(workdir, on_one_device=False):
  """The step-6 parameters; ``on_one_device`` restores a run saved from several devices onto this one."""
  from dmax_jax.training.checkpoint import TrainCheckpointer

  abstract = None
  if on_one_device:
    from configs import tiny  # pylint: disable=import-outside-toplevel
    from dmax_jax import sharding
    from dmax_jax.training import trainer  # pylint: disable=import-outside-toplevel
    from dmax_jax.training.optim import make_optimizer  # pylint: disable=import-outside-toplevel

    config = tiny.get_config()
    config.init_from = str(TINY)
    mesh = sharding.make_mesh({"data": 1})
    abstract = trainer.abstract_state(config, trainer.model_config(config), make_optimizer(config.optim, 6)[0], mesh)
  ck = TrainCheckpointer(os.path.join(str(workdir), "checkpoints"), async_save=False)
  assert ck.latest_step() == 6
  state = ck.restore(abstract_state=abstract)
  ck.close()
  return state["params"]


@pytest.mark.slow  # 23-31 s: keeps the default suite under ten minutes on 2 cores
def test_killed_run_resumes_to_the_same_result(workspace, tmp_path, compile_cache):
  env = _env(compile_cache)
  full, crash = tmp_path / "full", tmp_path / "crash"
  subprocess.run(_train_cmd(workspace, full), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  killed = subprocess.run(_train_cmd(workspace, crash, "--config.train.debug_kill_at_step=5"), cwd=REPO, env=env,
                          capture_output=True, timeout=600)
  assert killed.returncode == -9
  rows, _ = _metrics(crash)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  resumed = subprocess.run(_train_cmd(workspace, crash), cwd=REPO, env=env, check=True, capture_output=True,
                           text=True, timeout=600)
  said = [line for line in resumed.stdout.splitlines() if line.startswith("resuming from step")]
  assert said in (["resuming from step 2"], ["resuming from step 4"]), resumed.stdout  # not from scratch
  rows, by_step = _metrics(crash)
  _, want = _metrics(full)
  # The steps after the restored checkpoint were dropped before being trained again: each step once, in order.
  assert [r["step"] for r in rows] == sorted(want) == list(range(1, 7))
  assert _tensorboard_scalars(crash / "tensorboard")["train/loss"] == pytest.approx(
      {s: r["loss"] for s, r in by_step.items()}, rel=1e-6)
  for s in want:
    assert by_step[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-6)
  import jax  # pylint: disable=import-outside-toplevel

  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8),
               _final_params(crash), _final_params(full))


@pytest.mark.slow  # ~10-60 s on 2 cores; keeps the default suite under 10 minutes
def test_tiny_model_overfits_a_few_examples(workspace, tmp_path):
  from configs import tiny
  from dmax_jax.training import trainer

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


def _run_train(args, compile_cache=None, **kw):
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=_env(compile_cache), capture_output=True,
                        text=True, timeout=600, **kw)


def _one_error_line(proc, status):
  """The run's single stderr line (an ``error: ...``), after checking the exit status and that nothing else was said."""
  assert proc.returncode == status, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


def test_setup_errors_are_one_line_and_write_nothing(workspace, tmp_path):
  """Bad flags, config files, override keys, config values and a too-large tokenizer: exit 2, one line, no workdir."""
  big_tok = tmp_path / "tok_big"
  train_tokenizer(["What is 1 plus 2? 1 plus 2 makes 3."] * 8, 1024, str(big_tok))
  work = tmp_path / "work"
  base = ["--config=configs/tiny.py", f"--workdir={work}", f"--config.init_from={TINY}",
          f"--config.data.path={workspace / 'data.jsonl'}", f"--config.data.tokenizer={workspace / 'tok'}",
          "--config.data.max_seq_len=32", "--noprogress"]
  cases = [
      (base + ["--config.bogus=1"], "error: --config.bogus: the config has no key config.bogus"),
      (base + ["--config.optim.lrr=1"],
       "error: --config.optim.lrr: the config has no key config.optim.lrr (did you mean config.optim.lr?)"),
      ([f"--config={tmp_path / 'nope.py'}", f"--workdir={work}"],
       f"error: {tmp_path / 'nope.py'}: no such config file (--config)"),
      (base + ["--config.optim.lr=-1"], "error: config.optim.lr=-1.0: must be a finite number > 0"),
      (base + ["--config.train.micro_batch_size=0"], "error: config.train.micro_batch_size=0: must be >= 1"),
      (base + ["--config.objective.noise_low=0.9", "--config.objective.noise_high=0.5"],
       "error: config.objective.noise_low=0.9: must be <= config.objective.noise_high=0.5"),
      (base + [f"--config.data.tokenizer={big_tok}"],
       f"error: {big_tok}: the tokenizer has 1024 tokens, more than the model's vocab_size 512; use the model's own"
       " tokenizer (config.data.tokenizer)"),
  ]
  for args, want in cases:
    proc = _run_train(args)
    assert _one_error_line(proc, 2) == want
    assert not work.exists(), args  # nothing written for a run that never started


@pytest.mark.parametrize("key,value,message", [
    ("optim.b2", 1.0, "in [0, 1)"), ("optim.warmup_ratio", -0.1, "in [0, 1)"), ("optim.clip_norm", 0.0, "> 0"),
    ("optim.eps", float("nan"), "> 0"), ("train.global_batch_size", 0, ">= 1"), ("train.max_steps", -1, ">= 0"),
    ("train.keep_checkpoints", 0, ">= 1"), ("data.max_seq_len", 1, ">= 2"), ("objective.block_length", 0, ">= 1"),
    ("objective.noise_high", 0.0, "in (0, 1]"), ("objective.noise_low", 1.5, "in [0, 1]"),
    ("compute_dtype", "float8", "float32, bfloat16 or float16"),
])
def test_check_config_names_the_key(key, value, message):
  from configs import tiny
  from dmax_jax.training import trainer

  c = tiny.get_config()
  trainer.check_config(c)  # the shipped config passes
  node = c
  for part in key.split(".")[:-1]:
    node = node[part]
  node[key.split(".")[-1]] = value
  with pytest.raises(trainer.TrainError) as e:
    trainer.check_config(c)
  assert str(e.value).startswith(f"config.{key}=") and message in str(e.value)


@pytest.mark.slow  # 15 s: keeps the default suite under ten minutes on 2 cores
def test_nonfinite_loss_stops_and_keeps_the_last_finite_checkpoint(workspace, tmp_path):
  work = tmp_path / "work"
  proc = _run_train(_train_cmd(workspace, work, "--config.optim.lr=1e30", "--config.train.save_every=1",
                               "--noprogress")[2:])
  line = _one_error_line(proc, 1)
  # Step 1 moves every weight by ~lr; step 2's forward overflows.
  assert line.startswith(f"error: {work}: step 2: the loss is nan") and "latest checkpoint: step 1" in line, line
  rows, _ = _metrics(work)  # strict JSON: the non-finite loss is null
  assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] > 0 and rows[1]["loss"] is None
  from dmax_jax.training.checkpoint import TrainCheckpointer

  ck = TrainCheckpointer(os.path.join(work, "checkpoints"), async_save=False)
  assert ck.all_steps() == [1]
  params = ck.restore()["params"]
  ck.close()
  import jax  # pylint: disable=import-outside-toplevel

  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert not (work / "final").exists()


_WITH_FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])  # the command, under the limit
"""


def test_failed_checkpoint_write_is_one_line_and_leaves_no_temporary_directory(workspace, tmp_path, compile_cache):
  """A write that fails like a full disk (a file-size limit: write(2) fails with EFBIG instead of ENOSPC, on any
  Linux and without root) through Orbax's asynchronous save: one line, exit 1, no temporary directory left."""
  work = tmp_path / "work"
  cache = tmp_path / "jax_cache"  # a copy: the limit would leave truncated entries in the shared cache
  shutil.copytree(compile_cache, cache)
  cmd = [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, "100000"] + _train_cmd(workspace, work, "--noprogress")
  proc = subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=600)
  line = _one_error_line(proc, 1)  # metrics fit under the limit, a checkpoint does not
  assert line == f"error: {work}/checkpoints: write failed (File too large) (details in {work}/train.log)"
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(work) for n in dirs + files if "tmp" in n]
  assert leftovers == []
  assert os.listdir(work / "checkpoints") == [] and not (work / "final").exists()
  steps = [r["step"] for r in _metrics(work)[0]]
  # The step-2 save failed in the background; its error surfaced at the next save (step 4), which stopped the run.
  assert steps == [1, 2, 3, 4], steps


def test_write_failure_reason_names_the_os_error():
  from dmax_jax.training import trainer

  tensorstore_style = ValueError('OUT_OF_RANGE: Error writing "x" in OCDBT database: Failed to write 1274 bytes to '
                                 "file 18: No space left on device [os_error_code='28']")
  assert trainer._reason(tensorstore_style) == os.strerror(28) == "No space left on device"  # pylint: disable=protected-access
  assert trainer._reason(OSError(28, "x")) == "No space left on device"  # pylint: disable=protected-access


def test_metrics_file_truncation_and_json_safety(tmp_path):
  from dmax_jax.training import metrics as train_log

  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
  train_log.truncate_metrics(str(path), 3)  # a resume from checkpoint 3; the torn last line is dropped too
  assert [r["step"] for r in map(_strict_json, path.read_text().splitlines())] == [1, 2, 3]
  assert train_log.json_safe({"step": 1, "a": float("nan"), "b": float("-inf"), "c": 2.0}) == \
      {"step": 1, "a": None, "b": None, "c": 2.0}


def test_nonfinite_parameters_are_never_saved(tmp_path, tiny):
  import jax  # pylint: disable=import-outside-toplevel
  from dmax_jax.training import trainer
  from dmax_jax.training.checkpoint import TrainCheckpointer

  _, params = tiny
  state = {"params": params, "opt_state": {}, "rng": jax.random.PRNGKey(0)}
  ck = TrainCheckpointer(str(tmp_path / "checkpoints"), async_save=False)
  trainer._save(ck, 1, state, data_lib.DataPosition())  # pylint: disable=protected-access
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"] = bad["final_norm"].at[0].set(np.inf)
  with pytest.raises(trainer.TrainFailed, match=r"step 2: the parameters are not finite; not saved \(latest "
                                                 r"checkpoint: step 1\)"):
    trainer._save(ck, 2, dict(state, params=bad), data_lib.DataPosition())  # pylint: disable=protected-access
  assert ck.all_steps() == [1]
  ck.close()


def test_final_is_replaced_whole(tmp_path, tiny, workspace):
  import jax  # pylint: disable=import-outside-toplevel
  from dmax_jax.training import trainer
  from dmax_jax.checkpoints.converted import load_checkpoint

  cfg, params = tiny
  trainer.write_final(params, cfg, str(tmp_path), str(workspace / "tok"))
  doubled = jax.tree.map(lambda x: 2 * x, params)
  trainer.write_final(doubled, cfg, str(tmp_path), str(workspace / "tok"))
  assert sorted(os.listdir(tmp_path)) == ["final"]  # no .new / .old / .partial left
  assert sorted(os.listdir(tmp_path / "final")) == ["config.json", "params", "special_tokens_map.json",
                                                    "tokenizer.json", "tokenizer_config.json"]
  _, got = load_checkpoint(str(tmp_path / "final"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, doubled)


def _tensorboard_scalars(logdir):
  """{tag: {step: value}} read back from the event files: TFRecord framing parsed here, Event protos decoded.

  Like TensorBoard, a step at or below one already seen (a resumed run's
  first step) discards the events from that step on.
  """
  import struct  # pylint: disable=import-outside-toplevel

  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  out = {}
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        series = {k: x for k, x in out.get(v.tag, {}).items() if k < event.step}
        series[event.step] = v.simple_value
        out[v.tag] = series
  return out


@pytest.mark.slow  # 23-31 s: keeps the default suite under ten minutes on 2 cores
def test_train_result_is_usable_and_logged_to_tensorboard(workspace, tmp_path, compile_cache):
  """WORKDIR/final is what decode.py, tools/evaluate.py and tools/export_hf.py take; TensorBoard has metrics.jsonl."""
  work = tmp_path / "work"
  proc = _run_train(_train_cmd(workspace, work, "--noprogress")[2:], compile_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == f"wrote {work / 'final'}"
  rows, _ = _metrics(work)
  scalars = _tensorboard_scalars(work / "tensorboard")
  for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time", "epoch"):
    assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key
  # final holds the last step's parameters of the training checkpoint.
  from dmax_jax.checkpoints.converted import load_checkpoint
  from dmax_jax.training.checkpoint import TrainCheckpointer
  import jax  # pylint: disable=import-outside-toplevel

  _, final = load_checkpoint(str(work / "final"))
  ck = TrainCheckpointer(os.path.join(work, "checkpoints"), async_save=False)
  assert ck.latest_step() == 6
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), final,
               ck.restore()["params"])
  ck.close()
  assert sorted(set(os.listdir(work)) - {"train.log"}) == ["checkpoints", "final", "metrics.jsonl", "tensorboard"]
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(json.dumps({"question": "What is 1 plus 2?", "answer": "1 plus 2 makes 3.\n#### 3"}) + "\n")
  small = ["--gen-length=8", "--block-length=8", "--no-progress"]  # evaluate reuses decode's compiled programs
  for cmd in ([sys.executable, "decode.py", "--checkpoint", str(work / "final"), "--prompt", "What is 1 plus 2?",
               "--strategy=threshold", "--threshold=0.9", *small],
              [sys.executable, "tools/evaluate.py", "--checkpoint", str(work / "final"), "--data", str(gsm),
               "--output", str(tmp_path / "eval" / "records.jsonl"), "--strategies=threshold", "--thresholds=0.9",
               *small],
              [sys.executable, "tools/export_hf.py", "--checkpoint", str(work / "final"), "--out", str(tmp_path / "hf")]):
    done = subprocess.run(cmd, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (cmd[1], done.stderr[-3000:])
  assert os.path.exists(tmp_path / "hf" / "tokenizer.json") and os.path.exists(tmp_path / "hf" / "model.safetensors")


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
