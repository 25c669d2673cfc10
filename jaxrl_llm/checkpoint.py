"""Checkpoints (orbax) and preemption handling.

This is the only module that imports orbax: its API moves between versions,
so everything else goes through ``Checkpointer``.

A checkpoint of step ``s`` lives in ``<workdir>/checkpoints/<s>/`` with three
items:

  state/      the training state: any pytree of ``jax.Array`` (sharded or
              not), written by every process for the shards it owns;
  extra/      a JSON object for what is not an array: data-iterator position,
              an rng as a list of ints, a config snapshot, ...
  checksums/  a JSON manifest: every state leaf's path, shape, dtype and
              checksum, and the SHA-256 of ``extra``.

Verification. Orbax's files carry no checksum of the array bytes (a flipped
byte in a data file restores silently into different numbers), so ``save``
records one per leaf, computed on the devices from the arrays being saved:

  checksum(x) = Σ_i w_i · (2i + 1)  mod 2^32

over the words w_i of the leaf's raw bytes (its elements bit-cast to
unsigned integers of their own width, widened to 32 bits; 8-byte elements
as two words). Any single flipped bit changes the sum by ±2^k·(2i + 1),
never 0 mod 2^32, and other damage goes unnoticed with probability about
2^-32. The sum is independent of how the leaf is sharded, so a state
restored onto another mesh verifies too. ``restore`` first compares the
target's leaves and shapes with the manifest (a checkpoint of another model
or kind of run is refused with the differing leaves named), then recomputes
the checksums of what it read; any mismatch, or a file orbax cannot read, raises
``CorruptCheckpointError`` naming the step directory, the leaves and the
earlier steps to resume from instead.

A missing manifest. Every save records in orbax's step metadata
(``<s>/_CHECKPOINT_METADATA``: its item list, and ``custom_metadata``) that
the step was written with a manifest. A step whose metadata says so but whose
``checksums/`` is gone (a partial copy, a deleted directory) is refused with
``CorruptCheckpointError`` naming the step directory and the earlier steps;
``CheckpointConfig.allow_unverified_restore`` restores it unverified instead.
Checkpoints written before manifests existed (no such record) restore
unverified with a warning printed to stderr. So does a leaf restored into
another dtype than it was saved in (its bytes differ by design).

Finite states only. ``save`` refuses (``NonFiniteStateError``, nothing
written) a state with a NaN or Inf in any floating-point leaf, so a diverged
run never saves over, or rotates out with ``max_to_keep``, its last finite
checkpoint.

Atomicity. Orbax writes a step into ``<s>.orbax-checkpoint-tmp*`` and renames
it to ``<s>`` only after every process has finished writing (object stores
use a ``commit_success.txt`` marker instead). A save that dies half-way
(SIGKILL, node loss) therefore leaves only a temporary directory, which
``latest_step``/``restore`` never report and which the next ``Checkpointer``
on that directory deletes.

Asynchronous saves. With ``async_save=True`` ``save`` returns once the arrays
have been copied to host memory; the write runs in a background thread. The
state passed to ``save`` may be donated to the next step right away. Call
``wait()`` (or ``close()``) before the process exits.

Preemption. ``PreemptionGuard`` turns SIGTERM (and optionally SIGINT) into a
flag that all processes agree on. At a safe point of the loop (between steps):

  with Checkpointer(workdir, cfg) as ckpt, PreemptionGuard() as guard:
    for step in range(start, total):
      state, metrics = train_step(state, batch, rng)
      ckpt.save(step, state, extra=extra_fn(step))
      if guard.should_stop(step):
        ckpt.save(step, state, extra=extra_fn(step), force=True)
        ckpt.wait()
        break  # exit cleanly; the scheduler restarts the job, which resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import signal
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxrl_llm import fileio

_STATE = "state"
_EXTRA = "extra"
_CHECKSUMS = "checksums"
_MANIFEST_FORMAT = 1
# orbax's per-step metadata file, and the key our saves add to its custom_metadata.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_SAVED_WITH_CHECKSUMS = "checksums_format"
CHECKPOINT_SUBDIR = "checkpoints"


class CorruptCheckpointError(ValueError):
  """A checkpoint's files cannot be read, or do not hold what was saved."""


class CheckpointMismatchError(ValueError):
  """A checkpoint holds leaves or shapes other than the restore target's."""


class NonFiniteStateError(FloatingPointError):
  """``save`` was given a state with NaN or Inf values; nothing was written."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and how checkpoints are written.

  Attributes:
    save_interval_steps: save when ``step % save_interval_steps == 0``
      (``save(..., force=True)`` saves regardless).
    max_to_keep: number of most recent checkpoints kept; None keeps all.
    async_save: write in a background thread so training continues while
      the checkpoint is written.
    allow_unverified_restore: restore a step whose checksum manifest was
      saved but is missing (deleted, or lost in a copy) without verifying its
      arrays, with a printed warning; False refuses it (see the module
      docstring). Steps saved before manifests existed always restore, with
      a warning.
  """

  save_interval_steps: int = 500
  max_to_keep: int | None = 3
  async_save: bool = True
  allow_unverified_restore: bool = False

  def __post_init__(self):
    if (not isinstance(self.save_interval_steps, int)
        or self.save_interval_steps < 1):
      raise ValueError(
          "CheckpointConfig.save_interval_steps="
          f"{self.save_interval_steps!r} must be an int >= 1.")
    if self.max_to_keep is not None and (
        not isinstance(self.max_to_keep, int) or self.max_to_keep < 1):
      raise ValueError(
          f"CheckpointConfig.max_to_keep={self.max_to_keep!r} must be None "
          "(keep all) or an int >= 1.")
    if not isinstance(self.async_save, bool):
      raise ValueError(
          f"CheckpointConfig.async_save={self.async_save!r} must be True or "
          "False.")
    if not isinstance(self.allow_unverified_restore, bool):
      raise ValueError(
          "CheckpointConfig.allow_unverified_restore="
          f"{self.allow_unverified_restore!r} must be True or False.")


def _warn(message: str) -> None:
  """Logs `message` and prints it to stderr (once, from process 0): launchers may set
  absl logging to ERROR, and a restore that skipped verification must be seen."""
  logging.warning(message)
  if jax.process_index() == 0:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _step_metadata_says_checksums(metadata: Mapping[str, Any]) -> bool:
  """Whether a step's orbax metadata (its _CHECKPOINT_METADATA JSON) records a checksum
  manifest: our custom_metadata key, or a 'checksums' item in orbax's item list."""
  custom = metadata.get("custom_metadata") or {}
  handlers = metadata.get("item_handlers") or {}
  return (isinstance(custom, dict) and _SAVED_WITH_CHECKSUMS in custom) or (
      isinstance(handlers, dict) and _CHECKSUMS in handlers)


def _abstract_leaf(path, leaf) -> jax.ShapeDtypeStruct:
  """A restore target for one leaf: shape, dtype and the target sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  if isinstance(leaf, jax.ShapeDtypeStruct):
    if leaf.sharding is None:
      raise ValueError(
          f"restore target {jax.tree_util.keystr(path)} has no sharding; give "
          "every jax.ShapeDtypeStruct a sharding (e.g. a NamedSharding over "
          "the current mesh) so it can be restored onto that mesh.")
    return leaf
  raise ValueError(
      f"restore target {jax.tree_util.keystr(path)} is a "
      f"{type(leaf).__name__}; expected jax.ShapeDtypeStruct (with sharding) "
      "or jax.Array.")


def _path_name(path) -> str:
  """A leaf's path as "params/layers/wq" (attribute, key and index entries alike)."""
  parts = []
  for entry in path:
    for attr in ("name", "key", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
  """The raw bytes of `x` as a flat uint32 vector (one word per <= 4-byte element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:  # bitcast to a narrower type adds a trailing axis of 2 words
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(checksum, all finite) of one leaf; see the module docstring for the formula."""
  words = _words(x)
  weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
  checksum = jnp.sum(words * weights, dtype=jnp.uint32)  # wraps mod 2^32
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return checksum, jnp.all(jnp.isfinite(x))
  return checksum, jnp.asarray(True)


@jax.jit
def _tree_digest(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  digests = [_leaf_digest(x) for x in leaves]
  return (jnp.stack([c for c, _ in digests]).astype(jnp.uint32),
          jnp.stack([f for _, f in digests]))


def _host(x: jax.Array) -> np.ndarray:
  """A replicated (multi-host: possibly not fully addressable) array on the host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def _digest(tree: Any) -> dict[str, dict[str, Any]]:
  """{leaf path: {shape, dtype, checksum, finite}} of a pytree of arrays."""
  named = jax.tree_util.tree_leaves_with_path(tree)
  if not named:
    return {}
  leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in named]
  checksums, finite = _tree_digest(leaves)
  checksums, finite = _host(checksums), _host(finite)
  return {_path_name(path): {"shape": list(np.shape(x)), "dtype": str(x.dtype),
                             "checksum": int(c), "finite": bool(f)}
          for (path, x), c, f in zip(named, checksums, finite)}


def _extra_sha256(extra: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(extra, sort_keys=True).encode("utf-8")).hexdigest()


def _listed(names: list[str], limit: int = 4) -> str:
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


class Checkpointer:
  """Saves and restores ``(state, extra)`` under ``<workdir>/checkpoints``.

  Every process of a multi-host job constructs one and calls every method in
  the same order (saves and restores are collective).

  Args:
    workdir: run directory (local path or any path orbax supports, e.g.
      ``gs://...``).
    cfg: checkpoint settings.
    create: create the checkpoint directory if missing. With False, a missing
      directory raises ``FileNotFoundError`` (useful for evaluation jobs that
      must not start from scratch by accident).
  """

  def __init__(self, workdir: str | epath.PathLike,
               cfg: CheckpointConfig | None = None, *, create: bool = True):
    if workdir is None or not str(workdir):
      raise ValueError(f"Checkpointer workdir={workdir!r} must be a non-empty "
                       "path.")
    self.cfg = cfg or CheckpointConfig()
    # fileio names the missing package (gcsfs, ...) for a gs:// etc. workdir;
    # orbax writes arrays through tensorstore and everything else through epath.
    self.directory = fileio.as_path(workdir) / CHECKPOINT_SUBDIR
    if not create and not self.directory.exists():
      raise FileNotFoundError(
          f"Checkpoint directory {self.directory} does not exist (create="
          "False).")
    save_policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(
            self.cfg.save_interval_steps),
        # Saves at JAX's preemption sync point when the distributed runtime's
        # preemption service is on.
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp.checkpoint_managers.LatestN(
            n=self.cfg.max_to_keep),
        enable_async_checkpointing=self.cfg.async_save,
        # Remove the temporary directories of saves that never finished.
        cleanup_tmp_directories=True,
        create=create,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of all checkpoints, ascending.

    Includes saves started by this object that are still being written in
    the background (``wait()`` makes them final); never includes
    unfinished checkpoints left by other or killed processes.
    """
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (see ``all_steps``), or None."""
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without force would write a checkpoint."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, *,
           extra: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Saves ``state`` and ``extra`` as step ``step`` if the policy says so.

    Args:
      step: training step; checkpoints are written when
        ``step % save_interval_steps == 0`` or at a preemption sync point.
      state: pytree of arrays (sharded ``jax.Array``s are written shard by
        shard by the processes that own them).
      extra: JSON-serialisable mapping saved next to the state.
      force: save regardless of the interval (e.g. on preemption or at the
        end of training). A step that already has a checkpoint is never
        overwritten.

    Returns:
      True if a save was started.

    Raises:
      NonFiniteStateError: a floating-point leaf of ``state`` holds NaN or
        Inf; nothing is written, so the newest checkpoint stays the last
        finite one.
    """
    extra = dict(extra or {})
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"Checkpointer.save extra must be JSON-serialisable: {e}") from e
    if force and step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists; not saving again.",
                   step)
      return False
    if not force and not self._manager.should_save(step):
      return False
    leaves = _digest(state)
    nonfinite = [name for name, leaf in leaves.items() if not leaf["finite"]]
    if nonfinite:
      latest = self.latest_step()
      kept = (f"the newest checkpoint stays step {latest} in {self.directory}"
              if latest is not None else f"no checkpoint is in {self.directory} yet")
      raise NonFiniteStateError(
          f"Not saving step {step}: the state has NaN/Inf values in {len(nonfinite)} "
          f"leaves ({_listed(nonfinite)}), so the run has diverged; {kept}.")
    manifest = {"format": _MANIFEST_FORMAT, "extra_sha256": _extra_sha256(extra),
                "leaves": {name: {k: leaf[k] for k in ("shape", "dtype", "checksum")}
                           for name, leaf in leaves.items()}}
    # The policy was consulted above (once: the preemption policy is a collective).
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _EXTRA: ocp.args.JsonSave(extra),
            _CHECKSUMS: ocp.args.JsonSave(manifest),
        }),
        force=True, custom_metadata={_SAVED_WITH_CHECKSUMS: _MANIFEST_FORMAT})
    if saved:
      logging.info("Saving checkpoint for step %d to %s.", step,
                   self.directory)
    return saved

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _earlier(self, step: int) -> str:
    """What to do instead of restoring `step`: the earlier steps, if any."""
    earlier = [s for s in self.all_steps() if s < step]
    if not earlier:
      return (f"No earlier checkpoint is in {self.directory}: start again in a new workdir "
              f"(or move {self._step_dir(step)} away to start this one from scratch).")
    return (f"Earlier checkpoints: steps {earlier}. To resume from step {earlier[-1]}, move "
            f"{self._step_dir(step)} out of {self.directory} (keep it for inspection) and "
            "rerun.")

  def _unreadable(self, step: int, what: str, error: Exception) -> CorruptCheckpointError:
    root = error  # orbax wraps the storage error that names the file; report that one
    while (root.__cause__ or root.__context__) is not None:
      root = root.__cause__ or root.__context__
    return CorruptCheckpointError(
        f"Cannot read {what} of checkpoint {self._step_dir(step)}: "
        f"{type(root).__name__}: {str(root)[:800]}\nIts files are damaged or incomplete "
        f"(e.g. a truncated copy or a disk error), or were not written by this version. "
        f"{self._earlier(step)}")

  def _saved_with_checksums(self, step: int) -> bool:
    """Whether the step's own metadata says it was saved with a checksum manifest
    (False when that metadata is absent or unreadable: an older or foreign save)."""
    file = self._step_dir(step) / _STEP_METADATA
    try:
      metadata = json.loads(file.read_text())
    except (OSError, ValueError):
      return False
    return isinstance(metadata, dict) and _step_metadata_says_checksums(metadata)

  def _missing_manifest(self, step: int) -> None:
    """A step without checksums/: refused when it was saved with one (unless
    cfg.allow_unverified_restore), else restored unverified with a printed warning."""
    where = self._step_dir(step)
    if not self._saved_with_checksums(step):
      _warn(f"Checkpoint {where} has no checksum manifest ({_CHECKSUMS}/): it was saved by an "
            "older version, so its arrays are restored unverified (a damaged file would "
            "restore silently into different numbers).")
      return
    if self.cfg.allow_unverified_restore:
      _warn(f"Checkpoint {where} was saved with a checksum manifest, but {_CHECKSUMS}/ is "
            "missing; restoring it unverified as checkpoint.allow_unverified_restore=True "
            "asks.")
      return
    raise CorruptCheckpointError(
        f"Checkpoint {where} was saved with a checksum manifest, but {where / _CHECKSUMS} is "
        "missing (deleted, or lost in a partial copy), so its arrays cannot be verified. "
        f"Copy {_CHECKSUMS}/ back from where the checkpoint came from, or resume from an "
        f"earlier step: {self._earlier(step)} To restore it unverified anyway, set "
        "checkpoint.allow_unverified_restore=True (CheckpointConfig(allow_unverified_restore="
        "True) for a Checkpointer built in code).")

  def _manifest(self, step: int) -> dict[str, Any] | None:
    """The step's checksum manifest; None when it has none and may restore unverified
    (see `_missing_manifest`)."""
    if not (self._step_dir(step) / _CHECKSUMS).exists():
      self._missing_manifest(step)
      return None
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_CHECKSUMS: ocp.args.JsonRestore()}))
      manifest = dict(restored[_CHECKSUMS])
      if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(
          manifest.get("leaves"), dict):
        raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
    except Exception as e:  # noqa: BLE001 - any read failure: name the files
      raise self._unreadable(step, f"the checksum manifest {_CHECKSUMS}/", e) from e
    return manifest

  def _check_target(self, step: int, manifest: dict[str, Any], target: Any,
                    prefix: str = "") -> None:
    """Refuses a target whose leaves or shapes differ from the saved ones."""
    saved = {name: leaf for name, leaf in manifest["leaves"].items()
             if name.startswith(prefix)}
    wanted = {_path_name(path): tuple(leaf.shape) for path, leaf
              in jax.tree_util.tree_leaves_with_path(target)}
    # A partial restore (prefix) reports missing leaves itself, naming the first.
    missing = sorted(set(wanted) - set(saved)) if not prefix else []
    unexpected = sorted(set(saved) - set(wanted)) if not prefix else []
    shapes = [f"{name} saved {tuple(saved[name]['shape'])}, expected {shape}"
              for name, shape in wanted.items()
              if name in saved and tuple(saved[name]["shape"]) != shape]
    if not (missing or unexpected or shapes):
      return
    problems = []
    if shapes:
      problems.append(f"{len(shapes)} leaves of another shape ({_listed(shapes, 3)})")
    if missing:
      problems.append(f"{len(missing)} leaves not in the checkpoint ({_listed(missing)})")
    if unexpected:
      problems.append(f"{len(unexpected)} saved leaves this run does not have "
                      f"({_listed(unexpected)})")
    raise CheckpointMismatchError(
        f"Checkpoint {self._step_dir(step)} was saved by another model or kind of run: "
        f"{'; '.join(problems)}. Resume it with the config it was saved with (stored in its "
        "extra/ as 'config'), or give this run a new workdir (with trainer.init_from "
        "pointing at that workdir to start from its weights when the model is the same).")

  def _verify(self, step: int, manifest: dict[str, Any], tree: Any,
              extra: Mapping[str, Any] | None = None) -> None:
    """Recomputes the checksums of what was read; raises on any difference."""
    saved = manifest["leaves"]
    bad, unchecked = [], []
    for name, leaf in _digest(tree).items():
      if saved[name]["dtype"] != leaf["dtype"]:
        unchecked.append(name)  # restored into another dtype: the bytes differ by design
      elif saved[name]["checksum"] != leaf["checksum"]:
        bad.append(name)
    if extra is not None and _extra_sha256(extra) != manifest["extra_sha256"]:
      bad.append(f"{_EXTRA}/ (the JSON extra: data position, config, ...)")
    if unchecked:
      _warn(f"Checkpoint {self._step_dir(step)}: {len(unchecked)} leaves restored into "
            f"another dtype than they were saved in were not verified ({_listed(unchecked)}); "
            "restore into the saved dtypes (the manifest in checksums/ lists them) to verify "
            "them.")
    if bad:
      raise CorruptCheckpointError(
          f"Checkpoint {self._step_dir(step)} is corrupt: {len(bad)} items read back differ "
          f"from what was saved ({_listed(bad)}); its files changed after the save (a damaged "
          f"disk or copy). Nothing was restored. {self._earlier(step)}")

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]] | None:
    """Restores ``(state, extra)``, resharded to ``abstract_state``'s shardings.

    The checkpoint is verified against its checksum manifest (see the module
    docstring) before it is returned.

    Args:
      abstract_state: pytree with the structure of the saved state whose
        leaves are ``jax.ShapeDtypeStruct`` with a sharding (or ``jax.Array``,
        whose shape, dtype and sharding are used). Each array is read
        directly into that sharding, on whatever mesh it names; it does not
        have to match the mesh the checkpoint was saved from.
      step: step to restore; None means the latest.

    Returns:
      ``(state, extra)``, or None when ``step`` is None and no finished
      checkpoint exists (a fresh run).

    Raises:
      FileNotFoundError: ``step`` was given and has no finished checkpoint.
      ValueError: a leaf of ``abstract_state`` has no sharding.
      CheckpointMismatchError: the saved leaves or shapes are not the
        target's (another model or kind of run).
      CorruptCheckpointError: files cannot be read or do not match their
        checksums; the message names the earlier steps to resume from.
    """
    # A background save of the requested step must land before reading it.
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No finished checkpoint for step {step} in {self.directory}; "
          f"available steps: {self.all_steps()}.")
    target = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_state)
    manifest = self._manifest(step)
    if manifest is not None:
      self._check_target(step, manifest, target)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(target),
              _EXTRA: ocp.args.JsonRestore(),
          }))
    except Exception as e:  # noqa: BLE001 - any read failure: name the files
      raise self._unreadable(step, "the state", e) from e
    state, extra = restored[_STATE], dict(restored[_EXTRA] or {})
    if manifest is not None:
      self._verify(step, manifest, state, extra)
    logging.info("Restored checkpoint for step %d from %s.", step,
                 self.directory)
    return state, extra

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Restores only ``state.params`` (e.g. to warm-start another run).

    The optimizer state and extras of the saved run are not read, so a run
    with another optimizer or algorithm can start from these weights.
    ``abstract_params`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
    The params are verified against the checkpoint's checksums.
    """
    self.wait()
    if step is None:
      step = self.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No finished checkpoint{'' if step is None else f' for step {step}'} in "
          f"{self.directory}; available steps: {self.all_steps()}. Point init_from at "
          "the workdir of a run that saved one.")
    target = {"params": jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_params)}
    manifest = self._manifest(step)
    if manifest is not None:
      self._check_target(step, manifest, target, prefix="params/")
    try:
      restored = ocp.PyTreeCheckpointer().restore(
          self._step_dir(step) / _STATE,
          args=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    except Exception as e:  # noqa: BLE001 - any read failure: name the files
      raise self._unreadable(step, "the params", e) from e
    # A partial restore hands back the target leaf where the checkpoint has none.
    missing = [jax.tree_util.keystr(path) for path, leaf
               in jax.tree_util.tree_leaves_with_path(restored["params"])
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
      raise ValueError(
          f"Checkpoint {self.directory / str(step)} has no saved state.params{missing[0]} "
          f"({len(missing)} of the requested params are missing): it was not saved from a "
          "train state with these params (another model or kind of run?).")
    if manifest is not None:
      self._verify(step, manifest, {"params": restored["params"]})
    logging.info("Restored params of step %d from %s.", step, self.directory)
    return restored["params"]

  def restore_extra(self, step: int | None = None) -> dict[str, Any]:
    """Restores only the JSON ``extra`` of a step (the latest by default).

    E.g. the config snapshot of another run, read before its arrays are
    restored (the snapshot says what shapes to restore them into).
    """
    self.wait()
    if step is None:
      step = self.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No finished checkpoint{'' if step is None else f' for step {step}'} in "
          f"{self.directory}; available steps: {self.all_steps()}.")
    manifest = self._manifest(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001 - any read failure: name the files
      raise self._unreadable(step, f"the JSON {_EXTRA}/", e) from e
    extra = dict(restored[_EXTRA] or {})
    if manifest is not None and _extra_sha256(extra) != manifest["extra_sha256"]:
      raise CorruptCheckpointError(
          f"Checkpoint {self._step_dir(step)} is corrupt: its {_EXTRA}/ JSON differs from "
          f"what was saved. {self._earlier(step)}")
    return extra

  def wait(self) -> None:
    """Blocks until every started save is finished and visible."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@contextlib.contextmanager
def finished_run(workdir: str, *, where: str, hint: str):
  """Opens another run's workdir read-only at its latest finished checkpoint.

  Yields ``(checkpointer, step, config_snapshot)`` and closes the
  checkpointer afterwards. A missing workdir, a workdir with no finished
  checkpoint, or one whose checkpoint has no config snapshot raise
  FileNotFoundError / ValueError naming `where` and ending with `hint` (the fix).
  """
  try:
    ckpt = Checkpointer(workdir, create=False)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: {e} To fix: {hint}") from e
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{where} has no finished checkpoint; {hint}")
    snapshot = ckpt.restore_extra(step).get("config")
    if not isinstance(snapshot, dict):
      raise ValueError(f"{where}: checkpoint {step} stores no config snapshot; {hint}")
    yield ckpt, step, snapshot
  finally:
    ckpt.close()


def _reached_preemption_sync_point(step: int) -> bool:
  """JAX's distributed preemption notice (False without the service)."""
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except RuntimeError:
    # Raised when jax.distributed runs with the preemption service disabled.
    return False


class PreemptionGuard:
  """Turns termination signals into a stop decision shared by all processes.

  The signal handler only sets a flag; nothing is saved inside it. The loop
  asks ``should_stop(step)`` at a safe point (between steps) and then saves
  with ``force=True``, waits and exits (see the module docstring).

  Multi-host agreement: the scheduler may signal only some processes, yet a
  save is collective, so every process must take the same decision at the
  same step. ``should_stop`` all-gathers the local flags (a tiny collective)
  every ``sync_every_steps`` steps and stops if any process was signalled;
  it also honours JAX's own preemption sync point
  (``multihost_utils.reached_preemption_sync_point``). Every process must
  therefore call ``should_stop`` with the same sequence of steps. With one
  process no communication happens. (``jax.distributed``'s preemption
  service listens for SIGTERM too; installing this guard takes the signal
  over on this process, and the all-gather keeps the processes in step.)

  Args:
    signals: signals that request a stop; by default SIGTERM (what
      Kubernetes, SLURM and TPU maintenance send before killing a job).
    catch_sigint: also treat the first Ctrl-C (SIGINT) as a stop request; a
      second Ctrl-C interrupts immediately as usual.
    sync_every_steps: how often (in steps) multi-host runs all-gather the
      flag.

  Handlers are installed by ``install()`` (or entering the context manager),
  which must run in the main thread, and restored by ``uninstall()``.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *,
               catch_sigint: bool = False, sync_every_steps: int = 1):
    if sync_every_steps < 1:
      raise ValueError(
          f"PreemptionGuard sync_every_steps={sync_every_steps!r} must be "
          ">= 1.")
    self._signals = tuple(signals)
    if catch_sigint and signal.SIGINT not in self._signals:
      self._signals += (signal.SIGINT,)
    self.sync_every_steps = sync_every_steps
    self._flag = threading.Event()
    self._stopped = False
    self._previous: dict[int, Any] = {}

  @property
  def stop_requested(self) -> bool:
    """Whether this process received a stop request (not yet agreed on)."""
    return self._flag.is_set()

  def request_stop(self) -> None:
    """Requests a stop from code (e.g. a wall-clock budget), like a signal."""
    self._flag.set()

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._flag.is_set():
      logging.warning("Received signal %d: will checkpoint and stop at the "
                      "next safe point.", signum)
    self._flag.set()
    if signum == signal.SIGINT and signum in self._previous:
      # A second Ctrl-C gets the usual KeyboardInterrupt.
      signal.signal(signum, self._previous.pop(signum))

  def install(self) -> PreemptionGuard:
    """Installs the signal handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError(
          "PreemptionGuard.install must be called from the main thread.")
    for signum in self._signals:
      if signum not in self._previous:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were active before ``install``."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether all processes should checkpoint and stop after ``step``.

    Collective on multi-host runs: call on every process with the same
    steps. Once True it stays True.
    """
    if self._stopped:
      return True
    stop = _reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      stop = stop or self._flag.is_set()
    elif step % self.sync_every_steps == 0:
      flags = multihost_utils.process_allgather(
          np.asarray(self._flag.is_set(), np.int32))
      stop = stop or bool(np.any(flags))
    if stop:
      logging.warning("Stopping at step %d: preemption or stop request.", step)
      self._stopped = True
    return stop

  def __enter__(self) -> PreemptionGuard:
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.uninstall()
