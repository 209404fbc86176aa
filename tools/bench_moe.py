"""Times one MoE layer per backend (dense / grouped ragged_dot / pallas) at decoding token counts.

  python tools/bench_moe.py                 # LLaDA-2.0-mini shapes, T in {32, 256}, on the GPU
  python tools/bench_moe.py --tiny          # tiny shapes, runs anywhere (smoke test; pallas interprets on CPU)
  python tools/bench_moe.py --sweep         # time each Pallas kernel alone over a grid of launch settings
  python tools/bench_moe.py --int8          # routed and shared experts weight-only int8 (``quant``)

Two scopes per token count:
  routed   the routed experts alone (``experts_*``) on uniform-random top-X ids;
  moe_mlp  the whole layer (router, routed experts, shared expert) through ``moe.moe_mlp``.

Each time is the median over ``--rounds`` rounds of ``--iters`` back-to-back calls, blocked once at
the end of a round (no host sync inside a round), after ``--warmup`` untimed calls. The "ideal" column
is the weight bytes the layer must read (touched experts only, plus router and shared expert for
moe_mlp) over a copy bandwidth measured in the same run (an elementwise negate of a large array,
counting read + write bytes). "err" is the relative L2 distance to the dense backend's output.

``--sweep`` times the two Pallas kernels (gate/up and down) separately over a grid of ``Tiles``
settings on the same routed rows, against each kernel's own touched-weight bytes, and prints the
fastest settings of each; set them as ``GATE_UP_TILES`` / ``DOWN_TILES`` in
``dmax_jax/model/kernels/moe_pallas.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from dmax_jax.model import presets  # pylint: disable=wrong-import-position
from dmax_jax.model import moe, quant  # pylint: disable=wrong-import-position
from dmax_jax.apps.benchmarking import copy_bandwidth, time_fn  # pylint: disable=wrong-import-position
from dmax_jax.model.kernels import moe_pallas  # pylint: disable=wrong-import-position

BACKENDS = ("dense", "grouped", "pallas")
SWEEP_N = (64, 128, 256)  # output tile widths tried by --sweep (each setting compiles for a few seconds)
SWEEP_K = (64, 128)  # contraction chunks
SWEEP_WARPS = (4, 8)
SWEEP_STAGES = (3, 4)


def tiny_config(**numerics):
  """The golden fixture's shapes: D=64, E=16, F=32, top-4 (CPU smoke test)."""
  return dataclasses.replace(
      presets.llada2_mini(**numerics), hidden_size=64, moe_intermediate_size=32, num_experts=16,
      num_experts_per_tok=4, n_group=4, topk_group=2)


def layer_params(key, cfg, dtype):
  """One MoE layer's weights (the ``params.py`` layout), experts in ``dtype``, router fp32."""
  D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  Fs = cfg.shared_intermediate_size
  k = jax.random.split(key, 7)

  def normal(kk, shape, fan_in, dt=dtype):
    return (jax.random.normal(kk, shape, jnp.float32) / np.sqrt(fan_in)).astype(dt)

  return dict(
      router=normal(k[0], (D, E), D, jnp.float32), expert_bias=jnp.zeros((E,), jnp.float32),
      w_gate=normal(k[1], (E, D, F), D), w_up=normal(k[2], (E, D, F), D), w_down=normal(k[3], (E, F, D), F),
      shared_gate=normal(k[4], (D, Fs), D), shared_up=normal(k[5], (D, Fs), D),
      shared_down=normal(k[6], (Fs, D), Fs))


def expert_fn(backend, **pallas_kw):
  if backend == "dense":
    return moe.experts_dense
  if backend == "grouped":
    return moe.experts_grouped
  return lambda *a: moe_pallas.experts_pallas(*a, **pallas_kw)


def sweep_kernels(x, idx, weights, touched, bw, timing, block_rows=16, top=5, grid=None):
  """Times each Pallas kernel alone over the ``Tiles`` grid; prints the ``top`` fastest of each.

  ``grid``: {"n", "k", "warps", "stages"} -> the values to try (default the SWEEP_* constants).
  """
  grid = dict(dict(n=SWEEP_N, k=SWEEP_K, warps=SWEEP_WARPS, stages=SWEEP_STAGES), **(grid or {}))
  w_gate, w_up, w_down = weights
  E, D, F = w_gate.shape
  layout = jax.jit(lambda i: moe_pallas.block_layout(i, E, block_rows))(idx)
  src, expert, used = layout["src"], layout["expert"], layout["used"]

  # The weights are arguments, not closed-over constants: constants of this size make each compile take ~30 s.
  def gate_up(t):
    return jax.jit(lambda x, wg, wu: moe_pallas.grouped_swiglu(x, src, expert, used, wg, wu, block_rows=block_rows,
                                                                tiles=t))

  def down(t):
    return jax.jit(lambda h, wd: moe_pallas.grouped_down(h, expert, used, wd, block_rows=block_rows, tiles=t))

  h = gate_up(moe_pallas.Tiles())(x, w_gate, w_up)  # the down kernel's input rows
  kernels = {
      "gate_up": (gate_up, (x, w_gate, w_up), touched * (w_gate.nbytes + w_up.nbytes) // E, F, D),
      "down": (down, (h, w_down), touched * w_down.nbytes // E, D, F),
  }
  real = np.asarray(src) < x.shape[0]  # rows past the used blocks are never written
  best = {}
  for name, (make, args, nbytes, n_dim, k_dim) in kernels.items():
    results = []
    want = None
    settings = {moe_pallas.Tiles(n=min(n, n_dim), k=min(k, k_dim), num_warps=warps, num_stages=stages)
                for n, k, warps, stages in itertools.product(grid["n"], grid["k"], grid["warps"], grid["stages"])}
    for tiles in sorted(settings, key=dataclasses.astuple):
      f = make(tiles)
      try:
        out = f(*args)
        if want is None:
          want = make(moe_pallas.Tiles())(*args)
        err = rel_err(np.asarray(out)[real], np.asarray(want)[real])
        sec = time_fn(f, args, **timing)
      except Exception as e:  # pylint: disable=broad-except  # one failing setting must not end the sweep
        print(f"  {name} {tiles}: failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
        continue
      results.append((sec, tiles, err))
      print(f"  {name} {tiles}: {sec * 1e3:.3f} ms  err {err:.1e}", flush=True)  # as it goes: a cut run keeps them
    results.sort(key=lambda r: r[0])
    ideal = nbytes / bw
    if not results:
      raise RuntimeError(f"no {name} setting ran")
    print(f"{name}: {len(results)} settings ran; ideal {ideal * 1e3:.3f} ms ({nbytes / 1e6:.0f} MB)")
    for sec, tiles, err in results[:top] + results[-1:]:
      print(f"  {sec * 1e3:8.3f} ms  {sec / ideal:5.2f}x ideal  err {err:.1e}  {tiles}")
    best[name] = results[0][1]
  return best


def rel_err(got, want):
  got, want = np.float32(got), np.float32(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
  ap.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts T (default 32 256; tiny: 8 32)")
  ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute and expert dtype")
  ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; tiny: 1)")
  ap.add_argument("--iters", type=int, default=None, help="calls per timed round (default 20; tiny: 2)")
  ap.add_argument("--rounds", type=int, default=None, help="timed rounds; the median is reported (default 15; tiny: 3)")
  ap.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth probe (default 4096; tiny: 16)")
  ap.add_argument("--sweep", action="store_true", help="also time the Pallas settings in SWEEP (routed only)")
  ints = lambda text: tuple(int(v) for v in text.split(","))  # pylint: disable=unnecessary-lambda-assignment
  ap.add_argument("--sweep-n", type=ints, default=SWEEP_N, help="--sweep: output tile widths, comma separated")
  ap.add_argument("--sweep-k", type=ints, default=SWEEP_K, help="--sweep: contraction chunks")
  ap.add_argument("--sweep-warps", type=ints, default=SWEEP_WARPS, help="--sweep: warps per program")
  ap.add_argument("--sweep-stages", type=ints, default=SWEEP_STAGES, help="--sweep: pipeline stages")
  ap.add_argument("--int8", action="store_true", help="routed and shared experts weight-only int8 (quant.quantize)")
  ap.add_argument("--group-size", type=int, default=None, help="--int8: rows of K per scale (default: per channel)")
  args = ap.parse_args(argv)
  tiny = args.tiny
  tokens = args.tokens or ([8, 32] if tiny else [32, 256])
  timing = dict(warmup=args.warmup if args.warmup is not None else (1 if tiny else 5),
                iters=args.iters or (2 if tiny else 20), rounds=args.rounds or (3 if tiny else 15))
  dtype = jnp.dtype(args.dtype)
  cfg = tiny_config(compute_dtype=args.dtype) if tiny else presets.llada2_mini(compute_dtype=args.dtype)
  E, X, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, {args.dtype}")
  print(f"shapes: D={D} E={E} F={cfg.moe_intermediate_size} X={X} shared F={cfg.shared_intermediate_size}")
  bw = copy_bandwidth((args.copy_mib or (16 if tiny else 4096)) << 20, **timing)
  print(f"copy bandwidth (best of negate / not / copy, read+write): {bw / 1e9:.0f} GB/s")
  print(f"timing: median of {timing['rounds']} rounds x {timing['iters']} calls, {timing['warmup']} warmup calls")

  p = layer_params(jax.random.key(0), cfg, dtype)
  if args.int8:
    p = {k: quant.quantize(v, args.group_size) if k in quant.QUANTIZED else v for k, v in p.items()}
    print(f"experts: int8, {'per output channel' if args.group_size is None else f'groups of {args.group_size}'}")
  per_expert = sum(p[n].nbytes for n in ("w_gate", "w_up", "w_down")) // E
  dense_bytes = sum(p[n].nbytes for n in ("router", "shared_gate", "shared_up", "shared_down"))

  header = f"{'T':>5} {'scope':<8} {'backend':<28} {'touched':>7} {'ms':>9} {'ideal ms':>9} {'x ideal':>8} {'err':>9}"
  print(header)
  print("-" * len(header))
  for T in tokens:
    kx, kr = jax.random.split(jax.random.key(T))
    x = jax.random.normal(kx, (T, D), jnp.float32).astype(dtype)
    idx, w = moe.uniform_routing(kr, T, E, X)
    touched = len(np.unique(np.asarray(idx)))
    ideal = touched * per_expert / bw
    weights = (p["w_gate"], p["w_up"], p["w_down"])
    want = jax.jit(moe.experts_dense)(x, idx, w, *weights)

    runs = [(b, expert_fn(b)) for b in args.backends]
    if args.sweep:
      grid = dict(n=args.sweep_n, k=args.sweep_k, warps=args.sweep_warps, stages=args.sweep_stages)
      best = sweep_kernels(x, idx, (p["w_gate"], p["w_up"], p["w_down"]), touched, bw, timing, grid=grid)
      runs.append(("pallas best tiles", expert_fn("pallas", gate_up_tiles=best["gate_up"], down_tiles=best["down"])))
    for name, fn in runs:
      f = jax.jit(fn)
      try:
        err = rel_err(f(x, idx, w, *weights), want)
        sec = time_fn(f, (x, idx, w, *weights), **timing)
      except Exception as e:  # pylint: disable=broad-except  # one failing setting must not end the run
        print(f"{T:>5} {'routed':<8} {name:<28} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        continue
      print(f"{T:>5} {'routed':<8} {name:<28} {touched:>7} {sec * 1e3:>9.3f} {ideal * 1e3:>9.3f} "
            f"{sec / ideal:>8.2f} {err:>9.2e}")

    route_idx, _ = jax.jit(lambda x: moe.route(p["router"], p["expert_bias"], x, cfg))(x)
    touched_mlp = len(np.unique(np.asarray(route_idx)))
    ideal_mlp = (touched_mlp * per_expert + dense_bytes) / bw
    want_mlp = None
    for backend in args.backends:
      c = dataclasses.replace(cfg, moe_backend=backend)
      f = jax.jit(lambda p, x, c=c: moe.moe_mlp(p, x, c)[0])
      y = f(p, x)
      if want_mlp is None:
        want_mlp = jax.jit(lambda p, x: moe.moe_mlp(p, x, dataclasses.replace(cfg, moe_backend="dense"))[0])(p, x)
      sec = time_fn(f, (p, x), **timing)
      print(f"{T:>5} {'moe_mlp':<8} {backend:<28} {touched_mlp:>7} {sec * 1e3:>9.3f} {ideal_mlp * 1e3:>9.3f} "
            f"{sec / ideal_mlp:>8.2f} {rel_err(y, want_mlp):>9.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
