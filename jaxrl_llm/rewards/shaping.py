"""Reward shaping for concise reasoning: length budgets, history, schedules, repetition.

Pure jnp functions of per-completion quantities (rewards, correctness,
lengths) and of the training step; use them inside the jitted RL step between
the verifier and the advantage estimator. Schedules accept a Python int or a
traced int ``step`` and return a scalar array; pair a scheduled max length with
`length_mask` to apply it to completions sampled at the largest length.

Correctness arguments (``correct_B``) are bool or numeric, nonzero meaning
correct. Lengths are token counts, e.g. `RewardInputs.lengths_B`.

Sources:
  DLER       "DLER: Doing Length pEnalty Right" (Liu et al., 2025).
  HAPO       "HAPO: Training Language Models to Reason Concisely via
             History-Aware Policy Optimization" (Huang, Zhang, Cardie, 2025).
  GRPO-λ     "Stable Reinforcement Learning for Efficient Reasoning"
             (Dai et al., 2025).
  SIRI       "SIRI: Scaling Iterative Reinforcement Learning with Interleaved
             Compression" (Wen et al., 2025).
  CAMPO      "MiroMind-M1: An Open-Source Advancement in Mathematical Reasoning
             via Context-Aware Multi-Stage Policy Optimization" (2025).
The DAPO overlong penalty lives in `jaxrl_llm.rl.advantages.overlong_penalty`.

Shape suffixes (note: P counts prompts here, not prompt tokens):
  B: completions in the batch, B = P × G, grouped contiguously.
  P: prompts (groups) in the batch.
  G: group size (completions per prompt).
  L: completion length (tokens).
  N: prompts in the dataset (rows of the HAPO history table).
"""

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# HAPO history value meaning "no correct response seen yet" (int32 max, so
# that a scatter-min with it is a no-op).
HAPO_NO_HISTORY = int(jnp.iinfo(jnp.int32).max)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _as_bool(x: Any) -> Array:
  x = jnp.asarray(x)
  return x if x.dtype == jnp.bool_ else x != 0


def _check_1d(name: str, x: Any, size: int | None = None) -> Array:
  x = jnp.asarray(x)
  if x.ndim != 1 or (size is not None and x.shape[0] != size):
    want = "(B,)" if size is None else f"({size},)"
    raise ValueError(f"{name} must have shape {want}, got {x.shape}.")
  return x


def _check_group_size(num_rows: int, group_size: Any) -> int:
  if (not isinstance(group_size, int) or isinstance(group_size, bool)
      or group_size < 1):
    raise ValueError(f"group_size must be a positive Python int, got {group_size!r}.")
  if num_rows % group_size:
    raise ValueError(
        f"The batch size ({num_rows}) must be a multiple of group_size ({group_size}); "
        f"groups are stored contiguously.")
  return group_size


def _group_accuracy(correct_B: Array, group_size: int) -> Array:
  """Fraction of correct completions of each group, shape (P,)."""
  return jnp.mean(correct_B.astype(jnp.float32).reshape(-1, group_size), axis=-1)


def _per_row(x_P: Array, group_size: int) -> Array:
  return jnp.repeat(x_P, group_size, total_repeat_length=x_P.shape[0] * group_size)


def _check_positive(name: str, value: Any) -> None:
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
    raise ValueError(f"{name} must be > 0, got {value}.")


def _check_fraction(name: str, value: Any) -> None:
  if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


# --------------------------------------------------------------------------
# Applying a (possibly scheduled) max length
# --------------------------------------------------------------------------


def length_mask(mask_BL: Any, max_len: Any) -> tuple[Array, Array]:
  """Cuts completions to a traced max length: ``(mask_BL, truncated_B)``.

  Keeps token t of completion b iff m_{b,t} = 1 and Σ_{s≤t} m_{b,s} ≤ max_len,
  and flags truncated_b = |y_b| > max_len. Completions sampled with a larger
  static budget are thereby scored as if sampling had stopped at ``max_len``
  (a schedule such as `siri_max_length` or `staged_max_length`): treat a
  truncated completion as unfinished (``finished_B & ~truncated_B``) and
  recompute its length from the returned mask.
  """
  mask_BL = jnp.asarray(mask_BL)
  if mask_BL.ndim != 2:
    raise ValueError(f"mask_BL must be 2-D (B, L), got shape {mask_BL.shape}.")
  if jnp.ndim(max_len) != 0:
    raise ValueError(f"max_len must be a scalar, got shape {jnp.shape(max_len)}.")
  m_BL = mask_BL != 0
  count_BL = jnp.cumsum(m_BL, axis=-1, dtype=jnp.int32)
  new_BL = m_BL & (count_BL <= max_len)
  truncated_B = count_BL[:, -1] > max_len
  return new_BL.astype(mask_BL.dtype), truncated_B


# --------------------------------------------------------------------------
# DLER: truncation penalty with a (difficulty-aware) budget
# --------------------------------------------------------------------------


def dler_truncation(rewards_B: Any, lengths_B: Any, budget: Any) -> Array:
  """DLER truncation penalty: r'_i = r_i if |y_i| ≤ budget, else 0.

  ``budget`` is a scalar or a per-completion (B,) array (see
  `difficulty_aware_budget`). DLER pairs this with batch-wise reward
  normalisation (`advantages.batch_std`), clip-higher and dynamic sampling.
  """
  rewards_B = _check_1d("rewards_B", rewards_B)
  lengths_B = _check_1d("lengths_B", lengths_B, rewards_B.shape[0])
  budget = jnp.asarray(budget)
  if budget.ndim not in (0, 1) or (budget.ndim == 1 and budget.shape != rewards_B.shape):
    raise ValueError(
        f"budget must be a scalar or have shape {rewards_B.shape}, got {budget.shape}.")
  rewards_B = rewards_B.astype(jnp.promote_types(rewards_B.dtype, jnp.float32))
  return jnp.where(lengths_B <= budget, rewards_B, jnp.zeros_like(rewards_B))


def difficulty_aware_budget(
    correct_B: Any,
    group_size: int,
    base_budget: Any,
    easy_budget: Any,
    easy_threshold: float,
) -> Array:
  """DLER difficulty-aware budget: a tighter budget for prompts the policy finds easy.

  acc_p = (1/G) Σ_g correct_{p,g};  budget_i = easy_budget if acc_{p(i)} ≥
  easy_threshold else base_budget. Returns int32 (B,), to pass to
  `dler_truncation`.
  """
  correct_B = _as_bool(_check_1d("correct_B", correct_B))
  group_size = _check_group_size(correct_B.shape[0], group_size)
  _check_fraction("easy_threshold", easy_threshold)
  _check_positive("base_budget", base_budget)
  _check_positive("easy_budget", easy_budget)
  easy_P = _group_accuracy(correct_B, group_size) >= easy_threshold
  budget_P = jnp.where(easy_P, jnp.asarray(easy_budget, jnp.int32),
                       jnp.asarray(base_budget, jnp.int32))
  return _per_row(budget_P, group_size)


# --------------------------------------------------------------------------
# HAPO: history-aware length reward
# --------------------------------------------------------------------------


def hapo_init_history(num_prompts: int) -> Array:
  """A fresh HAPO history table: (N,) int32 filled with `HAPO_NO_HISTORY`."""
  if not isinstance(num_prompts, int) or num_prompts < 1:
    raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}.")
  return jnp.full((num_prompts,), HAPO_NO_HISTORY, jnp.int32)


def hapo_length_reward(
    lengths_B: Any,
    correct_B: Any,
    history_B: Any,
    *,
    weight: Any = 1.0,
    no_history: int = HAPO_NO_HISTORY,
) -> Array:
  """HAPO's history-aware length reward (Huang et al., 2025), to add to correctness.

  With h = the prompt's history (shortest correct length seen in earlier
  steps, broadcast to its completions) and l = |y|:

    f(l, h) = cos(min(π/2 · l / h, π))         ∈ [−1, 1]
    r_len = weight · 0           if h ≥ no_history (no correct response yet)
            weight · f(l, h)     if y is correct
            weight · min(f, 0)   if y is incorrect

  f is 1 at l = 0, 0 at l = h, −1 for l ≥ 2h: a correct response shorter than
  the best one so far earns a bonus and a longer one a penalty. An incorrect
  response is never rewarded for being short (that would reward giving up) but
  is not penalised for it either, so short explorations stay cheap; a long
  incorrect one pays the same penalty as a correct one of its length, so
  |r_len(incorrect)| ≤ |r_len(correct)| at every length. h is floored at 1.

  Compute this with the history from before the step, then advance the table
  with `hapo_update_history`. Returns float32 (B,).
  """
  lengths_B = _check_1d("lengths_B", lengths_B)
  correct_B = _as_bool(_check_1d("correct_B", correct_B, lengths_B.shape[0]))
  history_B = _check_1d("history_B", history_B, lengths_B.shape[0])
  seen_B = history_B < no_history
  h_B = jnp.maximum(jnp.where(seen_B, history_B, 1), 1).astype(jnp.float32)
  f_B = jnp.cos(jnp.minimum(0.5 * jnp.pi * lengths_B.astype(jnp.float32) / h_B, jnp.pi))
  r_B = jnp.where(correct_B, f_B, jnp.minimum(f_B, 0.0))
  return jnp.asarray(weight, jnp.float32) * jnp.where(seen_B, r_B, 0.0)


def hapo_update_history(
    history_N: Any,
    prompt_ids_P: Any,
    lengths_B: Any,
    correct_B: Any,
    group_size: int,
) -> Array:
  """Advances the HAPO history: h_x ← min(h_x, min_{correct y of x} |y|).

  ``prompt_ids_P`` gives each group's row in the (N,) table. Groups with no
  correct completion leave their row unchanged; a prompt appearing in several
  groups takes the minimum over all of them (scatter-min); ids outside
  [0, N) are ignored. Returns the new (N,) table, same dtype as ``history_N``.
  """
  history_N = _check_1d("history_N", history_N)
  lengths_B = _check_1d("lengths_B", lengths_B)
  correct_B = _as_bool(_check_1d("correct_B", correct_B, lengths_B.shape[0]))
  group_size = _check_group_size(lengths_B.shape[0], group_size)
  prompt_ids_P = _check_1d("prompt_ids_P", prompt_ids_P, lengths_B.shape[0] // group_size)
  for name, x in (("history_N", history_N), ("prompt_ids_P", prompt_ids_P)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got {x.dtype}.")
  none = jnp.iinfo(history_N.dtype).max
  # Negative ids would wrap around to the end of the table; send them out of range.
  prompt_ids_P = jnp.where(prompt_ids_P < 0, history_N.shape[0], prompt_ids_P)
  len_PG = jnp.where(correct_B, lengths_B, none).astype(history_N.dtype).reshape(-1, group_size)
  return history_N.at[prompt_ids_P].min(jnp.min(len_PG, axis=-1), mode="drop")


# --------------------------------------------------------------------------
# GRPO-λ: length penalty only on the best-solved groups
# --------------------------------------------------------------------------


def grpo_lambda_groups(correct_B: Any, group_size: int, top_fraction: float) -> Array:
  """Which completions get GRPO-λ's length-penalised reward: bool (B,).

  Groups are ranked by accuracy acc_p = (1/G) Σ_g correct_{p,g}; with
  k = ⌈top_fraction · P⌉ the selected groups are those with acc_p ≥ the k-th
  largest accuracy (ties at the threshold are all selected, so the choice
  does not depend on group order) and acc_p > 0. k = 0 selects none.
  """
  correct_B = _as_bool(_check_1d("correct_B", correct_B))
  group_size = _check_group_size(correct_B.shape[0], group_size)
  _check_fraction("top_fraction", top_fraction)
  acc_P = _group_accuracy(correct_B, group_size)
  num_groups = acc_P.shape[0]
  k = min(num_groups, math.ceil(top_fraction * num_groups - 1e-9))
  if k == 0:
    return jnp.zeros(correct_B.shape, bool)
  threshold = jnp.sort(acc_P)[num_groups - k]  # k-th largest
  return _per_row((acc_P >= threshold) & (acc_P > 0), group_size)


def grpo_lambda(
    correct_B: Any,
    lengths_B: Any,
    group_size: int,
    *,
    top_fraction: float,
    length_weight: float,
    max_len: int,
) -> Array:
  """GRPO-λ reward (Dai et al., 2025): length penalty only where accuracy is high.

  For completions of the groups selected by `grpo_lambda_groups` (the top
  ``top_fraction`` of the batch by accuracy):

    r_i = c_i · (1 − length_weight · min(|y_i|, max_len) / max_len)

  and r_i = c_i (plain 0/1) for every other group, with c_i ∈ {0, 1} the
  correctness. Low-accuracy groups therefore keep optimising correctness only,
  which keeps the length penalty from collapsing accuracy. Use
  length_weight ∈ (0, 1] so a correct answer always beats an incorrect one.
  Returns float32 (B,).
  """
  correct_B = _as_bool(_check_1d("correct_B", correct_B))
  lengths_B = _check_1d("lengths_B", lengths_B, correct_B.shape[0])
  _check_positive("max_len", max_len)
  if not isinstance(length_weight, (int, float)) or length_weight < 0:
    raise ValueError(f"length_weight must be a number >= 0, got {length_weight!r}.")
  selected_B = grpo_lambda_groups(correct_B, group_size, top_fraction)
  c_B = correct_B.astype(jnp.float32)
  frac_B = jnp.minimum(lengths_B.astype(jnp.float32), max_len) / max_len
  return jnp.where(selected_B, c_B * (1.0 - length_weight * frac_B), c_B)


# --------------------------------------------------------------------------
# Max-length schedules (SIRI, CAMPO)
# --------------------------------------------------------------------------


def siri_max_length(
    step: Any,
    *,
    short_len: int,
    long_len: int,
    period: int,
    compress_fraction: float,
) -> Array:
  """SIRI interleaved schedule: compression phases at ``short_len``, expansion at ``long_len``.

  With φ = step mod period,
    max_len(step) = short_len if φ < compress_fraction · period else long_len,
  i.e. each period starts with a compression phase (a short budget that forces
  concise reasoning) followed by an expansion phase (a long budget that lets
  the model explore again). Returns an int32 scalar.
  """
  for name, v in (("short_len", short_len), ("long_len", long_len), ("period", period)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}.")
  if short_len > long_len:
    raise ValueError(f"short_len ({short_len}) must be <= long_len ({long_len}).")
  _check_fraction("compress_fraction", compress_fraction)
  phase = jnp.mod(jnp.asarray(step, jnp.int32), period)
  compress = phase.astype(jnp.float32) < compress_fraction * period
  return jnp.where(compress, short_len, long_len).astype(jnp.int32)


def staged_max_length(
    step: Any,
    *,
    stage_steps: Sequence[int],
    stage_lengths: Sequence[int],
) -> Array:
  """CAMPO length-progressive stages: max length grows stage by stage.

  Stage s runs from ``stage_steps[s]`` (the first must be 0, strictly
  increasing) until the next stage starts, with max length
  ``stage_lengths[s]``:
    max_len(step) = stage_lengths[max{s : stage_steps[s] ≤ step}].
  Returns an int32 scalar.
  """
  starts, lengths = tuple(stage_steps), tuple(stage_lengths)
  if not starts or len(starts) != len(lengths):
    raise ValueError(
        f"stage_steps and stage_lengths must be non-empty and equally long; got "
        f"{len(starts)} and {len(lengths)}.")
  if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
    raise ValueError(f"stage_steps must start at 0 and strictly increase, got {starts}.")
  if any(not isinstance(v, int) or v < 1 for v in lengths):
    raise ValueError(f"stage_lengths must be positive ints, got {lengths}.")
  stage = jnp.searchsorted(jnp.asarray(starts, jnp.int32), jnp.asarray(step, jnp.int32),
                           side="right") - 1
  return jnp.asarray(lengths, jnp.int32)[jnp.clip(stage, 0, len(lengths) - 1)]


# --------------------------------------------------------------------------
# CAMPO repetition penalty
# --------------------------------------------------------------------------


def ngram_repetition_penalty(completion_BL: Any, mask_BL: Any, *, n: int = 3) -> Array:
  """Fraction of a completion's n-grams that repeat an earlier n-gram, in [0, 1].

  An n-gram starts at t when positions t..t+n−1 are all masked in. It is a
  repeat when an identical n-gram starts at some t' < t. Then
    rep_b = #repeats_b / max(#n-grams_b, 1)
  (0 for completions shorter than n). CAMPO subtracts weight · rep from the
  reward, with the weight scheduled by `repetition_penalty_weight`.
  Compares every pair of positions: O(B · L² · n) work and B · L² memory, fine
  for L ≤ 1024. Returns float32 (B,).
  """
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}.")
  tokens_BL = jnp.asarray(completion_BL)
  m_BL = jnp.asarray(mask_BL) != 0
  if tokens_BL.ndim != 2 or tokens_BL.shape != m_BL.shape:
    raise ValueError(
        f"completion_BL and mask_BL must both be (B, L); got {tokens_BL.shape} and "
        f"{m_BL.shape}.")
  batch, length = tokens_BL.shape
  if length < n:
    return jnp.zeros((batch,), jnp.float32)
  starts = length - n + 1  # positions where an n-gram fits
  valid_BS = m_BL[:, :starts]
  same_BSS = jnp.ones((batch, starts, starts), bool)
  for k in range(n):
    tok_BS = tokens_BL[:, k:k + starts]
    valid_BS = valid_BS & m_BL[:, k:k + starts]
    same_BSS = same_BSS & (tok_BS[:, :, None] == tok_BS[:, None, :])
  earlier_SS = jnp.tril(jnp.ones((starts, starts), bool), k=-1)  # [t, t'] = t' < t
  repeat_BS = valid_BS & jnp.any(same_BSS & earlier_SS & valid_BS[:, None, :], axis=-1)
  num_BS = jnp.sum(valid_BS, axis=-1).astype(jnp.float32)
  return jnp.sum(repeat_BS, axis=-1).astype(jnp.float32) / jnp.maximum(num_BS, 1.0)


def repetition_penalty_weight(step: Any, *, start: float, end: float, warmup_steps: int) -> Array:
  """CAMPO adaptive repetition-penalty weight: a linear ramp, then constant.

    w(step) = start + (end − start) · min(step / warmup_steps, 1)
  (w = end throughout when warmup_steps = 0). Returns a float32 scalar.
  """
  if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
    raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
  if warmup_steps == 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return jnp.asarray(start, jnp.float32) + (end - start) * frac
