"""W1 on tunix: `GRPOLearner` with its vanilla sampler, matched to w1_grpo_step.py.

Same work per global step: 64 prompts of 256 random tokens × 8 generations
= 512 completions of exactly 512 tokens (the stop id is -1, never sampled),
temperature 1 (top_p 1, no top-k: tunix skips sorting then), reward =
fraction of even token ids, reference model with β = 0.04, one optimizer
step per global step (mini_batch = the 64 prompts, num_iterations 1),
gradient accumulation over micro-batches of `--micro` prompts; all 512
completions sampled in one rollout call. Actor, reference and rollout share
one mesh (the sampler reads the actor's weights). tunix's Qwen2 with f32
parameters and bf16 compute; AdamW lr 1e-6 with global-norm clip 1.

Timing: `GRPOLearner._run_global_step` is wrapped; after each call the
actor's parameters are blocked on and the clock read. The first global step
(compilation) is dropped; median of the rest.

  python -m benchmarks.peers.tunix_grpo [--smoke] [--steps 3] [--micro 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks import record
from benchmarks.peers import tunix_common


def even_token_reward(prompts, completions, **kwargs):
  out = []
  for text in completions:
    ids = [int(w[1:]) for w in text.split() if w[1:].isdigit()]
    out.append(float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--micro", type=int, default=2, help="prompts per training micro-batch")
  p.add_argument("--logps_micro", type=int, default=4, help="prompts per log-prob micro-batch")
  p.add_argument("--remat", default="none", choices=("none", "block", "decoder"),
                 help="tunix remat; block/decoder break its sampler (nnx.remat in while_loop)")
  args = p.parse_args()

  import jax
  import optax
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  if args.smoke:
    size, R, G, P, L, micro, logps_micro = "smoke", 4, 4, 16, 8, 2, 2
  else:
    size, R, G, P, L = "0.5b", 64, 8, 256, 512
    micro, logps_micro = args.micro, args.logps_micro
  cfg = tunix_common.model_config(size, args.remat)
  mesh = tunix_common.make_mesh()
  actor = tunix_common.make_model(cfg, mesh, seed=0)
  reference = tunix_common.make_model(cfg, mesh, seed=0)
  tok = tunix_common.WordTokenizer(cfg.vocab_size)
  rng = np.random.default_rng(0)
  # The sampler prepends BOS: P - 1 words make P prompt tokens.
  prompts = [tunix_common.random_text(rng, P - 1, cfg.vocab_size)
             for _ in range(R * args.steps)]
  batches = [{"prompts": prompts[i * R:(i + 1) * R]} for i in range(args.steps)]

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=args.steps,
          mini_batch_size=R, train_micro_batch_size=micro, rollout_micro_batch_size=R,
          compute_logps_micro_batch_size=logps_micro),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=L, max_prompt_length=P, kv_cache_size=P + L + 8,
          temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[-1]),
  )
  cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok,
                                     cluster_config=cluster_config)
  algo = grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=0.04, epsilon=0.2)
  lengths = []

  def length_metric(prompts, completions, **kwargs):
    lengths.append(float(np.mean([len(c.split()) for c in completions])))
    return {}

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                     reward_fns=even_token_reward, metric_fns=[length_metric])
  B = R * G
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "param_dtype": "float32", "dtype": "bfloat16", "remat": args.remat,
            "train_micro_batch_prompts": micro, "logps_micro_batch_prompts": logps_micro,
            "rollout_micro_batch_prompts": R, "beta": 0.04, "sampler": "vanilla",
            "optimizer": "adamw 1e-6 + clip 1.0"}
  marks = [time.perf_counter()]

  def write(final):
    times = [b - a for a, b in zip(marks[:-1], marks[1:])]
    timed = times[1:] if len(times) > 1 else times
    med = statistics.median(timed)
    res = {"step": record.summarize(timed), "all_steps_s": times, "final": final,
           "sequences_per_s": B / med, "completion_tokens_per_s": B * L / med,
           "mean_completion_words": lengths, "peak_gib": tunix_common.peak_gib(),
           **tunix_common.versions()}
    record.write_json(args, "peer_tunix_grpo", {"config": config, "results": res})
    return med, res

  inner = learner._run_global_step

  def timed_global_step(*a, **k):
    out = inner(*a, **k)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param))
    marks.append(time.perf_counter())
    print(f"global step {len(marks) - 1}: {marks[-1] - marks[-2]:.2f} s", flush=True)
    write(final=False)  # a partial record survives a time-out of later steps
    return out

  learner._run_global_step = timed_global_step
  with tunix_common.mesh_context(mesh):
    learner.train(batches)
  med, res = write(final=True)
  record.print_table(f"tunix GRPO {size}, {R}x{G} seqs, prompt {P}, {L} new",
                     ["system", "step s", "seq/s", "mean len", "peak GiB"],
                     [["tunix", med, B / med, lengths[-1] if lengths else None,
                       res["peak_gib"]]])

if __name__ == "__main__":
  main()
