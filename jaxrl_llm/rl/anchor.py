"""ACNCHOR: ground-truth injection into groups where every rollout fails.

Liu et al., "Toward Honest Language Models for Deductive Reasoning" (2025,
arXiv:2511.09222; the method is written ACNCHOR / ANCHOR). GRPO learns only
from the spread of rewards inside a group; on hard prompts every one of the G
samples fails, the group's advantages are all 0 (or, with shaping, all
negative) and early training collapses under negative rewards. ACNCHOR puts
the task's reference solution y* into such groups as one of the rollouts, so
the group holds one success and the update receives a bounded positive signal.

Here, per group g of the rollout (G rows, correct_i from the reward
components' "correct" when present, else reward_i > 0):

  all_fail_g = AND_i (correct_i <= 0)
  if all_fail_g: row g·G + G−1 (the group's last sample) becomes y*
                 (the prompt's answer_tokens / answer_mask, answer + EOS,
                 cut to max_new_tokens), and the whole rollout is scored
                 again, so y*'s reward is the verifier's (a reference that
                 does not fit the budget stays a failure).

The advantage estimator then runs unchanged over the group (GRPO: y* gets
A* = (r* − mean) / std > 0, the G−1 failures a negative advantage).

Importance weight of the injected sample. y* was not drawn by the behaviour
(old) policy π_old, so the on-policy ratio π_θ/π_old has no sampling meaning
for it. ``importance_weight`` selects the weight of its tokens:

  "old_policy"      ρ*_t = π_θ(y*_t)/π_old(y*_t): y* is scored by the old
                    policy and enters the clipped surrogate like a sampled
                    row (ratio 1 at the first update: an advantage-weighted
                    log-likelihood step on y*, A*·∇log π_θ(y*_t)). Default.
  "unit_behaviour"  ρ*_t = π_θ(y*_t | x, y*_<t) / 1: a fixed demonstration's
                    behaviour probability is 1 (the off-policy ratio of Yan et
                    al. 2025, "LUFFY", arXiv:2504.14945, before its shaping).
                    With A* > 0 and ρ* <= 1 the clipped surrogate
                    min(ρ*A*, clip(ρ*, 1−ε_l, 1+ε_h)A*) equals ρ*A* exactly,
                    so the gradient A*·∇π_θ(y*_t) is never clipped; it is
                    small while π_θ(y*_t) is small (in the setting of
                    tests/anchor_test.py, a random tiny model, one step raised
                    log π(y*) of one prompt and lowered the other's, where
                    "old_policy" raises both). Implemented by setting the
                    injected rows' old log-probs to log 1 = 0.

The paper's text available to us states the injection of ground-truth
trajectories into the rollouts of failed groups, with a weight of its own for
the injected trajectory; the exact form of that weight could not be read from
a primary source, so both forms above are offered and named.

Metrics: ``reward/anchor_injected`` (fraction of rows replaced by y*) through
the reward components.

Supported with the one-jit step (`RLStep.__call__`) and group advantages;
not with split mode (host rewards), PPO's critic, multi-turn rollouts or the
off-policy / TIS corrections (the injected rows have no sampler log-probs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPORTANCE_WEIGHTS = ("old_policy", "unit_behaviour")
ANCHOR_KEY = "anchor"  # per-row flag the injection adds to the rollout


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Ground-truth injection (`rl.anchor`)."""
  enabled: bool = False
  importance_weight: str = "old_policy"  # one of IMPORTANCE_WEIGHTS

  def __post_init__(self):
    if self.importance_weight not in IMPORTANCE_WEIGHTS:
      raise ValueError(f"rl.anchor.importance_weight={self.importance_weight!r}: choose one "
                       f"of {IMPORTANCE_WEIGHTS}")


def validate(rl: Any, check) -> None:
  """Checks the RLConfig settings ACNCHOR cannot run with (called from its __post_init__)."""
  if not rl.anchor.enabled:
    return
  check(rl.group_size >= 2, "group_size", "rl.anchor needs groups of >= 2 samples (one is "
        "replaced by the reference solution)")
  check(rl.advantage != "gae", "advantage", "rl.anchor injects into groups of a group "
        "advantage estimator (grpo, rloo, ...), not PPO's critic")
  check(rl.tis_cap == 0, "tis_cap", "rl.anchor's injected rows have no sampler log-probs; "
        "set tis_cap=0")
  check(rl.off_policy.correction == "none", "off_policy", "rl.anchor's injected rows have no "
        "sampler log-probs; use off_policy.correction='none'")
  check(not rl.multiturn.enabled, "multiturn", "rl.anchor injects single-turn answers; "
        "disable multiturn")


def all_fail_groups(correct_B: jax.Array, group_size: int) -> jax.Array:
  """[R] True where every sample of the group failed (correct <= 0)."""
  return jnp.all(correct_B.reshape(-1, group_size) <= 0, axis=1)


def injected_rows(correct_B: jax.Array, group_size: int) -> jax.Array:
  """[B] True on the last row of each all-fail group (the row y* replaces)."""
  fail_R = all_fail_groups(correct_B, group_size)
  last_G = jnp.arange(group_size) == group_size - 1
  return (fail_R[:, None] & last_G[None, :]).reshape(-1)


def reference_completion(answer_BA: jax.Array, answer_mask_BA: jax.Array, width: int,
                         pad_id: int) -> tuple[jax.Array, jax.Array]:
  """The answer tokens as a completion row of `width` tokens: (tokens [B, L], mask [B, L])."""
  A = answer_BA.shape[1]
  if A >= width:
    return answer_BA[:, :width], answer_mask_BA[:, :width]
  pad = width - A
  tokens = jnp.pad(answer_BA, ((0, 0), (0, pad)), constant_values=pad_id)
  mask = jnp.pad(answer_mask_BA, ((0, 0), (0, pad)))
  return tokens, mask


def inject(ro: dict, correct_B: jax.Array, group_size: int, pad_id: int) -> dict:
  """The rollout with y* in the last row of every all-fail group, and the ANCHOR_KEY flag.

  Needs the task's ``answer_tokens`` / ``answer_mask`` (answer + EOS) in the rollout.
  """
  if "answer_tokens" not in ro or "answer_mask" not in ro:
    raise ValueError("rl.anchor injects the task's reference solution, but the batch has no "
                     "answer_tokens / answer_mask: use a task with gold answers (the built-in "
                     "arithmetic tasks, GSM8K, MATH) or disable rl.anchor")
  flag_B = injected_rows(correct_B, group_size)
  L = ro["completion"].shape[1]
  ans, ans_mask = reference_completion(ro["answer_tokens"], ro["answer_mask"], L, pad_id)
  mask_dtype = ro["completion_mask"].dtype
  ans_mask = (ans_mask > 0).astype(mask_dtype)
  # Finished when the whole answer (ending in EOS) fits the completion budget.
  fits_B = jnp.sum(ro["answer_mask"] > 0, axis=1) <= L
  out = dict(ro)
  out["completion"] = jnp.where(flag_B[:, None], ans.astype(ro["completion"].dtype),
                                ro["completion"])
  out["completion_mask"] = jnp.where(flag_B[:, None], ans_mask, ro["completion_mask"])
  out["sampler_logp"] = jnp.where(flag_B[:, None], 0.0, ro["sampler_logp"])
  out["finished"] = jnp.where(flag_B, fits_B, ro["finished"])
  out["lengths"] = jnp.where(flag_B, jnp.sum(ans_mask > 0, axis=1).astype(ro["lengths"].dtype),
                             ro["lengths"])
  out[ANCHOR_KEY] = flag_B
  return out


def inject_and_score(step: Any, ro: dict, rewards_B, comps, baseline_B, reward_params=None):
  """Hook of `RLStep.__call__` after REWARD: inject y*, score the rollout again.

  Returns (ro, rewards_B, comps, baseline_B) of the injected rollout; comps
  gains ``anchor_injected`` (1 on injected rows) for the metrics.
  """
  G = step.rl.group_size
  correct_B = comps.get("correct", (rewards_B > 0).astype(jnp.float32))
  ro = inject(ro, correct_B, G, step.pad_id)
  flag_B = ro.pop(ANCHOR_KEY)  # not a task array for the reward functions
  rewards_B, comps, baseline_B = step.score(ro, reward_params)
  comps["anchor_injected"] = flag_B.astype(jnp.float32)
  ro[ANCHOR_KEY] = flag_B
  return ro, rewards_B, comps, baseline_B


def old_logprobs(step: Any, state: Any, rows: dict) -> dict:
  """Hook of `RLStep.prepare` after REF / OLD: the injected rows' importance weight.

  "unit_behaviour": old log-probs of the injected rows are 0 (behaviour
  probability 1), the others π_old's (computed here when the step would
  otherwise use the stop-gradient of the current log-probs, which equal π_old
  at a single update per step). "old_policy": rows unchanged.
  """
  if step.rl.anchor.importance_weight != "unit_behaviour":
    return rows
  old = rows.get("old_logp")
  if old is None:
    old = step._batched_logprobs(state.params, rows)
  rows = dict(rows)
  rows["old_logp"] = jnp.where(rows[ANCHOR_KEY][:, None], 0.0, old)
  return rows
