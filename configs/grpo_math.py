"""GRPO on an HF instruct model with local MATH-format JSONL (answers in \\boxed{}).

Data: one JSONL file per split, MATH's own format:
  {"problem": "...", "solution": "... so the answer is $\\boxed{\\frac{1}{2}}$.", ...}
The gold answer is the last \\boxed{...} of the solution (nested braces
allowed); a dataset with a separate final-answer column (e.g. MATH-500's
"answer") can map it instead:
  --config.data.field_map="(('prompt','problem'),('answer','answer'))"
Rewards and evaluation share `jaxrl_llm.rewards.host.math_reward` (equivalent
forms such as 0.5 and \\frac{1}{2} match). Prompts use the chat template.

GPU (one H100/H200, Qwen2.5-Math-1.5B-Instruct or Qwen3-1.7B in bf16):
  python launch/train.py --config=configs/grpo_math.py \\
      --config.model.path=/models/Qwen2.5-1.5B-Instruct \\
      --config.data.tokenizer=/models/Qwen2.5-1.5B-Instruct \\
      --config.data.path=/data/math/{split}.jsonl --workdir=/tmp/grpo_math
  python launch/eval.py --config=configs/grpo_math.py --workdir=/tmp/grpo_math ...

Runtime and result depend on the model: this recipe runs end to end for two
steps in the test suite (tests/configs_test.py, tiny random HF checkpoint and
MATH-format fixtures); it has not been measured on a GPU run yet.
"""

from jaxrl_llm.config import default_configdict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=500, preset="dr_grpo")
  c = default_configdict(kind="rl", rl_preset=args["preset"])
  c.model.source = "hf"
  c.model.path = "/path/to/hf_checkpoint"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_no_batch"
  c.data.source = "jsonl"
  c.data.path = "/path/to/math/{split}.jsonl"
  c.data.field_map = (("prompt", "problem"), ("answer", "solution"))
  c.data.tokenizer = "/path/to/hf_checkpoint"
  c.data.chat_template = True
  c.data.prompt_template = ("{prompt}\nPlease reason step by step, and put your final answer "
                            "within \\boxed{{}}.")
  c.data.add_bos = False
  c.data.batch_size = 64
  c.data.max_prompt_len = 512
  c.data.max_answer_len = 64                 # the boxed answer (rewards read the solution)
  c.data.max_drop_fraction = 0.01
  c.rl.group_size = 8
  c.rl.max_new_tokens = 1024
  c.rl.microbatches = 16
  c.reward.components = (("math", 1.0),)
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.eval.num_examples = 500
  c.eval.max_new_tokens = 1024
  c.eval.num_samples = 4
  c.eval.temperature = 1.0
  c.eval.every_steps = 50
  c.mesh.shape = (1, -1, 1)
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["steps"]
  return c
