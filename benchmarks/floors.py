"""The two ceilings every figure is measured against, on this device, in JAX.

  matmul  bf16 × bf16 → bf16 matrix products on random data (2·M·N·K FLOPs
          over the median time); the largest is the MFU denominator of W2.
  copy    y = x · s over a large bf16 array (s a run-time scalar, so XLA
          cannot drop the op): bytes read + bytes written over the median
          time; the denominator of W3's bandwidth fraction.

  python -m benchmarks.floors [--smoke]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import common


def matmul_rate(m: int, n: int, k: int, repeats: int, warmup: int) -> dict:
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, k), jnp.bfloat16)
  b = jax.random.normal(kb, (k, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
  times = common.time_calls(lambda: f(a, b), warmup=warmup, repeats=repeats)
  s = common.summarize(times)
  s["tflops"] = 2.0 * m * n * k / s["median_s"] / 1e12
  s["shape"] = [m, n, k]
  return s


def copy_bandwidth(num_bytes: int, repeats: int, warmup: int) -> dict:
  n = num_bytes // 2
  x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
  s = jnp.asarray(1.0009765625, jnp.bfloat16)
  f = jax.jit(lambda x, s: x * s)
  times = common.time_calls(lambda: f(x, s), warmup=warmup, repeats=repeats)
  out = common.summarize(times)
  out["bytes_moved"] = 2 * n * 2  # read x + write y
  out["gb_per_s"] = out["bytes_moved"] / out["median_s"] / 1e9
  return out


def main():
  p = common.base_parser(__doc__)
  args = p.parse_args()
  if args.smoke:
    shapes = [(256, 256, 256)]
    copy_mb = 16
  else:
    # The ceiling shape (8192³) and the W2 shapes (MLP up/gate and attention q).
    shapes = [(8192, 8192, 8192), (32768, 8960, 1536), (32768, 1536, 8960),
              (32768, 1536, 1536)]
    copy_mb = 4096
  repeats = max(args.repeats, 10)
  mm = [matmul_rate(*s, repeats=repeats, warmup=max(args.warmup, 3)) for s in shapes]
  cp = copy_bandwidth(copy_mb * 2**20, repeats=repeats, warmup=max(args.warmup, 3))
  results = {"matmul": mm, "copy": cp,
             "matmul_tflops": max(r["tflops"] for r in mm),
             "copy_gb_per_s": cp["gb_per_s"]}
  common.write_record(args, "floors", {"shapes": shapes, "copy_bytes": copy_mb * 2**20},
                      results)
  rows = [[f"matmul bf16 {r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}",
           r["median_s"] * 1e3, f"{r['tflops']:.1f} TFLOP/s"] for r in mm]
  rows.append([f"copy {copy_mb} MiB (read+write)", cp["median_s"] * 1e3,
               f"{cp['gb_per_s']:.0f} GB/s"])
  common.print_table("floors", ["what", "median ms", "rate"], rows)


if __name__ == "__main__":
  main()
