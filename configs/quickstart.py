"""Quickstart: GRPO on the built-in tiny model and arithmetic task, on a CPU.

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

No downloads. Stage 1 runs an SFT warm-start of the built-in tiny model
(0.8M params) on synthetic 1-2 digit addition/subtraction (400 steps); stage 2
runs GRPO with the one-jit RL step (rollout, exact-match reward, advantages
and update compiled together; 150 steps of 32 prompts x 8 completions).
Hardware: 2 CPU cores, about 8-10 minutes in all.
Expected (seeds 0/1/2, README table, 2-core CPU): after SFT, held-out greedy
accuracy 0.888 ± 0.090 and sampled (T=1) 0.816 ± 0.126; GRPO then changes
greedy by -0.022 ± 0.005 and sampled by +0.014 ± 0.019: no gain at this
budget. Another CPU type or XLA version rounds differently and acts like
another seed. The run ends with a before/after table and leaves
TensorBoard logs (`tensorboard --logdir /tmp/quickstart`) and checkpoints. A
rerun with the same workdir resumes.
"""

from jaxrl_llm.config import arithmetic_rl_recipe, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, sft_steps=400, rl_steps=150)
  return arithmetic_rl_recipe(rl_preset="grpo", **args)
