"""W1 and W5 on tunix: `GRPOLearner` with its vanilla sampler, matched to
w1_grpo_step.py (default) and w5_ragged_grpo_step.py (`--ragged`).

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

W5 (`--ragged`, `--budget` 1024): the same with max_tokens_to_generate =
the budget, EOS id 2 as the stop token, and completion i forced to W5's
length n_i (benchmarks/peers/ragged.py: i = prompt · 8 + sample,
prompt-major): EOS is excluded at steps t < n_i − 1 and is the only choice at
t = n_i − 1; rows with n_i > budget run to the budget. tunix 0.1.7 has no
public logits hook: `Sampler.__call__` takes only a static
`forbidden_tokens` list (the same ids for every row and step), `eos_tokens`,
temperature / top-p / top-k / beam size, and `RolloutConfig` has no
processor or min-length field either. So this script wraps the rollout
sampler's private `Sampler._sample(logits, eos, cache, sampler_state)` — the
one place where tunix draws every token, after prefill and at each decode
step, inside its jitted programs — on that sampler instance only: it masks
the last position's logits [B, V] as above and hands [B, 1, V] to tunix's own
`_sample` (categorical draw, EOS bookkeeping unchanged). Step t =
decoding_step − (num_input_tokens − 1) (tunix's state: the prefill draw writes
position num_input_tokens). Batch row b is completion b: GRPOLearner repeats
each prompt G times contiguously (`np.repeat`) and samples the 512 rows in
one rollout call; the wrapped `VanillaRollout.generate` checks every call's
prompt order and lengths. tunix cuts each completion before its first EOS,
so the completion it scores and trains on is n_i − 1 tokens (n_i > budget:
the budget); the sampler still draws n_i tokens, and useful tokens =
Σ min(n_i, budget), as in W5. The record also gives the EOS-less count tunix
trains on.

Timing under --ragged, besides the global step: the rollout, the wall time
of `VanillaRollout.generate` for the 512 rows (tunix copies the tokens to the
host inside it), first call (compilation) dropped.

  python -m benchmarks.peers.tunix_grpo [--smoke] [--steps 3] [--micro 2]
  python -m benchmarks.peers.tunix_grpo --ragged [--budget 1024] [--smoke]
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


def force_lengths_in_sampler(sampler, lengths_B: np.ndarray, eos_id: int):
  """Wraps `sampler._sample` (tunix 0.1.7, private) on this instance: row b
  draws `eos_id` at step lengths_B[b] − 1 (0-based) and never before."""
  import jax.numpy as jnp

  inner = sampler._sample
  last_B = jnp.asarray(np.maximum(lengths_B, 1) - 1, jnp.int32)

  def _sample(logits, eos, cache, sampler_state):
    if logits.shape[0] != last_B.shape[0]:
      raise ValueError(f"forced lengths: sampler batch of {logits.shape[0]} rows, "
                       f"{last_B.shape[0]} lengths; the 64 x 8 rows must be one rollout call")
    t = sampler_state.decoding_step - (sampler_state.num_input_tokens - 1)
    logits_BV = logits[:, -1]
    neg = jnp.asarray(-jnp.inf, logits_BV.dtype)
    is_eos_V = jnp.arange(logits_BV.shape[-1]) == eos_id
    logits_BV = jnp.where((t < last_B)[:, None] & is_eos_V[None, :], neg, logits_BV)
    only_eos_V = jnp.where(is_eos_V, jnp.zeros((), logits_BV.dtype), neg)
    logits_BV = jnp.where((t == last_B)[:, None], only_eos_V[None, :], logits_BV)
    return inner(logits=logits_BV[:, None, :], eos=eos, cache=cache, sampler_state=sampler_state)

  sampler._sample = _sample


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
  p.add_argument("--ragged", action="store_true",
                 help="W5: completion i forced to W5's log-normal length n_i")
  p.add_argument("--budget", type=int, default=None,
                 help="W5 new-token budget (default 1024; 32 under --smoke, as W5)")
  args = p.parse_args()

  import jax
  import optax
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout, vanilla_rollout

  from benchmarks.peers import ragged

  if args.smoke:
    size, R, G, P, L, micro, logps_micro = "smoke", 4, 4, 16, 8, 2, 2
  else:
    size, R, G, P, L = "0.5b", 64, 8, 256, 512
    micro, logps_micro = args.micro, args.logps_micro
  B = R * G
  if args.ragged:
    L = ragged.budget(args.budget, args.smoke)
    forced = ragged.forced_lengths(B, L, args.smoke)
    stats = ragged.length_stats(forced, L)
    want = np.where(forced <= L, forced - 1, L)  # tunix's completions: EOS cut off
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
          temperature=1.0, top_p=1.0, top_k=None,
          eos_tokens=[ragged.EOS_ID] if args.ragged else [-1]),
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
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "param_dtype": "float32", "dtype": "bfloat16", "remat": args.remat,
            "train_micro_batch_prompts": micro, "logps_micro_batch_prompts": logps_micro,
            "rollout_micro_batch_prompts": R, "beta": 0.04, "sampler": "vanilla",
            "optimizer": "adamw 1e-6 + clip 1.0"}
  rollout_s, checked = [], []  # W5: rollout wall times; per call, its rows' completion lengths
  if args.ragged:
    config.update({"budget": L, "eos_id": ragged.EOS_ID, "lengths": ragged.describe(L, args.smoke),
                   "length_forcing": "Sampler._sample wrapped: EOS masked before n_i, forced at"
                                     " n_i - 1"})
    rollout = cluster.rollout
    if not isinstance(rollout, vanilla_rollout.VanillaRollout):
      raise AssertionError(f"--ragged needs tunix's vanilla rollout, got {type(rollout)}")
    force_lengths_in_sampler(rollout._sampler, forced, ragged.EOS_ID)
    inner_generate = rollout.generate

    def checked_generate(prompts, rollout_config, **kwargs):
      k = len(checked)
      order = [batches[k]["prompts"][i // G] if k < len(batches) else None for i in range(B)]
      if list(prompts) != order:
        raise AssertionError(f"rollout call {k}: rows are not the batch's prompts in "
                             "prompt-major order (row i = prompt i // G)")
      t0 = time.perf_counter()
      out = inner_generate(prompts, rollout_config, **kwargs)
      rollout_s.append(time.perf_counter() - t0)
      got = np.array([len(t) for t in out.tokens])
      ragged.check_lengths(got, want, f"tunix rollout call {k} (EOS-less completion lengths)")
      checked.append(got)
      return out

    rollout.generate = checked_generate
  marks = [time.perf_counter()]

  def write(final):
    times = [b - a for a, b in zip(marks[:-1], marks[1:])]
    timed = times[1:] if len(times) > 1 else times
    med = statistics.median(timed)
    res = {"step": record.summarize(timed), "all_steps_s": times, "final": final,
           "sequences_per_s": B / med, "mean_completion_words": lengths,
           "peak_gib": tunix_common.peak_gib(), **tunix_common.versions()}
    if not args.ragged:
      res["completion_tokens_per_s"] = B * L / med
      record.write_json(args, "peer_tunix_grpo", {"config": config, "results": res})
      return med, res
    useful = stats["useful_tokens"]
    res.update({"useful_tokens": useful, "useful_tokens_per_s": useful / med, "lengths": stats,
                "trained_completion_tokens": int(want.sum()), "lengths_checked_calls": len(checked),
                "all_rollouts_s": rollout_s})
    if rollout_s:
      ro = rollout_s[1:] if len(rollout_s) > 1 else rollout_s
      res["rollout"] = record.summarize(ro)
      res["rollout_useful_tokens_per_s"] = useful / res["rollout"]["median_s"]
    record.write_json(args, "peer_tunix_grpo_w5", {"config": config, "results": res})
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
  if args.ragged and len(checked) != len(marks) - 1:
    raise AssertionError(f"{len(marks) - 1} global steps, {len(checked)} checked rollout calls")
  med, res = write(final=True)
  if args.ragged:
    record.print_table(f"tunix GRPO W5 {size}, {R}x{G} seqs, prompt {P}, budget {L}",
                       ["system", "step s", "rollout s", "useful tok/s", "mean len",
                        "peak GiB"],
                       [["tunix", med, res.get("rollout", {}).get("median_s"),
                         res["useful_tokens_per_s"], lengths[-1] if lengths else None,
                         res["peak_gib"]]])
    return
  record.print_table(f"tunix GRPO {size}, {R}x{G} seqs, prompt {P}, {L} new",
                     ["system", "step s", "seq/s", "mean len", "peak GiB"],
                     [["tunix", med, B / med, lengths[-1] if lengths else None,
                       res["peak_gib"]]])

if __name__ == "__main__":
  main()
