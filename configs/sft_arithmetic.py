"""SFT of the built-in tiny model on the synthetic arithmetic task.

  python launch/train.py --config=configs/sft_arithmetic.py --workdir=/tmp/sft_arith

Hardware: 2 CPU cores are enough (about 3 minutes); any GPU/TPU works too.
Expected: held-out greedy exact-match accuracy rises from 0.00 at step 0 to
about 0.5-0.7 after 1500 steps (1-3 digit addition/subtraction); the
checkpoint warm-starts RL (`trainer.init_from=/tmp/sft_arith`).
Variants: `--config=configs/sft_arithmetic.py:steps=200` for a smoke run.
"""

from jaxrl_llm.config import default_configdict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=1500)
  c = default_configdict(kind="sft")
  c.data.source = "arithmetic"
  c.data.num_train = 50000
  c.data.num_test = 1000
  c.data.batch_size = 64          # packed rows of 64 tokens (~5 problems each)
  c.data.max_prompt_len = 12
  c.data.max_answer_len = 6
  c.data.seq_len = 64
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.total_steps = args["steps"]
  c.optim.end_lr_ratio = 0.1
  c.eval.num_examples = 256
  c.eval.max_new_tokens = 6
  c.eval.every_steps = 500
  c.checkpoint.save_interval_steps = 500
  c.trainer.num_steps = args["steps"]
  c.trainer.log_every = 50
  return c
