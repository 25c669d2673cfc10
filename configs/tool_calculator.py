"""Tool use: multi-digit multiplication with an in-graph calculator (multi-turn GRPO).

  python launch/train.py --config=configs/tool_calculator.py:stage=sft --workdir=/tmp/calc_sft
  python launch/train.py --config=configs/tool_calculator.py:sft=/tmp/calc_sft \
      --workdir=/tmp/calc_rl
  python launch/train.py --config=configs/tool_calculator.py:stage=direct --workdir=/tmp/calc_direct

Problems: "345*67=" with 2-3 digit operands (the built-in arithmetic task,
ops="*"), beyond what the built-in tiny model computes. A trajectory
(`jaxrl_llm.envs.calculator`):

  345*67=  |  345*67>  |  23115:  |  23115</s>
  prompt      turn 1       tool       turn 2 (the answer, scored by "correct")

stage=sft    SFT of the tiny model on tool transcripts (the text above after the
             prompt, written as JSONL to `data=` on first use; the loss covers
             the tool's tokens too, a warm-start that teaches the format).
stage=rl     (default) multi-turn GRPO from the SFT checkpoint (`sft=`, its workdir): the
             calculator runs between turns inside the one-jit RL step; only
             the model's tokens are trained; reward: the final turn equals the
             answer. The run's own held-out evaluation is single-turn (no tool).
stage=direct SFT on direct answers ("345*67=" -> "23115"): the no-tool baseline.

Measured (CPU, seeds 0/1/2, 500 held-out problems, mean ± std,
scripts/measure_tool_calculator.py; docs/multiturn.md): greedy accuracy 0.003 ±
0.002 without the tool, 0.999 ± 0.001 with it after the SFT stage and 1.000 ±
0.000 after RL; sampled (T=1) 0.978 ± 0.003 -> 0.981 ± 0.001 with RL.
About 32 minutes for the three stages on 2 free cores (an hour when three
seeds share them).
"""

import json
import os

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task

TASK_OPTIONS = (("max_digits", 3), ("min_digits", 2), ("ops", "*"))


def write_transcripts(directory: str, num_train: int, num_test: int, seed: int = 0) -> str:
  """<directory>/{train,test}.jsonl of tool transcripts; returns the '{split}' pattern."""
  from jaxrl_llm.data import tasks
  from jaxrl_llm.envs.calculator import tool_transcript
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", num_train), ("test", num_test)):
    path = os.path.join(directory, f"{split}.jsonl")
    if os.path.exists(path):
      continue
    examples = tasks.generate("arithmetic", split, n, seed, **dict(TASK_OPTIONS))
    with open(path + ".tmp", "w") as f:
      for ex in examples:
        answer = "".join(text for _, text in tool_transcript(ex["prompt"], ex["answer"]))
        f.write(json.dumps({"prompt": ex["prompt"], "answer": answer}) + "\n")
    os.replace(path + ".tmp", path)
  return os.path.join(directory, "{split}.jsonl")


def get_config(arg=None):
  args = parse_arg(arg, stage="rl", sft="", data="/tmp/calc_data", sft_steps=300,
                   sft_batch=32, rl_steps=60)
  stage = args["stage"]
  if stage not in ("sft", "rl", "direct"):
    raise ValueError(f"stage={stage!r}; choose sft, rl or direct")
  c = default_configdict(kind="rl" if stage == "rl" else "sft", rl_preset="grpo")
  use_builtin_task(c, "arithmetic", max_digits=3, batch_size=32, num_train=20000, num_test=500)
  c.data.task_options = TASK_OPTIONS
  c.data.max_answer_len = 8
  c.eval.num_examples = 500
  c.eval.max_new_tokens = 8
  c.eval.batch_size = 250
  if stage in ("sft", "direct"):
    if stage == "sft":
      c.data.source = "jsonl"
      c.data.task_options = ()
      c.data.path = write_transcripts(args["data"], 20000, 500)
      c.data.max_answer_len = 24
      c.eval.num_examples = 0       # a transcript is not an answer: measured by the script
    c.data.batch_size = args["sft_batch"]
    c.optim.learning_rate = 3e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = min(100, args["sft_steps"] // 4)
    c.optim.total_steps = args["sft_steps"]
    c.optim.end_lr_ratio = 0.1
    c.eval.every_steps = 0
    c.checkpoint.save_interval_steps = args["sft_steps"]
    c.trainer.num_steps = args["sft_steps"]
    c.trainer.log_every = 50
    return c
  c.trainer.init_from = args["sft"]  # "": from the random init (a smoke run only)
  c.rl.multiturn.enabled = True
  c.rl.multiturn.max_turns = 2
  c.rl.multiturn.env = "calculator"
  c.rl.max_new_tokens = 9            # per turn: "345*678>" or "233910" + EOS
  c.rl.group_size = 8
  c.rl.kl_coef = 0.0
  c.reward.components = (("correct", 1.0),)
  c.optim.learning_rate = 3e-5
  c.optim.warmup_steps = 10
  c.optim.grad_clip_norm = 1.0
  c.eval.every_steps = 0
  c.checkpoint.save_interval_steps = args["rl_steps"]
  c.trainer.num_steps = args["rl_steps"]
  c.trainer.log_every = 10
  return c
