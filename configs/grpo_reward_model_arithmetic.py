"""GRPO with a learned reward: the reward-model ensemble of configs/reward_model_arithmetic.py.

  python launch/train.py --config=configs/reward_model_arithmetic.py:sft_steps=400 --workdir=/tmp/rm
  python launch/train.py --config=configs/grpo_reward_model_arithmetic.py --workdir=/tmp/grpo_rm

The first command trains the reward model: an SFT warm-start of the tiny model
on 1-2 digit addition/subtraction (400 steps, kept in /tmp/rm/sft_warmstart),
then 4 Bradley–Terry heads on that trunk from preference pairs (the exact
result versus a wrong one). This recipe reads the reward model back from its
workdir (`reward.reward_model_path`; `:rm=/path` on the config argument): the
stored config gives the architecture, heads and aggregation, the checkpoint
the weights, which enter the one-jit GRPO step as `reward_params`. The policy
starts from the same SFT checkpoint (`trainer.init_from`) and never sees the
answers: its only reward is the ensemble's mean score of each completion.
GRPO: 150 steps of 32 prompts x 8 completions, as configs/quickstart.py, which
trains the same way against the exact-match verifier.
Hardware: 2 CPU cores, about 6 minutes for the reward model, 5 for this.
Expected (CPU, defaults, 500 held-out problems): EXPECTED
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
