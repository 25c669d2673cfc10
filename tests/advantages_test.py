"""Tests for jaxrl_llm.rl.advantages.

Every expected value is computed here with plain Python / numpy loops that
follow the formula written next to it, independently of the implementation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.rl import advantages as adv_lib

G = 4
# Three groups of four: mixed, all-equal (zero variance), mixed.
REWARDS = [1.0, 0.0, 0.5, 0.0,
           1.0, 1.0, 1.0, 1.0,
           0.2, 0.9, 0.4, 0.0]
# Row 1 of group 0 masked out; group 1 dropped entirely (dynamic sampling).
VALID = [1, 0, 1, 1,
         0, 0, 0, 0,
         1, 1, 1, 1]


def _groups(rewards, valid, g):
  """Yields (row indices of valid members) for each group."""
  for start in range(0, len(rewards), g):
    yield [i for i in range(start, start + g) if valid[i]]


def _mean(xs):
  return sum(xs) / len(xs)


def _std(xs, ddof):
  if len(xs) - ddof <= 0:
    return 0.0
  mu = _mean(xs)
  return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - ddof))


def _valid_list(valid, n):
  return [1] * n if valid is None else list(valid)


def _ref_grpo(rewards, g, ddof, eps, valid=None):
  valid = _valid_list(valid, len(rewards))
  out = [0.0] * len(rewards)
  for idx in _groups(rewards, valid, g):
    rs = [rewards[i] for i in idx]
    for i in idx:
      # A_i = (r_i - mean_g) / (std_g + eps)
      out[i] = (rewards[i] - _mean(rs)) / (_std(rs, ddof) + eps)
  return np.array(out)


def _ref_dr_grpo(rewards, g, valid=None):
  valid = _valid_list(valid, len(rewards))
  out = [0.0] * len(rewards)
  for idx in _groups(rewards, valid, g):
    rs = [rewards[i] for i in idx]
    for i in idx:
      out[i] = rewards[i] - _mean(rs)  # A_i = r_i - mean_g
  return np.array(out)


def _ref_rloo(rewards, g, valid=None):
  valid = _valid_list(valid, len(rewards))
  out = [0.0] * len(rewards)
  for idx in _groups(rewards, valid, g):
    if len(idx) < 2:
      continue
    for i in idx:
      others = [rewards[j] for j in idx if j != i]
      out[i] = rewards[i] - _mean(others)  # A_i = r_i - mean_{j != i} r_j
  return np.array(out)


def _ref_batch_std(rewards, g, eps, valid=None):
  valid = _valid_list(valid, len(rewards))
  all_valid = [rewards[i] for i in range(len(rewards)) if valid[i]]
  sd = _std(all_valid, 0)
  out = [0.0] * len(rewards)
  for idx in _groups(rewards, valid, g):
    rs = [rewards[i] for i in idx]
    for i in idx:
      out[i] = (rewards[i] - _mean(rs)) / (sd + eps)  # / std_batch
  return np.array(out)


def _ref_reinforce_pp_baseline(rewards, g, eps, valid=None):
  centred = _ref_dr_grpo(rewards, g, valid)
  valid = _valid_list(valid, len(rewards))
  vals = [centred[i] for i in range(len(rewards)) if valid[i]]
  mu, sd = _mean(vals), _std(vals, 0)
  return np.array([(centred[i] - mu) / (sd + eps) if valid[i] else 0.0
                   for i in range(len(rewards))])


# ---------------------------------------------------------------------------
# Outcome estimators
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo_golden(ddof):
  got = adv_lib.grpo(jnp.array(REWARDS), G, ddof=ddof, eps=1e-4)
  np.testing.assert_allclose(got, _ref_grpo(REWARDS, G, ddof, 1e-4),
                             rtol=1e-5, atol=1e-6)
  # The all-equal group gets exactly zero advantage.
  np.testing.assert_array_equal(np.asarray(got)[4:8], 0.0)


def test_grpo_default_is_ddof1_eps1e4():
  np.testing.assert_allclose(adv_lib.grpo(jnp.array(REWARDS), G),
                             _ref_grpo(REWARDS, G, 1, 1e-4), rtol=1e-5)


def test_grpo_valid_mask():
  got = adv_lib.grpo(jnp.array(REWARDS), G, valid_B=jnp.array(VALID) > 0)
  np.testing.assert_allclose(got, _ref_grpo(REWARDS, G, 1, 1e-4, VALID),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[np.array(VALID) == 0] == 0.0)


def test_invalid_rows_do_not_affect_valid_ones():
  # Garbage (even NaN) in an invalid row must not leak into any statistic.
  poisoned = list(REWARDS)
  poisoned[1] = float("nan")
  poisoned[5] = 1e6
  for name in adv_lib.OUTCOME_ESTIMATORS:
    clean = adv_lib.OUTCOME_ESTIMATORS[name](
        jnp.array(REWARDS), G, valid_B=jnp.array(VALID))
    dirty = adv_lib.OUTCOME_ESTIMATORS[name](
        jnp.array(poisoned), G, valid_B=jnp.array(VALID))
    np.testing.assert_allclose(dirty, clean, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("valid", [None, VALID])
def test_dr_grpo_golden(valid):
  got = adv_lib.dr_grpo(jnp.array(REWARDS), G, valid_B=valid)
  np.testing.assert_allclose(got, _ref_dr_grpo(REWARDS, G, valid),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("valid", [None, VALID])
def test_rloo_golden(valid):
  got = adv_lib.rloo(jnp.array(REWARDS), G, valid_B=valid)
  np.testing.assert_allclose(got, _ref_rloo(REWARDS, G, valid),
                             rtol=1e-5, atol=1e-6)


def test_rloo_equals_scaled_dr_grpo():
  # r_i - mean_{j!=i} r_j = G/(G-1) (r_i - mean_g r).
  r = jnp.array(REWARDS)
  np.testing.assert_allclose(adv_lib.rloo(r, G),
                             G / (G - 1) * adv_lib.dr_grpo(r, G), rtol=1e-6)


def test_rloo_needs_two():
  with pytest.raises(ValueError, match="group_size >= 2"):
    adv_lib.rloo(jnp.array([1.0, 0.0]), 1)


@pytest.mark.parametrize("valid", [None, VALID])
def test_batch_std_golden(valid):
  got = adv_lib.batch_std(jnp.array(REWARDS), G, eps=1e-4, valid_B=valid)
  np.testing.assert_allclose(got, _ref_batch_std(REWARDS, G, 1e-4, valid),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("valid", [None, VALID])
def test_reinforce_pp_baseline_golden(valid):
  got = adv_lib.reinforce_pp_baseline(jnp.array(REWARDS), G, valid_B=valid)
  np.testing.assert_allclose(
      got, _ref_reinforce_pp_baseline(REWARDS, G, 1e-4, valid),
      rtol=1e-5, atol=1e-6)


def test_group_stats():
  stats = adv_lib.group_stats(jnp.array(REWARDS), G)
  for p in range(3):
    rs = REWARDS[p * G:(p + 1) * G]
    np.testing.assert_allclose(stats.mean_P[p], _mean(rs), rtol=1e-6)
    np.testing.assert_allclose(stats.std_P[p], _std(rs, 0), rtol=1e-6)
  np.testing.assert_array_equal(stats.zero_variance_P, [False, True, False])
  np.testing.assert_array_equal(stats.zero_variance_B,
                                [False] * 4 + [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(stats.count_P, [4, 4, 4])


def test_group_stats_valid_mask():
  # Group 0 without row 1 is {1, 0.5, 0}; a group whose only differing member
  # is invalid becomes zero-variance; a fully dropped group is flagged.
  rewards = [1.0, 0.0, 0.5, 0.0, 3.0, 3.0, 3.0, 7.0, 1.0, 2.0, 3.0, 4.0]
  valid = [1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
  stats = adv_lib.group_stats(jnp.array(rewards), G, ddof=1,
                              valid_B=jnp.array(valid))
  np.testing.assert_allclose(stats.mean_P, [0.5, 3.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(stats.std_P[0], _std([1.0, 0.5, 0.0], 1),
                             rtol=1e-6)
  np.testing.assert_array_equal(stats.count_P, [3, 3, 0])
  np.testing.assert_array_equal(stats.zero_variance_P, [False, True, True])


def test_remax_golden():
  rewards = [1.0, 0.0, 0.5, 0.2]
  greedy = [0.5, 0.5, 1.0, 1.0]  # greedy reward of each row's prompt
  valid = [1, 1, 0, 1]
  got = adv_lib.remax(jnp.array(rewards), jnp.array(greedy),
                      valid_B=jnp.array(valid))
  want = [(r - b) * v for r, b, v in zip(rewards, greedy, valid)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Token-level estimators
# ---------------------------------------------------------------------------

MASK = [[1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 1, 0],   # a hole at t = 1 (e.g. a masked tool output)
        [1, 1, 1, 1, 1, 1]]


def _ref_reinforce_pp(rewards, mask, kl, kl_coef, gamma, eps, valid):
  b, t = len(mask), len(mask[0])
  returns = [[0.0] * t for _ in range(b)]
  used = []
  for i in range(b):
    if not valid[i]:
      continue
    pos = [s for s in range(t) if mask[i][s]]
    if not pos:
      continue
    # r_s = -kl_coef * kl_s, plus the outcome on the last completion token.
    tok_r = {s: -kl_coef * kl[i][s] for s in pos}
    tok_r[pos[-1]] += rewards[i]
    # Returns-to-go over completion tokens only: G_s = sum_k gamma^k r_{s_k}.
    for k, s in enumerate(pos):
      returns[i][s] = sum(gamma ** j * tok_r[u] for j, u in enumerate(pos[k:]))
      used.append(returns[i][s])
  mu, sd = _mean(used), _std(used, 0)
  out = np.zeros((b, t))
  for i in range(b):
    for s in range(t):
      if valid[i] and mask[i][s]:
        out[i, s] = (returns[i][s] - mu) / (sd + eps)
  return out


@pytest.mark.parametrize("kl_coef,gamma,valid", [
    (0.0, 1.0, [1, 1, 1, 1]),
    (0.1, 0.9, [1, 1, 1, 1]),
    (0.05, 0.95, [1, 0, 1, 1]),
])
def test_reinforce_pp_golden(kl_coef, gamma, valid):
  rng = np.random.default_rng(0)
  rewards = [1.0, 0.0, 0.5, -1.0]
  kl = rng.normal(size=(4, 6)).tolist()
  got = adv_lib.reinforce_pp(
      jnp.array(rewards), jnp.array(MASK), kl_BT=jnp.array(kl),
      kl_coef=kl_coef, gamma=gamma, valid_B=jnp.array(valid))
  want = _ref_reinforce_pp(rewards, MASK, kl, kl_coef, gamma, 1e-4, valid)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_requires_kl_for_coef():
  with pytest.raises(ValueError, match="kl_BT"):
    adv_lib.reinforce_pp(jnp.ones(4), jnp.array(MASK), kl_coef=0.1)


def _ref_gae(rewards, values, mask, gamma, lam):
  b, t = len(mask), len(mask[0])
  adv = np.zeros((b, t))
  for i in range(b):
    pos = [s for s in range(t) if mask[i][s]]
    # delta_k = r_k + gamma V_{k+1} - V_k over completion tokens; V after the
    # last one is 0. A_k = sum_l (gamma lam)^l delta_{k+l}.
    deltas = []
    for k, s in enumerate(pos):
      v_next = values[i][pos[k + 1]] if k + 1 < len(pos) else 0.0
      deltas.append(rewards[i][s] + gamma * v_next - values[i][s])
    for k, s in enumerate(pos):
      adv[i, s] = sum((gamma * lam) ** l * d
                      for l, d in enumerate(deltas[k:]))
  returns = np.where(np.array(mask) > 0, adv + np.array(values), 0.0)
  return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_golden(gamma, lam):
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(4, 6)).tolist()
  values = rng.normal(size=(4, 6)).tolist()
  adv, ret = adv_lib.gae(jnp.array(rewards), jnp.array(values),
                         jnp.array(MASK), gamma=gamma, lam=lam)
  want_adv, want_ret = _ref_gae(rewards, values, MASK, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_ignores_masked_positions():
  rng = np.random.default_rng(2)
  rewards = rng.normal(size=(4, 6))
  values = rng.normal(size=(4, 6))
  off = np.array(MASK) == 0
  rewards2 = np.where(off, 1e3, rewards)
  values2 = np.where(off, -1e3, values)
  a1, r1 = adv_lib.gae(rewards, values, jnp.array(MASK))
  a2, r2 = adv_lib.gae(rewards2, values2, jnp.array(MASK))
  np.testing.assert_allclose(a1, a2, rtol=1e-6)
  np.testing.assert_allclose(r1, r2, rtol=1e-6)


# ---------------------------------------------------------------------------
# Shaping, broadcasting, overlong
# ---------------------------------------------------------------------------


def test_weight_by_outcome_golden():
  adv = [0.5, -0.5, 1.0, -2.0]
  success = [True, False, True, False]
  got = adv_lib.weight_by_outcome(jnp.array(adv), jnp.array(success),
                                  lambda_pos=0.1, lambda_neg=1.5)
  want = [a * (0.1 if s else 1.5) for a, s in zip(adv, success)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Numeric success (nonzero = success) and per-token advantages.
  adv_bt = np.outer(adv, [1.0, 2.0])
  got_bt = adv_lib.weight_by_outcome(adv_bt, jnp.array([1.0, 0.0, 1.0, 0.0]),
                                     lambda_pos=0.1, lambda_neg=1.5)
  np.testing.assert_allclose(got_bt, np.outer(want, [1.0, 2.0]), rtol=1e-6)


def test_broadcast_to_tokens_golden():
  adv = [1.0, -2.0, 0.5, 3.0]
  got = adv_lib.broadcast_to_tokens(jnp.array(adv), jnp.array(MASK))
  want = [[adv[i] * MASK[i][t] for t in range(6)] for i in range(4)]
  np.testing.assert_allclose(got, want)


def test_overlong_penalty_golden():
  max_len, cache = 20, 8
  lengths = list(range(26))
  got = adv_lib.overlong_penalty(jnp.array(lengths), max_len, cache)
  want = []
  for n in lengths:
    if n <= max_len - cache:
      want.append(0.0)
    elif n <= max_len:
      want.append((max_len - cache - n) / cache)
    else:
      want.append(-1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(got[max_len]) == -1.0  # continuous at |y| = L_max


@pytest.mark.parametrize("max_len,cache", [(0, 1), (10, 0), (10, 11)])
def test_overlong_penalty_bad_args(max_len, cache):
  with pytest.raises(ValueError, match="max_len|cache_len"):
    adv_lib.overlong_penalty(jnp.array([1]), max_len, cache)


# ---------------------------------------------------------------------------
# COPO
# ---------------------------------------------------------------------------

# Three groups of four: all correct, all wrong (zero variance both), mixed.
COPO_REWARDS = [1.0, 1.0, 1.0, 1.0,
                0.0, 0.0, 0.0, 0.0,
                1.0, 0.0, 0.0, 1.0]
# Final-answer labels: one answer; answers 3,5,3,3; answers 7,3,5,7.
COPO_ANSWERS = [7, 7, 7, 7,
                3, 5, 3, 3,
                7, 3, 5, 7]
EPS = 1e-4


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _copo_hand_values():
  """Every COPO term of COPO_REWARDS / COPO_ANSWERS, worked out by hand."""
  # Entropy in bits of each group's answer distribution:
  #   g0 {7: 4/4} -> 0;  g1 {3: 3/4, 5: 1/4};  g2 {7: 1/2, 3: 1/4, 5: 1/4} -> 1.5.
  h = [0.0, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), 1.5]
  # Global reward R_p = mean_p r = [1, 0, 0.5]; over groups: mean 0.5,
  # std (ddof 1) = sqrt((0.5² + 0.5² + 0²) / 2) = 0.5.
  glob = [0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0]
  # Local GRPO: g0, g1 have zero variance -> 0; g2 mean 0.5, std (ddof 1)
  # = sqrt(4 · 0.25 / 3).
  loc2 = 0.5 / (math.sqrt(1.0 / 3.0) + EPS)
  local = [0.0] * 8 + [loc2, -loc2, -loc2, loc2]
  s = [_sigmoid(5.0 * (hp - 1.0)) for hp in h]  # sigmoid(k (H_p − b)), k=5, b=1
  return h, glob, local, s


def test_copo_golden_soft_with_zero():
  h, glob, local, s = _copo_hand_values()
  t = adv_lib.copo_terms(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS))
  np.testing.assert_allclose(t.entropy_P, h, atol=1e-6)
  np.testing.assert_allclose(t.global_reward_P, [1.0, 0.0, 0.5], atol=1e-7)
  np.testing.assert_allclose(t.global_B, np.repeat(glob, G), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(t.local_B, local, rtol=1e-6, atol=1e-7)
  # w_i = s_p · [r_i != 0]: wrong answers lean entirely on the global term.
  w = [s[0]] * 4 + [0.0] * 4 + [s[2], 0.0, 0.0, s[2]]
  np.testing.assert_allclose(t.weight_B, w, rtol=1e-6, atol=1e-7)
  assert s[0] == pytest.approx(0.0066929, rel=1e-4)  # sigmoid(-5): confident group
  assert s[2] == pytest.approx(0.9241418, rel=1e-6)  # sigmoid(2.5): diverse group
  # A_i = (1 − w_i)·A^glob_i + w_i·A^loc_i
  want = [(1 - w[i]) * glob[i // G] + w[i] * local[i] for i in range(12)]
  np.testing.assert_allclose(t.adv_B, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      adv_lib.copo(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS)), want,
      rtol=1e-6, atol=1e-7)


def test_copo_all_equal_groups_still_get_signal():
  r = jnp.array(COPO_REWARDS)
  assert np.all(np.asarray(adv_lib.grpo(r, G))[:8] == 0.0)  # GRPO: no signal
  adv = np.asarray(adv_lib.copo(r, G, answers_B=jnp.array(COPO_ANSWERS)))
  # All correct: (1 − sigmoid(−5))·0.5/(0.5+ε) > 0; all wrong: −0.5/(0.5+ε) < 0.
  np.testing.assert_allclose(adv[:4], (1 - _sigmoid(-5.0)) * 0.5 / (0.5 + EPS), rtol=1e-6)
  np.testing.assert_allclose(adv[4:8], -0.5 / (0.5 + EPS), rtol=1e-6)


@pytest.mark.parametrize("blend", ["soft", "soft_with_forced"])
def test_copo_other_blends(blend):
  _, glob, local, s = _copo_hand_values()
  got = adv_lib.copo(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS),
                     blend=blend)
  if blend == "soft":  # w_i = s_p
    w = [s[i // G] for i in range(12)]
  else:  # w_i = s_p · [A^loc_i != 0]: zero-variance groups take the global term only
    w = [0.0] * 8 + [s[2]] * 4
  want = [(1 - w[i]) * glob[i // G] + w[i] * local[i] for i in range(12)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_copo_rewards_as_labels_and_hyperparameters():
  # Without answers the rewards are the labels: g2 {1: 1/2, 0: 1/2} -> H = 1 bit.
  t = adv_lib.copo_terms(jnp.array(COPO_REWARDS), G, k=2.0, b=0.5)
  np.testing.assert_allclose(t.entropy_P, [0.0, 0.0, 1.0], atol=1e-7)
  s2 = _sigmoid(2.0 * (1.0 - 0.5))  # sigmoid(k (H − b)) with k=2, b=0.5
  np.testing.assert_allclose(t.weight_B, [_sigmoid(-1.0)] * 4 + [0.0] * 4
                             + [s2, 0.0, 0.0, s2], rtol=1e-6)


def test_copo_consistency_coef():
  # R_p = mean_p r · (1 − λ H_p), λ = (1 − 1/G) / log2 G = 0.75 / 2 = 0.375.
  t = adv_lib.copo_terms(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS),
                         consistency_coef=True)
  r = [1.0, 0.0, 0.5 * (1 - 0.375 * 1.5)]
  np.testing.assert_allclose(t.global_reward_P, r, rtol=1e-6)
  mu, sd = _mean(r), _std(r, 1)
  np.testing.assert_allclose(t.global_B, np.repeat([(x - mu) / (sd + EPS) for x in r], G),
                             rtol=1e-5)


def test_copo_valid_mask():
  valid = [1, 1, 1, 1,
           0, 0, 0, 0,   # group dropped
           1, 0, 1, 1]   # answer 3 left out: {7: 2/3, 5: 1/3}
  t = adv_lib.copo_terms(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS),
                         valid_B=jnp.array(valid))
  h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
  np.testing.assert_allclose(np.asarray(t.entropy_P)[[0, 2]], [0.0, h2], atol=1e-6)
  # Global statistics over the 2 groups with valid rows: R = [1, 2/3].
  r = [1.0, 2.0 / 3.0]
  mu, sd = _mean(r), _std(r, 1)
  np.testing.assert_allclose(np.asarray(t.global_B)[[0, 8]], [(x - mu) / (sd + EPS) for x in r],
                             rtol=1e-5)
  assert np.all(np.asarray(t.adv_B)[np.array(valid) == 0] == 0.0)


def test_copo_dispatch_uses_answers_only_where_taken():
  mask = jnp.ones((12, 2))
  r, answers = jnp.array(COPO_REWARDS), jnp.array(COPO_ANSWERS)
  got = adv_lib.compute_advantages("copo", r, G, mask, answers_B=answers, k=5.0)
  np.testing.assert_allclose(got[:, 0], adv_lib.copo(r, G, answers_B=answers), rtol=1e-6)
  # grpo has no answers_B parameter: the labels are ignored.
  np.testing.assert_allclose(
      adv_lib.compute_advantages("grpo", r, G, mask, answers_B=answers)[:, 0],
      adv_lib.grpo(r, G))


def test_copo_errors_and_jit():
  with pytest.raises(ValueError, match="blend"):
    adv_lib.copo(jnp.array(COPO_REWARDS), G, blend="hard")
  with pytest.raises(ValueError, match="answers_B"):
    adv_lib.copo(jnp.array(COPO_REWARDS), G, answers_B=jnp.ones(4))
  fn = jax.jit(functools.partial(adv_lib.copo, group_size=G))
  np.testing.assert_allclose(
      fn(jnp.array(COPO_REWARDS), answers_B=jnp.array(COPO_ANSWERS)),
      adv_lib.copo(jnp.array(COPO_REWARDS), G, answers_B=jnp.array(COPO_ANSWERS)),
      rtol=1e-6)


# ---------------------------------------------------------------------------
# Dispatcher and validation
# ---------------------------------------------------------------------------


def test_outcome_estimators_registry():
  assert set(adv_lib.OUTCOME_ESTIMATORS) == {
      "grpo", "dr_grpo", "rloo", "batch_std", "reinforce_pp_baseline", "copo"}
  assert adv_lib.ADVANTAGE_ESTIMATORS == adv_lib.advantage_estimator_names() == (
      "grpo", "dr_grpo", "rloo", "batch_std", "reinforce_pp_baseline", "copo",
      "reinforce_pp", "remax")


@pytest.mark.parametrize("name", sorted(adv_lib.OUTCOME_ESTIMATORS))
def test_compute_advantages_outcome(name):
  mask = np.ones((12, 3), np.int32)
  mask[0, 2] = 0
  got = adv_lib.compute_advantages(name, jnp.array(REWARDS), G,
                                   jnp.array(mask), valid_B=jnp.array(VALID))
  adv_b = adv_lib.OUTCOME_ESTIMATORS[name](
      jnp.array(REWARDS), G, valid_B=jnp.array(VALID))
  np.testing.assert_allclose(got, np.asarray(adv_b)[:, None] * mask)


def test_compute_advantages_reinforce_pp_and_remax():
  rewards = jnp.array([1.0, 0.0, 0.5, -1.0])
  kl = jnp.full((4, 6), 0.3)
  got = adv_lib.compute_advantages("reinforce_pp", rewards, 2, jnp.array(MASK),
                                   kl_BT=kl, kl_coef=0.1, gamma=0.9)
  want = adv_lib.reinforce_pp(rewards, jnp.array(MASK), kl_BT=kl,
                              kl_coef=0.1, gamma=0.9)
  np.testing.assert_allclose(got, want)
  base = jnp.array([0.5, 0.5, 0.0, 0.0])
  got = adv_lib.compute_advantages("remax", rewards, 2, jnp.array(MASK),
                                   baseline_rewards_B=base)
  np.testing.assert_allclose(
      got, (np.asarray(rewards) - np.asarray(base))[:, None] * np.array(MASK))


def test_compute_advantages_errors():
  mask = jnp.ones((12, 3))
  with pytest.raises(ValueError, match="valid names: grpo, .*remax"):
    adv_lib.compute_advantages("ppo", jnp.array(REWARDS), G, mask)
  with pytest.raises(ValueError, match="baseline_rewards_B"):
    adv_lib.compute_advantages("remax", jnp.array(REWARDS), G, mask)
  with pytest.raises(ValueError, match="kl_coef"):
    adv_lib.compute_advantages("grpo", jnp.array(REWARDS), G, mask,
                               kl_BT=jnp.zeros((12, 3)), kl_coef=0.1)


def test_argument_validation():
  with pytest.raises(ValueError, match="multiple of group_size"):
    adv_lib.grpo(jnp.ones(10), 4)
  with pytest.raises(ValueError, match="group_size"):
    adv_lib.dr_grpo(jnp.ones(4), 0)
  with pytest.raises(ValueError, match="valid_B"):
    adv_lib.grpo(jnp.ones(8), 4, valid_B=jnp.ones(4))
  with pytest.raises(ValueError, match="rewards_B"):
    adv_lib.grpo(jnp.ones((2, 4)), 4)


def test_jit_and_dtype():
  fn = jax.jit(functools.partial(adv_lib.grpo, group_size=G))
  got = fn(jnp.array(REWARDS, jnp.bfloat16), valid_B=jnp.array(VALID))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, _ref_grpo(np.array(REWARDS, jnp.bfloat16).astype(float).tolist(),
                     G, 1, 1e-4, VALID), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
  """Restores the estimator registry after the test (registrations are global)."""
  saved = dict(adv_lib.OUTCOME_ESTIMATORS)
  yield
  adv_lib.OUTCOME_ESTIMATORS.clear()
  adv_lib.OUTCOME_ESTIMATORS.update(saved)


def scaled_centred(rewards_B, group_size, *, scale, valid_B=None):
  """A_i = scale · (r_i − mean_g r): a custom estimator with its own hyper-parameter."""
  return scale * adv_lib.dr_grpo(rewards_B, group_size, valid_B=valid_B)


def test_register_advantage_estimator(clean_registry):
  assert adv_lib.register_advantage_estimator("scaled", scaled_centred) is scaled_centred
  assert "scaled" in adv_lib.advantage_estimator_names()
  assert "scaled" in adv_lib.ADVANTAGE_ESTIMATORS
  assert adv_lib.get_advantage_estimator("scaled") is scaled_centred
  mask = np.ones((4, 2), np.int32)
  mask[1, 1] = 0
  got = adv_lib.compute_advantages("scaled", jnp.array([1.0, 0.0, 0.5, 0.5]), 2,
                                   jnp.array(mask), scale=3.0)
  # Group means 0.5 and 0.5: A = 3 · [0.5, −0.5, 0, 0], on unmasked tokens.
  np.testing.assert_allclose(got, [[1.5, 1.5], [-1.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
  adv_lib.unregister_advantage_estimator("scaled")
  assert "scaled" not in adv_lib.advantage_estimator_names()
  with pytest.raises(ValueError, match="Unknown advantage estimator 'scaled'"):
    adv_lib.compute_advantages("scaled", jnp.ones(4), 2, jnp.ones((4, 2)))


def test_register_advantage_estimator_errors(clean_registry):
  adv_lib.register_advantage_estimator("scaled", scaled_centred)
  with pytest.raises(ValueError, match="already registered.*overwrite=True"):
    adv_lib.register_advantage_estimator("scaled", scaled_centred)
  with pytest.raises(ValueError, match="already registered"):
    adv_lib.register_advantage_estimator("grpo", scaled_centred)
  with pytest.raises(ValueError, match="must be callable"):
    adv_lib.register_advantage_estimator("x", 3.0)
  with pytest.raises(ValueError, match="cannot be called as"):
    adv_lib.register_advantage_estimator("x", lambda rewards_B: rewards_B)
  with pytest.raises(ValueError, match="cannot be called as"):  # no valid_B parameter
    adv_lib.register_advantage_estimator("x", lambda r, g: r)
  with pytest.raises(ValueError, match="cannot be replaced"):
    adv_lib.register_advantage_estimator("remax", scaled_centred, overwrite=True)
  for bad in ("", " x", 3):
    with pytest.raises(ValueError, match="non-empty string"):
      adv_lib.register_advantage_estimator(bad, scaled_centred)
  with pytest.raises(ValueError, match="built-in"):
    adv_lib.unregister_advantage_estimator("grpo")
  with pytest.raises(ValueError, match="No advantage estimator"):
    adv_lib.unregister_advantage_estimator("nope")
  # overwrite=True replaces, a **kwargs function is accepted.
  fn = lambda rewards_B, group_size, **opts: jnp.zeros_like(rewards_B)
  adv_lib.register_advantage_estimator("scaled", fn, overwrite=True)
  assert adv_lib.OUTCOME_ESTIMATORS["scaled"] is fn
