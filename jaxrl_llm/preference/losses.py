"""Preference-optimisation losses over per-token log-probs (DPO family, KTO).

Every pairwise loss takes a `PairLogps` of per-token log-probs, so that losses
which look inside a sequence (IPO's per-token averages, SimPO / ORPO length
normalisation, D²PO's temporal decay, LD-DPO's length desensitisation) share
one input type with the plain sequence-level losses. Each returns
`(loss_B, metrics)`: a per-example loss (reduce it with the batch's own
aggregation) and a dict of per-example arrays.

Shape legend:
  B  batch (number of preference pairs, or of unpaired examples for KTO)
  T  completion time axis, padded; the chosen and rejected arrays may have
     different T. Prompt positions and padding carry mask 0.

Notation (docs/ALGORITHMS.md, "Preference losses"): with sums over completion tokens
  c = log π_θ(y_w) − log π_ref(y_w),   r = log π_θ(y_l) − log π_ref(y_l),
  h = c − r.
Metrics shared by every pairwise loss:
  reward_chosen_B = β·c, reward_rejected_B = β·r  (implicit rewards; losses
    that redefine c and r, e.g. IPO's per-token means or SimPO's reference-free
    mean log-probs, say so in their docstring),
  margin_B = β·(c − r), accuracy_B = 1[h > 0],
  logps_chosen_B / logps_rejected_B = Σ_t m·log π_θ (policy sequence log-probs).

Pre-DPO ("Pre-DPO: Improving Data Utilization in Direct Preference Optimization
Using a Guiding Reference Model", Pan et al. 2025) is not a separate loss: it is
`dpo` whose reference log-probs come from a guiding reference, i.e. a model
already optimised with a preference loss on the same data, instead of the SFT
initialisation. Pass that model's log-probs as `ref_chosen_BT` /
`ref_rejected_BT`.

All arithmetic is float32 (inputs are upcast): bf16 sums of hundreds of
log-probs lose the small differences that the losses depend on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

# ORPO takes log(1 − p) with p = exp(mean token log-prob); p = 1 exactly would
# give log 0. Capping the mean log-prob here keeps log(1 − p) ≥ log(1e-6).
_ORPO_MAX_MEAN_LOGP = -1e-6


class PairLogps(NamedTuple):
  """Per-token log-probs of a batch of preference pairs (y_w chosen, y_l rejected).

  Attributes:
    chosen_BT: log π_θ of each chosen-completion token.
    rejected_BT: log π_θ of each rejected-completion token.
    ref_chosen_BT: log π_ref of the same chosen tokens; None for reference-free
      losses (simpo, orpo).
    ref_rejected_BT: log π_ref of the same rejected tokens; None likewise.
    chosen_mask_BT: 1 on chosen completion tokens, 0 on prompt and padding.
    rejected_mask_BT: 1 on rejected completion tokens, 0 elsewhere.

  The chosen arrays share one shape and the rejected arrays another; the two T
  may differ. Masks are required by every loss; they default to None only so
  that reference-free pairs can be built by keyword without naming the refs.
  """
  chosen_BT: jax.Array
  rejected_BT: jax.Array
  ref_chosen_BT: jax.Array | None = None
  ref_rejected_BT: jax.Array | None = None
  chosen_mask_BT: jax.Array | None = None
  rejected_mask_BT: jax.Array | None = None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def sequence_logps(logps_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Sequence log-prob Σ_t m_t·log p_t, in float32. Returns [B]."""
  logps_BT = jnp.asarray(logps_BT, jnp.float32)
  mask_BT = jnp.asarray(mask_BT, jnp.float32)
  return jnp.sum(logps_BT * mask_BT, axis=-1)


def mean_logps(logps_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Per-token mean log-prob Σ_t m_t·log p_t / max(Σ_t m_t, 1). Returns [B].

  A row with no completion tokens gives 0 rather than NaN.
  """
  mask_BT = jnp.asarray(mask_BT, jnp.float32)
  length_B = jnp.maximum(jnp.sum(mask_BT, axis=-1), 1.0)
  return sequence_logps(logps_BT, mask_BT) / length_B


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 − exp(x)) for x < 0, numerically stable.

  Uses log(−expm1(x)) for x > −log 2 and log1p(−exp(x)) otherwise (Mächler,
  "Accurately Computing log(1 − exp(−|a|))", 2012). Each branch only ever sees
  inputs on its own side of −log 2, so neither produces an infinite value whose
  zero-weighted gradient would turn into NaN.
  """
  x = jnp.asarray(x, jnp.float32)
  cut = -jnp.log(2.0).astype(jnp.float32)
  near_zero = x > cut
  x_near = jnp.where(near_zero, x, cut)
  x_far = jnp.where(near_zero, cut, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)),
                   jnp.log1p(-jnp.exp(x_far)))


def _check_shapes(pair: PairLogps, loss: str, *, need_ref: bool) -> None:
  if pair.chosen_mask_BT is None or pair.rejected_mask_BT is None:
    raise ValueError(
        f"{loss} requires pair.chosen_mask_BT and pair.rejected_mask_BT; "
        "got None.")
  if need_ref and (pair.ref_chosen_BT is None or pair.ref_rejected_BT is None):
    raise ValueError(
        f"{loss} requires reference log-probs pair.ref_chosen_BT and "
        "pair.ref_rejected_BT; got None (reference-free losses: simpo, orpo).")
  for side in ("chosen", "rejected"):
    shape = jnp.shape(getattr(pair, f"{side}_BT"))
    if len(shape) != 2:
      raise ValueError(f"pair.{side}_BT must have shape [B, T], got {shape}.")
    names = [f"{side}_mask_BT"] + ([f"ref_{side}_BT"] if need_ref else [])
    for name in names:
      other = jnp.shape(getattr(pair, name))
      if other != shape:
        raise ValueError(
            f"pair.{name} has shape {other}; expected {shape} like "
            f"pair.{side}_BT.")
  b_w, b_l = jnp.shape(pair.chosen_BT)[0], jnp.shape(pair.rejected_BT)[0]
  if b_w != b_l:
    raise ValueError(
        f"pair.chosen_BT and pair.rejected_BT disagree on batch size: "
        f"{b_w} vs {b_l}.")


def _log_ratios(pair: PairLogps, loss: str) -> tuple[jax.Array, jax.Array]:
  """(c_B, r_B): summed policy − reference log-probs of chosen and rejected."""
  _check_shapes(pair, loss, need_ref=True)
  c_B = (sequence_logps(pair.chosen_BT, pair.chosen_mask_BT)
         - sequence_logps(pair.ref_chosen_BT, pair.chosen_mask_BT))
  r_B = (sequence_logps(pair.rejected_BT, pair.rejected_mask_BT)
         - sequence_logps(pair.ref_rejected_BT, pair.rejected_mask_BT))
  return c_B, r_B


def _pair_metrics(pair: PairLogps, c_B: jax.Array, r_B: jax.Array,
                  beta: float) -> Metrics:
  return {
      "reward_chosen_B": beta * c_B,
      "reward_rejected_B": beta * r_B,
      "margin_B": beta * (c_B - r_B),
      "accuracy_B": (c_B > r_B).astype(jnp.float32),
      "logps_chosen_B": sequence_logps(pair.chosen_BT, pair.chosen_mask_BT),
      "logps_rejected_B": sequence_logps(pair.rejected_BT,
                                         pair.rejected_mask_BT),
  }


def _completion_index_BT(mask_BT: jax.Array) -> jax.Array:
  """1-based index of each completion token (count of mask-1 positions so far).

  Counting by the mask rather than by array position keeps prompt tokens and
  left padding out of the index.
  """
  return jnp.cumsum(jnp.asarray(mask_BT, jnp.float32), axis=-1)


def _check_range(value: Any, name: str, loss: str, lo: float, hi: float,
                 *, lo_open: bool = False, hi_open: bool = False) -> None:
  """ValueError unless lo ≤ value ≤ hi (ends open as asked).

  Only Python numbers are checked: an array value (e.g. a scheduled β) may be
  traced, and its range is then the caller's responsibility.
  """
  if not isinstance(value, (int, float)):
    return
  ok = (value > lo if lo_open else value >= lo) and (
      value < hi if hi_open else value <= hi)
  if not ok:
    interval = (("(" if lo_open else "[") + f"{lo}, {hi}"
                + (")" if hi_open else "]"))
    raise ValueError(f"{loss}: {name} must lie in {interval}, got {value}.")


def _check_beta(beta: Any, loss: str) -> None:
  _check_range(beta, "beta", loss, 0.0, float("inf"), lo_open=True)


def _check_eps(eps: Any, loss: str) -> None:
  _check_range(eps, "eps", loss, 0.0, 0.5, hi_open=True)


# ---------------------------------------------------------------------------
# Pairwise losses
# ---------------------------------------------------------------------------


def dpo(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """DPO (sigmoid) loss: ℓ = −log σ(β·h), h = c − r.

  Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model". With a guiding reference this is Pre-DPO (module
  docstring).
  """
  _check_beta(beta, "dpo")
  c_B, r_B = _log_ratios(pair, "dpo")
  loss_B = -jax.nn.log_sigmoid(beta * (c_B - r_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def robust(pair: PairLogps, *, beta: float = 0.1,
           eps: float = 0.1) -> tuple[jax.Array, Metrics]:
  """Robust DPO for preference labels flipped with probability ε.

  ℓ = (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε), an unbiased estimate of
  the clean-label DPO loss. Chowdhury et al. 2024, "Provably Robust DPO:
  Aligning Language Models with Noisy Feedback". ε ∈ [0, 0.5); ε = 0 is DPO.
  """
  _check_beta(beta, "robust")
  _check_eps(eps, "robust")
  c_B, r_B = _log_ratios(pair, "robust")
  z_B = beta * (c_B - r_B)
  loss_B = ((-(1.0 - eps) * jax.nn.log_sigmoid(z_B)
             + eps * jax.nn.log_sigmoid(-z_B)) / (1.0 - 2.0 * eps))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def conservative(pair: PairLogps, *, beta: float = 0.1,
                 eps: float = 0.1) -> tuple[jax.Array, Metrics]:
  """Conservative DPO (cDPO), i.e. DPO with label smoothing ε.

  ℓ = −(1−ε)·log σ(βh) − ε·log σ(−βh): binary cross-entropy against the soft
  target 1 − ε. Mitchell 2023, "A note on DPO with noisy preferences & relationship
  to IPO". ε ∈ [0, 0.5); ε = 0 is DPO.
  """
  _check_beta(beta, "conservative")
  _check_eps(eps, "conservative")
  c_B, r_B = _log_ratios(pair, "conservative")
  z_B = beta * (c_B - r_B)
  loss_B = (-(1.0 - eps) * jax.nn.log_sigmoid(z_B)
            - eps * jax.nn.log_sigmoid(-z_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def ipo(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """IPO loss: ℓ = (h̄ − 1/(2β))², regularisation τ = β.

  h̄ = c̄ − r̄ with per-token-averaged log ratios
  c̄ = Σ_t m·(log π_θ − log π_ref)(y_w) / |y_w| (r̄ likewise for y_l), so the
  target margin 1/(2β) does not scale with length. Azar et al. 2023, "A General
  Theoretical Paradigm to Understand Learning from Human Preferences".
  Metrics use c̄ and r̄ in place of c and r.
  """
  _check_beta(beta, "ipo")
  _check_shapes(pair, "ipo", need_ref=True)
  c_B = (mean_logps(pair.chosen_BT, pair.chosen_mask_BT)
         - mean_logps(pair.ref_chosen_BT, pair.chosen_mask_BT))
  r_B = (mean_logps(pair.rejected_BT, pair.rejected_mask_BT)
         - mean_logps(pair.ref_rejected_BT, pair.rejected_mask_BT))
  loss_B = jnp.square(c_B - r_B - 1.0 / (2.0 * beta))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def hinge(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """SLiC hinge loss on the log-ratio margin: ℓ = max(0, 1 − βh).

  Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback" (calibration margin 1/β), in its reference-normalised form as
  analysed by Liu et al. 2024 ("Statistical Rejection Sampling Improves
  Preference Optimization").
  """
  _check_beta(beta, "hinge")
  c_B, r_B = _log_ratios(pair, "hinge")
  loss_B = jax.nn.relu(1.0 - beta * (c_B - r_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def simpo(pair: PairLogps, *, beta: float = 2.0,
          gamma: float = 1.0) -> tuple[jax.Array, Metrics]:
  """SimPO loss (reference-free, length-normalised).

  ℓ = −log σ(β/|y_w|·log π_θ(y_w) − β/|y_l|·log π_θ(y_l) − γ), with
  |y| = Σ_t m_t and log π_θ(y) = Σ_t m_t·log π_θ(y_t). Meng et al. 2024,
  "SimPO: Simple Preference Optimization with a Reference-Free Reward". The
  paper uses β ≈ 2–2.5 and γ/β ≈ 0.5 (defaults β = 2, γ = 1). Reference
  log-probs in `pair`, if any, are ignored. Metrics use the mean token
  log-probs as c and r (reward = β·mean log-prob; accuracy ignores γ).
  """
  _check_beta(beta, "simpo")
  _check_shapes(pair, "simpo", need_ref=False)
  c_B = mean_logps(pair.chosen_BT, pair.chosen_mask_BT)
  r_B = mean_logps(pair.rejected_BT, pair.rejected_mask_BT)
  loss_B = -jax.nn.log_sigmoid(beta * (c_B - r_B) - gamma)
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def orpo(pair: PairLogps, *, beta: float = 0.1,
         lam: float = 0.1) -> tuple[jax.Array, Metrics]:
  """ORPO loss (reference-free).

  ℓ = NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)), with
  NLL(y_w) = −Σ_t m·log π_θ(y_w,t) / |y_w| (per-token mean). With
  p(y) = exp(mean token log-prob) and odds = p / (1 − p):
  log odds(y) = log p − log(1 − p), where log(1 − p) = log1mexp(log p) is
  computed stably; log p is capped at −1e-6 so that p = 1 stays finite.
  Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
  Reference Model" (λ = 0.1 there). `beta` only scales the reported rewards
  (β·mean log-prob, as c and r); it does not enter the loss.
  Extra metrics: nll_chosen_B, log_odds_ratio_B.
  """
  _check_range(lam, "lam", "orpo", 0.0, float("inf"))
  _check_shapes(pair, "orpo", need_ref=False)
  c_B = mean_logps(pair.chosen_BT, pair.chosen_mask_BT)
  r_B = mean_logps(pair.rejected_BT, pair.rejected_mask_BT)
  c_cap_B = jnp.minimum(c_B, _ORPO_MAX_MEAN_LOGP)
  r_cap_B = jnp.minimum(r_B, _ORPO_MAX_MEAN_LOGP)
  log_odds_ratio_B = (c_cap_B - log1mexp(c_cap_B)) - (r_cap_B - log1mexp(r_cap_B))
  nll_B = -c_B
  loss_B = nll_B - lam * jax.nn.log_sigmoid(log_odds_ratio_B)
  metrics = _pair_metrics(pair, c_B, r_B, beta)
  metrics["nll_chosen_B"] = nll_B
  metrics["log_odds_ratio_B"] = log_odds_ratio_B
  return loss_B, metrics


def rpo(pair: PairLogps, *, beta: float = 0.1,
        eta: float = 1.0) -> tuple[jax.Array, Metrics]:
  """RPO: DPO plus a per-token NLL on the chosen completion.

  ℓ = −log σ(βh) + η·NLL(y_w), NLL(y_w) = −Σ_t m·log π_θ(y_w,t) / |y_w|.
  The SFT term keeps probability mass on the preferred answers. Liu et al.
  2024, "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is
  Implicitly an Adversarial Regularizer" (also Pang et al. 2024, "Iterative
  Reasoning Preference Optimization"). Extra metric: nll_chosen_B.
  """
  _check_beta(beta, "rpo")
  c_B, r_B = _log_ratios(pair, "rpo")
  nll_B = -mean_logps(pair.chosen_BT, pair.chosen_mask_BT)
  loss_B = -jax.nn.log_sigmoid(beta * (c_B - r_B)) + eta * nll_B
  metrics = _pair_metrics(pair, c_B, r_B, beta)
  metrics["nll_chosen_B"] = nll_B
  return loss_B, metrics


def apo_zero(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """APO-zero: ℓ = (1 − σ(βc)) + σ(βr).

  Raises the chosen likelihood and lowers the rejected one independently; for
  chosen answers better than the model's own outputs. D'Oosterlinck et al.
  2024, "Anchored Preference Optimization and Contrastive Revisions".
  """
  _check_beta(beta, "apo_zero")
  c_B, r_B = _log_ratios(pair, "apo_zero")
  loss_B = (1.0 - jax.nn.sigmoid(beta * c_B)) + jax.nn.sigmoid(beta * r_B)
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def apo_down(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """APO-down: ℓ = σ(βc) + (1 − σ(β(c − r))).

  Lowers the chosen likelihood while keeping the rejected one lower still; for
  chosen answers worse than the model's own outputs. D'Oosterlinck et al.
  2024, "Anchored Preference Optimization and Contrastive Revisions".
  """
  _check_beta(beta, "apo_down")
  c_B, r_B = _log_ratios(pair, "apo_down")
  loss_B = jax.nn.sigmoid(beta * c_B) + (1.0 - jax.nn.sigmoid(beta * (c_B - r_B)))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def nca(pair: PairLogps, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
  """Pairwise NCA: ℓ = −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr).

  Noise-contrastive alignment with K = 2 responses: optimises absolute
  likelihoods (each implicit reward against the noise class) rather than only
  their difference, so the chosen likelihood does not fall with the rejected
  one. Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
  Explicit Rewards".
  """
  _check_beta(beta, "nca")
  c_B, r_B = _log_ratios(pair, "nca")
  loss_B = (-jax.nn.log_sigmoid(beta * c_B)
            - 0.5 * jax.nn.log_sigmoid(-beta * c_B)
            - 0.5 * jax.nn.log_sigmoid(-beta * r_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def bco_pair(pair: PairLogps, *, beta: float = 0.1,
             delta: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """BCO on pairs: ℓ = −log σ(βc − δ) − log σ(−(βr − δ)).

  Binary classification of chosen (label 1) vs rejected (label 0) by the
  implicit reward βc / βr, shifted by the reward shift δ. Jung et al. 2024,
  "Binary Classifier Optimization for Large Language Model Alignment".

  δ: the paper's running mean of implicit rewards over training, i.e. an
  exponential moving average of mean(βc, βr). The caller owns that state: pass
  the current estimate as `delta` (a scalar; it is treated as a constant,
  stop_gradient) and update it from `metrics["reward_mean_B"].mean()`, the
  per-pair mean (βc + βr)/2. With delta=None the current batch mean of
  (βc, βr) is used, which is a noisier single-batch estimate.
  Extra metrics: reward_mean_B, reward_shift_B (δ broadcast to [B]).
  """
  _check_beta(beta, "bco_pair")
  c_B, r_B = _log_ratios(pair, "bco_pair")
  reward_mean_B = 0.5 * beta * (c_B + r_B)
  if delta is None:
    delta = jnp.mean(reward_mean_B)
  delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
  if delta.ndim != 0:
    raise ValueError(f"bco_pair: delta must be a scalar, got shape {delta.shape}.")
  loss_B = (-jax.nn.log_sigmoid(beta * c_B - delta)
            - jax.nn.log_sigmoid(-(beta * r_B - delta)))
  metrics = _pair_metrics(pair, c_B, r_B, beta)
  metrics["reward_mean_B"] = reward_mean_B
  metrics["reward_shift_B"] = jnp.broadcast_to(delta, c_B.shape)
  return loss_B, metrics


def d2po(pair: PairLogps, *, beta: float = 0.1,
         gamma: float = 0.98) -> tuple[jax.Array, Metrics]:
  """D²PO: DPO with temporally decayed token log ratios.

  c_γ = Σ_t m_t·γ^{k_t}·(log π_θ − log π_ref)(y_w,t), r_γ likewise for y_l,
  where k_t = 0, 1, 2, ... counts completion tokens (mask 1) from the first;
  ℓ = −log σ(β·(c_γ − r_γ)). γ < 1 makes earlier tokens count more; γ = 1 is
  DPO. Shao et al. 2025, "Earlier Tokens Contribute More: Learning Direct
  Preference Optimization From Temporal Decay Perspective". Metrics use c_γ
  and r_γ.
  """
  _check_beta(beta, "d2po")
  _check_range(gamma, "gamma", "d2po", 0.0, 1.0, lo_open=True)
  _check_shapes(pair, "d2po", need_ref=True)

  def decayed(logps_BT, ref_BT, mask_BT):
    k_BT = _completion_index_BT(mask_BT) - 1.0
    weight_BT = jnp.power(jnp.float32(gamma), jnp.maximum(k_BT, 0.0))
    diff_BT = (jnp.asarray(logps_BT, jnp.float32)
               - jnp.asarray(ref_BT, jnp.float32))
    return sequence_logps(weight_BT * diff_BT, mask_BT)

  c_B = decayed(pair.chosen_BT, pair.ref_chosen_BT, pair.chosen_mask_BT)
  r_B = decayed(pair.rejected_BT, pair.ref_rejected_BT, pair.rejected_mask_BT)
  loss_B = -jax.nn.log_sigmoid(beta * (c_B - r_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


def ld_dpo(pair: PairLogps, *, beta: float = 0.1,
           alpha: float = 0.5) -> tuple[jax.Array, Metrics]:
  """LD-DPO: DPO on length-desensitised log-probs.

  With l_p = min(|y_w|, |y_l|) per pair and k_t the 1-based completion-token
  index, each sequence log-prob (policy and reference alike) becomes
  log π̃(y) = Σ_{k_t ≤ l_p} m·log π(y_t) + α·Σ_{k_t > l_p} m·log π(y_t),
  and ℓ = −log σ(β·(c̃ − r̃)) with c̃, r̃ the resulting log ratios. α ∈ [0, 1]
  damps the excess length of the longer response; α = 1 is DPO. Liu et al.
  2024, "Length Desensitization in Direct Preference Optimization". Metrics
  use c̃ and r̃.
  """
  _check_beta(beta, "ld_dpo")
  _check_range(alpha, "alpha", "ld_dpo", 0.0, 1.0)
  _check_shapes(pair, "ld_dpo", need_ref=True)
  len_w_B = jnp.sum(jnp.asarray(pair.chosen_mask_BT, jnp.float32), axis=-1)
  len_l_B = jnp.sum(jnp.asarray(pair.rejected_mask_BT, jnp.float32), axis=-1)
  shared_B1 = jnp.minimum(len_w_B, len_l_B)[:, None]

  def desensitised(logps_BT, ref_BT, mask_BT):
    weight_BT = jnp.where(_completion_index_BT(mask_BT) > shared_B1, alpha, 1.0)
    return (sequence_logps(weight_BT * jnp.asarray(logps_BT, jnp.float32), mask_BT)
            - sequence_logps(weight_BT * jnp.asarray(ref_BT, jnp.float32), mask_BT))

  c_B = desensitised(pair.chosen_BT, pair.ref_chosen_BT, pair.chosen_mask_BT)
  r_B = desensitised(pair.rejected_BT, pair.ref_rejected_BT, pair.rejected_mask_BT)
  loss_B = -jax.nn.log_sigmoid(beta * (c_B - r_B))
  return loss_B, _pair_metrics(pair, c_B, r_B, beta)


PAIR_LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "dpo": dpo,
    "robust": robust,
    "conservative": conservative,
    "ipo": ipo,
    "hinge": hinge,
    "simpo": simpo,
    "orpo": orpo,
    "rpo": rpo,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "nca": nca,
    "bco_pair": bco_pair,
    "d2po": d2po,
    "ld_dpo": ld_dpo,
}


def get_pair_loss(name: str) -> Callable[..., tuple[jax.Array, Metrics]]:
  """The pairwise loss called `name`; ValueError listing the choices otherwise."""
  if name not in PAIR_LOSSES:
    raise ValueError(
        f"Unknown preference loss {name!r}; choose from {sorted(PAIR_LOSSES)}.")
  return PAIR_LOSSES[name]


def _keyword_options(fn: Callable[..., Any]) -> set[str]:
  return {p.name for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


def combined_loss(pair: PairLogps, weights: dict[str, float],
                  **opts: Any) -> tuple[jax.Array, Metrics]:
  """Weighted sum of pairwise losses: ℓ = Σ_name w_name·ℓ_name.

  E.g. `combined_loss(pair, {"dpo": 1.0, "hinge": 0.5}, beta=0.1)` (mixing
  objectives as in MPO-style multi-loss training). Each option in `opts` goes
  to every selected loss that takes a keyword of that name (so `beta` is
  shared, `eps` reaches robust / conservative only); an option that no
  selected loss takes is a ValueError, as is an unknown loss name.

  Returns the combined loss_B and metrics keyed "<name>/<metric>", plus
  "<name>/loss_B" with each unweighted component.
  """
  if not weights:
    raise ValueError(
        f"combined_loss: weights is empty; name at least one of "
        f"{sorted(PAIR_LOSSES)}.")
  fns = {name: get_pair_loss(name) for name in weights}
  accepted = {name: _keyword_options(fn) for name, fn in fns.items()}
  unused = set(opts) - set().union(*accepted.values())
  if unused:
    raise ValueError(
        f"combined_loss: options {sorted(unused)} are taken by none of "
        f"{sorted(weights)}; their options are "
        f"{ {n: sorted(a) for n, a in accepted.items()} }.")
  total_B = None
  metrics: Metrics = {}
  for name, weight in weights.items():
    loss_B, m = fns[name](pair, **{k: v for k, v in opts.items()
                                   if k in accepted[name]})
    total_B = weight * loss_B if total_B is None else total_B + weight * loss_B
    metrics[f"{name}/loss_B"] = loss_B
    metrics.update({f"{name}/{k}": v for k, v in m.items()})
  return total_B, metrics


# ---------------------------------------------------------------------------
# Unpaired: KTO
# ---------------------------------------------------------------------------


def kto(logps_BT: jax.Array, ref_logps_BT: jax.Array, mask_BT: jax.Array,
        desirable_B: jax.Array, *, beta: float = 0.1, lambda_d: float = 1.0,
        lambda_u: float = 1.0,
        kl_ref: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """KTO loss for unpaired desirable / undesirable completions.

  With c = Σ_t m·(log π_θ − log π_ref) per example and reference point
  z = stop_gradient(max(0, KL̂)):
    desirable:   ℓ = λ_D·(1 − σ(β·(c − z)))
    undesirable: ℓ = λ_U·(1 − σ(β·(z − c)))
  Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization". λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] is the paper's advice for
  imbalanced data.

  Args:
    logps_BT, ref_logps_BT: policy / reference log-probs of completion tokens.
    mask_BT: 1 on completion tokens.
    desirable_B: bool (or 0/1) label per example.
    kl_ref: the KL estimate KL̂ (a scalar). The paper estimates
      KL(π_θ ‖ π_ref) from mismatched (prompt, completion) pairs of the batch;
      pass such an estimate here. If None, KL̂ is the batch mean of c over this
      batch's own completions: a cheap single-batch estimate that depends on
      the batch and its desirable/undesirable mix.

  Metrics: reward_B = β·c, desirable_B, kl_ref_B (z broadcast),
    accuracy_B = 1[c > z] for desirable, 1[c < z] for undesirable.
  """
  _check_beta(beta, "kto")
  shape = jnp.shape(logps_BT)
  if len(shape) != 2:
    raise ValueError(f"kto: logps_BT must have shape [B, T], got {shape}.")
  for name, arr in (("ref_logps_BT", ref_logps_BT), ("mask_BT", mask_BT)):
    if jnp.shape(arr) != shape:
      raise ValueError(
          f"kto: {name} has shape {jnp.shape(arr)}; expected {shape}.")
  if jnp.shape(desirable_B) != shape[:1]:
    raise ValueError(
        f"kto: desirable_B has shape {jnp.shape(desirable_B)}; "
        f"expected {shape[:1]}.")
  c_B = sequence_logps(logps_BT, mask_BT) - sequence_logps(ref_logps_BT, mask_BT)
  kl = jnp.mean(c_B) if kl_ref is None else jnp.asarray(kl_ref, jnp.float32)
  if kl.ndim != 0:
    raise ValueError(f"kto: kl_ref must be a scalar, got shape {kl.shape}.")
  z = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
  desirable_B = jnp.asarray(desirable_B).astype(bool)
  loss_B = jnp.where(desirable_B,
                     lambda_d * (1.0 - jax.nn.sigmoid(beta * (c_B - z))),
                     lambda_u * (1.0 - jax.nn.sigmoid(beta * (z - c_B))))
  metrics = {
      "reward_B": beta * c_B,
      "desirable_B": desirable_B.astype(jnp.float32),
      "kl_ref_B": jnp.broadcast_to(z, c_B.shape),
      "accuracy_B": jnp.where(desirable_B, c_B > z, c_B < z).astype(jnp.float32),
  }
  return loss_B, metrics
