"""The decode step's weight products alone: XLA's GEMM against the Pallas
decode matmul (jaxrl_llm/decode_matmul.py), at W3's shapes.

W3's model (Qwen2.5-0.5B shape, d = 896, MLP 4864, 24 layers) multiplies M =
batch rows by each layer's q / o [896, 896], k / v [896, 128], gate / up
[896, 4864] and down [4864, 896] weights per decode step. Each product here runs over 24 separate
weight arrays in one jitted, unrolled loop (as the decode loop reads
`decoder.decode_params`' per-layer weights), so no weight is served from the
50 MB L2 twice. A product's time is the device time of its kernels (the
Pallas kernel plus XLA's sum of the split-K partials), read from a profiler
trace of `--calls` calls of the jitted loop: wall-clock timing of such a call
measures mostly its dispatch (9 to 20 µs per product against floors of 0.6 to
3.3 µs on an H100). The floor of one product is its weight's bytes over the
measured copy bandwidth; the table gives each kernel's share of it (higher is
better), XLA's next to the best Pallas configuration of a small sweep
(block_n, block_k, splits, warps, stages) and to `tile_config`'s choice, the
one the model uses.

  python -m benchmarks.decode_gemm [--smoke] [--batches 64,128] [--calls 5]
"""

from __future__ import annotations

import itertools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, floors
from benchmarks.profile_decode import profile_once
from jaxrl_llm.decode_matmul import MAX_ROWS, decode_matmul, decode_matmul_ref, tile_config

LAYERS = 24
SHAPES = {"q_or_o": (896, 896), "k_or_v": (896, 128), "gate_or_up": (896, 4864),
          "down": (4864, 896)}
SMOKE_SHAPES = {"small": (256, 128)}


def configs(K: int, N: int, smoke: bool):
  yield dict(tile_config(K, N), num_warps=4, num_stages=4)  # the model's choice
  tiles = [(32, 128)] if smoke else [(16, 256), (32, 128), (64, 128)]
  for (bn, bk), warps, stages in itertools.product(tiles, [4] if smoke else [4, 8], [3]):
    if N % bn or K % bk:
      continue
    chunks = K // bk
    for splits in sorted({1, *[s for s in (2, 4, 7, 19) if chunks % s == 0]}):
      if (N // bn) * splits > 8 * 132:  # more programs than the chip runs in 8 waves
        continue
      yield dict(block_n=bn, block_k=bk, splits=splits, num_warps=warps, num_stages=stages)


def layered_product(fn):
  """[fn(x, w) for w in ws]: one unrolled jitted loop over the layers' weights."""
  return jax.jit(lambda x, ws: [fn(x, w) for w in ws])


def time_product(fn, x, w, args) -> float:
  """Device seconds of one product: its kernels' summed time over `args.calls`
  profiled calls of the layer loop, per call and layer (off the GPU, where the
  small products run inline on the host, the calls' wall time)."""
  f = layered_product(fn)
  if jax.default_backend() != "gpu":
    times = common.time_calls(lambda: f(x, w), warmup=1, repeats=args.calls)
    return float(np.median(times)) / len(w)
  with tempfile.TemporaryDirectory() as d:  # profile_once warms up (compiles) first
    _, totals = profile_once(lambda: [f(x, w) for _ in range(args.calls)], d)
  return sum(us for _, us, _ in totals.values()) * 1e-6 / args.calls / len(w)


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--batches", default="64,128")
  p.add_argument("--calls", type=int, default=5)
  args = p.parse_args()
  interpret = jax.default_backend() != "gpu"
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  layers = 2 if args.smoke else LAYERS
  copy = floors.copy_bandwidth((16 if args.smoke else 4096) * 2**20, repeats=10, warmup=3)
  bw = copy["gb_per_s"] * 1e9
  results, rows = [], []
  for M in [int(b) for b in args.batches.split(",")]:
    if M > MAX_ROWS:
      raise SystemExit(f"--batches: {M} rows is over decode_matmul.MAX_ROWS={MAX_ROWS}; "
                       "the model sends such products to XLA's GEMM")
    for name, (K, N) in shapes.items():
      kx, kw = jax.random.split(jax.random.key(M + K + N))
      x = jax.random.normal(kx, (M, K), jnp.bfloat16)
      w = [jax.random.normal(k, (K, N), jnp.bfloat16) for k in jax.random.split(kw, layers)]
      floor_s = 2 * K * N / bw
      ref = np.asarray(jnp.stack(layered_product(decode_matmul_ref)(x, w)), np.float32)
      xla_s = time_product(decode_matmul_ref, x, w, args)
      print(f"M={M} {name} [{K}, {N}]: floor {floor_s * 1e6:.1f} us, XLA {xla_s * 1e6:.1f} us "
            f"({floor_s / xla_s:.0%})", flush=True)
      sweep = []
      for i, cfg in enumerate(configs(K, N, args.smoke)):
        fn = lambda x, w, cfg=cfg: decode_matmul(x, w, interpret=interpret, **cfg)
        try:
          y = np.asarray(jnp.stack(layered_product(fn)(x, w)), np.float32)
          err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
          if not err < 1e-2:
            raise ValueError(f"relative error {err:.2e} against jnp.dot")
          sweep.append({**cfg, "s": time_product(fn, x, w, args), "rel_err": err,
                        "model_choice": i == 0})
          print(f"  M={M} {name} {cfg}: {sweep[-1]['s'] * 1e6:.1f} us "
                f"({floor_s / sweep[-1]['s']:.0%} of floor)", flush=True)
        except Exception as e:  # a tile that does not fit (shared memory, registers)
          sweep.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
      ok = [r for r in sweep if "s" in r]
      best = min(ok, key=lambda r: r["s"]) if ok else None
      model = sweep[0] if "s" in sweep[0] else None
      results.append({"batch": M, "weight": name, "K": K, "N": N, "floor_s": floor_s,
                      "model_choice_s": None if model is None else model["s"],
                      "xla_s": xla_s, "xla_of_floor": floor_s / xla_s, "best": best,
                      "best_of_floor": None if best is None else floor_s / best["s"],
                      "sweep": sweep})
      rows.append([M, name, f"{floor_s * 1e6:.1f}", f"{xla_s * 1e6:.1f}",
                   f"{floor_s / xla_s:.0%}",
                   "-" if model is None else f"{model['s'] * 1e6:.1f}",
                   "-" if best is None else f"{best['s'] * 1e6:.1f}",
                   "-" if best is None else f"{floor_s / best['s']:.0%}",
                   "-" if best is None else "bn{block_n} bk{block_k} s{splits} w{num_warps} "
                   "st{num_stages}".format(**best)])
  common.write_record(args, "decode_gemm", {"layers": layers, "shapes": shapes,
                                            "copy": copy}, results)
  common.print_table(f"decode GEMMs, per layer (copy {copy['gb_per_s']:.0f} GB/s)",
                     ["batch", "weight", "floor us", "XLA us", "XLA/floor", "model's us", "best us",
                      "best/floor", "best config"], rows)


if __name__ == "__main__":
  main()
