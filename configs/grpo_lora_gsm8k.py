"""GRPO / DAPO with LoRA on an HF instruct model and GSM8K: configs/grpo_gsm8k.py's recipe
with rank-64 adapters on every projection of a frozen base.

  python launch/train.py --config=configs/grpo_lora_gsm8k.py \\
      --config.model.path=/models/Qwen2.5-7B-Instruct \\
      --config.data.tokenizer=/models/Qwen2.5-7B-Instruct \\
      --config.data.path=/data/gsm8k/{split}.jsonl --workdir=/tmp/grpo_lora_gsm8k

Only the adapters and their Adam moments are trained (for Qwen2.5-7B at r=64:
161M adapter parameters next to a 7.6B frozen base); the reference of the KL
term is the base with adapters off, so no second copy of the weights is held,
and checkpoints hold the adapters only (the base is re-read from model.path on
resume). Export: `jaxrl_llm.models.peft.save_peft` (HF PEFT layout) or
`save_hf` (merged). Variants: `:init=pissa`, `:rank=16`, `:preset=grpo`.
Runs end to end for two steps in tests/configs_test.py on a tiny random
checkpoint; not yet measured on a GPU run.
"""

import importlib.util
import os


def get_config(arg=None):
  from jaxrl_llm.config import parse_arg
  args = parse_arg(arg, steps=500, preset="dapo", rank=64, init="gaussian")
  spec = importlib.util.spec_from_file_location(
      "grpo_gsm8k", os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_gsm8k.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config(f"steps={args['steps']},preset={args['preset']}")
  c.model.lora.rank = args["rank"]
  c.model.lora.alpha = 2.0 * args["rank"]   # s = 2
  c.model.lora.init = args["init"]
  c.model.lora.adapter_only_checkpoints = True
  c.optim.learning_rate = 1e-5              # LoRA: ~10x the full-parameter rate
  c.optim.weight_decay = 0.0
  return c
