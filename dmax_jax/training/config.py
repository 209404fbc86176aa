"""The training config schema: every key with its default and a comment (``train.py --config=...`` files start
from ``defaults()``; the demo's stages are such configs too)."""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  """A training config holding every key at its default."""
  c = ml_collections.ConfigDict()
  c.init_from = "scratch"  # "scratch", a converted params checkpoint dir, or a Hugging Face checkpoint dir
  c.model = ml_collections.ConfigDict()  # architecture (ModelConfig fields) for init_from="scratch"; else unused
  c.compute_dtype = "bfloat16"  # matmul inputs; params stay fp32 (master weights), norms/softmax/loss fp32
  c.remat = True  # rematerialise every layer in the backward pass (gradient checkpointing)
  c.moe_backend = "grouped"  # "grouped" (sorted ragged_dot), "dense" (reference), "pallas"
  c.scan_layers = True  # lax.scan over the stacked layers
  c.attention = "xla"  # "xla" (einsum + fp32 softmax), "cudnn" or "tokamax" (fused flash attention on NVIDIA GPUs in bf16, else xla)

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # training JSONL ({"question","answer"} or {"messages": [...]})
  c.data.tokenizer = ""  # tokenizer dir; "" = the init_from checkpoint dir
  c.data.max_seq_len = 2048  # pad (with eos) / truncate every example to this many tokens
  c.data.prompt_suffix = ""  # appended to the last user turn before templating

  c.objective = ml_collections.ConfigDict()
  c.objective.oput = True  # True: OPUT (data duplicated on/off-policy, rollout substitution); False: plain SFT
  c.objective.block_length = 32  # K of the block-diffusion [x_t ; x_0] attention
  c.objective.noise_low = 0.75  # t ~ U[noise_low, noise_high] per example
  c.objective.noise_high = 0.75
  c.objective.only_masked = False  # False = DMax: loss on every labelled answer position; True: masked only

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-6  # peak learning rate (AdamW)
  c.optim.b1 = 0.9  # AdamW beta1
  c.optim.b2 = 0.999  # AdamW beta2
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.weight_decay = 0.01  # decoupled weight decay (all parameters)
  c.optim.warmup_ratio = 0.03  # linear warmup over this fraction of the steps, then cosine to 0
  c.optim.clip_norm = 1.0  # global gradient-norm clipping

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 8  # sequences per optimizer step
  c.train.micro_batch_size = 1  # sequences per batch shard per micro-step (the rest is accumulated)
  c.train.epochs = 2  # passes over the (OPUT-duplicated) data set
  c.train.max_steps = 0  # > 0: stop after this many steps instead (also sets the schedule length)
  c.train.seed = 0  # data order, noise and scratch init
  c.train.save_every = 500  # checkpoint every N steps (plus the final one); 0 = final only
  c.train.keep_checkpoints = 2  # checkpoints kept in WORKDIR/checkpoints
  c.train.async_save = True  # write checkpoints in the background
  c.train.debug_kill_at_step = 0  # > 0: SIGKILL this process after that step (resume tests only)

  c.mesh = ml_collections.ConfigDict()  # device mesh; one axis may be -1 (= the remaining devices)
  c.mesh.data = -1  # data parallel (params replicated)
  c.mesh.fsdp = 1  # data parallel with params/optimizer state sharded
  c.mesh.tensor = 1  # heads / MLP width / vocabulary split
  c.mesh.expert = 1  # routed experts split
  return c
