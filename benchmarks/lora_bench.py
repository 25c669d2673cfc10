"""LoRA workloads: rollout merged vs unmerged, W6 (7B GRPO step with LoRA), W1 with LoRA.

  rollout  the RL rollout alone (`RLStep.rollout`, jitted) of a LoRA policy,
           two variants: "unmerged" (x·W + s·(x·A)·B at every decoded token)
           and "merged" (W + s·A·B formed once per rollout in bf16,
           model.lora.merged_rollout=True). Shape: W1's (Qwen2.5-0.5B, 64
           prompts × G = 8, prompt 256, 512 new tokens), rank --rank.
  w6       one GRPO step in one jit (`RLStep`, "grpo" preset, k3 KL with the
           reference = the frozen base with adapters off: no second copy) of
           the Qwen2.5-7B shape with LoRA r = 64 on q, k, v, o, gate, up,
           down; W1's batch shape unless --prompts / --new_tokens say less
           (the record states the shape used).
  w1       W1 (0.5B, the same step and shape as benchmarks/w1_grpo_step.py)
           with LoRA (variant "lora", r = --rank) next to full-parameter
           training (variant "full", with its reference copy).

Rules as every workload here (benchmarks/common.py): compile + warm-up
untimed, block_until_ready per call, median of --repeats. Peak device memory
is a process-wide high-water mark, so without --workload/--variant each
(workload, variant) runs in its own child process. --smoke runs every
workload at tiny shapes on CPU (tests/lora_bench_test.py).

  python -m benchmarks.lora_bench                      # all, one process each
  python -m benchmarks.lora_bench --workload w6        # one workload
  python -m benchmarks.lora_bench --smoke              # CPU, tiny shapes
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.w1_grpo_step import even_token_reward
from jaxrl_llm import lora, optim, sharding
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

# Qwen2.5-7B: untied embeddings, GQA 28/4, qkv bias.
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                 num_kv_heads=4, intermediate_size=18944)
WORKLOADS = {"rollout": ("unmerged", "merged"), "w6": ("lora",), "w1": ("lora", "full")}


def model_config(size: str, args, rank: int, merged: bool = False) -> ModelConfig:
  lcfg = (lora.LoraConfig(rank=rank, alpha=2.0 * rank, merged_rollout=merged) if rank
          else None)
  if size == "7b":
    return ModelConfig(family="qwen2", qkv_bias=True, tie_embeddings=False, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, dtype="bfloat16",
                       param_dtype=args.param_dtype, remat=args.remat, lora=lcfg, **QWEN25_7B)
  return common.qwen25_config(size, param_dtype=args.param_dtype, remat=args.remat).replace(
      lora=lcfg)


def shape(args, workload: str):
  """(size, prompts, G, prompt len, new tokens, microbatches)."""
  if args.smoke:
    return "smoke", 4, 4, 16, 8, 2
  size = "7b" if workload == "w6" else "0.5b"
  return size, args.prompts, 8, 256, args.new_tokens, args.microbatches


def build(args, workload: str, variant: str):
  size, R, G, P, L, micro = shape(args, workload)
  rank = 0 if variant == "full" else args.rank
  cfg = model_config(size, args, rank, merged=variant == "merged")
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=L, temperature=1.0,
                             microbatches=micro, logprob_chunk=args.logprob_chunk)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  if cfg.lora is not None:
    tx = lora.freeze_base(tx)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  if cfg.lora is not None:  # adapters as after training (B ≠ 0): the low-rank path does work
    layers = dict(state.params["layers"])
    for k in layers:
      if k.endswith(lora.B_SUFFIX):
        layers[k] = jax.random.normal(jax.random.key(1), layers[k].shape,
                                      layers[k].dtype) * 1e-3
    state = state.replace(params=dict(state.params, layers=layers))
  step = rls.RLStep(cfg, rl, tx, even_token_reward, eos_id=-1, pad_id=0, mesh=mesh)
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch(
      {"prompt_tokens": common.random_tokens(rng, (R, P), cfg.vocab_size),
       "prompt_mask": np.ones((R, P), np.int32), "prompt_id": np.arange(R, dtype=np.int32)},
      mesh)
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "microbatches": micro, "lora_rank": rank, "lora_alpha": 2.0 * rank if rank else 0,
            "lora_targets": list(lora.TARGETS) if rank else [], "remat": args.remat,
            "param_dtype": args.param_dtype, "dtype": "bfloat16",
            "merged_rollout": variant == "merged", "logprob_chunk": args.logprob_chunk,
            "num_params": cfg.num_params()}
  return cfg, rl, step, state, sh, batch, config


def run_one(args, workload: str, variant: str) -> dict:
  cfg, rl, step, state, sh, batch, config = build(args, workload, variant)
  R, G, L = config["prompts"], config["group_size"], config["new_tokens"]
  if workload == "rollout":
    fn = jax.jit(lambda p, b, r: step.rollout(p, b, r, jnp.zeros((), jnp.int32)))
    params = state.params
    holder = {"i": 0}

    def call():
      holder["i"] += 1
      return fn(params, batch, jax.random.key(holder["i"]))["completion"]
  else:
    ref_params = None
    if cfg.lora is None:  # full-parameter W1: the reference is a copy
      ref_params = jax.tree.map(jnp.copy, state.params)
    fn = rls.jit_rl_step(step, sh, None, sh.params if ref_params is not None else None)
    holder = {"state": state, "i": 0}

    def call():
      holder["i"] += 1
      holder["state"], m = fn(holder["state"], batch, jax.random.key(holder["i"]), ref_params)
      return m

  out = jax.device_get(common.block(call()))  # compiles; also the warm-up
  if workload != "rollout":
    assert np.isfinite(float(out["loss/policy"])), out
  times = common.time_calls(call, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
  s = common.summarize(times)
  B = R * G
  res = {"workload": workload, "variant": variant, "step": s,
         "sequences_per_s": B / s["median_s"], "completion_tokens_per_s": B * L / s["median_s"],
         "peak_gib": common.peak_gib()}
  common.write_record(args, f"lora_{workload}_{variant}", config, res)
  common.print_table(f"LoRA {workload} ({config['size']}, {R}x{G} seqs, prompt "
                     f"{config['prompt_len']}, {L} new, r={config['lora_rank']})",
                     ["variant", "step s", "seq/s", "tok/s", "peak GiB"],
                     [[variant, s["median_s"], res["sequences_per_s"],
                       res["completion_tokens_per_s"], res["peak_gib"]]])
  return res


def main(argv=None):
  p = common.base_parser(__doc__)
  p.add_argument("--workload", default="all", choices=("all", *WORKLOADS))
  p.add_argument("--variant", default="", help="one variant of --workload (default: all)")
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--prompts", type=int, default=64, help="W6/W1 prompts per step (W1: 64)")
  p.add_argument("--new_tokens", type=int, default=512)
  p.add_argument("--microbatches", type=int, default=16)
  p.add_argument("--remat", default="dots_no_batch")
  p.add_argument("--logprob_chunk", type=int, default=128)
  p.add_argument("--param_dtype", default="float32")
  args = p.parse_args(argv)
  workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
  jobs = [(w, v) for w in workloads for v in WORKLOADS[w] if not args.variant or v == args.variant]
  if not jobs:
    raise SystemExit(f"--variant={args.variant!r} is not one of {WORKLOADS[args.workload]}")
  if len(jobs) == 1 or args.smoke:  # smoke: in-process (CPU has no peak-memory statistic)
    return [run_one(args, w, v) for w, v in jobs]
  passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                 if not a.startswith(("--workload", "--variant"))]
  for w, v in jobs:  # one process per (workload, variant): peak memory is per process
    subprocess.run([sys.executable, "-m", "benchmarks.lora_bench", f"--workload={w}",
                    f"--variant={v}", *passthrough], check=True)
  return None


if __name__ == "__main__":
  main()
