"""Metric logging, progress display and NaN/Inf handling.

Metric names are flat strings with slashes: ``loss/policy``,
``rl/reward_mean``, ``grad/global_norm``.

The training loop keeps the host one step behind the device:

  pending = AsyncMetrics()
  for step in ...:
    state, metrics = train_step(state, batch, rng)   # dispatch step N
    if (done := pending.push(step, metrics)) is not None:
      prev_step, host = done                         # step N-1, now on host
      guard.check(host, step=prev_step)
      writer.write(prev_step, host)
  if (done := pending.flush()) is not None:
    writer.write(*done)

so fetching step N-1's numbers never blocks the step just dispatched.

Where metrics go: `MetricWriter` writes JSONL and TensorBoard event files to
any workdir `jaxrl_llm.fileio` serves (local, gs://, s3://, ...) and logs to
Weights & Biases when `MetricsConfig.wandb_project` is set; `read_metrics`
reads a run's JSONL back whatever the path kind.

NaN/Inf policy. ``apply_if_finite`` runs inside the jitted step and keeps
the old state when any gradient (or the loss) is not finite; the host-side
``NonFiniteGuard`` then either counts such steps ("skip") or stops the run
("stop") with a message naming the offending metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrl_llm import fileio

NONFINITE_POLICIES = ("skip", "stop")


def _local(value: Any) -> Any:
  """A locally readable copy of a metric."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    # Metrics leave the step replicated; any local copy holds the value.
    return value.addressable_data(0)
  return value


def _to_float(name: str, value: Any) -> float:
  """One scalar metric as a Python float."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(
        f"metric {name!r} has shape {array.shape}; metrics must be scalars.")
  return float(array.reshape(()))


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Fetches a dict of scalar (device or host) metrics as Python floats.

  Multi-host: a metric that is a global array must be replicated (the steps'
  metrics are), since only a local copy is read.
  """
  fetched = jax.device_get({k: _local(v) for k, v in metrics.items()})
  return {name: _to_float(name, value) for name, value in fetched.items()}


WANDB_MODES = ("online", "offline", "disabled")
JSONL_NAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
_PART_RE = re.compile(r"^metrics-(\d+)\.jsonl$")
_WRITER_NUMBERS = itertools.count()


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  """Where a run's metrics go (`ExperimentConfig.metrics`).

  Attributes:
    jsonl: write metrics as JSON lines (see `MetricWriter` for the files).
    tensorboard: write TensorBoard event files under `<workdir>/tensorboard`.
    flush_every_seconds: push buffered metrics out at least this often (the
      trainer also flushes at every checkpoint and at the end). On an object
      store each flush rewrites the current part file, up to
      `remote_part_mb`.
    remote_part_mb: on object stores (gs://, s3://, ...), start a new part
      file once the current one holds this many MiB, which bounds what a
      flush uploads.
    wandb_project: also log to this Weights & Biases project ("" = off);
      needs `pip install wandb`.
    wandb_entity: W&B user or team ("" = the default entity).
    wandb_run_name: W&B display name ("" = W&B's generated name).
    wandb_mode: "online", "offline" (files under the run's wandb/ folder, to
      `wandb sync` later) or "disabled".

  An SFT warm-start stage runs in `<workdir>/sft_warmstart` and so logs as a
  W&B run of its own.
  """

  jsonl: bool = True
  tensorboard: bool = True
  flush_every_seconds: float = 60.0
  remote_part_mb: float = 4.0
  wandb_project: str = ""
  wandb_entity: str = ""
  wandb_run_name: str = ""
  wandb_mode: str = "online"

  def __post_init__(self):
    for name in ("jsonl", "tensorboard"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"metrics.{name}={getattr(self, name)!r} must be True or False")
    if not self.flush_every_seconds > 0:
      raise ValueError(f"metrics.flush_every_seconds={self.flush_every_seconds!r} must be > 0")
    if not self.remote_part_mb > 0:
      raise ValueError(f"metrics.remote_part_mb={self.remote_part_mb!r} must be > 0 (MiB per "
                       "part file on object stores)")
    for name in ("wandb_project", "wandb_entity", "wandb_run_name"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"metrics.{name}={getattr(self, name)!r} must be a string ('' = "
                         "unset)")
    if self.wandb_mode not in WANDB_MODES:
      raise ValueError(f"metrics.wandb_mode={self.wandb_mode!r}; choose one of {WANDB_MODES}")


class _AppendFile:
  """A local file that grows by appending (the previous content is kept)."""

  def __init__(self, path: str):
    self.path = path
    # Held open for the writer's lifetime; close() closes it.
    self._file = open(path, "ab")  # noqa: SIM115

  def replace_content(self, data: bytes) -> None:
    """Replaces what the file holds (atomically: a temporary file, then a rename)."""
    self._file.close()
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    self._file = open(self.path, "ab")  # noqa: SIM115

  def write(self, data: bytes) -> None:
    self._file.write(data)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _RewrittenParts:
  """A growing file on an object store, as numbered parts rewritten whole.

  Object stores cannot append, so the current part's bytes are kept in memory
  and the whole object is written at each flush; once it holds `part_bytes`
  the next write starts the next part, so a flush never uploads more than
  about `part_bytes` (plus what was written since the last flush).
  `header` starts every part (e.g. an event file's version record).
  """

  def __init__(self, name_of_part: Callable[[int], str], first_part: int, part_bytes: int,
               header: bytes = b""):
    self._name_of_part = name_of_part
    self._part = first_part
    self._part_bytes = part_bytes
    self._header = header
    self._buffer = bytearray(header)
    self._dirty = False

  def write(self, data: bytes) -> None:
    if len(self._buffer) >= self._part_bytes:
      self.flush()
      self._part += 1
      self._buffer = bytearray(self._header)
    self._buffer += data
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      fileio.write_bytes(self._name_of_part(self._part), bytes(self._buffer))
      self._dirty = False

  def close(self) -> None:
    self.flush()


def _tfrecord(data: bytes) -> bytes:
  """One TFRecord: u64 length, masked crc32c(length), data, masked crc32c(data)."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _event_record(step: int | None = None, values: Mapping[str, float] | None = None) -> bytes:
  """A TensorBoard event: scalars at `step`, or (no values) the file-version header."""
  from tensorboardX import summary  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  event = event_pb2.Event(wall_time=time.time())
  if values is None:
    event.file_version = "brain.Event:2"
  else:
    event.step = step
    for name, value in values.items():
      event.summary.value.extend(summary.scalar(name, value).value)
  return _tfrecord(event.SerializeToString())


def _purge_record(step: int) -> bytes:
  """A TensorBoard restart marker: readers drop the events of steps >= `step` before it."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  event = event_pb2.Event(wall_time=time.time(), step=step,
                          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
  return _tfrecord(event.SerializeToString())


def _rows_up_to(text: str, step: int, path: str) -> tuple[str, int]:
  """`text` (JSON lines) without the rows of steps > `step`; and how many were dropped.

  An unfinished last line (a write cut short by a kill) is dropped and counted too.
  """
  kept, dropped = [], 0
  lines = text.split("\n")
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row_step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if number == len(lines):  # no newline after it: a write cut short
        dropped += 1
        continue
      raise ValueError(f"{path}:{number} is not a JSON metrics row: {e}") from e
    if row_step > step:
      dropped += 1
    else:
      kept.append(line + "\n")
  return "".join(kept), dropped


def _part_index(path: str) -> int | None:
  match = _PART_RE.match(os.path.basename(path))
  return int(match.group(1)) if match else None


def _jsonl_files(workdir: str | os.PathLike) -> list[str]:
  """A run's JSONL files in the order written: metrics.jsonl, then the parts."""
  appended = fileio.join(workdir, JSONL_NAME)
  parts = sorted((i, p) for p in fileio.glob(workdir, "metrics-*.jsonl")
                 if (i := _part_index(p)) is not None)
  return ([appended] if fileio.exists(appended) else []) + [p for _, p in parts]


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
  """Every metrics row of a run (any path kind), in the order written.

  Reads `<workdir>/metrics.jsonl` (local runs) and then the part files
  `metrics-00000.jsonl`, `metrics-00001.jsonl`, ... (object-store runs) in
  numeric order. One step can have several rows (training metrics,
  evaluation): merge rows by "step" as needed. A resumed run re-runs the
  steps after its checkpoint; the trainer removes the rows of those steps
  left by the interrupted process when it resumes (`MetricWriter.
  discard_after`), so every step appears once. A last line cut short by a
  crash (no newline at its end) is left out with a warning; any other
  unreadable line raises ValueError.
  """
  rows = []
  for path in _jsonl_files(workdir):
    text = fileio.read_text(path)
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        if number == len(lines):  # no newline after it: a write cut short
          logging.warning("%s: left out the unfinished last line %d (%r).", path, number,
                          line[:80])
          continue
        raise ValueError(f"{path}:{number} is not a JSON object: {e}") from e
  return rows


def _import_wandb(project: str):
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"metrics.wandb_project={project!r} needs the 'wandb' package: pip install wandb "
        "(or pip install 'jaxrl_llm[wandb]'), or leave metrics.wandb_project empty.") from e
  return wandb


class MetricWriter:
  """Writes scalar metrics to JSONL, TensorBoard and optionally W&B.

  Only the primary process writes; on the others every method is a no-op.
  `workdir` is any path `jaxrl_llm.fileio` serves: local, gs://, s3://, ...

  Outputs under `workdir`:
    JSONL           one JSON object per `write`: {"step": s, name: v, ...}.
                    NaN and Inf are written as the NaN/Infinity literals that
                    Python's json and pandas read back. Read them with
                    `read_metrics`. A resumed run calls `discard_after(step)`
                    with the restored checkpoint's step: the rows of later
                    steps, logged by the interrupted process and about to be
                    logged again, are removed (and counted), so no step is
                    duplicated.
                    Local path: `metrics.jsonl`, appended to, so a resumed
                    run continues the file.
                    Object store: `metrics-00000.jsonl`, `metrics-00001.jsonl`,
                    ... Object stores cannot append, so each flush rewrites
                    the current part whole, and a part past `remote_part_mb`
                    is followed by a new one; a resumed run starts after the
                    highest existing part. Rows written after the last flush
                    are lost if the process is killed (the trainer flushes at
                    every checkpoint, so those steps are re-run and logged
                    again).
    tensorboard/    TensorBoard event files, one scalar series per name. Local:
                    one file per writer, appended to. Object store: numbered
                    files per writer (`events.out.tfevents.<time>.<host>.
                    <pid>.<n>.00000`, ...), each rewritten at flush like the
                    JSONL parts. Point TensorBoard at the gs:// folder where
                    it can read GCS (TensorFlow installed), or copy it down
                    (`gcloud storage rsync`). `discard_after(step)` starts the
                    new file with a restart marker (a SessionLog START at
                    step + 1), on which TensorBoard drops the earlier files'
                    events of the re-run steps.
    wandb_run_id.txt  with W&B: the run's id, so that a resumed run logs to
                    the same W&B run. W&B gets the step as the metric "step"
                    (the x-axis of every chart), so steps re-run after a
                    resume are kept rather than refused as out of order; W&B
                    cannot delete logged rows, so there a re-run step shows
                    twice.

  Args:
    workdir: run directory.
    config: what to write (JSONL, TensorBoard, W&B) and how often to flush.
    run_config: the run's configuration, recorded by W&B.
    is_primary: whether this process writes; defaults to
      `jax.process_index() == 0`.
    clock: seconds, for `config.flush_every_seconds`.
  """

  def __init__(self, workdir: str | os.PathLike, config: MetricsConfig | None = None, *,
               run_config: Mapping[str, Any] | None = None, is_primary: bool | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.workdir = os.fspath(workdir)
    self.config = config if config is not None else MetricsConfig()
    self.is_primary = (jax.process_index() == 0
                       if is_primary is None else bool(is_primary))
    self._clock = clock
    self._last_flush = clock()
    self._jsonl = None
    self._events = None
    self._wandb_run = None
    self._written = False
    if not self.is_primary:
      return
    cfg = self.config
    local = fileio.is_local(self.workdir)
    part_bytes = max(1, int(cfg.remote_part_mb * 2**20))
    fileio.makedirs(self.workdir)
    if cfg.jsonl:
      if local:
        self._jsonl = _AppendFile(fileio.join(self.workdir, JSONL_NAME))
      else:
        existing = [i for p in fileio.glob(self.workdir, "metrics-*.jsonl")
                    if (i := _part_index(p)) is not None]
        self._jsonl = _RewrittenParts(
            lambda i: fileio.join(self.workdir, f"metrics-{i:05d}.jsonl"),
            max(existing, default=-1) + 1, part_bytes)
    if cfg.tensorboard:
      logdir = fileio.join(self.workdir, TENSORBOARD_SUBDIR)
      fileio.makedirs(logdir)
      # TensorBoard orders a folder's event files by name: time, host, pid,
      # and the writer's number in this process (two writers never share one).
      stem = fileio.join(logdir, f"events.out.tfevents.{int(time.time()):010d}."
                                 f"{socket.gethostname()}.{os.getpid()}.{next(_WRITER_NUMBERS)}")
      if local:
        self._events = _AppendFile(stem)
        self._events.write(_event_record())
      else:
        self._events = _RewrittenParts(lambda i: f"{stem}.{i:05d}", 0, part_bytes,
                                       header=_event_record())
    if cfg.wandb_project:
      self._wandb_run = self._init_wandb(run_config)

  def _init_wandb(self, run_config: Mapping[str, Any] | None):
    cfg = self.config
    wandb = _import_wandb(cfg.wandb_project)
    id_file = fileio.join(self.workdir, WANDB_ID_FILE)
    resuming = fileio.exists(id_file)
    run_id = fileio.read_text(id_file).strip() if resuming else secrets.token_hex(4)
    run = wandb.init(
        project=cfg.wandb_project, entity=cfg.wandb_entity or None,
        name=cfg.wandb_run_name or None, mode=cfg.wandb_mode, id=run_id, resume="allow",
        # W&B keeps its own files locally: in the workdir when that is local,
        # else in its default folder (./wandb, or $WANDB_DIR).
        dir=self.workdir if fileio.is_local(self.workdir) else None,
        config=dict(run_config or {}))
    if not resuming:
      fileio.write_text(id_file, run_id + "\n")
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records `metrics` (scalars; device arrays are fetched) at `step`."""
    if not self.is_primary:
      return
    if "step" in metrics:
      raise ValueError("metric name 'step' is reserved for the step number.")
    step = int(step)
    values = to_host(metrics)
    self._written = True
    if self._jsonl is not None:
      self._jsonl.write((json.dumps({"step": step, **values}) + "\n").encode("utf-8"))
    if self._events is not None and values:
      self._events.write(_event_record(step, values))
    if self._wandb_run is not None:
      self._wandb_run.log({"step": step, **values})
    if self._clock() - self._last_flush >= self.config.flush_every_seconds:
      self.flush()

  def discard_after(self, step: int) -> int:
    """Removes the JSONL rows of steps > `step`; returns how many were removed.

    For a run resumed from the checkpoint of `step`: the interrupted process
    logged the steps after it, which the resumed run runs and logs again.
    Call before the first `write`. Rows are removed from every JSONL file
    (local: rewritten atomically; object stores: each part rewritten), and an
    unfinished last line is removed too. TensorBoard gets a restart marker at
    `step + 1` (see the class docstring); W&B keeps what it has.
    """
    if not self.is_primary:
      return 0
    if self._written:
      raise RuntimeError("MetricWriter.discard_after must be called before the first write")
    step = int(step)
    dropped = 0
    if self.config.jsonl:
      for path in _jsonl_files(self.workdir):
        kept, removed = _rows_up_to(fileio.read_text(path), step, path)
        if not removed:
          continue
        dropped += removed
        if isinstance(self._jsonl, _AppendFile) and self._jsonl.path == path:
          self._jsonl.replace_content(kept.encode("utf-8"))
        else:
          fileio.write_text(path, kept)
    if self._events is not None:
      self._events.write(_purge_record(step + 1))
    return dropped

  def flush(self) -> None:
    """Pushes buffered metrics to the workdir (a rewrite of the current part
    file on object stores); call at every checkpoint."""
    for output in (self._jsonl, self._events):
      if output is not None:
        output.flush()
    self._last_flush = self._clock()

  def close(self) -> None:
    """Flushes and closes every output; the writer is unusable afterwards."""
    for output in (self._jsonl, self._events):
      if output is not None:
        output.close()
    self._jsonl = self._events = None
    if self._wandb_run is not None:
      self._wandb_run.finish()
      self._wandb_run = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _format_count(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.1f}"


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}:{minutes:02d}:{secs:02d}"
  return f"{minutes}:{secs:02d}"


class Progress:
  """Training progress with steps/s and tokens/s.

  On a terminal it redraws one line (a bar, rates, ETA and a few metrics);
  otherwise (log files, batch jobs) it emits a log line every
  ``log_every_seconds``. Rates are measured between reports, starting from
  the first ``update`` so compilation of the first step does not count.
  Only the primary process reports.

  Args:
    total_steps: last step of the run (for the bar and the ETA).
    stream: where the bar goes; defaults to ``sys.stdout``.
    log_every_seconds: interval between log lines when not on a terminal.
    log_fn: receives each log line; defaults to ``absl.logging.info``.
    show: metric names shown next to the rates (when present).
    is_primary: defaults to ``jax.process_index() == 0``.
    clock: time source in seconds.
  """

  _REFRESH_SECONDS = 0.1

  def __init__(self, total_steps: int, *, stream: TextIO | None = None,
               log_every_seconds: float = 60.0,
               log_fn: Callable[[str], None] | None = None,
               show: tuple[str, ...] = ("loss/total", "rl/reward_mean"),
               is_primary: bool | None = None,
               clock: Callable[[], float] = time.monotonic):
    if total_steps < 1:
      raise ValueError(f"Progress total_steps={total_steps!r} must be >= 1.")
    self.total_steps = int(total_steps)
    self.stream = stream if stream is not None else sys.stdout
    self.log_every_seconds = log_every_seconds
    self.log_fn = log_fn or logging.info
    self.show = show
    self.is_primary = (jax.process_index() == 0
                       if is_primary is None else bool(is_primary))
    self.clock = clock
    isatty = getattr(self.stream, "isatty", None)
    self.is_tty = bool(isatty and isatty())
    self._start = None  # (time, step, tokens) at the first update.
    self._last = None  # (time, step, tokens) at the last report.
    self._tokens = 0.0
    self.steps_per_sec = 0.0
    self.tokens_per_sec = 0.0
    self._drawn = False

  def update(self, step: int, *, tokens: float = 0,
             metrics: Mapping[str, float] | None = None) -> None:
    """Records that ``step`` finished, having processed ``tokens`` tokens."""
    if not self.is_primary:
      return
    now = self.clock()
    self._tokens += float(tokens)
    if self._start is None:
      self._start = self._last = (now, step, self._tokens)
      return
    interval = self._REFRESH_SECONDS if self.is_tty else self.log_every_seconds
    last_time, last_step, last_tokens = self._last
    final = step >= self.total_steps
    if now - last_time < interval and not final:
      return
    if now > last_time:
      self.steps_per_sec = (step - last_step) / (now - last_time)
      self.tokens_per_sec = (self._tokens - last_tokens) / (now - last_time)
    self._last = (now, step, self._tokens)
    self._report(step, metrics or {})

  def _line(self, step: int, metrics: Mapping[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps}",
             f"{self.steps_per_sec:.2f} steps/s",
             f"{_format_count(self.tokens_per_sec)} tokens/s"]
    if self.steps_per_sec > 0:
      eta = (self.total_steps - step) / self.steps_per_sec
      parts.append(f"ETA {_format_duration(eta)}")
    parts += [f"{name}={metrics[name]:.4g}" for name in self.show
              if name in metrics]
    return " | ".join(parts)

  def _report(self, step: int, metrics: Mapping[str, float]) -> None:
    line = self._line(step, metrics)
    if not self.is_tty:
      self.log_fn(line)
      return
    width = 30
    filled = int(width * min(step, self.total_steps) / self.total_steps)
    bar = "#" * filled + "-" * (width - filled)
    self.stream.write(f"\r\x1b[2K[{bar}] {line}")
    self.stream.flush()
    self._drawn = True

  def close(self) -> None:
    """Ends the bar's line on a terminal."""
    if self._drawn:
      self.stream.write("\n")
      self.stream.flush()
      self._drawn = False


class AsyncMetrics:
  """Keeps the host one step behind the device for metric fetching.

  ``push(step, device_metrics)`` stores step N's metrics (starting their
  device-to-host copy) and returns step N-1's as Python floats; waiting for
  those only waits for step N-1, which finished before step N started, so
  the host stays ahead of the device.
  """

  def __init__(self):
    self._pending: tuple[int, Mapping[str, Any]] | None = None

  def push(self, step: int, device_metrics: Mapping[str, Any]
           ) -> tuple[int, dict[str, float]] | None:
    """Stores ``step``'s metrics; returns the previous step's, if any."""
    for value in jax.tree.leaves(dict(device_metrics)):
      if isinstance(value, jax.Array):
        _local(value).copy_to_host_async()
    previous = self.flush()
    self._pending = (int(step), dict(device_metrics))
    return previous

  def flush(self) -> tuple[int, dict[str, float]] | None:
    """Returns the held step's metrics on the host (None if none is held)."""
    if self._pending is None:
      return None
    step, metrics = self._pending
    self._pending = None
    return step, to_host(metrics)


class NonFiniteError(FloatingPointError):
  """A metric was NaN or Inf under the "stop" policy."""


class NonFiniteGuard:
  """Host-side NaN/Inf detection over each step's metrics.

  Policies:
    "stop": raise ``NonFiniteError`` naming the step and the metrics.
    "skip": count the step (the jitted step has already kept the old state
      through ``apply_if_finite``) and continue; raise once more than
      ``max_consecutive`` steps in a row were non-finite, since a run that
      only skips is not training.

  Args:
    policy: one of ``NONFINITE_POLICIES``.
    max_consecutive: limit for "skip"; None means unlimited.
  """

  def __init__(self, policy: str = "skip", *,
               max_consecutive: int | None = 10):
    if policy not in NONFINITE_POLICIES:
      raise ValueError(f"NonFiniteGuard policy={policy!r} is not valid; "
                       f"choose one of {NONFINITE_POLICIES}.")
    if max_consecutive is not None and max_consecutive < 1:
      raise ValueError(f"NonFiniteGuard max_consecutive={max_consecutive!r} "
                       "must be None or >= 1.")
    self.policy = policy
    self.max_consecutive = max_consecutive
    self.num_nonfinite = 0
    self.consecutive = 0

  def check(self, host_metrics: Mapping[str, float], *,
            step: int | None = None) -> bool:
    """True if every metric is finite; otherwise applies the policy."""
    bad = sorted(name for name, value in host_metrics.items()
                 if not math.isfinite(float(value)))
    if not bad:
      self.consecutive = 0
      return True
    self.num_nonfinite += 1
    self.consecutive += 1
    where = f"step {step}" if step is not None else "this step"
    detail = ", ".join(f"{name}={float(host_metrics[name])}" for name in bad)
    if self.policy == "stop":
      raise NonFiniteError(f"Non-finite metrics at {where}: {detail}.")
    if (self.max_consecutive is not None
        and self.consecutive > self.max_consecutive):
      raise NonFiniteError(
          f"Non-finite metrics at {where} ({detail}) for {self.consecutive} "
          f"steps in a row (max_consecutive={self.max_consecutive}); "
          "stopping.")
    logging.warning("Non-finite metrics at %s (%s); the update was skipped "
                    "(%d skipped so far).", where, detail, self.num_nonfinite)
    return False


def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack(leaves).all()


def apply_if_finite(new_state: Any, old_state: Any,
                    grads_or_loss: Any) -> tuple[Any, jax.Array]:
  """Keeps ``old_state`` when any gradient (or loss) is NaN/Inf.

  For use inside the jitted step, after the optimizer update:

    new_state = ...apply updates...
    state, ok = apply_if_finite(new_state, state, grads)

  Args:
    new_state: state after the update.
    old_state: state before the update (same structure, shapes, dtypes).
    grads_or_loss: pytree checked for non-finite values.

  Returns:
    ``(state, is_finite)``: ``new_state`` if every value of
    ``grads_or_loss`` is finite, else ``old_state``; and that scalar bool
    (log it, e.g. as ``opt/skipped = 1 - is_finite``).
  """
  is_finite = all_finite(grads_or_loss)
  # lax.cond selects whole pytrees, including PRNG key leaves; under jit with
  # both states already computed it lowers to a select.
  state = jax.lax.cond(is_finite, lambda new, old: new,
                       lambda new, old: old, new_state, old_state)
  return state, is_finite
