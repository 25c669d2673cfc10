"""Fault injection at the trainer level: nothing lost, nothing silent.

Each test injects one fault (a diverging update, a kill -9, a flipped byte, a
checkpoint of another kind of run, a bad flag or file, ...) into a tiny run
of the built-in "nano" model and asserts the outcome: refused with a message
naming the file or field and the fix, or recovered with nothing lost.
"""
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import trainer
from jaxrl_llm.checkpoint import Checkpointer, CorruptCheckpointError, NonFiniteStateError
from jaxrl_llm.metrics import NonFiniteError, read_metrics
from jaxrl_llm.sft import sft_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, num_steps, overrides=(), kind="sft"):
  """A few-second run of the nano model on the arithmetic task; `overrides`: {dotted: value}."""
  c = config_lib.default_configdict(kind=kind)
  c.model.builtin = "nano"
  c.data.num_train, c.data.num_test = 96, 8
  c.data.batch_size, c.data.seq_len = 8, 32
  c.data.max_prompt_len, c.data.max_answer_len = 12, 6
  c.data.data_dir = data_dir  # one TFDS build shared by every run of the module
  c.eval.num_examples = 0
  c.optim.learning_rate = 1e-2
  c.checkpoint.save_interval_steps = 2
  c.checkpoint.async_save = False
  c.trainer.num_steps = num_steps
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.rl.group_size, c.rl.max_new_tokens = 2, 4
  for name, value in dict(overrides).items():
    *sections, field = name.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[field] = value
  return config_lib.from_configdict(c)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from reliability_test import tiny_config
from jaxrl_llm import metrics, trainer
write = metrics.MetricWriter.write
def write_or_die(self, step, values):
  if step == 6:  # inside the save of step 6, after checkpoint 4 and the rows of step 5
    os.kill(os.getpid(), signal.SIGKILL)
  write(self, step, values)
metrics.MetricWriter.write = write_or_die
trainer.run(tiny_config(sys.argv[2], 8, {"metrics.flush_every_seconds": 1e-6}), sys.argv[3])
"""


@pytest.fixture(scope="module")
def sft_run(data_dir, tmp_path_factory):
  """An 8-step SFT run killed (-9) in step 6, then resumed to the end in this process.

  Returns what the workdir held after the kill, the resumed run's output, the
  metric steps in the workdir at the moment each of its checkpoints was saved,
  and the workdir (checkpoints 4, 6 and 8).
  """
  workdir = str(tmp_path_factory.mktemp("sft") / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(ROOT / "tests"), data_dir,
                         workdir], env=env, capture_output=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stdout.decode()[-3000:]
  killed = {"checkpoints": Checkpointer(workdir, create=False).all_steps(),
            "metric_steps": [r["step"] for r in read_metrics(workdir)]}
  seen = {}

  class Recording(Checkpointer):
    def save(self, step, state, **kwargs):
      seen[step] = sorted({row["step"] for row in read_metrics(workdir)})
      return super().save(step, state, **kwargs)

  out = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    mp.setattr(trainer, "Checkpointer", Recording)
    trainer.run(tiny_config(data_dir, 8), workdir)
  return {"killed": killed, "out": out.getvalue(), "seen": seen, "workdir": workdir}


def _copy(workdir, tmp_path):
  return shutil.copytree(workdir, tmp_path / "copy")


# 3. Metrics flushed no later than each checkpoint; a resume logs every step once.
def test_kill_9_then_resume_logs_every_step_exactly_once(sft_run):
  assert sft_run["killed"] == {"checkpoints": [2, 4], "metric_steps": [1, 2, 3, 4, 5]}
  assert "Resuming from step 4" in sft_run["out"]
  assert "removed 1 rows of steps after 4" in sft_run["out"]
  assert [r["step"] for r in read_metrics(sft_run["workdir"])] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_metrics_reach_the_workdir_before_each_checkpoint(sft_run):
  # The step of a checkpoint was still "pending" (fetched one step late) when it was saved,
  # and went missing if the process died before the next flush.
  assert sft_run["seen"] == {6: [1, 2, 3, 4, 5, 6], 8: [1, 2, 3, 4, 5, 6, 7, 8]}


_KILLED_IN_FINAL_EVAL = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from reliability_test import tiny_config
from jaxrl_llm import trainer
make = trainer.make_evaluator
def make_or_die(*args, **kwargs):
  evaluate = make(*args, **kwargs)
  def evaluate_or_die(params, step):
    if step == 4:  # the final evaluation, after the last checkpoint is complete
      os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(params, step)
  return evaluate_or_die
trainer.make_evaluator = make_or_die
trainer.run(tiny_config(sys.argv[2], 4, {"eval.num_examples": 8}), sys.argv[3])
"""


def test_kill_9_in_the_final_evaluation_is_recovered_on_rerun(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _KILLED_IN_FINAL_EVAL, str(ROOT / "tests"),
                         data_dir, workdir], env=env, capture_output=True, timeout=300,
                        check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stdout.decode()[-3000:]
  eval_steps = lambda: [r["step"] for r in read_metrics(workdir) if "eval/accuracy" in r]
  assert Checkpointer(workdir, create=False).all_steps()[-1] == 4
  assert eval_steps() == [0]  # the final row was lost with the process

  cfg = tiny_config(data_dir, 4, {"eval.num_examples": 8})
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    final = trainer.run(cfg, workdir)
  assert "final evaluation of step 4 is missing" in out.getvalue()
  assert eval_steps() == [0, 4] and final["eval/num_examples"] == 8
  row = [r for r in read_metrics(workdir) if r["step"] == 4 and "eval/accuracy" in r][0]
  assert row["eval/accuracy"] == final["eval/accuracy"]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    again = trainer.run(cfg, workdir)  # complete: the recorded result, nothing re-run
  assert "missing" not in out.getvalue() and again == final and eval_steps() == [0, 4]
  # Killed after the final row was flushed, before its marker was written: the logged
  # row is the result, and no second row is written.
  os.remove(os.path.join(workdir, "eval_final.json"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    third = trainer.run(cfg, workdir)
  assert "missing" not in out.getvalue() and eval_steps() == [0, 4]
  assert third == final and os.path.exists(os.path.join(workdir, "eval_final.json"))


# 1. A diverged state never saved over, nor rotated out, the last finite checkpoint.
def _diverging_sft_step(state, batch, rng, **kwargs):
  """The real step, whose update from step 3 on turns every parameter into NaN."""
  state, metrics = sft_step(state, batch, rng, **kwargs)
  diverged = state.step >= 3
  params = jax.tree.map(lambda p: jnp.where(diverged, jnp.nan, p), state.params)
  return state.replace(params=params), metrics


def test_divergence_keeps_the_last_finite_checkpoint_across_retries(data_dir, tmp_path,
                                                                    monkeypatch, capsys):
  monkeypatch.setattr(trainer, "sft_step", _diverging_sft_step)
  workdir = str(tmp_path / "nan")
  keep_one = {"checkpoint.max_to_keep": 1}
  with pytest.raises(NonFiniteStateError, match=r"(?s)Not saving step 4: .*params/.*stays step "
                                                r"2 .*lower optim.learning_rate"):
    trainer.run(tiny_config(data_dir, 8, keep_one), workdir)
  assert Checkpointer(workdir, create=False).all_steps() == [2]
  # A retry (here under the "stop" policy) resumes from step 2, diverges again, saves nothing.
  with pytest.raises(NonFiniteError, match="Non-finite metrics at step 4"):
    trainer.run(tiny_config(data_dir, 8, {**keep_one, "trainer.nan_policy": "stop"}), workdir)
  out = capsys.readouterr().out
  assert "Resuming from step 2" in out and "the last good state is step 2" in out
  assert Checkpointer(workdir, create=False).all_steps() == [2]
  rows = read_metrics(workdir)
  assert any(r["step"] == 4 and np.isnan(r["loss/nll"]) for r in rows)  # logged, not hidden


# 2. Non-finite or out-of-range hyper-parameters are refused when the config is built.
@pytest.mark.parametrize("name, value", [
    ("optim.learning_rate", float("inf")), ("optim.b2", float("nan")),
    ("rl.temperature", float("inf")), ("trainer.sft_warmstart.learning_rate", float("nan")),
    ("trainer.sft_warmstart.learning_rate", 0.0),
])
def test_non_finite_or_out_of_range_hyper_parameters_are_refused(data_dir, name, value):
  with pytest.raises(ValueError, match=rf"{name.split('.')[-1]}.*(finite|> 0)"):
    tiny_config(data_dir, 1, {name: value})


# 4. A checkpoint with flipped bytes is refused, naming the step and the way back.
def _flip_a_live_byte(state_dir: pathlib.Path) -> None:
  """Flips one bit of the largest data file where orbax reads it back as other values.

  OCDBT data files can hold bytes no key refers to (a flip there is harmless and
  restores the same state), and a flip inside a compressed block makes orbax
  itself fail to decompress it; candidate offsets are tried until a plain orbax
  restore, with no verification of ours, returns different numbers silently.
  """
  import orbax.checkpoint as ocp  # only here: the project reaches orbax via Checkpointer

  def raw(path):
    return [np.asarray(x) for x in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(str(path)))]

  files = [p for p in state_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()]
  data_file = max(files, key=lambda p: p.stat().st_size)
  original, clean = data_file.read_bytes(), raw(state_dir)
  for eighth in (4, 2, 6, 1, 3, 5, 7):
    corrupt = bytearray(original)
    corrupt[len(corrupt) * eighth // 8] ^= 0x10
    data_file.write_bytes(bytes(corrupt))
    try:
      restored = raw(state_dir)
    except Exception:  # orbax noticed this one (a ValueError, or its broad Exception
      continue         # around a failed read): try another offset
    if any(not np.array_equal(a, b) for a, b in zip(clean, restored)):
      return
  raise AssertionError(f"no flipped byte of {data_file} changed the restored state")


def test_corrupted_checkpoint_is_refused_with_the_earlier_step_named(sft_run, data_dir,
                                                                     tmp_path):
  workdir = _copy(sft_run["workdir"], tmp_path)
  _flip_a_live_byte(workdir / "checkpoints" / "8" / "state")
  with pytest.raises(CorruptCheckpointError,
                     match=r"checkpoints/8 is corrupt: .*steps \[4, 6\].*resume from step 6"):
    trainer.run(tiny_config(data_dir, 10), str(workdir))


# 5. A checkpoint of another kind of run is refused with the differences listed.
def test_rl_run_refuses_an_sft_checkpoint_in_its_workdir(sft_run, data_dir, tmp_path, capsys):
  workdir = str(_copy(sft_run["workdir"], tmp_path))
  with pytest.raises(ValueError, match=r"(?s)step 8 .* different run:\n  kind: saved 'sft', "
                                       r"now 'rl'.*trainer.init_from=.*allow_config_change"):
    trainer.run(tiny_config(data_dir, 10, kind="rl"), workdir)
  allowed = tiny_config(data_dir, 8, {"trainer.allow_config_change": True}, kind="rl")
  assert trainer.run(allowed, workdir) == {}
  out = capsys.readouterr().out
  assert "under a changed config" in out and "Run already complete (8/8 steps)" in out


# 6. Generation beyond the model's positions is refused, naming both numbers.
@pytest.mark.parametrize("kind, name", [("rl", "rl.max_new_tokens"),
                                        ("sft", "eval.max_new_tokens"),
                                        ("online_dpo", "online.max_new_tokens")])
def test_generation_longer_than_a_builtin_model_is_refused(data_dir, kind, name):
  overrides = {name: 200, "eval.num_examples": 4}
  with pytest.raises(ValueError, match=rf"data.max_prompt_len=12 \+ {name}=200 gives sequences "
                                       r"of 212 tokens, more than the "
                                       r"max_position_embeddings=128 of model.builtin='nano'"):
    tiny_config(data_dir, 1, overrides, kind=kind)


def test_generation_longer_than_an_hf_model_is_refused(data_dir, tmp_path):
  from jaxrl_llm.models.hf import config_to_hf
  from jaxrl_llm.testing import tiny_config as tiny_model
  path = tmp_path / "hf"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config_to_hf(tiny_model(
      max_position_embeddings=64))))
  cfg = tiny_config(data_dir, 1, {"model.source": "hf", "model.path": str(path),
                                  "rl.max_new_tokens": 60}, kind="rl")
  with pytest.raises(ValueError, match=r"rl.max_new_tokens=60 gives sequences of 72 tokens, "
                                       r"more than the max_position_embeddings=64 of "
                                       r"model.path="):
    trainer.run(cfg, str(tmp_path / "run"))


# Errors that name the problem and the fix.
def test_batch_not_divisible_by_the_mesh_is_refused(data_dir, tmp_path):
  cfg = tiny_config(data_dir, 1, {"data.batch_size": 6})  # 8 devices: fsdp=8
  with pytest.raises(ValueError, match=r"data.batch_size=6 does not split over the 8 batch "
                                       r"shards .*multiple of 8"):
    trainer.run(cfg, str(tmp_path / "run"))


def _launch(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"),
                         f"--config={ROOT / 'configs' / 'quickstart.py'}", "--workdir=/nonexistent",
                         *flags], env=env, capture_output=True, text=True, timeout=120,
                        check=False)


def test_launcher_names_a_mistyped_flag_and_sets_none_fields():
  proc = _launch("--config.rl.grup_size=4")
  assert proc.returncode == 1
  assert ("--config.rl.grup_size: the config has no field 'grup_size' (Did you mean "
          '"group_size"?)') in proc.stderr
  assert "Traceback" not in proc.stderr
  # eval.temperature defaults to None, yet takes a float; the bad learning rate is named.
  proc = _launch("--config.eval.temperature=0.7", "--config.optim.learning_rate=inf")
  assert proc.returncode == 1
  assert "Invalid config: config.optim.learning_rate=inf must be a finite number" in proc.stderr


def test_damaged_data_and_weight_files_are_named(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from jaxrl_llm.data import builders
  from jaxrl_llm.data.pipeline import DataConfig
  from jaxrl_llm.models.hf import load_hf, save_hf
  from jaxrl_llm.testing import tiny_config as tiny_model
  from jaxrl_llm.testing import tiny_params
  table = tmp_path / "pq" / "train.parquet"
  table.parent.mkdir()
  pq.write_table(pa.table({"prompt": ["1+1="] * 20, "answer": ["2"] * 20}), table)
  table.write_bytes(table.read_bytes()[:200])
  cfg = DataConfig(source="parquet", path=str(table.parent), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"train.parquet is not a readable Parquet file .*copy it"):
    builders.load_split(cfg, "train")
  empty = tmp_path / "empty" / "train.jsonl"
  empty.parent.mkdir()
  empty.write_text("")
  cfg = DataConfig(source="jsonl", path=str(empty.parent), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"train.jsonl holds no examples"):
    builders.load_split(cfg, "train")
  # Weights: dtype objects are accepted; truncated safetensors and broken JSON are named.
  model = tiny_model(dtype=jnp.bfloat16, param_dtype=np.float32)
  assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
  assert config_lib.ModelSpec(dtype=jnp.bfloat16).dtype == "bfloat16"
  path = save_hf(model, tiny_params(model), tmp_path / "hf", dtype=jnp.bfloat16)
  assert load_hf(path, dtype=jnp.bfloat16)[0].param_dtype == "bfloat16"
  weights = pathlib.Path(path) / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
    load_hf(path)
  config_file = pathlib.Path(path) / "config.json"
  config_file.write_text(config_file.read_text()[:-5])
  with pytest.raises(ValueError, match=r"config.json is not valid JSON .*copy the checkpoint"):
    load_hf(path)
