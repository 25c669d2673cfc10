"""RLConfig: live registries, estimator / loss options and *_kwargs, config files, the step.

Expected values are worked out by hand next to each assertion.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing
from jaxrl_llm.rl import advantages, policy_losses
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import TrainState, create_train_state


@pytest.fixture
def registry():
  """Restores both registries after the test (registrations are global)."""
  saved_adv, saved_loss = dict(advantages.OUTCOME_ESTIMATORS), dict(policy_losses.POLICY_LOSSES)
  yield
  advantages.OUTCOME_ESTIMATORS.clear()
  advantages.OUTCOME_ESTIMATORS.update(saved_adv)
  policy_losses.POLICY_LOSSES.clear()
  policy_losses.POLICY_LOSSES.update(saved_loss)


def scaled_reward(rewards_B, group_size, *, scale, valid_B=None):
  """A_i = scale · r_i (no baseline), 0 on invalid rows."""
  valid_B = jnp.ones_like(rewards_B) if valid_B is None else jnp.asarray(valid_B)
  return jnp.where(valid_B != 0, scale * rewards_B, 0.0)


def linear_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, *, coef, eps_high=0.2):
  """ℓ = −coef · ρ · A (ρ = 1 in value on-policy, so the loss value is −coef·A)."""
  on_BT = jnp.asarray(mask_BT) != 0
  ratio_BT = jnp.exp(jnp.where(on_BT, logp_BT - jax.lax.stop_gradient(old_logp_BT), 0.0))
  loss_BT = jnp.where(on_BT, -coef * ratio_BT * jax.lax.stop_gradient(adv_BT), 0.0)
  return loss_BT, {"clip_high_BT": on_BT.astype(loss_BT.dtype)}


def uses_kwargs(rewards_B, group_size, *, valid_B=None, **opts):
  return jnp.zeros_like(rewards_B) + sum(opts.values())


# ---------------------------------------------------------------------------
# Registries and options
# ---------------------------------------------------------------------------


def test_unregistered_names_are_rejected_with_the_valid_choices():
  with pytest.raises(ValueError, match=r"RLConfig.advantage='mine'.*'grpo'.*'copo'.*register"):
    rl_config.RLConfig(advantage="mine")
  with pytest.raises(ValueError, match=r"RLConfig.policy_loss='mine'.*'cispo'.*register"):
    rl_config.RLConfig(policy_loss="mine")


def test_registered_estimator_and_loss_through_rlconfig(registry):
  advantages.register_advantage_estimator("scaled_reward", scaled_reward)
  policy_losses.register_policy_loss("linear", linear_loss)
  cfg = rl_config.RLConfig(advantage="scaled_reward", advantage_kwargs=(("scale", 3.0),),
                           policy_loss="linear", loss_kwargs={"coef": 0.5}, eps_high=0.28)
  # Only what the functions take: eps/ddof are not parameters of scaled_reward;
  # eps_high is a parameter of linear_loss, so RLConfig.eps_high is passed.
  assert cfg.advantage_options() == {"scale": 3.0}
  assert cfg.loss_options() == {"coef": 0.5, "eps_high": 0.28}
  assert cfg.loss_kwargs == (("coef", 0.5),)
  mask_BT = jnp.array([[1, 1], [1, 0]])
  adv_BT = advantages.compute_advantages(cfg.advantage, jnp.array([1.0, 0.5]), 2, mask_BT,
                                         **cfg.advantage_options())
  np.testing.assert_allclose(adv_BT, [[3.0, 3.0], [1.5, 0.0]])  # 3 · r on unmasked tokens
  loss_BT, _ = policy_losses.policy_loss(cfg.policy_loss, jnp.zeros((2, 2)), jnp.zeros((2, 2)),
                                         adv_BT, mask_BT, **cfg.loss_options())
  np.testing.assert_allclose(loss_BT, [[-1.5, -1.5], [-0.75, 0.0]])  # −0.5 · A


def test_builtin_options_are_unchanged():
  cases = {"grpo": {"eps": 1e-3, "ddof": 0}, "copo": {"eps": 1e-3, "ddof": 0},
           "batch_std": {"eps": 1e-3}, "reinforce_pp_baseline": {"eps": 1e-3},
           "dr_grpo": {}, "rloo": {}, "remax": {}}
  for name, want in cases.items():
    cfg = rl_config.RLConfig(advantage=name, adv_eps=1e-3, adv_std_ddof=0)
    assert cfg.advantage_options() == want, name
  both = {"eps_low": 0.1, "eps_high": 0.3}
  cases = {"ppo_clip": both, "gspo": both, "gspo_token": both, "cispo": {"eps_high": 0.3},
           "dual_clip": dict(both, clip_c=2.5)}
  for name, want in cases.items():
    cfg = rl_config.RLConfig(policy_loss=name, eps_low=0.1, eps_high=0.3, dual_clip_c=2.5)
    assert cfg.loss_options() == want, name
  cfg = rl_config.RLConfig(advantage="reinforce_pp", advantage_kwargs=(("gamma", 0.9),))
  assert cfg.advantage_options() == {"eps": 1e-4, "gamma": 0.9}


def test_kwargs_errors(registry):
  advantages.register_advantage_estimator("scaled_reward", scaled_reward)
  with pytest.raises(ValueError, match=r"'scale2' is not a parameter of 'scaled_reward'"):
    rl_config.RLConfig(advantage="scaled_reward", advantage_kwargs=(("scale2", 1.0),))
  with pytest.raises(ValueError, match=r"'k' is not a parameter of 'grpo'"):
    rl_config.RLConfig(advantage="grpo", advantage_kwargs=(("k", 1.0),))
  with pytest.raises(ValueError, match=r"'eps' collides with a built-in option.*adv_eps"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs=(("eps", 1e-6),))
  with pytest.raises(ValueError, match=r"'eps_high' collides.*RLConfig.eps_high"):
    rl_config.RLConfig(loss_kwargs=(("eps_high", 0.3),))
  with pytest.raises(ValueError, match=r"'valid_B' collides with an argument the RL step"):
    rl_config.RLConfig(advantage="scaled_reward", advantage_kwargs=(("valid_B", None),))
  with pytest.raises(ValueError, match=r"'answers_B' collides"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs=(("answers_B", (1, 2)),))
  with pytest.raises(ValueError, match="duplicate name"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs=(("k", 1.0), ("k", 2.0)))
  with pytest.raises(ValueError, match="unhashable"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs=(("k", {"a": 1}),))
  with pytest.raises(ValueError, match=r"\(name, value\) pair"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs=(("k", 1.0, 2.0),))
  with pytest.raises(ValueError, match="tuple of"):
    rl_config.RLConfig(advantage="copo", advantage_kwargs="k=1")


def test_kwargs_are_hashable_and_accept_var_keyword(registry):
  advantages.register_advantage_estimator("uses_kwargs", uses_kwargs)
  cfg = rl_config.RLConfig(advantage="uses_kwargs",
                           advantage_kwargs=[["alpha", 1.0], ["shape", [2, 3]]])
  assert cfg.advantage_kwargs == (("alpha", 1.0), ("shape", (2, 3)))  # lists -> tuples
  assert hash(cfg) == hash(dataclasses.replace(cfg))
  assert cfg.advantage_options() == {"alpha": 1.0, "shape": (2, 3)}


def test_kwargs_from_a_config_file(registry):
  """Config files set *_kwargs as tuples of pairs; conversion and JSON snapshots keep them."""
  policy_losses.register_policy_loss("linear", linear_loss)
  c = config_lib.default_configdict(rl_preset="grpo")
  c.rl.advantage = "copo"
  c.rl.advantage_kwargs = (("k", 3.0), ("b", 0.5))
  c.rl.policy_loss = "linear"
  c.rl.loss_kwargs = (("coef", 2.0),)
  cfg = config_lib.from_configdict(c)
  assert cfg.rl.advantage_options() == {"eps": 1e-4, "ddof": 1, "k": 3.0, "b": 0.5}
  assert cfg.rl.loss_options() == {"coef": 2.0, "eps_high": 0.2}
  snapshot = json.loads(json.dumps(config_lib.to_dict(cfg)))  # tuples become lists
  assert snapshot["rl"]["advantage_kwargs"] == [["k", 3.0], ["b", 0.5]]
  assert config_lib.from_dict(config_lib.ExperimentConfig, snapshot).rl == cfg.rl
  c.rl.advantage_kwargs = (("gamma", 1.0),)
  with pytest.raises(ValueError, match=r"config.rl: .*'gamma' is not a parameter of 'copo'"):
    config_lib.from_configdict(c)


# ---------------------------------------------------------------------------
# Through the jitted RL step
# ---------------------------------------------------------------------------

VOCAB, EOS, G = 16, 2, 4
MODEL = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def _run_one_step(rl, reward_fn, num_prompts=4):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, shardings = create_train_state(MODEL, tx, jax.random.key(0), mesh)
  step = rls.RLStep(MODEL, rl, tx, reward_fn, eos_id=EOS, mesh=mesh)
  run = rls.jit_rl_step(step, shardings)
  rng = np.random.RandomState(0)
  batch = dict(prompt_tokens=rng.randint(3, VOCAB, size=(num_prompts, 4)).astype(np.int32),
               prompt_mask=np.ones((num_prompts, 4), np.int32),
               prompt_id=np.arange(num_prompts, dtype=np.int32))
  _, metrics = run(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
  return jax.device_get(metrics)


def test_registered_estimator_and_loss_in_the_jitted_step(registry):
  advantages.register_advantage_estimator("scaled_reward", scaled_reward)
  policy_losses.register_policy_loss("linear", linear_loss)

  def reward(inputs):  # r = 1 for even prompt ids, 2 for odd ones, whatever is sampled
    r = 1.0 + (inputs.task["prompt_id"] % 2).astype(jnp.float32)
    return r, {"correct": jnp.ones_like(r)}

  rl = rl_config.RLConfig(group_size=G, max_new_tokens=3, advantage="scaled_reward",
                          advantage_kwargs=(("scale", 2.0),), policy_loss="linear",
                          loss_kwargs=(("coef", 0.5),), aggregation="seq_mean_token_mean")
  m = _run_one_step(rl, reward)
  # loss/policy = (1/N) Σ_i mean_t ℓ_i = −coef · scale · mean_i r_i = −0.5 · 2 · 1.5.
  np.testing.assert_allclose(m["loss/policy"], -1.5, rtol=1e-6)
  assert float(m["rl/clip_frac_high"]) == 1.0  # the loss's own metric reaches the step


def test_copo_in_the_jitted_step_uses_answer_ids(registry):
  policy_losses.register_policy_loss("linear", linear_loss)
  # Per prompt (row of the table) and completion: reward and final-answer id.
  rewards_PG = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0]], np.float32)
  answers_PG = np.array([[7, 7, 7, 7], [3, 5, 3, 3], [7, 3, 5, 7], [1, 2, 4, 4]], np.float32)

  def reward(inputs):  # rows are prompt-major: row b is completion b % G of its prompt
    g_B = jnp.arange(inputs.completion_BL.shape[0]) % G
    pid_B = inputs.task["prompt_id"]
    r_B = jnp.asarray(rewards_PG)[pid_B, g_B]
    return r_B, {"correct": r_B, "answer_id": jnp.asarray(answers_PG)[pid_B, g_B]}

  rl = rl_config.RLConfig(group_size=G, max_new_tokens=3, advantage="copo",
                          advantage_kwargs=(("k", 3.0), ("b", 0.5)), policy_loss="linear",
                          loss_kwargs=(("coef", 1.0),), aggregation="seq_mean_token_mean")
  m = _run_one_step(rl, reward)
  want_B = advantages.copo(rewards_PG.reshape(-1), G, answers_B=answers_PG.reshape(-1),
                           k=3.0, b=0.5)
  without_answers_B = advantages.copo(rewards_PG.reshape(-1), G, k=3.0, b=0.5)
  # loss/policy = −mean_i A_i (see test above), so it reveals the advantages' mean.
  np.testing.assert_allclose(m["loss/policy"], -np.mean(want_B), rtol=1e-5)
  assert abs(np.mean(want_B) - np.mean(without_answers_B)) > 1e-2  # the ids were used
  assert "reward/answer_id" not in m and "reward/correct" in m  # a label is not logged


# ---------------------------------------------------------------------------
# DAPO's soft overlong punishment in the preset
# ---------------------------------------------------------------------------
def test_dapo_preset_derives_the_overlong_cache_from_max_new_tokens():
  # DAPO: L_max = 20480 generated tokens, the last L_c = 4096 of them the soft cache.
  assert rl_config.PRESETS["dapo"]["overlong_cache_fraction"] == pytest.approx(0.2)
  assert rl_config.from_preset("dapo", max_new_tokens=20480).overlong_cache_tokens == 4096
  # L_c = ⌊0.2 · L_max⌋: 512 -> 102, 64 -> 12, 16 -> 3; under 5 tokens it is 0 (no shaping).
  for max_new, cache in ((512, 102), (64, 12), (16, 3), (5, 1), (4, 0)):
    assert rl_config.from_preset("dapo", max_new_tokens=max_new).overlong_cache_tokens == cache
  # An explicit length wins over the fraction; presets without it shape nothing.
  assert rl_config.from_preset("dapo", max_new_tokens=512,
                               overlong_cache_len=128).overlong_cache_tokens == 128
  assert rl_config.from_preset("grpo", max_new_tokens=512).overlong_cache_tokens == 0
  with pytest.raises(ValueError, match="overlong_cache_fraction"):
    rl_config.RLConfig(overlong_cache_fraction=1.0)


def test_dapo_preset_cache_follows_a_later_max_new_tokens_in_a_config_file():
  """The preset stores the fraction, so the cache tracks max_new_tokens set after it."""
  c = config_lib.default_configdict(rl_preset="dapo")
  c.rl.max_new_tokens = 40
  cfg = config_lib.from_configdict(c)
  assert cfg.rl.overlong_cache_len == 0 and cfg.rl.overlong_cache_tokens == 8
  again = config_lib.from_dict(config_lib.ExperimentConfig,
                               json.loads(json.dumps(config_lib.to_dict(cfg))))
  assert again.rl == cfg.rl  # the checkpoint's config snapshot gives the same config back


def test_the_step_applies_the_derived_overlong_penalty():
  rl = rl_config.from_preset("dapo", group_size=4, max_new_tokens=10)  # L_c = 2
  step = rls.RLStep(testing.tiny_config("qwen3"), rl, optim.make_optimizer(optim.OptimConfig()),
                    lambda inputs: None, eos_id=2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state={}, extra={})
  lengths = jnp.array([5, 8, 9, 10], jnp.int32)
  rewards = jnp.ones((4,), jnp.float32)
  ro = {"lengths": lengths, "completion": jnp.zeros((4, 10), jnp.int32),
        "completion_mask": jnp.ones((4, 10), jnp.int32)}
  shaped, _, _ = step.shape_rewards(state, ro, rewards, {"correct": rewards})
  # R_len = 0 for |y| ≤ L − L_c = 8, (8 − |y|)/2 above: [0, 0, −0.5, −1].
  np.testing.assert_allclose(shaped, [1.0, 1.0, 0.5, 0.0])
