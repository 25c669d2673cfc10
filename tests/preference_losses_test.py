"""Tests for jaxrl_llm.preference.losses and jaxrl_llm.preference.rm_losses.

Golden values come from float64 numpy re-statements of each formula written
out below (loops over tokens where the formula is per token), not from the
library. Masked positions hold junk values so that any masking slip shows.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.preference import losses, rm_losses

JUNK = 37.0  # Value at prompt / padding positions; must never reach a loss.

# Chosen T = 5, rejected T = 4; lengths |y_w| = 3, 5, 2 and |y_l| = 2, 2, 4.
CHOSEN_MASK = np.array([[0, 1, 1, 1, 0],
                        [1, 1, 1, 1, 1],
                        [0, 0, 1, 1, 0]], np.float64)
REJECTED_MASK = np.array([[1, 1, 0, 0],
                          [0, 1, 1, 0],
                          [1, 1, 1, 1]], np.float64)
_CHOSEN = np.array([[0, -0.5, -1.2, -0.3, 0],
                    [-2.0, -0.1, -0.7, -1.5, -0.4],
                    [0, 0, -3.0, -0.2, 0]])
_REF_CHOSEN = np.array([[0, -0.9, -1.0, -0.8, 0],
                        [-1.6, -0.3, -0.9, -1.1, -0.6],
                        [0, 0, -2.5, -0.6, 0]])
_REJECTED = np.array([[-1.4, -2.2, 0, 0],
                      [0, -0.8, -0.6, 0],
                      [-0.9, -1.7, -0.4, -2.6]])
_REF_REJECTED = np.array([[-1.1, -1.9, 0, 0],
                          [0, -1.0, -0.9, 0],
                          [-1.2, -1.5, -0.3, -2.0]])


def _with_junk(x, mask):
  return np.where(mask > 0, x, JUNK)


CHOSEN = _with_junk(_CHOSEN, CHOSEN_MASK)
REF_CHOSEN = _with_junk(_REF_CHOSEN, CHOSEN_MASK)
REJECTED = _with_junk(_REJECTED, REJECTED_MASK)
REF_REJECTED = _with_junk(_REF_REJECTED, REJECTED_MASK)


def make_pair(chosen=CHOSEN, rejected=REJECTED, ref_chosen=REF_CHOSEN,
              ref_rejected=REF_REJECTED):
  as_f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return losses.PairLogps(
      chosen_BT=as_f32(chosen), rejected_BT=as_f32(rejected),
      ref_chosen_BT=as_f32(ref_chosen), ref_rejected_BT=as_f32(ref_rejected),
      chosen_mask_BT=jnp.asarray(CHOSEN_MASK, jnp.int32),
      rejected_mask_BT=jnp.asarray(REJECTED_MASK, jnp.int32))


# ---------------------------------------------------------------------------
# float64 reference formulas
# ---------------------------------------------------------------------------


def np_log_sigmoid(z):
  return -np.log1p(np.exp(-z))


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_sum(x, m):
  """Σ_t m_t x_t per row, by an explicit loop."""
  out = np.zeros(x.shape[0])
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if m[b, t]:
        out[b] += x[b, t]
  return out


def np_mean(x, m):
  return np_sum(x, m) / m.sum(-1)


def np_c_r(a):
  """c = Σ m (log π_θ − log π_ref) of chosen, r likewise of rejected."""
  c = np_sum(a["chosen"], CHOSEN_MASK) - np_sum(a["ref_chosen"], CHOSEN_MASK)
  r = (np_sum(a["rejected"], REJECTED_MASK)
       - np_sum(a["ref_rejected"], REJECTED_MASK))
  return c, r


def ref_dpo(a, beta):
  c, r = np_c_r(a)
  return -np_log_sigmoid(beta * (c - r))


def ref_robust(a, beta, eps):
  c, r = np_c_r(a)
  h = c - r
  return ((-(1 - eps) * np_log_sigmoid(beta * h) + eps * np_log_sigmoid(-beta * h))
          / (1 - 2 * eps))


def ref_conservative(a, beta, eps):
  c, r = np_c_r(a)
  h = c - r
  return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)


def ref_ipo(a, beta):
  c_bar = np_mean(a["chosen"], CHOSEN_MASK) - np_mean(a["ref_chosen"], CHOSEN_MASK)
  r_bar = (np_mean(a["rejected"], REJECTED_MASK)
           - np_mean(a["ref_rejected"], REJECTED_MASK))
  return (c_bar - r_bar - 1 / (2 * beta)) ** 2


def ref_hinge(a, beta):
  c, r = np_c_r(a)
  return np.maximum(0.0, 1 - beta * (c - r))


def ref_simpo(a, beta, gamma):
  lw, ll = CHOSEN_MASK.sum(-1), REJECTED_MASK.sum(-1)
  return -np_log_sigmoid(beta / lw * np_sum(a["chosen"], CHOSEN_MASK)
                         - beta / ll * np_sum(a["rejected"], REJECTED_MASK)
                         - gamma)


def ref_orpo(a, lam):
  pw = np_mean(a["chosen"], CHOSEN_MASK)  # log p(y_w), p = exp(mean log-prob)
  pl = np_mean(a["rejected"], REJECTED_MASK)
  log_odds_w = pw - np.log(1 - np.exp(pw))
  log_odds_l = pl - np.log(1 - np.exp(pl))
  nll_w = -pw
  return nll_w - lam * np_log_sigmoid(log_odds_w - log_odds_l)


def ref_rpo(a, beta, eta):
  return ref_dpo(a, beta) + eta * (-np_mean(a["chosen"], CHOSEN_MASK))


def ref_apo_zero(a, beta):
  c, r = np_c_r(a)
  return (1 - np_sigmoid(beta * c)) + np_sigmoid(beta * r)


def ref_apo_down(a, beta):
  c, r = np_c_r(a)
  return np_sigmoid(beta * c) + (1 - np_sigmoid(beta * (c - r)))


def ref_nca(a, beta):
  c, r = np_c_r(a)
  return (-np_log_sigmoid(beta * c) - 0.5 * np_log_sigmoid(-beta * c)
          - 0.5 * np_log_sigmoid(-beta * r))


def ref_bco_pair(a, beta, delta):
  c, r = np_c_r(a)
  if delta is None:  # batch mean of all 2B implicit rewards
    delta = np.mean(np.concatenate([beta * c, beta * r]))
  return -np_log_sigmoid(beta * c - delta) - np_log_sigmoid(-(beta * r - delta))


def np_decayed_sum(x, m, gamma):
  """Σ_t m_t γ^k x_t with k = 0, 1, ... counting completion tokens."""
  out = np.zeros(x.shape[0])
  for b in range(x.shape[0]):
    k = 0
    for t in range(x.shape[1]):
      if m[b, t]:
        out[b] += gamma ** k * x[b, t]
        k += 1
  return out


def ref_d2po(a, beta, gamma):
  c = (np_decayed_sum(a["chosen"], CHOSEN_MASK, gamma)
       - np_decayed_sum(a["ref_chosen"], CHOSEN_MASK, gamma))
  r = (np_decayed_sum(a["rejected"], REJECTED_MASK, gamma)
       - np_decayed_sum(a["ref_rejected"], REJECTED_MASK, gamma))
  return -np_log_sigmoid(beta * (c - r))


def np_ld_sum(x, m, shared, alpha):
  """Σ over the first `shared` completion tokens + α·Σ over the rest."""
  out = np.zeros(x.shape[0])
  for b in range(x.shape[0]):
    k = 0
    for t in range(x.shape[1]):
      if m[b, t]:
        k += 1
        out[b] += (1.0 if k <= shared[b] else alpha) * x[b, t]
  return out


def ref_ld_dpo(a, beta, alpha):
  shared = np.minimum(CHOSEN_MASK.sum(-1), REJECTED_MASK.sum(-1))
  c = (np_ld_sum(a["chosen"], CHOSEN_MASK, shared, alpha)
       - np_ld_sum(a["ref_chosen"], CHOSEN_MASK, shared, alpha))
  r = (np_ld_sum(a["rejected"], REJECTED_MASK, shared, alpha)
       - np_ld_sum(a["ref_rejected"], REJECTED_MASK, shared, alpha))
  return -np_log_sigmoid(beta * (c - r))


ARRAYS = {"chosen": CHOSEN, "rejected": REJECTED, "ref_chosen": REF_CHOSEN,
          "ref_rejected": REF_REJECTED}

# name -> (library options, float64 reference of loss_B)
CASES = {
    "dpo": ({"beta": 0.5}, lambda a: ref_dpo(a, 0.5)),
    "robust": ({"beta": 0.5, "eps": 0.2}, lambda a: ref_robust(a, 0.5, 0.2)),
    "conservative": ({"beta": 0.5, "eps": 0.2},
                     lambda a: ref_conservative(a, 0.5, 0.2)),
    "ipo": ({"beta": 0.7}, lambda a: ref_ipo(a, 0.7)),
    "hinge": ({"beta": 0.8}, lambda a: ref_hinge(a, 0.8)),
    "simpo": ({"beta": 2.0, "gamma": 0.3}, lambda a: ref_simpo(a, 2.0, 0.3)),
    "orpo": ({"beta": 0.1, "lam": 0.4}, lambda a: ref_orpo(a, 0.4)),
    "rpo": ({"beta": 0.5, "eta": 0.3}, lambda a: ref_rpo(a, 0.5, 0.3)),
    "apo_zero": ({"beta": 0.5}, lambda a: ref_apo_zero(a, 0.5)),
    "apo_down": ({"beta": 0.5}, lambda a: ref_apo_down(a, 0.5)),
    "nca": ({"beta": 0.5}, lambda a: ref_nca(a, 0.5)),
    "bco_pair": ({"beta": 0.5, "delta": 0.05},
                 lambda a: ref_bco_pair(a, 0.5, 0.05)),
    "d2po": ({"beta": 0.5, "gamma": 0.6}, lambda a: ref_d2po(a, 0.5, 0.6)),
    "ld_dpo": ({"beta": 0.5, "alpha": 0.3}, lambda a: ref_ld_dpo(a, 0.5, 0.3)),
}


def test_every_registered_loss_has_a_golden_case():
  assert set(CASES) == set(losses.PAIR_LOSSES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pair_loss_golden(name):
  opts, ref = CASES[name]
  loss_B, metrics = losses.PAIR_LOSSES[name](make_pair(), **opts)
  assert loss_B.shape == (3,) and loss_B.dtype == jnp.float32
  np.testing.assert_allclose(loss_B, ref(ARRAYS), rtol=2e-5, atol=1e-6)
  for key in ("reward_chosen_B", "reward_rejected_B", "margin_B", "accuracy_B",
              "logps_chosen_B", "logps_rejected_B"):
    assert metrics[key].shape == (3,), key


def test_pair_losses_run_under_jit():
  pair = make_pair()
  for name, (opts, _) in CASES.items():
    eager, _ = losses.PAIR_LOSSES[name](pair, **opts)
    jitted, _ = jax.jit(functools.partial(losses.PAIR_LOSSES[name], **opts))(pair)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7, err_msg=name)


def test_dpo_hand_value_and_metrics():
  # One token each: c = −0.2 − (−1.2) = 1, r = −2 − (−1) = −1, h = 2, β = 0.5:
  # loss = −log σ(1) = log(1 + e^−1).
  pair = losses.PairLogps(
      chosen_BT=jnp.array([[-0.2]]), rejected_BT=jnp.array([[-2.0]]),
      ref_chosen_BT=jnp.array([[-1.2]]), ref_rejected_BT=jnp.array([[-1.0]]),
      chosen_mask_BT=jnp.ones((1, 1)), rejected_mask_BT=jnp.ones((1, 1)))
  loss_B, m = losses.dpo(pair, beta=0.5)
  np.testing.assert_allclose(loss_B, [math.log1p(math.exp(-1.0))], rtol=1e-6)
  np.testing.assert_allclose(m["reward_chosen_B"], [0.5], rtol=1e-6)
  np.testing.assert_allclose(m["reward_rejected_B"], [-0.5], rtol=1e-6)
  np.testing.assert_allclose(m["margin_B"], [1.0], rtol=1e-6)
  np.testing.assert_allclose(m["accuracy_B"], [1.0])
  np.testing.assert_allclose(m["logps_chosen_B"], [-0.2], rtol=1e-6)


def test_dpo_metrics_golden():
  _, m = losses.dpo(make_pair(), beta=0.5)
  c, r = np_c_r(ARRAYS)
  np.testing.assert_allclose(m["reward_chosen_B"], 0.5 * c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["reward_rejected_B"], 0.5 * r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["margin_B"], 0.5 * (c - r), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["accuracy_B"], (c - r > 0).astype(np.float32))
  np.testing.assert_allclose(m["logps_chosen_B"], np_sum(CHOSEN, CHOSEN_MASK),
                             rtol=1e-6)
  np.testing.assert_allclose(m["logps_rejected_B"],
                             np_sum(REJECTED, REJECTED_MASK), rtol=1e-6)
  # The test data must exercise both outcomes of the accuracy metric.
  assert 0 < m["accuracy_B"].sum() < 3


def test_extra_metrics_golden():
  _, m = losses.orpo(make_pair(), beta=0.1, lam=0.4)
  pw, pl = np_mean(CHOSEN, CHOSEN_MASK), np_mean(REJECTED, REJECTED_MASK)
  np.testing.assert_allclose(m["nll_chosen_B"], -pw, rtol=1e-6)
  np.testing.assert_allclose(
      m["log_odds_ratio_B"],
      (pw - np.log(1 - np.exp(pw))) - (pl - np.log(1 - np.exp(pl))), rtol=1e-5)
  np.testing.assert_allclose(m["reward_chosen_B"], 0.1 * pw, rtol=1e-6)
  _, m = losses.rpo(make_pair(), beta=0.5, eta=0.3)
  np.testing.assert_allclose(m["nll_chosen_B"], -pw, rtol=1e-6)


def test_bco_pair_batch_delta_and_metrics():
  loss_B, m = losses.bco_pair(make_pair(), beta=0.5)
  np.testing.assert_allclose(loss_B, ref_bco_pair(ARRAYS, 0.5, None), rtol=2e-5)
  c, r = np_c_r(ARRAYS)
  np.testing.assert_allclose(m["reward_mean_B"], 0.25 * (c + r), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(m["reward_shift_B"],
                             np.full(3, np.mean(0.25 * (c + r))), rtol=1e-5)
  # δ is a constant: its gradient path is cut even when estimated from the batch.
  grad = jax.grad(lambda d: losses.bco_pair(make_pair(), beta=0.5,
                                            delta=d)[0].sum())(0.05)
  assert np.isfinite(grad) and grad == 0.0


def test_special_cases_reduce_to_dpo():
  pair = make_pair()
  dpo_B, _ = losses.dpo(pair, beta=0.3)
  for name, opts in (("robust", {"eps": 0.0}), ("conservative", {"eps": 0.0}),
                     ("d2po", {"gamma": 1.0}), ("ld_dpo", {"alpha": 1.0}),
                     ("rpo", {"eta": 0.0})):
    loss_B, _ = losses.PAIR_LOSSES[name](pair, beta=0.3, **opts)
    np.testing.assert_allclose(loss_B, dpo_B, rtol=1e-6, err_msg=name)


def test_reference_free_losses_accept_missing_reference():
  pair = make_pair(ref_chosen=None, ref_rejected=None)
  for name in ("simpo", "orpo"):
    opts, ref = CASES[name]
    loss_B, _ = losses.PAIR_LOSSES[name](pair, **opts)
    np.testing.assert_allclose(loss_B, ref(ARRAYS), rtol=2e-5, err_msg=name)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"simpo", "orpo"}))
def test_reference_losses_require_reference(name):
  pair = make_pair(ref_chosen=None, ref_rejected=None)
  with pytest.raises(ValueError, match="ref_chosen_BT"):
    losses.PAIR_LOSSES[name](pair)


def test_bad_inputs_raise():
  pair = make_pair()
  with pytest.raises(ValueError, match="chosen_mask_BT"):
    losses.dpo(pair._replace(chosen_mask_BT=jnp.ones((3, 4))))
  with pytest.raises(ValueError, match="chosen_mask_BT"):
    losses.dpo(pair._replace(chosen_mask_BT=None))
  with pytest.raises(ValueError, match="eps"):
    losses.robust(pair, eps=0.5)
  with pytest.raises(ValueError, match="beta"):
    losses.dpo(pair, beta=0.0)
  with pytest.raises(ValueError, match="gamma"):
    losses.d2po(pair, gamma=1.5)
  with pytest.raises(ValueError, match="alpha"):
    losses.ld_dpo(pair, alpha=-0.1)
  with pytest.raises(TypeError):
    losses.dpo(pair, eps=0.1)  # an option dpo does not take


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def _grad_wrt_logps(fn, pair):
  """Gradient of Σ_B fn(pair) w.r.t. the float fields of pair (masks held fixed)."""
  floats = {k: v for k, v in pair._asdict().items()
            if v is not None and not k.endswith("mask_BT")}
  grads = jax.grad(lambda f: fn(pair._replace(**f))[0].sum())(floats)
  return pair._replace(**grads)


def test_dpo_gradient_direction():
  g = _grad_wrt_logps(lambda p: losses.dpo(p, beta=0.5), make_pair())
  # Descending the loss raises chosen and lowers rejected log-probs ...
  assert np.all(np.asarray(g.chosen_BT)[CHOSEN_MASK > 0] < 0)
  assert np.all(np.asarray(g.rejected_BT)[REJECTED_MASK > 0] > 0)
  # ... and prompt / padding positions get no gradient.
  assert np.all(np.asarray(g.chosen_BT)[CHOSEN_MASK == 0] == 0)
  assert np.all(np.asarray(g.rejected_BT)[REJECTED_MASK == 0] == 0)
  # Reference log-probs enter with the opposite sign.
  np.testing.assert_allclose(g.ref_chosen_BT, -np.asarray(g.chosen_BT))


def _finite_difference(fn, arrays, key, eps=1e-6):
  """Central differences of Σ_B fn(arrays) w.r.t. every entry of arrays[key]."""
  grad = np.zeros_like(arrays[key])
  for idx in np.ndindex(*arrays[key].shape):
    plus = {k: v.copy() for k, v in arrays.items()}
    minus = {k: v.copy() for k, v in arrays.items()}
    plus[key][idx] += eps
    minus[key][idx] -= eps
    grad[idx] = (fn(plus).sum() - fn(minus).sum()) / (2 * eps)
  return grad


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo"])
def test_pair_loss_gradient_matches_finite_differences(name):
  opts, ref = CASES[name]
  g = _grad_wrt_logps(lambda p: losses.PAIR_LOSSES[name](p, **opts), make_pair())
  for key in ("chosen", "rejected") + (("ref_chosen",) if name != "orpo" else ()):
    np.testing.assert_allclose(getattr(g, f"{key}_BT"),
                               _finite_difference(ref, ARRAYS, key),
                               rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")


def test_orpo_is_finite_at_probability_one():
  # A chosen completion of probability 1 (all log-probs 0) and a very unlikely
  # rejected one: log(1 − p) must stay finite, and so must the gradient.
  pair = losses.PairLogps(
      chosen_BT=jnp.zeros((1, 3)), rejected_BT=jnp.full((1, 2), -60.0),
      chosen_mask_BT=jnp.ones((1, 3)), rejected_mask_BT=jnp.ones((1, 2)))
  loss_B, m = losses.orpo(pair, lam=0.5)
  assert np.all(np.isfinite(loss_B)) and np.all(np.isfinite(m["log_odds_ratio_B"]))
  g = _grad_wrt_logps(lambda p: losses.orpo(p, lam=0.5), pair)
  assert np.all(np.isfinite(g.chosen_BT)) and np.all(np.isfinite(g.rejected_BT))


def test_log1mexp():
  x = np.array([-1e-6, -1e-3, -0.3, -np.log(2), -1.0, -5.0, -40.0, -100.0])
  np.testing.assert_allclose(losses.log1mexp(jnp.asarray(x, jnp.float32)),
                             np.log(-np.expm1(x)), rtol=1e-5, atol=1e-12)
  g = jax.grad(lambda v: losses.log1mexp(v).sum())(jnp.asarray(x, jnp.float32))
  # d/dx log(1 − e^x) = −e^x / (1 − e^x)
  np.testing.assert_allclose(g, -np.exp(x) / -np.expm1(x), rtol=1e-4, atol=1e-30)


def test_sequence_and_mean_logps():
  np.testing.assert_allclose(losses.sequence_logps(CHOSEN, CHOSEN_MASK),
                             [-2.0, -4.7, -3.2], rtol=1e-6)
  np.testing.assert_allclose(losses.mean_logps(CHOSEN, CHOSEN_MASK),
                             [-2.0 / 3, -4.7 / 5, -1.6], rtol=1e-6)
  # A row with no completion tokens averages to 0, not NaN.
  np.testing.assert_allclose(
      losses.mean_logps(jnp.ones((1, 2)), jnp.zeros((1, 2))), [0.0])


# ---------------------------------------------------------------------------
# combined_loss
# ---------------------------------------------------------------------------


def test_combined_loss():
  pair = make_pair()
  weights = {"dpo": 1.0, "hinge": 0.5, "robust": 2.0}
  loss_B, metrics = losses.combined_loss(pair, weights, beta=0.5, eps=0.2)
  expected = (ref_dpo(ARRAYS, 0.5) + 0.5 * ref_hinge(ARRAYS, 0.5)
              + 2.0 * ref_robust(ARRAYS, 0.5, 0.2))
  np.testing.assert_allclose(loss_B, expected, rtol=2e-5)
  np.testing.assert_allclose(metrics["hinge/loss_B"], ref_hinge(ARRAYS, 0.5),
                             rtol=2e-5)
  c, r = np_c_r(ARRAYS)
  for name in weights:
    np.testing.assert_allclose(metrics[f"{name}/margin_B"], 0.5 * (c - r),
                               rtol=1e-5, atol=1e-6)


def test_combined_loss_errors():
  pair = make_pair()
  with pytest.raises(ValueError, match="apo_zero.*dpo") as err:
    losses.combined_loss(pair, {"dpo": 1.0, "dop": 1.0})
  assert "'dop'" in str(err.value)
  with pytest.raises(ValueError, match="gamma"):
    losses.combined_loss(pair, {"dpo": 1.0}, gamma=0.5)
  with pytest.raises(ValueError, match="weights is empty"):
    losses.combined_loss(pair, {})
  with pytest.raises(ValueError, match="choose from"):
    losses.get_pair_loss("kto")


# ---------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------

KTO_MASK = np.array([[1, 1, 1, 0],
                     [1, 1, 0, 0],
                     [0, 1, 1, 1],
                     [1, 1, 1, 1]], np.float64)
KTO_LOGPS = _with_junk(np.array([[-0.5, -1.2, -0.3, 0.0],
                                 [-1.0, -0.2, 0.0, 0.0],
                                 [0.0, -2.5, -0.4, -0.9],
                                 [-0.3, -0.8, -1.1, -0.2]]), KTO_MASK)
KTO_REF = _with_junk(np.array([[-0.9, -1.0, -0.8, 0.0],
                               [-0.6, -0.5, 0.0, 0.0],
                               [0.0, -2.0, -0.7, -0.4],
                               [-0.5, -0.9, -1.3, -0.1]]), KTO_MASK)
KTO_DESIRABLE = np.array([True, False, True, False])


def ref_kto(a, beta, lambda_d, lambda_u, kl_ref):
  c = np_sum(a["logps"], KTO_MASK) - np_sum(a["ref"], KTO_MASK)
  z = max(0.0, np.mean(c) if kl_ref is None else kl_ref)
  return np.where(KTO_DESIRABLE,
                  lambda_d * (1 - np_sigmoid(beta * (c - z))),
                  lambda_u * (1 - np_sigmoid(beta * (z - c))))


def _kto(logps, ref, **opts):
  return losses.kto(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32),
                    jnp.asarray(KTO_MASK), jnp.asarray(KTO_DESIRABLE), **opts)


@pytest.mark.parametrize("kl_ref", [None, 0.3, -0.4])
def test_kto_golden(kl_ref):
  a = {"logps": KTO_LOGPS, "ref": KTO_REF}
  loss_B, m = _kto(KTO_LOGPS, KTO_REF, beta=0.7, lambda_d=1.0, lambda_u=1.3,
                   kl_ref=kl_ref)
  np.testing.assert_allclose(loss_B, ref_kto(a, 0.7, 1.0, 1.3, kl_ref),
                             rtol=2e-5, atol=1e-7)
  c = np_sum(KTO_LOGPS, KTO_MASK) - np_sum(KTO_REF, KTO_MASK)
  z = max(0.0, np.mean(c) if kl_ref is None else kl_ref)
  np.testing.assert_allclose(m["reward_B"], 0.7 * c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["kl_ref_B"], np.full(4, z), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(m["accuracy_B"],
                                np.where(KTO_DESIRABLE, c > z, c < z))


def test_kto_batch_estimate_is_clamped_at_zero():
  # Shift the policy down so the batch-mean log ratio is negative: z = 0.
  shifted = np.where(KTO_MASK > 0, KTO_LOGPS - 1.0, JUNK)
  _, m = _kto(shifted, KTO_REF)
  np.testing.assert_array_equal(m["kl_ref_B"], np.zeros(4))


@pytest.mark.parametrize("kl_ref", [None, 0.3])
def test_kto_gradient_matches_finite_differences(kl_ref):
  g = jax.grad(lambda x: _kto(x, KTO_REF, beta=0.7, lambda_u=1.3,
                              kl_ref=kl_ref)[0].sum())(
                                  jnp.asarray(KTO_LOGPS, jnp.float32))
  # z is a stop-gradient constant: hold it at its value while differencing.
  c = np_sum(KTO_LOGPS, KTO_MASK) - np_sum(KTO_REF, KTO_MASK)
  z = np.mean(c) if kl_ref is None else kl_ref
  fd = _finite_difference(lambda a: ref_kto(a, 0.7, 1.0, 1.3, z),
                          {"logps": KTO_LOGPS, "ref": KTO_REF}, "logps")
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)
  # Desirable examples are pushed up, undesirable ones down.
  assert np.all(np.asarray(g)[KTO_DESIRABLE][KTO_MASK[KTO_DESIRABLE] > 0] < 0)
  assert np.all(np.asarray(g)[~KTO_DESIRABLE][KTO_MASK[~KTO_DESIRABLE] > 0] > 0)


def test_kto_bad_shapes():
  with pytest.raises(ValueError, match="desirable_B"):
    losses.kto(jnp.zeros((4, 4)), jnp.zeros((4, 4)), jnp.ones((4, 4)),
               jnp.ones((3,), bool))
  with pytest.raises(ValueError, match="ref_logps_BT"):
    losses.kto(jnp.zeros((4, 4)), jnp.zeros((4, 3)), jnp.ones((4, 4)),
               jnp.ones((4,), bool))


# ---------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------


def test_bradley_terry():
  rw = np.array([1.5, -0.2, 0.3])
  rl = np.array([0.5, 0.4, 0.3])
  loss_B, m = rm_losses.bradley_terry(jnp.asarray(rw), jnp.asarray(rl))
  np.testing.assert_allclose(loss_B, -np_log_sigmoid(rw - rl), rtol=1e-6)
  np.testing.assert_allclose(loss_B[0], math.log1p(math.exp(-1.0)), rtol=1e-6)
  np.testing.assert_array_equal(m["accuracy_B"], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(m["margin_B"], rw - rl, rtol=1e-6)
  margin = np.array([0.5, 0.0, 1.0])
  loss_B, m = rm_losses.bradley_terry(jnp.asarray(rw), jnp.asarray(rl),
                                      margin_B=jnp.asarray(margin))
  np.testing.assert_allclose(loss_B, -np_log_sigmoid(rw - rl - margin), rtol=1e-6)
  np.testing.assert_allclose(m["margin_B"], rw - rl, rtol=1e-6)
  g = jax.grad(lambda w: rm_losses.bradley_terry(w, jnp.asarray(rl))[0].sum())(
      jnp.asarray(rw, jnp.float32))
  assert np.all(np.asarray(g) < 0)
  with pytest.raises(ValueError, match="reward_rejected_B"):
    rm_losses.bradley_terry(jnp.zeros(3), jnp.zeros(2))


REWARDS_KB = np.array([[1.0, 0.0, -2.0],
                       [3.0, 0.5, -1.0],
                       [2.0, -0.5, 0.0]])


def test_ensemble_aggregations():
  np.testing.assert_allclose(rm_losses.ensemble_mean(REWARDS_KB),
                             [2.0, 0.0, -1.0], rtol=1e-6)
  np.testing.assert_allclose(rm_losses.ensemble_worst_case(REWARDS_KB),
                             [1.0, -0.5, -2.0], rtol=1e-6)
  # Population variance per column: 2/3, 1/6, 2/3.
  np.testing.assert_allclose(
      rm_losses.ensemble_uncertainty_weighted(REWARDS_KB, lam=0.5),
      [2.0 - 0.5 * 2 / 3, 0.0 - 0.5 / 6, -1.0 - 0.5 * 2 / 3], rtol=1e-6)
  # ddof=1: sample variance 1, 1/4, 1.
  np.testing.assert_allclose(
      rm_losses.ensemble_uncertainty_weighted(REWARDS_KB, lam=2.0, ddof=1),
      [0.0, -0.5, -3.0], rtol=1e-6, atol=1e-7)
  assert set(rm_losses.ENSEMBLE_AGGREGATIONS) == {
      "mean", "worst_case", "uncertainty_weighted"}
  np.testing.assert_allclose(
      rm_losses.get_ensemble_aggregation("worst_case")(REWARDS_KB),
      REWARDS_KB.min(0))


def test_ensemble_errors():
  with pytest.raises(ValueError, match="rewards_KB"):
    rm_losses.ensemble_mean(np.zeros(3))
  with pytest.raises(ValueError, match="ddof"):
    rm_losses.ensemble_uncertainty_weighted(np.zeros((1, 3)), lam=1.0, ddof=1)
  with pytest.raises(ValueError, match="choose from"):
    rm_losses.get_ensemble_aggregation("median")
