"""Where a decode step's time goes: W3's sampler under the profiler, kernels by time.

`jaxrl_llm.sampling.sample` (W3's model and settings: Qwen2.5-0.5B shape, bf16
parameters, prompt 256, temperature 1, no stop token) is compiled twice, for
`--steps` and for 1 new token, and each is run once under `jax.profiler.trace`.
The device events are read from the Perfetto JSON the profiler writes. The
decode loop's kernels are those launched at least `steps − 1` times (prefill
kernels run once, or once per layer); per decode step:

  wall_ms          (wall time of the long run − the short one) / (steps − 1)
  kernel_ms        summed time of the loop's kernels / (steps − 1) (overlapping
                   streams are summed, so this can exceed the wall time)
  busy_fraction    kernel_ms / wall_ms: below 1, the device idles between
                   kernels (launch gaps, host work, synchronisation)
  top kernels      name, calls and ms per step, and share of kernel_ms, and the
                   optimized HLO's instruction it ran (the trace's hlo_op): its opcode, result
                   type and the jax operation it came from (op_name), e.g. whether
                   a concatenate fusion joins weights (merged products) or small
                   per-step values (fused elementwise work)

  python -m benchmarks.profile_decode [--batches 64,512] [--steps 64] [--smoke]
      [--decode_matmul xla|pallas]   (the layers' decode products, ModelConfig.decode_matmul)
      [--group_size G] [--shared_prefix_attention 0|1]   (batch/G prompts, G samples each;
                                       with 1 the prompt's K/V kept once per group)
      [--dump_hlo 1]   (also write the long program's optimized HLO next to the record)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, profile_update, trace
from jaxrl_llm.models import decoder
from jaxrl_llm.sampling import sample


def device_kernel_times(trace_dir: str) -> dict:
  """{kernel name: [calls, total µs, HLO instruction or '']} over the device streams of a
  Perfetto trace."""
  totals = collections.defaultdict(lambda: [0, 0.0, ""])
  for name, hlo_op, us in trace.device_kernels(trace_dir):
    totals[name][0] += 1
    totals[name][1] += us
    totals[name][2] = totals[name][2] or hlo_op
  return dict(totals)


def describe_kernel(kernel: str, hlo_op: str, instructions: dict, result_types: dict) -> dict:
  """The optimized HLO's instruction behind a traced kernel: opcode, result type, op_name
  ({} for a library kernel the trace did not name)."""
  key = profile_update.instruction_of(kernel, hlo_op, instructions)
  if key is None:
    return {}
  opcode, target, op_name, _ = instructions[key]
  return {"instruction": key, "opcode": opcode, "target": target, "op_name": op_name[-160:],
          "result_type": result_types.get(key, "")}


def profile_once(fn, trace_dir: str):
  jax.block_until_ready(fn())  # compiled and warm before the trace
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    wall_s = time.perf_counter() - t0
  return wall_s, device_kernel_times(trace_dir)


def profile_batch(batch: int, steps: int, size: str, prompt_len: int, top: int,
                  decode_matmul: str = "xla", group_size: int = 1,
                  shared_prefix_attention: bool = False, categorical: str = "gumbel",
                  hlo_path: str = "") -> dict:
  cfg = dataclasses.replace(common.qwen25_config(size, param_dtype="bfloat16"),
                            decode_matmul=decode_matmul)
  params = decoder.init_params(cfg, jax.random.key(0))
  if batch % group_size:
    raise ValueError(f"batch {batch} is not a multiple of --group_size {group_size}")
  prompt = jnp.asarray(common.random_tokens(np.random.default_rng(0),
                                            (batch // group_size, prompt_len), cfg.vocab_size))
  mask, key = jnp.ones_like(prompt), jax.random.key(1)

  def run(n):
    fn = jax.jit(functools.partial(sample, cfg, max_new_tokens=n, temperature=1.0,
                                   stop_tokens=(), cache_size=prompt_len + steps,
                                   group_size=group_size,
                                   shared_prefix_attention=shared_prefix_attention,
                                   categorical=categorical))
    with tempfile.TemporaryDirectory() as d:
      return profile_once(lambda: fn(params, prompt, mask, key), d), fn

  (wall_long, k_long), long_fn = run(steps)
  hlo_text = long_fn.lower(params, prompt, mask, key).compile().as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo_text)
  instructions, result_types = (profile_update.hlo_instructions(hlo_text),
                                profile_update.hlo_result_types(hlo_text))
  (wall_short, k_short), _ = run(1)
  # Kernel names differ between the two programs, so the decode loop's kernels are
  # found by count instead: those launched at least once per decode step.
  del k_short
  per_step = {name: (calls / (steps - 1), us / (steps - 1) / 1e3, hlo_op)
              for name, (calls, us, hlo_op) in k_long.items() if calls >= steps - 1}
  kernel_ms = sum(ms for _, ms, _ in per_step.values())
  wall_ms = (wall_long - wall_short) / (steps - 1) * 1e3
  ranked = sorted(per_step.items(), key=lambda kv: -kv[1][1])
  return {"batch": batch, "steps": steps, "decode_matmul": decode_matmul,
          "group_size": group_size, "shared_prefix_attention": shared_prefix_attention,
          "categorical": categorical, "wall_ms": wall_ms, "kernel_ms": kernel_ms,
          "busy_fraction": kernel_ms / wall_ms if wall_ms > 0 else None,
          "kernels_per_step": sum(c for c, _, _ in per_step.values()),
          "top": [{"name": n[:160], "calls_per_step": c, "ms_per_step": ms,
                   "share": ms / kernel_ms if kernel_ms else None,
                   "hlo": describe_kernel(n, op, instructions, result_types)}
                  for n, (c, ms, op) in ranked[:top]]}


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--batches", default="64,512")
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--decode_matmul", default="xla", choices=["xla", "pallas"])
  p.add_argument("--group_size", type=int, default=1)
  p.add_argument("--shared_prefix_attention", type=int, default=0, choices=[0, 1])
  p.add_argument("--categorical", default="gumbel", choices=["gumbel", "inverse_cdf"])
  p.add_argument("--dump_hlo", type=int, default=0, choices=[0, 1])
  args = p.parse_args()
  decode_matmul = (common.pallas_decode_matmul() if args.decode_matmul == "pallas"
                   else args.decode_matmul)
  size, prompt_len = ("smoke", 16) if args.smoke else ("0.5b", 256)
  steps = min(args.steps, 8) if args.smoke else args.steps
  results = []
  for b in (int(x) for x in args.batches.split(",")):
    r = profile_batch(min(b, 4 * args.group_size) if args.smoke else b, steps, size,
                      prompt_len, args.top, decode_matmul, args.group_size,
                      bool(args.shared_prefix_attention), args.categorical,
                      hlo_path=os.path.join(common.out_dir(args), (
                          f"profile_decode_b{b}{'_' + args.tag if args.tag else ''}.hlo.txt"))
                      if args.dump_hlo else "")
    results.append(r)
    print(f"batch {r['batch']}: wall {r['wall_ms']:.3f} ms/step, kernels "
          f"{r['kernel_ms']:.3f} ms/step (busy {r['busy_fraction']:.2f}), "
          f"{r['kernels_per_step']:.0f} kernels/step", flush=True)
    common.print_table(f"top kernels, batch {r['batch']}",
                       ["kernel", "calls", "ms", "share", "HLO result", "op_name"],
                       [[k["name"][:60], k["calls_per_step"], k["ms_per_step"], k["share"],
                         k["hlo"].get("result_type", "")[:40],
                         k["hlo"].get("op_name", "")[-60:]] for k in r["top"]])
    jax.clear_caches()
  common.write_record(args, "profile_decode", {"size": size, "prompt_len": prompt_len,
                                               "steps": steps, "decode_matmul": decode_matmul,
                                               "group_size": args.group_size,
                                               "shared_prefix_attention":
                                               bool(args.shared_prefix_attention),
                                               "categorical": args.categorical},
                      results)


if __name__ == "__main__":
  main()
