"""PPO with a learned critic: 8 devices equal 1, the critic warm-up, split mode, value head,
and a short trainer run of the 'ppo' preset."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing, trainer
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import critic as critic_lib
from jaxrl_llm.rl import ppo_step as ppo
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, TARGET = 16, 2, 7
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


target_reward = testing.target_token_reward(TARGET)


def make_batch(num_prompts=4, P=5):
  return testing.toy_prompt_batch(num_prompts, P, VOCAB)


def build(rl, mesh_shape=(1, 1, 1), lr=1e-2, eps=1e-8, reward=target_reward):
  optim_cfg = optim.OptimConfig(learning_rate=lr, grad_clip_norm=1.0, eps=eps)
  tx = optim.make_optimizer(optim_cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  critic_tx = critic_lib.critic_optimizer(optim_cfg, rl.critic)
  state, sh = critic_lib.add_critic(state, sh, CFG, critic_tx, mesh,
                                    value_head=rl.critic.value_head)
  step = ppo.PPOStep(CFG, rl, tx, reward, eos_id=EOS, mesh=mesh, critic_tx=critic_tx)
  return step, state, sh, mesh


def ppo_rl(**overrides):
  critic = dict(learning_rate=1e-2, lam=0.95, actor_lam=0.9, gamma=0.99)
  critic.update(overrides.pop("critic", {}))
  return rl_config.from_preset("ppo", group_size=4, max_new_tokens=5,
                               critic=rl_config.CriticConfig(**critic), **overrides)


def run_steps(rl, mesh_shape, n=2, key=3, eps=1e-8):
  step, state, sh, mesh = build(rl, mesh_shape, eps=eps)
  fn = rls.jit_rl_step(step, sh, None, sh.params if rl.needs_reference else None)
  ref = jax.tree.map(jnp.copy, state.params) if rl.needs_reference else None
  batch = sharding.shard_batch(make_batch(), mesh)
  for _ in range(n):
    state, metrics = fn(state, batch, jax.random.key(key), ref)
  return jax.device_get(state), jax.device_get(metrics), fn


def test_eight_devices_equal_one_device_and_no_recompilation():
  # Adam divides each gradient element by its own magnitude: elements whose
  # gradient is at rounding level turn 1-vs-8-device rounding into parameter
  # differences of order lr (3e-5 here with eps 1e-8, over two models and
  # 2 x 2 x 2 updates). eps = 1e-6 damps only those elements (< 1e-5 apart).
  rl = ppo_rl(epochs=2, minibatches=2, kl_coef=0.05, kl_in_reward=True)
  s1, m1, _ = run_steps(rl, (1, 1, 1), n=2, eps=1e-6)
  s8, m8, fn = run_steps(rl, (2, 2, 2), n=2, eps=1e-6)
  assert fn.jitted._cache_size() == 1
  tol = dict(rtol=2e-4, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), s1.params, s8.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), s1.critic, s8.critic)
  for k in ("reward/mean", "loss/policy", "critic/value_loss", "critic/explained_variance",
            "critic/value_mean", "critic/return_mean", "critic/advantage_mean",
            "critic/advantage_std", "critic/value_clip_frac"):
    assert np.isfinite(m1[k]), k
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6)
  assert int(s8.step) == 2 and float(m1["ppo/policy_updated"]) == 1.0
  assert float(m1["critic/value_loss"]) > 0


def test_critic_warmup_leaves_the_policy_unchanged():
  rl = ppo_rl(critic=dict(warmup_steps=2))
  step, state, sh, mesh = build(rl)
  fn = rls.jit_rl_step(step, sh, None, None)
  batch = sharding.shard_batch(make_batch(), mesh)
  before = jax.device_get(state)
  for i in range(3):
    state, m = fn(state, batch, jax.random.key(1), None)
    host = jax.device_get(state)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before.params, host.params)
    same_opt = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before.opt_state,
                            host.opt_state)
    critic_moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before.critic["params"],
                                host.critic["params"])
    assert any(jax.tree.leaves(critic_moved))
    if i < 2:  # warm-up: critic only
      assert all(jax.tree.leaves(same)) and all(jax.tree.leaves(same_opt))
      assert float(m["ppo/policy_updated"]) == 0.0 and float(m["loss/policy"]) == 0.0
    else:
      assert not all(jax.tree.leaves(same))
      assert float(m["ppo/policy_updated"]) == 1.0
  assert fn.jitted._cache_size() == 1


def test_split_mode_equals_one_jit_mode():
  rl = ppo_rl()
  step, state, sh, mesh = build(rl)
  batch = sharding.shard_batch(make_batch(), mesh)
  one = rls.jit_rl_step(step, sh, None, None)
  s_one, m_one = one(jax.tree.map(jnp.copy, state), batch, jax.random.key(5), None)

  def host_reward(ro):  # the same reward, computed in NumPy on the host
    comp, m = np.asarray(ro["completion"]), np.asarray(ro["completion_mask"])
    frac = ((comp == TARGET) * m).sum(1) / np.maximum(m.sum(1), 1)
    return frac, {"correct": (frac > 0.5).astype(np.float32)}
  split = rls.make_split_step(step, host_reward=host_reward)
  s_split, m_split = split(state, batch, jax.random.key(5), None)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # One Adam step at lr 1e-2 moves a weight by up to 1e-2. The two modes are different
  # programs, so an element whose gradient is at rounding level can move differently by a
  # small fraction of that (seen: 4e-6); atol lr/1000 allows that, far below what a
  # wrong gradient moves.
  step_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(step_close, s_one.params, s_split.params)
  jax.tree.map(step_close, s_one.critic, s_split.critic)
  close(m_one["critic/value_loss"], m_split["critic/value_loss"])


def test_value_head_trains_the_head_only_and_the_critic_learns():
  # The policy stays fixed (a long critic warm-up) and λ = γ = 1 makes the targets the
  # Monte-Carlo returns: every step fits the same regression, whose loss must fall from
  # ½·E[R²] at V ≡ 0 (rewards 1 + fraction of TARGET tokens: returns far from 0).
  def offset_reward(inputs):
    frac, aux = target_reward(inputs)
    return 1.0 + frac, aux
  rl = ppo_rl(critic=dict(init="value_head", learning_rate=1e-2, value_clip=0.0,
                          warmup_steps=100, lam=1.0, gamma=1.0, actor_lam=None))
  step, state, sh, mesh = build(rl, lr=1e-4, reward=offset_reward)
  assert set(state.critic["params"]) == {"head"}
  fn = rls.jit_rl_step(step, sh, None, None)
  batch = sharding.shard_batch(make_batch(), mesh)
  losses = []
  for _ in range(10):
    state, m = fn(state, batch, jax.random.key(2), None)
    losses.append(float(m["critic/value_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert float(jnp.abs(state.critic["params"]["head"]["w"]).max()) > 0


def test_ppo_step_refuses_a_state_without_critic_and_other_estimators():
  rl = ppo_rl()
  step, state, sh, mesh = build(rl)
  with pytest.raises(ValueError, match="critic in the train state"):
    jax.jit(step.__call__)(state.replace(critic=None), make_batch(), jax.random.key(0))
  with pytest.raises(ValueError, match="advantage='gae'"):
    ppo.PPOStep(CFG, rl_config.RLConfig(), step.tx, target_reward, eos_id=EOS,
                critic_tx=step.critic_tx)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_trainer_runs_the_ppo_preset_and_resumes_with_the_critic(tmp_path, lora_rank, capsys):
  """lora_rank 4: the critic is a value model with its own adapters (rl.critic.init='policy');
  its adapters are checkpointed with the policy's and restored on resume."""
  c = config_lib.default_configdict(kind="rl", rl_preset="ppo")
  c.model.lora.rank = lora_rank
  config_lib.use_builtin_task(c, "arithmetic", batch_size=8, num_train=64, num_test=8)
  c.model.builtin = "nano"
  c.rl.group_size = 2
  c.rl.max_new_tokens = 4
  c.rl.critic.warmup_steps = 1
  c.rl.critic.learning_rate = 1e-3
  c.eval.num_examples = 0
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.checkpoint.save_interval_steps = 1
  c.checkpoint.async_save = False
  cfg = config_lib.from_configdict(c)
  trainer.run(cfg, str(tmp_path))
  import json
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  steps = {r["step"]: r for r in rows if "critic/value_loss" in r}
  assert steps[1]["ppo/policy_updated"] == 0.0 and steps[2]["ppo/policy_updated"] == 1.0
  # Resuming restores the critic from the checkpoint and runs on.
  trainer.run(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, num_steps=3)),
              str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any(r["step"] == 3 and "critic/value_loss" in r for r in rows)
  if lora_rank:  # both runs built the adapter critic; the second restored it from step 2
    assert capsys.readouterr().out.count("its own LoRA adapters on the policy's frozen base") == 2


def test_value_model_from_an_hf_checkpoint_in_the_config(tmp_path):
  """rl.critic.init='hf': a value model of its own size, read from rl.critic.hf_path."""
  from jaxrl_llm.models.hf import save_hf
  value_cfg = testing.tiny_config("qwen2", vocab_size=VOCAB, hidden_size=48, num_layers=1,
                                  intermediate_size=96, max_position_embeddings=64)
  path = str(save_hf(value_cfg, testing.tiny_params(value_cfg, seed=1), tmp_path / "critic"))
  c = config_lib.default_configdict(kind="rl", rl_preset="ppo")
  c.rl.group_size, c.rl.max_new_tokens = 4, 5
  c.rl.critic.init, c.rl.critic.hf_path = "hf", path
  c.rl.critic.learning_rate = 1e-2
  c.model.dtype = "float32"
  cfg = config_lib.from_configdict(c)
  tx = optim.make_optimizer(cfg.optim)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 2, 1)), jax.devices()[:2])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  tok = types.SimpleNamespace(vocab_size=VOCAB, eos_id=EOS, pad_id=0)
  state, sh, step = ppo.build_ppo_step(cfg, CFG, tx, target_reward, tok, mesh, state, sh,
                                       say=lambda _: None)
  assert step.value_model.hidden_size == 48 and state.critic["params"]["head"]["w"].shape == (48,)
  assert critic_lib.value_model_config(cfg.rl.critic, CFG).hidden_size == 48
  fn = rls.jit_rl_step(step, sh, None, None)
  batch = sharding.shard_batch(make_batch(), mesh)
  before = jax.device_get(state.critic["params"]["trunk"])
  # The zero head passes no gradient to the trunk in the first update; from the second on,
  # the trunk trains too.
  for key in range(2):
    state, m = fn(state, batch, jax.random.key(key), None)
    assert np.isfinite(float(m["critic/value_loss"])) and float(m["critic/value_loss"]) > 0
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before,
                       jax.device_get(state.critic["params"]["trunk"]))
  assert any(jax.tree.leaves(moved))
  # A value model whose vocabulary does not cover the policy's token ids is refused.
  with pytest.raises(ValueError, match="vocabulary of 16 tokens"):
    critic_lib.load_hf_value_model(path, dtype="float32", param_dtype="float32", remat="none",
                                   attention_impl="auto", vocab_size=32, mesh=mesh)


def test_tis_and_dual_clip_apply_to_the_ppo_policy_loss():
  """The RL step's policy-loss options act in PPO: on the first (on-policy) minibatch the
  TIS weight is min(π_old/π_sampler, C) = C, so the loss is C × the plain one."""
  def first_loss(**overrides):
    # Unwhitened advantages: whitened ones average to 0, and so would the on-policy loss.
    rl = ppo_rl(critic=dict(whiten_advantages=False), **overrides)
    assert rl.epochs == 1 and rl.minibatches == 1
    step, state, sh, mesh = build(rl)
    fn = rls.jit_rl_step(step, sh, None, None)
    _, m = fn(state, sharding.shard_batch(make_batch(), mesh), jax.random.key(4), None)
    return float(m["loss/policy"])
  plain = first_loss()
  assert abs(plain) > 1e-4
  np.testing.assert_allclose(first_loss(tis_cap=0.5), 0.5 * plain, rtol=1e-3)
  dual = first_loss(policy_loss="dual_clip")  # ratio 1 on-policy: the PPO-clip value
  np.testing.assert_allclose(dual, plain, rtol=1e-4)


@pytest.mark.parametrize("init", ["value_head", "policy"])
def test_critic_of_a_lora_policy(init):
  """model.lora: the policy's adapters and the critic train, the base stays frozen.
  init='value_head': a head on the policy trunk; init='policy': a value model with its own
  adapters (a copy of the policy's at the start) on the policy's frozen base, no base copy."""
  from jaxrl_llm import lora, tree_paths
  cfg = CFG.replace(lora=lora.LoraConfig(rank=4, target_modules=("q", "v")))
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2)))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 2, 1)), jax.devices()[:2])
  params = lora.add_adapters(cfg.lora, testing.tiny_params(CFG), jax.random.key(1))
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh, params=params)
  c = config_lib.default_configdict(kind="rl", rl_preset="ppo")
  c.model.lora.rank = 4
  c.rl.group_size, c.rl.max_new_tokens = 4, 5
  c.rl.critic.init = init
  c.rl.critic.learning_rate = 1e-2
  tok = types.SimpleNamespace(vocab_size=VOCAB, eos_id=EOS, pad_id=0)
  state, sh, step = ppo.build_ppo_step(config_lib.from_configdict(c), cfg, tx, target_reward,
                                       tok, mesh, state, sh, say=lambda _: None)
  critic_params = state.critic["params"]
  if init == "policy":
    assert set(critic_params) == {"adapters", "head"}
    assert set(tree_paths.flatten(critic_params["adapters"])) == set(
        tree_paths.flatten(lora.adapter_params(state.params)))
  else:
    assert set(critic_params) == {"head"}
  fn = rls.jit_rl_step(step, sh, None, None)
  batch = sharding.shard_batch(make_batch(), mesh)
  before = jax.device_get(state)
  for _ in range(2):
    state, m = fn(state, batch, jax.random.key(6), None)
  after = jax.device_get(state)
  assert np.isfinite(float(m["critic/value_loss"]))
  base_same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                           lora.base_params(before.params), lora.base_params(after.params))
  assert all(jax.tree.leaves(base_same))
  moved = lambda x, y: any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), x, y)))
  assert moved(lora.trainable_params(before.params), lora.trainable_params(after.params))
  assert moved(before.critic["params"], after.critic["params"])
  if init == "policy":  # the critic's adapters train apart from the policy's
    assert moved(before.critic["params"]["adapters"], after.critic["params"]["adapters"])
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                        after.critic["params"]["adapters"],
                        lora.adapter_params(after.params))
    assert max(jax.tree.leaves(diff)) > 0
  c.rl.critic.init, c.rl.critic.hf_path = "hf", "/nonexistent"
  with pytest.raises(ValueError, match="init='policy'"):
    ppo.build_ppo_step(config_lib.from_configdict(c), cfg, tx, target_reward, None, mesh, state,
                       sh, say=lambda _: None)
