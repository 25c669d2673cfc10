"""A Bradley–Terry reward model (4-head ensemble) on the synthetic preference pairs.

  python launch/train.py --config=configs/reward_model_arithmetic.py --workdir=/tmp/rm

The trunk starts from a short SFT warm-start; 4 scalar heads share it and are
aggregated by their mean (`reward_model.aggregation=worst_case` or
`uncertainty_weighted` for conservative ensembles). An NLL term on the chosen
answers (sft_coef) regularises the trunk. Held-out pair accuracy is evaluated
on the test split. Hardware: 2 CPU cores, about 4 minutes.
Measured (CPU, seed 0): with these defaults (150 SFT + 200 reward-model steps)
held-out pair accuracy 0.60; with `:sft_steps=400,steps=800` (about 8 minutes,
the reward model configs/grpo_reward_model_arithmetic.py reads) 0.957.
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, steps=200, sft_steps=150)
  c = default_configdict(kind="reward_model")
  use_builtin_task(c, "preference_arithmetic", max_digits=2, batch_size=32)
  c.reward_model.num_heads = 4
  c.reward_model.sft_coef = 1.0
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 10
  c.eval.batch_size = 128
  c.trainer.num_steps = args["steps"]
  c.trainer.log_every = 10
  c.trainer.sft_warmstart.num_steps = args["sft_steps"]
  return c
