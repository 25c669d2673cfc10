"""PPO with a learned critic on the built-in tiny model and arithmetic task.

  python launch/train.py --config=configs/ppo_arithmetic.py --workdir=/tmp/ppo_arithmetic

The quickstart's recipe (configs/quickstart.py) with the advantage estimator
swapped: stage 1 is the same SFT warm-start of the built-in tiny model (0.8M
params) on 1-2 digit addition/subtraction (400 steps); stage 2 runs PPO
(`rl_preset="ppo"`, jaxrl_llm.rl.ppo_step) with the same budget as the
quickstart's GRPO: 150 steps of 32 prompts x 8 completions, the same policy
learning rate. The critic is a value model copied from the SFT policy with a
zero scalar head (rl.critic.init="policy"), trained by its own AdamW at
rl.critic.learning_rate on the clipped value loss; the first
rl.critic.warmup_steps steps train the critic only. Token-level GAE with
decoupled λ (critic 1.0, actor 0.95), whitened advantages, PPO-clip.
Hardware: a CPU or one GPU; a PPO step costs more than a GRPO step (the value
model's forward over the rollout, and its forward and backward per minibatch):
3.5x the quickstart's per-step time on one H200 GPU, where both recipes ran
in 4.3 min together (not timed on a CPU).
Measured (docs/ppo.md): on one H200, seed 0, held-out sampled (T=1) accuracy
0.812 after SFT -> 0.852 after PPO (GRPO from the same SFT model: 0.846). On a
2-core CPU over seeds 0-2: sampled +0.010 +- 0.017, greedy -0.014 +- 0.007,
next to GRPO's +0.014 +- 0.019 and -0.022 +- 0.005 from the same SFT
checkpoints: no difference between the two at this budget. A rerun with
the same workdir resumes, the critic included.

  --config=configs/ppo_arithmetic.py:sft_steps=400,rl_steps=60   shorter budget
"""

from jaxrl_llm.config import arithmetic_rl_recipe, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, sft_steps=400, rl_steps=150)
  c = arithmetic_rl_recipe(rl_preset="ppo", **args)  # 32 prompts x 8, as the quickstart
  c.rl.critic.learning_rate = 1e-4  # the zero head must learn the value scale fast
  c.rl.critic.warmup_steps = 10     # critic-only steps: the first values are all 0
  return c
