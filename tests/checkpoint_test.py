"""Tests for jaxrl_llm.checkpoint: orbax round trips, policies, preemption."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm import checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(value=0.0):
  return {
      "params": {"w": jnp.arange(32.0).reshape(8, 4) + value,
                 "norm": jnp.ones((3,))},
      "step": jnp.asarray(7, jnp.int32),
  }


def _abstract(state, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state)


def _replicated():
  return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P())


def _sync_cfg(**kwargs):
  kwargs.setdefault("save_interval_steps", 1)
  return checkpoint.CheckpointConfig(async_save=False, **kwargs)


def test_sharded_round_trip_onto_a_different_mesh(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh8 = Mesh(devices, ("data",))
  w = jax.device_put(jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6),
                     NamedSharding(mesh8, P("data", None)))
  assert len(w.addressable_shards) == 8
  state = {"params": {"w": w, "b": jnp.full((5,), 2.0, jnp.bfloat16)},
           "opt": {"count": jnp.asarray(3, jnp.int32)}}
  extra = {"data_position": 123, "rng": [0, 42], "config": {"lr": 1e-6}}

  with checkpoint.Checkpointer(tmp_path, checkpoint.CheckpointConfig(
      save_interval_steps=10)) as ckpt:
    assert ckpt.save(10, state, extra=extra)
    ckpt.wait()
    assert ckpt.latest_step() == 10

  mesh24 = Mesh(devices.reshape(2, 4), ("fsdp", "tensor"))
  w_sharding = NamedSharding(mesh24, P("tensor", "fsdp"))
  rep = NamedSharding(mesh24, P())
  abstract = {
      "params": {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32,
                                           sharding=w_sharding),
                 "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16, sharding=rep)},
      "opt": {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)},
  }
  with checkpoint.Checkpointer(tmp_path, create=False) as ckpt:
    restored, restored_extra = ckpt.restore(abstract)
  got_w = restored["params"]["w"]
  assert got_w.sharding == w_sharding
  assert got_w.addressable_shards[0].data.shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(got_w), np.asarray(w))
  assert restored["params"]["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(restored["params"]["b"]),
                                np.full((5,), 2.0, np.float32))
  assert int(restored["opt"]["count"]) == 3
  assert restored_extra == extra


def test_restore_accepts_arrays_as_targets(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(1, _state(5.0), extra={"k": "v"})
    state, extra = ckpt.restore(_state(0.0))
  np.testing.assert_array_equal(state["params"]["w"],
                                np.arange(32.0).reshape(8, 4) + 5.0)
  assert extra == {"k": "v"}


def test_restore_target_without_sharding_is_rejected(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(1, _state(), extra={})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _state())
    with pytest.raises(ValueError, match=r"\['params'\]\['norm'\].*sharding"):
      ckpt.restore(target)


def test_nothing_saved_restores_none(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "fresh") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
    assert ckpt.restore(_abstract(_state(), _replicated())) is None
  assert (tmp_path / "fresh" / "checkpoints").is_dir()


def test_missing_directory_and_missing_step_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.Checkpointer(tmp_path / "nope", create=False)
  with pytest.raises(ValueError, match="workdir"):
    checkpoint.Checkpointer("")
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(0, _state(), extra={})
    with pytest.raises(FileNotFoundError, match=r"step 3 .*\[0\]"):
      ckpt.restore(_abstract(_state(), _replicated()), step=3)


def test_extra_must_be_json(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(0, _state(), extra={"rng": np.zeros(2)})
    assert ckpt.latest_step() is None


def test_interval_skipping_and_force(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg(save_interval_steps=3,
                                                   max_to_keep=None)) as ckpt:
    saved = [ckpt.save(s, _state(s), extra={"s": s}) for s in range(8)]
    assert saved == [True, False, False, True, False, False, True, False]
    assert ckpt.all_steps() == [0, 3, 6]
    # A forced save ignores the interval but never overwrites a step.
    assert ckpt.save(7, _state(7), extra={"s": 7}, force=True)
    assert not ckpt.save(7, _state(8), extra={"s": 8}, force=True)
    assert ckpt.latest_step() == 7
    state, extra = ckpt.restore(_abstract(_state(), _replicated()))
  assert extra == {"s": 7}
  np.testing.assert_array_equal(state["params"]["w"], _state(7)["params"]["w"])


def test_keeps_latest_n(tmp_path):
  cfg = checkpoint.CheckpointConfig(save_interval_steps=1, max_to_keep=2)
  with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
    for s in range(5):
      ckpt.save(s, _state(s), extra={"s": s})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    _, extra = ckpt.restore(_abstract(_state(), _replicated()), step=3)
    assert extra == {"s": 3}
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert names == ["3", "4"]


def test_unfinalized_tmp_directory_is_ignored_and_cleaned(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(2, _state(2), extra={"s": 2})
  # What an interrupted orbax save leaves behind: the step's temporary
  # directory, never renamed to its final name.
  tmp = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp"
  (tmp / "state.orbax-checkpoint-tmp").mkdir(parents=True)
  (tmp / "_CHECKPOINT_METADATA").write_text("{}")
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    _, extra = ckpt.restore(_abstract(_state(), _replicated()))
    assert extra == {"s": 2}
    ckpt.wait()
  assert not tmp.exists()


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from jaxrl_llm import checkpoint

    cfg = checkpoint.CheckpointConfig(save_interval_steps=1, async_save=True)
    ckpt = checkpoint.Checkpointer(sys.argv[1], cfg)
    ckpt.save(1, {"w": jnp.ones((8, 4))}, extra={"s": 1})
    ckpt.wait()
    # Large enough that the background write is still running when the
    # process is killed right after save() returns.
    ckpt.save(2, {"w": jnp.ones((8, 1024, 1024))}, extra={"s": 2})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_save_killed_midway_is_never_reported(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  env["XLA_FLAGS"] = ""
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
                        env=env, capture_output=True, timeout=120,
                        check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  ckpt_dir = tmp_path / "checkpoints"
  assert not (ckpt_dir / "2").exists()
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    assert ckpt.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                        sharding=_replicated())}
    state, extra = ckpt.restore(target)
    np.testing.assert_array_equal(state["w"], np.ones((8, 4)))
    assert extra == {"s": 1}
    # The leftover temporary directory is gone and step 2 can be saved anew.
    assert not any(".orbax-checkpoint-tmp" in p.name
                   for p in ckpt_dir.iterdir())
    assert ckpt.save(2, {"w": jnp.zeros((8, 4))}, extra={"s": 2})
    assert ckpt.latest_step() == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"save_interval_steps": 0}, "save_interval_steps"),
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"async_save": "yes"}, "async_save"),
])
def test_invalid_config(kwargs, field):
  with pytest.raises(ValueError, match=f"CheckpointConfig.{field}="):
    checkpoint.CheckpointConfig(**kwargs)


def test_preemption_guard_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.stop_requested
    assert guard.should_stop(1)
    assert guard.should_stop(2)  # Latched.
  assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_sigint_twice_interrupts():
  with checkpoint.PreemptionGuard(catch_sigint=True) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.should_stop(0)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_preemption_guard_request_stop_without_signals():
  guard = checkpoint.PreemptionGuard()
  assert not guard.should_stop(0)
  guard.request_stop()
  assert guard.should_stop(1)


def test_preemption_guard_multihost_agreement(monkeypatch):
  """Process 0 was not signalled, another one was: all must stop together."""
  gathered = []

  def fake_allgather(flag):
    gathered.append(int(flag))
    return np.array([int(flag), 1])  # The other process saw SIGTERM.

  monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
  monkeypatch.setattr(checkpoint.multihost_utils, "process_allgather",
                      fake_allgather)
  guard = checkpoint.PreemptionGuard(sync_every_steps=4)
  assert not guard.should_stop(1)  # Not a sync step: no collective.
  assert not guard.should_stop(3)
  assert gathered == []
  assert guard.should_stop(4)
  assert gathered == [0]
  assert not guard.stop_requested


def test_preemption_guard_invalid_sync():
  with pytest.raises(ValueError, match="sync_every_steps"):
    checkpoint.PreemptionGuard(sync_every_steps=0)


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The biggest file of a step's array data (orbax OCDBT chunks under state/)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()
           and "/d/" in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def _big_state(value=0.0):
  return {"params": {"w": jnp.arange(4096, dtype=jnp.float32) * 1e-3 + value},
          "step": jnp.asarray(3, jnp.int32)}


def test_flipped_byte_or_edited_extra_is_refused_not_restored(tmp_path):
  # Orbax restores a data file with a flipped byte silently into other numbers; the
  # checksum manifest catches it and names the step, the leaf and the earlier steps.
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(1, _big_state(1.0), extra={"data": 1})
    ckpt.save(2, _big_state(2.0), extra={"data": 2})
  target = _abstract(_big_state(), _replicated())
  data_file = _largest_array_file(tmp_path / "checkpoints" / "2")
  raw = bytearray(data_file.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  data_file.write_bytes(bytes(raw))
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"checkpoints/2 is corrupt: .*params/w.*steps \[1\].*resume "
                             r"from step 1"):
      ckpt.restore(target)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="params/w"):
      ckpt.restore_params(target["params"], step=2)
    # The earlier step still restores, verified.
    state, extra = ckpt.restore(target, step=1)
    assert extra == {"data": 1}
    np.testing.assert_array_equal(state["params"]["w"], _big_state(1.0)["params"]["w"])
  # Valid JSON with another value (a data position) is caught too.
  extra_file = tmp_path / "checkpoints" / "1" / "extra" / "metadata"
  extra_file.write_text(extra_file.read_text().replace("1", "7"))
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"extra/"):
      ckpt.restore(target, step=1)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"extra/ JSON differs"):
      ckpt.restore_extra(step=1)


def test_truncated_array_file_names_the_file_and_the_fix(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(1, _big_state(1.0))
  data_file = _largest_array_file(tmp_path / "checkpoints" / "1")
  data_file.write_bytes(data_file.read_bytes()[:100])
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"(?s)Cannot read the state of checkpoint .*checkpoints/1: .*"
                             r"damaged or incomplete.*No earlier checkpoint"):
      ckpt.restore(_abstract(_big_state(), _replicated()))


def test_non_finite_state_is_never_saved_nor_rotates_out_the_last_finite_one(tmp_path):
  cfg = _sync_cfg(max_to_keep=1)
  with checkpoint.Checkpointer(tmp_path, cfg) as ckpt:
    assert ckpt.save(1, _state(1.0))
    diverged = _state(2.0)
    diverged["params"]["norm"] = diverged["params"]["norm"].at[1].set(jnp.inf)
    for step in (2, 3):  # periodic and forced saves alike
      with pytest.raises(checkpoint.NonFiniteStateError,
                         match=r"Not saving step \d: .*params/norm.*stays step 1"):
        ckpt.save(step, diverged, force=step == 3)
    assert ckpt.all_steps() == [1]
    state, _ = ckpt.restore(_abstract(_state(), _replicated()))
  np.testing.assert_array_equal(state["params"]["w"], _state(1.0)["params"]["w"])


def test_restoring_into_another_model_shape_names_the_leaves(tmp_path):
  with checkpoint.Checkpointer(tmp_path, _sync_cfg()) as ckpt:
    ckpt.save(1, _state())
    other = {"params": {"w": jnp.zeros((8, 6)), "norm": jnp.ones((3,)),
                        "extra_head": jnp.ones((2,))},
             "step": jnp.asarray(0, jnp.int32)}
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"another model or kind of run: 1 leaves of another shape "
                             r"\(params/w saved \(8, 4\), expected \(8, 6\)\); 1 leaves not "
                             r"in the checkpoint \(params/extra_head\).*trainer.init_from"):
      ckpt.restore(_abstract(other, _replicated()))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="params/w saved"):
      ckpt.restore_params(_abstract(other["params"], _replicated()))
