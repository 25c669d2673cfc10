"""W4 on tunix: `DPOTrainer`, matched to w4_dpo_step.py.

Same work per optimizer step: 32 pairs, each a 512-token random prompt
(left-padded slot, all real tokens) with 512-token chosen and rejected
completions, sigmoid DPO loss with β = 0.1, reference log-probs from a
frozen reference model in every step. Inputs are given already tokenized
(`TrainingInput`), in micro-batches of `--micro` pairs with gradient
accumulation up to 32 pairs per optimizer step. tunix's Qwen2 with f32
parameters and bf16 compute; AdamW lr 1e-6 with global-norm clip 1.

Timing: a training hook blocks on the policy parameters at the start of
every optimizer step's first micro-step and reads the clock; the first two
intervals (compilations) are dropped; median of the rest.

  python -m benchmarks.peers.tunix_dpo [--smoke] [--steps 5] [--micro 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks import record
from benchmarks.peers import tunix_common


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
  p.add_argument("--remat", default="none", choices=("none", "block", "decoder"))
  args = p.parse_args()

  import jax
  import optax
  from flax import nnx
  from tunix.sft import hooks
  from tunix.sft.dpo import dpo_trainer

  size, N, P, C = ("smoke", 4, 16, 16) if args.smoke else ("0.5b", 32, 512, 512)
  micro = min(args.micro, N)
  accum = N // micro
  cfg = tunix_common.model_config(size, args.remat)
  mesh = tunix_common.make_mesh()
  policy = tunix_common.make_model(cfg, mesh, seed=0)
  reference = tunix_common.make_model(cfg, mesh, seed=0)
  rng = np.random.default_rng(0)

  def tokens(n, length):
    return rng.integers(tunix_common.SPECIALS, cfg.vocab_size, size=(n, length), dtype=np.int32)

  ones_p = np.ones((micro, P), np.int32)
  ones_c = np.ones((micro, C), np.int32)
  data = [dpo_trainer.TrainingInput(prompt_ids=tokens(micro, P), prompt_mask=ones_p,
                                    chosen_ids=tokens(micro, C), chosen_mask=ones_c,
                                    rejected_ids=tokens(micro, C), rejected_mask=ones_c)
          for _ in range((args.steps + 1) * accum)]  # + 1: compilation
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
  config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=args.steps + 1,
                                         gradient_accumulation_steps=accum, beta=0.1)
  marks = []

  class StepClock(hooks.TrainingHooks):
    def on_train_start(self, ctx):
      pass

    def on_train_end(self, ctx):
      jax.block_until_ready(nnx.state(ctx.model, nnx.Param))
      marks.append(time.perf_counter())

    def on_train_step_start(self, ctx):
      if ctx.iter_steps % accum == 0:
        jax.block_until_ready(nnx.state(ctx.model, nnx.Param))
        marks.append(time.perf_counter())
        if len(marks) > 1:
          print(f"optimizer step {len(marks) - 1}: {marks[-1] - marks[-2]:.2f} s", flush=True)
          write(final=False)  # a partial record survives a time-out

    def on_train_step_end(self, ctx, train_step, train_loss):
      pass

    def on_eval_step_start(self, ctx):
      pass

    def on_eval_step_end(self, ctx, eval_loss):
      pass

  def write(final):
    times = [b - a for a, b in zip(marks[:-1], marks[1:])]
    # The first two intervals hold compilations (policy step, then a second
    # trace of the step seen on the first accumulation boundary).
    timed = times[2:] if len(times) > 3 else times[1:] or times
    med = statistics.median(timed)
    res = {"step": record.summarize(timed), "all_steps_s": times, "pairs_per_s": N / med,
           "final": final, "peak_gib": tunix_common.peak_gib(), **tunix_common.versions()}
    record.write_json(args, "peer_tunix_dpo", {"config": cfg_rec, "results": res})
    return med, res

  cfg_rec = {"size": size, "pairs": N, "prompt_len": P, "completion_len": C,
             "micro_batch_pairs": micro, "gradient_accumulation_steps": accum,
             "param_dtype": "float32", "dtype": "bfloat16", "remat": args.remat, "beta": 0.1,
             "loss": "dpo sigmoid", "optimizer": "adamw 1e-6 + clip 1.0"}
  trainer = dpo_trainer.DPOTrainer(model=policy, ref_model=reference, optimizer=tx,
                                   training_config=config)
  trainer.training_hooks = StepClock()
  print("tunix DPO: training starts (first step compiles)", flush=True)
  with tunix_common.mesh_context(mesh):
    trainer.train(data)
  med, res = write(final=True)
  record.print_table(f"tunix DPO {size}, {N} pairs x {P + C} tokens",
                     ["system", "step s", "pairs/s", "peak GiB"],
                     [["tunix", med, N / med, res["peak_gib"]]])


if __name__ == "__main__":
  main()
