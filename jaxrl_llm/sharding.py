"""Device mesh, logical-axis rules and sharding helpers.

Model code names logical axes only (`embed`, `heads`, `act_batch`, ...). A
`MeshConfig` builds a mesh with axes ("data", "fsdp", "tensor") and maps the
logical names to mesh axes with `rules`. The same program then runs on one CPU,
one GPU, a GPU cluster or a TPU pod; only the mesh shape changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
      raise ValueError(f"MeshConfig.shape entries must be positive, with at most one -1; got {shape}")
    object.__setattr__(self, "shape", shape)
    rules = tuple((str(k), _as_axes(v)) for k, v in self.rules)
    for _, axes in rules:
      for a in axes or ():
        if a not in MESH_AXES:
          raise ValueError(f"MeshConfig.rules name mesh axis {a!r}; valid axes are {MESH_AXES}")
    object.__setattr__(self, "rules", rules)


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


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without a mesh)."""
  active = _ACTIVE.get()
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


def shard_batch(batch: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Put a host batch on the mesh, split along axis 0.

  With one process the arrays are the global batch. With several processes
  each passes its own slice (its rows of the global batch) and the result is
  a global array (`jax.make_array_from_process_local_data`).
  """
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rules, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree: Any) -> Any:
  """Fetch a (possibly multi-host sharded) pytree to numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def cast_floating(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
