"""Per-device memory planner: will a run fit before it is launched?

    plan = plan_memory(model_cfg, (1, -1, 1), num_devices=64, batch_size=64, group_size=8,
                       seq_len=1280, kv_cache_len=1280, prefill_len=256, reference=True)
    print(plan.table())
    check_fits(plan, 80 * 2**30)       # raises MemoryPlanError with the numbers

`plan_for_experiment(cfg, model_cfg, num_devices)` reads the sizes from an
`ExperimentConfig`. The numbers are estimates of the live bytes of one
device at the peak of a step; XLA's buffer assignment, fusion and runtime
overhead move them (compile the step and read `.memory_analysis()` for
XLA's own figure). `check_fits` keeps a margin for that.

Shape letters: L layers, D hidden, N query heads, K kv heads, H head dim,
F mlp hidden, V vocab, T training sequence length, S KV cache length, P
prefill length, c bytes of the compute dtype. Per device: b training rows of
one micro-batch (B_train / microbatches / batch shards), r rollout rows
(B_roll / batch shards); "/t" means divided by the tensor-axis size where the
rules shard that dimension over it (heads, kv heads, mlp, vocab), "/f" by the
fsdp size (the `embed` axis of weights).

Components (bytes per device):

  parameters        Σ_tensors shard_size × param bytes. Exact: every tensor of
                    `decoder.param_table` is sharded by the same logical rules
                    as in training (a mesh axis that does not divide a
                    dimension replicates it, as `logical_to_spec` does).
  optimizer state   moments × parameter elements per device × moment bytes.
                    Adam/AdamW: 2 moments (mu, nu) in the parameter dtype, as
                    optax keeps them: 2 float32 moments for float32 params.
  gradients         2 × parameter elements per device × param bytes: the
                    accumulator of `accumulate_gradients`' scan and the
                    current micro-batch's gradient, sharded like the params.
  reference params  one more copy of the parameters when a KL penalty or DPO
                    needs π_ref (never donated, so never reused).
  (LoRA)            under model.lora the parameters are the frozen base plus
                    the adapters; optimizer state and gradients count the
                    trainable elements (A, B) only, and there is no reference
                    copy (π_ref is the base with adapters off, `jaxrl_llm.lora`).
                    A quantized base (lora.quantize_base, `jaxrl_llm.quantize`)
                    counts its codes (int8: 1 byte, int4 / nf4: ½ byte per
                    element) plus float32 scales; its sampling copy keeps the
                    codes and casts only the scales.
  teacher params    distillation: the teacher's parameter shards (its own model
                    config, the same logical rules), never donated; its
                    forward runs without gradient and is not counted.
  critic state      PPO (rl.advantage="gae"): the value model's parameter
                    shards (its own config, the same logical rules) plus its
                    AdamW moments; a value head on the policy trunk is D + 1
                    elements; a LoRA policy's value model holds its own
                    adapters (as many as the policy's) plus the head, and
                    shares the policy's frozen base. Its gradients (2 × its elements, as above) join
                    the update phase, counted on top of the policy's (an upper
                    bound: the critic's update runs before the policy's in the
                    same minibatch). Its activations reuse the policy's (same
                    sizes for a critic copied from the policy; an HF value model
                    of another size is not covered), and its rollout-time value
                    forward runs without gradient and is not counted.
  KV cache          2 (k, v) × L × r × S × K/t × H × cache bytes (rollout only).
  rollout working   the sampling copy of the weights (cast to the compute
                    dtype and split per layer once per rollout, see
                    `decoder.decode_params`): parameter elements per device × c;
                    one layer of the prefill (no gradient): r × P × c ×
                    (3D + (N + 2K)·H/t + 3F/t) + attention scores r × N/t × P × S
                    × (4 + c) (float32 logits, probabilities) + last-position
                    logits r × V/t × 4.
  activations       residuals saved for the backward pass, per layer, times L
                    (the scanned layers save their inputs/outputs per step):
                      remat "full"           b·T·D·c (the layer input only)
                      remat "dots_no_batch"  b·T·c·(3D + (N + 2K)·H/t + 2F/t)
                                             (weight-matmul outputs: q, k, v,
                                             o-proj, gate, up, down)
                      remat "dots_no_batch_attention"  the above + b·T·N/t·(H·c + 4)
                                             (the fused attention's output and
                                             float32 softmax statistics)
                      remat "dots"           dots_no_batch + b·N/t·T·(T + H)·c
                                             (attention scores and P·V)
                      remat "none"           b·T·c·(6D + (2N + 3K)·H/t + 5F/t)
                                             + b·N/t·T²·(4 + c) (scores in
                                             float32 and probabilities)
                    plus the working set of one layer being differentiated
                    (the "none" figure for one layer) and the chunked
                    log-prob head: 3 × b × min(chunk, T) × V/t × 4 (float32
                    logits, softmax, their gradient).
  batch arrays      tokens, masks, sampling / old / reference log-probs and
                    advantages: 8 × 4 bytes per token of the r rollout rows.

Peak = parameters + optimizer + reference + batch arrays
       + max(KV cache + rollout working set, gradients + activations):
the one-jit step frees the KV cache after the rollout, and XLA reuses its
memory for the backward pass. Assumptions: the batch is split over the
mesh axes of the `act_batch` rule (data × fsdp), activations over tensor as
the `act_heads` / `act_mlp` / `act_vocab` rules say, attention is XLA's
(materialised T×S scores; a flash / cuDNN kernel needs less), layers run
under `lax.scan`, and transient copies of one parameter tensor (FSDP
all-gathers, the optimizer update) are small next to the rest.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Optional, Sequence, Union

import numpy as np

from jaxrl_llm import sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import DTYPES, ModelConfig

GiB = 2**30
# Optimizer moments per parameter (each in the moment dtype).
OPTIMIZER_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 0, "momentum": 1}
COMPONENTS = ("parameters", "optimizer state", "gradients", "reference params", "teacher params",
              "KV cache", "rollout working set", "activations", "batch arrays")
_ROLLOUT = ("KV cache", "rollout working set")
_UPDATE = ("gradients", "activations")
# PPO's learned critic (see "critic state" in the module docstring).
COMPONENTS += ("critic state", "critic gradients")
_UPDATE += ("critic gradients",)


def _bytes(dtype: Union[str, Any]) -> int:
  return int(np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype).itemsize)


def _fmt(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
    if n >= scale / 10:
      return f"{n / scale:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


class MemoryPlanError(ValueError):
  """The estimated peak memory of a plan does not fit the device."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Estimated bytes per device, by component (see the module docstring)."""
  components: dict[str, float]
  mesh_shape: tuple[int, int, int]
  description: str = ""
  notes: tuple[str, ...] = ()

  @property
  def static_bytes(self) -> float:
    """What lives through the whole step: params, optimizer, reference, batch."""
    return sum(v for k, v in self.components.items() if k not in _ROLLOUT + _UPDATE)

  @property
  def rollout_bytes(self) -> float:
    return sum(self.components.get(k, 0.0) for k in _ROLLOUT)

  @property
  def update_bytes(self) -> float:
    return sum(self.components.get(k, 0.0) for k in _UPDATE)

  @property
  def peak_bytes(self) -> float:
    """static + max(rollout phase, update phase)."""
    return self.static_bytes + max(self.rollout_bytes, self.update_bytes)

  @property
  def largest(self) -> str:
    """The largest component that counts toward the peak (the other phase's do not)."""
    off_peak = _UPDATE if self.rollout_bytes > self.update_bytes else _ROLLOUT
    return max((k for k in self.components if k not in off_peak), key=self.components.get)

  def table(self) -> str:
    """A printable table of the components and the peak."""
    d, f, t = self.mesh_shape
    head = (f"memory plan per device, mesh data={d} fsdp={f} tensor={t} "
            f"({d * f * t} devices)" + (f": {self.description}" if self.description else ""))
    width = max(len(k) for k in self.components) + 2
    rows = [head, "-" * len(head)]
    for name, value in self.components.items():
      phase = " (rollout)" if name in _ROLLOUT else " (update)" if name in _UPDATE else ""
      rows.append(f"  {name:<{width}}{_fmt(value):>12}{phase}")
    phase = "rollout" if self.rollout_bytes > self.update_bytes else "update"
    rows.append("-" * len(head))
    rows.append(f"  {'peak (estimate)':<{width}}{_fmt(self.peak_bytes):>12}  = static "
                f"{_fmt(self.static_bytes)} + {phase} phase "
                f"{_fmt(max(self.rollout_bytes, self.update_bytes))}")
    rows += [f"  note: {n}" for n in self.notes]
    return "\n".join(rows)

  def __str__(self) -> str:
    return self.table()


# ---------------------------------------------------------------------------
# Shards under the logical rules.
# ---------------------------------------------------------------------------
def _resolve_mesh(mesh, num_devices: Optional[int]) -> tuple[int, int, int]:
  if hasattr(mesh, "axis_names"):  # a jax Mesh
    return tuple(int(mesh.shape[a]) for a in sharding.MESH_AXES)
  shape = mesh.shape if isinstance(mesh, sharding.MeshConfig) else tuple(mesh)
  if -1 in shape:
    if num_devices is None:
      import jax
      num_devices = jax.device_count()
    shape = sharding.resolve_mesh_shape(shape, num_devices)
  elif num_devices is not None and math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {tuple(shape)} has {math.prod(shape)} devices, not "
                     f"num_devices={num_devices}")
  if len(shape) != 3 or any(int(s) < 1 for s in shape):
    raise ValueError(f"mesh shape must be 3 positive sizes over {sharding.MESH_AXES} "
                     f"(one may be -1), got {tuple(shape)}")
  return tuple(int(s) for s in shape)


class _Sharder:
  """Per-device element counts of logically named arrays on a mesh shape."""

  def __init__(self, mesh_shape, rules):
    self.mesh = types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, mesh_shape)))
    self.rules = rules

  def elems(self, names: Sequence[Optional[str]], shape: Sequence[int]) -> int:
    spec = sharding.logical_to_spec(names, self.rules, self.mesh, shape)
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      n *= -(-dim // math.prod(self.mesh.shape[a] for a in axes))
    return n

  def split(self, name: str, size: int) -> int:
    """How many ways a dimension of `size` named `name` is split."""
    return size // self.elems((name,), (size,))


def param_elems_per_device(model: ModelConfig, mesh_shape, rules=sharding.DEFAULT_RULES) -> int:
  """Parameter elements on one device (the largest shard where sizes do not divide)."""
  sh = _Sharder(mesh_shape, rules)
  return sum(sh.elems(names, shape) for shape, names in decoder.param_table(model).values())


def trainable_elems_per_device(model: ModelConfig, mesh_shape,
                               rules=sharding.DEFAULT_RULES) -> int:
  """Elements on one device of the leaves that train: all of them, or under LoRA
  (model.lora) the adapters A and B only (`lora.is_trainable`)."""
  from jaxrl_llm import lora
  sh = _Sharder(mesh_shape, rules)
  return sum(sh.elems(names, shape) for path, (shape, names) in decoder.param_table(model).items()
             if model.lora is None or lora.is_trainable(path))


def param_bytes_per_device(model: ModelConfig, mesh_shape, rules=sharding.DEFAULT_RULES,
                           float_bytes: Optional[int] = None) -> float:
  """Parameter bytes on one device: each leaf's shard × its dtype's bytes. A quantized
  frozen base (model.lora.quantize_base) counts its codes at their bits (int4 / nf4:
  half a byte) and its float32 scales; `float_bytes` replaces the bytes of every
  floating-point leaf (the sampling copy in the compute dtype)."""
  from jaxrl_llm import quantize
  return quantize.tree_bytes(decoder.param_shapes(model), decoder.param_logical_axes(model),
                             _Sharder(mesh_shape, rules).elems, float_bytes)


# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------
def plan_memory(model: ModelConfig, mesh: Any = (1, -1, 1), *, batch_size: int, seq_len: int,
                group_size: int = 1, oversample: int = 1, microbatches: int = 1,
                kv_cache_len: int = 0, kv_cache_dtype: Optional[str] = None,
                prefill_len: Optional[int] = None, reference: bool = False,
                teacher: Optional[ModelConfig] = None,
                critic: Optional[ModelConfig] = None, critic_head_only: bool = False,
                critic_adapters: bool = False,
                optimizer: str = "adamw", moment_dtype: Optional[str] = None,
                logprob_chunk: int = 512, rules=None, num_devices: Optional[int] = None,
                description: str = "") -> MemoryPlan:
  """Estimated per-device bytes of one training step (formulas: module docstring).

  Args:
    model: the model config (its dtype, param_dtype and remat are used).
    mesh: (data, fsdp, tensor) sizes (one may be -1), a `MeshConfig` or a Mesh.
    batch_size: global prompts (RL), sequences (SFT) or pairs (DPO) per step.
    seq_len: T, tokens of one training row (RL: prompt + max_new_tokens).
    group_size: rows per batch entry: RL completions per prompt, 2 for DPO's
      chosen and rejected rows, 1 for SFT.
    oversample: DAPO dynamic sampling: 1 in `oversample` sampled groups is
      trained on.
    microbatches: sequential gradient chunks per optimizer step (RL:
      minibatches × microbatches).
    kv_cache_len: S of the rollout's KV cache; 0 when the step samples nothing.
    kv_cache_dtype: default the compute dtype.
    prefill_len: prompt tokens run through the prefill; default kv_cache_len.
    reference: a reference copy of the parameters is held (KL, DPO).
    teacher: distillation: the teacher's model config (its params are held).
    critic: PPO: the value model's config (its params, moments and gradients
      are held); with `critic_head_only`, the config whose trunk a scalar
      value head reads (D + 1 elements); with `critic_adapters`, a LoRA policy's
      config whose frozen base the critic's own adapters (as many as the
      policy's) and head read.
    optimizer: a key of OPTIMIZER_MOMENTS.
    moment_dtype: optimizer moment dtype; default the parameter dtype (optax).
    logprob_chunk: time chunk of the float32 log-prob head.
    rules: logical-axis rules; default `sharding.DEFAULT_RULES` (or the mesh
      config's rules).
    num_devices: resolves a -1 in `mesh`; default `jax.device_count()`.
    description: a label for the table.
  """
  if optimizer not in OPTIMIZER_MOMENTS:
    raise ValueError(f"optimizer={optimizer!r}; choose one of {tuple(OPTIMIZER_MOMENTS)}")
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                      ("group_size", group_size), ("oversample", oversample),
                      ("microbatches", microbatches), ("logprob_chunk", logprob_chunk)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"plan_memory: {name} must be a positive int, got {value!r}")
  if kv_cache_len < 0:
    raise ValueError(f"plan_memory: kv_cache_len must be >= 0, got {kv_cache_len}")
  if rules is None:
    rules = mesh.rules if isinstance(mesh, sharding.MeshConfig) else sharding.DEFAULT_RULES
  mesh_shape = _resolve_mesh(mesh, num_devices)
  sh = _Sharder(mesh_shape, rules)
  notes = []

  L, D, F, V = model.num_layers, model.hidden_size, model.intermediate_size, model.vocab_size
  N, K, H = model.num_heads, model.num_kv_heads, model.resolved_head_dim
  c = _bytes(model.dtype)
  p_bytes = _bytes(model.param_dtype)
  m_bytes = _bytes(moment_dtype or model.param_dtype)
  t_heads, t_kv = sh.split("act_heads", N), sh.split("kv_heads", K)
  t_mlp, t_vocab = sh.split("act_mlp", F), sh.split("act_vocab", V)

  out: dict[str, float] = {}
  # PARAMETERS, OPTIMIZER, GRADIENTS, REFERENCE: exact shards of every tensor.
  p_elems = param_elems_per_device(model, mesh_shape, rules)
  # LoRA: the frozen base and the adapters are the parameters; moments and gradients are the
  # adapters' only, and the reference is the frozen base (no copy).
  t_elems = trainable_elems_per_device(model, mesh_shape, rules)
  out["parameters"] = param_bytes_per_device(model, mesh_shape, rules)
  out["optimizer state"] = OPTIMIZER_MOMENTS[optimizer] * t_elems * m_bytes
  out["gradients"] = 2 * t_elems * p_bytes
  if reference and model.lora is None:
    out["reference params"] = p_elems * p_bytes
  if model.lora is not None:
    notes.append(f"LoRA: {_fmt(t_elems * p_bytes)} of adapters train on a frozen base of "
                 f"{_fmt(out['parameters'] - t_elems * p_bytes)}" +
                 ("; the reference is the base with adapters off (no copy)" if reference else ""))
  if teacher is not None:
    out["teacher params"] = (param_elems_per_device(teacher, mesh_shape, rules)
                             * _bytes(teacher.param_dtype))
  if critic is not None:  # a value model trains in full; a LoRA one its adapters and head
    head_bytes = (sh.elems(("embed",), (critic.hidden_size,)) + 1) * 4  # float32 w (embed), b
    if critic_head_only:
      c_bytes = head_bytes
    elif critic_adapters:
      c_bytes = trainable_elems_per_device(critic, mesh_shape, rules) * p_bytes + head_bytes
    else:
      c_bytes = param_elems_per_device(critic, mesh_shape, rules) * _bytes(critic.param_dtype)
    out["critic state"] = c_bytes * (1 + OPTIMIZER_MOMENTS[optimizer])
    out["critic gradients"] = 2 * c_bytes

  # ROLLOUT: the KV cache and one prefill layer.
  roll_rows = batch_size * group_size
  r = sh.elems(("act_batch",), (roll_rows,))
  if kv_cache_len:
    S = kv_cache_len
    P = prefill_len or S
    kv_dt = _bytes(kv_cache_dtype or model.dtype)
    kv_elems = sh.elems(("layers", "act_batch", None, "kv_heads", None), (L, roll_rows, S, K, H))
    out["KV cache"] = 2 * kv_elems * kv_dt
    out["rollout working set"] = (
        param_bytes_per_device(model, mesh_shape, rules, float_bytes=c)
        + r * P * c * (3 * D + (N / t_heads + 2 * K / t_kv) * H + 3 * F / t_mlp)
        + r * (N / t_heads) * P * S * (4 + c) + r * (V / t_vocab) * 4)

  # UPDATE: saved residuals of the scanned layers + one layer's working set + the head.
  train_rows = roll_rows // oversample
  per_micro = -(-train_rows // microbatches)
  b = sh.elems(("act_batch",), (per_micro,))
  if train_rows % microbatches:
    notes.append(f"{train_rows} training rows do not split into {microbatches} micro-batches")
  T = seq_len
  proj = (N / t_heads + 2 * K / t_kv) * H
  full_layer = b * T * c * (6 * D + (2 * N / t_heads + 3 * K / t_kv) * H + 5 * F / t_mlp) \
      + b * (N / t_heads) * T * T * (4 + c)
  saved = {
      "full": b * T * D * c,
      "dots_no_batch": b * T * c * (3 * D + proj + 2 * F / t_mlp),
      "dots_no_batch_attention": b * T * c * (3 * D + proj + 2 * F / t_mlp)
      + b * T * (N / t_heads) * (H * c + 4),
      "dots": b * T * c * (3 * D + proj + 2 * F / t_mlp) + b * (N / t_heads) * T * (T + H) * c,
      "none": full_layer,
  }[model.remat]
  head = 3 * b * min(logprob_chunk, T) * (V / t_vocab) * 4
  out["activations"] = L * saved + full_layer + head
  out["batch arrays"] = 8 * 4 * r * max(seq_len, kv_cache_len)
  if model.remat == "none" and out["activations"] > out["parameters"] + out["optimizer state"]:
    notes.append("activations dominate: remat='full' (or 'dots_no_batch') trades compute for "
                 "memory")
  ordered = {k: float(out[k]) for k in COMPONENTS if k in out}
  return MemoryPlan(ordered, mesh_shape, description, tuple(notes))


def _critic_args(rl, model: ModelConfig) -> dict[str, Any]:
  """plan_memory's critic arguments of an RL config: none unless rl.advantage="gae"."""
  if rl.advantage != "gae":
    return {}
  from jaxrl_llm.rl import critic as critic_lib
  return dict(critic=critic_lib.value_model_config(rl.critic, model),
              critic_head_only=rl.critic.value_head,
              critic_adapters=model.lora is not None and rl.critic.init == "policy")


def plan_for_experiment(cfg, model: ModelConfig, num_devices: Optional[int] = None,
                        teacher: Optional[ModelConfig] = None) -> MemoryPlan:
  """The plan of an `ExperimentConfig` run (kinds "rl", "sft" and the preference kinds)."""
  data, mesh = cfg.data, cfg.mesh
  common = dict(rules=mesh.rules, num_devices=num_devices,
                description=f"{cfg.kind}, {model.num_params() / 1e6:.1f}M params, "
                            f"remat={model.remat}")
  if cfg.kind == "rl":
    rl = cfg.rl
    seq = data.max_prompt_len + rl.max_new_tokens
    plan = plan_memory(model, mesh, batch_size=data.batch_size, seq_len=seq,
                       group_size=rl.group_size, oversample=rl.oversample,
                       microbatches=rl.minibatches * rl.microbatches, kv_cache_len=seq,
                       prefill_len=data.max_prompt_len, reference=rl.needs_reference,
                       logprob_chunk=rl.logprob_chunk, **_critic_args(rl, model), **common)
    if rl.update_shared_prompt:
      plan = dataclasses.replace(plan, notes=plan.notes + (
          "rl.update_shared_prompt: the update's activations are counted per row (prompt "
          "and completion); it runs each group's prompt once, so they are an upper bound",))
    return plan
  if cfg.kind == "distill":  # the student's step of its mode, plus the teacher's params
    d, rl = cfg.distill, cfg.rl
    if d.mode == "kd":
      return plan_memory(model, mesh, batch_size=data.batch_size, seq_len=data.seq_len,
                         microbatches=cfg.trainer.microbatches, teacher=teacher,
                         logprob_chunk=d.logit_chunk, **common)
    if d.mode == "gkd":
      seq = data.max_prompt_len + max(d.max_new_tokens, data.max_answer_len)
      return plan_memory(model, mesh, batch_size=data.batch_size, seq_len=seq,
                         microbatches=cfg.trainer.microbatches, teacher=teacher,
                         kv_cache_len=data.max_prompt_len + d.max_new_tokens,
                         prefill_len=data.max_prompt_len, logprob_chunk=d.logit_chunk, **common)
    seq = data.max_prompt_len + rl.max_new_tokens
    return plan_memory(model, mesh, batch_size=data.batch_size, seq_len=seq,
                       group_size=rl.group_size, oversample=rl.oversample,
                       microbatches=rl.minibatches * rl.microbatches, kv_cache_len=seq,
                       prefill_len=data.max_prompt_len, reference=rl.needs_reference,
                       teacher=teacher, logprob_chunk=rl.logprob_chunk, **common)
  if cfg.kind == "sft":
    return plan_memory(model, mesh, batch_size=data.batch_size, seq_len=data.seq_len,
                       microbatches=cfg.trainer.microbatches, **common)
  # Preference kinds: chosen and rejected rows of every pair, with a reference.
  return plan_memory(model, mesh, batch_size=data.batch_size,
                     seq_len=data.max_prompt_len + data.max_completion_len, group_size=2,
                     microbatches=cfg.trainer.microbatches, reference=True,
                     kv_cache_len=(data.max_prompt_len + data.max_completion_len
                                   if cfg.kind in ("online_dpo", "iterative_dpo") else 0),
                     **common)


def device_memory_bytes(device=None) -> Optional[int]:
  """The memory limit of a device (default: the first local one); None if unknown (CPU)."""
  import jax
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


_ADVICE = {
    "parameters": "shard the weights over more devices (a larger fsdp axis, "
                  "mesh_preset('fsdp')) or store them in bfloat16 (model.param_dtype)",
    "optimizer state": "shard over more devices (a larger fsdp axis); keep moments in a "
                       "smaller dtype",
    "gradients": "shard over more devices (a larger fsdp axis)",
    "reference params": "precompute reference log-probs, or drop the KL term (kl_coef=0)",
    "teacher params": "shard the teacher over more devices (a larger fsdp axis) or store it in "
                      "bfloat16 (distill.teacher_dtype)",
    "KV cache": "fewer prompts or completions per step, a shorter max_new_tokens, a bfloat16 "
                "KV cache, or tensor parallelism over kv heads",
    "rollout working set": "fewer or shorter prompts per step",
    "activations": "model.remat='full', more micro-batches, or tensor parallelism "
                   "(mesh_preset('fsdp_tensor'))",
    "batch arrays": "fewer or shorter rows per step",
    "critic state": "a value head on the policy trunk (rl.critic.init='value_head') instead of "
                    "a value model, or shard over more devices (a larger fsdp axis)",
    "critic gradients": "a value head on the policy trunk (rl.critic.init='value_head'), or "
                        "shard over more devices (a larger fsdp axis)",
}


def check_fits(plan: MemoryPlan, device_bytes: float, *, usable_fraction: float = 0.9
               ) -> MemoryPlan:
  """Raise `MemoryPlanError` unless plan.peak_bytes <= usable_fraction × device_bytes.

  `usable_fraction` leaves room for what the estimate leaves out (XLA
  temporaries, fragmentation, the runtime). Returns the plan when it fits.
  """
  if not 0 < usable_fraction <= 1:
    raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction}")
  usable = usable_fraction * device_bytes
  if plan.peak_bytes <= usable:
    return plan
  largest = plan.largest
  parts = ", ".join(f"{k} {_fmt(v)}" for k, v in plan.components.items())
  raise MemoryPlanError(
      f"the run does not fit: estimated peak {_fmt(plan.peak_bytes)} per device > "
      f"{_fmt(usable)} usable ({usable_fraction:.0%} of {_fmt(device_bytes)}), over by "
      f"{_fmt(plan.peak_bytes - usable)}. Per device: {parts}. Largest: {largest} "
      f"({_fmt(plan.components[largest])}): {_ADVICE[largest]}.\n{plan.table()}")
