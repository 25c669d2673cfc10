"""GRPO on a real model with a local GSM8K / MATH-style JSONL and math verification.

Data: a JSONL file per split (`{split}` in the path), one object per line with
a question and an answer field, e.g. GSM8K's {"question": ..., "answer": "... #### 42"}.
Rewards: `math` (host-side answer equivalence with sympy / math-verify, each
call with a timeout, through jax.pure_callback inside the one-jit step).

GPU (one H100, Qwen2.5-0.5B-Instruct or Qwen3-0.6B in bf16):
  python launch/train.py --config=configs/grpo_gsm8k.py \\
      --config.model.path=/models/Qwen2.5-0.5B-Instruct \\
      --config.data.path=/data/gsm8k/{split}.jsonl \\
      --config.data.tokenizer=/models/Qwen2.5-0.5B-Instruct --workdir=/tmp/grpo_gsm8k

TPU pod (same program on every host; workdir on GCS):
  launch/tpu_pod.sh --tpu=$TPU --zone=$ZONE --workdir=gs://$BUCKET/grpo_gsm8k \\
      --config=configs/grpo_gsm8k.py --config.model.path=/models/Qwen3-0.6B \\
      --config.data.path=/data/gsm8k/{split}.jsonl --config.data.tokenizer=/models/Qwen3-0.6B

GPU cluster (SLURM, one process per GPU):
  sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm_gpu.sbatch \\
      --config=configs/grpo_gsm8k.py --config.model.path=... --workdir=/shared/runs/grpo

Runtime and result depend on the model; this recipe is validated end to end on
CPU with tiny random checkpoints in the test suite only, not on a GPU run.
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
  c.data.prompt_template = "{prompt}\nPut the final answer after ####.\n"
  c.data.add_bos = False
  c.data.batch_size = 64                     # prompts per step (x group_size)
  c.data.max_prompt_len = 256
  c.data.max_answer_len = 64
  c.rl.group_size = 8
  c.rl.max_new_tokens = 512
  c.rl.overlong_cache_len = 128
  c.rl.microbatches = 8
  c.reward.components = (("math", 1.0),)
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.01
  c.eval.num_examples = 256
  c.eval.max_new_tokens = 512
  c.eval.every_steps = 50
  c.mesh.shape = (1, -1, 1)                  # FSDP over all devices
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["steps"]
  return c
