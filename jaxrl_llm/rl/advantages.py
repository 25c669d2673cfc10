"""Advantage estimators for RL post-training of language models.

Outcome rewards arrive flat, one per completion, with the G completions of a
prompt stored contiguously: row b = p * G + g holds completion g of prompt p,
so ``rewards_B.reshape(P, G)`` recovers the groups.

Every outcome estimator takes an optional ``valid_B`` mask (bool, or numeric
where nonzero means valid). Invalid rows, e.g. groups dropped by DAPO dynamic
sampling or padding rows kept for static shapes, get advantage 0 and never
enter a group or batch statistic. A group is therefore summarised over its
valid members only; with every row valid the formulas reduce to the ones in
the papers.

All math is done in float32 (inputs of lower precision are upcast; float64
inputs stay float64 so finite-difference tests can run in double precision).
The functions are pure and un-jitted: jit the training step that calls them.

Estimators are looked up by name (`compute_advantages`, ``RLConfig.advantage``)
in the live registry ``OUTCOME_ESTIMATORS``; add one with
`register_advantage_estimator`.

Shape suffixes:
  B: sequences (completions) in the batch, B = P * G.
  P: prompts (groups) in the batch.
  G: group size (completions per prompt).
  T: completion time (token position within the completion).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrl_llm.rl import registry

Array = jax.Array


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _float(x: Any) -> Array:
  """Casts to at least float32 (bf16 -> f32; f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_rewards(rewards_B: Any) -> Array:
  rewards_B = _float(rewards_B)
  if rewards_B.ndim != 1:
    raise ValueError(
        f"rewards_B must be 1-D (one reward per completion), got shape "
        f"{rewards_B.shape}.")
  return rewards_B


def _check_group_size(num_rows: int, group_size: Any) -> int:
  if (not isinstance(group_size, int) or isinstance(group_size, bool)
      or group_size < 1):
    raise ValueError(
        f"group_size must be a positive Python int, got {group_size!r}.")
  if num_rows % group_size:
    raise ValueError(
        f"The batch size ({num_rows}) must be a multiple of group_size "
        f"({group_size}); groups are stored contiguously.")
  return group_size


def _valid_mask(valid_B: Any, num_rows: int, dtype: Any) -> Array:
  """A {0, 1} float mask of shape (B,); all ones when valid_B is None."""
  if valid_B is None:
    return jnp.ones((num_rows,), dtype)
  valid_B = jnp.asarray(valid_B)
  if valid_B.shape != (num_rows,):
    raise ValueError(
        f"valid_B must have shape ({num_rows},) to match rewards_B, got "
        f"{valid_B.shape}.")
  return (valid_B != 0).astype(dtype)


def _masked_mean_std(x: Array, m: Array, ddof: int) -> tuple[Array, Array]:
  """Mean and std of x over entries where m == 1 (all axes).

  var = Σ m (x − mean)² / max(n − ddof, 1) with n = Σ m, so a single valid
  entry (or none) gives std 0 instead of NaN.
  """
  n = jnp.sum(m)
  x = jnp.where(m > 0, x, 0.0)
  mean = jnp.sum(x * m) / jnp.maximum(n, 1.0)
  var = jnp.sum(m * (x - mean) ** 2) / jnp.maximum(n - ddof, 1.0)
  return mean, jnp.sqrt(var)


def _group_moments(
    rewards_B: Array, group_size: int, m_B: Array, ddof: int
) -> tuple[Array, Array, Array]:
  """Per-group (count_P, mean_P, std_P) over valid members of each group."""
  r_PG = jnp.where(m_B > 0, rewards_B, 0.0).reshape(-1, group_size)
  m_PG = m_B.reshape(-1, group_size)
  n_P = jnp.sum(m_PG, axis=-1)
  mean_P = jnp.sum(r_PG * m_PG, axis=-1) / jnp.maximum(n_P, 1.0)
  sq_P = jnp.sum(m_PG * (r_PG - mean_P[:, None]) ** 2, axis=-1)
  std_P = jnp.sqrt(sq_P / jnp.maximum(n_P - ddof, 1.0))
  return n_P, mean_P, std_P


def _per_row(x_P: Array, group_size: int) -> Array:
  """Repeats a per-group value for every row of its group: (P,) -> (B,)."""
  return jnp.repeat(
      x_P, group_size, total_repeat_length=x_P.shape[0] * group_size)


def _check_mask_BT(mask_BT: Any, num_rows: int | None = None) -> Array:
  mask_BT = jnp.asarray(mask_BT)
  if mask_BT.ndim != 2:
    raise ValueError(f"mask_BT must be 2-D (B, T), got shape {mask_BT.shape}.")
  if num_rows is not None and mask_BT.shape[0] != num_rows:
    raise ValueError(
        f"mask_BT has {mask_BT.shape[0]} rows but there are {num_rows} "
        f"rewards; they must match.")
  return mask_BT


# --------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------


class GroupStats(NamedTuple):
  """Per-group reward statistics (see `group_stats`)."""
  mean_P: Array           # mean reward of each group's valid members
  std_P: Array            # std (with the requested ddof) of the same
  count_P: Array          # number of valid members of each group
  zero_variance_P: Array  # bool: all valid rewards of the group are equal
  zero_variance_B: Array  # zero_variance_P repeated for every row of a group


def group_stats(
    rewards_B: Any,
    group_size: int,
    *,
    ddof: int = 0,
    valid_B: Any = None,
) -> GroupStats:
  """Per-group reward mean / std and a zero-variance flag.

  mean_p = (1/n_p) Σ_{g valid} r_{p,g};  std_p = sqrt(Σ (r − mean_p)² /
  max(n_p − ddof, 1)), ddof=0 by default. ``zero_variance`` is an exact test
  (max == min over the group's valid rewards, not a tolerance on std), so a
  group of identical rewards is always flagged; a group with no valid member
  is flagged too (it carries no learning signal).

  Such groups have zero advantage under every group-baselined estimator; the
  fraction of flagged groups is a standard metric, and DAPO's dynamic sampling
  drops them (DAPO, Yu et al. 2025).
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  n_P, mean_P, std_P = _group_moments(rewards_B, group_size, m_B, ddof)
  valid_PG = m_B.reshape(-1, group_size) > 0
  r_PG = rewards_B.reshape(-1, group_size)
  hi_P = jnp.max(jnp.where(valid_PG, r_PG, -jnp.inf), axis=-1)
  lo_P = jnp.min(jnp.where(valid_PG, r_PG, jnp.inf), axis=-1)
  zero_var_P = (hi_P == lo_P) | (n_P == 0)
  return GroupStats(
      mean_P=mean_P,
      std_P=std_P,
      count_P=n_P,
      zero_variance_P=zero_var_P,
      zero_variance_B=_per_row(zero_var_P, group_size),
  )


# --------------------------------------------------------------------------
# Outcome estimators: (rewards_B, group_size, *, valid_B, **opts) -> adv_B
# --------------------------------------------------------------------------


def grpo(
    rewards_B: Any,
    group_size: int,
    *,
    ddof: int = 1,
    eps: float = 1e-4,
    valid_B: Any = None,
) -> Array:
  """GRPO group-normalised advantage (DeepSeekMath, Shao et al. 2024).

  A_i = (r_i − mean_g r) / (std_g r + eps), with mean and std over the valid
  members of i's group. std uses ``ddof`` (1 by default, the unbiased
  estimator used by the reference implementation; set 0 for the population
  std). A group with one valid member has std 0 and advantage 0.
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  _, mean_P, std_P = _group_moments(rewards_B, group_size, m_B, ddof)
  adv_B = (rewards_B - _per_row(mean_P, group_size)) / (
      _per_row(std_P, group_size) + eps)
  return jnp.where(m_B > 0, adv_B, 0.0)


def dr_grpo(rewards_B: Any, group_size: int, *, valid_B: Any = None) -> Array:
  """Dr. GRPO advantage: A_i = r_i − mean_g r (no std division).

  Removing the std division (and the per-response length normalisation, see
  ``policy_losses.aggregate(mode="seq_mean_token_sum_norm")``) removes the
  question-difficulty and length biases of GRPO ("Understanding R1-Zero-Like
  Training", Liu et al. 2025).
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  _, mean_P, _ = _group_moments(rewards_B, group_size, m_B, 0)
  adv_B = rewards_B - _per_row(mean_P, group_size)
  return jnp.where(m_B > 0, adv_B, 0.0)


def rloo(rewards_B: Any, group_size: int, *, valid_B: Any = None) -> Array:
  """REINFORCE leave-one-out advantage (RLOO, Ahmadian et al. 2024).

  A_i = r_i − (1/(n−1)) Σ_{j≠i} r_j = n/(n−1) · (r_i − mean_g r), where n is
  the number of valid members of the group (n = G without masking). Groups
  with fewer than 2 valid members get advantage 0. Requires group_size >= 2.
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  if group_size < 2:
    raise ValueError(
        f"rloo needs group_size >= 2 for a leave-one-out baseline, got "
        f"{group_size}.")
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  n_P, mean_P, _ = _group_moments(rewards_B, group_size, m_B, 0)
  scale_P = jnp.where(n_P >= 2, n_P / jnp.maximum(n_P - 1.0, 1.0), 0.0)
  adv_B = _per_row(scale_P, group_size) * (
      rewards_B - _per_row(mean_P, group_size))
  return jnp.where(m_B > 0, adv_B, 0.0)


def batch_std(
    rewards_B: Any,
    group_size: int,
    *,
    eps: float = 1e-4,
    ddof: int = 0,
    valid_B: Any = None,
) -> Array:
  """Group-mean baseline with batch-level std (DLER, Liu et al. 2025).

  A_i = (r_i − mean_g r) / (std_batch r + eps), where std_batch is the std of
  the raw rewards over every valid row of the batch (ddof=0 by default).
  Dividing by one batch-wide scale instead of each group's std keeps
  low-variance (nearly solved or nearly unsolvable) groups from being
  amplified.
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  _, mean_P, _ = _group_moments(rewards_B, group_size, m_B, 0)
  _, std = _masked_mean_std(rewards_B, m_B, ddof)
  adv_B = (rewards_B - _per_row(mean_P, group_size)) / (std + eps)
  return jnp.where(m_B > 0, adv_B, 0.0)


def reinforce_pp_baseline(
    rewards_B: Any,
    group_size: int,
    *,
    eps: float = 1e-4,
    ddof: int = 0,
    valid_B: Any = None,
) -> Array:
  """REINFORCE++-baseline advantage (REINFORCE++, Hu et al. 2025).

  A'_i = r_i − mean_g r, then whitened over the valid batch:
  A_i = (A'_i − mean_batch A') / (std_batch A' + eps), ddof=0 by default.
  (mean_batch A' is 0 when all groups are fully valid; it is kept so that
  partially valid groups are still centred.)
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  _, mean_P, _ = _group_moments(rewards_B, group_size, m_B, 0)
  centred_B = rewards_B - _per_row(mean_P, group_size)
  mean, std = _masked_mean_std(centred_B, m_B, ddof)
  adv_B = (centred_B - mean) / (std + eps)
  return jnp.where(m_B > 0, adv_B, 0.0)


# --------------------------------------------------------------------------
# COPO: a global, consistency-based advantage blended with the local one
# --------------------------------------------------------------------------

COPO_BLENDS: tuple[str, ...] = ("soft_with_zero", "soft", "soft_with_forced")


class CopoTerms(NamedTuple):
  """The pieces of the COPO advantage (see `copo_terms`)."""
  adv_B: Array            # blended advantage (1 − w_i)·A^glob_i + w_i·A^loc_i
  local_B: Array          # A^loc: the GRPO advantage within the group
  global_B: Array         # A^glob: the group's global reward, standardised over groups
  weight_B: Array         # w_i: weight of the local advantage
  entropy_P: Array        # H_p: outcome entropy of each group, in bits
  global_reward_P: Array  # R_p: global (consistency) reward of each group


def _group_entropy_bits(labels_B: Array, group_size: int, m_B: Array) -> Array:
  """H_p = −Σ_a q_a log2 q_a over the outcome labels of group p's valid rows.

  q_a is the fraction of the group's valid rows whose label is a. Computed as
  H_p = −(1/n_p) Σ_{i valid} log2(c_i / n_p), with c_i the number of valid rows
  sharing row i's label, so no label vocabulary is needed (labels only compare
  for equality).
  """
  labels_PG = labels_B.reshape(-1, group_size)
  m_PG = m_B.reshape(-1, group_size)
  same_PGG = labels_PG[:, :, None] == labels_PG[:, None, :]
  count_PG = jnp.sum(jnp.where(same_PGG, m_PG[:, None, :], 0.0), axis=-1)
  n_P1 = jnp.maximum(jnp.sum(m_PG, axis=-1, keepdims=True), 1.0)
  # where() keeps invalid rows (count 0, or NaN labels) out of the log.
  log_q_PG = jnp.where(m_PG > 0, jnp.log2(jnp.maximum(count_PG, 1.0) / n_P1), 0.0)
  return -jnp.sum(m_PG * log_q_PG, axis=-1) / n_P1[:, 0]


def copo_terms(
    rewards_B: Any,
    group_size: int,
    *,
    answers_B: Any = None,
    k: float = 5.0,
    b: float = 1.0,
    blend: str = "soft_with_zero",
    consistency_coef: bool = False,
    eps: float = 1e-4,
    ddof: int = 1,
    valid_B: Any = None,
) -> CopoTerms:
  """COPO advantage and its parts (Han et al. 2025, "COPO: Consistency-Aware
  Policy Optimization", arXiv:2508.04138; formulas as in the authors' released
  code, github.com/hijih/copo-code, whose ``soft-with-zero`` mode is COPO).

  For group p with valid members i (n_p of them) and outcome labels a_i:
    local       A^loc_i  = (r_i − mean_p r) / (std_p r + eps)          (GRPO)
    entropy     H_p      = −Σ_a q_a log2 q_a, q_a = fraction of the group with label a
    global      R_p      = mean_p r · c_p,  c_p = 1 − λ_p H_p if consistency_coef
                           else 1,  λ_p = (1 − 1/n_p) / log2 n_p
                A^glob_i = (R_p − mean_P R) / (std_P R + eps)
                           (mean and std over the groups of the batch)
    weight      s_p      = sigmoid(k · (H_p − b))
                w_i      = s_p · [r_i ≠ 0]      blend="soft_with_zero" (COPO)
                         = s_p                  blend="soft"
                         = s_p · [A^loc_i ≠ 0]  blend="soft_with_forced"
    advantage   A_i      = (1 − w_i) · A^glob_i + w_i · A^loc_i
  Both stds use ``ddof`` (1 by default, as the reference code's torch.std).
  A group whose outcomes are all equal has A^loc = 0 but still gets
  (1 − w_i)·A^glob_i ≠ 0 as long as its global reward differs from the batch
  mean: that is COPO's fix for GRPO's vanishing gradient. Confident (low
  entropy) groups lean on the global advantage, diverse ones on the local one.
  Defaults k = 5 (the paper's γ) and b = 1 (ρ) are those of the released
  ``run_copo.sh``, which also leaves consistency_coef off.

  ``answers_B`` are the outcome labels a_i (e.g. an id of each completion's
  final answer; only equality matters). The paper uses the extracted final
  answers. With ``answers_B=None`` the rewards themselves are the labels, a
  coarser measure: with 0/1 rewards H_p ≤ 1 bit, and all wrong answers count
  as one outcome.

  The paper blends two clipped PPO losses, (1 − w)·ℓ(A^glob) + w·ℓ(A^loc);
  blending the advantages instead gives the same loss value and gradient while
  every token's ratio stays inside the clip range (always true for one update
  per step, where ρ = 1) and may differ once clipping is active.
  """
  rewards_B = _check_rewards(rewards_B)
  group_size = _check_group_size(rewards_B.shape[0], group_size)
  if blend not in COPO_BLENDS:
    raise ValueError(f"Unknown COPO blend {blend!r}; valid blends: {', '.join(COPO_BLENDS)}.")
  num_rows = rewards_B.shape[0]
  m_B = _valid_mask(valid_B, num_rows, rewards_B.dtype)
  if answers_B is None:
    labels_B = rewards_B
  else:
    labels_B = jnp.asarray(answers_B)
    if labels_B.shape != (num_rows,):
      raise ValueError(
          f"answers_B must have shape ({num_rows},) to match rewards_B, got "
          f"{labels_B.shape}.")

  local_B = grpo(rewards_B, group_size, ddof=ddof, eps=eps, valid_B=m_B)
  entropy_P = _group_entropy_bits(labels_B, group_size, m_B)
  n_P, mean_P, _ = _group_moments(rewards_B, group_size, m_B, 0)
  global_reward_P = mean_P
  if consistency_coef:
    log2_n_P = jnp.log2(jnp.maximum(n_P, 2.0))
    lam_P = jnp.where(n_P >= 2, (1.0 - 1.0 / jnp.maximum(n_P, 1.0)) / log2_n_P, 0.0)
    global_reward_P = mean_P * (1.0 - lam_P * entropy_P)
  has_rows_P = (n_P > 0).astype(rewards_B.dtype)
  batch_mean, batch_std = _masked_mean_std(global_reward_P, has_rows_P, ddof)
  global_B = _per_row((global_reward_P - batch_mean) / (batch_std + eps), group_size)

  weight_B = _per_row(jax.nn.sigmoid(k * (entropy_P - b)), group_size)
  if blend == "soft_with_zero":
    weight_B = weight_B * (rewards_B != 0)
  elif blend == "soft_with_forced":
    weight_B = weight_B * (local_B != 0)
  on_B = m_B > 0
  adv_B = (1.0 - weight_B) * global_B + weight_B * local_B
  return CopoTerms(
      adv_B=jnp.where(on_B, adv_B, 0.0),
      local_B=local_B,
      global_B=jnp.where(on_B, global_B, 0.0),
      weight_B=jnp.where(on_B, weight_B, 0.0),
      entropy_P=entropy_P,
      global_reward_P=global_reward_P,
  )


def copo(
    rewards_B: Any,
    group_size: int,
    *,
    answers_B: Any = None,
    k: float = 5.0,
    b: float = 1.0,
    blend: str = "soft_with_zero",
    consistency_coef: bool = False,
    eps: float = 1e-4,
    ddof: int = 1,
    valid_B: Any = None,
) -> Array:
  """COPO advantage A_i = (1 − w_i)·A^glob_i + w_i·A^loc_i; see `copo_terms`."""
  return copo_terms(rewards_B, group_size, answers_B=answers_B, k=k, b=b, blend=blend,
                    consistency_coef=consistency_coef, eps=eps, ddof=ddof,
                    valid_B=valid_B).adv_B


OUTCOME_ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "batch_std": batch_std,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "copo": copo,
}


# --------------------------------------------------------------------------
# Estimators with other inputs
# --------------------------------------------------------------------------


def remax(
    rewards_B: Any, baseline_rewards_B: Any, *, valid_B: Any = None
) -> Array:
  """ReMax advantage (Li et al. 2023): A_i = r_i − r(ŷ_i).

  ŷ_i is the greedy completion of the same prompt as y_i, so
  ``baseline_rewards_B[i]`` holds that greedy completion's reward (repeated
  for every sampled completion of the prompt).
  """
  rewards_B = _check_rewards(rewards_B)
  baseline_rewards_B = _float(baseline_rewards_B)
  if baseline_rewards_B.shape != rewards_B.shape:
    raise ValueError(
        f"baseline_rewards_B must have the shape of rewards_B "
        f"{rewards_B.shape}, got {baseline_rewards_B.shape}.")
  m_B = _valid_mask(valid_B, rewards_B.shape[0], rewards_B.dtype)
  return jnp.where(m_B > 0, rewards_B - baseline_rewards_B, 0.0)


def _discounted_returns(
    rewards_BT: Array, mask_BT: Array, gamma: float) -> Array:
  """G_t = r_t + γ G_{t'} over unmasked positions (t' = next unmasked one).

  Masked positions neither add reward nor discount; their output is 0.
  """
  def step(next_return_B, inputs):
    r_B, m_B = inputs
    ret_B = jnp.where(m_B > 0, r_B + gamma * next_return_B, next_return_B)
    return ret_B, jnp.where(m_B > 0, ret_B, 0.0)

  init_B = jnp.zeros(rewards_BT.shape[:1], rewards_BT.dtype)
  _, returns_TB = jax.lax.scan(
      step, init_B, (rewards_BT.T, mask_BT.T), reverse=True)
  return returns_TB.T


def reinforce_pp(
    rewards_B: Any,
    mask_BT: Any,
    *,
    kl_BT: Any = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    ddof: int = 0,
    valid_B: Any = None,
) -> Array:
  """REINFORCE++ token-level advantage with KL folded into the reward.

  Token rewards on completion tokens (m_t = 1):
    r_t = −kl_coef · kl_t + r_i · [t = last completion token of y_i].
  Returns-to-go by a reverse ``lax.scan``: G_t = r_t + γ G_{t+1}, where
  masked positions are skipped (they add no reward and no discount).
  Whitened over every valid token of the batch (m_t = 1 and valid row):
    A_t = (G_t − mean G) / (std G + eps), ddof=0 by default.
  Returns adv_BT, 0 on masked tokens and invalid rows (REINFORCE++, Hu et al.
  2025). ``kl_BT`` is a per-token KL estimate such as
  ``policy_losses.kl_penalty(logp, ref_logp, "k1")``.
  """
  rewards_B = _check_rewards(rewards_B)
  num_rows = rewards_B.shape[0]
  mask_BT = _check_mask_BT(mask_BT, num_rows)
  m_B = _valid_mask(valid_B, num_rows, rewards_B.dtype)
  m_BT = (mask_BT != 0).astype(rewards_B.dtype) * m_B[:, None]

  t_T = jnp.arange(mask_BT.shape[1])
  last_B = jnp.max(jnp.where(m_BT > 0, t_T, -1), axis=-1)
  is_last_BT = t_T[None, :] == last_B[:, None]
  token_rewards_BT = jnp.where(is_last_BT, rewards_B[:, None], 0.0)
  if kl_BT is not None:
    kl_BT = _float(kl_BT)
    if kl_BT.shape != mask_BT.shape:
      raise ValueError(
          f"kl_BT must have the shape of mask_BT {mask_BT.shape}, got "
          f"{kl_BT.shape}.")
    token_rewards_BT = token_rewards_BT - kl_coef * jnp.where(
        m_BT > 0, kl_BT, 0.0)
  elif kl_coef != 0.0:
    raise ValueError(f"kl_coef={kl_coef} needs kl_BT, which is None.")

  returns_BT = _discounted_returns(token_rewards_BT, m_BT, gamma)
  mean, std = _masked_mean_std(returns_BT, m_BT, ddof)
  return jnp.where(m_BT > 0, (returns_BT - mean) / (std + eps), 0.0)


def gae(
    rewards_BT: Any,
    values_BT: Any,
    mask_BT: Any,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016), used by PPO.

  Over unmasked positions t, with t' the next unmasked position (none after
  the last one, where V_{t'} = 0 and A_{t'} = 0: the episode ends):
    δ_t = r_t + γ V_{t'} − V_t;   A_t = δ_t + γλ A_{t'} = Σ_l (γλ)^l δ_{t+l}.
  Computed by a reverse ``lax.scan``. Masked positions contribute nothing:
  their rewards and values are ignored, they do not discount, and their
  outputs are 0. Returns (adv_BT, returns_BT) with returns = A + V, the
  value-function target.
  """
  rewards_BT = _float(rewards_BT)
  values_BT = _float(values_BT)
  mask_BT = _check_mask_BT(mask_BT)
  if rewards_BT.shape != mask_BT.shape or values_BT.shape != mask_BT.shape:
    raise ValueError(
        f"rewards_BT {rewards_BT.shape}, values_BT {values_BT.shape} and "
        f"mask_BT {mask_BT.shape} must have the same shape.")
  m_BT = (mask_BT != 0).astype(rewards_BT.dtype)

  def step(carry, inputs):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = inputs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    on_B = m_B > 0
    carry = (jnp.where(on_B, v_B, next_value_B),
             jnp.where(on_B, adv_B, next_adv_B))
    return carry, jnp.where(on_B, adv_B, 0.0)

  zeros_B = jnp.zeros(rewards_BT.shape[:1], rewards_BT.dtype)
  _, adv_TB = jax.lax.scan(
      step, (zeros_B, zeros_B), (rewards_BT.T, values_BT.T, m_BT.T),
      reverse=True)
  adv_BT = adv_TB.T
  returns_BT = jnp.where(m_BT > 0, adv_BT + values_BT, 0.0)
  return adv_BT, returns_BT


# --------------------------------------------------------------------------
# Shaping and broadcasting
# --------------------------------------------------------------------------


def weight_by_outcome(
    adv_B: Any,
    success_B: Any,
    *,
    lambda_pos: float = 1.0,
    lambda_neg: float = 1.0,
) -> Array:
  """Scales advantages by outcome: A_i · (λ_pos if success_i else λ_neg).

  ``success_B`` is bool, or numeric with nonzero meaning success. ``adv_B``
  may also be per token (B, T); the weight is broadcast over T. λ_pos = 0
  trains on negative samples only, which alone rivals full RL, and W-REINFORCE
  uses λ_pos = 0.1 (Zhu et al. 2025, "The Surprising Effectiveness of Negative
  Reinforcement in LLM Reasoning").
  """
  adv_B = _float(adv_B)
  success_B = jnp.asarray(success_B)
  if success_B.shape != adv_B.shape[:1]:
    raise ValueError(
        f"success_B must have shape ({adv_B.shape[0]},), got "
        f"{success_B.shape}.")
  w_B = jnp.where(success_B != 0, lambda_pos, lambda_neg).astype(adv_B.dtype)
  return adv_B * w_B.reshape(w_B.shape + (1,) * (adv_B.ndim - 1))


def broadcast_to_tokens(adv_B: Any, mask_BT: Any) -> Array:
  """Per-sequence advantage on every completion token: A_{i,t} = A_i·m_{i,t}."""
  adv_B = _float(adv_B)
  mask_BT = _check_mask_BT(mask_BT, adv_B.shape[0])
  return jnp.where(mask_BT != 0, adv_B[:, None], 0.0)


def overlong_penalty(lengths_B: Any, max_len: int, cache_len: int) -> Array:
  """DAPO soft overlong punishment (Yu et al. 2025), added to the reward.

  With L = max_len, L_c = cache_len and |y| = lengths_B:
    R_len = 0                       if |y| ≤ L − L_c
            (L − L_c − |y|) / L_c   if L − L_c < |y| ≤ L
            −1                      if |y| > L
  The penalty ramps linearly from 0 to −1 over the last L_c tokens of the
  budget, so truncation is discouraged without a reward cliff.
  """
  if not isinstance(max_len, int) or max_len < 1:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}.")
  if not isinstance(cache_len, int) or not 0 < cache_len <= max_len:
    raise ValueError(
        f"cache_len must be an int in [1, max_len={max_len}], got "
        f"{cache_len!r}.")
  lengths_B = _float(lengths_B)
  soft = max_len - cache_len
  ramp_B = (soft - lengths_B) / cache_len
  return jnp.where(lengths_B <= soft, 0.0,
                   jnp.where(lengths_B <= max_len, ramp_B, -1.0))


# --------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------

# Estimators the dispatcher calls with other inputs than an outcome estimator's;
# they are not in OUTCOME_ESTIMATORS and cannot be replaced by registration.
_SPECIAL_ESTIMATORS: tuple[str, ...] = ("reinforce_pp", "remax")
_BUILTIN_OUTCOME_ESTIMATORS: frozenset[str] = frozenset(OUTCOME_ESTIMATORS)


def advantage_estimator_names() -> tuple[str, ...]:
  """Every name `compute_advantages` accepts now, registered ones included."""
  return tuple(OUTCOME_ESTIMATORS) + _SPECIAL_ESTIMATORS


def __getattr__(name: str) -> Any:
  # ADVANTAGE_ESTIMATORS used to be a tuple frozen at import; it is now read
  # from the live registry so that registered estimators appear in it.
  if name == "ADVANTAGE_ESTIMATORS":
    return advantage_estimator_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_advantage_estimator(name: str) -> Callable[..., Any]:
  """The function behind an estimator name; ValueError listing the valid names."""
  if name in OUTCOME_ESTIMATORS:
    return OUTCOME_ESTIMATORS[name]
  if name == "reinforce_pp":
    return reinforce_pp
  if name == "remax":
    return remax
  raise ValueError(
      f"Unknown advantage estimator {name!r}; valid names: "
      f"{', '.join(advantage_estimator_names())}.")


def register_advantage_estimator(
    name: str, fn: Callable[..., Any], *, overwrite: bool = False
) -> Callable[..., Any]:
  """Registers an outcome estimator under ``name``; returns ``fn``.

  ``fn(rewards_B, group_size, *, valid_B=None, **options) -> adv_B`` (B,):
  rows where valid_B is 0 must get advantage 0 and stay out of every
  statistic. Once registered, the name is valid everywhere: in
  `compute_advantages`, in ``RLConfig(advantage=name)`` and in the RL step,
  which broadcasts adv_B to the completion tokens. Options come from
  ``RLConfig.advantage_kwargs`` (and ``eps`` / ``ddof`` from ``adv_eps`` /
  ``adv_std_ddof`` if ``fn`` names them). An estimator with an
  ``answers_B`` parameter also receives the per-row answer labels when the
  reward function reports an "answer_id" component (see `copo_terms`).

  Raises ValueError for a name already registered (unless ``overwrite=True``),
  for "reinforce_pp" / "remax" (dispatched with other inputs), for an empty or
  non-string name, and for an ``fn`` that is not callable or cannot be called
  as fn(rewards_B, group_size, valid_B=...). Register before building the
  RLConfig and jitting the step: a compiled step keeps the function it traced.
  """
  if name in _SPECIAL_ESTIMATORS:
    raise ValueError(f"{name!r} is dispatched with other inputs than an outcome estimator "
                     f"and cannot be replaced; choose another name.")
  return registry.add(OUTCOME_ESTIMATORS, "advantage estimator", name, fn, overwrite=overwrite,
                      num_positional=2, keywords=("valid_B",),
                      call="fn(rewards_B, group_size, *, valid_B)")


def unregister_advantage_estimator(name: str) -> None:
  """Removes a registered estimator; built-in names cannot be removed."""
  registry.remove(OUTCOME_ESTIMATORS, _BUILTIN_OUTCOME_ESTIMATORS | frozenset(_SPECIAL_ESTIMATORS),
                  "advantage estimator", name)


def compute_advantages(
    name: str,
    rewards_B: Any,
    group_size: int,
    mask_BT: Any,
    *,
    valid_B: Any = None,
    kl_BT: Any = None,
    kl_coef: float = 0.0,
    baseline_rewards_B: Any = None,
    answers_B: Any = None,
    **opts: Any,
) -> Array:
  """Per-token advantages adv_BT for any name in `advantage_estimator_names`.

  Outcome estimators (``OUTCOME_ESTIMATORS``, registered ones included)
  compute A_i and broadcast it to the completion tokens. "reinforce_pp" folds
  ``kl_coef · kl_BT`` into the token rewards and ignores ``group_size``;
  "remax" needs ``baseline_rewards_B``. ``answers_B`` (per-row answer labels)
  goes to outcome estimators with an ``answers_B`` parameter (e.g. "copo")
  and is ignored by the others. ``opts`` go to the estimator (e.g.
  ``eps``, ``ddof``). GAE needs a value model and is called directly (`gae`).
  Invalid rows (``valid_B``) get 0 on every token.
  """
  fn = get_advantage_estimator(name)  # ValueError listing the valid names
  if name == "reinforce_pp":
    return reinforce_pp(rewards_B, mask_BT, kl_BT=kl_BT, kl_coef=kl_coef,
                        valid_B=valid_B, **opts)
  if kl_coef != 0.0:
    raise ValueError(
        f"kl_coef={kl_coef}: a KL penalty in the reward is only supported by "
        f"'reinforce_pp'; for {name!r} put the KL in the loss "
        f"(policy_losses.kl_penalty).")
  if name == "remax":
    if baseline_rewards_B is None:
      raise ValueError(
          "'remax' needs baseline_rewards_B (reward of the greedy completion "
          "of each row's prompt).")
    adv_B = remax(rewards_B, baseline_rewards_B, valid_B=valid_B, **opts)
  else:
    if answers_B is not None and "answers_B" in registry.keyword_parameters(fn)[0]:
      opts = dict(opts, answers_B=answers_B)
    adv_B = fn(rewards_B, group_size, valid_B=valid_B, **opts)
  return broadcast_to_tokens(adv_B, mask_BT)
