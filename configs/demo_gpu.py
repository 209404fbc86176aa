"""The demo at GPU size (one H100/H200, about ten minutes): a ~30M-parameter LLaDA2-MoE, bf16 compute, block 32.

python tools/run_demo.py --config=configs/demo_gpu.py --workdir=runs/demo_gpu
"""

from configs import demo_cpu


def get_config():
  c = demo_cpu.get_config()
  c.data.n_train = 30000  # generated training problems
  c.data.n_test = 512  # held-out problems
  c.data.max_steps = 8  # chains of 4-8 steps: answers of 68-132 tokens, three to five blocks of 32
  c.tokenizer_vocab = 1024  # BPE vocabulary, digits split
  m = c.model
  m.hidden_size = 384  # D
  m.num_hidden_layers = 8  # one dense layer then seven MoE layers
  m.num_attention_heads = 6  # H
  m.num_key_value_heads = 2  # G
  m.head_dim = 64  # R
  m.intermediate_size = 1024  # dense SwiGLU width
  m.moe_intermediate_size = 192  # one expert's width
  m.num_experts = 16  # E
  m.num_experts_per_tok = 4  # top-k
  m.n_group = 4  # expert groups
  m.topk_group = 2  # groups kept per token
  m.max_position_embeddings = 256  # prompt (41 tokens) + gen_length 136, rounded up to blocks of 32
  c.compute_dtype = "bfloat16"  # bf16 matmuls, fp32 master weights / norms / router / loss
  c.moe_backend = "grouped"  # sorted tokens + ragged_dot: only the routed experts compute
  c.max_seq_len = 176  # prompt 41 + answer <= 132 tokens + eos labels
  c.block_length = 32  # as the paper
  c.sft.steps = 1500  # optimizer steps
  c.sft.batch_size = 64  # sequences per step
  c.sft.lr = 1e-3  # peak learning rate
  c.distill.n_prompts = 4096  # training prompts answered by the base model
  c.distill.batch_size = 512  # prompts per decoding batch
  c.oput.steps = 400  # optimizer steps (the ablation trains as many)
  c.oput.batch_size = 64  # sequences per step
  c.oput.lr = 2e-4  # peak learning rate
  c.eval.runs = ("base:threshold", "base:spd", "oput:threshold", "oput:spd", "ablation:spd")  # every curve
  c.eval.gen_length = 136  # tokens generated per problem (answers take 68-132)
  c.eval.batch_size = 512  # the whole test set in one batch
  c.eval.dtype = "float32"  # decode with fp32 params (the model is small; keeps the sweep exact)
  return c
