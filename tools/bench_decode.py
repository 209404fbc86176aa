"""Decode speed of the real LLaDA-2.0-mini architecture against its memory-bandwidth limit.

  python tools/bench_decode.py                       # on the GPU: real shapes, random bf16 weights
  python tools/bench_decode.py --tiny                # tiny shapes, any device (smoke test)
  python tools/bench_decode.py --backends pallas,grouped --batches 1,8 --json OUT.json
  python tools/bench_decode.py --mesh expert=8            # weights split over 8 GPUs (expert-parallel MoE)
  python tools/bench_decode.py --weights bf16,int8 --routing uniform   # int8 experts beside bf16
  python tools/bench_decode.py --attention xla,cudnn,tokamax           # attention implementations side by side

Reports median / min / max over rounds of:
  prefill   one 512-token forward that fills the KV cache (batch 1);
  forward   one decoding forward: a 32-token block over a 512-token cache, at each batch size,
            timed as a device loop of back-to-back forwards carrying the cache (as the decoder runs);
  spd loop  the whole compiled SPD program (``decoding.compile_program``) on a 32-token prompt and fifteen
            32-token blocks (uniform routing); forwards/s, and its overhead over the same number
            of bare forwards (each block's first forward covers 64 queries, the others 32).
For each forward it also reports the distinct routed experts touched per MoE layer, the bytes the
forward must read (weights it touches + the KV cache), the bandwidth limit = bytes / copy bandwidth
(measured in the same run), and measured / limit.

Weights (``--weights``): ``bf16`` everywhere, or ``int8``: the routed and shared experts weight-only
int8 (``quant.quantize_params``, per output channel or ``--group-size`` rows of K per scale), the
rest bf16; int8 rows count 1 byte per expert weight plus the float32 scales, and report their speed-up
over the bf16 row of the same kind (``vs bf16``).

Routing: ``raw`` uses the random router weights as they are (random hidden states route to few
experts); ``uniform`` replaces the router's choice by uniform random top-k per token, which touches
about as many experts as a trained model does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from dmax_jax.model import presets  # pylint: disable=wrong-import-position
from dmax_jax.model.config import ATTENTIONS  # pylint: disable=wrong-import-position
from dmax_jax import decoding, sharding  # pylint: disable=wrong-import-position
from dmax_jax.model import transformer as model  # pylint: disable=wrong-import-position
from dmax_jax.model import params as params_lib, quant  # pylint: disable=wrong-import-position
from dmax_jax.apps.benchmarking import copy_bandwidths, device_kernel_times, time_calls  # pylint: disable=wrong-import-position
from dmax_jax.apps import runner  # pylint: disable=wrong-import-position

def with_routing(cfg, mode):
  """``cfg`` routing as the ``--routing`` mode says: "raw" = the router, "uniform" = uniform random top-k."""
  return dataclasses.replace(cfg, routing="uniform" if mode == "uniform" else "learned")


def make_params(cfg, key):
  return jax.jit(lambda k: params_lib.init_params(cfg, k, jnp.bfloat16))(key)


def forward_bytes(cfg, touched_per_layer, batch, cache_len, weights="bf16", group_size=None):
  """Bytes one decoding forward must read: lm_head, attention, dense MLP, routers, shared and touched experts, KV cache.

  ``weights="int8"``: the shared and routed experts' int8 values and float32 scales (``quant.weight_bytes``).
  """
  b = 2  # bf16
  D, V = cfg.hidden_size, cfg.vocab_size
  attn = (D * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * D) * b * cfg.num_hidden_layers
  dense = 3 * D * cfg.intermediate_size * b * cfg.num_dense_layers

  def swiglu_bytes(F):  # gate and up [D, F], down [F, D]
    return sum(quant.weight_bytes(s, group_size, quantized=weights == "int8") for s in ((D, F), (D, F), (F, D)))

  fixed_moe = (D * cfg.num_experts * b + swiglu_bytes(cfg.shared_intermediate_size)) * cfg.num_moe_layers
  expert = swiglu_bytes(cfg.moe_intermediate_size)
  kv = cfg.num_hidden_layers * batch * cache_len * cfg.num_key_value_heads * cfg.head_dim * 2 * b
  return D * V * b + attn + dense + fixed_moe + expert * int(np.sum(touched_per_layer)) + kv


def stats(xs):
  return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


BLOCK = 32  # decoding block length


def _block_mask(batch, S, start, L):
  """[batch, L, S] block-causal mask of L queries at ``start`` over an S-position cache."""
  q_blk = (start + jnp.arange(L)) // BLOCK
  return jnp.broadcast_to(jnp.arange(S)[None, :] // BLOCK <= q_blk[:, None], (batch, L, S))


def _decode_inputs(cfg, batch, S, Lq, start):
  """(kv_mask, positions, random input embeddings) of a decoding forward of Lq queries at ``start``."""
  pos = jnp.broadcast_to(start + jnp.arange(Lq), (batch, Lq))
  emb = jax.random.normal(jax.random.key(1), (batch, Lq, cfg.hidden_size), jnp.bfloat16)
  return _block_mask(batch, S, start, Lq), pos, emb


def bench_forwards(cfg, params, batch, S, Lq, start, *, loop, rounds):
  """Per-forward seconds of ``loop`` back-to-back cached forwards of Lq queries at ``start``; plus routing."""
  kv_mask, pos, emb = _decode_inputs(cfg, batch, S, Lq, start)

  @functools.partial(jax.jit, compiler_options=model.DECODE_COMPILER_OPTIONS)
  def run(params, cache, emb, kv_mask, pos):  # mask and positions are arguments, as in the decoder (not constants)
    def body(_, carry):
      cache, acc = carry
      logits, cache = model.forward_cached(params, cfg, cache, start=start, kv_mask=kv_mask, embeds=emb, positions=pos)
      return cache, acc + logits[:, -1, :8].sum()

    return jax.lax.fori_loop(0, loop, body, (cache, jnp.float32(0)))

  cache = model.init_cache(cfg, batch, S, jnp.bfloat16)
  times = [t / loop for t in time_calls(run, (params, cache, emb, kv_mask, pos), warmup=1, iters=1, rounds=rounds)]
  _, _, (ids, _) = jax.jit(lambda p, c, e: model.forward_cached(
      p, cfg, c, start=start, kv_mask=kv_mask, embeds=e, positions=pos, return_router=True))(params, cache, emb)
  ids = np.asarray(ids)  # [layers, B, L, k]
  touched = [len(np.unique(ids[l])) for l in range(ids.shape[0])]
  return times, touched


def profile_forward(cfg, params, batch, S, Lq, routing, top):
  """Prints the kernels of one decoding forward by device time (from a profiler trace)."""
  start = S - Lq
  kv_mask, pos, emb = _decode_inputs(cfg, batch, S, Lq, start)
  fn = jax.jit(lambda p, c, e, m, q: model.forward_cached(p, cfg, c, start=start, kv_mask=m, embeds=e, positions=q),
               compiler_options=model.DECODE_COMPILER_OPTIONS)
  times = device_kernel_times(fn, (params, model.init_cache(cfg, batch, S, jnp.bfloat16), emb, kv_mask, pos))
  total = sum(t for t, _ in times.values())
  launches = sum(n for _, n in times.values())
  print(f"\nprofile, {routing} routing, batch {batch}: {total / 1e3:.3f} ms of kernels, {launches:.0f} launches per forward")
  for name, (us, n) in list(times.items())[:top]:
    print(f"  {us:9.1f} us  {n:5.0f}x  {100 * us / total:5.1f}%  {name[:110]}")


def split_agreement(cfg, one_device, split, mesh):
  """One forward on one device vs split over ``mesh``, both against a float32 one-device reference.

  Returns the logits' relative L2 distance of the split forward to the one-device forward, and of each
  to the float32 reference (``split_vs_ref``, ``one_device_vs_ref``), with argmax agreement likewise.
  The split computes the same function iff it is about as close to the reference as the one-device
  forward is: bf16 rounding alone sets that scale, and it differs between CPUs and devices, so the
  check compares the two errors instead of using a fixed threshold. (Exact token equality of whole
  decodes is tested in float64 in tests/test_sharded_decoding.py.)
  """
  tokens = jax.random.randint(jax.random.key(3), (2, 64), 0, cfg.vocab_size)
  fwd = lambda c, p: model.forward(p, c, tokens=tokens, mask=model.block_causal_mask(64, BLOCK))  # pylint: disable=unnecessary-lambda-assignment
  cfg32 = dataclasses.replace(cfg, compute_dtype="float32", moe_backend="dense")
  ref = np.asarray(jax.jit(functools.partial(fwd, cfg32))(jax.tree.map(lambda a: a.astype(jnp.float32), one_device)))
  want = np.asarray(jax.jit(functools.partial(fwd, cfg))(one_device))
  with jax.set_mesh(mesh):
    got = np.asarray(jax.jit(functools.partial(fwd, cfg))(split))
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # pylint: disable=unnecessary-lambda-assignment
  agree = lambda a, b: float(np.mean(a.argmax(-1) == b.argmax(-1)))  # pylint: disable=unnecessary-lambda-assignment
  return dict(rel_l2=rel(got, want), argmax_agree=agree(got, want), split_vs_ref=rel(got, ref),
              one_device_vs_ref=rel(want, ref), split_argmax_vs_ref=agree(got, ref),
              one_device_argmax_vs_ref=agree(want, ref))


def bench_prefill(cfg, params, S, rounds, L=None):
  """Seconds of one L-token (default S) forward from position 0 into an S-position cache."""
  L = L or S
  mask = _block_mask(1, S, 0, L)
  tokens = jax.random.randint(jax.random.key(2), (1, L), 0, cfg.vocab_size)
  cache = model.init_cache(cfg, 1, S, jnp.bfloat16)
  fn = jax.jit(lambda p, c, t: model.forward_cached(p, cfg, c, start=0, kv_mask=mask, tokens=t, return_hidden=True)[0],
               compiler_options=model.DECODE_COMPILER_OPTIONS)
  return time_calls(fn, (params, cache, tokens), warmup=1, iters=1, rounds=rounds)


def bench_spd_loop(cfg, params, prompt_len, gen, rounds, prefill_s):
  """(seconds per executed forward, forwards executed per run, layout) of the compiled SPD program, batch 1.

  ``prefill_s`` (the program's prompt prefill, timed separately) is taken off the run time.
  """
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size - 1000, prompt_len).tolist()
  strategy = decoding.SPD(threshold=0.0, confidence_stop=2.0)  # decode a block at once, then revise every step
  program = decoding.compile_program(params, cfg, [prompt], strategy=strategy, gen_length=gen, block_length=BLOCK)
  forwards = int(np.asarray(program()[1]).max())
  times = time_calls(program.executable, program.args, warmup=0, iters=1, rounds=rounds)
  layout = program.layout
  return [(t - prefill_s) / forwards for t in times], forwards, layout


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test on any device)")
  ap.add_argument("--backends", default="pallas", help="MoE backends to time, comma separated")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--routing", default="raw,uniform")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--loop", type=int, default=10, help="forwards per timed device loop")
  ap.add_argument("--no-spd", action="store_true")
  ap.add_argument("--only-spd", action="store_true", help="skip the prefill and forward rows")
  ap.add_argument("--no-prefill", action="store_true", help="skip the prefill row")
  ap.add_argument("--json", default=None)
  ap.add_argument("--mesh", default="", help="split the weights over a device mesh, e.g. expert=8 or expert=4,tensor=2")
  ap.add_argument("--weights", default="bf16", help="comma separated: bf16 and/or int8 (weight-only int8 experts)")
  ap.add_argument("--attention", default=None,
                  help="comma separated attention implementations to time (ModelConfig.attention: xla, cudnn, tokamax, "
                       "pallas); default pallas on a GPU (what decode.py runs there), else xla")
  ap.add_argument("--group-size", type=int, default=None,
                  help="int8: one scale per this many rows of K (default: per output channel)")
  ap.add_argument("--profile", type=int, default=0, metavar="N",
                  help="print the N kernels taking the most device time in one forward, per routing and batch")
  args = ap.parse_args(argv)

  cfg = presets.llada2_mini(compute_dtype="bfloat16")
  if args.tiny:
    cfg = dataclasses.replace(cfg, vocab_size=4096, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=64,
                              num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, mask_token_id=4095,
                              eos_token_id=4094, pad_token_id=4094)
  weight_kinds = args.weights.split(",")
  if not weight_kinds or set(weight_kinds) - {"bf16", "int8"}:
    ap.error(f"--weights: comma separated bf16 / int8, got {args.weights!r}")
  if args.mesh and "int8" in weight_kinds:
    ap.error("--weights int8 runs on one device (no --mesh)")
  default = runner.KERNELS[runner.resolve_kernels("auto")].get("attention", "xla")  # what decode.py runs here
  attentions = (args.attention or default).split(",")
  if not attentions or set(attentions) - set(ATTENTIONS):
    ap.error(f"--attention: comma separated {', '.join(ATTENTIONS)}, got {args.attention!r}")
  mesh = None
  if args.mesh:
    try:
      mesh = sharding.make_mesh(dict((k, int(v)) for k, v in (a.split("=") for a in args.mesh.split(","))))
    except (ValueError, sharding.MeshError) as e:
      ap.error(f"--mesh {args.mesh}: {e}")
  S, K = 512, BLOCK
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  bws = copy_bandwidths(4 << 30 if not args.tiny else 1 << 24, warmup=2, iters=5, rounds=5)
  bw = max(bws.values())
  print(f"copy bandwidth: {bw / 1e12:.3f} TB/s (read + write, best of "
        + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in bws.items()) + ")", flush=True)
  params = make_params(cfg, jax.random.key(0))
  n_params = params_lib.count_params(cfg)
  print(f"params: {n_params / 1e9:.3f} B ({2 * n_params / 1e9:.1f} GB bf16)", flush=True)
  results = dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, copy_bws=bws, rows=[])
  variants = {"bf16": params}
  if "int8" in weight_kinds:
    variants["int8"] = jax.jit(lambda p: quant.quantize_params(p, group_size=args.group_size))(params)
    results["group_size"] = args.group_size
    if "bf16" not in weight_kinds:
      del variants["bf16"], params
  if mesh is not None:
    one_device = params
    params = jax.device_put(params, sharding.tree_shardings(mesh, params))
    results["split_vs_one_device"] = agree = split_agreement(
        dataclasses.replace(cfg, moe_backend=args.backends.split(",")[0]), one_device, params, mesh)
    print(f"split vs one device, one forward: logits rel L2 {agree['rel_l2']:.2e}, "
          f"argmax agreement {100 * agree['argmax_agree']:.1f}%; against fp32: split {agree['split_vs_ref']:.2e}, "
          f"one device {agree['one_device_vs_ref']:.2e}", flush=True)
    del one_device
    results["mesh"] = dict(mesh.shape)
    print(f"mesh: {dict(mesh.shape)}; limits below assume the bytes split evenly over {mesh.size} devices",
          flush=True)
    bw = bw * mesh.size
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    if args.profile:
      for routing in args.routing.split(","):
        for batch in map(int, args.batches.split(",")):
          for weights in weight_kinds:
            print(f"\n{weights} weights:", end="")
            profile_forward(with_routing(dataclasses.replace(cfg, moe_backend=args.backends.split(",")[0],
                                                               attention=attentions[0]), routing),
                            variants[weights], batch, S, K, routing, args.profile)
    rows = results["rows"]
    for backend, weights, attention in itertools.product(args.backends.split(","), weight_kinds, attentions):
      c = dataclasses.replace(cfg, moe_backend=backend, attention=attention)
      tag = dict(backend=backend, weights=weights, attention=attention)
      measured = {}  # (routing, batch, queries) -> (times, touched): the SPD comparison reuses forward rows
      params = variants[weights]

      def forwards(routing, batch, Lq, c=c, measured=measured, params=params):
        if (routing, batch, Lq) not in measured:
          measured[routing, batch, Lq] = bench_forwards(with_routing(c, routing), params, batch, S, Lq, S - Lq, loop=args.loop,
                                                        rounds=args.rounds)
        return measured[routing, batch, Lq]

      if not (args.only_spd or args.no_prefill):
        pre = bench_prefill(c, params, S, args.rounds)
        rows.append(dict(what="prefill 512", **tag, routing="raw", batch=1, **stats(pre)))
      for routing in ([] if args.only_spd else args.routing.split(",")):
        for batch in map(int, args.batches.split(",")):
          try:
            times, touched = forwards(routing, batch, K)
          except Exception as e:  # pylint: disable=broad-except  # one failing variant must not end the run
            print(f"forward {backend} {weights} {attention} {routing} batch {batch}: failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160]}", flush=True)
            continue
          nbytes = forward_bytes(c, touched, batch, S, weights, args.group_size)
          limit = nbytes / bw
          st = stats(times)
          rows.append(dict(what="forward 32/512", **tag, routing=routing, batch=batch, **st,
                           experts_per_layer=float(np.mean(touched)), bytes=nbytes, limit=limit, ratio=st["median"] / limit,
                           implied_tok_s=5.47 * batch / st["median"]))
          print(f"forward {backend} {weights} {attention} {routing} batch {batch}: {1e3 * st['median']:.3f} ms, "
                f"{rows[-1]['ratio']:.2f}x limit", flush=True)  # as it comes (a cut-off run keeps it)
      if not args.no_spd:
        # Uniform routing here, so the loop and the bare forwards it is compared with touch as many experts.
        prompt_len, gen = K, S - K  # a one-block prompt and 15 decoded blocks: the prefill is negligible
        t32, _ = forwards("uniform", 1, K)
        t64, _ = forwards("uniform", 1, 2 * K)
        uniform = with_routing(c, "uniform")
        prefill_s = statistics.median(bench_prefill(uniform, params, S, args.rounds, L=K))
        times, n_fwd, layout = bench_spd_loop(uniform, params, prompt_len, gen, args.rounds, prefill_s)
        blocks = layout.num_blocks
        bare = (blocks * statistics.median(t64) + (n_fwd - blocks) * statistics.median(t32)) / n_fwd
        st = stats(times)
        rows.append(dict(what="spd loop", **tag, routing="uniform", batch=1, **st, forwards=n_fwd,
                         forwards_per_s=1 / st["median"], bare_forward=bare, overhead=st["median"] / bare - 1))
  kind = lambda r: (r["what"], r["backend"], r["attention"], r["routing"], r["batch"])  # pylint: disable=unnecessary-lambda-assignment
  by_kind = {kind(r): r for r in rows if r["weights"] == "bf16"}
  for r in rows:  # int8 rows: speed-up over the bf16 row of the same kind, when both ran
    bf16 = by_kind.get(kind(r))
    if r["weights"] != "bf16" and bf16 is not None:
      r["vs_bf16"] = bf16["median"] / r["median"]

  print()
  print(f"{'what':16s} {'backend':8s} {'weights':7s} {'attn':7s} {'routing':8s} {'B':>2s} {'median ms':>10s} {'min':>8s} {'max':>8s} "
        f"{'exp/layer':>9s} {'GB read':>8s} {'limit ms':>9s} {'ratio':>6s}  extra")
  for r in rows:
    extra = ""
    if "implied_tok_s" in r:
      extra = f"{r['implied_tok_s']:.0f} tok/s at TPF 5.47"
    if "overhead" in r:
      extra = f"{r['forwards']} fwd, {r['forwards_per_s']:.1f} fwd/s, bare {1e3 * r['bare_forward']:.2f} ms, overhead {100 * r['overhead']:+.1f}%"
    if "vs_bf16" in r:
      extra = ", ".join(filter(None, [extra, f"{r['vs_bf16']:.2f}x bf16"]))
    print(f"{r['what']:16s} {r['backend']:8s} {r['weights']:7s} {r['attention']:7s} {r['routing']:8s} {r['batch']:2d} {1e3 * r['median']:10.3f} "
          f"{1e3 * r['min']:8.3f} {1e3 * r['max']:8.3f} "
          f"{r.get('experts_per_layer', float('nan')):9.1f} {r.get('bytes', float('nan')) / 1e9:8.3f} "
          f"{1e3 * r.get('limit', float('nan')):9.3f} {r.get('ratio', float('nan')):6.2f}  {extra}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
