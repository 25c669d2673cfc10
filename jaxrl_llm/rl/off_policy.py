"""Off-policy corrections for rollouts sampled by an older policy (asynchronous actors).

When an actor samples with parameters k updates old (`jaxrl_llm.rl.actor_learner`),
the learner trains on tokens drawn from a behaviour policy μ that is not the
policy π it updates. Everything here is a pure function over token arrays:

  importance weights   ρ_t = π(y_t) / μ(y_t) = exp(logp_t − behaviour_logp_t)
    "tis"  truncate:   w_t = min(ρ_t, C)
    "mis"  mask:       w_t = ρ_t if ρ_t ≤ C else 0   (tokens too far off-policy drop out)
  V-trace (Espeholt et al. 2018, "IMPALA", eq. 1) over the tokens of a completion,
    with ρ̄_t = min(ρ̄, ρ_t), c_t = λ·min(c̄, ρ_t), γ_t = γ·m_{t+1} (0 after the last token):
      δ_t      = ρ̄_t (r_t + γ_t V_{t+1} − V_t)
      v_t − V_t = δ_t + γ_t c_t (v_{t+1} − V_{t+1})
      A^pg_t   = ρ̄_t (r_t + γ_t v_{t+1} − V_t)          (the policy-gradient advantage)
  ReMix (Liang et al. 2025, "Squeeze the Soaked Sponge: Efficient Off-policy
    Reinforcement Finetuning for Large Language Model", arXiv:2507.06892):
    mix-policy proximal policy gradient: the ratio r_t = π_θ/μ against the policy
      that sampled each token, clipped around the proximal policy's own ratio
      r^k_t = π_k/μ (the generalized clipping of GePPO, Queeney et al. 2021, which
      the mix-policy objective builds on):
        ℓ_t = −min(r_t A_t, clip(r_t, r^k_t − ε_low, r^k_t + ε_high) A_t)
      on-policy data (μ = π_k) gives PPO-clip exactly; with one optimizer step per
      rollout π_k = π_θ, the clip does not bind and the gradient is r^k_t·A·∇log π_θ
      (ReMix's update-to-data ratio is rl.epochs × rl.minibatches);
    KL-convex constraint: λ·KL(π_θ ‖ π_base) + (1 − λ)·KL(π_θ ‖ π_precedent), a convex
      combination of the constraint to the base model and to the precedent policy;
    policy reincarnation: at a chosen step the base (reference) model is replaced by
      the current policy and training restarts on-policy (`lag_at` returns 0 from then on).

Notation: B completions, T completion tokens; m the completion mask; sg stop-gradient.
Metrics are returned as masked token SUMS (the RL step divides "rl/" sums by its
token count), so micro-batches and devices combine exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.rl import policy_losses

Array = jax.Array
CORRECTIONS = ("none", "tis", "mis", "vtrace", "remix")
IS_MODES = ("tis", "mis")


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig:
  """Which correction the learner applies to (possibly stale) rollouts (`rl.off_policy`)."""
  # none | tis (truncated IS weights) | mis (masked IS weights) | vtrace | remix
  correction: str = "none"
  is_cap: float = 2.0               # C of tis / mis; ρ̄ of V-trace
  trace_cap: float = 1.0            # c̄ of V-trace (trace cutting)
  trace_lambda: float = 1.0         # λ of V-trace's c_t
  discount: float = 1.0             # γ over completion tokens
  remix_base_weight: float = 0.5    # λ of ReMix's KL-convex constraint (weight of the base model)
  remix_reincarnate_step: int = 0   # > 0: policy reincarnation at this step (0: never)

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"rl.off_policy.{field}={getattr(self, field)!r}: {msg}")
    check(self.correction in CORRECTIONS, "correction", f"choose one of {CORRECTIONS}")
    check(self.is_cap > 0, "is_cap", "must be > 0 (C of tis / mis, ρ̄ of vtrace)")
    check(self.trace_cap > 0, "trace_cap", "must be > 0 (c̄ of vtrace)")
    check(0 < self.trace_lambda <= 1, "trace_lambda", "must be in (0, 1]")
    check(0 < self.discount <= 1, "discount", "must be in (0, 1]")
    check(0 <= self.remix_base_weight <= 1, "remix_base_weight", "must be in [0, 1]")
    check(self.remix_reincarnate_step >= 0, "remix_reincarnate_step",
          "must be >= 0 (0: no reincarnation)")
    if self.remix_reincarnate_step:
      check(self.correction == "remix", "remix_reincarnate_step",
            "policy reincarnation belongs to correction='remix'")
    if self.vtrace:
      check(self.is_cap >= self.trace_cap, "is_cap",
            f"V-trace needs ρ̄ >= c̄ (trace_cap={self.trace_cap}); Espeholt et al. 2018, §4.1")

  @property
  def vtrace(self) -> bool:
    return self.correction == "vtrace"

  @property
  def needs_learner_logprobs(self) -> bool:
    """V-trace builds its advantages from π/μ before the update: one extra forward."""
    return self.correction == "vtrace"


def _float(x: Any) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_same_shape(**arrays) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
    raise ValueError(f"inputs must share one (B, T) shape, got {shapes}")


def log_ratio(target_logp_BT, behaviour_logp_BT, mask_BT) -> Array:
  """log ρ_t = log π(y_t) − log μ(y_t) on completion tokens, 0 elsewhere (no gradient)."""
  _check_same_shape(target_logp_BT=target_logp_BT, behaviour_logp_BT=behaviour_logp_BT,
                    mask_BT=mask_BT)
  diff = _float(target_logp_BT) - _float(behaviour_logp_BT)
  return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask_BT) != 0, diff, 0.0))


# ---------------------------------------------------------------------------
# Token-level importance weights (TIS / MIS).
# ---------------------------------------------------------------------------
def importance_weights(target_logp_BT, behaviour_logp_BT, mask_BT, *, cap: float,
                       mode: str = "tis") -> tuple[Array, dict[str, Array]]:
  """sg token weights against the sampler: truncated ("tis") or masked ("mis").

    tis: w_t = min(ρ_t, C)          mis: w_t = ρ_t · [ρ_t ≤ C]
  Both are 0 off the mask. Returns (w_BT, sums) with masked token sums of
  "rl/is_weight" (w), "rl/is_ratio" (ρ), "rl/is_clip_frac" ([ρ > C]) and
  "rl/behaviour_kl" (ρ − 1 − log ρ: the k3 estimate of KL(μ ‖ π) from μ's samples,
  the staleness of the data).
  """
  if mode not in IS_MODES:
    raise ValueError(f"importance weight mode {mode!r}; choose one of {IS_MODES}")
  if isinstance(cap, (int, float)) and cap <= 0:
    raise ValueError(f"cap must be > 0, got {cap}")
  on_BT = jnp.asarray(mask_BT) != 0
  lr_BT = log_ratio(target_logp_BT, behaviour_logp_BT, mask_BT)
  rho_BT = jnp.exp(lr_BT)
  over_BT = (rho_BT > cap) & on_BT
  w_BT = jnp.minimum(rho_BT, cap) if mode == "tis" else jnp.where(over_BT, 0.0, rho_BT)
  w_BT = jnp.where(on_BT, w_BT, 0.0)
  m = on_BT.astype(w_BT.dtype)
  sums = {"rl/is_weight": jnp.sum(w_BT), "rl/is_ratio": jnp.sum(rho_BT * m),
          "rl/is_clip_frac": jnp.sum(over_BT.astype(w_BT.dtype)),
          "rl/behaviour_kl": jnp.sum((rho_BT - 1.0 - lr_BT) * m)}
  return jax.lax.stop_gradient(w_BT), sums


# ---------------------------------------------------------------------------
# V-trace.
# ---------------------------------------------------------------------------
def vtrace(log_rhos_BT, rewards_BT, values_BT, bootstrap_B, mask_BT, *, discount: float = 1.0,
           rho_bar: float = 1.0, c_bar: float = 1.0, lam: float = 1.0
           ) -> tuple[Array, Array, dict[str, Array]]:
  """V-trace targets v_t and policy-gradient advantages over token sequences (no gradient).

  Formulas in the module docstring. The mask is a prefix per row (completion
  tokens); the step after the last token is terminal (γ_t = 0) unless the row
  fills all T tokens, whose continuation value is `bootstrap_B` (0 for a
  finished completion). Off the mask v_t = V_t and A^pg_t = 0.
  Returns (vs_BT, pg_adv_BT, sums) with masked token sums "rl/vtrace_rho_clip_frac"
  ([ρ_t > ρ̄]) and "rl/vtrace_c_clip_frac" ([ρ_t > c̄]).
  """
  _check_same_shape(log_rhos_BT=log_rhos_BT, rewards_BT=rewards_BT, values_BT=values_BT,
                    mask_BT=mask_BT)
  if not (rho_bar > 0 and c_bar > 0 and 0 < discount <= 1 and 0 < lam <= 1):
    raise ValueError(f"V-trace needs rho_bar > 0, c_bar > 0, discount and lam in (0, 1]; got "
                     f"rho_bar={rho_bar}, c_bar={c_bar}, discount={discount}, lam={lam}")
  m_BT = (jnp.asarray(mask_BT) != 0).astype(jnp.float32)
  rho_BT = jnp.exp(jax.lax.stop_gradient(_float(log_rhos_BT))) * m_BT
  rho_clip_BT = jnp.minimum(rho_bar, rho_BT) * m_BT
  c_BT = lam * jnp.minimum(c_bar, rho_BT) * m_BT
  r_BT = jax.lax.stop_gradient(_float(rewards_BT)) * m_BT
  v_BT = jax.lax.stop_gradient(_float(values_BT)) * m_BT
  boot_B = jax.lax.stop_gradient(_float(bootstrap_B))
  next_v_BT = jnp.concatenate([v_BT[:, 1:], boot_B[:, None]], axis=1)
  next_m_BT = jnp.concatenate([m_BT[:, 1:], jnp.ones_like(m_BT[:, :1])], axis=1)
  gamma_BT = discount * next_m_BT
  delta_BT = rho_clip_BT * (r_BT + gamma_BT * next_v_BT - v_BT)

  def back(acc_B, xs):  # acc = v_{t+1} − V_{t+1}
    delta_B, gamma_B, c_B = xs
    acc_B = delta_B + gamma_B * c_B * acc_B
    return acc_B, acc_B

  _, diff_TB = jax.lax.scan(back, jnp.zeros_like(boot_B),
                            (delta_BT.T, gamma_BT.T, c_BT.T), reverse=True)
  vs_BT = v_BT + diff_TB.T
  next_vs_BT = jnp.concatenate([vs_BT[:, 1:], boot_B[:, None]], axis=1)
  pg_adv_BT = rho_clip_BT * (r_BT + gamma_BT * next_vs_BT - v_BT)
  sums = {"rl/vtrace_rho_clip_frac": jnp.sum((rho_BT > rho_bar) * m_BT),
          "rl/vtrace_c_clip_frac": jnp.sum((rho_BT > c_bar) * m_BT)}
  return vs_BT, pg_adv_BT, sums


def last_token_rewards(seq_values_B, mask_BT) -> Array:
  """A per-sequence value placed on each row's last completion token, 0 elsewhere."""
  m_BT = jnp.asarray(mask_BT) != 0
  T = m_BT.shape[1]
  last_B = jnp.max(jnp.where(m_BT, jnp.arange(T)[None, :], -1), axis=1)
  at_last_BT = (jnp.arange(T)[None, :] == last_B[:, None]) & m_BT
  return jnp.where(at_last_BT, _float(seq_values_B)[:, None], 0.0)


def vtrace_advantages(adv_BT, learner_logp_BT, behaviour_logp_BT, mask_BT,
                      cfg: OffPolicyConfig) -> tuple[Array, dict[str, Array]]:
  """Critic-free V-trace for group-relative estimators: corrected per-token advantages.

  The estimator's sequence advantage (adv at the last token) is the terminal
  reward, V ≡ 0, bootstrap 0: A^pg_t = ρ̄_t γ^{n−1−t} (Π_{t<i<n−1} c_i) ρ̄_{n−1} A for
  t < n − 1 and ρ̄_{n−1} A at the last token n − 1. On-policy data (ρ ≡ 1 and
  ρ̄, c̄ ≥ 1, γ = λ = 1) gives A back unchanged.
  """
  lr_BT = log_ratio(learner_logp_BT, behaviour_logp_BT, mask_BT)
  seq_adv_B = jnp.sum(last_token_rewards(jnp.ones(adv_BT.shape[0]), mask_BT) * adv_BT, axis=1)
  rewards_BT = last_token_rewards(seq_adv_B, mask_BT)
  zeros_BT = jnp.zeros_like(rewards_BT)
  _, pg_adv_BT, sums = vtrace(lr_BT, rewards_BT, zeros_BT, jnp.zeros(adv_BT.shape[0]), mask_BT,
                              discount=cfg.discount, rho_bar=cfg.is_cap, c_bar=cfg.trace_cap,
                              lam=cfg.trace_lambda)
  return pg_adv_BT, sums


# ---------------------------------------------------------------------------
# ReMix.
# ---------------------------------------------------------------------------
def mix_policy_clip_loss(logp_BT, behaviour_logp_BT, proximal_logp_BT, adv_BT, mask_BT, *,
                         eps_low: float = 0.2, eps_high: float = 0.2
                         ) -> tuple[Array, dict[str, Array]]:
  """ReMix's mix-policy proximal surrogate per token (formula in the module docstring).

  r_t = exp(logp_t − behaviour_logp_t) carries the gradient; the clip range is
  centred on the proximal policy's ratio r^k_t = exp(proximal_logp_t −
  behaviour_logp_t) (no gradient). Returns (loss_BT, metrics) in the
  `policy_losses` contract: loss 0 off the mask; "ratio_BT", "clip_low_BT",
  "clip_high_BT" (tokens where the clip binds).
  """
  for name, v in (("eps_low", eps_low), ("eps_high", eps_high)):
    if isinstance(v, (int, float)) and v < 0:
      raise ValueError(f"{name} must be >= 0, got {v}")
  _check_same_shape(logp_BT=logp_BT, behaviour_logp_BT=behaviour_logp_BT,
                    proximal_logp_BT=proximal_logp_BT, adv_BT=adv_BT, mask_BT=mask_BT)
  on_BT = jnp.asarray(mask_BT) != 0
  logp_BT = _float(logp_BT)
  mu_BT = jax.lax.stop_gradient(_float(behaviour_logp_BT))
  prox_BT = jax.lax.stop_gradient(_float(proximal_logp_BT))
  adv_BT = jax.lax.stop_gradient(_float(adv_BT))
  ratio_BT = jnp.exp(jnp.where(on_BT, logp_BT - mu_BT, 0.0))
  centre_BT = jnp.exp(jnp.where(on_BT, prox_BT - mu_BT, 0.0))
  low_BT, high_BT = centre_BT - eps_low, centre_BT + eps_high
  clipped_BT = jnp.clip(ratio_BT, low_BT, high_BT)
  surrogate_BT = jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
  loss_BT = jnp.where(on_BT, -surrogate_BT, 0.0)
  f = lambda c: jnp.where(on_BT & c, 1.0, 0.0)
  return loss_BT, {"ratio_BT": jnp.where(on_BT, ratio_BT, 0.0),
                   "clip_low_BT": f((adv_BT < 0) & (ratio_BT < low_BT)),
                   "clip_high_BT": f((adv_BT > 0) & (ratio_BT > high_BT))}


def kl_convex(logp_BT, base_logp_BT, precedent_logp_BT, *, base_weight: float,
              kind: str = "k3") -> Array:
  """ReMix's KL-convex constraint per token: λ·KL(π_θ‖π_base) + (1−λ)·KL(π_θ‖π_precedent).

  Each KL is the per-token estimator `policy_losses.kl_penalty(kind)` (k3 by
  default); unmasked, the caller aggregates. λ = 1 is the usual reference KL,
  λ = 0 a trust region to the precedent policy only.
  """
  if isinstance(base_weight, (int, float)) and not 0 <= base_weight <= 1:
    raise ValueError(f"base_weight must be in [0, 1], got {base_weight}")
  return (base_weight * policy_losses.kl_penalty(logp_BT, base_logp_BT, kind)
          + (1.0 - base_weight) * policy_losses.kl_penalty(logp_BT, precedent_logp_BT, kind))


def lag_at(step: int, lag: int, reincarnate_step: int = 0) -> int:
  """The actor's lag at learner step `step`: `lag`, or 0 from a reincarnation step on."""
  if lag < 0:
    raise ValueError(f"lag must be >= 0, got {lag}")
  return 0 if reincarnate_step and step >= reincarnate_step else lag


# ---------------------------------------------------------------------------
# The learner's loss stage (called from `RLStep.loss` in one line).
# ---------------------------------------------------------------------------
def corrected_policy_loss(cfg: OffPolicyConfig, loss_BT, pm: dict, logp_BT, proximal_logp_BT,
                          mb: dict, mask_BT, *, eps_low: float, eps_high: float
                          ) -> tuple[Array, dict, dict[str, Array]]:
  """Applies the configured correction to the step's per-token policy loss.

  tis / mis    loss_t · w_t with w from π_proximal / μ (μ: the sampler's log-probs)
  remix        the mix-policy clip loss replaces the configured loss
  vtrace       unchanged here: the advantages were corrected before the update
  Returns (loss_BT, policy-loss metrics, metric sums); staleness metrics
  (IS weights against the sampler) are reported for every correction.
  """
  mu_BT = mb["sampler_logp"]
  mode = cfg.correction if cfg.correction in IS_MODES else "tis"
  w_BT, sums = importance_weights(proximal_logp_BT, mu_BT, mask_BT, cap=cfg.is_cap, mode=mode)
  if cfg.correction in IS_MODES:
    loss_BT = loss_BT * w_BT
  elif cfg.correction == "remix":
    loss_BT, pm = mix_policy_clip_loss(logp_BT, mu_BT, proximal_logp_BT, mb["adv"], mask_BT,
                                       eps_low=eps_low, eps_high=eps_high)
  return loss_BT, pm, sums
