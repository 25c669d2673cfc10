"""GRPO / DAPO on an HF instruct model with local GSM8K-format JSONL and math verification.

Data: one JSONL file per split (`{split}` in the path), GSM8K's own format:
  {"question": "...", "answer": "...rationale with <<calc>> marks... #### 1,234"}
The reward (`math`) and the evaluation both score a completion with
`jaxrl_llm.rewards.host.math_reward`: the completion's final answer (last
\\boxed{}, else after "####", else "the answer is ...") against the gold answer
extracted from the rationale (after "####", thousands separators removed),
equal by exact value or symbolically (math-verify when installed, else sympy),
each check time-limited, called through jax.pure_callback inside the one-jit
step. Prompts go through the tokenizer's chat template (`data.chat_template`).
Rows whose prompt exceeds `data.max_prompt_len` are counted at start-up; the
run refuses to start if more than `data.max_drop_fraction` would be dropped.

GPU (one H100/H200, Qwen2.5-0.5B-Instruct or Qwen3-0.6B in bf16):
  python launch/train.py --config=configs/grpo_gsm8k.py \\
      --config.model.path=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.tokenizer=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.path=/data/gsm8k/{split}.jsonl --workdir=/tmp/grpo_gsm8k
  python launch/eval.py --config=configs/grpo_gsm8k.py --workdir=/tmp/grpo_gsm8k \\
      --config.model.path=... --config.data.tokenizer=... --config.data.path=... \\
      --config.eval.num_samples=16 --config.eval.repeats=3 --config.eval.float32=true

TPU pod (same program on every host; workdir on GCS, `pip install -e .[tpu]`):
  launch/tpu_pod.sh --tpu=$TPU --zone=$ZONE --workdir=gs://$BUCKET/grpo_gsm8k \\
      --config=configs/grpo_gsm8k.py --config.model.path=/models/Qwen3-0.6B \\
      --config.data.path=/data/gsm8k/{split}.jsonl --config.data.tokenizer=/models/Qwen3-0.6B

GPU cluster (SLURM, one process per GPU):
  sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sbatch \\
      --config=configs/grpo_gsm8k.py --config.model.path=... --workdir=/shared/runs/grpo

Variants: `--config=configs/grpo_gsm8k.py:preset=grpo` (plain GRPO with a KL
term instead of DAPO). Runtime and result depend on the model: this recipe
runs end to end for two steps in the test suite (tests/configs_test.py, on a
tiny random HF checkpoint with a chat template and GSM8K-format fixtures); it
has not been measured on a GPU run yet.
"""

from jaxrl_llm.config import default_configdict, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, steps=500, preset="dapo")
  c = default_configdict(kind="rl", rl_preset=args["preset"])
  c.model.source = "hf"
  c.model.path = "/path/to/hf_checkpoint"    # config.json + *.safetensors
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_no_batch"
  c.data.source = "jsonl"
  c.data.path = "/path/to/gsm8k/{split}.jsonl"
  c.data.field_map = (("prompt", "question"), ("answer", "answer"))
  c.data.tokenizer = "/path/to/hf_checkpoint"
  c.data.chat_template = True
  c.data.prompt_template = ("{prompt}\nPlease reason step by step, and put your final answer "
                            "within \\boxed{{}}.")
  c.data.add_bos = False
  c.data.batch_size = 64                     # prompts per step (x group_size)
  c.data.max_prompt_len = 256
  c.data.max_answer_len = 32                 # the final answer (rewards read the rationale)
  c.data.max_drop_fraction = 0.01
  c.rl.group_size = 8
  c.rl.max_new_tokens = 512
  c.rl.microbatches = 8
  c.reward.components = (("math", 1.0),)
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.01
  c.eval.num_examples = 256
  c.eval.max_new_tokens = 512
  c.eval.num_samples = 4                     # mean@4, pass@{1,2,4}, maj@{1,2,4}
  c.eval.temperature = 1.0
  c.eval.every_steps = 50
  c.mesh.shape = (1, -1, 1)                  # FSDP over all devices
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["steps"]
  return c
