"""W4: one DPO step (reference forward + policy forward/backward + AdamW), 0.5B shape.

`jaxrl_llm.preference.step.PreferenceStep` with the sigmoid DPO loss
(β = 0.1), reference log-probs computed on the fly from a frozen copy of the
initial parameters: 32 pairs, each a 512-token prompt followed by a
512-token chosen and a 512-token rejected completion (1024 tokens per
sequence, 64 sequences per step). f32 master weights, bf16 compute.

  pairs/s   32 / median step time

  python -m benchmarks.w4_dpo_step [--smoke] [--microbatches 2]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxrl_llm import optim, sharding
from jaxrl_llm.preference.step import PreferenceConfig, PreferenceStep, jit_preference_step
from jaxrl_llm.train_state import create_train_state


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--microbatches", type=int, default=2)
  p.add_argument("--remat", default="dots_no_batch")
  p.add_argument("--logprob_chunk", type=int, default=128)
  p.add_argument("--attention_impl", default="auto")
  p.add_argument("--shared_prompt", type=int, default=0,
                 help="1: each pair's prompt runs once (preference.shared_prompt)")
  args = p.parse_args()
  size, N, P, C = ("smoke", 4, 16, 16) if args.smoke else ("0.5b", 32, 512, 512)
  cfg = common.qwen25_config(size, param_dtype="float32", remat=args.remat,
                             attention_impl=args.attention_impl)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh)
  ref_params = jax.tree.map(jnp.copy, state.params)
  pref = PreferenceConfig(losses=(("dpo", 1.0),), beta=0.1, reference="on_the_fly",
                          logprob_chunk=args.logprob_chunk, microbatches=args.microbatches,
                          shared_prompt=bool(args.shared_prompt))
  step = PreferenceStep(cfg, pref, tx, mesh=mesh)
  fn = jit_preference_step(step, sh, sh.params)
  rng = np.random.default_rng(0)
  batch = {"prompt_tokens": common.random_tokens(rng, (N, P), cfg.vocab_size),
           "prompt_mask": np.ones((N, P), np.int32),
           "chosen_tokens": common.random_tokens(rng, (N, C), cfg.vocab_size),
           "chosen_mask": np.ones((N, C), np.int32),
           "rejected_tokens": common.random_tokens(rng, (N, C), cfg.vocab_size),
           "rejected_mask": np.ones((N, C), np.int32)}
  batch = sharding.shard_batch(batch, mesh)
  key = jax.random.key(0)
  holder = {"state": state}

  def call():
    holder["state"], m = fn(holder["state"], batch, key, ref_params)
    return m

  m = common.block(call())
  loss0 = float(m["loss/total"])
  assert np.isfinite(loss0) and abs(loss0 - np.log(2)) < 1e-2, loss0  # π = π_ref at step 0
  times = common.time_calls(call, warmup=1, repeats=args.repeats)
  m = common.block(call())
  s = common.summarize(times)
  n_mm = common.matmul_params(cfg)
  tokens = 2 * N * (P + C)
  # policy fwd+bwd (6N) + reference forward (2N) per token run, plus attention
  attention = common.attention_flops_fwd(cfg, 2 * N, P + C)
  run_tokens = tokens
  if args.shared_prompt:  # the prompt once per pair: P + 2C tokens, its attention once
    run_tokens = N * (P + 2 * C)
    attention -= common.attention_flops_fwd(cfg, N, P)
  flops = 8.0 * n_mm * run_tokens + 4.0 * attention
  floors = common.load_floors(args)
  res = {"step": s, "pairs_per_s": N / s["median_s"], "tokens_per_s": tokens / s["median_s"],
         "model_flops_per_step": flops, "achieved_tflops": flops / s["median_s"] / 1e12,
         "loss_first": loss0, "loss_last": float(m["loss/total"]),
         "peak_gib": common.peak_gib()}
  if floors.get("matmul_tflops"):
    res["mfu"] = res["achieved_tflops"] / floors["matmul_tflops"]
  config = {"size": size, "pairs": N, "prompt_len": P, "completion_len": C,
            "loss": "dpo sigmoid", "beta": 0.1, "reference": "on_the_fly",
            "microbatches": args.microbatches, "remat": args.remat,
            "logprob_chunk": args.logprob_chunk, "attention_impl": args.attention_impl,
            "param_dtype": "float32", "dtype": "bfloat16",
            "shared_prompt": bool(args.shared_prompt)}
  common.write_record(args, "w4_dpo_step", config, res)
  common.print_table(f"W4 DPO step {size}, {N} pairs x {P + C} tokens",
                     ["step s", "pairs/s", "TFLOP/s", "MFU", "peak GiB"],
                     [[s["median_s"], res["pairs_per_s"], res["achieved_tflops"],
                       res.get("mfu"), res["peak_gib"]]])


if __name__ == "__main__":
  main()
