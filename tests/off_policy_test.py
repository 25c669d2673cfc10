"""Off-policy corrections: golden values for TIS / MIS, V-trace and ReMix; config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.rl import off_policy, policy_losses
from jaxrl_llm.rl.config import RLConfig

LOG = np.log


def test_importance_weights_truncate_and_mask():
  target = LOG(np.array([[3.0, 0.5, 1.5, 9.0]]))
  behaviour = np.zeros((1, 4))
  mask = np.array([[1, 1, 1, 0]])
  w_tis, sums = off_policy.importance_weights(target, behaviour, mask, cap=2.0, mode="tis")
  np.testing.assert_allclose(w_tis, [[2.0, 0.5, 1.5, 0.0]], rtol=1e-6)
  w_mis, _ = off_policy.importance_weights(target, behaviour, mask, cap=2.0, mode="mis")
  np.testing.assert_allclose(w_mis, [[0.0, 0.5, 1.5, 0.0]], rtol=1e-6)
  assert float(sums["rl/is_clip_frac"]) == 1.0          # ρ = 3 > 2; the masked 9 not counted
  np.testing.assert_allclose(sums["rl/is_ratio"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(sums["rl/is_weight"], 4.0, rtol=1e-6)
  # k3(μ‖π) per token: ρ − 1 − log ρ summed over the three tokens
  k3 = sum(r - 1 - np.log(r) for r in (3.0, 0.5, 1.5))
  np.testing.assert_allclose(sums["rl/behaviour_kl"], k3, rtol=1e-5)
  with pytest.raises(ValueError, match="mode"):
    off_policy.importance_weights(target, behaviour, mask, cap=2.0, mode="clip")


def test_vtrace_golden_values():
  """Hand-computed: γ = 0.9, ρ̄ = c̄ = 1; row 0 fills T, row 1 ends after two tokens."""
  log_rhos = LOG(np.array([[2.0, 0.5, 1.0], [1.0, 1.0, 1.0]]))
  rewards = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  values = np.full((2, 3), 0.5)
  mask = np.array([[1, 1, 1], [1, 1, 0]])
  vs, pg, sums = off_policy.vtrace(log_rhos, rewards, values, np.zeros(2), mask, discount=0.9,
                                   rho_bar=1.0, c_bar=1.0)
  np.testing.assert_allclose(vs, [[0.63, 0.7, 1.0], [0.9, 1.0, 0.0]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pg, [[0.13, 0.2, 0.5], [0.4, 0.5, 0.0]], rtol=1e-6, atol=1e-7)
  assert float(sums["rl/vtrace_rho_clip_frac"]) == 1.0   # the ρ = 2 token


def test_vtrace_on_policy_is_the_n_step_return():
  rng = np.random.RandomState(0)
  B, T, gamma = 3, 5, 0.8
  r, v, boot = rng.randn(B, T), rng.randn(B, T), rng.randn(B)
  vs, pg, _ = off_policy.vtrace(np.zeros((B, T)), r, v, boot, np.ones((B, T)), discount=gamma,
                                rho_bar=1.0, c_bar=1.0)
  ret = np.zeros((B, T))
  nxt = boot
  for t in reversed(range(T)):
    nxt = r[:, t] + gamma * nxt
    ret[:, t] = nxt
  np.testing.assert_allclose(vs, ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pg, r + gamma * np.concatenate([ret[:, 1:], boot[:, None]], 1) - v,
                             rtol=1e-5, atol=1e-5)


def impala_vtrace_loop(log_rhos, rewards, values, bootstrap, mask, gamma, rho_bar, c_bar, lam):
  """IMPALA eq. 1 written out as its sum, one row and one s at a time (ragged rows end)."""
  B, T = rewards.shape
  vs, pg = np.array(values, np.float64) * mask, np.zeros((B, T))
  for b in range(B):
    n = int(mask[b].sum())
    V = [float(values[b, t]) for t in range(n)] + [float(bootstrap[b]) if n == T else 0.0]
    rho = [min(rho_bar, float(np.exp(log_rhos[b, t]))) for t in range(n)]
    c = [lam * min(c_bar, float(np.exp(log_rhos[b, t]))) for t in range(n)]
    for s in range(n):
      total = V[s]
      for t in range(s, n):
        trace = np.prod(c[s:t]) if t > s else 1.0
        total += gamma ** (t - s) * trace * rho[t] * (rewards[b, t] + gamma * V[t + 1] - V[t])
      vs[b, s] = total
    for s in range(n):
      v_next = vs[b, s + 1] if s + 1 < n else V[n]
      pg[b, s] = rho[s] * (rewards[b, s] + gamma * v_next - V[s])
  return vs, pg


@pytest.mark.parametrize("rho_bar,c_bar,lam", [(1.0, 1.0, 1.0), (2.0, 0.9, 0.95)])
def test_vtrace_equals_the_impala_sum_off_policy(rho_bar, c_bar, lam):
  rng = np.random.RandomState(3)
  B, T, gamma = 4, 6, 0.9
  log_rhos = 0.8 * rng.randn(B, T)              # ρ from ~0.1 to ~10: both caps bind
  r, v, boot = rng.randn(B, T), rng.randn(B, T), rng.randn(B)
  lengths = np.array([6, 4, 1, 5])              # one full row (bootstrapped), three that end
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  vs, pg, sums = off_policy.vtrace(log_rhos, r, v, boot, mask, discount=gamma,
                                   rho_bar=rho_bar, c_bar=c_bar, lam=lam)
  want_vs, want_pg = impala_vtrace_loop(log_rhos, r, v, boot, mask, gamma, rho_bar, c_bar, lam)
  np.testing.assert_allclose(vs, want_vs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pg, want_pg, rtol=1e-5, atol=1e-5)
  on = mask > 0
  assert float(sums["rl/vtrace_rho_clip_frac"]) == np.sum((np.exp(log_rhos) > rho_bar) & on)
  assert float(sums["rl/vtrace_c_clip_frac"]) == np.sum((np.exp(log_rhos) > c_bar) & on)


def test_vtrace_advantages_golden_and_on_policy_identity():
  cfg = off_policy.OffPolicyConfig(correction="vtrace", is_cap=2.0, trace_cap=1.0)
  adv = np.full((1, 3), 2.0)
  mask = np.ones((1, 3))
  pg, _ = off_policy.vtrace_advantages(adv, LOG(np.array([[1.0, 0.5, 2.0]])), np.zeros((1, 3)),
                                       mask, cfg)
  np.testing.assert_allclose(pg, [[2.0, 2.0, 4.0]], rtol=1e-6)
  # on-policy: the estimator's advantages come back unchanged (ragged rows included)
  adv = np.array([[1.5, 1.5, 1.5, 0.0], [-0.5, -0.5, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  logp = -np.abs(np.random.RandomState(1).randn(2, 4))
  pg, _ = off_policy.vtrace_advantages(adv, logp, logp, mask, cfg)
  np.testing.assert_allclose(pg, adv, rtol=1e-6)


def test_remix_mix_policy_clip_golden_values_and_gradients():
  # behaviour μ = 0.5, proximal π_k = 0.4 → r^k = 0.8, clip range [0.6, 1.0]
  logp = LOG(np.array([[0.6, 0.6, 0.25, 0.45]]))
  mu, prox = LOG(np.full((1, 4), 0.5)), LOG(np.full((1, 4), 0.4))
  adv = np.array([[1.0, -1.0, -1.0, 1.0]])
  mask = np.ones((1, 4))
  loss, m = off_policy.mix_policy_clip_loss(logp, mu, prox, adv, mask, eps_low=0.2, eps_high=0.2)
  # r = 1.2, 1.2, 0.5, 0.9: min(rA, clip(r)A) = 1.0, -1.2, -0.6, 0.9
  np.testing.assert_allclose(loss, [[-1.0, 1.2, 0.6, -0.9]], rtol=1e-6)
  np.testing.assert_array_equal(m["clip_high_BT"], [[1, 0, 0, 0]])
  np.testing.assert_array_equal(m["clip_low_BT"], [[0, 0, 1, 0]])
  g = jax.grad(lambda lp: jnp.sum(off_policy.mix_policy_clip_loss(
      lp, mu, prox, adv, mask)[0]))(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(g, [[0.0, 1.2, 0.0, -0.9]], rtol=1e-5)  # -r·A where unclipped


def test_remix_on_policy_is_ppo_clip():
  rng = np.random.RandomState(2)
  old = -np.abs(rng.randn(3, 6))
  logp = old + 0.3 * rng.randn(3, 6)
  adv, mask = rng.randn(3, 6), (rng.rand(3, 6) > 0.2).astype(np.float32)
  ours, m1 = off_policy.mix_policy_clip_loss(logp, old, old, adv, mask, eps_low=0.2,
                                             eps_high=0.28)
  ppo, m2 = policy_losses.ppo_clip(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(ours, ppo, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(m1["clip_high_BT"], m2["clip_high_BT"])


def test_remix_kl_convex_golden():
  logp, base, prec = LOG(np.array([[0.5]])), LOG(np.array([[0.25]])), LOG(np.array([[0.5]]))
  kl = off_policy.kl_convex(logp, base, prec, base_weight=0.5)
  np.testing.assert_allclose(kl, [[0.5 * (0.5 - 1 + np.log(2))]], rtol=1e-6)  # 0.0965736
  only_base = off_policy.kl_convex(logp, base, prec, base_weight=1.0)
  np.testing.assert_allclose(only_base, policy_losses.kl_penalty(logp, base, "k3"), rtol=1e-6)
  with pytest.raises(ValueError, match="base_weight"):
    off_policy.kl_convex(logp, base, prec, base_weight=1.5)


def test_lag_schedule_and_reincarnation():
  assert [off_policy.lag_at(s, 2) for s in range(4)] == [2, 2, 2, 2]
  assert [off_policy.lag_at(s, 2, reincarnate_step=2) for s in range(4)] == [2, 2, 0, 0]
  with pytest.raises(ValueError, match="lag"):
    off_policy.lag_at(0, -1)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="rl.off_policy.correction"):
    off_policy.OffPolicyConfig(correction="impala")
  with pytest.raises(ValueError, match="is_cap"):
    off_policy.OffPolicyConfig(correction="vtrace", is_cap=0.5, trace_cap=1.0)
  with pytest.raises(ValueError, match="remix_reincarnate_step"):
    off_policy.OffPolicyConfig(correction="tis", remix_reincarnate_step=5)
  with pytest.raises(ValueError, match="async_lag"):
    RLConfig(async_lag=-1)
  with pytest.raises(ValueError, match="tis_cap"):
    RLConfig(tis_cap=2.0, off_policy={"correction": "tis"})
  assert RLConfig(off_policy={"correction": "mis"}).off_policy.correction == "mis"
