"""W1: one full GRPO step in one jit, Qwen2.5-0.5B shape.

`jaxrl_llm.rl.rl_step.RLStep` with the "grpo" preset (group-normalised
advantages, PPO-clip loss, k3 KL to the reference with β = 0.04):

  ROLLOUT    64 prompts × G = 8 = 512 completions, prompt 256 random tokens,
             exactly 512 new tokens each (the stop id is -1, never sampled),
             temperature 1
  REWARD     in-graph: the fraction of even token ids in the completion
  REF        reference log-probs of all 512 completions (frozen copy of the
             initial parameters)
  UPDATE     one epoch, one optimizer step (AdamW) over the 512 completions,
             accumulated over micro-batches

f32 master weights (and reference copy), bf16 compute. Reported: step
seconds (median), sequences/s, completion tokens/s, peak device memory.

  python -m benchmarks.w1_grpo_step [--smoke]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jaxrl_llm import optim, sharding
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state


def even_token_reward(inputs):
  """Fraction of even token ids among the completion tokens (varies per row)."""
  m = inputs.completion_mask_BL.astype(jnp.float32)
  even = (inputs.completion_BL % 2 == 0).astype(jnp.float32)
  frac = jnp.sum(even * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def add_flags(p):
  """W1's workload flags (shared with `profile_update`)."""
  p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (multi-GPU runs)")
  p.add_argument("--microbatches", type=int, default=16)
  p.add_argument("--remat", default="dots_no_batch")
  p.add_argument("--logprob_chunk", type=int, default=128)
  p.add_argument("--attention_impl", default="auto")
  p.add_argument("--scan_layers", type=int, default=1,
                 help="0: the training forward unrolls its layers (model.scan_layers); the "
                      "sampler always does")
  p.add_argument("--update_shared_prompt", type=int, default=0,
                 help="1: the update's forward runs each group's prompt once "
                      "(rl.update_shared_prompt)")
  p.add_argument("--float32_logprob_head", type=int, default=0,
                 help="1: the log-prob head's GEMM writes float32 logits "
                      "(model.float32_logprob_head)")
  p.add_argument("--shared_prefix", type=int, default=1,
                 help="1: prefill each prompt once for its G samples (the default "
                      "rollout); 0: once per sample (the static sampler)")
  p.add_argument("--shared_prefix_attention", type=int, default=0,
                 help="1: also keep each prompt's K/V once per group and read it once per "
                      "group per decode step (rl.rollout_shared_prefix_attention)")


def build(args) -> dict:
  """W1's model, RL step, state, reference copy and prompt batch from the flags of
  `add_flags`; `fn` is the one-jit step."""
  if args.smoke:
    size, R, G, P, L = "smoke", 4, 4, 16, 8
    micro = 2
  else:
    size, R, G, P, L = "0.5b", 64, 8, 256, 512
    micro = args.microbatches
  cfg = common.qwen25_config(size, param_dtype="float32", remat=args.remat,
                             attention_impl=args.attention_impl).replace(
                                 scan_layers=bool(args.scan_layers),
                                 float32_logprob_head=bool(args.float32_logprob_head))
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=L, temperature=1.0,
                             microbatches=micro, logprob_chunk=args.logprob_chunk,
                             update_shared_prompt=bool(args.update_shared_prompt),
                             rollout_shared_prefix=bool(args.shared_prefix),
                             rollout_shared_prefix_attention=bool(args.shared_prefix_attention))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:int(np.prod(shape))])
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  ref_params = jax.tree.map(jnp.copy, state.params)
  step = rls.RLStep(cfg, rl, tx, even_token_reward, eos_id=-1, pad_id=0, mesh=mesh)
  fn = rls.jit_rl_step(step, sh, None, sh.params)
  rng = np.random.default_rng(0)
  batch = {"prompt_tokens": common.random_tokens(rng, (R, P), cfg.vocab_size),
           "prompt_mask": np.ones((R, P), np.int32),
           "prompt_id": np.arange(R, dtype=np.int32)}
  batch = sharding.shard_batch(batch, mesh)
  return {"cfg": cfg, "rl": rl, "tx": tx, "mesh": mesh, "state": state, "sh": sh,
          "ref_params": ref_params, "step": step, "fn": fn, "batch": batch, "size": size,
          "R": R, "G": G, "P": P, "L": L, "micro": micro}


def main():
  p = common.base_parser(__doc__)
  add_flags(p)
  args = p.parse_args()
  w = build(args)
  rl, mesh, fn, batch, ref_params = w["rl"], w["mesh"], w["fn"], w["batch"], w["ref_params"]
  size, R, G, P, L, micro = w["size"], w["R"], w["G"], w["P"], w["L"], w["micro"]
  holder = {"state": w["state"], "i": 0}

  def call():
    holder["i"] += 1
    holder["state"], m = fn(holder["state"], batch, jax.random.key(holder["i"]), ref_params)
    return m

  m = jax.device_get(common.block(call()))  # compiles; also the warm-up
  assert float(m["rl/response_length"]) == L, m["rl/response_length"]
  assert np.isfinite(float(m["loss/policy"])), m
  times = common.time_calls(call, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
  m = jax.device_get(common.block(call()))
  s = common.summarize(times)
  B = R * G
  variant = ("prefill_per_sample" if not args.shared_prefix else
             "shared_prefix_attention" if args.shared_prefix_attention else "base")
  if args.remat != "dots_no_batch":
    variant += f"+remat_{args.remat}"
  if not args.scan_layers:
    variant += "+unrolled"
  if args.float32_logprob_head:
    variant += "+f32head"
  if args.update_shared_prompt:
    variant += "+shared_prompt_update"
  res = {"variant": variant, "step": s, "sequences_per_s": B / s["median_s"],
         "completion_tokens_per_s": B * L / s["median_s"], "peak_gib": common.peak_gib(),
         "metrics_last": {k: float(v) for k, v in m.items()}}
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "preset": "grpo", "kl_coef": rl.kl_coef, "microbatches": micro,
            "remat": args.remat, "logprob_chunk": args.logprob_chunk,
            "attention_impl": args.attention_impl, "param_dtype": "float32",
            "scan_layers": bool(args.scan_layers),
            "float32_logprob_head": bool(args.float32_logprob_head),
            "update_shared_prompt": bool(args.update_shared_prompt),
            "rollout_shared_prefix": bool(args.shared_prefix),
            "rollout_shared_prefix_attention": bool(args.shared_prefix_attention),
            "dtype": "bfloat16", "reward": "fraction of even token ids", "stop_tokens": "none",
            "mesh": list(mesh.devices.shape), "devices": int(mesh.devices.size)}
  common.write_record(args, "w1_grpo_step", config, res)
  common.print_table(f"W1 GRPO step {size}, {R}x{G} seqs, prompt {P}, {L} new",
                     ["variant", "step s", "seq/s", "tok/s", "peak GiB"],
                     [[variant, s["median_s"], res["sequences_per_s"],
                       res["completion_tokens_per_s"], res["peak_gib"]]])


if __name__ == "__main__":
  main()
