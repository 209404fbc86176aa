"""The GPU demo on the ``week`` task (BENCHMARKS.md, variant D'): 4-7 days with different amounts, added in any order.

The final number needs the chain and the running totals depend on the order the days are added in, so base +
threshold decoding's committed mixtures break the answer itself, not just the worked steps. At this budget
(one H200, about seven minutes) the base model does not learn to match each day with its amount (16% right).

python tools/run_demo.py --config=configs/demo_gpu_week.py --workdir=runs/demo_gpu_week
"""

from configs import demo_gpu


def get_config():
  c = demo_gpu.get_config()
  c.data.task = "week"  # dmax_jax.arith: a different amount each day, the days added in any order
  c.data.listed_first = 0.0  # every order and operand order equally likely (demo_gpu's preferred forms are bag's)
  c.data.total_first = 0.5
  c.data.max_steps = 7  # 4-7 days: answers of 60-102 tokens, two to four blocks of 32
  c.model.max_position_embeddings = 256  # prompt (<= 68 tokens) + gen_length 112, rounded up to blocks of 32
  c.max_seq_len = 176  # prompt <= 68 + answer <= 102 tokens + eos labels
  c.sft.train.max_steps = 1800  # optimizer steps
  c.oput.optim.lr = 4e-4  # peak learning rate (OPUT and the ablation)
  c.eval.runs = ("base:threshold", "oput:spd", "ablation:spd")  # the curves the figures compare
  c.eval.threshold_thresholds = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)  # 0.95 down to collapse
  c.eval.spd_thresholds = (0.9, 0.7, 0.5, 0.3, 0.1, 0.0)
  c.eval.gen_length = 112  # tokens generated per problem (answers take 60-102)
  return c
