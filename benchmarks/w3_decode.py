"""W3: decoding alone (the rollout's sampler), Qwen2.5-0.5B shape.

`jaxrl_llm.sampling.sample` under one jit: prefill of a 256-token prompt,
then 512 sampled tokens (temperature 1, no top-k/top-p) with no stop token,
so every row decodes all 512 tokens. Batch 1, 64 and 512.

Reported per variant:
  tokens/s      B·512 / (prefill + decode) wall time
  decode ms     per decode step: (T(512 new) − T(1 new)) / 511, where the
                T(1 new) run is prefill + one step (same batch, same dtypes)
  bw fraction   ideal step time / measured decode step, where the ideal is
                (bf16 weights + the K/V actually filled, on average
                P + 256 tokens per row) / measured copy bandwidth
                (floors.json). The implementation reads the whole
                preallocated cache (P + 512 slots) every step, so this
                fraction counts that extra traffic as a loss.

Variants: parameter storage dtype (bf16 inference copy vs the f32 master
weights the RL step samples with), attention implementation, greedy vs
sampling, a cache twice as long (how many passes a step makes over it).

  python -m benchmarks.w3_decode [--smoke] [--variants b1,b64,...]
"""

from __future__ import annotations

import functools
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxrl_llm.models import decoder
from jaxrl_llm.sampling import sample

# name -> (batch, param_dtype, attention_impl, greedy, measure_prefill)
# (batch 1's prefill is a few ms against ~1 s of decoding: total / 512 bounds its step)
VARIANTS = {
    "b1": (1, "bfloat16", "auto", False, False),
    "b64": (64, "bfloat16", "auto", False, True),
    "b512": (512, "bfloat16", "auto", False, True),
    "b64_f32params": (64, "float32", "auto", False, False),
    "b512_f32params": (512, "float32", "auto", False, False),
    "b64_xla": (64, "bfloat16", "xla", False, False),
    "b512_xla": (512, "bfloat16", "xla", False, False),
    "b512_greedy": (512, "bfloat16", "auto", True, False),
    # b64 / b512 without the prefill-only compile (for comparisons under XLA_FLAGS)
    "b64_np": (64, "bfloat16", "auto", False, False),
    "b512_np": (512, "bfloat16", "auto", False, False),
}
# Same as b64 / b512 but with a KV cache twice as long (P + 2·512 extra empty
# slots): the step time's growth shows how many times a step moves the cache.
CACHE_2X = {"b64_cache2x": "b64", "b512_cache2x": "b512"}
DEFAULT = "b1,b64,b512"


def run_variant(args, name, size, prompt_len, new_tokens, floors):
  batch, param_dtype, attn, greedy, measure_prefill = VARIANTS[CACHE_2X.get(name, name)]
  cache_size = 2 * (prompt_len + new_tokens) if name in CACHE_2X else None
  measure_prefill = measure_prefill and cache_size is None
  if args.smoke:
    batch = min(batch, 4)
  cfg = common.qwen25_config(size, param_dtype=param_dtype, attention_impl=attn)
  params = decoder.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(common.random_tokens(rng, (batch, prompt_len), cfg.vocab_size))
  mask = jnp.ones_like(prompt)
  key = jax.random.key(1)

  def make(n):
    return jax.jit(functools.partial(sample, cfg, max_new_tokens=n, temperature=1.0,
                                     greedy=greedy, stop_tokens=(), cache_size=cache_size))

  full = make(new_tokens)
  t0 = time.perf_counter()
  out = common.block(full(params, prompt, mask, key))
  first_call_s = time.perf_counter() - t0  # compile + one run
  lengths = np.asarray(out.lengths_B)
  assert np.all(lengths == new_tokens), f"rows stopped early: {lengths}"
  assert len(np.unique(np.asarray(out.tokens_BL))) > 1, "degenerate samples"
  # The checked call above was the warm-up.
  times = common.time_calls(lambda: full(params, prompt, mask, key), warmup=0,
                            repeats=args.repeats)
  res = {"variant": name, "batch": batch, "param_dtype": param_dtype, "attention_impl": attn,
         "greedy": greedy, "cache_size": cache_size or prompt_len + new_tokens,
         "full": common.summarize(times), "first_call_s": first_call_s}
  t_full = res["full"]["median_s"]
  res["tokens_per_s"] = batch * new_tokens / t_full
  res["step_ms_upper"] = t_full / new_tokens * 1e3  # prefill included: an upper bound
  avg_len = prompt_len + (new_tokens + 1) / 2
  ideal_bytes = (common.param_bytes(cfg, 2)
                 + batch * avg_len * common.kv_bytes_per_token(cfg, 2))
  res["ideal_bytes_per_step"] = ideal_bytes
  res["full_cache_bytes_per_step"] = (common.param_bytes(cfg, 2) + batch * (
      prompt_len + new_tokens) * common.kv_bytes_per_token(cfg, 2))
  bw = floors.get("copy_gb_per_s")
  if bw:
    res["bound_step_ms"] = ideal_bytes / (bw * 1e9) * 1e3
    res["bw_fraction_lower"] = res["bound_step_ms"] / res["step_ms_upper"]
  if measure_prefill:
    one = make(1)
    ptimes = common.time_calls(lambda: one(params, prompt, mask, key), warmup=1,
                               repeats=args.repeats)
    res["prefill_plus_one"] = common.summarize(ptimes)
    step_s = (t_full - res["prefill_plus_one"]["median_s"]) / (new_tokens - 1)
    res["decode_step_ms"] = step_s * 1e3
    res["decode_tokens_per_s"] = batch / step_s
    if bw:
      res["bw_fraction"] = res["bound_step_ms"] / res["decode_step_ms"]
  return res


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--variants", default=DEFAULT)
  args = p.parse_args()
  size, prompt_len, new_tokens = ("smoke", 16, 8) if args.smoke else ("0.5b", 256, 512)
  floors = common.load_floors(args)
  results = []
  for name in args.variants.split(","):
    try:
      results.append(run_variant(args, name, size, prompt_len, new_tokens, floors))
    except Exception as e:  # one failing variant must not lose the others
      traceback.print_exc()
      results.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:2000]})
    jax.clear_caches()
  common.write_record(args, "w3_decode", {"size": size, "prompt_len": prompt_len,
                                          "new_tokens": new_tokens, "temperature": 1.0,
                                          "xla_flags": os.environ.get("XLA_FLAGS", ""),
                                          "floors": floors}, results)
  rows = []
  for r in results:
    if "error" in r:
      rows.append([r["variant"], None, None, None, None, None, r["error"][:60]])
      continue
    rows.append([r["variant"], r["full"]["median_s"], r["tokens_per_s"],
                 r.get("decode_step_ms"), r.get("bw_fraction"), r["step_ms_upper"],
                 r.get("bw_fraction_lower")])
  common.print_table(f"W3 decode {size}, prompt {prompt_len}, {new_tokens} new",
                     ["variant", "total s", "tok/s", "step ms", "bw frac", "step ms<=",
                      "bw frac>="], rows)


if __name__ == "__main__":
  main()
