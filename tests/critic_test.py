"""The critic: token rewards, token-level GAE with a mask, clipped value loss, explained
variance, whitening, the value model's params and its config checks (golden values)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import sharding, testing
from jaxrl_llm.rl import advantages, critic
from jaxrl_llm.rl import config as rl_config

CFG = testing.tiny_config("qwen3", vocab_size=16, hidden_size=32, intermediate_size=64)


def test_token_rewards_put_the_outcome_at_the_last_token_and_kl_on_every_token():
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
  r = critic.token_rewards(jnp.array([1.0, 0.5, 2.0]), mask)
  np.testing.assert_allclose(r, [[0, 0, 1, 0], [0, 0.5, 0, 0], [0, 0, 0, 0]])
  kl = jnp.array([[0.1, 0.2, 0.3, 0.4]] * 3)
  r = critic.token_rewards(jnp.array([1.0, 0.5, 2.0]), mask, kl, kl_coef=0.5)
  np.testing.assert_allclose(r, [[-0.05, -0.1, 0.85, 0], [-0.05, 0.4, 0, 0], [0, 0, 0, 0]],
                             atol=1e-7)


def test_token_level_gae_with_a_mask_golden():
  # Row 0: outcome 1 at its 3rd (last) token, γ = 0.9, λ = 0.8; the masked 4th value is ignored.
  #   δ2 = 1 − 0.8 = 0.2;  δ1 = 0.9·0.8 − 0.6 = 0.12;  δ0 = 0.9·0.6 − 0.5 = 0.04
  #   A2 = 0.2;  A1 = 0.12 + 0.72·0.2 = 0.264;  A0 = 0.04 + 0.72·0.264 = 0.23008
  mask = jnp.array([[1, 1, 1, 0]])
  r = critic.token_rewards(jnp.array([1.0]), mask)
  adv, ret = advantages.gae(r, jnp.array([[0.5, 0.6, 0.8, 9.0]]), mask, gamma=0.9, lam=0.8)
  np.testing.assert_allclose(adv, [[0.23008, 0.264, 0.2, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0.73008, 0.864, 1.0, 0.0]], rtol=1e-6)
  # Row with a KL penalty, γ = λ = 1: returns are the reward-to-go (Monte Carlo).
  mask = jnp.array([[1, 1, 0, 0]])
  r = critic.token_rewards(jnp.array([0.5]), mask, jnp.array([[0.1, 0.2, 0.3, 0.4]]), 0.5)
  adv, ret = advantages.gae(r, jnp.array([[0.2, 0.1, 5.0, 5.0]]), mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(ret, [[0.35, 0.4, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(adv, [[0.15, 0.3, 0, 0]], rtol=1e-6)


def test_clipped_value_loss_golden():
  v = jnp.array([[1.0, 0.0, 0.5]])
  old = jnp.array([[0.5, 0.5, 0.5]])
  ret = jnp.array([[2.0, 1.0, 0.0]])
  # t0: V_clip = 0.7, max(1, 1.69) -> clipped;  t1: V_clip = 0.3, max(1, 0.49);  t2: equal terms.
  loss, clipped = critic.value_loss(v, old, ret, clip=0.2)
  np.testing.assert_allclose(loss, [[0.845, 0.5, 0.125]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[1.0, 0.0, 0.0]])
  # Inside the clip range V_old + (V − V_old) can round above V: not a clipped token.
  inside = critic.value_loss(jnp.array([[0.01050002]]), jnp.array([[-0.049462]]),
                             jnp.array([[-0.015779218]]), clip=0.2)[1]
  assert float(inside[0, 0]) == 0.0
  loss, clipped = critic.value_loss(v, old, ret, clip=0.0)
  np.testing.assert_allclose(loss, [[0.5, 0.5, 0.125]], rtol=1e-6)
  assert not np.any(clipped)
  # The clipped branch carries no gradient beyond the clip range; the unclipped one does.
  g = jax.grad(lambda x: jnp.sum(critic.value_loss(x, old, ret, 0.2)[0]))(v)
  np.testing.assert_allclose(g, [[0.0, -1.0, 0.5]], rtol=1e-6)


def test_explained_variance():
  ret = jnp.array([[1.0, 2.0, 3.0, 10.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  np.testing.assert_allclose(critic.explained_variance(ret, ret, mask), 1.0)
  # Var(R) = 2/3, Var(R − V) = Var([0, 1, 0]) = 2/9: 1 − 1/3.
  np.testing.assert_allclose(
      critic.explained_variance(jnp.array([[1.0, 1.0, 3.0, 0.0]]), ret, mask), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(critic.explained_variance(jnp.full((1, 4), 2.0), ret, mask), 0.0,
                             atol=1e-6)
  # Constant returns: nothing to explain, reported as 0 (never NaN).
  assert float(critic.explained_variance(jnp.zeros((1, 4)), jnp.ones((1, 4)), mask)) == 0.0


def test_whiten_over_the_mask():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  w = critic.whiten(x, mask)
  np.testing.assert_allclose(w[0, :3], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3), rtol=1e-5)
  assert float(w[0, 3]) == 0.0


def test_values_read_the_state_before_each_token():
  """V_t sees the prompt and completion_<t only: changing token t leaves V_0..V_t unchanged."""
  params = critic.init_critic_params(CFG, testing.tiny_params(CFG))
  params["head"]["w"] = jnp.ones((CFG.hidden_size,))
  rows = dict(prompt_tokens=jnp.array([[0, 3, 4]]), prompt_mask=jnp.array([[0, 1, 1]]),
              completion=jnp.array([[5, 6, 7, 2]]), completion_mask=jnp.ones((1, 4), jnp.int32))
  v1 = critic.token_values(CFG, params, None, rows)
  v2 = critic.token_values(CFG, params, None, dict(rows, completion=jnp.array([[5, 6, 9, 2]])))
  assert v1.shape == (1, 4) and v1.dtype == jnp.float32
  np.testing.assert_allclose(v1[:, :3], v2[:, :3], rtol=1e-5)
  assert abs(float(v1[0, 3] - v2[0, 3])) > 1e-6
  # A value head reads the policy trunk (no trunk in its params), without gradient to it.
  head = critic.init_critic_params(CFG)
  head["head"]["w"] = jnp.ones((CFG.hidden_size,))
  np.testing.assert_allclose(critic.token_values(CFG, head, params["trunk"], rows), v1, rtol=1e-6)
  g = jax.grad(lambda p: jnp.sum(critic.token_values(CFG, head, p, rows)))(params["trunk"])
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


def test_critic_shardings_follow_the_logical_axes():
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 8, 1)), jax.devices()[:8])
  sh = critic.critic_shardings(CFG, mesh, "trunk")
  assert sh["head"]["w"].spec == sharding.logical_to_spec(("embed",), sharding.DEFAULT_RULES,
                                                          mesh, (CFG.hidden_size,))
  from jaxrl_llm.train_state import param_shardings
  assert jax.tree.map(lambda s: s.spec, sh["trunk"]) == jax.tree.map(
      lambda s: s.spec, param_shardings(CFG, mesh))
  assert set(critic.critic_shardings(CFG, mesh, "head")) == {"head"}


def test_ppo_preset_and_critic_config_checks():
  rl = rl_config.from_preset("ppo")
  assert rl.advantage == "gae" and rl.critic.lam == 1.0 and rl.critic.policy_lam == 0.95
  assert rl_config.RLConfig(advantage="gae", critic={"lam": 0.9}).critic.policy_lam == 0.9
  with pytest.raises(ValueError, match="rl.critic.init='bad'"):
    critic.CriticConfig(init="bad")
  with pytest.raises(ValueError, match="hf_path"):
    critic.CriticConfig(init="hf")
  with pytest.raises(ValueError, match="hf_path"):
    critic.CriticConfig(hf_path="/x")
  with pytest.raises(ValueError, match="actor_lam"):
    critic.CriticConfig(actor_lam=1.5)
  with pytest.raises(ValueError, match="value_clip"):
    critic.CriticConfig(value_clip=-0.1)
  with pytest.raises(ValueError, match="warmup_steps"):
    critic.CriticConfig(warmup_steps=-1)
  with pytest.raises(ValueError, match="only read by PPO"):
    rl_config.RLConfig(advantage="grpo", critic={"learning_rate": 1e-3})
  with pytest.raises(ValueError, match="advantage_kwargs"):
    rl_config.RLConfig(advantage="gae", advantage_kwargs={"k": 1.0})
  assert rl_config.RLConfig(advantage="gae", kl_coef=0.1, kl_in_reward=True).kl_in_reward


def test_memory_plan_counts_the_critic():
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import memory
  kw = dict(batch_size=8, seq_len=32, group_size=4, kv_cache_len=32, num_devices=1)
  base = memory.plan_memory(CFG, (1, 1, 1), **kw)
  ppo = memory.plan_memory(CFG, (1, 1, 1), critic=CFG, **kw)
  # A value model copied from the policy: its params + AdamW moments, and its gradients.
  c = ppo.components
  assert c["critic state"] == c["parameters"] + c["optimizer state"]
  assert c["critic gradients"] == c["gradients"]
  assert ppo.update_bytes == base.update_bytes + c["critic gradients"]
  assert ppo.static_bytes == base.static_bytes + c["critic state"]
  head = memory.plan_memory(CFG, (1, 1, 1), critic=CFG, critic_head_only=True, **kw)
  assert head.components["critic state"] == (CFG.hidden_size + 1) * 4 * 3
  # From a config: only the 'gae' estimator holds a critic.
  for preset, has_critic in (("ppo", True), ("grpo", False)):
    cd = config_lib.default_configdict(kind="rl", rl_preset=preset)
    config_lib.use_builtin_task(cd, "arithmetic", batch_size=8, num_train=64, num_test=8)
    plan = memory.plan_for_experiment(config_lib.from_configdict(cd), CFG, 1)
    assert ("critic state" in plan.components) == has_critic
    assert ("critic state" in plan.table()) == has_critic


def test_lora_value_model_reads_the_policy_base_with_its_own_adapters():
  """A LoRA value model = the policy's frozen base + the critic's adapters: its values equal
  a full value model whose trunk is that combination; no gradient reaches the policy."""
  from jaxrl_llm import lora, tree_paths
  cfg = CFG.replace(lora=lora.LoraConfig(rank=2, target_modules=("q", "up")))
  policy = lora.add_adapters(cfg.lora, testing.tiny_params(CFG), jax.random.key(1))
  adapters = jax.tree.map(lambda a: a + 0.05, lora.adapter_params(policy))  # B ≠ 0: they act
  params = critic.init_critic_params(cfg, adapters=adapters)
  params["head"]["w"] = jnp.ones((CFG.hidden_size,))
  rows = dict(prompt_tokens=jnp.array([[0, 3, 4]]), prompt_mask=jnp.array([[0, 1, 1]]),
              completion=jnp.array([[5, 6, 7, 2]]), completion_mask=jnp.ones((1, 4), jnp.int32))
  v = critic.token_values(cfg, params, policy, rows)
  full = dict(head=params["head"], trunk=lora.with_adapters(policy, adapters))
  np.testing.assert_allclose(v, critic.token_values(cfg, full, None, rows), rtol=1e-6)
  off = critic.token_values(cfg, dict(params, adapters=lora.adapter_params(policy)), policy, rows)
  assert float(jnp.abs(v - off).max()) > 1e-4  # the critic's own adapters, not the policy's
  g_policy = jax.grad(lambda p: jnp.sum(critic.token_values(cfg, params, p, rows)))(policy)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_policy))
  g = jax.grad(lambda p: jnp.sum(critic.token_values(cfg, p, policy, rows)))(params)
  assert set(tree_paths.flatten(g["adapters"])) == set(tree_paths.flatten(adapters))
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["adapters"]))
  with pytest.raises(ValueError, match="not trainable adapter leaves"):
    lora.with_adapters(policy, {"layers": {"k_lora_a": adapters["layers"]["q_lora_a"]}})


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 8, 1)])
def test_memory_plan_counts_a_lora_value_model_exactly(mesh_shape):
  """The plan's critic state of a LoRA value model equals the bytes of the critic that
  `add_critic` creates (adapters, head and their two AdamW moments, per device)."""
  from jaxrl_llm import lora, memory, optim
  from jaxrl_llm.train_state import create_train_state
  cfg = CFG.replace(lora=lora.LoraConfig(rank=4))
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape), jax.devices()[:n])
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig()))
  params = lora.add_adapters(cfg.lora, testing.tiny_params(CFG), jax.random.key(1))
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh, params=params)
  state, _ = critic.add_critic(state, sh, cfg, optim.make_optimizer(optim.OptimConfig()), mesh)
  assert set(state.critic["params"]) == {"adapters", "head"}
  moments = [x for x in jax.tree.leaves(state.critic["opt_state"])  # not Adam's step count
             if jnp.issubdtype(x.dtype, jnp.floating)]
  held = sum(x.addressable_shards[0].data.nbytes
             for x in jax.tree.leaves(state.critic["params"]) + moments)
  plan = memory.plan_memory(cfg, mesh_shape, batch_size=8, seq_len=32, group_size=4,
                            kv_cache_len=32, num_devices=n, critic=cfg, critic_adapters=True)
  assert plan.components["critic state"] == held
