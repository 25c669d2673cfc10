"""Configs, the trainer loop, resume exactness, preemption and the real launcher."""
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import trainer
from jaxrl_llm.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_file_loads_and_validates(path):
  cfg = config_lib.from_configdict(load_config_file(path))
  assert cfg.kind in config_lib.KINDS
  doc = open(path).read()
  assert "launch/train.py --config=configs/" in doc  # the docstring gives the command


def test_unknown_key_and_bad_value_name_the_field():
  c = config_lib.default_configdict()
  c.rl.unlock() if hasattr(c.rl, "unlock") else None
  d = c.to_dict()
  d["rl"]["group_sise"] = 4
  with pytest.raises(ValueError, match=r"config.rl: unknown field\(s\) \['group_sise'\]"):
    config_lib.from_dict(config_lib.ExperimentConfig, d)
  d = c.to_dict()
  d["rl"]["advantage"] = "gpro"
  with pytest.raises(ValueError, match="advantage.*choose one of"):
    config_lib.from_dict(config_lib.ExperimentConfig, d)
  d = c.to_dict()
  d["model"]["builtin"] = "huge"
  with pytest.raises(ValueError, match="model.builtin"):
    config_lib.from_dict(config_lib.ExperimentConfig, d)


def test_rl_preset_then_overrides():
  c = config_lib.default_configdict(rl_preset="dapo")
  c.rl.eps_high = 0.3
  cfg = config_lib.from_configdict(c)
  assert cfg.rl.dynamic_sampling and cfg.rl.eps_high == 0.3 and cfg.rl.kl_coef == 0.0


def tiny_sft(num_steps, **trainer_kw):
  c = config_lib.default_configdict(kind="sft")
  c.model.builtin = "nano"
  c.data.num_train, c.data.num_test = 300, 16
  c.data.batch_size, c.data.seq_len = 8, 32
  c.data.max_prompt_len, c.data.max_answer_len = 12, 6
  c.eval.num_examples, c.eval.max_new_tokens = 8, 4
  c.optim.learning_rate = 1e-2
  c.checkpoint.save_interval_steps = 2
  c.checkpoint.async_save = False
  c.trainer.num_steps = num_steps
  c.trainer.log_every = 1
  c.trainer.progress = False
  for k, v in trainer_kw.items():
    setattr(c.trainer, k, v)
  return config_lib.from_configdict(c)


def _params(workdir, cfg):
  tok = __import__("jaxrl_llm.tokenizers", fromlist=["x"]).load_tokenizer("builtin")
  model_cfg = trainer.model_config(cfg, tok)
  mesh = __import__("jaxrl_llm.sharding", fromlist=["x"]).make_mesh(cfg.mesh)
  from jaxrl_llm.train_state import param_shardings
  abstract = trainer._abstract_params(model_cfg, param_shardings(model_cfg, mesh))
  return jax.device_get(Checkpointer(workdir, create=False).restore_params(abstract))


def test_sft_run_writes_logs_checkpoints_and_resumes_exactly(tmp_path, capsys):
  straight = str(tmp_path / "straight")
  final = trainer.run(tiny_sft(4), straight)
  assert "eval/accuracy" in final
  lines = [json.loads(x) for x in open(os.path.join(straight, "metrics.jsonl"))]
  assert {1, 2, 3, 4} <= {x["step"] for x in lines}
  assert any("loss/nll" in x for x in lines)
  assert glob.glob(os.path.join(straight, "tensorboard", "*tfevents*"))
  # Interrupted after 2 steps, then resumed to 4: identical parameters.
  resumed = str(tmp_path / "resumed")
  trainer.run(tiny_sft(2), resumed)
  trainer.run(tiny_sft(4), resumed)
  assert "Resuming from step 2" in capsys.readouterr().out
  a, b = _params(straight, tiny_sft(4)), _params(resumed, tiny_sft(4))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def _launch(workdir, *extra, **popen_kw):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
         "--config=" + os.path.join(ROOT, "configs", "quickstart.py") + ":sft_steps=2,rl_steps=3",
         f"--workdir={workdir}", "--config.model.builtin=nano", "--config.data.num_train=200",
         "--config.data.num_test=16", "--config.eval.num_examples=8",
         "--config.eval.every_steps=0", "--config.data.batch_size=4", "--config.rl.group_size=4",
         "--config.trainer.sft_warmstart.batch_size=8", *extra]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, **popen_kw)


def test_launcher_runs_quickstart_then_resumes(tmp_path):
  workdir = str(tmp_path / "qs")
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "Stage 1: SFT" in out and "Stage 2: RL" in out
  assert "held-out metric" in out  # the before/after table
  rl_lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("reward/mean" in x for x in rl_lines)
  proc = _launch(workdir, "--config.trainer.num_steps=4")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "Resuming from step 3" in out


def test_sigterm_saves_and_rerun_resumes(tmp_path):
  workdir = str(tmp_path / "pre")
  proc = _launch(workdir, "--config.trainer.num_steps=100000",
                 "--config.checkpoint.save_interval_steps=100000")
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    time.sleep(0.5)
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "Preempted: saved step" in out
  saved = Checkpointer(workdir, create=False).latest_step()
  assert saved and saved > 0
  proc = _launch(workdir, f"--config.trainer.num_steps={saved + 1}")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and f"Resuming from step {saved}" in out, out
