"""A gs:// workdir end to end, against a local GCS emulator.

The emulator (`gcp-storage-emulator`, in the `test` extra) serves the GCS JSON
API on 127.0.0.1. gcsfs (what etils.epath uses for gs://) finds it through
STORAGE_EMULATOR_HOST and tensorstore (what orbax writes arrays with) through
TENSORSTORE_GCS_HTTP_URL, so these tests run the same code as a real bucket:
fileio, MetricWriter (JSONL parts, TensorBoard event files), orbax checkpoints
(keep-N rotation, async saves, restore) and a short trainer run that resumes.

The TFDS data build of a remote workdir goes to a local per-process cache
(`builders.resolve_data_dir`; array_record writes only local files): the
trainer test checks that it lands there. Not covered here: several processes
writing one gs:// checkpoint (the emulator ignores generation preconditions);
real GCS credentials, consistency and latency.
"""
import dataclasses
import json
import logging
import os
import socket
import struct
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import fileio, trainer
from jaxrl_llm import metrics as metrics_lib
from jaxrl_llm.checkpoint import CheckpointConfig, Checkpointer

BUCKET = "jaxrl-test"


@pytest.fixture(scope="module")
def gcs_emulator():
  """The emulator for this module's tests, with gcsfs and tensorstore pointed at it."""
  server_lib = pytest.importorskip(
      "gcp_storage_emulator.server",
      reason="the GCS emulator is missing: pip install -e '.[test]' (gcp-storage-emulator)")
  with pytest.MonkeyPatch.context() as env:
    # The plain GCSFileSystem (set before gcsfs is imported): the experimental
    # one asks a gRPC control API the emulator lacks about every bucket.
    env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    pytest.importorskip("gcsfs", reason="gcsfs is missing: pip install -e '.[test]'")
    _add_generation_header(server_lib)
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    server = server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    _quiet_hang_ups(server)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    url = f"http://127.0.0.1:{port}"
    env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
    env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore (orbax's arrays)
    # tensorstore's credential chain otherwise looks for real Google credentials.
    env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    try:
      yield url
    finally:
      server.stop()


def _quiet_hang_ups(server) -> None:
  """No tracebacks for clients that hung up before the answer was written.

  gcsfs asks for an object and its "directory" at once and closes the
  connection of the one it no longer needs; that is not an error.
  """
  httpd = getattr(getattr(server, "_api", None), "_httpd", None)
  if httpd is None:
    return
  report = httpd.handle_error

  def handle_error(request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      report(request, client_address)

  httpd.handle_error = handle_error


def _add_generation_header(server_lib) -> None:
  """Object downloads get the x-goog-generation header that GCS sends.

  The emulator leaves it out; tensorstore then records generation 0 for what
  it read, and OCDBT's next conditional write of that object (a checkpoint's
  manifest) fails with "Malformed StorageGeneration".
  """
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download
  if getattr(download, "adds_generation", False):
    return

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
    except NotFound:
      pass  # download() answers 404
    return download(request, response, storage, *args, **kwargs)

  download_with_generation.adds_generation = True
  objects.download = download_with_generation  # what objects.get (alt=media) calls
  for _, handlers in server_lib.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is download:
        handlers[method] = download_with_generation


@pytest.fixture
def gs_workdir(request, gcs_emulator):
  """A fresh gs:// run directory in the emulator's bucket."""
  del gcs_emulator
  return f"gs://{BUCKET}/{request.node.name.replace('[', '_').rstrip(']')}-{uuid.uuid4().hex[:8]}"


def _tensorboard_scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} from every event file in `logdir` (any path kind)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  scalars, files = {}, fileio.glob(logdir, "events.out.tfevents.*")
  assert files, f"no event files in {logdir}"
  for path in files:
    data, pos = fileio.read_bytes(path), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
      payload = data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == (
          masked_crc32c(payload))
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
      pos += 16 + length
  return scalars


# ---------------------------------------------------------------------------
# fileio
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "gs"])
def test_fileio_round_trip(kind, tmp_path, request):
  root = str(tmp_path / "run") if kind == "local" else request.getfixturevalue("gs_workdir")
  fileio.makedirs(root)
  assert fileio.is_local(root) == (kind == "local")
  path = fileio.join(root, "sub", "a.json")
  assert path == f"{root}/sub/a.json" and not fileio.exists(path)
  fileio.makedirs(fileio.join(root, "sub"))
  fileio.write_text(path, '{"x": 1}')
  fileio.write_bytes(fileio.join(root, "sub", "b.bin"), b"\x00\x01")
  assert fileio.exists(path) and json.loads(fileio.read_text(path)) == {"x": 1}
  assert fileio.read_bytes(fileio.join(root, "sub", "b.bin")) == b"\x00\x01"
  assert fileio.glob(fileio.join(root, "sub"), "*.json") == [path]
  assert fileio.glob(fileio.join(root, "missing"), "*") == []
  fileio.write_text(path, "replaced")
  assert fileio.read_text(path) == "replaced"
  if kind == "local":
    with fileio.open(path, "a") as f:
      f.write("+more")
    assert fileio.read_text(path) == "replaced+more"
  else:
    with pytest.raises(ValueError, match="cannot append.*object stores have no append"):
      fileio.open(path, "a")


def test_fileio_names_unsupported_schemes_and_missing_packages(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match=r"scheme memory://.*gs://"):
    fileio.exists("memory://bucket/run")
  monkeypatch.setattr(fileio, "_has_module", lambda name: name not in ("gcsfs", "tensorflow"))
  with pytest.raises(ImportError, match=r"needs the 'gcsfs' package.*jaxrl_llm\[gcs\]"):
    fileio.makedirs("gs://bucket/run")
  fileio.makedirs(str(tmp_path / "local"))  # a local path needs no package
  assert os.path.isdir(tmp_path / "local")


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
def test_metric_writer_on_gcs_parts_tensorboard_and_resume(gs_workdir):
  # ~200 bytes per part: every few rows start a new part file.
  cfg = metrics_lib.MetricsConfig(remote_part_mb=200 / 2**20)
  with metrics_lib.MetricWriter(gs_workdir, cfg, is_primary=True) as writer:
    for step in range(1, 7):
      writer.write(step, {"loss/nll": 1.0 / step, "train/tokens": 100.0 * step})
      if step % 2 == 0:
        writer.flush()  # as the trainer does at each checkpoint
    writer.write(6, {"eval/accuracy": jnp.float32(0.5)})
  parts = fileio.glob(gs_workdir, "metrics-*.jsonl")
  assert len(parts) >= 2, parts  # rolled over past remote_part_mb
  assert not fileio.exists(fileio.join(gs_workdir, "metrics.jsonl"))
  rows = metrics_lib.read_metrics(gs_workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6]
  assert rows[2] == {"step": 3, "loss/nll": 1.0 / 3, "train/tokens": 300.0}
  assert rows[-1] == {"step": 6, "eval/accuracy": 0.5}

  # A resumed run: new parts after the old ones, old rows untouched.
  with metrics_lib.MetricWriter(gs_workdir, cfg, is_primary=True) as writer:
    writer.write(5, {"loss/nll": 0.25})
  rows = metrics_lib.read_metrics(gs_workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 6, 5]
  assert len(fileio.glob(gs_workdir, "metrics-*.jsonl")) == len(parts) + 1

  scalars = _tensorboard_scalars(fileio.join(gs_workdir, "tensorboard"))
  np.testing.assert_allclose([v for _, v in scalars["loss/nll"]],
                             [1.0, 0.5, 1 / 3, 0.25, 0.2, 1 / 6, 0.25], rtol=1e-6)
  assert [s for s, _ in scalars["loss/nll"]] == [1, 2, 3, 4, 5, 6, 5]
  assert scalars["eval/accuracy"] == [(6, 0.5)]


def test_metric_writer_on_gcs_flushes_on_its_own_every_n_seconds(gs_workdir):
  now = [0.0]
  cfg = metrics_lib.MetricsConfig(flush_every_seconds=30.0, tensorboard=False)
  writer = metrics_lib.MetricWriter(gs_workdir, cfg, is_primary=True, clock=lambda: now[0])
  writer.write(1, {"a": 1.0})
  assert metrics_lib.read_metrics(gs_workdir) == []  # buffered: nothing uploaded yet
  now[0] = 31.0
  writer.write(2, {"a": 2.0})
  assert [r["step"] for r in metrics_lib.read_metrics(gs_workdir)] == [1, 2]
  writer.close()


def test_non_primary_writes_nothing_on_gcs(gs_workdir):
  with metrics_lib.MetricWriter(gs_workdir, is_primary=False) as writer:
    writer.write(1, {"a": 1.0})
  assert fileio.glob(gs_workdir, "*") == []


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def test_checkpointer_on_gcs_rotates_restores_and_resumes(gs_workdir):
  state = {"params": {"w": jnp.arange(8.0)}, "b": jnp.ones((2, 3), jnp.bfloat16)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  cfg = CheckpointConfig(save_interval_steps=1, max_to_keep=2, async_save=False)
  with Checkpointer(gs_workdir, cfg) as ckpt:
    for step in range(1, 5):
      assert ckpt.save(step, jax.tree.map(lambda x: x * step, state), extra={"data": step})
    assert ckpt.all_steps() == [3, 4]
  # Rotation deleted the old steps from the bucket itself.
  names = sorted(os.path.basename(p) for p in fileio.glob(f"{gs_workdir}/checkpoints", "*"))
  assert [n for n in names if n.isdigit()] == ["3", "4"], names

  # A new process (new Checkpointer) finds and restores the latest step.
  with Checkpointer(gs_workdir, dataclasses.replace(cfg, async_save=True)) as ckpt:
    restored, extra = ckpt.restore(abstract)
    assert extra == {"data": 4}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(8.0) * 4)
    assert restored["b"].dtype == jnp.bfloat16
    assert ckpt.save(5, state, extra={"data": 5})  # asynchronous
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  init_from = Checkpointer(gs_workdir, create=False)  # as trainer.init_from reads it
  params = init_from.restore_params(abstract["params"], step=4)
  np.testing.assert_array_equal(params["w"], np.arange(8.0) * 4)
  with pytest.raises(ValueError, match=r"no saved state.params\['v'\]"):
    init_from.restore_params({"v": abstract["b"]})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Checkpointer(f"{gs_workdir}-missing", create=False)


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------
def _tiny_sft(num_steps: int):
  c = config_lib.default_configdict(kind="sft")
  c.model.builtin = "nano"
  c.data.num_train, c.data.num_test = 64, 8
  c.data.batch_size, c.data.seq_len = 8, 32
  c.data.max_prompt_len, c.data.max_answer_len = 12, 6
  c.eval.num_examples, c.eval.max_new_tokens = 8, 4
  c.checkpoint.save_interval_steps = 2
  c.checkpoint.async_save = False
  c.trainer.num_steps = num_steps
  c.trainer.log_every = 1
  c.trainer.progress = False
  return config_lib.from_configdict(c)


def test_trainer_sft_on_gcs_writes_there_and_resumes(gs_workdir, tmp_path, capsys,
                                                     monkeypatch):
  monkeypatch.setenv("JAXRL_LLM_DATA_CACHE", str(tmp_path / "cache"))
  trainer.run(_tiny_sft(2), gs_workdir)
  assert list((tmp_path / "cache").glob("*/process_0/*"))  # the data build stayed local
  rows = metrics_lib.read_metrics(gs_workdir)
  assert {1, 2} <= {r["step"] for r in rows if "loss/nll" in r}
  assert any("eval/accuracy" in r for r in rows if r["step"] == 0)
  start = json.loads(fileio.read_text(fileio.join(gs_workdir, "eval_start.json")))
  assert "eval/accuracy" in start
  assert "loss/nll" in _tensorboard_scalars(fileio.join(gs_workdir, "tensorboard"))
  assert Checkpointer(gs_workdir, create=False).all_steps() == [2]
  assert not os.path.exists("gs:")  # nothing landed in a local folder named after the URL

  trainer.run(_tiny_sft(3), gs_workdir)
  out = capsys.readouterr().out
  assert "Resuming from step 2" in out
  assert "held-out metric" in out  # the summary table read eval_start.json back
  rows = metrics_lib.read_metrics(gs_workdir)
  assert 3 in {r["step"] for r in rows if "loss/nll" in r}
  assert Checkpointer(gs_workdir, create=False).latest_step() == 3


def test_jsonl_data_files_on_gcs(gs_workdir, tmp_path):
  """data.path on gs:// (GSM8K-format JSONL): read through epath, built into a local dir."""
  from jaxrl_llm.data import builders, pipeline
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gsm8k")
  for split in ("train", "test"):
    with open(os.path.join(root, f"{split}.jsonl")) as f:
      fileio.write_text(fileio.join(gs_workdir, "data", f"{split}.jsonl"), f.read())
  data = pipeline.DataConfig(source="jsonl", path=fileio.join(gs_workdir, "data", "{split}.jsonl"),
                             field_map=(("prompt", "question"), ("answer", "answer")),
                             data_dir=str(tmp_path / "tfds"))
  examples = builders.load_split(data, "test")
  with open(os.path.join(root, "test.jsonl")) as f:
    expected = [json.loads(line) for line in f]
  assert [e["prompt"] for e in examples] == [e["question"] for e in expected]
  assert [e["answer"] for e in examples] == [e["answer"] for e in expected]
