"""Every recipe in configs/ runs end to end (two steps) on tiny models and real-format data.

The HF recipes run on a random tiny HF checkpoint with a chat tokenizer
(`tests/fixtures/tiny_chat_tokenizer`: tokenizer.json + a Qwen-style chat
template) and GSM8K / MATH / preference JSONL fixtures; the built-in recipes on
the nano model. Only sizes and paths are overridden (`_smoke`): every other
field, the algorithm included, is the recipe's own.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import testing, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Config arguments that select another code path of the same recipe.
VARIANTS = {"dpo_jsonl.py": ["", "loss=kto"], "grpo_gsm8k.py": ["", "preset=grpo"],
            "distill_arithmetic.py": ["", "arm=on_policy", "arm=grpo"]}
FILE_DATA = {"jsonl": "gsm8k/{split}.jsonl", "preference_jsonl": "pairs/{split}.jsonl",
             "unpaired_jsonl": "unpaired/{split}.jsonl"}
RECIPE_DATA = {"grpo_math.py": "math/{split}.jsonl"}  # else FILE_DATA by source
SMOKE_PROMPT_LEN = 192


def load_config_file(path, arg=None):
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def hf_instruct(tmp_path_factory):
  """A random tiny Qwen2 checkpoint with the fixture chat tokenizer next to its weights."""
  return testing.tiny_instruct_checkpoint(tmp_path_factory.mktemp("hf") / "tiny_instruct",
                                          os.path.join(FIXTURES, "tiny_chat_tokenizer"))


def _smoke(c, hf_dir, recipe=""):
  """Two steps at tiny sizes; everything else stays as the recipe sets it."""
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  if c.trainer.sft_warmstart.num_steps:
    c.trainer.sft_warmstart.num_steps = 2
    c.trainer.sft_warmstart.batch_size = 8
  if c.distill.teacher_sft_steps:  # distillation recipes: a 2-step teacher of the tiny size
    c.distill.teacher_sft_steps = 2
    c.distill.teacher_sft_batch_size = 8
    if c.distill.teacher_source == "builtin":
      c.distill.teacher_builtin = "tiny"
  c.checkpoint.save_interval_steps = 1
  c.checkpoint.async_save = False
  c.eval.num_examples = min(c.eval.num_examples, 4)
  c.eval.batch_size = 8
  c.eval.every_steps = 1
  c.eval.max_new_tokens = min(c.eval.max_new_tokens, 8)
  c.eval.num_samples = min(c.eval.num_samples, 2)
  c.eval.repeats = 1
  c.data.batch_size = 8
  if c.model.source == "builtin":
    c.model.builtin = "nano"
  else:
    c.model.path = c.data.tokenizer = hf_dir
    c.model.dtype = "float32"
  if c.data.source in ("arithmetic", "countdown", "preference_arithmetic"):
    c.data.num_train, c.data.num_test = 64, 8
  elif c.data.source in FILE_DATA:
    c.data.path = os.path.join(FIXTURES, RECIPE_DATA.get(recipe, FILE_DATA[c.data.source]))
    # The fixtures' longest prompt is 175 tokens with the chat template and their longest
    # completion 23: padding to the recipes' own budgets (up to 512 + 512) only slows the
    # two steps, by minutes on two cores.
    c.data.max_prompt_len = SMOKE_PROMPT_LEN
    c.data.max_completion_len = min(c.data.max_completion_len, 32)
    if c.kind == "sft":
      c.data.seq_len = 256  # one fixture example (134-234 tokens) per packed row: 8 rows
  c.rl.max_new_tokens = min(c.rl.max_new_tokens, 8)
  c.rl.overlong_cache_len = min(c.rl.overlong_cache_len, 4)
  c.online.max_new_tokens = min(c.online.max_new_tokens, 4)
  return c


def _cases():
  for path in CONFIGS:
    for arg in VARIANTS.get(os.path.basename(path), [""]):
      yield pytest.param(path, arg or None, id=os.path.basename(path)[:-3] + (
          f"[{arg}]" if arg else ""))


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory, hf_instruct):
  """A reward model run (configs/reward_model_arithmetic.py, smoke sizes) for recipes using one."""
  workdir = os.fspath(tmp_path_factory.mktemp("rm") / "run")
  c = _smoke(load_config_file(os.path.join(ROOT, "configs", "reward_model_arithmetic.py")),
             hf_instruct)
  trainer.run(config_lib.from_configdict(c), workdir)
  return workdir


def _use_reward_model(c, rm_dir):
  """Point a recipe's reward-model paths (and paths inside that run) at `rm_dir`."""
  old = c.reward.reward_model_path
  c.reward.reward_model_path = rm_dir
  for section, field in (("trainer", "init_from"), ("online", "reference_from")):
    value = getattr(c[section], field, "")
    if value and value.startswith(old):
      setattr(c[section], field, rm_dir + value[len(old):])


@pytest.mark.parametrize("path,arg", list(_cases()))
def test_recipe_runs_two_steps(path, arg, hf_instruct, tmp_path, request):
  c = _smoke(load_config_file(path, arg), hf_instruct, os.path.basename(path))
  if c.reward.reward_model_path:
    _use_reward_model(c, request.getfixturevalue("rm_workdir"))
  cfg = config_lib.from_configdict(c)
  workdir = os.fspath(tmp_path / "run")
  final = trainer.run(cfg, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(r["step"] for r in rows) == 2
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  if cfg.eval.num_examples and cfg.kind != "reward_model":
    assert "eval/accuracy" in final or "eval/sample_accuracy" in final


def test_every_recipe_is_exercised():
  """A new recipe must be runnable by _smoke (it is parametrized above from the directory)."""
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"quickstart.py", "grpo_gsm8k.py", "dpo_jsonl.py", "distill_arithmetic.py"} <= names


def test_grpo_gsm8k_reward_and_launch_eval_agree(hf_instruct, tmp_path):
  """Train two steps, then launch/eval.py: its per-problem verdicts are the RL reward's."""
  import numpy as np

  from jaxrl_llm.rewards import host, registry
  from jaxrl_llm.tokenizers import load_tokenizer

  c = _smoke(load_config_file(os.path.join(ROOT, "configs", "grpo_gsm8k.py")), hf_instruct)
  workdir = os.fspath(tmp_path / "run")
  trainer.run(config_lib.from_configdict(c), workdir)
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "launch", "eval.py"),
         f"--config={os.path.join(ROOT, 'configs', 'grpo_gsm8k.py')}", f"--workdir={workdir}",
         f"--config.model.path={hf_instruct}", f"--config.data.tokenizer={hf_instruct}",
         f"--config.data.path={os.path.join(FIXTURES, FILE_DATA['jsonl'])}",
         f"--config.data.max_prompt_len={SMOKE_PROMPT_LEN}", "--config.model.dtype=float32",
         "--config.eval.num_examples=4", "--config.eval.max_new_tokens=8",
         "--config.eval.num_samples=2"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "eval/pass@2" in out.stdout and "Evaluating step 2" in out.stdout
  rows = [json.loads(line) for line in open(os.path.join(workdir, "eval",
                                                         "results_step00000002.jsonl"))]
  assert len(rows) == 4
  tok = load_tokenizer(hf_instruct)
  examples = [json.loads(line) for line in open(os.path.join(FIXTURES, "gsm8k", "test.jsonl"))]
  # The verdicts written by launch/eval.py are math_reward's on the same text ...
  texts, golds = [], []
  for row in rows:
    ex = {"prompt": row["prompt"], "answer": row["reference"]}
    for s in [row["greedy"]] + row["samples"][0]:
      assert s["correct"] == (host.math_reward(s["text"], ex) == 1.0)
      texts.append(s["text"])
      golds.append(ex)
  # ... and the in-graph RL reward gives the same verdicts on the same completions: the
  # decoded samples plus the gold rationales (reward 1) and a wrong answer (reward 0).
  for ex in examples[:4]:
    texts += [ex["answer"], "The answer is 123456789."]
    golds += [{"prompt": ex["question"], "answer": ex["answer"]}] * 2
  reward_fn = registry.build_reward_fn((("math", 1.0),), tok, examples=golds)
  ids = [tok.encode(t, add_eos=True) for t in texts]
  L = max(len(i) for i in ids)
  comp = np.full((len(ids), L), tok.pad_id, np.int32)
  mask = np.zeros((len(ids), L), np.int32)
  for r, row in enumerate(ids):
    comp[r, :len(row)], mask[r, :len(row)] = row, 1
  from jaxrl_llm.rewards.base import RewardInputs
  inputs = RewardInputs(prompt_tokens_BP=np.ones((len(ids), 1), np.int32),
                        prompt_mask_BP=np.ones((len(ids), 1), np.int32),
                        completion_BL=comp, completion_mask_BL=mask,
                        finished_B=np.ones((len(ids),), bool),
                        task={"prompt_id": np.arange(len(ids), dtype=np.int32)})
  total, _ = reward_fn(inputs)
  verdicts = [host.math_reward(t, g) for t, g in zip(texts, golds)]
  np.testing.assert_array_equal(np.asarray(total), np.asarray(verdicts, np.float32))
  assert verdicts[-8::2] == [1.0] * 4 and verdicts[-7::2] == [0.0] * 4
