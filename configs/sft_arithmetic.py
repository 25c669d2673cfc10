"""SFT of the built-in tiny model on the synthetic arithmetic task.

  python launch/train.py --config=configs/sft_arithmetic.py --workdir=/tmp/sft_arith

Hardware: 2 CPU cores (about 5 minutes); any GPU/TPU works too.
Expected (measured on CPU, 1-2 digit addition/subtraction): held-out greedy
exact-match accuracy 0.00 at step 0, about 0.3 at step 200 and 0.8 after the
400 steps. The checkpoint warm-starts RL (`--config.trainer.init_from=DIR`).
Variants: `--config=configs/sft_arithmetic.py:steps=200` for a shorter run,
`--config.data.task_options="(('max_digits', 3),)"` for 3-digit problems
(slower to learn: about 0.57 after 300 steps in one measured run).
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, steps=400)
  c = default_configdict(kind="sft")
  use_builtin_task(c, "arithmetic", max_digits=2, batch_size=64, num_train=50000,
                   num_test=1000)
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.total_steps = args["steps"]
  c.optim.end_lr_ratio = 0.1
  c.eval.every_steps = 100
  c.checkpoint.save_interval_steps = 200
  c.trainer.num_steps = args["steps"]
  c.trainer.log_every = 50
  return c
