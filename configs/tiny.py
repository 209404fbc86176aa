"""A tiny LLaDA2-MoE trained from scratch on CPU in seconds (tests and demos).

python train.py --config=configs/tiny.py --config.data.path=DATA.jsonl --config.data.tokenizer=TOK --workdir=DIR
"""

from configs import base


def get_config():
  c = base.get_config()
  c.init_from = "scratch"  # random init from c.model (or the tiny fixture dir)
  m = c.model
  m.vocab_size = 512  # matches dmax_jax.tokenizer.train_tokenizer(vocab 512): eos 510, mask 511
  m.hidden_size = 32  # D
  m.num_hidden_layers = 2  # one dense layer then one MoE layer
  m.num_attention_heads = 4  # H
  m.num_key_value_heads = 2  # G
  m.head_dim = 8  # R
  m.intermediate_size = 64  # dense SwiGLU width
  m.first_k_dense_replace = 1  # layers [0, 1) dense
  m.moe_intermediate_size = 16  # one expert's width
  m.num_experts = 8  # E
  m.num_experts_per_tok = 2  # top-k
  m.n_group = 4  # expert groups
  m.topk_group = 2  # groups kept per token
  m.num_shared_experts = 1  # shared expert count
  m.routed_scaling_factor = 2.5  # routed weights scale
  m.partial_rotary_factor = 0.5  # rotary on half of each head
  m.rope_theta = 10000.0  # RoPE base
  m.rms_norm_eps = 1e-6  # RMSNorm epsilon
  m.max_position_embeddings = 256  # longest position
  m.mask_token_id = 511  # <|mask|>
  m.eos_token_id = 510  # <|endoftext|> (also the pad)
  m.pad_token_id = 510
  c.compute_dtype = "float32"  # exact on CPU
  c.remat = False  # nothing to save at this size
  c.moe_backend = "dense"  # fastest on CPU at this size
  c.data.max_seq_len = 64  # short sequences
  c.objective.block_length = 8  # K
  c.objective.noise_low = 0.75  # as in DMax
  c.objective.noise_high = 0.75
  c.optim.lr = 3e-3  # a from-scratch learning rate
  c.optim.warmup_ratio = 0.0  # no warmup
  c.optim.weight_decay = 0.0  # none
  c.train.global_batch_size = 8  # sequences per step
  c.train.micro_batch_size = 2  # accumulation over 4 micro-steps on one device
  c.train.epochs = 1  # one pass
  c.train.save_every = 0  # final checkpoint only
  c.train.async_save = False  # tests read the checkpoint right after
  return c
