"""W5: W1 with ragged completion lengths, forced through the sampler's logits hook.

W1's model and batch (Qwen2.5-0.5B shape, random weights, f32 master
weights, bf16 compute; 64 prompts × G = 8 = 512 completions, prompt 256
random tokens; "grpo" preset, even-token reward, one update epoch) with a
budget of 1024 new tokens. Completion i's length n_i is drawn once from a
fixed log-normal, median 150 and σ = ln(1024/150)/1.645 (so ≈ 5 % reach the
budget), seed 0, rounded and clipped to [1, 1024]; `sampling.force_lengths`
makes row i emit EOS at token n_i and never before (`RLStep.logits_processor`).

Variants (each its own process, `--variant`):
  static   the plain sampler: every prompt prefilled G times, all 512 rows
           decode until the longest row stops (rollout_shared_prefix=False,
           rollout_compaction_min_rows=0)
  engine   the rollout engine: prefill once per prompt, compaction down to
           64-row buckets (512, 256, 128, 64)
  engine_cascade   the engine with each prompt's K/V kept and read once per
           group (rl.rollout_shared_prefix_attention, cascade attention)

Reported: step s (the one-jit RL step), rollout s (`RLStep.rollout` alone,
jitted), useful tokens/s (Σ n_i over each), and the ideal rollout time:
Σ over decode steps t of the bytes the live rows need (bf16 weights + each
live row's filled K/V, P + t + 1 tokens) over the measured copy bandwidth
(floors.json). Also counted (no timing): the bytes each variant's decode
actually moves under the same model (all B rows for static; the bucket's
rows for engine), and the ideal with one copy of each prompt's K/V read once
per group (what cascade attention over the shared prefix would buy).

  python -m benchmarks.w5_ragged_grpo_step --variant engine [--smoke]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.w1_grpo_step import even_token_reward
from jaxrl_llm import optim, sampling, sharding
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

EOS_ID = 2
VARIANTS = {  # name -> (rollout_shared_prefix, rollout_compaction_min_rows, cascade attention)
    "static": (False, 0, False),
    "engine": (True, 64, False),
    # the engine with each prompt's K/V kept and read once per group
    # (rl.rollout_shared_prefix_attention)
    "engine_cascade": (True, 64, True),
}


def ragged_lengths(num: int, budget: int, median: float = 150.0, seed: int = 0) -> np.ndarray:
  """Fixed log-normal forced lengths (>= 1), P(n > budget) ≈ 5 %: those rows never
  get their EOS and are truncated at the budget."""
  sigma = np.log(budget / median) / 1.645
  draws = np.random.default_rng(seed).lognormal(np.log(median), sigma, size=num)
  return np.maximum(np.rint(draws), 1).astype(np.int32)


def decode_schedule(lengths: np.ndarray, sizes: tuple[int, ...]) -> list[int]:
  """Rows in the decode batch at each step t (the engine's bucket rule: a bucket
  of b rows runs while more than its successor's size are live)."""
  live_at = lambda t: int(np.sum(lengths > t))
  rows, k = [], 0
  for t in range(int(lengths.max())):
    while k + 1 < len(sizes) and live_at(t) <= sizes[k + 1]:
      k += 1
    rows.append(sizes[k])
  return rows


def byte_counts(cfg, lengths, prompt_len, group_size, sizes) -> dict:
  """Decode bytes: ideal (live rows), ideal with a shared prefix, and what the
  static and engine decodes move (their batch rows × filled K/V)."""
  w = common.param_bytes(cfg, 2)
  kv = common.kv_bytes_per_token(cfg, 2)
  rows = decode_schedule(lengths, sizes)
  groups = lengths.reshape(-1, group_size)
  ideal = shared = moved = 0.0
  for t, batch_rows in enumerate(rows):
    live = lengths > t
    n_live = int(np.sum(live))
    live_groups = int(np.sum(np.any(groups > t, axis=1)))
    ideal += w + n_live * (prompt_len + t + 1) * kv
    shared += w + (live_groups * prompt_len + n_live * (t + 1)) * kv
    moved += w + batch_rows * (prompt_len + t + 1) * kv
  return {"ideal_bytes": ideal, "ideal_shared_prefix_bytes": shared, "moved_bytes": moved,
          "decode_steps": len(rows), "rows_per_step": rows}


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--variant", default="engine", choices=tuple(VARIANTS))
  p.add_argument("--parts", default="rollout,step", help="what to time: rollout, step")
  p.add_argument("--microbatches", type=int, default=16)
  p.add_argument("--remat", default="dots_no_batch")
  p.add_argument("--logprob_chunk", type=int, default=128)
  p.add_argument("--length_buckets", type=int, default=4,
                 help="rl.length_buckets of the update (1: every micro-batch at full width)")
  p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (multi-GPU runs)")
  args = p.parse_args()
  if args.smoke:
    size, R, G, P, L, micro, min_rows = "smoke", 8, 4, 16, 32, 2, 4
  else:
    size, R, G, P, L, micro, min_rows = "0.5b", 64, 8, 256, 1024, args.microbatches, 64
  shared, compaction, cascade = VARIANTS[args.variant]
  compaction = min_rows if compaction else 0
  B = R * G
  forced = ragged_lengths(B, L, median=150.0 if not args.smoke else 6.0)
  lengths = np.minimum(forced, L)  # completion lengths; rows past the budget are truncated
  cfg = common.qwen25_config(size, param_dtype="float32", remat=args.remat)
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=L, temperature=1.0,
                             microbatches=micro, logprob_chunk=args.logprob_chunk,
                             rollout_shared_prefix=shared,
                             rollout_compaction_min_rows=compaction,
                             rollout_shared_prefix_attention=cascade,
                             length_buckets=args.length_buckets)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:int(np.prod(shape))])
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  ref_params = jax.tree.map(jnp.copy, state.params)
  step = rls.RLStep(cfg, rl, tx, even_token_reward, eos_id=EOS_ID, pad_id=0, mesh=mesh,
                    logits_processor=sampling.force_lengths(forced, EOS_ID))
  rng = np.random.default_rng(0)
  batch = {"prompt_tokens": common.random_tokens(rng, (R, P), cfg.vocab_size),
           "prompt_mask": np.ones((R, P), np.int32),
           "prompt_id": np.arange(R, dtype=np.int32)}
  batch = sharding.shard_batch(batch, mesh)
  useful = int(lengths.sum())
  res = {"variant": args.variant, "rollout_shared_prefix": shared,
         "rollout_shared_prefix_attention": cascade,
         "length_buckets": args.length_buckets,
         "rollout_compaction_min_rows": compaction, "useful_tokens": useful,
         "lengths": {"median": float(np.median(lengths)), "mean": float(lengths.mean()),
                     "truncated_frac": float(np.mean(forced > L)), "max": int(lengths.max())}}
  parts = args.parts.split(",")

  if "rollout" in parts:
    def rollout(params, batch, key):
      with sharding.activation_rules(mesh, step.rules):
        return step.rollout(params, batch, key, state.step)
    rollout_jit = jax.jit(rollout)
    t0 = time.perf_counter()
    ro = common.block(rollout_jit(state.params, batch, jax.random.key(1)))
    res["rollout_first_call_s"] = time.perf_counter() - t0
    got = np.asarray(ro["lengths"])
    assert np.array_equal(got, lengths), "forced lengths not met"
    assert np.array_equal(np.asarray(ro["finished"]), forced <= L), "truncation mismatch"
    times = common.time_calls(lambda: rollout_jit(state.params, batch, jax.random.key(2)),
                              warmup=0, repeats=args.repeats)
    res["rollout"] = common.summarize(times)
    res["rollout_useful_tokens_per_s"] = useful / res["rollout"]["median_s"]
    del ro

  if "step" in parts:
    fn = rls.jit_rl_step(step, sh, None, sh.params)
    holder = {"state": state, "i": 0}

    def call():
      holder["i"] += 1
      holder["state"], m = fn(holder["state"], batch, jax.random.key(holder["i"]), ref_params)
      return m

    t0 = time.perf_counter()
    m = jax.device_get(common.block(call()))
    res["step_first_call_s"] = time.perf_counter() - t0
    assert abs(float(m["rl/response_length"]) - lengths.mean()) < 1e-3, m["rl/response_length"]
    assert np.isfinite(float(m["loss/policy"])), m
    times = common.time_calls(call, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
    res["step"] = common.summarize(times)
    res["useful_tokens_per_s"] = useful / res["step"]["median_s"]
    res["metrics_last"] = {k: float(v) for k, v in m.items()}

  sizes = sampling.bucket_sizes(B, compaction)
  counts = byte_counts(cfg, lengths, P, G, sizes)
  res["decode_bytes"] = {k: v for k, v in counts.items() if k != "rows_per_step"}
  res["bucket_sizes"] = list(sizes)
  res["steps_per_bucket"] = [counts["rows_per_step"].count(s) for s in sizes]
  floors = common.load_floors(args)
  bw = floors.get("copy_gb_per_s")
  if bw:
    res["copy_gb_per_s"] = bw
    for k in ("ideal_bytes", "ideal_shared_prefix_bytes", "moved_bytes"):
      res[k.replace("bytes", "rollout_s")] = counts[k] / (bw * 1e9)
    if "rollout" in res:
      res["rollout_over_ideal"] = res["rollout"]["median_s"] / res["ideal_rollout_s"]
  res["peak_gib"] = common.peak_gib()
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "budget": L,
            "lengths": "log-normal median 150, sigma ln(1024/150)/1.645, seed 0",
            "eos_id": EOS_ID, "preset": "grpo", "kl_coef": rl.kl_coef, "microbatches": micro,
            "remat": args.remat, "logprob_chunk": args.logprob_chunk,
            "length_buckets": args.length_buckets, "param_dtype": "float32",
            "mesh": list(mesh.devices.shape), "devices": int(mesh.devices.size),
            "dtype": "bfloat16", "reward": "fraction of even token ids", "floors": floors}
  common.write_record(args, "w5_ragged_grpo_step", config, res)
  common.print_table(
      f"W5 ragged GRPO step {size}, {R}x{G} seqs, prompt {P}, budget {L}, "
      f"{useful} useful tokens",
      ["variant", "step s", "rollout s", "useful tok/s", "ideal rollout s", "moved/ideal",
       "peak GiB"],
      [[args.variant, res.get("step", {}).get("median_s"),
        res.get("rollout", {}).get("median_s"), res.get("useful_tokens_per_s"),
        res.get("ideal_rollout_s"), counts["moved_bytes"] / counts["ideal_bytes"],
        res["peak_gib"]]])


if __name__ == "__main__":
  main()
