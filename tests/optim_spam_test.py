"""Golden tests for jaxrl_llm.optim_spam: SPAM and Stable-SPAM steps by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm import optim_spam

EPS = 1e-12  # negligible next to every denominator below


def _run(tx, grads):
  """Feeds a list of gradients for one vector parameter; returns the updates."""
  params = jnp.zeros_like(grads[0])
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = tx.update(g, state, params)
    out.append(np.asarray(u))
  return out, state


def test_spam_spike_aware_clipping_golden():
  tx = optim_spam.scale_by_spam(0.5, 0.5, EPS, spike_threshold=4.0, reset_interval=0,
                                reset_warmup_steps=0, clip_delay=1)
  (u0, u1), _ = _run(tx, [jnp.array([1.0, 2.0]), jnp.array([10.0, -1.0])])
  # t=0 (no clipping yet): m = .5 g, v = .5 g^2, bias corrections .5 -> u = sign(g).
  np.testing.assert_allclose(u0, [1.0, 1.0], rtol=1e-6)
  # t=1: theta * v = 4 * [.5, 2] = [2, 8]; g^2 = [100, 1] -> entry 0 is a spike,
  # clipped to sign(10) * sqrt(2); entry 1 passes.
  g = np.array([math.sqrt(2.0), -1.0])
  m = 0.5 * np.array([0.5, 1.0]) + 0.5 * g
  v = 0.5 * np.array([0.5, 2.0]) + 0.5 * g**2
  expected = (m / 0.75) / np.sqrt(v / 0.75)
  np.testing.assert_allclose(u1, expected, rtol=1e-6)
  np.testing.assert_allclose(u1[0], 0.98849593, rtol=1e-6)
  assert abs(u1[1]) < 1e-6


def test_spam_clip_delay_leaves_early_spikes():
  # With clip_delay=2 the spike at t=1 is not clipped: plain Adam.
  tx = optim_spam.scale_by_spam(0.5, 0.5, EPS, spike_threshold=4.0, reset_interval=0,
                                reset_warmup_steps=0, clip_delay=2)
  (_, u1), _ = _run(tx, [jnp.array([1.0]), jnp.array([10.0])])
  m, v = 0.25 + 5.0, 0.25 + 50.0
  np.testing.assert_allclose(u1, [(m / 0.75) / math.sqrt(v / 0.75)], rtol=1e-6)


def test_spam_momentum_reset_and_cosine_warmup_golden():
  tx = optim_spam.scale_by_spam(0.5, 0.5, EPS, spike_threshold=0.0, reset_interval=2,
                                reset_warmup_steps=2, clip_delay=1)
  g = [jnp.array([1.0]), jnp.array([1.0]), jnp.array([2.0]), jnp.array([2.0]),
       jnp.array([2.0])]
  u, state = _run(tx, g)
  # t=0, 1: plain Adam on constant gradients, no warm-up before the first reset.
  np.testing.assert_allclose(u[0], [1.0], rtol=1e-6)
  np.testing.assert_allclose(u[1], [1.0], rtol=1e-6)
  # t=2: reset (m = v = 0), then m = 1, v = 2; bias correction counts all steps
  # (1 - .5^3 = .875); warm-up s_0 = 1 - .99 * (1 + cos 0) / 2 = .01.
  ratio2 = (1.0 / 0.875) / math.sqrt(2.0 / 0.875)
  np.testing.assert_allclose(u[2], [0.01 * ratio2], rtol=1e-5)
  # t=3: m = 1.5, v = 3, bc = .9375; s_1 = 1 - .99 * (1 + cos(pi/3)) / 2 = .2575.
  ratio3 = (1.5 / 0.9375) / math.sqrt(3.0 / 0.9375)
  np.testing.assert_allclose(u[3], [0.2575 * ratio3], rtol=1e-5)
  # t=4: the next reset restarts the warm-up.
  ratio4 = (1.0 / (1 - 0.5**5)) / math.sqrt(2.0 / (1 - 0.5**5))
  np.testing.assert_allclose(u[4], [0.01 * ratio4], rtol=1e-5)
  assert int(state.count) == 5


def test_reset_warmup_scale_reaches_one():
  # N = 3 steps of warm-up after each reset, interval 10.
  scales = [float(optim_spam.reset_warmup_scale(jnp.int32(t), 10, 3)) for t in range(25)]
  assert scales[:10] == [1.0] * 10
  np.testing.assert_allclose(scales[10], 0.01, rtol=1e-6)
  assert scales[10] < scales[11] < scales[12] < 1.0
  assert scales[13:20] == [1.0] * 7
  np.testing.assert_allclose(scales[20], 0.01, rtol=1e-6)


def test_stable_spam_adaclip_adagn_golden():
  tx = optim_spam.scale_by_stable_spam(0.5, 0.5, EPS, gamma1=0.5, gamma2=0.5, gamma3=0.5,
                                       reset_interval=0)
  (u0, u1), state = _run(tx, [jnp.array([3.0, -4.0]), jnp.array([30.0, 1.0])])
  # t=0: g_max = 4, T = 2, T_hat = 4: nothing clipped. n = 5, mu_hat = 5,
  # nu_hat = 25 -> g <- g / 5 * 1 = [.6, -.8]; Adam's first step is sign(g).
  np.testing.assert_allclose(u0, [1.0, -1.0], rtol=1e-6)
  # t=1: g_max = 30, T = .5*2 + .5*30 = 16, T_hat = 16 / .75; entry 0 > T_hat
  # becomes 30 / 30 * T_hat.
  t_hat = 16.0 / 0.75
  g = np.array([t_hat, 1.0])
  n = np.linalg.norm(g)
  mu_hat = (0.5 * 2.5 + 0.5 * n) / 0.75
  nu_hat = (0.5 * 12.5 + 0.5 * n**2) / 0.75
  g_hat = g / n * mu_hat / math.sqrt(nu_hat)
  m = 0.5 * np.array([0.3, -0.4]) + 0.5 * g_hat
  v = 0.5 * np.array([0.18, 0.32]) + 0.5 * g_hat**2
  expected = (m / 0.75) / np.sqrt(v / 0.75)
  np.testing.assert_allclose(u1, expected, rtol=1e-5)
  np.testing.assert_allclose(u1, [0.984819, -0.515109], rtol=1e-4)
  np.testing.assert_allclose(state.max_ema_L, [16.0], rtol=1e-6)


def test_stable_spam_damps_a_spike_that_adam_passes_on():
  """A 1e6x spike at step 50: Adam's next updates are the spike's (3x off the
  spike-free run); Stable-SPAM's stay within 0.5x of its spike-free run."""
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=(16,)), jnp.float32) for _ in range(54)]
  spiked = list(grads)
  spiked[50] = grads[50] * 1e6

  def deviation(tx):
    clean, _ = _run(tx, grads)
    hit, _ = _run(tx, spiked)
    return [np.linalg.norm(c - h) / np.linalg.norm(c) for c, h in zip(clean[50:], hit[50:])]

  assert min(deviation(optax.scale_by_adam())) > 2.0
  assert max(deviation(optim_spam.scale_by_stable_spam(reset_interval=0))) < 0.5


def test_stable_spam_reset_restarts_bias_correction():
  # With a reset before every update (interval 1) each step is Adam's first
  # step on the normalised gradient: sign(g) per entry.
  tx = optim_spam.scale_by_stable_spam(0.9, 0.999, EPS, reset_interval=1)
  u, _ = _run(tx, [jnp.array([1.0, -2.0]), jnp.array([-3.0, 0.5]), jnp.array([2.0, 2.0])])
  for g_u, sign in zip(u, ([1, -1], [-1, 1], [1, 1])):
    np.testing.assert_allclose(g_u, sign, rtol=1e-5)


def test_per_leaf_statistics_and_dtypes():
  params = {"a": jnp.zeros((3, 2), jnp.bfloat16), "b": {"c": jnp.zeros((4,))}}
  tx = optim_spam.scale_by_stable_spam()
  state = tx.init(params)
  assert state.max_ema_L.shape == (2,)
  assert state.mu["a"].dtype == jnp.bfloat16
  grads = {"a": jnp.ones((3, 2), jnp.bfloat16), "b": {"c": jnp.full((4,), 100.0)}}
  u, state = jax.jit(tx.update)(grads, state, params)
  assert u["a"].dtype == jnp.bfloat16 and state.mu["a"].dtype == jnp.bfloat16
  # The statistics are per leaf (leaf order of jax.tree.leaves: a, b.c).
  np.testing.assert_allclose(state.max_ema_L, [0.001, 0.1], rtol=1e-3)


def test_spam_rejects_zero_clip_delay():
  with pytest.raises(ValueError, match="clip_delay"):
    optim_spam.scale_by_spam(clip_delay=0)
