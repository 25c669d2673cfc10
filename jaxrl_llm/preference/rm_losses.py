"""Reward-model losses and reward-ensemble aggregation.

Shape legend:
  B  batch (preference pairs, or scored completions)
  K  ensemble members

All arithmetic is float32 (inputs are upcast).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def bradley_terry(reward_chosen_B: jax.Array, reward_rejected_B: jax.Array, *,
                  margin_B: jax.Array | None = None
                  ) -> tuple[jax.Array, Metrics]:
  """Bradley–Terry reward-model loss: ℓ = −log σ(R(x, y_w) − R(x, y_l) − m).

  Bradley & Terry 1952; as the RM objective in Ouyang et al. 2022 ("Training
  language models to follow instructions with human feedback"). The optional
  margin m (e.g. from graded preference strength, as in Llama 2, Touvron et al.
  2023) asks the chosen reward to lead by at least m; default 0.

  Metrics: margin_B = R_w − R_l (without m), accuracy_B = 1[R_w > R_l],
  reward_chosen_B, reward_rejected_B.
  """
  reward_chosen_B = jnp.asarray(reward_chosen_B, jnp.float32)
  reward_rejected_B = jnp.asarray(reward_rejected_B, jnp.float32)
  if reward_chosen_B.ndim != 1 or reward_chosen_B.shape != reward_rejected_B.shape:
    raise ValueError(
        "bradley_terry: reward_chosen_B and reward_rejected_B must both have "
        f"shape [B]; got {reward_chosen_B.shape} and {reward_rejected_B.shape}.")
  diff_B = reward_chosen_B - reward_rejected_B
  logits_B = diff_B
  if margin_B is not None:
    margin_B = jnp.asarray(margin_B, jnp.float32)
    if margin_B.shape not in ((), diff_B.shape):
      raise ValueError(
          f"bradley_terry: margin_B must have shape {diff_B.shape} or be a "
          f"scalar; got {margin_B.shape}.")
    logits_B = diff_B - margin_B
  loss_B = -jax.nn.log_sigmoid(logits_B)
  metrics = {
      "reward_chosen_B": reward_chosen_B,
      "reward_rejected_B": reward_rejected_B,
      "margin_B": diff_B,
      "accuracy_B": (diff_B > 0).astype(jnp.float32),
  }
  return loss_B, metrics


def _as_members(rewards_KB: jax.Array, fn: str) -> jax.Array:
  rewards_KB = jnp.asarray(rewards_KB, jnp.float32)
  if rewards_KB.ndim != 2 or rewards_KB.shape[0] < 1:
    raise ValueError(
        f"{fn}: rewards_KB must have shape [K, B] with K ≥ 1 members; got "
        f"{rewards_KB.shape}.")
  return rewards_KB


def ensemble_mean(rewards_KB: jax.Array) -> jax.Array:
  """Mean over members: R(x, y) = (1/K) Σ_k R_k(x, y). Returns [B]."""
  return jnp.mean(_as_members(rewards_KB, "ensemble_mean"), axis=0)


def ensemble_worst_case(rewards_KB: jax.Array) -> jax.Array:
  """Worst-case optimisation: R(x, y) = min_k R_k(x, y). Returns [B].

  Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization"
  (WCO): the policy only gains reward that every member agrees on.
  """
  return jnp.min(_as_members(rewards_KB, "ensemble_worst_case"), axis=0)


def ensemble_uncertainty_weighted(rewards_KB: jax.Array, *, lam: float,
                                  ddof: int = 0) -> jax.Array:
  """Uncertainty-weighted optimisation: R = mean_k R_k − λ·Var_k R_k. Returns [B].

  Var_k is the variance across members with `ddof` degrees of freedom removed
  (default 0, population variance, as in the paper's definition). Coste et al.
  2024, "Reward Model Ensembles Help Mitigate Overoptimization" (UWO).
  """
  rewards_KB = _as_members(rewards_KB, "ensemble_uncertainty_weighted")
  if ddof not in (0, 1):
    raise ValueError(
        f"ensemble_uncertainty_weighted: ddof must be 0 or 1, got {ddof}.")
  if ddof >= rewards_KB.shape[0]:
    raise ValueError(
        f"ensemble_uncertainty_weighted: ddof={ddof} needs more than {ddof} "
        f"members; got K={rewards_KB.shape[0]}.")
  return (jnp.mean(rewards_KB, axis=0)
          - lam * jnp.var(rewards_KB, axis=0, ddof=ddof))


# The uncertainty-weighted entry needs its `lam=` keyword at the call.
ENSEMBLE_AGGREGATIONS: dict[str, Callable[..., jax.Array]] = {
    "mean": ensemble_mean,
    "worst_case": ensemble_worst_case,
    "uncertainty_weighted": ensemble_uncertainty_weighted,
}


def get_ensemble_aggregation(name: str) -> Callable[..., jax.Array]:
  """The aggregation called `name`; ValueError listing the choices otherwise."""
  if name not in ENSEMBLE_AGGREGATIONS:
    raise ValueError(
        f"Unknown ensemble aggregation {name!r}; choose from "
        f"{sorted(ENSEMBLE_AGGREGATIONS)}.")
  return ENSEMBLE_AGGREGATIONS[name]
