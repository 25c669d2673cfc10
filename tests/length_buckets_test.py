"""Length-bucketed update: same log-probs, loss and parameters as the full-width update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import optim, sampling, sharding, testing
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import length_buckets
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS = 16, 2
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
L = 128
# Forced completion lengths of the 16 rows (4 prompts x G=4): short rows, a few long
# ones, one truncated at the budget (150 > L), so micro-batches land in different buckets.
FORCED = np.array([3, 5, 40, 70, 8, 30, 12, 9, 150, 2, 60, 6, 11, 90, 4, 7], np.int32)


def test_bucket_widths_and_lengths():
  assert length_buckets.bucket_widths(1024, 4) == (128, 256, 512, 1024)
  assert length_buckets.bucket_widths(200, 4) == (64, 128, 200)
  assert length_buckets.bucket_widths(64, 4) == (64,)  # short budgets: one width, no switch
  assert length_buckets.bucket_widths(1024, 1) == (1024,)
  with pytest.raises(ValueError, match="num_buckets"):
    length_buckets.bucket_widths(1024, 0)
  mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
  np.testing.assert_array_equal(length_buckets.completion_lengths(mask), [2, 0, 4, 3])
  idx = jnp.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  np.testing.assert_array_equal(length_buckets.sort_by_length(idx, jnp.array([5, 1, 9, 1])),
                                [[1, 3, 0, 2], [3, 1, 0, 2]])
  with pytest.raises(ValueError, match="length_buckets"):
    rl_config.from_preset("grpo", length_buckets=0)


def even_reward(inputs):
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def _step(buckets):
  rl = rl_config.from_preset("grpo", group_size=4, max_new_tokens=L, microbatches=4,
                             minibatches=2, epochs=1, kl_coef=0.05, length_buckets=buckets)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  step = rls.RLStep(CFG, rl, tx, even_reward, eos_id=EOS, mesh=mesh,
                    logits_processor=sampling.force_lengths(FORCED, EOS))
  return step, state, sh


def test_bucketed_update_equals_the_full_width_update():
  rng = np.random.RandomState(0)
  batch = dict(prompt_tokens=rng.randint(3, VOCAB, size=(4, 6)).astype(np.int32),
               prompt_mask=np.ones((4, 6), np.int32), prompt_id=np.arange(4, dtype=np.int32))
  out = {}
  for buckets in (1, 4):
    step, state, sh = _step(buckets)
    assert step.length_widths == ((L,) if buckets == 1 else (64, L))
    ref = jax.tree.map(jnp.copy, state.params)
    ro = jax.jit(lambda p, b: step.rollout(p, b, jax.random.key(1), 0))(state.params, batch)
    np.testing.assert_array_equal(ro["lengths"], np.minimum(FORCED, L))
    logp = jax.jit(step._batched_logprobs)(state.params, ro)
    new_state, metrics = jax.jit(step.learn)(state, ro, *step.score(ro)[:2],
                                             jax.random.key(2), ref)
    # Past a row's completion the log-probs are never read (mask 0); bucketing zeroes them.
    logp = logp * ro["completion_mask"]
    out[buckets] = jax.device_get((logp, new_state.params, metrics))
  (logp1, p1, m1), (logp4, p4, m4) = out[1], out[4]
  np.testing.assert_allclose(logp4, logp1, rtol=1e-5, atol=1e-5)
  for k in ("loss/policy", "loss/kl", "rl/entropy", "rl/response_length"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-4, atol=1e-6)
  # Adam divides by each gradient element's magnitude: rounding-level differences of the
  # summation order move a few elements by ~1e-5 at lr 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5), p4, p1)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(p1), jax.tree.leaves(_step(1)[1].params)))
  assert moved > 1e-3  # the update did change the parameters it compares


def test_ppo_bucketed_values_and_critic_update_equal_the_full_width_ones():
  """PPO's value pass and critic loss are bucketed too: same values, critic and policy."""
  from jaxrl_llm.rl import critic as critic_lib
  from jaxrl_llm.rl import ppo_step as ppo

  rng = np.random.RandomState(0)
  batch = dict(prompt_tokens=rng.randint(3, VOCAB, size=(4, 6)).astype(np.int32),
               prompt_mask=np.ones((4, 6), np.int32), prompt_id=np.arange(4, dtype=np.int32))
  # Adam divides each gradient element by its own magnitude: an element whose gradient is
  # at rounding level turns the two summation orders' rounding into a difference of order
  # lr. eps = 1e-6 damps only those elements (as in tests/ppo_step_test.py).
  optim_cfg = optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0, eps=1e-6)
  tx = optim.make_optimizer(optim_cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  out = {}
  for buckets in (1, 4):
    rl = rl_config.from_preset(
        "ppo", group_size=4, max_new_tokens=L, microbatches=4, minibatches=2, epochs=1,
        length_buckets=buckets, critic=rl_config.CriticConfig(learning_rate=1e-2))
    state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
    critic_tx = critic_lib.critic_optimizer(optim_cfg, rl.critic)
    state, sh = critic_lib.add_critic(state, sh, CFG, critic_tx, mesh,
                                      value_head=rl.critic.value_head)
    step = ppo.PPOStep(CFG, rl, tx, even_reward, eos_id=EOS, mesh=mesh, critic_tx=critic_tx,
                       logits_processor=sampling.force_lengths(FORCED, EOS))
    ro = jax.jit(lambda p, b: step.rollout(p, b, jax.random.key(1), 0))(state.params, batch)
    values = jax.jit(step._batched_values)(state.critic["params"], state.params, ro)
    new_state, metrics = jax.jit(step.learn)(state, ro, *step.score(ro)[:2],
                                             jax.random.key(2), None)
    out[buckets] = jax.device_get((values * ro["completion_mask"], new_state, metrics))
  (v1, s1, m1), (v4, s4, m4) = out[1], out[4]
  np.testing.assert_allclose(v4, v1, rtol=1e-5, atol=1e-5)
  for k in ("critic/value_loss", "critic/explained_variance", "loss/policy"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-4, atol=1e-6)
  tol = dict(rtol=1e-3, atol=5e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), s4.critic, s1.critic)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), s4.params, s1.params)
