"""GRPO with LoRA adapters on the built-in tiny model and arithmetic task, on a CPU.

  python launch/train.py --config=configs/grpo_lora_arithmetic.py --workdir=/tmp/grpo_lora

Stage 1 is the quickstart's full-parameter SFT warm-start (the built-in model
starts random, so there is no pretrained base to adapt); stage 2 trains
rank-16 LoRA adapters on every projection (q, k, v, o, gate, up, down) of the
frozen warm-started base with GRPO. The KL term's reference is the frozen base
with adapters off: no second copy of the weights (`jaxrl_llm.lora`). LoRA
wants a larger learning rate than full fine-tuning (the update is s·A·B with
A, B small). Result of one run (seed 0): docs/lora.md.
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, sft_steps=400, rl_steps=100, rank=16, init="gaussian")
  c = default_configdict(kind="rl", rl_preset="grpo")
  use_builtin_task(c, "arithmetic", max_digits=2, batch_size=32, num_train=50000,
                   num_test=1000)
  c.model.lora.rank = args["rank"]
  c.model.lora.alpha = 2.0 * args["rank"]   # s = alpha / rank = 2
  c.model.lora.init = args["init"]          # or "pissa"
  c.eval.num_examples = 512
  c.eval.batch_size = 256
  c.eval.every_steps = 50
  c.rl.group_size = 8
  c.rl.max_new_tokens = 6
  c.rl.kl_coef = 0.01                       # against the frozen base (adapters off)
  c.reward.components = (("correct", 1.0),)
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 10
  c.optim.grad_clip_norm = 1.0
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["rl_steps"]
  c.trainer.log_every = 5
  c.trainer.sft_warmstart.num_steps = args["sft_steps"]
  c.trainer.sft_warmstart.learning_rate = 3e-3
  c.trainer.sft_warmstart.batch_size = 64
  return c
