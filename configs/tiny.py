"""A tiny LLaDA2-MoE trained from scratch on CPU in seconds (tests and demos).

python train.py --config=configs/tiny.py --config.data.path=DATA.jsonl --config.data.tokenizer=TOK --workdir=DIR
"""

from configs import base
from dmax_jax.model import presets


def get_config():
  c = base.get_config()
  c.init_from = "scratch"  # random init from c.model (or the tiny fixture dir)
  c.model.update(presets.TINY)  # one dense then one MoE layer, D 32, 8 experts; eos 510, mask 511 (vocab 512)
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
