"""Per-token policy-gradient losses, importance corrections, KL and aggregation.

Every policy loss has the signature
  fn(logp_BT, old_logp_BT, adv_BT, mask_BT, **opts) -> (loss_BT, metrics)
where ``logp_BT`` are the current policy's log-probs of the sampled tokens
(differentiated), ``old_logp_BT`` those of the behaviour policy that sampled
them, ``adv_BT`` the per-token advantage (see ``advantages``) and ``mask_BT``
1 on completion tokens. ``old_logp_BT`` and ``adv_BT`` are treated as
constants (stop-gradient). ``loss_BT`` is 0 on masked tokens; ``metrics`` is a
dict of per-token float arrays (0 on masked tokens) that the caller averages
over the mask, e.g. ``ratio_BT``, ``clip_low_BT``, ``clip_high_BT``.

Losses are looked up by name (`policy_loss`, ``RLConfig.policy_loss``) in the
live registry ``POLICY_LOSSES``; add one with `register_policy_loss`.

Reduce ``loss_BT`` with `aggregate`, which returns a weighted sum and its
denominator so that micro-batches and hosts combine exactly:
loss = Σ total / Σ denom.

Log-ratios are masked before ``exp`` so that padding positions (whose
log-probs may be arbitrary) cannot overflow or poison gradients. Math is in
float32 (float64 inputs stay float64).

Notation: ρ_t = exp(logp_t − old_logp_t) is the token importance ratio, A the
advantage, m the mask, sg stop-gradient, |y_i| = Σ_t m_{i,t}.

Shape suffixes:
  B: sequences (completions) in the batch.
  T: completion time (token position within the completion).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.rl import registry

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _float(x: Any) -> Array:
  """Casts to at least float32 (bf16 -> f32; f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nonneg(name: str, value: Any) -> None:
  if isinstance(value, (int, float)) and value < 0:
    raise ValueError(f"{name} must be >= 0, got {value}.")


def _prepare(
    logp_BT: Any, old_logp_BT: Any, adv_BT: Any, mask_BT: Any
) -> tuple[Array, Array, Array, Array]:
  """Validates shapes; returns (logp, sg(old_logp), sg(adv), bool mask)."""
  logp_BT = _float(logp_BT)
  old_logp_BT = jax.lax.stop_gradient(_float(old_logp_BT))
  adv_BT = jax.lax.stop_gradient(_float(adv_BT))
  mask_BT = jnp.asarray(mask_BT)
  shapes = {"logp_BT": logp_BT.shape, "old_logp_BT": old_logp_BT.shape,
            "adv_BT": adv_BT.shape, "mask_BT": mask_BT.shape}
  if logp_BT.ndim != 2 or len(set(shapes.values())) != 1:
    raise ValueError(f"Inputs must share one (B, T) shape, got {shapes}.")
  return logp_BT, old_logp_BT, adv_BT, mask_BT != 0


def _masked_log_ratio(logp_BT: Array, old_logp_BT: Array, on_BT: Array):
  return jnp.where(on_BT, logp_BT - old_logp_BT, 0.0)


def _clipped_surrogate(
    ratio_BT: Array,
    adv_BT: Array,
    on_BT: Array,
    eps_low: float,
    eps_high: float,
) -> tuple[Array, dict[str, Array]]:
  """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) = max(−ρA, −clip(ρ)A).

  clip_low marks tokens where the lower clip is active (A < 0, ρ < 1−ε_low),
  clip_high where the upper one is (A > 0, ρ > 1+ε_high): the clipped term is
  selected and the token's gradient is zero.
  """
  clipped_BT = jnp.clip(ratio_BT, 1.0 - eps_low, 1.0 + eps_high)
  loss_BT = jnp.maximum(-ratio_BT * adv_BT, -clipped_BT * adv_BT)
  dtype = ratio_BT.dtype
  clip_low_BT = on_BT & (adv_BT < 0) & (ratio_BT < 1.0 - eps_low)
  clip_high_BT = on_BT & (adv_BT > 0) & (ratio_BT > 1.0 + eps_high)
  metrics = {
      "ratio_BT": jnp.where(on_BT, ratio_BT, 0.0),
      "clip_low_BT": clip_low_BT.astype(dtype),
      "clip_high_BT": clip_high_BT.astype(dtype),
  }
  return jnp.where(on_BT, loss_BT, 0.0), metrics


# --------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------


def ppo_clip(
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate (Schulman et al. 2017; used by GRPO).

  ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t).
  ε_high > ε_low is DAPO's clip-higher (e.g. 0.2 / 0.28), which leaves
  low-probability tokens more room to grow and delays entropy collapse
  (DAPO, Yu et al. 2025). Metrics: ratio_BT, clip_low_BT, clip_high_BT.
  """
  _check_nonneg("eps_low", eps_low)
  _check_nonneg("eps_high", eps_high)
  logp_BT, old_logp_BT, adv_BT, on_BT = _prepare(
      logp_BT, old_logp_BT, adv_BT, mask_BT)
  ratio_BT = jnp.exp(_masked_log_ratio(logp_BT, old_logp_BT, on_BT))
  return _clipped_surrogate(ratio_BT, adv_BT, on_BT, eps_low, eps_high)


def dual_clip(
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_c: float = 3.0,
) -> tuple[Array, dict[str, Array]]:
  """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games").

  ℓ_t = ℓ^ppo_t for A_t ≥ 0;  ℓ_t = min(ℓ^ppo_t, −c·A_t) for A_t < 0,
  with ℓ^ppo the `ppo_clip` loss. For a negative advantage and a very large
  ratio the loss stops growing at −c·A (and its gradient is zero), bounding
  the update from stale, off-policy tokens. Requires c > 1. Metrics as
  `ppo_clip` plus clip_dual_BT (the −c·A bound is active).
  """
  _check_nonneg("eps_low", eps_low)
  _check_nonneg("eps_high", eps_high)
  if isinstance(clip_c, (int, float)) and clip_c <= 1.0:
    raise ValueError(f"clip_c must be > 1, got {clip_c}.")
  logp_BT, old_logp_BT, adv_BT, on_BT = _prepare(
      logp_BT, old_logp_BT, adv_BT, mask_BT)
  ratio_BT = jnp.exp(_masked_log_ratio(logp_BT, old_logp_BT, on_BT))
  ppo_BT, metrics = _clipped_surrogate(
      ratio_BT, adv_BT, on_BT, eps_low, eps_high)
  bound_BT = -clip_c * adv_BT
  dual_BT = on_BT & (adv_BT < 0) & (ppo_BT > bound_BT)
  loss_BT = jnp.where(dual_BT, bound_BT, ppo_BT)
  metrics["clip_dual_BT"] = dual_BT.astype(loss_BT.dtype)
  return loss_BT, metrics


def _sequence_log_ratio(log_ratio_BT: Array, on_BT: Array) -> Array:
  """log s_i = (1/|y_i|) Σ_t m log ρ_{i,t}; 0 for an empty sequence."""
  length_B = jnp.sum(on_BT, axis=-1).astype(log_ratio_BT.dtype)
  return jnp.sum(log_ratio_BT, axis=-1) / jnp.maximum(length_B, 1.0)


def gspo(
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Array, dict[str, Array]]:
  """Group Sequence Policy Optimisation (GSPO, Zheng et al. 2025).

  Sequence ratio s_i = exp((1/|y_i|) Σ_t m_{i,t} log ρ_{i,t}) (the geometric
  mean of the token ratios), then
    ℓ_{i,t} = −min(s_i A_{i,t}, clip(s_i, 1 − ε_low, 1 + ε_high) A_{i,t}),
  i.e. the sequence loss ℓ_i broadcast to every token of y_i (A is constant
  over a sequence for outcome advantages). Aggregate with
  "seq_mean_token_mean" to get the paper's (1/N) Σ_i ℓ_i. The gradient flows
  to every token through s_i. Metrics: ratio_BT (s_i on each token),
  clip_low_BT, clip_high_BT (sequence-level clipping, repeated per token).
  """
  _check_nonneg("eps_low", eps_low)
  _check_nonneg("eps_high", eps_high)
  logp_BT, old_logp_BT, adv_BT, on_BT = _prepare(
      logp_BT, old_logp_BT, adv_BT, mask_BT)
  log_ratio_BT = _masked_log_ratio(logp_BT, old_logp_BT, on_BT)
  seq_ratio_B = jnp.exp(_sequence_log_ratio(log_ratio_BT, on_BT))
  ratio_BT = jnp.broadcast_to(seq_ratio_B[:, None], logp_BT.shape)
  return _clipped_surrogate(ratio_BT, adv_BT, on_BT, eps_low, eps_high)


def gspo_token(
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Array, dict[str, Array]]:
  """GSPO-token (Zheng et al. 2025): sequence ratio value, per-token gradient.

  s_{i,t} = sg(s_i) · exp(log π_θ(y_{i,t}) − sg(log π_θ(y_{i,t}))), whose
  value equals s_i but whose gradient is s_i ∇log π_θ(y_{i,t}), then
    ℓ_{i,t} = −min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1−ε_low, 1+ε_high) A_{i,t}).
  With A_{i,t} = A_i and "seq_mean_token_mean" aggregation the gradient equals
  `gspo`'s; per-token advantages make it finer grained. Metrics as `gspo`.
  """
  _check_nonneg("eps_low", eps_low)
  _check_nonneg("eps_high", eps_high)
  logp_BT, old_logp_BT, adv_BT, on_BT = _prepare(
      logp_BT, old_logp_BT, adv_BT, mask_BT)
  log_ratio_BT = _masked_log_ratio(logp_BT, old_logp_BT, on_BT)
  seq_ratio_B = jax.lax.stop_gradient(
      jnp.exp(_sequence_log_ratio(log_ratio_BT, on_BT)))
  live_logp_BT = jnp.where(on_BT, logp_BT, 0.0)
  ratio_BT = seq_ratio_B[:, None] * jnp.exp(
      live_logp_BT - jax.lax.stop_gradient(live_logp_BT))
  return _clipped_surrogate(ratio_BT, adv_BT, on_BT, eps_low, eps_high)


def cispo(
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    *,
    eps_low: float | None = None,
    eps_high: float = 0.28,
) -> tuple[Array, dict[str, Array]]:
  """Clipped IS-weight policy optimisation (CISPO, MiniMax-M1 2025).

  ℓ_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) · A_t · log π_θ(y_t).
  The importance weight is clipped, not the update: every token keeps a
  gradient (−ŵ_t A_t ∇log π_θ), including rare tokens that PPO clipping would
  drop. ``eps_low=None`` (the paper's setting) means no lower clip.
  Metrics: ratio_BT, clip_low_BT (ρ < 1 − ε_low), clip_high_BT
  (ρ > 1 + ε_high); here "clipped" means the weight was capped, whatever the
  sign of A.
  """
  if eps_low is not None:
    _check_nonneg("eps_low", eps_low)
  _check_nonneg("eps_high", eps_high)
  logp_BT, old_logp_BT, adv_BT, on_BT = _prepare(
      logp_BT, old_logp_BT, adv_BT, mask_BT)
  ratio_BT = jnp.exp(_masked_log_ratio(logp_BT, old_logp_BT, on_BT))
  weight_BT = jnp.minimum(ratio_BT, 1.0 + eps_high)
  clip_high_BT = on_BT & (ratio_BT > 1.0 + eps_high)
  if eps_low is None:
    clip_low_BT = jnp.zeros_like(on_BT)
  else:
    weight_BT = jnp.maximum(weight_BT, 1.0 - eps_low)
    clip_low_BT = on_BT & (ratio_BT < 1.0 - eps_low)
  weight_BT = jax.lax.stop_gradient(weight_BT)
  loss_BT = jnp.where(on_BT, -weight_BT * adv_BT * logp_BT, 0.0)
  dtype = loss_BT.dtype
  metrics = {
      "ratio_BT": jnp.where(on_BT, ratio_BT, 0.0),
      "clip_low_BT": clip_low_BT.astype(dtype),
      "clip_high_BT": clip_high_BT.astype(dtype),
  }
  return loss_BT, metrics


POLICY_LOSSES: dict[str, LossFn] = {
    "ppo_clip": ppo_clip,
    "dual_clip": dual_clip,
    "gspo": gspo,
    "gspo_token": gspo_token,
    "cispo": cispo,
}


_BUILTIN_POLICY_LOSSES: frozenset[str] = frozenset(POLICY_LOSSES)


def policy_loss_names() -> tuple[str, ...]:
  """Every name `policy_loss` accepts now, registered ones included."""
  return tuple(POLICY_LOSSES)


def get_policy_loss(name: str) -> LossFn:
  """The function behind a loss name; ValueError listing the valid names."""
  if name not in POLICY_LOSSES:
    raise ValueError(
        f"Unknown policy loss {name!r}; valid names: "
        f"{', '.join(POLICY_LOSSES)}.")
  return POLICY_LOSSES[name]


def register_policy_loss(name: str, fn: LossFn, *, overwrite: bool = False) -> LossFn:
  """Registers a policy loss under ``name``; returns ``fn``.

  ``fn(logp_BT, old_logp_BT, adv_BT, mask_BT, **options) -> (loss_BT,
  metrics)`` with the contract of this module's docstring (loss 0 on masked
  tokens; metrics a dict of per-token arrays; the step averages
  ``clip_low_BT`` / ``clip_high_BT`` when present). Once registered, the name
  is valid in `policy_loss`, in ``RLConfig(policy_loss=name)`` and in the RL
  step. Options come from ``RLConfig.loss_kwargs`` (and ``eps_low`` /
  ``eps_high`` / ``clip_c`` from ``eps_low`` / ``eps_high`` / ``dual_clip_c``
  if ``fn`` names them).

  Raises ValueError for a name already registered (unless ``overwrite=True``),
  an empty or non-string name, and an ``fn`` that is not callable or cannot
  be called with the four arrays. Register before building the RLConfig and
  jitting the step: a compiled step keeps the function it traced.
  """
  return registry.add(POLICY_LOSSES, "policy loss", name, fn, overwrite=overwrite,
                      num_positional=4, keywords=(),
                      call="fn(logp_BT, old_logp_BT, adv_BT, mask_BT)")


def unregister_policy_loss(name: str) -> None:
  """Removes a registered loss; built-in names cannot be removed."""
  registry.remove(POLICY_LOSSES, _BUILTIN_POLICY_LOSSES, "policy loss", name)


def policy_loss(
    name: str,
    logp_BT: Any,
    old_logp_BT: Any,
    adv_BT: Any,
    mask_BT: Any,
    **opts: Any,
) -> tuple[Array, dict[str, Array]]:
  """Dispatches to ``POLICY_LOSSES[name]`` (registered ones included); ``opts`` go to it."""
  return get_policy_loss(name)(logp_BT, old_logp_BT, adv_BT, mask_BT, **opts)


# --------------------------------------------------------------------------
# Corrections and penalties
# --------------------------------------------------------------------------


def tis_weights(
    old_logp_BT: Any, sampler_logp_BT: Any, cap: float = 2.0
) -> Array:
  """Truncated importance-sampling weights: sg(min(π_old / π_sampler, C)).

  w_t = min(exp(old_logp_t − sampler_logp_t), C). Multiply ``loss_BT`` by it
  when ρ is computed from training-forward log-probs (π_old) that differ from
  the sampler's (e.g. a bf16 decode engine), to correct the resulting
  off-policy mismatch ("Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training", Yao et al. 2025). No gradient flows through w.
  """
  if isinstance(cap, (int, float)) and cap <= 0:
    raise ValueError(f"cap must be > 0, got {cap}.")
  old_logp_BT = _float(old_logp_BT)
  sampler_logp_BT = _float(sampler_logp_BT)
  if old_logp_BT.shape != sampler_logp_BT.shape:
    raise ValueError(
        f"old_logp_BT {old_logp_BT.shape} and sampler_logp_BT "
        f"{sampler_logp_BT.shape} must have the same shape.")
  return jax.lax.stop_gradient(
      jnp.minimum(jnp.exp(old_logp_BT - sampler_logp_BT), cap))


KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty(logp_BT: Any, ref_logp_BT: Any, kind: str) -> Array:
  """Per-token estimate of KL(π_θ ‖ π_ref) from sampled tokens (Schulman 2020).

  With l_t = log π_θ(y_t) − log π_ref(y_t):
    k1 = l;  k2 = l² / 2;  k3 = exp(−l) − 1 + l (≥ 0, GRPO's estimator).
  Add β·KL to the loss, or fold −β·KL into the token rewards
  (``advantages.reinforce_pp``). Unmasked: the caller aggregates.
  """
  if kind not in KL_KINDS:
    raise ValueError(
        f"Unknown KL kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}.")
  logp_BT = _float(logp_BT)
  ref_logp_BT = jax.lax.stop_gradient(_float(ref_logp_BT))
  if logp_BT.shape != ref_logp_BT.shape:
    raise ValueError(
        f"logp_BT {logp_BT.shape} and ref_logp_BT {ref_logp_BT.shape} must "
        f"have the same shape.")
  l_BT = logp_BT - ref_logp_BT
  if kind == "k1":
    return l_BT
  if kind == "k2":
    return 0.5 * l_BT**2
  return jnp.exp(-l_BT) - 1.0 + l_BT


# --------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------

AGGREGATION_MODES: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


def aggregate(
    loss_BT: Any,
    mask_BT: Any,
    mode: str,
    *,
    max_len: int | None = None,
) -> tuple[Array, Array]:
  """Reduces a per-token loss to (total, denom); the loss is total / denom.

  Returning the weighted sum and its denominator separately makes
  micro-batches and hosts aggregate exactly: Σ total / Σ denom over shards
  equals the full-batch loss. N counts the sequences with at least one
  unmasked token (rows masked out entirely, e.g. by dynamic sampling, do not
  count), and |y_i| = Σ_t m_{i,t}. Mask values act as token weights.

    token_mean:               total = Σ_{i,t} mℓ,           denom = Σ m
                              (DAPO; TRL "dapo"/"bnpo")
    seq_mean_token_mean:      total = Σ_i Σ_t mℓ / |y_i|,   denom = N
                              (original GRPO)
    seq_mean_token_sum:       total = Σ_{i,t} mℓ,           denom = N
    seq_mean_token_sum_norm:  total = Σ_{i,t} mℓ,           denom = N·max_len
                              (Dr. GRPO: a constant normaliser, so no length
                              bias; Liu et al. 2025)
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(
        f"Unknown aggregation mode {mode!r}; valid modes: "
        f"{', '.join(AGGREGATION_MODES)}.")
  loss_BT = _float(loss_BT)
  mask_BT = jnp.asarray(mask_BT)
  if loss_BT.ndim != 2 or loss_BT.shape != mask_BT.shape:
    raise ValueError(
        f"loss_BT {loss_BT.shape} and mask_BT {mask_BT.shape} must share one "
        f"(B, T) shape.")
  m_BT = mask_BT.astype(loss_BT.dtype)
  # where() first so non-finite values at padded positions cannot leak.
  weighted_BT = jnp.where(m_BT != 0, m_BT * loss_BT, 0.0)
  num_seqs = jnp.sum(jnp.any(m_BT != 0, axis=-1)).astype(loss_BT.dtype)
  if mode == "token_mean":
    return jnp.sum(weighted_BT), jnp.sum(m_BT)
  if mode == "seq_mean_token_mean":
    length_B = jnp.sum(m_BT, axis=-1)
    per_seq_B = jnp.sum(weighted_BT, axis=-1) / jnp.where(
        length_B != 0, length_B, 1.0)
    return jnp.sum(per_seq_B), num_seqs
  if mode == "seq_mean_token_sum":
    return jnp.sum(weighted_BT), num_seqs
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(
        f"mode='seq_mean_token_sum_norm' needs max_len, a positive int (the "
        f"configured max new tokens); got {max_len!r}.")
  return jnp.sum(weighted_BT), num_seqs * max_len
