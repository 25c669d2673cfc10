"""SFT of an HF instruct model on GSM8K-format rationales, through the chat template.

Data: GSM8K's JSONL ({"question", "answer": "...rationale... #### 72"}); the
model learns the whole rationale (prompt tokens are not trained on), and the
held-out evaluation scores the final answer with `rewards.host.math_reward`,
as the GRPO recipe does. A common first stage before configs/grpo_gsm8k.py
(`--config.trainer.init_from=<this workdir>`).

GPU (one H100/H200):
  python launch/train.py --config=configs/sft_gsm8k.py \\
      --config.model.path=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.tokenizer=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.path=/data/gsm8k/{split}.jsonl --workdir=/tmp/sft_gsm8k

Runtime and result depend on the model: this recipe runs end to end for two
steps in the test suite (tests/configs_test.py, tiny random HF checkpoint and
GSM8K-format fixtures); it has not been measured on a GPU run yet.
"""

from jaxrl_llm.config import default_configdict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=1000)
  c = default_configdict(kind="sft")
  c.model.source = "hf"
  c.model.path = "/path/to/hf_checkpoint"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_no_batch"
  c.data.source = "jsonl"
  c.data.path = "/path/to/gsm8k/{split}.jsonl"
  c.data.field_map = (("prompt", "question"), ("answer", "answer"))
  c.data.tokenizer = "/path/to/hf_checkpoint"
  c.data.chat_template = True
  c.data.add_bos = False
  c.data.batch_size = 32                     # packed rows per step
  c.data.seq_len = 1024
  c.data.max_prompt_len = 256
  c.data.max_drop_fraction = 0.01
  c.optim.learning_rate = 1e-5
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 30
  c.optim.total_steps = args["steps"]
  c.eval.num_examples = 256
  c.eval.max_new_tokens = 512
  c.eval.every_steps = 200
  c.mesh.shape = (1, -1, 1)
  c.checkpoint.save_interval_steps = 200
  c.trainer.num_steps = args["steps"]
  return c
