"""The embedded demo on CPU: DMax end to end on generated arithmetic (about 1130 s of CPU time on 2 cores).

python tools/run_demo.py --config=configs/demo_cpu.py --workdir=runs/demo
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # problems, data order, noise and init

  c.data = ml_collections.ConfigDict()
  c.data.n_train = 6000  # generated training problems (SFT); the distillation prompts are drawn from them
  c.data.n_test = 128  # held-out problems for the evaluation
  c.data.min_steps = 4  # steps (events) per problem: each carries the previous result (dmax_jax.arith)
  c.data.max_steps = 5  # (the GPU config: up to 8; 5 keeps every answer within 84 tokens on CPU)
  c.data.task = "savings"  # dmax_jax.arith.TASKS: "savings" (the same amount daily), "week" or "bag" (any order)
  c.data.amounts = (2, 9)  # each day's amount is drawn from this range (inclusive)

  c.tokenizer_vocab = 512  # BPE vocabulary, digits split (eos = vocab - 2, mask = vocab - 1)

  m = c.model = ml_collections.ConfigDict()  # a small LLaDA2-MoE (ModelConfig fields; token ids set from the tokenizer)
  m.hidden_size = 128  # D
  m.num_hidden_layers = 4  # one dense layer then three MoE layers
  m.num_attention_heads = 4  # H
  m.num_key_value_heads = 2  # G
  m.head_dim = 32  # R
  m.intermediate_size = 256  # dense SwiGLU width
  m.first_k_dense_replace = 1  # layers [0, 1) dense
  m.moe_intermediate_size = 64  # one expert's width
  m.num_experts = 4  # E
  m.num_experts_per_tok = 2  # top-k
  m.n_group = 2  # expert groups
  m.topk_group = 2  # groups kept per token
  m.num_shared_experts = 1  # shared expert
  m.routed_scaling_factor = 2.5  # as LLaDA-2.0
  m.partial_rotary_factor = 0.5  # as LLaDA-2.0
  m.rope_theta = 10000.0  # RoPE base
  m.rms_norm_eps = 1e-6  # RMSNorm epsilon
  m.max_position_embeddings = 144  # prompt (41 tokens) + gen_length 88, rounded up to blocks

  c.compute_dtype = "float32"  # CPU: fp32 compute (bf16 matmuls are slow on CPU)
  c.moe_backend = "dense"  # every expert on every token: fastest at this size on CPU
  c.max_seq_len = 128  # training sequence length (prompt 41 + answer <= 84 tokens + eos labels)
  c.block_length = 8  # K: the training block size and the decoding block length

  c.sft = ml_collections.ConfigDict()  # (1) block-diffusion SFT from scratch: the base model
  c.sft.steps = 400  # optimizer steps
  c.sft.batch_size = 16  # sequences per step
  c.sft.lr = 3e-3  # peak AdamW learning rate (warmup then cosine)
  c.sft.warmup_ratio = 0.05  # warmup fraction
  c.sft.noise_low = 0.1  # t ~ U[low, high]: a base model must unmask from any noise level
  c.sft.noise_high = 1.0
  c.sft.only_masked = True  # MDLM loss on masked positions only (LLaDA's pre-training objective)

  c.distill = ml_collections.ConfigDict()  # (2) self-distillation: the base model answers training prompts
  c.distill.n_prompts = 768  # training questions decoded by the base model
  c.distill.threshold = 0.9  # threshold decoding at this confidence (the base model's careful setting)
  c.distill.keep = "all"  # "all" (as DMax: every generation) or "well_formed" (only outputs with a '#### n' line)
  c.distill.batch_size = 128  # prompts per decoding batch

  c.oput = ml_collections.ConfigDict()  # (3) OPUT fine-tuning of the base model on its own outputs
  c.oput.steps = 80  # optimizer steps (the ablation trains as many)
  c.oput.batch_size = 16  # sequences per step (half on-policy, half off-policy on average)
  c.oput.lr = 5e-4  # peak AdamW learning rate
  c.oput.warmup_ratio = 0.03  # as DMax
  c.oput.noise = 0.75  # DMax's fixed noise level

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
