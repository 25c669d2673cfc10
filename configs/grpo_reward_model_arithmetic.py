"""GRPO with a learned reward: the reward-model ensemble of configs/reward_model_arithmetic.py.

  python launch/train.py --config=configs/reward_model_arithmetic.py:sft_steps=400,steps=800 \
      --workdir=/tmp/rm
  python launch/train.py --config=configs/grpo_reward_model_arithmetic.py --workdir=/tmp/grpo_rm

The first command trains the reward model: an SFT warm-start of the tiny model
on 1-2 digit addition/subtraction (400 steps, kept in /tmp/rm/sft_warmstart),
then 4 Bradley–Terry heads on that trunk for 800 steps of preference pairs (the
exact result versus one off by 1-3 or with shuffled digits); measured held-out
pair accuracy 0.957. This recipe reads the reward model back from its workdir
(`reward.reward_model_path`; `:rm=/path` on the config argument): the stored
config gives the architecture, heads and aggregation, the checkpoint the
weights, which enter the one-jit GRPO step as `reward_params`. The policy
starts from the same SFT checkpoint (`trainer.init_from`) and never sees the
answers: its only reward is the ensemble's mean score of each completion.
GRPO: 150 steps of 32 prompts x 8 completions.
Hardware: 2 CPU cores, about 8 minutes for the reward model, 5 for this.
Expected: reward-model over-optimisation (Gao et al. 2023, "Scaling Laws for
Reward Model Overoptimization"), not a gain. Measured (CPU, seed 0, 500
held-out problems): the mean reward-model score rises from 3.5 (first steps)
to about 5, while held-out greedy accuracy falls from 0.94 to 0.68 by step 50
and 0.64 at step 150 (sampled T=1: 0.90 -> 0.61): the policy drifts to wrong
answers unlike the reward model's training pairs, which it scores highly. The
same run with `--config.reward.components='(("correct", 1.0),)'
--config.reward.reward_model_path=` (the exact-match verifier) keeps 0.94 ->
0.95. A KL penalty (`--config.rl.kl_coef=0.04`: 0.69 at step 150) or the
conservative `--config.reward.reward_model_aggregation=worst_case` (0.66) slow
the fall only a little at this scale.
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, rm="/tmp/rm", rl_steps=150)
  c = default_configdict(kind="rl", rl_preset="grpo")
  use_builtin_task(c, "arithmetic", max_digits=2, batch_size=32)
  c.reward.components = (("reward_model", 1.0),)
  c.reward.reward_model_path = args["rm"]   # the workdir of a kind="reward_model" run
  c.trainer.init_from = args["rm"] + "/sft_warmstart"  # the policy: the RM's SFT stage
  c.rl.group_size = 8
  c.rl.max_new_tokens = 6
  c.rl.kl_coef = 0.0                        # no reference forward: faster on CPU
  c.optim.learning_rate = 3e-5              # RL moves a converged SFT model gently
  c.optim.warmup_steps = 10
  c.optim.grad_clip_norm = 1.0
  c.eval.num_examples = 512
  c.eval.batch_size = 256
  c.eval.every_steps = 50
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["rl_steps"]
  c.trainer.log_every = 10
  return c
