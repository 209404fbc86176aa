"""The demo at GPU size (one H100/H200, about ten minutes): a ~30M-parameter LLaDA2-MoE, bf16 compute, block 32.

python tools/run_demo.py --config=configs/demo_gpu.py --workdir=runs/demo_gpu
"""

from configs import demo_cpu
from dmax_jax.model import presets


def get_config():
  c = demo_cpu.get_config()
  c.data.n_train = 30000  # generated training problems
  c.data.n_test = 512  # held-out problems
  c.data.task = "savings"  # the same amount every day (BENCHMARKS.md, variant C on GPU)
  c.data.max_steps = 8  # chains of 4-8 steps: answers of 68-132 tokens, three to five blocks of 32
  c.tokenizer_vocab = 1024  # BPE vocabulary, digits split
  c.model.update(presets.DEMO_GPU)  # ~30M parameters: D 384, 8 layers, 16 experts (dmax_jax.model.presets)
  c.compute_dtype = "bfloat16"  # bf16 matmuls, fp32 master weights / norms / router / loss
  c.moe_backend = "grouped"  # sorted tokens + ragged_dot: only the routed experts compute
  c.max_seq_len = 176  # prompt 41 + answer <= 132 tokens + eos labels
  c.block_length = 32  # as the paper
  c.sft.train.max_steps = 1500  # optimizer steps
  c.sft.train.global_batch_size = 64  # sequences per step
  c.sft.train.save_every = 375  # a few checkpoints to resume from
  c.sft.optim.lr = 1e-3  # peak learning rate
  c.distill.n_prompts = 4096  # training prompts answered by the base model
  c.distill.batch_size = 512  # prompts per decoding batch
  c.oput.train.max_steps = 400  # optimizer steps (the ablation trains as many)
  c.oput.train.global_batch_size = 64  # sequences per step
  c.oput.train.save_every = 100  # a few checkpoints to resume from
  c.oput.optim.lr = 2e-4  # peak learning rate
  c.eval.runs = ("base:threshold", "base:spd", "oput:threshold", "oput:spd", "ablation:spd")  # every curve
  c.eval.gen_length = 136  # tokens generated per problem (answers take 68-132)
  c.eval.batch_size = 512  # the whole test set in one batch
  c.eval.dtype = "float32"  # decode with fp32 params (the model is small; keeps the sweep exact)
  return c
