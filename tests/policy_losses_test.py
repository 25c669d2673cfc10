"""Tests for jaxrl_llm.rl.policy_losses.

Expected values are computed here with plain Python / numpy loops following
the formula written next to them. Gradients are checked against central
finite differences in float64 (jax.enable_x64).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.rl import advantages as adv_lib
from jaxrl_llm.rl import policy_losses as pl

MASK = [[1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1]]
# Log-ratios chosen well away from the clip boundaries log(0.8) = -0.223,
# log(1.2) = 0.182 and log(1.28) = 0.247, covering every clip case.
DELTA = [[0.05, 0.4, -0.5, 0.21, -0.1, 7.0],
         [0.3, -0.4, 0.1, 9.0, -9.0, 0.0],
         [-0.05, 0.6, -0.35, 0.0, 0.15, -0.3]]
ADV = [[1.0, 1.0, 1.0, -1.0, -1.0, 1.0],
       [-2.0, -2.0, 0.5, 0.5, 0.5, 0.5],
       [0.7, -0.7, 0.7, -0.7, 0.7, -0.7]]


def _inputs(dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.5, 3.0, size=(3, 6))
  logp = old + np.array(DELTA)
  return (logp.astype(dtype), old.astype(dtype), np.array(ADV, dtype),
          np.array(MASK, np.int32))


def _fd_grad(f, x, h=1e-6):
  """Central differences of scalar f at x (float64)."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (float(f(xp)) - float(f(xm))) / (2 * h)
  return g


def _mean_loss(loss_fn, mode, max_len=None, **opts):
  """logp -> aggregated scalar loss, for gradient checks."""
  def f(logp, old, adv, mask):
    loss_bt, _ = loss_fn(logp, old, adv, mask, **opts)
    total, denom = pl.aggregate(loss_bt, mask, mode, max_len=max_len)
    return total / denom
  return f


# ---------------------------------------------------------------------------
# Reference implementations (loops)
# ---------------------------------------------------------------------------


def _clip(x, lo, hi):
  return min(max(x, lo), hi)


def _ref_ppo(logp, old, adv, mask, el, eh):
  b, t = np.shape(mask)
  loss, lo, hi, ratio = (np.zeros((b, t)) for _ in range(4))
  for i in range(b):
    for s in range(t):
      if not mask[i][s]:
        continue
      rho = math.exp(logp[i][s] - old[i][s])
      a = adv[i][s]
      # l = -min(rho A, clip(rho, 1-el, 1+eh) A)
      loss[i, s] = -min(rho * a, _clip(rho, 1 - el, 1 + eh) * a)
      lo[i, s] = float(a < 0 and rho < 1 - el)
      hi[i, s] = float(a > 0 and rho > 1 + eh)
      ratio[i, s] = rho
  return loss, lo, hi, ratio


def _ref_gspo(logp, old, adv, mask, el, eh):
  b, t = np.shape(mask)
  loss, ratio = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    toks = [s for s in range(t) if mask[i][s]]
    # s_i = exp(mean_t log rho): the geometric mean of the token ratios.
    s_i = math.exp(sum(logp[i][s] - old[i][s] for s in toks) / len(toks))
    for s in toks:
      a = adv[i][s]
      loss[i, s] = -min(s_i * a, _clip(s_i, 1 - el, 1 + eh) * a)
      ratio[i, s] = s_i
  return loss, ratio


# ---------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
def test_ppo_clip_golden(el, eh):
  logp, old, adv, mask = _inputs()
  loss, m = pl.ppo_clip(logp, old, adv, mask, eps_low=el, eps_high=eh)
  want, lo, hi, ratio = _ref_ppo(logp.astype(float), old.astype(float), adv,
                                 mask, el, eh)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["clip_low_BT"], lo)
  np.testing.assert_array_equal(m["clip_high_BT"], hi)
  np.testing.assert_allclose(m["ratio_BT"], ratio, rtol=1e-5)


def test_ppo_clip_fractions():
  # Active clipping (eps 0.2 / 0.2, bounds log 0.8 = -0.223, log 1.2 = 0.182):
  #   high: A > 0 and log rho > 0.182 -> only (0,1): log rho = 0.4, A = +1.
  #   low:  A < 0 and log rho < -0.223 -> (1,1): -0.4, A = -2;
  #                                        (2,5): -0.3, A = -0.7.
  # Not clipped, e.g. (0,2): log rho = -0.5 with A > 0 and (2,1): 0.6 with
  # A < 0 (the unclipped term is the larger loss there).
  logp, old, adv, mask = _inputs()
  _, m = pl.ppo_clip(logp, old, adv, mask)
  want_hi, want_lo = np.zeros((3, 6)), np.zeros((3, 6))
  want_hi[0, 1] = 1.0
  want_lo[1, 1] = want_lo[2, 5] = 1.0
  np.testing.assert_array_equal(m["clip_high_BT"], want_hi)
  np.testing.assert_array_equal(m["clip_low_BT"], want_lo)
  # Clip-higher: with A = +1 at (0,3), rho = e^0.21 = 1.23 is clipped by
  # eps_high = 0.2 but not by 0.28; rho = e^0.4 = 1.49 is clipped by both.
  adv2 = adv.copy()
  adv2[0, 3] = 1.0
  _, m20 = pl.ppo_clip(logp, old, adv2, mask, eps_high=0.2)
  _, m28 = pl.ppo_clip(logp, old, adv2, mask, eps_high=0.28)
  assert m20["clip_high_BT"][0, 3] == 1.0 and m28["clip_high_BT"][0, 3] == 0.0
  assert m20["clip_high_BT"][0, 1] == 1.0 and m28["clip_high_BT"][0, 1] == 1.0


def test_masked_tokens_are_zero_and_finite():
  logp, old, adv, mask = _inputs()
  logp[0, 5] = 80.0  # garbage at a padded position: exp would overflow
  for name in pl.POLICY_LOSSES:
    loss, metrics = pl.policy_loss(name, logp, old, adv, mask)
    assert np.all(np.isfinite(loss)), name
    assert np.all(np.asarray(loss)[np.array(MASK) == 0] == 0.0), name
    for key, value in metrics.items():
      assert key.endswith("_BT") and value.shape == (3, 6), (name, key)
      assert np.all(np.asarray(value)[np.array(MASK) == 0] == 0.0), (name, key)


def test_dual_clip_golden():
  logp, old, adv, mask = _inputs()
  c = 3.0
  loss, m = pl.dual_clip(logp, old, adv, mask, clip_c=c)
  ppo, _, _, _ = _ref_ppo(logp.astype(float), old.astype(float), adv, mask,
                          0.2, 0.2)
  want, dual = ppo.copy(), np.zeros((3, 6))
  for i in range(3):
    for s in range(6):
      # For A < 0: l = min(l_ppo, -c A).
      if mask[i][s] and adv[i][s] < 0 and ppo[i, s] > -c * adv[i][s]:
        want[i, s], dual[i, s] = -c * adv[i][s], 1.0
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["clip_dual_BT"], dual)
  # Token (2,1): rho = e^0.6 = 1.82, A = -0.7 -> no dual clip at c=3;
  # at c=1.5 the bound 1.05 < 1.276 is active.
  assert dual[2, 1] == 0.0
  _, m15 = pl.dual_clip(logp, old, adv, mask, clip_c=1.5)
  assert m15["clip_dual_BT"][2, 1] == 1.0


@pytest.mark.parametrize("el,eh", [(3e-4, 4e-4), (0.2, 0.2)])
def test_gspo_golden(el, eh):
  logp, old, adv, mask = _inputs()
  want, ratio = _ref_gspo(logp.astype(float), old.astype(float), adv, mask,
                          el, eh)
  for fn in (pl.gspo, pl.gspo_token):
    loss, m = fn(logp, old, adv, mask, eps_low=el, eps_high=eh)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["ratio_BT"], ratio, rtol=1e-5)


def test_gspo_clip_fraction_is_sequence_level():
  logp, old, adv, mask = _inputs()
  _, m = pl.gspo(logp, old, adv, mask)
  _, ratio = _ref_gspo(logp.astype(float), old.astype(float), adv, mask,
                       3e-4, 4e-4)
  want_hi = ((ratio > 1 + 4e-4) & (np.array(ADV) > 0)
             & (np.array(MASK) > 0)).astype(float)
  want_lo = ((ratio < 1 - 3e-4) & (np.array(ADV) < 0)
             & (np.array(MASK) > 0)).astype(float)
  np.testing.assert_array_equal(m["clip_high_BT"], want_hi)
  np.testing.assert_array_equal(m["clip_low_BT"], want_lo)


@pytest.mark.parametrize("el,eh", [(None, 0.28), (0.2, 0.28)])
def test_cispo_golden(el, eh):
  logp, old, adv, mask = _inputs()
  loss, m = pl.cispo(logp, old, adv, mask, eps_low=el, eps_high=eh)
  want, lo, hi = np.zeros((3, 6)), np.zeros((3, 6)), np.zeros((3, 6))
  for i in range(3):
    for s in range(6):
      if not mask[i][s]:
        continue
      rho = math.exp(float(logp[i, s]) - float(old[i, s]))
      w = min(rho, 1 + eh) if el is None else _clip(rho, 1 - el, 1 + eh)
      want[i, s] = -w * adv[i][s] * float(logp[i, s])  # -sg(w) A log pi
      hi[i, s] = float(rho > 1 + eh)
      lo[i, s] = float(el is not None and rho < 1 - el)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["clip_high_BT"], hi)
  np.testing.assert_array_equal(m["clip_low_BT"], lo)


def test_cispo_gradient_is_clipped_weight_times_advantage():
  logp, old, adv, mask = _inputs()
  grad = jax.grad(lambda lp: jnp.sum(pl.cispo(lp, old, adv, mask)[0]))(logp)
  rho = np.exp(logp.astype(float) - old.astype(float))
  want = -np.minimum(rho, 1.28) * adv * mask
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
  # Every unmasked token with A != 0 keeps a gradient, clipped or not.
  assert np.all(np.asarray(grad)[np.array(MASK) > 0] != 0.0)


def test_tis_weights_golden():
  rng = np.random.default_rng(3)
  old = -rng.uniform(0.1, 2.0, size=(2, 5))
  sampler = old + rng.normal(scale=1.0, size=(2, 5))
  got = pl.tis_weights(old, sampler, cap=2.0)
  want = [[min(math.exp(old[i, t] - sampler[i, t]), 2.0) for t in range(5)]
          for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.any(np.asarray(got) == 2.0)
  g = jax.grad(lambda o: jnp.sum(pl.tis_weights(o, sampler)))(
      jnp.asarray(old, jnp.float32))
  np.testing.assert_array_equal(g, 0.0)
  with pytest.raises(ValueError, match="cap"):
    pl.tis_weights(old, sampler, cap=0.0)


def test_kl_penalty_golden():
  rng = np.random.default_rng(4)
  logp = -rng.uniform(0.1, 3.0, size=(2, 4))
  ref = -rng.uniform(0.1, 3.0, size=(2, 4))
  l = logp - ref
  want = {
      "k1": l,
      "k2": l ** 2 / 2,
      "k3": np.exp(-l) - 1 + l,
  }
  for kind in pl.KL_KINDS:
    np.testing.assert_allclose(pl.kl_penalty(logp, ref, kind), want[kind],
                               rtol=1e-5, atol=1e-6, err_msg=kind)
  assert np.all(np.asarray(pl.kl_penalty(logp, ref, "k3")) >= 0)
  with pytest.raises(ValueError, match="valid kinds: k1, k2, k3"):
    pl.kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

AGG_MASK = [[1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0],   # fully dropped row: not counted in N
            [1, 0, 0, 0, 0]]


def _ref_aggregate(loss, mask, mode, max_len=None):
  # Masked entries are left out entirely (0 * NaN would be NaN).
  rows = [[(loss[i][t] if mask[i][t] else 0.0, mask[i][t])
           for t in range(len(mask[0]))] for i in range(len(mask))]
  n = sum(1 for r in rows if any(m for _, m in r))
  tok_sum = sum(m * x for r in rows for x, m in r)
  if mode == "token_mean":  # sum m l / sum m
    return tok_sum, sum(m for r in rows for _, m in r)
  if mode == "seq_mean_token_mean":  # (1/N) sum_i (sum_t m l / sum_t m)
    return sum(sum(m * x for x, m in r) / sum(m for _, m in r)
               for r in rows if any(m for _, m in r)), n
  if mode == "seq_mean_token_sum":  # (1/N) sum_{i,t} m l
    return tok_sum, n
  return tok_sum, n * max_len  # sum m l / (N L_max)


@pytest.mark.parametrize("mode", pl.AGGREGATION_MODES)
def test_aggregate_golden_and_microbatch_exact(mode):
  rng = np.random.default_rng(5)
  loss = rng.normal(size=(4, 5))
  loss[2, :] = np.nan  # values under a zero mask must not leak
  total, denom = pl.aggregate(loss, AGG_MASK, mode, max_len=5)
  want_total, want_denom = _ref_aggregate(loss, AGG_MASK, mode, 5)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  np.testing.assert_allclose(denom, want_denom)
  # Micro-batches: summing totals and denominators reproduces the full batch.
  parts = [pl.aggregate(loss[s], np.array(AGG_MASK)[s], mode, max_len=5)
           for s in (slice(0, 1), slice(1, 3), slice(3, 4))]
  np.testing.assert_allclose(sum(p[0] for p in parts), total, rtol=1e-5)
  np.testing.assert_allclose(sum(p[1] for p in parts), denom)


def test_aggregate_errors():
  with pytest.raises(ValueError, match="valid modes: token_mean"):
    pl.aggregate(np.zeros((2, 3)), np.ones((2, 3)), "mean")
  with pytest.raises(ValueError, match="max_len"):
    pl.aggregate(np.zeros((2, 3)), np.ones((2, 3)), "seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="shape"):
    pl.aggregate(np.zeros((2, 3)), np.ones((2, 4)), "token_mean")


# ---------------------------------------------------------------------------
# Gradients vs finite differences (float64)
# ---------------------------------------------------------------------------


def _check_grad(f, logp, *args):
  analytic = jax.grad(f)(jnp.asarray(logp), *args)
  numeric = _fd_grad(jax.jit(lambda x: f(x, *args)), logp)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
  return np.asarray(analytic)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.2, 0.28)])
def test_ppo_clip_grad_fd(mode, el, eh):
  with jax.enable_x64(True):
    logp, old, adv, mask = _inputs(np.float64)
    f = _mean_loss(pl.ppo_clip, mode, eps_low=el, eps_high=eh)
    grad = _check_grad(f, logp, old, adv, mask)
    _, lo, hi, _ = _ref_ppo(logp, old, adv, mask, el, eh)
    # Clipped tokens get exactly zero gradient; unclipped ones don't.
    clipped = (lo + hi) > 0
    assert np.all(grad[clipped] == 0.0)
    assert np.all(grad[~clipped & (np.array(MASK) > 0)] != 0.0)


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (3e-4, 4e-4)])
def test_gspo_grad_fd(el, eh):
  with jax.enable_x64(True):
    logp, old, adv, mask = _inputs(np.float64)
    # A constant per sequence, as for outcome advantages.
    adv = np.repeat(np.array([[1.0], [-0.5], [0.8]]), 6, axis=1)
    f = _mean_loss(pl.gspo, "seq_mean_token_mean", eps_low=el, eps_high=eh)
    grad = _check_grad(f, logp, old, adv, mask)
    # GSPO-token has the same gradient when A is constant per sequence.
    f_tok = _mean_loss(pl.gspo_token, "seq_mean_token_mean", eps_low=el,
                       eps_high=eh)
    grad_tok = jax.grad(f_tok)(jnp.asarray(logp), old, adv, mask)
    np.testing.assert_allclose(grad_tok, grad, rtol=1e-10, atol=1e-12)


def test_gspo_grad_golden():
  # Unclipped sequence i: d l_i / d logp_t = -A_i s_i / |y_i|; with
  # seq_mean_token_mean over N sequences the loss is (1/N) sum_i l_i.
  with jax.enable_x64(True):
    logp, old, adv, mask = _inputs(np.float64)
    adv = np.repeat(np.array([[1.0], [-0.5], [0.8]]), 6, axis=1)
    f = _mean_loss(pl.gspo, "seq_mean_token_mean", eps_low=0.5, eps_high=0.5)
    grad = np.asarray(jax.grad(f)(jnp.asarray(logp), old, adv, mask))
    _, ratio = _ref_gspo(logp, old, adv, mask, 0.5, 0.5)
    lengths = np.sum(MASK, axis=1, keepdims=True)
    want = -adv * ratio / lengths / 3 * np.array(MASK)
    np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_cispo_grad_fd():
  # CISPO's importance weight is a stop-gradient constant. Shifting logp and
  # old_logp together keeps rho (hence the weight) fixed, so the finite
  # difference along that direction is the derivative at fixed weight, which
  # autodiff must reproduce.
  with jax.enable_x64(True):
    logp, old, adv, mask = _inputs(np.float64)
    f = _mean_loss(pl.cispo, "token_mean")
    analytic = jax.grad(f)(jnp.asarray(logp), old, adv, mask)
    delta = logp - old
    numeric = _fd_grad(jax.jit(lambda x: f(x, x - delta, adv, mask)), logp)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", pl.AGGREGATION_MODES)
def test_aggregate_grad_fd(mode):
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    loss = rng.normal(size=(4, 5))
    mask = np.array(AGG_MASK, np.float64)

    def f(x):
      total, denom = pl.aggregate(x, mask, mode, max_len=7)
      return total / denom

    analytic = np.asarray(jax.grad(f)(jnp.asarray(loss)))
    np.testing.assert_allclose(analytic, _fd_grad(jax.jit(f), loss),
                               rtol=1e-6, atol=1e-8)
    assert np.all(analytic[mask == 0] == 0.0)


# ---------------------------------------------------------------------------
# Dr. GRPO length bias
# ---------------------------------------------------------------------------


def test_dr_grpo_removes_length_bias():
  """GRPO + per-sequence 1/|y_i| penalises long wrong answers less per token.

  Group of 3: one correct (length 4), a short incorrect (length 2) and a long
  incorrect (length 7). On-policy (rho = 1) the per-token gradient of the
  PPO loss is -A_i / (N |y_i|) under seq_mean_token_mean, so the long wrong
  answer's tokens are pushed down less; under Dr. GRPO (no std, constant
  N * L_max normaliser) both wrong answers get the same per-token push.
  """
  max_len = 8
  lengths = [4, 2, 7]
  mask = np.array([[1] * n + [0] * (max_len - n) for n in lengths])
  rewards = jnp.array([1.0, 0.0, 0.0])
  logp = -np.linspace(0.5, 2.0, 3 * max_len).reshape(3, max_len)
  old = logp.copy()

  def per_token_grad(estimator, mode):
    adv_bt = adv_lib.compute_advantages(estimator, rewards, 3, mask)
    f = _mean_loss(pl.ppo_clip, mode, max_len=max_len)
    return np.asarray(jax.grad(f)(jnp.asarray(logp, jnp.float32), old,
                                  adv_bt, mask))

  g = per_token_grad("grpo", "seq_mean_token_mean")
  short, long = g[1, :2], g[2, :7]
  assert np.all(short > 0) and np.all(long > 0)  # wrong answers pushed down
  assert np.max(np.abs(long)) < np.min(np.abs(short))
  np.testing.assert_allclose(long * 7, short[0] * 2, rtol=1e-5)
  np.testing.assert_allclose(short, short[0], rtol=1e-6)

  g = per_token_grad("dr_grpo", "seq_mean_token_sum_norm")
  short, long = g[1, :2], g[2, :7]
  np.testing.assert_allclose(long, short[0], rtol=1e-6)
  np.testing.assert_allclose(short, short[0], rtol=1e-6)
  # -A / (N L_max) with A = 0 - 1/3 and N = 3.
  np.testing.assert_allclose(short[0], (1 / 3) / (3 * max_len), rtol=1e-5)


# ---------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------


def test_policy_loss_dispatch():
  logp, old, adv, mask = _inputs()
  for name, fn in pl.POLICY_LOSSES.items():
    a, ma = pl.policy_loss(name, logp, old, adv, mask)
    b, mb = fn(logp, old, adv, mask)
    np.testing.assert_array_equal(a, b)
    assert set(ma) == set(mb) >= {"ratio_BT", "clip_low_BT", "clip_high_BT"}
  assert set(pl.POLICY_LOSSES) == {
      "ppo_clip", "dual_clip", "gspo", "gspo_token", "cispo"}


def test_policy_loss_errors():
  logp, old, adv, mask = _inputs()
  with pytest.raises(ValueError, match="valid names: ppo_clip, .*cispo"):
    pl.policy_loss("reinforce", logp, old, adv, mask)
  with pytest.raises(ValueError, match="shape"):
    pl.ppo_clip(logp, old[:, :4], adv, mask)
  with pytest.raises(ValueError, match="eps_high"):
    pl.ppo_clip(logp, old, adv, mask, eps_high=-0.1)
  with pytest.raises(ValueError, match="clip_c"):
    pl.dual_clip(logp, old, adv, mask, clip_c=0.5)


def test_bf16_inputs_compute_in_float32():
  logp, old, adv, mask = _inputs()
  for name in pl.POLICY_LOSSES:
    loss, _ = pl.policy_loss(name, jnp.asarray(logp, jnp.bfloat16),
                             jnp.asarray(old, jnp.bfloat16), adv, mask)
    assert loss.dtype == jnp.float32, name
  total, denom = pl.aggregate(jnp.ones((2, 3), jnp.bfloat16), np.ones((2, 3)),
                              "token_mean")
  assert total.dtype == jnp.float32 and denom.dtype == jnp.float32


def test_under_jit():
  logp, old, adv, mask = _inputs()
  f = jax.jit(_mean_loss(pl.ppo_clip, "seq_mean_token_sum_norm", max_len=6,
                         eps_high=0.28))
  g = _mean_loss(pl.ppo_clip, "seq_mean_token_sum_norm", max_len=6,
                 eps_high=0.28)
  np.testing.assert_allclose(f(logp, old, adv, mask), g(logp, old, adv, mask),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
  """Restores the loss registry after the test (registrations are global)."""
  saved = dict(pl.POLICY_LOSSES)
  yield
  pl.POLICY_LOSSES.clear()
  pl.POLICY_LOSSES.update(saved)


def scaled_ppo(logp_BT, old_logp_BT, adv_BT, mask_BT, *, scale, eps_high=0.2):
  """ℓ = scale · ℓ^ppo: a custom loss with its own hyper-parameter."""
  loss_BT, metrics = pl.ppo_clip(logp_BT, old_logp_BT, adv_BT, mask_BT, eps_high=eps_high)
  return scale * loss_BT, metrics


def test_register_policy_loss(clean_registry):
  assert pl.register_policy_loss("scaled_ppo", scaled_ppo) is scaled_ppo
  assert "scaled_ppo" in pl.policy_loss_names()
  assert pl.get_policy_loss("scaled_ppo") is scaled_ppo
  logp, old, adv, mask = _inputs()
  loss, m = pl.policy_loss("scaled_ppo", logp, old, adv, mask, scale=0.5, eps_high=0.28)
  want, _, hi, _ = _ref_ppo(logp.astype(float), old.astype(float), adv, mask, 0.2, 0.28)
  np.testing.assert_allclose(loss, 0.5 * want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["clip_high_BT"], hi)
  pl.unregister_policy_loss("scaled_ppo")
  with pytest.raises(ValueError, match="Unknown policy loss 'scaled_ppo'"):
    pl.policy_loss("scaled_ppo", logp, old, adv, mask, scale=0.5)


def test_register_policy_loss_errors(clean_registry):
  pl.register_policy_loss("scaled_ppo", scaled_ppo)
  with pytest.raises(ValueError, match="already registered.*overwrite=True"):
    pl.register_policy_loss("scaled_ppo", scaled_ppo)
  with pytest.raises(ValueError, match="already registered"):
    pl.register_policy_loss("ppo_clip", scaled_ppo)
  with pytest.raises(ValueError, match="must be callable"):
    pl.register_policy_loss("x", None)
  with pytest.raises(ValueError, match="cannot be called"):
    pl.register_policy_loss("x", lambda logp_BT, adv_BT: logp_BT)
  with pytest.raises(ValueError, match="non-empty string"):
    pl.register_policy_loss("", scaled_ppo)
  with pytest.raises(ValueError, match="built-in"):
    pl.unregister_policy_loss("cispo")
  with pytest.raises(ValueError, match="No policy loss"):
    pl.unregister_policy_loss("nope")
  pl.register_policy_loss("ppo_clip", scaled_ppo, overwrite=True)
  assert pl.POLICY_LOSSES["ppo_clip"] is scaled_ppo
