"""GRPO with LoRA adapters on the built-in tiny model and arithmetic task, on a CPU.

  python launch/train.py --config=configs/grpo_lora_arithmetic.py --workdir=/tmp/grpo_lora

Stage 1 is the quickstart's full-parameter SFT warm-start (the built-in model
starts random, so there is no pretrained base to adapt); stage 2 trains
rank-16 LoRA adapters on every projection (q, k, v, o, gate, up, down) of the
frozen warm-started base with GRPO. The KL term's reference is the frozen base
with adapters off: no second copy of the weights (`jaxrl_llm.lora`). LoRA
wants a larger learning rate than full fine-tuning (the update is s·A·B with
A, B small). Results over seeds 0, 1, 2: docs/lora.md.
"""

from jaxrl_llm.config import arithmetic_rl_recipe, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, sft_steps=400, rl_steps=100, rank=16, init="gaussian")
  c = arithmetic_rl_recipe(rl_preset="grpo", sft_steps=args["sft_steps"],
                           rl_steps=args["rl_steps"])
  c.model.lora.rank = args["rank"]
  c.model.lora.alpha = 2.0 * args["rank"]   # s = alpha / rank = 2
  c.model.lora.init = args["init"]          # or "pissa"
  c.rl.kl_coef = 0.01                       # against the frozen base (adapters off)
  c.optim.learning_rate = 3e-4
  return c
