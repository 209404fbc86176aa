"""DMax: OPUT on LLaDA-2.0-mini (the recipe of the DMax paper / dFactory llada2_mini_bd_oput.yaml).

python train.py --config=configs/oput_mini.py --config.init_from=CKPT --config.data.path=DATA.jsonl --workdir=DIR
"""

from configs import base


def get_config():
  c = base.get_config()
  c.init_from = ""  # required: converted (or Hugging Face) LLaDA-2.0-mini checkpoint dir
  c.compute_dtype = "bfloat16"  # mixed precision: bf16 compute, fp32 master weights
  c.remat = True  # gradient checkpointing
  # Sorted (token, expert) rows through a grouped matmul in both directions (tokamax.ragged_dot on the
  # GPU): only the routed experts' work, 1/32 of the dense backend's (BENCHMARKS.md, OPUT step).
  c.moe_backend = "grouped"
  # tokamax's flash attention under the [x_t ; x_0] mask: the step 6% faster than with cuDNN's fused attention
  # and 1.28x+ over XLA's on one H200 (BENCHMARKS.md); the plain XLA attention where tokamax or a GPU is absent.
  c.attention = "tokamax"
  c.data.path = ""  # required: self-distilled {"question","answer"} JSONL
  c.data.max_seq_len = 2048  # max_seq_len 2048
  c.objective.oput = True  # On-Policy Uniform Training (on/off-policy duplication + rollout)
  c.objective.block_length = 32  # block size 32
  c.objective.noise_low = 0.75  # noise fixed at 0.75 ...
  c.objective.noise_high = 0.75  # ... (low = high)
  c.objective.only_masked = False  # DMax: loss on every labelled answer position
  c.optim.lr = 2e-6  # AdamW lr 2e-6
  c.optim.b1 = 0.9  # betas (0.9, 0.999)
  c.optim.b2 = 0.999  # (beta2)
  c.optim.weight_decay = 0.01  # weight decay 0.01
  c.optim.warmup_ratio = 0.03  # warmup 3% of the steps, cosine decay to 0
  c.optim.clip_norm = 1.0  # gradient clipping at norm 1.0
  c.train.global_batch_size = 8  # global batch 8 sequences
  c.train.micro_batch_size = 1  # micro batch 1
  c.train.epochs = 2  # 2 epochs
  c.train.save_every = 200  # checkpoint every 200 steps
  c.mesh.data = 1  # 8 GPUs: parameters and optimizer state sharded (FSDP) ...
  c.mesh.fsdp = -1  # ... over all devices
  return c
