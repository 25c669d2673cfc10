"""Same config and seed on any mesh: a whole run does not depend on the device or process count.

The quickstart recipe (an SFT warm-start, then GRPO with the one-jit RL step,
held-out evaluation at the start and end of each stage), shrunk to the nano
model, runs through launch/train.py three times, each in its own subprocess
with its own XLA_FLAGS (this test process has 8 devices, from conftest):

  1 process x 1 CPU device    the reference
  1 process x 8 CPU devices   the config's FSDP mesh over all of them
  2 processes x 4 devices     launch/local_multiprocess.py: jax.distributed,
                              each process feeding its own rows

All three read the same data in the same order and make the same random draws,
so their metrics.jsonl agree step by step from step 0:

  exactly        the tokens each SFT step trains on, the tokens and rewards
                 each RL step samples, every held-out evaluation metric
  within RTOL    losses, entropies, gradient norms: these differ only by float
                 reduction order (1 ulp, ~1.2e-7 relative, at the first SFT step;
                 at most ~5e-7 over these 14 steps)

Reduction-order noise does grow in a long run at a high learning rate (see the
README's quickstart section, "The device count acts like a seed"), which is why
the comparison covers the first steps only.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
# Cheaper CPU compiles; every run gets the same ones.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 400
SFT_STEPS, RL_STEPS = 10, 4
RTOL, ATOL = 1e-5, 1e-6  # ATOL: GRPO's policy loss is a sum of zero-mean terms, ~1e-8
# The data and the random draws: equal to the last bit on any mesh.
EXACT_SFT = ("train/tokens",)
EXACT_RL = ("rl/completion_tokens", "reward/mean", "reward/correct", "reward/format",
            "rl/accuracy")
ARGS = (
    f"--config={ROOT}/configs/quickstart.py:sft_steps={SFT_STEPS},rl_steps={RL_STEPS}",
    "--config.model.builtin=nano", "--config.data.num_train=512", "--config.data.num_test=64",
    "--config.data.batch_size=8", "--config.trainer.sft_warmstart.batch_size=8",
    # A learning rate that makes the nano model emit answers + EOS within 10 steps, and the
    # format reward, so that GRPO's groups have reward variance and the RL updates are not 0.
    "--config.trainer.sft_warmstart.learning_rate=0.02", "--config.optim.learning_rate=0.003",
    "--config.reward.components=(('correct', 1.0), ('format', 0.5))",
    "--config.eval.num_examples=16", "--config.eval.batch_size=16",
    "--config.trainer.log_every=1", "--config.trainer.progress=False",
)


def _env(device_count=None):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  flags = FAST_XLA + (f" --xla_force_host_platform_device_count={device_count}"
                      if device_count else "")
  env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return env


def _popen(cmd, env):
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT, start_new_session=True)


def _kill(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.communicate()


def _finish(proc, what):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{what} timed out after {TIMEOUT}s; output:\n{out[-8000:]}")
  if proc.returncode != 0:
    pytest.fail(f"{what} exited with {proc.returncode}; output:\n{out[-8000:]}")
  return out


def _metrics(path):
  """{step: {metric: value}} of a metrics.jsonl (train and eval lines of a step merged)."""
  steps = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      step = record.pop("step")
      steps.setdefault(step, {}).update(
          {k: v for k, v in record.items() if not k.startswith("time/")})
  return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Output and metrics of the three runs, started together (they share the CPUs)."""
  tmp = tmp_path_factory.mktemp("mesh")
  procs = {
      "1x1": _popen([sys.executable, TRAIN, *ARGS, f"--workdir={tmp / 'd1'}"], _env(1)),
      "1x8": _popen([sys.executable, TRAIN, *ARGS, f"--workdir={tmp / 'd8'}"], _env(8)),
      "2x4": _popen([sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4",
                     f"--log_dir={tmp / 'logs'}", f"--timeout={TIMEOUT - 20}", "--", *ARGS,
                     f"--workdir={tmp / 'p2'}"], _env()),
  }
  out = {}
  try:
    for name, proc in procs.items():
      out[name] = _finish(proc, f"the {name} run")
  finally:
    for proc in procs.values():
      _kill(proc)
  dirs = {"1x1": "d1", "1x8": "d8", "2x4": "p2"}
  return {name: dict(output=out[name],
                     sft=_metrics(tmp / d / "sft_warmstart" / "metrics.jsonl"),
                     rl=_metrics(tmp / d / "metrics.jsonl")) for name, d in dirs.items()}


def _assert_same_run(ref, other, stage, exact, what):
  """`other`'s metrics of `stage` equal `ref`'s: `exact` keys and eval/* bit for bit, the rest
  within RTOL/ATOL, at every step."""
  a, b = ref[stage], other[stage]
  assert sorted(a) == sorted(b), f"{what}: logged steps differ"
  for step in sorted(a):
    keys = sorted(a[step])
    assert keys, f"{what} {stage} step {step}: no metric logged"
    assert sorted(b[step]) == keys, (
        f"{what} {stage} step {step}: metrics logged differ: only in {what.split()[0]}: "
        f"{sorted(set(b[step]) - set(keys))}, missing there: {sorted(set(keys) - set(b[step]))}")
    for key in keys:
      where = f"{what}: {stage} step {step} {key}: {b[step][key]!r} vs {a[step][key]!r}"
      if key in exact or key.startswith("eval/"):
        assert b[step][key] == a[step][key], where
      else:
        np.testing.assert_allclose(b[step][key], a[step][key], rtol=RTOL, atol=ATOL,
                                   err_msg=where)


def test_the_runs_are_what_they_claim(runs):
  assert "jaxrl_llm rl: 1 devices (cpu), 1 process(es)" in runs["1x1"]["output"]
  assert "jaxrl_llm rl: 8 devices (cpu), 1 process(es)" in runs["1x8"]["output"]
  assert "jaxrl_llm rl: 8 devices (cpu), 2 process(es)" in runs["2x4"]["output"]
  for run in runs.values():
    assert sorted(run["sft"]) == list(range(SFT_STEPS + 1))
    assert sorted(run["rl"]) == list(range(RL_STEPS + 1))
    # The comparison means something: every GRPO update is applied and non-zero, and the
    # SFT stage's tokens per step vary (a different batch would show).
    for s in range(1, RL_STEPS + 1):
      assert run["rl"][s]["grad/global_norm"] > 0 and run["rl"][s]["train/skipped_updates"] == 0
    assert len({run["sft"][s]["train/tokens"] for s in range(1, SFT_STEPS + 1)}) > 1
  # Evaluation ran in both stages of every run, sampled only where it is supported.
  for name, run in runs.items():
    for stage, last in (("sft", SFT_STEPS), ("rl", RL_STEPS)):
      for step in (0, last):
        assert "eval/accuracy" in run[stage][step], (name, stage, step)
  for name, run in runs.items():
    assert "eval/sample_accuracy" in run["rl"][RL_STEPS], name


@pytest.mark.parametrize("other", ["1x8", "2x4"])
def test_sft_steps_equal_one_device(runs, other):
  _assert_same_run(runs["1x1"], runs[other], "sft", EXACT_SFT, f"{other} vs 1x1")


@pytest.mark.parametrize("other", ["1x8", "2x4"])
def test_grpo_steps_equal_one_device(runs, other):
  _assert_same_run(runs["1x1"], runs[other], "rl", EXACT_RL, f"{other} vs 1x1")
