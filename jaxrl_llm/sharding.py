"""Device mesh, logical-axis rules and sharding helpers.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...). A
`MeshConfig` builds a mesh with axes ("data", "fsdp", "tensor") and maps the
logical names to mesh axes with `rules`. The same program then runs on one CPU,
one GPU, a GPU cluster or a TPU pod; only the mesh shape changes.

Mesh presets (`MESH_PRESETS`, `mesh_preset(name)`); -1 takes the remaining devices:

  "fsdp"         (1, -1, 1)  ZeRO-3: parameters, gradients and optimizer state
                             sharded over every device on their `embed` axis,
                             the batch split over every device. The default;
                             memory per device falls as 1/devices.
  "fsdp_tensor"  (1, -1, 2)  FSDP x 2-way tensor parallelism (heads, kv heads,
                             mlp and vocab split in two; Megatron style): for
                             models whose per-device activations or weight
                             all-gathers are too large for pure FSDP. Keep the
                             tensor axis inside a host (NVLink / ICI).
  "data"         (-1, 1, 1)  plain data parallelism: parameters replicated, the
                             batch split. Only for models (with optimizer state)
                             that fit on one device.

Multi-process runs (TPU pod, GPU cluster, `launch/local_multiprocess.py`).
`jax.devices()` lists every process's devices, grouped by process; the mesh
takes them in that order, so the batch axes (data, fsdp) are split across
processes first. Each process feeds `shard_batch` its own rows of the global
batch, process p the rows [p·B/n, (p+1)·B/n) (`DataIterator` does this), and
they land on its devices, so the global batch equals the one-process batch
(a TPU mesh laid out along the physical torus may interleave hosts: the global
batch is then a permutation of those rows, which sums over rows ignore).
`shard_batch` refuses a mesh that does not split the batch across processes,
e.g. (1, 1, 8) over two hosts, instead of silently mixing their batches.
`to_host` gathers a sharded result onto every process.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). Batch-like axes split over
# data and fsdp; weights are sharded over fsdp on their `embed` axis (ZeRO-3
# style) and over tensor on heads / mlp / vocab (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over ("data", "fsdp", "tensor"); one entry may be -1 (the rest)."""
  shape: tuple[int, int, int] = (1, -1, 1)
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __post_init__(self):
    shape = tuple(int(s) for s in self.shape)
    if len(shape) != 3:
      raise ValueError(f"MeshConfig.shape must have 3 entries for {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
      raise ValueError("MeshConfig.shape entries must be positive, with at most one -1; "
                       f"got {shape}")
    object.__setattr__(self, "shape", shape)
    rules = tuple((str(k), _as_axes(v)) for k, v in self.rules)
    for _, axes in rules:
      for a in axes or ():
        if a not in MESH_AXES:
          raise ValueError(f"MeshConfig.rules name mesh axis {a!r}; valid axes are {MESH_AXES}")
    object.__setattr__(self, "rules", rules)


# Named mesh shapes; see the module docstring for when to use which.
MESH_PRESETS: dict[str, tuple[int, int, int]] = {
    "fsdp": (1, -1, 1),
    "fsdp_tensor": (1, -1, 2),
    "data": (-1, 1, 1),
}


def mesh_preset(name: str, rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES) -> MeshConfig:
  """The `MeshConfig` of a named preset ("fsdp", "fsdp_tensor" or "data")."""
  if name not in MESH_PRESETS:
    raise ValueError(f"unknown mesh preset {name!r}; choose one of {tuple(MESH_PRESETS)}")
  return MeshConfig(shape=MESH_PRESETS[name], rules=rules)


def _as_axes(v) -> Optional[tuple[str, ...]]:
  if v is None:
    return None
  if isinstance(v, str):
    return (v,)
  return tuple(v)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  shape = list(shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh shape {tuple(shape)} uses {math.prod(shape)} devices but {num_devices} "
        "are available; use -1 for one axis to take the rest")
  return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor") over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(cfg.shape, len(devices))
  # Auto axes: XLA's sharding propagation, steered by `constrain` hints.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[Optional[str]], rules, mesh: Optional[Mesh] = None,
                    shape: Optional[Sequence[int]] = None) -> P:
  """PartitionSpec for logical axis names under `rules`.

  A mesh axis is used at most once per array; with `mesh` and `shape` given, a
  mesh axis that does not divide the dimension is dropped (that dimension is
  replicated over it) instead of failing, e.g. 2 kv heads on tensor=4.
  """
  rule_map = {k: _as_axes(v) for k, v in rules}
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = rule_map.get(name) if name is not None else None
    kept = []
    size = 1
    for a in axes or ():
      if a in used:
        continue
      if mesh is not None and shape is not None:
        if shape[i] % (size * mesh.shape[a]):
          continue
        size *= mesh.shape[a]
      kept.append(a)
      used.add(a)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*spec)


def tree_shardings(mesh: Mesh, rules, logical_tree, shape_tree):
  """NamedShardings for a pytree from its logical-axis tree and shapes."""
  def one(names, shaped):
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shaped.shape))
  return jax.tree.map(one, logical_tree, shape_tree,
                      is_leaf=lambda x: isinstance(x, tuple) and all(
                          isinstance(n, (str, type(None))) for n in x))


# ---------------------------------------------------------------------------
# Activation sharding constraints.
# ---------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxrl_llm_mesh_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Optional[Mesh], rules) -> Iterator[None]:
  """Within this context (while tracing), `constrain` pins activations."""
  token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh_rules() -> Optional[tuple[Mesh, tuple]]:
  """(mesh, rules) of the enclosing `activation_rules` context, or None."""
  return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without a mesh)."""
  active = active_mesh_rules()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Leading axis over the batch mesh axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch axis is split."""
  spec = logical_to_spec(("batch",), rules)[0]
  axes = (spec,) if isinstance(spec, str) else (spec or ())
  return math.prod(mesh.shape[a] for a in axes)


@functools.lru_cache(maxsize=64)
def _check_process_rows(mesh: Mesh, rules, global_rows: int) -> None:
  """Raise unless every process's devices hold a disjoint 1/n share of the batch rows."""
  procs = jax.process_count()
  shards = batch_shards(mesh, rules)
  if global_rows % shards:
    raise ValueError(f"a global batch of {global_rows} rows ({procs} processes x "
                     f"{global_rows // procs}) does not split into the {shards} batch shards of "
                     f"mesh {dict(mesh.shape)}; make the batch size a multiple of {shards}")
  sharding = batch_sharding(mesh, rules, 1)
  held: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((global_rows,)).items():
    held.setdefault(device.process_index, set()).update(range(global_rows)[index[0]])
  n = global_rows // procs
  for p in range(procs):
    got = len(held.get(p, ()))
    if got != n:
      raise ValueError(
          f"multi-process batch layout: each of the {procs} processes supplies {n} rows of "
          f"the global batch of {global_rows}, but mesh {dict(mesh.shape)} puts {got} rows "
          f"on the devices of process {p}. The batch axes (data, fsdp) must split the batch "
          f"across all {procs} processes: use a mesh whose data x fsdp size is a multiple "
          "of the process count, e.g. mesh_preset('fsdp'), built by make_mesh over "
          "jax.devices().")


def shard_batch(batch: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Put a host batch on the mesh, split along axis 0.

  With one process the arrays are the global batch. With several processes
  each passes its own slice, process p the rows [p·B/n, (p+1)·B/n) of the
  global batch of B rows (as `DataIterator` yields them), and the result is
  a global array (`jax.make_array_from_process_local_data`). The mesh must
  split the batch across processes (checked, see `_check_process_rows`).
  """
  procs = jax.process_count()

  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, x.ndim)
    if procs == 1:
      return jax.device_put(x, sharding)
    global_rows = x.shape[0] * procs
    _check_process_rows(mesh, tuple((k, _as_axes(v)) for k, v in rules), global_rows)
    return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])
  return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree: Any) -> Any:
  """Fetch a (possibly multi-host sharded) pytree to numpy on every process.

  Arrays that span several processes are all-gathered (a collective: every
  process must call this with the same tree); process-local values (numpy,
  arrays on this process's devices only) are fetched as they are, never
  concatenated with the other processes' copies.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(fetch, tree)


# ---------------------------------------------------------------------------
# Multi-process start-up.
# ---------------------------------------------------------------------------
DISTRIBUTED_MODES = ("auto", "on", "off")
_EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_init_args(env: Mapping[str, str], mode: str = "auto") -> Optional[dict]:
  """Keyword arguments for `jax.distributed.initialize`, or None for one process.

  mode "off": None. Otherwise, in this order:
    explicit   JAX_NUM_PROCESSES and JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS,
               "host:port" of process 0; set by launch/slurm_gpu.sbatch and
               launch/local_multiprocess.py) are passed as they are, with JAX's
               cluster detection off, so that it does not also pin each process
               to the one GPU of its SLURM_LOCALID (JAX_LOCAL_DEVICE_IDS, which
               JAX reads itself, selects local GPUs). One process: None.
    detected   a lone JAX_COORDINATOR_ADDRESS, a SLURM step of several tasks
               (`srun`: SLURM_NTASKS > 1 and SLURM_STEP_NODELIST), a TPU pod
               (TPU_WORKER_HOSTNAMES lists several hosts), or mode "on" (e.g.
               on TPU VMs, where JAX reads the topology from the metadata
               server): {} and JAX detects the rest.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"distributed mode {mode!r}; choose one of {DISTRIBUTED_MODES}")
  if mode == "off":
    return None
  if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
    missing = [k for k in _EXPLICIT_ENV if not env.get(k)]
    if missing:
      raise ValueError(f"multi-process run: {missing} not set; set all of {_EXPLICIT_ENV} "
                       "(or none of them, to let JAX detect the cluster)")
    num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    if not 0 <= process_id < num_processes:
      raise ValueError(f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES="
                       f"{num_processes})")
    if num_processes == 1:
      return None
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=num_processes, process_id=process_id,
                cluster_detection_method="deactivate")
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "on" or "JAX_COORDINATOR_ADDRESS" in env or slurm or tpu_pod:
    return {}
  return None


def maybe_initialize_distributed(mode: str = "auto",
                                 env: Optional[Mapping[str, str]] = None) -> bool:
  """`jax.distributed.initialize` per `distributed_init_args`; True if this call ran it.

  Call it first thing, before any other JAX call touches a device.
  """
  import os
  kwargs = distributed_init_args(os.environ if env is None else env, mode)
  if kwargs is None:
    return False
  is_initialized = getattr(jax.distributed, "is_initialized", lambda: False)
  if is_initialized():  # e.g. a second run in the same process
    return False
  jax.distributed.initialize(**kwargs)
  return True
