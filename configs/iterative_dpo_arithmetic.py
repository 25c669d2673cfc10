"""Iterative DPO on the arithmetic task: rounds of sample → judge → pair → train.

  python launch/train.py --config=configs/iterative_dpo_arithmetic.py --workdir=/tmp/iterdpo

Each round draws 64 single-digit +/- problems, samples 8 answers per problem
with the current policy (temperature 1), judges them with the exact-match
verifier (`iterative.judge="reward"`: the reward components), pairs the best
answer of each problem with the worst (problems whose answers all tie are
masked and counted) and trains 10 preference steps (RPO = DPO + η·NLL of the
chosen answer) on those pairs. The reference of each round is the policy at
its start (`iterative.update_reference`). Stage 1 is a short SFT warm-start.
Hardware: 2 CPU cores, about 3-4 minutes.
Measured (CPU, defaults, seeds 0/1/2, the 500 held-out problems; record
benchmarks/results/cpu-2026-12-06/iterative_dpo/summary.json, from
`scripts/measure_recipes.py --plan=iterative`): greedy accuracy 0.157 ± 0.030
after the SFT stage -> 0.370 ± 0.185 after 12 rounds (per seed 0.200 -> 0.614,
0.140 -> 0.166, 0.132 -> 0.330: a gain in every seed, of very different size);
sampled (T=1) 0.167 ± 0.044 -> 0.315 ± 0.143.
Variants: `:judge=self` lets the policy judge its own answers (self-rewarding:
the score is log π("y" | problem, answer, " correct:")). This tiny model was
never taught to judge, so its judgements are noise and the run unlearns the
task (measured: greedy 0.11 -> 0.00): the variant shows the mechanics only.
`--config.reward.components='(("reward_model", 1.0),)'
--config.reward.reward_model_path=/tmp/rm` judges with a trained reward model
(configs/reward_model_arithmetic.py).
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, rounds=12, steps_per_round=10, sft_steps=60, judge="reward",
                   loss="rpo")
  c = default_configdict(kind="iterative_dpo")
  use_builtin_task(c, "arithmetic", max_digits=1, batch_size=64)
  it = c.iterative
  it.steps_per_round = args["steps_per_round"]
  it.num_samples = 8
  it.max_new_tokens = 4
  it.judge = args["judge"]
  it.judge_suffix = " correct:"      # self-judge question, in the built-in tokenizer's characters
  it.judge_yes = "y"                 # ... and its one-token "yes"
  it.update_reference = True
  it.preference.losses = ((args["loss"], 1.0),)
  it.preference.beta = 0.1
  if args["loss"] == "rpo":
    it.preference.eta = 1.0
  c.reward.components = (("correct", 1.0),)
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 10
  c.eval.num_examples = 512
  c.checkpoint.save_interval_steps = args["steps_per_round"]
  c.trainer.num_steps = args["rounds"] * args["steps_per_round"]   # a round every 10 steps
  c.trainer.log_every = 10
  c.trainer.sft_warmstart.num_steps = args["sft_steps"]
  return c
