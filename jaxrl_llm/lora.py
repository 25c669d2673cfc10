"""Low-rank adapters (LoRA, PiSSA) as a pure transform of the parameter pytree.

A projection W of shape [in..., out...] (layers stacked on a leading L axis)
gets two extra leaves next to it in `params["layers"]`:

  <name>_lora_a  [L, in..., R]     <name>_lora_b  [L, R, out...]

and the decoder computes  y = x·W + s · (x·A)·B,  s = alpha / rank
(Hu et al. 2021, "LoRA"). The base W and everything else (embeddings, norms,
biases) stay frozen: `accumulate_gradients` differentiates only the trainable
leaves and `freeze_base(tx)` keeps optimizer state for them alone, so every
training step (SFT, RL, DPO, online DPO, reward models) trains adapters
without a change.

Initialisations:
  "gaussian"  A ~ N(0, 1/R²) (standard deviation 1/R, as peft's "gaussian"),
              B = 0: the adapted model equals the base model at step 0.
  "pissa"     Meng et al. 2024, "PiSSA": with W = U S Vᵀ (per layer, W
              flattened to [in, out]),  A = U_r √(S_r / s),  B = √(S_r / s) V_rᵀ,
              and the frozen base becomes the residual W − s·A·B, so that
              base + s·A·B = W at initialisation. The starting adapters are
              kept as frozen leaves (<name>_lora_a0 / _lora_b0, rank-R only),
              so the reference policy (the starting model) needs no second
              copy of the weights.

Reference policy (`reference_params`): the same params with the adapters at
their starting values: the base alone for "gaussian" (B₀ = 0), residual +
A₀B₀ for "pissa". `merge` folds the adapters into the weights (merged
rollout weights with `merged_rollout`, merged export through `save_hf`).

Dropout (SFT only): the adapter input is x·m/(1 − p), m ~ Bernoulli(1 − p),
one mask per projection (`dropout_fn`); the base path sees x unchanged.
Checkpoints: `AdapterOnlyCheckpointer` (adapter_only_checkpoints) saves the
trainable leaves only. Hugging Face PEFT adapters in and out:
`jaxrl_llm.models.peft`. A quantized frozen base (QLoRA-style,
lora.quantize_base): `jaxrl_llm.quantize`. User guide: docs/lora.md.

Shape letters: L layers, R rank; in... / out... the projection's own axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
import qwix

from jaxrl_llm import decode_matmul as decode_matmul_lib
from jaxrl_llm import tree_paths

Params = dict[str, Any]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Hugging Face module names accepted for the targets (peft's target_modules).
HF_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
            "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
INITS = ("gaussian", "pissa")
# Storage of the frozen projection weights (`jaxrl_llm.quantize`): float, or quantized by qwix.
QUANTIZE_BASE = ("none", "int8", "int4", "nf4")
# Input axes of each projection after the layer axis: o is [N, H] -> D.
IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
A0_SUFFIX, B0_SUFFIX = "_lora_a0", "_lora_b0"
_SUFFIXES = (A_SUFFIX, B_SUFFIX, A0_SUFFIX, B0_SUFFIX)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the decoder's projections.

  Attributes:
    rank: adapter rank R; 0 turns LoRA off (full-parameter training).
    alpha: the update is scaled by alpha / rank.
    dropout: dropout on the adapter input (x·A uses dropout(x)); training-time
      only, in SFT steps (RL and preference steps compare log-probs of the same
      function at rollout and update time, so they refuse it).
    target_modules: projections that get adapters, among TARGETS (q, k, v, o,
      gate, up, down); Hugging Face names (q_proj, ...) are accepted too.
    init: "gaussian" (B = 0, the model starts as the base) or "pissa"
      (principal singular vectors in the adapter, the residual in the base).
    adapter_only_checkpoints: checkpoints hold the adapters and their optimizer
      state only; a resumed run reads the frozen base from the model source.
    merged_rollout: RL rollouts sample from merged weights W + s·A·B, formed once
      per rollout in the compute dtype, instead of the unmerged low-rank path
      (x·W + s·(x·A)·B at every decoded token); see benchmarks/lora_bench.py.
    full_sft_warmstart: the run's trainer.sft_warmstart stage trains all weights
      (adapters then start on the warm-started base: the way to LoRA-train a
      randomly initialised built-in model); False trains adapters there too.
    quantize_base: "none", or the frozen projection weights stored quantized
      (QLoRA-style, `jaxrl_llm.quantize`): "int8" (per output channel), "int4"
      or "nf4" (4-bit NormalFloat; both per block of quantize_block_size inputs).
      Needs adapter_only_checkpoints=True (the base is re-quantized on resume).
    quantize_block_size: elements per scale block of the 4-bit kinds (QLoRA: 64).
  """
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  init: str = "gaussian"
  adapter_only_checkpoints: bool = False
  merged_rollout: bool = False
  full_sft_warmstart: bool = True
  quantize_base: str = "none"
  quantize_block_size: int = 64

  def __post_init__(self):
    if isinstance(self.target_modules, str):
      object.__setattr__(self, "target_modules", (self.target_modules,))
    names = tuple(HF_NAMES.get(t, t) for t in self.target_modules)
    object.__setattr__(self, "target_modules", names)
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      raise ValueError(f"lora.rank={self.rank!r} must be an int >= 1 (0 turns LoRA off)")
    if self.quantize_base not in QUANTIZE_BASE:
      raise ValueError(f"lora.quantize_base={self.quantize_base!r}; choose one of {QUANTIZE_BASE}")
    if not self.enabled and self.quantize_base != "none":
      raise ValueError(f"lora.quantize_base={self.quantize_base!r} needs LoRA: a quantized base "
                       "must stay frozen, and lora.rank=0 trains all weights. Set lora.rank "
                       "(e.g. 16) to train adapters on it, or lora.quantize_base='none'")
    if not self.enabled:
      defaults = {f.name: f.default for f in dataclasses.fields(self)}
      if any(getattr(self, k) != v for k, v in defaults.items() if k != "target_modules"):
        raise ValueError("lora.rank=0 turns LoRA off, but other lora fields are set: set "
                         "lora.rank to the adapter rank (e.g. 16) to train adapters")
      return
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
      raise ValueError(f"lora.target_modules: unknown module(s) {unknown}; choose among "
                       f"{TARGETS} (or their Hugging Face names {tuple(HF_NAMES)})")
    if not names:
      raise ValueError("lora.target_modules is empty: name at least one projection among "
                       f"{TARGETS}")
    if len(set(names)) != len(names):
      raise ValueError(f"lora.target_modules={names} names a module twice")
    if not 0 < float(self.alpha) < float("inf"):
      raise ValueError(f"lora.alpha={self.alpha!r} must be a finite number > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
    if self.init not in INITS:
      raise ValueError(f"lora.init={self.init!r}; choose one of {INITS}")
    if (not isinstance(self.quantize_block_size, int) or isinstance(self.quantize_block_size, bool)
        or self.quantize_block_size < 1):
      raise ValueError(f"lora.quantize_block_size={self.quantize_block_size!r} must be an int "
                       ">= 1 (QLoRA uses 64)")
    if self.quantize_base != "none" and not self.adapter_only_checkpoints:
      raise ValueError(f"lora.quantize_base={self.quantize_base!r} needs "
                       "lora.adapter_only_checkpoints=True: checkpoints do not store a quantized "
                       "base; adapter-only checkpoints re-read the base from the model source and "
                       "re-quantize it on resume")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """s = alpha / rank, the factor on the low-rank update."""
    return float(self.alpha) / self.rank

  def replace(self, **changes) -> "LoraConfig":
    return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# Names and the parameter table.
# ---------------------------------------------------------------------------


def is_adapter(path: str) -> bool:
  """Any adapter leaf (trainable A/B or the frozen PiSSA starting copies)."""
  return path.endswith(_SUFFIXES)


def is_trainable(path: str) -> bool:
  """Trainable under LoRA: the adapters A and B, and leaves that are not part of the
  decoder (e.g. a reward model's "head")."""
  if path.endswith((A_SUFFIX, B_SUFFIX)):
    return True
  if path.endswith((A0_SUFFIX, B0_SUFFIX)):
    return False
  return path.split("/")[-1] not in _BASE_NAMES


# Leaf names of the decoder (`decoder.param_table`): frozen under LoRA.
_BASE_NAMES = frozenset((
    "embed", "lm_head", "final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm",
    "q_bias", "k_bias", "v_bias") + TARGETS)


def has_adapters(params: Any) -> bool:
  """Whether a params pytree (nested dicts) carries LoRA adapters."""
  if not isinstance(params, Mapping):
    return False
  return any(path.endswith((A_SUFFIX, B_SUFFIX)) for path in tree_paths.flatten(params))


def adapter_table(base_table: Mapping[str, tuple[tuple[int, ...], tuple]], lora: LoraConfig
                  ) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """(shape, logical axes) of every adapter leaf, from the base `param_table`.

  A: [L, in..., R] with the projection's input axes; B: [L, R, out...] with its
  output axes; the rank axis is never sharded.
  """
  out = {}
  for name in lora.target_modules:
    shape, axes = base_table[f"layers/{name}"]
    n_in = IN_AXES[name]
    a = (shape[:1 + n_in] + (lora.rank,), axes[:1 + n_in] + (None,))
    b = (shape[:1] + (lora.rank,) + shape[1 + n_in:], axes[:1] + (None,) + axes[1 + n_in:])
    out[f"layers/{name}{A_SUFFIX}"] = a
    out[f"layers/{name}{B_SUFFIX}"] = b
    if lora.init == "pissa":
      out[f"layers/{name}{A0_SUFFIX}"] = a
      out[f"layers/{name}{B0_SUFFIX}"] = b
  return out


def adapter_count(base_table, lora: LoraConfig) -> tuple[int, int]:
  """(trainable adapter elements, frozen starting-copy elements) of the whole model."""
  trainable = frozen = 0
  for path, (shape, _) in adapter_table(base_table, lora).items():
    n = int(jnp.prod(jnp.array(shape)))
    if path.endswith((A0_SUFFIX, B0_SUFFIX)):
      frozen += n
    else:
      trainable += n
  return trainable, frozen


# ---------------------------------------------------------------------------
# Pure transforms of the params.
# ---------------------------------------------------------------------------
def _as_matrix(w: jax.Array, n_in: int) -> jax.Array:
  """[L, in..., out...] -> [L, prod(in), prod(out)]."""
  L = w.shape[0]
  n = 1
  for d in w.shape[1:1 + n_in]:
    n *= d
  return w.reshape(L, n, -1)


def add_adapters(lora: LoraConfig, params: Params, rng: jax.Array) -> Params:
  """The params with adapters on `lora.target_modules` (see the module docstring).

  For "pissa" the targeted weights are replaced by their residual W − s·A·B
  (computed in float32, stored in the weight's dtype). Pure: returns a new
  tree and leaves `params` as it is. Adapters take each weight's dtype.
  """
  if not lora.enabled:
    return params
  if has_adapters(params):
    raise ValueError("add_adapters: these params already carry LoRA adapters")
  layers = dict(params["layers"])
  missing = [t for t in lora.target_modules if t not in layers]
  if missing:
    raise ValueError(f"add_adapters: params have no projection(s) {missing}")
  keys = jax.random.split(rng, len(lora.target_modules))
  for key, name in zip(keys, lora.target_modules):
    w = layers[name]
    n_in = IN_AXES[name]
    in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
    L, R = w.shape[0], lora.rank
    if lora.init == "gaussian":
      a = jax.random.normal(key, (L, *in_shape, R), jnp.float32) / R
      b = jnp.zeros((L, R, *out_shape), jnp.float32)
    else:
      w_LIO = _as_matrix(w.astype(jnp.float32), n_in)
      if R > min(w_LIO.shape[1:]):
        raise ValueError(f"lora.rank={R} exceeds the rank of the {name} projection "
                         f"{w_LIO.shape[1:]}: PiSSA needs rank <= {min(w_LIO.shape[1:])}")
      u_LIK, s_LK, vh_LKO = _svd_per_layer(w_LIO)
      root_LR = jnp.sqrt(s_LK[:, :R] / lora.scale)
      a_LIR = u_LIK[:, :, :R] * root_LR[:, None, :]
      b_LRO = root_LR[:, :, None] * vh_LKO[:, :R, :]
      residual = w_LIO - lora.scale * jnp.einsum("LIR,LRO->LIO", a_LIR, b_LRO)
      layers[name] = residual.reshape(w.shape).astype(w.dtype)
      a = a_LIR.reshape(L, *in_shape, R)
      b = b_LRO.reshape(L, R, *out_shape)
      layers[name + A0_SUFFIX] = a.astype(w.dtype)
      layers[name + B0_SUFFIX] = b.astype(w.dtype)
    layers[name + A_SUFFIX] = a.astype(w.dtype)
    layers[name + B_SUFFIX] = b.astype(w.dtype)
  return dict(params, layers=layers)


def _svd_per_layer(w_LIO: jax.Array):
  """Thin SVD of each layer's matrix, one layer at a time: (U_LIK, S_LK, Vh_LKO).

  One 2-D SVD per `lax.map` step instead of one batched SVD: on CPU, jaxlib's
  batched LAPACK SVD splits the batch over XLA's intra-op thread pool and
  waits for the pieces from a thread of that same pool. With a computation
  running on several CPU devices at once, every thread of the pool can end up
  waiting, and the program hangs (seen with 8 CPU devices, jax 0.10.2). One
  layer at a time also keeps the SVD workspace to one matrix.
  """
  return jax.lax.map(lambda w_IO: jnp.linalg.svd(w_IO, full_matrices=False), w_LIO)


def base_params(params: Params) -> Params:
  """The params without any adapter leaf (the frozen base: the model with adapters off)."""
  flat = {k: v for k, v in tree_paths.flatten(params).items() if not is_adapter(k)}
  return tree_paths.unflatten(flat)


def reference_params(params: Params) -> Params:
  """The starting model as params that share the frozen base (no copy of it).

  "gaussian": the base alone (B₀ = 0). "pissa": the residual base with the
  frozen starting adapters A₀, B₀ in place of the trained ones.
  """
  flat = tree_paths.flatten(params)
  out = {}
  for path, value in flat.items():
    if path.endswith((A0_SUFFIX, B0_SUFFIX)):
      out[path[:-1]] = value  # _lora_a0 -> _lora_a
    elif path.endswith((A_SUFFIX, B_SUFFIX)):
      continue
    else:
      out[path] = value
  return tree_paths.unflatten(out)


def reference_or(ref_params: Optional[Params], params: Params) -> Optional[Params]:
  """`ref_params` when given; else the adapters' starting model when `params` carry
  adapters (see `reference_params`); else None."""
  if ref_params is not None:
    return ref_params
  if has_adapters(params):
    return reference_params(params)
  return None


def merge(params: Params, scale: float, dtype=None) -> Params:
  """Adapters folded into the weights: W + s·A·B, adapter leaves dropped.

  The product is formed in float32 and stored in `dtype` (default: each
  weight's own dtype), e.g. merged bf16 weights for rollout or export. A
  quantized base weight (`jaxrl_llm.quantize`) is dequantized (float32 by default).
  """
  flat = tree_paths.flatten(params)
  out = {}
  for path, value in flat.items():
    if is_adapter(path):
      continue
    if isinstance(value, qwix.QArray):
      value = qwix.dequantize(value.astype(dtype or jnp.float32))
    a = flat.get(path + A_SUFFIX)
    if a is not None:
      name = path.split("/")[-1]
      n_in = IN_AXES[name]
      b = flat[path + B_SUFFIX]
      delta = jnp.einsum("LIR,LRO->LIO", _as_matrix(a.astype(jnp.float32), n_in),
                         b.astype(jnp.float32).reshape(b.shape[0], b.shape[1], -1))
      value = (value.astype(jnp.float32) + scale * delta.reshape(value.shape)).astype(
          dtype or value.dtype)
    elif dtype is not None and "norm" not in path:
      value = value.astype(dtype)
    out[path] = value
  return tree_paths.unflatten(out)


def adapter_params(params: Params) -> Params:
  """The trainable adapters A and B alone, nested as in `params` (no PiSSA starting
  copies, no base weight)."""
  return tree_paths.unflatten({k: v for k, v in tree_paths.flatten(params).items()
                               if k.endswith((A_SUFFIX, B_SUFFIX))})


def with_adapters(params: Params, adapters: Params) -> Params:
  """`params` with its trainable adapters A and B replaced by `adapters` (the same
  paths, e.g. from `adapter_params`); every other leaf is shared, not copied."""
  flat = tree_paths.flatten(params)
  new = tree_paths.flatten(adapters)
  unknown = sorted(k for k in new if not (k in flat and k.endswith((A_SUFFIX, B_SUFFIX))))
  if unknown:
    raise ValueError(f"with_adapters: {unknown} are not trainable adapter leaves of the params "
                     "(the adapters must come from a model with the same model.lora settings)")
  return tree_paths.unflatten({**flat, **new})


def split_trainable(params: Params) -> tuple[Params, Params]:
  """(trainable leaves, frozen leaves) as two nested dicts (see `is_trainable`)."""
  trainable, frozen = {}, {}
  for path, value in tree_paths.flatten(params).items():
    (trainable if is_trainable(path) else frozen)[path] = value
  return tree_paths.unflatten(trainable), tree_paths.unflatten(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
  """Inverse of `split_trainable`."""
  return tree_paths.unflatten({**tree_paths.flatten(frozen), **tree_paths.flatten(trainable)})


def trainable_params(params: Params) -> Params:
  return split_trainable(params)[0]


def freeze_base(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the trainable leaves only; zero updates and no state for the frozen ones.

  The optimizer state has the structure of `trainable_params(params)`
  (Adam moments of the adapters only). Frozen leaves get zero updates; the
  steps never compute their gradients (`train_state.accumulate_gradients`).
  """
  def init(params):
    return tx.init(trainable_params(params))

  def update(grads, state, params=None):
    g_train, g_frozen = split_trainable(grads)
    p_train = None if params is None else trainable_params(params)
    updates, state = tx.update(g_train, state, p_train)
    return combine(updates, jax.tree.map(jnp.zeros_like, g_frozen)), state

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------
# Forward pass helper (used by the decoder).
# ---------------------------------------------------------------------------
def dropout_fn(lora: LoraConfig, key: jax.Array, name: str) -> Optional[Callable]:
  """Inverted dropout on the adapter input of projection `name` (None when off):

    x ↦ x · m / (1 − p),  m ~ Bernoulli(1 − p) elementwise,  p = lora.dropout

  (Hu et al. 2021 apply dropout to the LoRA branch only; the base path sees x.)
  Each projection folds its own index into `key`, so q, k and v, which share
  an input, get independent masks.
  """
  if lora.dropout <= 0:
    return None
  key = jax.random.fold_in(key, TARGETS.index(name))
  keep = 1.0 - lora.dropout

  def apply(x):
    m = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(m, x / keep, jnp.zeros((), x.dtype)).astype(x.dtype)
  return apply


def projection(eq: str, x: jax.Array, lp: Mapping[str, jax.Array], name: str, dtype,
               scale: Optional[float], dropout_fn: Optional[Callable] = None,
               decode_matmul: str = "xla") -> jax.Array:
  """einsum(eq, x, W) + s·((x·A)·B) when `lp` holds adapters for `name` (unmerged path).

  `decode_matmul` ("xla" / "pallas" / "pallas_interpret", `ModelConfig`): with
  a Pallas choice, a one-token x (decode step) takes the base product through
  `decode_matmul.project`.

  `eq` is the base projection, e.g. "BTD,DNH->BTNH": the letters of W that
  also appear in x are its inputs (contracted by A), the rest its outputs.
  """
  w = lp[name].astype(dtype)  # a quantized base (qwix.QArray) is dequantized in the matmul
  if isinstance(w, qwix.QArray):
    y = qwix.einsum(eq, x, w)
  elif decode_matmul in ("pallas", "pallas_interpret") and x.shape[1] == 1:
    y = decode_matmul_lib.project(eq, x, w, interpret=decode_matmul == "pallas_interpret")
  else:
    y = jnp.einsum(eq, x, w)
  a = lp.get(name + A_SUFFIX)
  if a is None:
    return y
  if scale is None:
    raise ValueError(f"the params carry LoRA adapters on {name!r} but the model config has no "
                     "lora settings: build the ModelConfig with lora=LoraConfig(rank=...)")
  lhs, out = eq.split("->")
  x_spec, w_spec = lhs.split(",")
  w_in = "".join(c for c in w_spec if c in x_spec)
  w_out = "".join(c for c in w_spec if c not in x_spec)
  x_keep = "".join(c for c in x_spec if c not in w_spec)
  if dropout_fn is not None:
    x = dropout_fn(x)
  xa = jnp.einsum(f"{x_spec},{w_in}r->{x_keep}r", x, a.astype(dtype))
  delta = jnp.einsum(f"{x_keep}r,r{w_out}->{out}", xa, lp[name + B_SUFFIX].astype(dtype))
  return y + (scale * delta).astype(y.dtype)


# ---------------------------------------------------------------------------
# Adapter-only checkpoints (lora.adapter_only_checkpoints).
# ---------------------------------------------------------------------------
class AdapterOnlyCheckpointer:
  """A `Checkpointer` whose saves hold the trainable leaves only.

  The saved state is the train state with `params` cut to
  `trainable_params(params)` (adapters, and e.g. a reward model's head); the
  optimizer state is the adapters' already (`freeze_base`). On restore the
  frozen leaves come from `state`, the run's starting state, which the run
  built from its model source (`trainer.initial_params`), so a resumed run
  must read the same base (model source, init_from, SFT warm-start) as the
  run that saved. For a 7B base with r = 16 adapters this is ~40 MB per
  checkpoint instead of ~15 GB (params) + the adapters' optimizer state.
  Every other method is the wrapped checkpointer's.
  """

  def __init__(self, checkpointer, state):
    self._inner = checkpointer
    self._frozen = split_trainable(state.params)[1]

  def __getattr__(self, name):
    return getattr(self._inner, name)

  @staticmethod
  def view(state):
    """The part of a train state an adapter-only checkpoint holds."""
    return state.replace(params=trainable_params(state.params))

  def save(self, step: int, state, **kwargs) -> bool:
    return self._inner.save(step, self.view(state), **kwargs)

  def restore(self, abstract_state, step: Optional[int] = None):
    out = self._inner.restore(self.view(abstract_state), step)
    if out is None:
      return None
    state, extra = out
    return state.replace(params=combine(state.params, self._frozen)), extra


# ---------------------------------------------------------------------------
# Starting params of a LoRA run (called by `trainer.initial_params`).
# ---------------------------------------------------------------------------
def _saved_lora(directory: str) -> Optional[LoraConfig]:
  """The enabled LoRA settings stored with the latest checkpoint of a run, if any."""
  from jaxrl_llm.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, create=False)
  try:
    if ckpt.latest_step() is None:
      return None
    saved = (ckpt.restore_extra().get("config") or {}).get("model", {}).get("lora")
  finally:
    ckpt.close()
  if not saved or not saved.get("rank"):
    return None
  saved = dict(saved, target_modules=tuple(saved["target_modules"]))
  return LoraConfig(**{k: v for k, v in saved.items()
                       if k in {f.name for f in dataclasses.fields(LoraConfig)}})


def _same_adapters(a: LoraConfig, b: LoraConfig) -> bool:
  return (a.rank, tuple(a.target_modules), a.init) == (b.rank, tuple(b.target_modules), b.init)


def initial_params_with_adapters(cfg, workdir: str, model_cfg, param_shardings,
                                 base_initial_params: Callable, rng: jax.Array):
  """The starting params of a LoRA run: the base as `base_initial_params` reads it
  (init_from, SFT warm-start, HF checkpoint, or None for a fresh init), plus adapters.

  A source checkpoint (trainer.init_from, or a LoRA SFT warm-start) that holds
  adapters of the same rank, targets and init gives its adapters; adapters of
  other settings are merged into the base first and fresh ones are added.
  """
  import functools

  from jaxrl_llm import fileio
  from jaxrl_llm.checkpoint import Checkpointer
  from jaxrl_llm.models import decoder
  if model_cfg.lora.quantize_base != "none":  # the float base and adapters, then quantized
    from jaxrl_llm import quantize
    return quantize.initial_params(cfg, workdir, model_cfg, param_shardings,
                                   base_initial_params, rng)
  lora = model_cfg.lora
  base_cfg = model_cfg.replace(lora=None)
  base_sh = base_params(param_shardings)
  params = base_initial_params(cfg, workdir, base_cfg, base_sh)
  source = cfg.trainer.init_from
  if not source and cfg.kind != "sft" and cfg.trainer.sft_warmstart.num_steps > 0:
    source = fileio.join(workdir, "sft_warmstart")
  saved = _saved_lora(source) if source else None
  if saved is not None and saved.adapter_only_checkpoints:
    raise ValueError(f"{source} holds adapter-only checkpoints (model.lora.adapter_only_"
                     "checkpoints=True): they have no base weights to start another run from. "
                     "Export them (jaxrl_llm.models.peft.save_peft, or save_hf for merged "
                     "weights) and start from that, or rerun the source with "
                     "model.lora.adapter_only_checkpoints=False")
  if saved is not None:
    saved_cfg = model_cfg.replace(lora=saved)
    from jaxrl_llm.train_state import param_shardings as make_shardings
    saved_sh = (param_shardings if _same_adapters(saved, lora) else
                make_shardings(saved_cfg, jax.tree.leaves(param_shardings)[0].mesh,
                               cfg.mesh.rules))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            decoder.param_shapes(saved_cfg), saved_sh)
    params = Checkpointer(source, create=False).restore_params(abstract)
    if _same_adapters(saved, lora):
      return params
    params = jax.jit(functools.partial(merge, scale=saved.scale), out_shardings=base_sh)(params)
  if params is None:
    return None  # a fresh init: `decoder.init_params` adds the adapters
  add = jax.jit(functools.partial(add_adapters, lora), out_shardings=param_shardings,
                donate_argnums=(0,))
  return add(params, rng)
