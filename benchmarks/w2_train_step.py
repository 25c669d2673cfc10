"""W2: the policy update alone (forward + backward + AdamW), Qwen2.5-1.5B shape.

`jaxrl_llm.sft.sft_step` (the same `accumulate_gradients` / `apply_update`
path as the RL and DPO updates): 16 rows × 2048 tokens of random ids, loss
on every token, f32 master weights and AdamW state, bf16 compute, chunked
float32 log-softmax over the 151936-way vocabulary. State donated.

  tokens/s   16·2048 / median step time
  MFU        (6·N·tokens + 3·causal attention forward FLOPs) / time
             / measured bf16 matmul ceiling (floors.json), N = matmul
             parameters (tied embedding counted once, as the unembedding);
             rematerialised FLOPs are not counted (they are overhead)

Variants pick the rematerialisation policy and micro-batching (memory vs
recompute); each runs in its own process so peak memory is its own.

  python -m benchmarks.w2_train_step [--smoke] --variant dots_mb1
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from benchmarks import common
from jaxrl_llm import optim, sharding
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import create_train_state

# name -> (remat, microbatches, logprob_chunk, attention_impl)
VARIANTS = {
    "dots_mb1": ("dots_no_batch", 1, 128, "auto"),
    "full_mb1": ("full", 1, 128, "auto"),
    "none_mb4": ("none", 4, 128, "auto"),
    "dots_mb1_xla": ("dots_no_batch", 1, 128, "xla"),
    "dots_mb2": ("dots_no_batch", 2, 128, "auto"),  # dots_mb1 needs ~80 GB (estimate)
    "dots_mb2_xla": ("dots_no_batch", 2, 128, "xla"),
}


def main():
  p = common.base_parser(__doc__)
  p.add_argument("--variant", default="dots_mb1", choices=sorted(VARIANTS))
  p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (multi-GPU runs)")
  args = p.parse_args()
  remat, micro, chunk, attn = VARIANTS[args.variant]
  size, B, T = ("smoke", 4, 64) if args.smoke else ("1.5b", 16, 2048)
  cfg = common.qwen25_config(size, param_dtype="float32", remat=remat, attention_impl=attn)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  shape = tuple(int(x) for x in args.mesh.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:int(np.prod(shape))])
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  batch = {"tokens": common.random_tokens(rng, (B, T), cfg.vocab_size),
           "segment_ids": np.ones((B, T), np.int32),
           "loss_mask": np.ones((B, T), np.int32)}
  batch = sharding.shard_batch(batch, mesh)
  step = jax.jit(functools.partial(sft_step, cfg=cfg, tx=tx, microbatches=micro, mesh=mesh,
                                   logprob_chunk=chunk),
                 in_shardings=(sh, None, None), out_shardings=(sh, None),
                 donate_argnums=(0,))
  key = jax.random.key(0)
  holder = {"state": state}

  def call():
    holder["state"], m = step(holder["state"], batch, key)
    return m

  m = common.block(call())
  loss0 = float(m["loss/nll"])
  assert np.isfinite(loss0), loss0
  times = common.time_calls(call, warmup=1, repeats=args.repeats)
  m = common.block(call())
  s = common.summarize(times)
  tokens = B * T
  n_mm = common.matmul_params(cfg)
  flops = 6.0 * n_mm * tokens + 3.0 * common.attention_flops_fwd(cfg, B, T)
  floors = common.load_floors(args)
  res = {"variant": args.variant, "step": s, "tokens_per_s": tokens / s["median_s"],
         "model_flops_per_step": flops, "achieved_tflops": flops / s["median_s"] / 1e12,
         "matmul_params": n_mm, "num_params": cfg.num_params(),
         "loss_first": loss0, "loss_last": float(m["loss/nll"]),
         "peak_gib": common.peak_gib()}
  if floors.get("matmul_tflops"):
    res["mfu"] = res["achieved_tflops"] / floors["matmul_tflops"]
    res["matmul_ceiling_tflops"] = floors["matmul_tflops"]
  config = {"size": size, "batch": B, "seq": T, "remat": remat, "microbatches": micro,
            "logprob_chunk": chunk, "attention_impl": attn, "param_dtype": "float32",
            "dtype": "bfloat16", "optimizer": "adamw + clip 1.0",
            "mesh": list(mesh.devices.shape), "devices": int(mesh.devices.size)}
  common.write_record(args, "w2_train_step", config, res)
  common.print_table(f"W2 train step {size} {B}x{T}",
                     ["variant", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"],
                     [[args.variant, s["median_s"], res["tokens_per_s"],
                       res["achieved_tflops"], res.get("mfu"), res["peak_gib"]]])


if __name__ == "__main__":
  main()
