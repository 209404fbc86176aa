"""The demo at GPU size (one H200: 13 min 47 s measured with four other runs on the GPU, BENCHMARKS.md variant P): a
~30M-parameter LLaDA2-MoE, bf16 compute, block 32.

python tools/run_demo.py --config=configs/demo_gpu.py --workdir=runs/demo_gpu

The task is ``bag`` (``dmax_jax.apps.arith``): the question lists 4-7 amounts and the answer adds them one line
at a time, in any order. Every order is right, but one is the most common (the listed one), as one phrasing is
in natural text; the final number is a sum of up to eight numbers, which only the chain gives.
"""

from configs import demo_cpu
from dmax_jax.model import presets


def get_config():
  c = demo_cpu.get_config()
  c.data.n_train = 30000  # generated training problems
  c.data.n_test = 512  # held-out problems
  c.data.task = "bag"  # amounts added in any order (dmax_jax.apps.arith.bag_problem)
  c.data.min_steps = 4  # 4-7 amounts: answers of about 50-95 tokens, two to three blocks of 32
  c.data.max_steps = 7
  c.data.amounts = (2, 9)  # each amount, inclusive
  c.data.listed_first = 0.7  # a line adds the next listed amount with this probability, else any left
  c.data.total_first = 0.8  # a sum names the running total first with this probability
  c.tokenizer_vocab = 1024  # BPE vocabulary, digits split
  c.model.update(presets.DEMO_GPU)  # ~30M parameters: D 384, 8 layers, 16 experts (dmax_jax.model.presets)
  c.model.max_position_embeddings = 192  # prompt (<= 60 tokens) + gen_length 128
  c.compute_dtype = "bfloat16"  # bf16 matmuls, fp32 master weights / norms / router / loss
  c.moe_backend = "grouped"  # sorted tokens + grouped matmuls: only the routed experts compute
  c.max_seq_len = 176  # prompt + answer + eos labels
  c.block_length = 32  # as the paper
  c.sft.train.max_steps = 1500  # optimizer steps
  c.sft.train.global_batch_size = 64  # sequences per step
  c.sft.train.save_every = 375  # a few checkpoints to resume from
  c.sft.optim.lr = 1e-3  # peak learning rate
  c.distill.n_prompts = 4096  # training prompts answered by the base model
  c.distill.batch_size = 512  # prompts per decoding batch
  c.oput.train.max_steps = 300  # optimizer steps (the ablation trains as many)
  c.oput.train.global_batch_size = 64  # sequences per step
  c.oput.train.save_every = 100  # a few checkpoints to resume from
  c.oput.optim.lr = 5e-4  # peak learning rate
  c.eval.runs = ("base:threshold", "oput:spd", "ablation:spd")  # the curves the figures compare
  c.eval.threshold_thresholds = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)  # 0.95 down to collapse
  c.eval.spd_thresholds = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1, 0.0)
  c.eval.gen_length = 128  # tokens generated per problem
  c.eval.batch_size = 512  # the whole test set in one batch
  c.eval.dtype = "float32"  # decode with fp32 params (the model is small; keeps the sweep exact)
  return c
