"""Offline DPO on a real model with local JSONL preference pairs.

Data: `{split}.jsonl` files with one {"prompt", "chosen", "rejected"} object
per line (other field names through data.field_map). The reference is the
starting policy, computed on the fly in the same jitted step.

GPU (one H100):
  python launch/train.py --config=configs/dpo_jsonl.py \\
      --config.model.path=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.path=/data/pairs/{split}.jsonl \\
      --config.data.tokenizer=/models/Qwen2.5-0.5B-Instruct --workdir=/tmp/dpo
Variants: `--config.preference.losses="(('ipo', 1.0),)"`, `simpo` with
`--config.preference.reference=none --config.preference.beta=2.0`, or
`--config=configs/dpo_jsonl.py:loss=kto` with unpaired data (source
"unpaired_jsonl": prompt, completion, label).

Runtime and result depend on the model and data; validated on CPU with tiny
models in the test suite only.
"""

from jaxrl_llm.config import default_configdict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=1000, loss="dpo")
  c = default_configdict(kind="dpo")
  c.model.source = "hf"
  c.model.path = "/path/to/hf_checkpoint"
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_no_batch"
  c.data.source = "unpaired_jsonl" if args["loss"] == "kto" else "preference_jsonl"
  c.data.path = "/path/to/pairs/{split}.jsonl"
  c.data.tokenizer = "/path/to/hf_checkpoint"
  c.data.add_bos = False
  c.data.batch_size = 32
  c.data.max_prompt_len = 512
  c.data.max_completion_len = 512
  c.preference.losses = ((args["loss"], 1.0),)
  c.preference.beta = 0.1
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = 50
  c.eval.num_examples = 0
  c.trainer.num_steps = args["steps"]
  c.trainer.microbatches = 4
  return c
