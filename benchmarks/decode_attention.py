"""Decode attention alone, at W3's shapes: how close one decode step's
attention comes to reading its K/V at copy bandwidth, per layout.

One query position per row against a per-layer KV cache of P + L = 768
slots with the first `filled` = 512 slots valid (W3's average fill: prompt
256 + half of 512 new tokens), Qwen2.5-0.5B heads (14 query, 2 KV heads of
64). A jitted `lax.fori_loop` runs `--iters` decode steps of 24 layers (one
cache buffer per layer, each layer's output feeding the next query, so
nothing is hoisted); time per layer call = total / (iters · 24).

Variants: batch (64, 512) × implementation (cudnn, xla) of
`decoder.attention`. Bandwidth fraction: bytes of the filled K/V
(B · filled · 2 · K · H · 2 bytes) per call over the call's time, divided by
the measured copy bandwidth (floors.json). (The 2026-12-04 record also holds
a `packed` layout, the 7 query heads of a KV head as 7 query rows; cuDNN
refused its [B, 1, 1, S] mask, and with plain cuDNN already at the copy
bandwidth at batch 512 it was dropped.)

  python -m benchmarks.decode_attention [--smoke]
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp

from benchmarks import common
from jaxrl_llm.models import decoder


def time_variant(args, cfg, batch, cache_len, filled, iters):
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  L = cfg.num_layers
  keys = jax.random.split(jax.random.key(0), 2 * L + 1)
  k_cache = tuple(jax.random.normal(keys[i], (batch, cache_len, K, H), jnp.bfloat16)
                  for i in range(L))
  v_cache = tuple(jax.random.normal(keys[L + i], (batch, cache_len, K, H), jnp.bfloat16)
                  for i in range(L))
  q = jax.random.normal(keys[-1], (batch, 1, N, H), jnp.bfloat16)
  mask_B1S = jnp.broadcast_to(jnp.arange(cache_len) < filled, (batch, 1, cache_len))
  kv_len_B = jnp.full((batch,), filled, jnp.int32)

  @jax.jit
  def run(q, k_cache, v_cache):
    def step(_, q):
      for kc, vc in zip(k_cache, v_cache):
        q = decoder.attention(cfg, q, kc, vc, mask_B1S, kv_len_B)
      return q
    return jax.lax.fori_loop(0, iters, step, q)

  out = common.block(run(q, k_cache, v_cache))
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  times = common.time_calls(lambda: run(q, k_cache, v_cache), warmup=1, repeats=args.repeats)
  s = common.summarize(times)
  per_call = s["median_s"] / (iters * L)
  kv_bytes = batch * filled * 2 * K * H * 2
  return {"total": s, "per_layer_call_us": per_call * 1e6, "kv_bytes_per_call": kv_bytes,
          "gb_per_s": kv_bytes / per_call / 1e9}


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--batches", default="64,512")
  args = p.parse_args()
  size, cache_len, filled = ("smoke", 24, 16) if args.smoke else ("0.5b", 768, 512)
  floors = common.load_floors(args)
  bw = floors.get("copy_gb_per_s")
  results, rows = [], []
  for batch in (int(b) for b in args.batches.split(",")):
    batch = min(batch, 4) if args.smoke else batch
    for impl in ("cudnn", "xla"):
      if impl == "cudnn" and jax.default_backend() != "gpu":
        continue
      cfg = common.qwen25_config(size, attention_impl=impl)
      name = f"b{batch}_{impl}"
      try:
        r = time_variant(args, cfg, batch, cache_len, filled, args.iters)
      except Exception as e:  # one failing variant must not lose the others
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {e}"[:2000]}
      r.update(variant=name, batch=batch, impl=impl)
      if bw and "gb_per_s" in r:
        r["bw_fraction"] = r["gb_per_s"] / bw
      results.append(r)
      rows.append([name, r.get("per_layer_call_us"), r.get("gb_per_s"), r.get("bw_fraction"),
                   r.get("error", "")[:50]])
      jax.clear_caches()
  common.write_record(args, "decode_attention", {
      "size": size, "cache_len": cache_len, "filled": filled, "iters": args.iters,
      "floors": floors}, results)
  common.print_table(f"decode attention {size}, cache {cache_len}, filled {filled}",
                     ["variant", "us/layer", "K/V GB/s", "bw frac", "error"], rows)


if __name__ == "__main__":
  main()
