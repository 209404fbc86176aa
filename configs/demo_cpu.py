"""The embedded demo on CPU: DMax end to end on generated arithmetic (about 810 s of CPU time, 8 minutes on 2 cores).

python tools/run_demo.py --config=configs/demo_cpu.py --workdir=runs/demo
"""

import ml_collections

from dmax_jax.model import presets
from dmax_jax.tokenizer import MATH_SUFFIX
from dmax_jax.training.config import defaults


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # problems, data order, noise and init

  c.data = ml_collections.ConfigDict()
  c.data.n_train = 6000  # generated training problems (SFT); the distillation prompts are drawn from them
  c.data.n_test = 512  # held-out problems for the evaluation (one is 0.2 points: 128 left the figures within
  # the noise, BENCHMARKS.md)
  c.data.min_steps = 4  # steps (days) per problem: each carries the previous result (dmax_jax.apps.arith)
  c.data.max_steps = 5  # (5 keeps every answer within 84 tokens)
  c.data.task = "digits"  # dmax_jax.apps.arith.TASKS: "digits" (each day adds the total's ones digit; the ones
  # digits cycle, so start + a table gives the final number, which the base learns: BENCHMARKS.md), "tens" (the
  # tens digit: the base memorises its ~180 chains), "savings" (the same amount daily), "week"/"bag" (any order:
  # the CPU model does not learn them in this budget)
  c.data.amounts = (2, 9)  # each day's amount (savings, week, bag) or the start's ones digit (digits), inclusive;
  # tens draws starts 20-150
  c.data.hold_out = "question"  # test questions never occur in training; "start" (digits only): nor do test starts;
  # "chain" (digits only): nor do test (start, days) pairs
  # digits has about a hundred distinct chains, so with "question" they all occur in training (under other names
  # and items): accuracy measures decoding, not generalisation (BENCHMARKS.md has the "start" run)

  c.tokenizer_vocab = 512  # BPE vocabulary, digits split (eos = vocab - 2, mask = vocab - 1)

  c.model = ml_collections.ConfigDict(presets.DEMO_CPU)  # the SFT stage's architecture (token ids: the tokenizer's)
  c.compute_dtype = "float32"  # CPU: fp32 compute (bf16 matmuls are slow on CPU)
  c.moe_backend = "dense"  # every expert on every token: fastest at this size on CPU
  c.model.max_position_embeddings = 144  # prompt + 88 generated tokens
  c.max_seq_len = 144  # training sequence length (prompt ~50 + answer <= 84 tokens + eos labels)
  c.block_length = 16  # K: the training block size and the decoding block length (a block holds 1-2 steps)

  s = c.sft = defaults()  # (1) block-diffusion SFT from scratch: the base model (a training config, train.py's)
  s.init_from = "scratch"  # random init from the model below
  s.train.max_steps = 1200  # optimizer steps
  s.train.global_batch_size = 16  # sequences per step
  s.train.save_every = 300  # a few checkpoints to resume from
  s.optim.lr = 3e-3  # peak AdamW learning rate (warmup then cosine)
  s.optim.warmup_ratio = 0.05  # warmup fraction
  s.objective.oput = False  # plain block-diffusion SFT
  s.objective.noise_low = 0.1  # t ~ U[low, high]: a base model must unmask from any noise level
  s.objective.noise_high = 1.0
  s.objective.only_masked = True  # MDLM loss on masked positions only (LLaDA's pre-training objective)

  c.distill = ml_collections.ConfigDict()  # (2) self-distillation: the base model answers training prompts
  c.distill.n_prompts = 768  # training questions decoded by the base model
  c.distill.threshold = 0.9  # threshold decoding at this confidence (the base model's careful setting)
  c.distill.keep = "all"  # "all" (as DMax: every generation) or "well_formed" (only outputs with a '#### n' line)
  c.distill.batch_size = 128  # prompts per decoding batch

  o = c.oput = defaults()  # (3) OPUT fine-tuning of the base model on its own outputs (a training config); the
  # ablation (3') is this config with objective.oput = False: same data, steps, batch, learning rate and noise
  o.train.max_steps = 300  # optimizer steps (80 at lr 5e-4 left SPD at 75-81%: BENCHMARKS.md, variant E)
  o.train.global_batch_size = 16  # sequences per step (half on-policy, half off-policy on average)
  o.train.save_every = 100  # a few checkpoints to resume from
  o.optim.lr = 1.5e-3  # peak AdamW learning rate (half the SFT's)
  o.optim.warmup_ratio = 0.03  # as DMax
  o.objective.oput = True  # on-policy uniform training
  o.objective.noise_low = 0.75  # DMax's fixed noise level
  o.objective.noise_high = o.objective.get_ref("noise_low")
  o.objective.only_masked = False  # DMax: loss on every labelled answer position
  for stage in (c.sft, c.oput):
    share(c, stage)

  c.eval = ml_collections.ConfigDict()  # (4) held-out accuracy / TPF / tokens/s sweep
  c.eval.gen_length = 88  # tokens generated per problem (answers take 68-84)
  c.eval.batch_size = 128  # problems per decoding batch (one compiled program per strategy)
  c.eval.runs = ("base:threshold", "oput:spd", "ablation:spd")  # MODEL:STRATEGY curves (MODEL: base, oput,
  # ablation; STRATEGY: threshold, spd); base:threshold and oput:spd are required (the figures compare them)
  c.eval.threshold_thresholds = (0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.1, 0.0)  # threshold-decoding sweep, 0.95 down
  # to 0.0 (= one step per block position whose argmax is the most confident: fully parallel)
  c.eval.spd_thresholds = (0.9, 0.7, 0.5, 0.3, 0.0)  # SPD sweep
  c.eval.confidence_stop = 0.9  # SPD's block stop rule
  c.eval.dtype = "float32"  # params / compute dtype while decoding
  return c


def share(c: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> None:
  """Links a stage's training config to the demo-wide keys (overriding one of those changes every stage)."""
  vocab = c.get_ref("tokenizer_vocab")
  stage.model = ml_collections.ConfigDict({k: c.model.get_ref(k) for k in c.model})  # used by init_from="scratch"
  stage.model.update(vocab_size=vocab, eos_token_id=vocab - 2, pad_token_id=vocab - 2, mask_token_id=vocab - 1)
  stage.compute_dtype = c.get_ref("compute_dtype")
  stage.moe_backend = c.get_ref("moe_backend")
  stage.remat = False  # nothing to save at this size
  stage.data.max_seq_len = c.get_ref("max_seq_len")
  stage.data.prompt_suffix = MATH_SUFFIX  # the evaluation's prompt (tools/evaluate.py appends it too)
  stage.objective.block_length = c.get_ref("block_length")
  stage.optim.weight_decay = 0.0  # none
  stage.train.micro_batch_size = stage.train.get_ref("global_batch_size")  # no accumulation
  stage.train.seed = c.get_ref("seed")
  stage.train.keep_checkpoints = 1  # toy runs keep the last one only
  stage.train.async_save = False
  stage.mesh.data = 1  # one device: the demo's model is far too small to split
