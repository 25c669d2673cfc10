"""Tests for jaxrl_llm.metrics: writers, progress, async fetch, NaN guards."""

import builtins
import io
import json
import math
import pathlib
import struct
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm import config as config_lib
from jaxrl_llm import metrics as metrics_lib


def _read_tensorboard_scalars(logdir: pathlib.Path) -> dict:
  """{tag: [(step, value), ...]} from TFRecord event files."""
  try:
    from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
      events += list(event_file_loader.EventFileLoader(str(path)).Load())
  except ImportError:
    # Without tensorboard, parse the TFRecord framing directly: u64 length,
    # masked crc32c(length), payload, masked crc32c(payload).
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
      data = path.read_bytes()
      pos = 0
      while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert header_crc == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack(
            "<I", data[pos + 12 + length:pos + 16 + length])
        assert payload_crc == masked_crc32c(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
  scalars = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField("simple_value"):
        scalars.setdefault(value.tag, []).append(
            (event.step, value.simple_value))
      else:  # tensorboard's loader turns scalars into tensors.
        scalars.setdefault(value.tag, []).append(
            (event.step, float(value.tensor.float_val[0])))
  return scalars


def test_writer_jsonl_and_tensorboard(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, is_primary=True) as writer:
    writer.write(1, {"loss/policy": 0.5, "rl/reward_mean": jnp.float32(0.25)})
    writer.write(2, {"loss/policy": np.float64(0.125), "grad/global_norm": 3})
    writer.write(3, {"loss/policy": float("nan")})
    writer.flush()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert rows[0] == {"step": 1, "loss/policy": 0.5, "rl/reward_mean": 0.25}
  assert rows[1] == {"step": 2, "loss/policy": 0.125, "grad/global_norm": 3.0}
  assert rows[2]["step"] == 3 and math.isnan(rows[2]["loss/policy"])

  scalars = _read_tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars["loss/policy"][:2] == [(1, 0.5), (2, 0.125)]
  assert scalars["rl/reward_mean"] == [(1, 0.25)]
  assert scalars["grad/global_norm"] == [(2, 3.0)]


def test_writer_appends_across_restarts(tmp_path):
  no_tb = metrics_lib.MetricsConfig(tensorboard=False)
  with metrics_lib.MetricWriter(tmp_path, no_tb, is_primary=True) as writer:
    writer.write(1, {"a": 1.0})
  with metrics_lib.MetricWriter(tmp_path, no_tb, is_primary=True) as writer:
    writer.write(2, {"a": 2.0})
  steps = [json.loads(line)["step"]
           for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
  assert not (tmp_path / "tensorboard").exists()
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [1, 2]


def test_read_metrics_leaves_out_a_cut_last_line_and_refuses_bad_lines(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": NaN}\n{"step": 2, "a"')
  rows = metrics_lib.read_metrics(tmp_path)  # a crash cut the last write short
  assert len(rows) == 1 and rows[0]["step"] == 1 and math.isnan(rows[0]["a"])
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON object"):
    metrics_lib.read_metrics(tmp_path)
  assert metrics_lib.read_metrics(tmp_path / "empty") == []


def test_local_writer_flushes_every_n_seconds(tmp_path):
  now = [0.0]
  cfg = metrics_lib.MetricsConfig(tensorboard=False, flush_every_seconds=10.0)
  writer = metrics_lib.MetricWriter(tmp_path, cfg, is_primary=True, clock=lambda: now[0])
  writer.write(1, {"a": 1.0})
  assert (tmp_path / "metrics.jsonl").read_text() == ""  # still buffered
  now[0] = 10.0
  writer.write(2, {"a": 2.0})
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  writer.close()


def test_non_primary_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics_lib.MetricWriter(workdir, is_primary=False) as writer:
    writer.write(1, {"loss/policy": 1.0})
    writer.flush()
  assert not workdir.exists()


def test_writer_rejects_bad_metrics(tmp_path):
  with metrics_lib.MetricWriter(tmp_path, metrics_lib.MetricsConfig(tensorboard=False),
                                is_primary=True) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 1.0})
    with pytest.raises(ValueError, match=r"'loss/vec'.*scalars"):
      writer.write(1, {"loss/vec": np.zeros(3)})


@pytest.mark.parametrize("field, value, match", [
    ("wandb_mode", "cloud", r"metrics.wandb_mode='cloud'; choose one of"),
    ("remote_part_mb", 0.0, r"metrics.remote_part_mb=0.0 must be > 0"),
    ("flush_every_seconds", -1.0, r"metrics.flush_every_seconds=-1.0 must be > 0"),
    ("wandb_project", None, r"metrics.wandb_project=None must be a string"),
    ("jsonl", "yes", r"metrics.jsonl='yes' must be True or False"),
])
def test_metrics_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    metrics_lib.MetricsConfig(**{field: value})


def test_metrics_config_comes_from_the_experiment_config():
  c = config_lib.default_configdict(kind="sft")
  assert c.metrics.wandb_project == "" and c.metrics.wandb_mode == "online"
  c.metrics.wandb_project = "post-training"
  c.metrics.wandb_mode = "offline"
  cfg = config_lib.from_configdict(c)
  assert cfg.metrics == metrics_lib.MetricsConfig(wandb_project="post-training",
                                                  wandb_mode="offline")
  c.metrics.wandb_mode = "sometimes"
  with pytest.raises(ValueError, match=r"config.metrics: metrics.wandb_mode='sometimes'"):
    config_lib.from_configdict(c)


class _FakeWandb(types.ModuleType):
  """Records what MetricWriter asks of wandb."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []

  def init(self, **kwargs):
    self.calls.append(("init", kwargs))
    calls = self.calls

    class Run:
      def define_metric(self, name, step_metric=None):
        calls.append(("define_metric", name, step_metric))

      def log(self, data):
        calls.append(("log", dict(data)))

      def finish(self):
        calls.append(("finish",))

    return Run()


def test_wandb_logs_on_process_0_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = metrics_lib.MetricsConfig(tensorboard=False, wandb_project="proj", wandb_entity="team",
                                  wandb_run_name="grpo-1", wandb_mode="offline")
  with metrics_lib.MetricWriter(tmp_path, cfg, run_config={"kind": "rl"},
                                is_primary=False) as writer:
    writer.write(1, {"loss/policy": 1.0})
  assert fake.calls == []  # only process 0 talks to W&B
  with metrics_lib.MetricWriter(tmp_path, cfg, run_config={"kind": "rl"},
                                is_primary=True) as writer:
    writer.write(1, {"loss/policy": 0.5, "rl/reward_mean": jnp.float32(0.25)})
  (_, init), *rest = fake.calls
  run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
  assert init == dict(project="proj", entity="team", name="grpo-1", mode="offline", id=run_id,
                      resume="allow", dir=str(tmp_path), config={"kind": "rl"})
  assert rest == [("define_metric", "step", None), ("define_metric", "*", "step"),
                  ("log", {"step": 1, "loss/policy": 0.5, "rl/reward_mean": 0.25}),
                  ("finish",)]
  fake.calls.clear()
  # Resumed: the same W&B run; a re-run step is logged again, not refused.
  with metrics_lib.MetricWriter(tmp_path, cfg, is_primary=True) as writer:
    writer.write(1, {"loss/policy": 0.75})
  assert fake.calls[0][1]["id"] == run_id and fake.calls[0][1]["entity"] == "team"
  assert ("log", {"step": 1, "loss/policy": 0.75}) in fake.calls


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
  pytest.importorskip("wandb", reason="wandb is not installed: pip install -e '.[test]'")
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = metrics_lib.MetricsConfig(jsonl=False, tensorboard=False, wandb_project="proj",
                                  wandb_mode="offline")
  with metrics_lib.MetricWriter(tmp_path, cfg, run_config={"seed": 0},
                                is_primary=True) as writer:
    writer.write(1, {"loss/nll": 2.0})
    writer.write(2, {"loss/nll": float("nan")})
  run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_wandb_missing_gives_clear_error(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("No module named 'wandb'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_wandb)
  cfg = metrics_lib.MetricsConfig(jsonl=False, tensorboard=False, wandb_project="proj")
  with pytest.raises(ImportError, match=r"wandb_project='proj' needs.*pip install wandb"):
    metrics_lib.MetricWriter(tmp_path, cfg, is_primary=True)


def test_async_metrics_returns_previous_step():
  pending = metrics_lib.AsyncMetrics()
  assert pending.flush() is None
  assert pending.push(0, {"loss": jnp.float32(1.0)}) is None
  step, host = pending.push(1, {"loss": jnp.float32(2.0)})
  assert step == 0 and host == {"loss": 1.0}
  assert isinstance(host["loss"], float)
  step, host = pending.push(2, {"loss": jnp.float32(3.0)})
  assert step == 1 and host == {"loss": 2.0}
  assert pending.flush() == (2, {"loss": 3.0})
  assert pending.flush() is None


def test_async_metrics_with_sharded_replicated_values():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  rep = NamedSharding(mesh, P())
  x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P(("data", "fsdp"))))
  out = jax.jit(lambda v: {"m/sum": v.sum()}, out_shardings=rep)(x)
  pending = metrics_lib.AsyncMetrics()
  pending.push(5, out)
  assert pending.flush() == (5, {"m/sum": 28.0})


def test_nonfinite_guard_stop():
  guard = metrics_lib.NonFiniteGuard("stop")
  assert guard.check({"loss/policy": 1.0, "grad/global_norm": 2.0}, step=3)
  with pytest.raises(metrics_lib.NonFiniteError,
                     match=r"step 7.*grad/global_norm=inf.*loss/policy=nan"):
    guard.check({"loss/policy": float("nan"), "grad/global_norm": math.inf,
                 "ok": 0.0}, step=7)


def test_nonfinite_guard_skip_counts_and_limits():
  guard = metrics_lib.NonFiniteGuard("skip", max_consecutive=2)
  assert not guard.check({"loss": float("nan")}, step=1)
  assert not guard.check({"loss": float("-inf")}, step=2)
  assert guard.check({"loss": 0.5}, step=3)
  assert guard.consecutive == 0
  assert not guard.check({"loss": float("nan")}, step=4)
  assert not guard.check({"loss": float("nan")}, step=5)
  assert guard.num_nonfinite == 4
  with pytest.raises(metrics_lib.NonFiniteError, match="3 steps in a row"):
    guard.check({"loss": float("nan")}, step=6)


def test_nonfinite_guard_invalid_policy():
  with pytest.raises(ValueError, match=r"policy='ignore'.*\('skip', 'stop'\)"):
    metrics_lib.NonFiniteGuard("ignore")


@pytest.mark.parametrize("jit", [False, True])
def test_apply_if_finite(jit):
  old = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.int32(4),
         "rng": jax.random.key(0)}
  new = {"params": {"w": jnp.full((2, 3), 2.0)}, "step": jnp.int32(5),
         "rng": jax.random.key(1)}
  fn = jax.jit(metrics_lib.apply_if_finite) if jit else (
      metrics_lib.apply_if_finite)

  good = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,), jnp.bfloat16)}
  state, ok = fn(new, old, good)
  assert bool(ok)
  chex.assert_trees_all_equal(state["params"], new["params"])
  assert int(state["step"]) == 5

  bad = {"w": jnp.ones((2, 3)).at[1, 2].set(jnp.inf),
         "b": jnp.zeros((3,), jnp.bfloat16)}
  state, ok = fn(new, old, bad)
  assert not bool(ok)
  chex.assert_trees_all_equal(state["params"], old["params"])
  assert int(state["step"]) == 4
  np.testing.assert_array_equal(jax.random.key_data(state["rng"]),
                                jax.random.key_data(old["rng"]))

  _, ok = fn(new, old, jnp.float32(jnp.nan))
  assert not bool(ok)


class _FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_log_lines_when_not_a_tty():
  clock, lines = _FakeClock(), []
  progress = metrics_lib.Progress(100, stream=io.StringIO(), clock=clock,
                                  log_every_seconds=10.0, log_fn=lines.append,
                                  is_primary=True)
  assert not progress.is_tty
  progress.update(1, tokens=1000)  # Baseline (includes compilation).
  clock.now += 5.0
  progress.update(11, tokens=5000)
  assert not lines  # Less than log_every_seconds since the last report.
  clock.now += 5.0
  progress.update(21, tokens=5000, metrics={"loss/total": 0.25})
  # 20 steps and 10000 tokens in 10 s.
  assert progress.steps_per_sec == pytest.approx(2.0)
  assert progress.tokens_per_sec == pytest.approx(1000.0)
  assert lines == [
      "step 21/100 | 2.00 steps/s | 1.0k tokens/s | ETA 0:39 | "
      "loss/total=0.25"]
  clock.now += 1.0
  progress.update(100, tokens=0)  # The last step is always reported.
  assert len(lines) == 2 and lines[1].startswith("step 100/100")
  progress.close()


class _TTY(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_on_a_tty():
  clock, stream = _FakeClock(), _TTY()
  progress = metrics_lib.Progress(10, stream=stream, clock=clock,
                                  is_primary=True)
  progress.update(0, tokens=10)
  clock.now += 1.0
  progress.update(5, tokens=100)
  out = stream.getvalue()
  assert out.startswith("\r") and "\n" not in out
  assert "[###############---------------]" in out
  assert "5.00 steps/s" in out and "100.0 tokens/s" in out
  progress.close()
  assert stream.getvalue().endswith("\n")


def test_progress_non_primary_is_silent():
  clock, lines = _FakeClock(), []
  progress = metrics_lib.Progress(2, clock=clock, log_fn=lines.append,
                                  stream=io.StringIO(), is_primary=False)
  progress.update(1)
  clock.now += 100
  progress.update(2)
  assert not lines


def test_discard_after_removes_the_rows_a_resumed_run_logs_again(tmp_path):
  # The interrupted process logged steps 1..5 (the last line cut short by the kill) and
  # its newest checkpoint is step 3: the resumed run re-runs and re-logs steps 4 and 5.
  with metrics_lib.MetricWriter(tmp_path, is_primary=True) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss/nll": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "loss/n')
  (tmp_path / "metrics-00000.jsonl").write_text('{"step": 2, "a": 1}\n{"step": 5, "a": 1}\n')
  with metrics_lib.MetricWriter(tmp_path, is_primary=True) as writer:
    assert writer.discard_after(3) == 4  # steps 4, 5, the cut line, and the part's step 5
    for step in (4, 5):
      writer.write(step, {"loss/nll": 10.0 * step})
    with pytest.raises(RuntimeError, match="before the first write"):
      writer.discard_after(3)
  rows = metrics_lib.read_metrics(tmp_path)
  assert [(r["step"], r.get("loss/nll")) for r in rows] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (2, None)]
  # The new event file starts with TensorBoard's restart marker (after the version record):
  # a SessionLog START at step 4, on which TensorBoard drops the older events of steps >= 4.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  newest = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))[-1]
  events = _file_events(newest)
  assert events[1].step == 4
  assert events[1].session_log.status == event_pb2.SessionLog.START
  assert [e.step for e in events[2:]] == [4, 5]


def _file_events(path: pathlib.Path) -> list:
  """The events of one TFRecord event file (u64 length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, pos, events = path.read_bytes(), 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
    pos += 16 + length
  return events
