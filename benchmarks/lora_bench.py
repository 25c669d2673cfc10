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
           (the record states the shape used). At 7B the default
           remat="dots_no_batch" fits neither an H100 nor an H200 even at 8 rows per
           micro-batch (XLA asked for 135-146 GiB): run it with
           --remat full --microbatches 64 (BENCHMARKS.md, 2026-12-05).
  w1       W1 (0.5B, the same step and shape as benchmarks/w1_grpo_step.py)
           with LoRA (variant "lora", r = --rank; "lora_merged": the same with
           the rollout on merged weights) next to full-parameter training
           (variant "full", with its reference copy).

--quantize_base int8 | int4 | nf4 stores the frozen projection weights of
the LoRA variants quantized (model.lora.quantize_base, jaxrl_llm.quantize:
the decoder dequantizes them inside each matmul; blocks of
--quantize_block_size for the 4-bit kinds); the record's name ends in the
kind (lora_w6_lora_nf4.json). Compare with the same command without it
(the float base in --param_dtype).

Besides the process-wide peak (which also holds model initialisation: a
quantized base is made from a float one), each step's compiled footprint is
recorded (XLA's memory analysis of the one executable: arguments + outputs
− donated aliases + temporaries), the figure to compare between bases.

Rules as every workload here (benchmarks/common.py): compile + warm-up
untimed, block_until_ready per call, median of --repeats. Peak device memory
is a process-wide high-water mark, so without --workload/--variant each
(workload, variant) runs in its own child process. --smoke runs every
workload at tiny shapes on CPU (tests/lora_bench_test.py).

  python -m benchmarks.lora_bench                      # all, one process each
  python -m benchmarks.lora_bench --workload w6        # one workload
  python -m benchmarks.lora_bench --workload w6 --quantize_base nf4
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
WORKLOADS = {"rollout": ("unmerged", "merged"), "w6": ("lora",),
             "w1": ("lora", "lora_merged", "full")}


def model_config(size: str, args, rank: int, merged: bool = False) -> ModelConfig:
  q = getattr(args, "quantize_base", "none")
  lcfg = (lora.LoraConfig(rank=rank, alpha=2.0 * rank, merged_rollout=merged,
                          quantize_base=q, quantize_block_size=args.quantize_block_size,
                          adapter_only_checkpoints=q != "none") if rank
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
  merged = variant in ("merged", "lora_merged")
  cfg = model_config(size, args, rank, merged=merged)
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
            "merged_rollout": merged, "logprob_chunk": args.logprob_chunk,
            "quantize_base": cfg.lora.quantize_base if cfg.lora is not None else "none",
            "quantize_block_size": args.quantize_block_size, "num_params": cfg.num_params()}
  return cfg, rl, step, state, sh, batch, config


def aot(jitted, *example):
  """`jitted` compiled once ahead of time for arguments like `example`, as a function
  with `.footprint` (`compiled_footprint`). Calls go to the compiled executable; if it
  refuses the arguments' layouts (4-bit arrays of a quantized base, which a backend
  may hold unpacked), before running anything, they go to `jitted` (one more
  compilation)."""
  compiled = jitted.lower(*example).compile()
  target = {"fn": compiled}

  def run(*args):
    try:
      return target["fn"](*args)
    except ValueError as e:
      if target["fn"] is jitted or "layout" not in str(e):
        raise
      print(f"compiled executable refused the argument layouts; calling jit: {str(e)[:200]}")
      target["fn"] = jitted
      return jitted(*args)
  run.footprint = compiled_footprint(compiled)
  print(f"compiled footprint GiB: {run.footprint}", flush=True)  # logged even if the run fails
  return run


def compiled_footprint(compiled) -> dict | None:
  """GiB of one compiled executable by XLA's memory analysis: arguments, outputs,
  donated aliases, temporaries, and total = arguments + outputs − aliases +
  temporaries (None where the backend gives no analysis)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  gib = {k: getattr(m, f"{k}_size_in_bytes") / 2**30
         for k in ("argument", "output", "alias", "temp")}
  gib["total"] = gib["argument"] + gib["output"] - gib["alias"] + gib["temp"]
  return gib


def run_one(args, workload: str, variant: str) -> dict:
  cfg, rl, step, state, sh, batch, config = build(args, workload, variant)
  R, G, L = config["prompts"], config["group_size"], config["new_tokens"]
  if workload == "rollout":
    jitted = jax.jit(lambda p, b, r: step.rollout(p, b, r, jnp.zeros((), jnp.int32)))
    params = state.params
    run = aot(jitted, params, batch, jax.random.key(0))
    holder = {"i": 0}

    def call():
      holder["i"] += 1
      return run(params, batch, jax.random.key(holder["i"]))["completion"]
  else:
    ref_params = None
    if cfg.lora is None:  # full-parameter W1: the reference is a copy
      ref_params = jax.tree.map(jnp.copy, state.params)
    fn = rls.jit_rl_step(step, sh, None, sh.params if ref_params is not None else None)
    run = aot(fn.jitted, state, batch, jax.random.key(0), ref_params, None)
    holder = {"state": state, "i": 0}

    def call():
      holder["i"] += 1
      holder["state"], m = run(holder["state"], batch, jax.random.key(holder["i"]), ref_params,
                               None)
      return m

  del state  # the step donates it: holder keeps the live one
  out = jax.device_get(common.block(call()))  # the warm-up
  footprint = run.footprint
  if workload != "rollout":
    assert np.isfinite(float(out["loss/policy"])), out
  times = common.time_calls(call, warmup=max(args.warmup - 1, 0), repeats=args.repeats)
  s = common.summarize(times)
  B = R * G
  res = {"workload": workload, "variant": variant, "step": s,
         "sequences_per_s": B / s["median_s"], "completion_tokens_per_s": B * L / s["median_s"],
         "peak_gib": common.peak_gib(), "compiled_gib": footprint}
  name = f"lora_{workload}_{variant}"
  if config["quantize_base"] != "none":
    name += f"_{config['quantize_base']}"
  common.write_record(args, name, config, res)
  common.print_table(f"LoRA {workload} ({config['size']}, {R}x{G} seqs, prompt "
                     f"{config['prompt_len']}, {L} new, r={config['lora_rank']})",
                     ["variant", "base", "step s", "seq/s", "tok/s", "peak GiB",
                      "step GiB"],
                     [[variant, config["quantize_base"], s["median_s"], res["sequences_per_s"],
                       res["completion_tokens_per_s"], res["peak_gib"],
                       (footprint or {}).get("total")]])
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
  p.add_argument("--quantize_base", default="none", choices=lora.QUANTIZE_BASE,
                 help="LoRA variants: the frozen base stored quantized (model.lora.quantize_base)")
  p.add_argument("--quantize_block_size", type=int, default=64)
  args = p.parse_args(argv)
  workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
  jobs = [(w, v) for w in workloads for v in WORKLOADS[w] if not args.variant or v == args.variant]
  if not jobs:
    raise SystemExit(f"--variant={args.variant!r} is not one of {WORKLOADS[args.workload]}")
  if len(jobs) == 1 or args.smoke:  # smoke: in-process (CPU has no peak-memory statistic)
    return [run_one(args, w, v) for w, v in jobs]
  passthrough, skip = [], False  # every argument but --workload / --variant (and their values)
  for a in argv if argv is not None else sys.argv[1:]:
    if skip:
      skip = False
    elif a in ("--workload", "--variant"):
      skip = True
    elif not a.startswith(("--workload=", "--variant=")):
      passthrough.append(a)
  for w, v in jobs:  # one process per (workload, variant): peak memory is per process
    subprocess.run([sys.executable, "-m", "benchmarks.lora_bench", f"--workload={w}",
                    f"--variant={v}", *passthrough], check=True)
  return None


if __name__ == "__main__":
  main()
