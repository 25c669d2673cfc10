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

NaN/Inf policy. ``apply_if_finite`` runs inside the jitted step and keeps
the old state when any gradient (or the loss) is not finite; the host-side
``NonFiniteGuard`` then either counts such steps ("skip") or stops the run
("stop") with a message naming the offending metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

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


class MetricWriter:
  """Writes scalar metrics to JSONL, TensorBoard and optionally W&B.

  Only the primary process writes; on the others every method is a no-op.

  Outputs under ``workdir``:
    metrics.jsonl   one JSON object per ``write``: ``{"step": s, name: v,
                    ...}``. Appended to, so a resumed run continues the file;
                    a step re-run after a restart appears again (readers
                    keep the last line of each step). NaN and Inf are
                    written as the ``NaN``/``Infinity`` literals that
                    Python's ``json`` and pandas read back.
    tensorboard/    TensorBoard event files (tensorboardX), one scalar
                    series per name.

  Args:
    workdir: run directory (local or mounted file system).
    jsonl: write ``metrics.jsonl``.
    tensorboard: write TensorBoard event files.
    wandb_project: if set, also log to this Weights & Biases project (needs
      the ``wandb`` package).
    wandb_config: run configuration recorded by W&B.
    is_primary: whether this process writes; defaults to
      ``jax.process_index() == 0``.
  """

  def __init__(self, workdir: str | os.PathLike, *, jsonl: bool = True,
               tensorboard: bool = True, wandb_project: str | None = None,
               wandb_config: Mapping[str, Any] | None = None,
               is_primary: bool | None = None):
    self.workdir = os.fspath(workdir)
    self.is_primary = (jax.process_index() == 0
                       if is_primary is None else bool(is_primary))
    self._jsonl = None
    self._tb = None
    self._wandb_run = None
    if not self.is_primary:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if jsonl:
      # Held open for the writer's lifetime; close() closes it.
      self._jsonl = open(  # noqa: SIM115
          os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          logdir=os.path.join(self.workdir, "tensorboard"))
    if wandb_project is not None:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            f"MetricWriter(wandb_project={wandb_project!r}) needs the "
            "'wandb' package: pip install wandb (or leave wandb_project "
            "unset).") from e
      self._wandb_run = wandb.init(
          project=wandb_project, dir=self.workdir,
          config=dict(wandb_config or {}))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records ``metrics`` (scalars; device arrays are fetched) at ``step``."""
    if not self.is_primary:
      return
    if "step" in metrics:
      raise ValueError("metric name 'step' is reserved for the step number.")
    step = int(step)
    values = to_host(metrics)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=step)
    if self._wandb_run is not None:
      self._wandb_run.log(values, step=step)

  def flush(self) -> None:
    """Pushes buffered metrics to disk."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes every output; the writer is unusable afterwards."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
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
