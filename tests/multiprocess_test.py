"""Scale-out: 2 processes x 4 CPU devices == 1 process x 8 devices, and the launchers.

The multi-process run uses the real code path of a multi-host job:
`jax.distributed.initialize` on localhost (through launch/local_multiprocess.py
and the JAX_* variables), gloo collectives between the processes, each
process feeding only its own rows of the batch. tests/multiprocess_worker.py
does the work in both modes (see its docstring); the 1-process reference runs
in a subprocess too, with the same XLA flags, so both sides compile alike.
"""
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrl_llm import sharding
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.train_state import state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.py")
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
# Cheaper CPU compiles (both modes get them, so the programs stay alike).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT = 420
HAS_DPO = importlib.util.find_spec("jaxrl_llm.preference.step") is not None


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  env.update(dict(dict(XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"), **extra))
  return env


def _popen(cmd, env):
  """A subprocess in its own process group (so that _kill also ends its children)."""
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT, start_new_session=True)


def _kill(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.communicate()


def _finish(proc, what, timeout=TIMEOUT):
  """Wait for a subprocess; on failure or timeout show its output."""
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{what} timed out after {timeout}s; output:\n{out[-8000:]}")
  except BaseException:  # e.g. Ctrl-C: leave no processes behind
    _kill(proc)
    raise
  if proc.returncode != 0:
    pytest.fail(f"{what} exited with {proc.returncode}; output:\n{out[-8000:]}")
  return out


def _logs(log_dir):
  text = ""
  for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else ():
    with open(os.path.join(log_dir, name), errors="replace") as f:
      text += f"\n----- {name} -----\n" + f.read()[-6000:]
  return text


# ---------------------------------------------------------------------------
# 2 processes x 4 devices against 1 process x 8 devices.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mp")
  log_dir = str(tmp / "logs")
  multi = _popen(
      [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4",
       f"--script={WORKER}", f"--log_dir={log_dir}", f"--timeout={TIMEOUT - 20}", "--",
       f"--workdir={tmp / 'multi'}", f"--outdir={tmp / 'out_multi'}"], _env())
  single = _popen(
      [sys.executable, WORKER, f"--workdir={tmp / 'single'}", f"--outdir={tmp / 'out_single'}"],
      _env(XLA_FLAGS=FAST_XLA + " --xla_force_host_platform_device_count=8"))
  try:
    out = _finish(multi, "2-process run (launch/local_multiprocess.py)")
  except BaseException:
    _kill(single)
    print(_logs(log_dir))
    raise
  _finish(single, "1-process run")

  def load(name):
    with open(tmp / name, "rb") as f:
      return pickle.load(f)
  return dict(single=load("out_single/results_p0.pkl"), multi=load("out_multi/results_p0.pkl"),
              multi1=load("out_multi/results_p1.pkl"), workdir=tmp / "multi", output=out)


def _close(a, b, rtol, atol, what):
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


def _compare_params(single, multi, prefix):
  keys = [k for k in single if k.startswith(prefix + "[")]
  assert keys, prefix
  for k in keys:
    # Adam turns tiny reduction-order differences into small update differences.
    _close(multi[k], single[k], 1e-4, 1e-4, k)


def _compare_metrics(single, multi):
  assert set(single) == set(multi)
  for k in single:
    _close(multi[k], single[k], 1e-4, 1e-5, k)


def test_the_runs_are_what_they_claim(runs):
  s, m = runs["single"], runs["multi"]
  assert (s["process_count"], s["device_count"]) == (1, 8)
  assert (m["process_count"], m["device_count"]) == (2, 8)
  assert m["rl/mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  # Every process holds the same global values.
  assert sorted(m) == sorted(runs["multi1"])
  for k, v in m.items():
    if isinstance(v, np.ndarray):
      np.testing.assert_array_equal(v, runs["multi1"][k], err_msg=k)
    else:
      assert v == runs["multi1"][k], k


def test_data_sharding_covers_the_global_batch(runs):
  s, m = runs["single"], runs["multi"]
  one = s["data/local_prompt_ids"][0]          # [3 batches, 8]: the whole global batch
  two = m["data/local_prompt_ids"]             # [2 processes, 3 batches, 4]
  assert two.shape == (2, 3, 4)
  for b in range(3):
    rows = np.concatenate([two[0, b], two[1, b]])
    np.testing.assert_array_equal(rows, one[b])  # process p has rows [4p, 4p + 4)
    assert len(set(rows.tolist())) == 8          # no overlap, nothing lost
  assert len(set(one.ravel().tolist())) == 24    # 3 distinct batches
  for k in [k for k in s if k.startswith("data/global_batch")]:
    np.testing.assert_array_equal(m[k], s[k], err_msg=k)  # shard_batch's global array
  assert m["data/iterator_state"] == s["data/iterator_state"]
  assert "does not split" not in m["data/unsplit_mesh_error"]
  assert "must split the batch across all 2 processes" in m["data/unsplit_mesh_error"]


def test_rl_steps_equal_one_process(runs):
  s, m = runs["single"], runs["multi"]
  assert m["rl/step"] == s["rl/step"] == 2
  for ms, mm in zip(s["rl/metrics"], m["rl/metrics"]):
    _compare_metrics(ms, mm)
  _compare_params(s, m, "rl/params")
  assert s["rl/metrics"][1]["rl/approx_kl"] > 0  # the second step trained on changed params


@pytest.mark.skipif(not HAS_DPO, reason="jaxrl_llm.preference.step is not there yet")
def test_dpo_steps_equal_one_process(runs):
  s, m = runs["single"], runs["multi"]
  for ms, mm in zip(s["dpo/metrics"], m["dpo/metrics"]):
    _compare_metrics(ms, mm)
  _compare_params(s, m, "dpo/params")


def test_checkpoint_save_restore_across_processes(runs, tmp_path):
  s, m = runs["single"], runs["multi"]
  assert m["ckpt/same_shardings"]
  assert m["ckpt/extra"] == {"data": m["data/iterator_state"]}
  for k in [k for k in m if k.startswith("rl/params[")]:
    suffix = k[len("rl/params"):]
    np.testing.assert_array_equal(m["ckpt/restored" + suffix], m[k], err_msg=k)
    np.testing.assert_array_equal(m["ckpt/restored_data_mesh" + suffix], m[k], err_msg=k)
  assert m["ckpt/data_mesh_axes"] == {"data": 8, "fsdp": 1, "tensor": 1}
  # Training continues from the restored state exactly as in one process.
  _compare_metrics(s["rl/metrics_after_restore"], m["rl/metrics_after_restore"])
  _compare_params(s, m, "rl/params_after_restore")
  # This (single) process reads the checkpoint the two processes wrote.
  worker = _load(WORKER, "multiprocess_worker")
  ckpt = Checkpointer(str(runs["workdir"] / "run"), create=False)
  assert ckpt.all_steps() == [2]
  abstract = _abstract_state(worker)
  restored, extra = ckpt.restore(abstract)
  ckpt.close()
  assert extra == m["ckpt/extra"]
  for k, v in worker._flat(restored.params, "rl/params").items():
    np.testing.assert_array_equal(v, m[k], err_msg=k)


def _abstract_state(worker):
  """The worker's RL TrainState as restore targets on this process's 8 devices."""
  from jaxrl_llm import optim, testing, tokenizers
  from jaxrl_llm.models import decoder
  from jaxrl_llm.train_state import TrainState
  tok = tokenizers.load_tokenizer("builtin")
  cfg = testing.tiny_config("qwen3", vocab_size=tok.vocab_size, hidden_size=32,
                            intermediate_size=64)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0, eps=1e-6))
  params = decoder.param_shapes(cfg)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params), extra={})
  mesh = sharding.make_mesh(sharding.mesh_preset("fsdp"))
  return worker._abstract(abstract, state_shardings(abstract, cfg, mesh))


def test_only_process_zero_writes_metrics(runs):
  workdir = runs["workdir"]
  assert os.path.exists(workdir / "metrics_p0" / "metrics.jsonl")
  assert os.listdir(workdir / "metrics_p0" / "tensorboard")
  assert not os.path.exists(workdir / "metrics_p1")  # process 1 created nothing
  for sub in ("metrics_p0", "metrics_shared"):  # one line per step, not one per process
    lines = [json.loads(x) for x in open(workdir / sub / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[0]["reward/mean"] == pytest.approx(runs["multi"]["rl/metrics"][0]["reward/mean"])
  assert runs["output"].count("done") == 1  # only process 0's output reaches the terminal


# ---------------------------------------------------------------------------
# The launchers.
# ---------------------------------------------------------------------------
def test_train_py_runs_on_two_processes(tmp_path):
  """launch/train.py through local_multiprocess.py: jax.distributed from the env, 2 SFT steps."""
  workdir = tmp_path / "run"
  proc = _popen(
      [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4",
       f"--log_dir={tmp_path / 'logs'}", f"--timeout={TIMEOUT - 20}",
       "--config=" + os.path.join(ROOT, "configs", "sft_arithmetic.py") + ":steps=2",
       f"--workdir={workdir}", "--config.model.builtin=nano", "--config.data.num_train=64",
       "--config.data.num_test=16", "--config.eval.num_examples=0", "--config.data.seq_len=32",
       "--config.data.batch_size=8", "--config.optim.warmup_steps=0",
       "--config.trainer.log_every=1", "--config.checkpoint.save_interval_steps=1"], _env())
  try:
    out = _finish(proc, "launch/train.py on 2 processes")
  except BaseException:
    print(_logs(str(tmp_path / "logs")))
    raise
  assert "8 devices (cpu), 2 process(es)" in out
  lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2]  # written once, by process 0
  assert Checkpointer(str(workdir), create=False).latest_step() == 2
  # Process 0 built the dataset once (process 1 waited), where both read it.
  assert os.listdir(workdir / "tensorflow_datasets")


def test_local_multiprocess_stops_everyone_when_one_process_fails(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text(
      "import os, sys, time\n"
      "assert os.environ['JAX_COORDINATOR_ADDRESS'].startswith('localhost:')\n"
      "if os.environ['JAX_PROCESS_ID'] == '1':\n"
      "  print('process 1 gives up', flush=True)\n"
      "  sys.exit(3)\n"
      "time.sleep(120)\n")
  start = time.time()
  proc = subprocess.run(
      [sys.executable, LAUNCHER, "--num_processes=3", f"--script={script}",
       f"--log_dir={tmp_path / 'logs'}", "--some_forwarded_flag=1"],
      capture_output=True, text=True, timeout=60, env=_env())
  assert proc.returncode == 3, proc.stderr
  assert time.time() - start < 30  # processes 0 and 2 were stopped, not waited for
  assert "process 1 failed with exit code 3" in proc.stderr
  assert "process 1 gives up" in proc.stderr  # its log tail is shown


def test_local_multiprocess_forwards_sigterm(tmp_path):
  script = tmp_path / "term.py"
  script.write_text(
      "import signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True), sys.exit(0)))\n"
      "print('ready', flush=True)\n"
      "time.sleep(120)\n")
  proc = _popen([sys.executable, LAUNCHER, "--num_processes=2", f"--script={script}",
                 f"--log_dir={tmp_path / 'logs'}"], _env())
  try:
    log = tmp_path / "logs" / "process_1.log"
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and "ready" in log.read_text()):
      time.sleep(0.1)
    time.sleep(1.0)  # process 0 started alongside
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
  finally:
    _kill(proc)
  assert proc.returncode == 0, out  # both processes exited cleanly after "saving"
  assert "saved" in out
  assert "saved" in open(tmp_path / "logs" / "process_1.log").read()


def test_local_multiprocess_environment():
  lm = _load(LAUNCHER, "local_multiprocess")
  args, forwarded = lm.parse_args(["--num_processes=2", "--config=c.py", "--", "--workdir=w"])
  assert forwarded == ["--config=c.py", "--workdir=w"] and args.devices_per_process == 4
  env = lm.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}, 1,
                       args, 1234)
  assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  args, _ = lm.parse_args(["--platform=gpu", "--num_processes=4", "--devices_per_process=2"])
  env = lm.process_env({"JAX_PLATFORMS": "cpu"}, 3, args, 1)
  assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and "JAX_PLATFORMS" not in env
  with pytest.raises(SystemExit):
    lm.parse_args(["--num_processes=0"])


def test_distributed_init_args():
  f = sharding.distributed_init_args
  assert f({}) is None
  explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
  assert f(explicit) == dict(coordinator_address="h:1", num_processes=4, process_id=2,
                             cluster_detection_method="deactivate")
  assert f(explicit, "off") is None
  assert f(dict(explicit, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")) is None
  with pytest.raises(ValueError, match=r"\['JAX_COORDINATOR_ADDRESS'\] not set"):
    f({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=2 must be in"):
    f(dict(explicit, JAX_NUM_PROCESSES="2"))
  # Detected by JAX: a SLURM step of several tasks, a TPU pod, a lone coordinator, mode "on".
  assert f({"SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "n[1-2]"}) == {}
  assert f({"SLURM_NTASKS": "16"}) is None  # the batch script itself, outside srun
  assert f({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) is None
  assert f({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
  assert f({"TPU_WORKER_HOSTNAMES": "t0"}) is None
  assert f({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
  assert f({}, "on") == {}
  with pytest.raises(ValueError, match="choose one of"):
    f({}, "yes")


def test_mesh_presets():
  assert sharding.MESH_PRESETS == {"fsdp": (1, -1, 1), "fsdp_tensor": (1, -1, 2),
                                   "data": (-1, 1, 1)}
  shapes = {name: dict(sharding.make_mesh(sharding.mesh_preset(name)).shape)
            for name in sharding.MESH_PRESETS}
  assert shapes == {"fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
                    "fsdp_tensor": {"data": 1, "fsdp": 4, "tensor": 2},
                    "data": {"data": 8, "fsdp": 1, "tensor": 1}}
  assert sharding.mesh_preset("data").rules == sharding.MeshConfig().rules
  with pytest.raises(ValueError, match=r"unknown mesh preset 'zero3'; choose one of \('fsdp'"):
    sharding.mesh_preset("zero3")


# ---------------------------------------------------------------------------
# Cluster scripts (no cluster needed: dry runs and fake SLURM commands).
# ---------------------------------------------------------------------------
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def _bash(*args, env=None):
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=30,
                        env=dict(os.environ, **(env or {})), cwd=ROOT)


def test_tpu_pod_script():
  r = _bash(TPU_POD)
  assert r.returncode == 2 and "usage: launch/tpu_pod.sh" in r.stderr
  r = _bash(TPU_POD, "--tpu=t", "--zone=z", "--workdir=/tmp/run", "--config=configs/quickstart.py")
  assert r.returncode == 2 and "must be a gs:// path" in r.stderr
  r = _bash(TPU_POD, "--tpu=t", "--zone=z", "--workdir=gs://b/r", "--config=configs/nope.py")
  assert r.returncode == 2 and "not found" in r.stderr
  r = _bash(TPU_POD, "--zone=z", "--bogus")
  assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
  r = _bash(TPU_POD, "--tpu=my-pod", "--zone=us-east5-a", "--workdir=gs://b/run",
            "--config=configs/quickstart.py:rl_steps=5", "--config.rl.group_size=4", "--dry_run",
            "--", "--verbosity=0")
  assert r.returncode == 0, r.stderr
  cmds = r.stdout.strip().splitlines()
  assert cmds[0].startswith("tar ") and "gcloud compute tpus tpu-vm scp" in cmds[1]
  setup, train = cmds[2], cmds[3]
  for cmd in (setup, train):
    assert "tpu-vm ssh my-pod --zone=us-east5-a --worker=all --command=" in cmd
  assert "pip\\ install\\ --quiet\\ -e\\ \\'.\\[tpu\\]\\'" in setup
  for part in ("launch/train.py", "--config=configs/quickstart.py:rl_steps=5",
               "--workdir=gs://b/run", "--distributed=on", "--config.rl.group_size=4",
               "--verbosity=0"):
    assert part in train
  r = _bash(TPU_POD, "--tpu=p", "--zone=z", "--repo=https://example.com/x.git", "--ref=v1",
            "--setup_only", "--dry_run")
  assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1
  assert "git\\ clone" in r.stdout and "FETCH_HEAD" in r.stdout


def test_slurm_script_with_fake_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text(
      '#!/bin/bash\n[[ "$1 $2 $3" == "show hostnames gpu[017-018]" ]] || exit 1\n'
      'echo gpu017; echo gpu018\n')
  (bin_dir / "srun").write_text(  # runs the task command once per task, like srun
      '#!/bin/bash\nn=1; tpn=1\nwhile [[ "$1" == --* ]]; do\n'
      '  case "$1" in --ntasks=*) n=${1#*=};; --ntasks-per-node=*) tpn=${1#*=};; esac; shift\n'
      'done\nfor ((i = 0; i < n; i++)); do\n'
      '  SLURM_PROCID=$i SLURM_LOCALID=$((i % tpn)) "$@" || exit $?\ndone\n')
  (bin_dir / "python").write_text(
      '#!/bin/bash\necho "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID '
      '${JAX_LOCAL_DEVICE_IDS-all} $*"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  base = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
              SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu[017-018]", SLURM_SUBMIT_DIR=ROOT)
  flags = ("--config=configs/quickstart.py", "--workdir=/shared/run")
  # One process per GPU: 2 nodes x 4 GPUs.
  r = _bash(SLURM, *flags, env=dict(base, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4",
                                    SLURM_GPUS_ON_NODE="4"))
  assert r.returncode == 0, r.stderr
  tasks = [line.split() for line in r.stdout.splitlines() if line.startswith("gpu017:")]
  port = 61440 + 1234 % 4096
  assert [t[:4] for t in tasks] == [[f"gpu017:{port}", "8", str(i), str(i % 4)]
                                    for i in range(8)]
  assert tasks[0][4:] == ["launch/train.py", *flags]
  # One process per node: every GPU of the node is the process's.
  r = _bash(SLURM, *flags, env=dict(base, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                                    JAX_COORDINATOR_PORT="9999"))
  tasks = [line.split() for line in r.stdout.splitlines() if line.startswith("gpu017:")]
  assert [t[:4] for t in tasks] == [["gpu017:9999", "2", "0", "all"],
                                    ["gpu017:9999", "2", "1", "all"]], r.stderr
  # SLURM bound one GPU per task: it is the task's device 0.
  r = _bash(SLURM, *flags, env=dict(base, SLURM_NTASKS_PER_NODE="2", CUDA_VISIBLE_DEVICES="1"))
  assert [line.split()[3] for line in r.stdout.splitlines() if line.startswith("gpu")] == \
      ["0"] * 4, r.stderr
  # Validation.
  r = _bash(SLURM, *flags, env=dict(base, SLURM_NTASKS_PER_NODE="4", SLURM_GPUS_PER_NODE="h100:8"))
  assert r.returncode == 2 and "--ntasks-per-node (4) = GPUs per node (8)" in r.stderr
  r = _bash(SLURM, "--workdir=/x", env=base)
  assert r.returncode == 2 and "--config=FILE is required" in r.stderr
  r = _bash(SLURM, *flags, env={k: v for k, v in base.items() if k != "SLURM_JOB_ID"})
  assert r.returncode == 2 and "not inside a SLURM job" in r.stderr
