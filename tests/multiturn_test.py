"""Multi-turn rollouts: the KV-cache rollout, masks, the RL step over trajectories,
one-jit vs split mode, 8 devices vs 1, and the in-graph calculator environment."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import optim, sampling, sharding, testing
from jaxrl_llm.envs import CalculatorEnv, EnvStep, InGraphEnv
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.rewards import registry
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import multiturn as mt
from jaxrl_llm.tokenizers import load_tokenizer
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, STOP, TARGET = 16, 2, 5, 7
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
OBS = (11, 12, 13)


class ScriptEnv(InGraphEnv):
  """Observation: the first (row + turn) % 4 tokens of OBS plus one (0 for
  rows ≡ 3 mod 4: nothing appended); reward: TARGET tokens in the turn."""
  obs_len = 4
  info_keys = ("calls",)

  def reset(self, task):
    B = task["prompt_tokens"].shape[0]
    return jnp.zeros((), jnp.int32), jnp.full((B, 4), 14, jnp.int32), jnp.arange(B) % 2

  @property
  def stop_tokens(self):
    return (STOP,)

  def step(self, state, turn_BL, mask_BL, stopped_B, active_B, task):
    B = turn_BL.shape[0]
    rows = jnp.arange(B)
    state = jnp.zeros((), jnp.int32) if isinstance(state, tuple) else state
    n_B = jnp.where(rows % 4 == 3, 0, (rows + state) % 3 + 1)
    obs_BO = jnp.broadcast_to(jnp.asarray(OBS + (15,), jnp.int32), (B, 4))
    reward_B = jnp.sum((turn_BL == TARGET) * mask_BL, 1)
    return state + 1, EnvStep(obs_BO, n_B, reward_B, jnp.zeros((B,), bool),
                              {"calls": stopped_B.astype(jnp.float32)})


def prompts(R=4, P=5, seed=0):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, VOCAB, size=(R, P)).astype(np.int32)
  toks[toks == STOP] = 4
  mask = np.ones_like(toks)
  toks[0, :2], mask[0, :2] = 0, 0  # left padding
  return dict(prompt_tokens=toks, prompt_mask=mask, prompt_id=np.arange(R, dtype=np.int32))


def spec(**kw):
  base = dict(max_turns=3, turn_tokens=4, obs_len=4, eos_id=EOS, stop_tokens=(STOP,))
  base.update(kw)
  return mt.TurnSpec(**base)


def rollout(params, batch, key, sp, G=1, env=None):
  rows = jax.tree.map(lambda x: jnp.repeat(x, G, 0), batch)
  fn = jax.jit(lambda p, b, r, k: mt.multiturn_rollout(
      CFG, p, b["prompt_tokens"], b["prompt_mask"], k, env or ScriptEnv(), r, sp, group_size=G))
  return jax.device_get(fn(params, batch, rows, key))


def test_one_turn_without_observation_equals_the_sampler():
  params = testing.tiny_params(CFG)
  batch = prompts()

  class NoObs(ScriptEnv):
    reset = InGraphEnv.reset  # no reset observation

  sp = spec(max_turns=1, stop_tokens=())
  out = rollout(params, batch, jax.random.key(1), sp, G=2, env=NoObs())
  ref = sampling.sample(CFG, params, jnp.asarray(batch["prompt_tokens"]),
                        jnp.asarray(batch["prompt_mask"]), jax.random.key(1), max_new_tokens=4,
                        stop_tokens=(EOS,), group_size=2)
  np.testing.assert_array_equal(out["completion"][:, :4], ref.tokens_BL)
  np.testing.assert_array_equal(out["model_mask"][:, :4], ref.mask_BL)
  np.testing.assert_allclose(out["sampler_logp"][:, :4], ref.logprobs_BL, atol=1e-5)
  assert out["obs_mask"].sum() == 0


@pytest.mark.parametrize("G", [1, 2])
def test_trained_tokens_equal_sampled_tokens_across_turns(G):
  """Training forward over [prompt | packed completion] gives the sampler's log-probs."""
  params = testing.tiny_params(CFG)
  batch = prompts()
  out = rollout(params, batch, jax.random.key(3), spec(), G=G)
  model, obs, comp = out["model_mask"], out["obs_mask"], out["completion_mask"]
  # Masks: disjoint, their union a prefix of the buffer, loss only on model tokens.
  assert np.all(model * obs == 0)
  np.testing.assert_array_equal(comp, np.maximum(model, obs))
  n = comp.sum(1).astype(int)
  np.testing.assert_array_equal(comp, np.arange(comp.shape[1])[None] < n[:, None])
  np.testing.assert_array_equal(out["lengths"], model.sum(1))
  assert obs.sum() > 0 and model.sum() > 0 and np.all(out["turns"] >= 1)
  # Observation tokens are exactly the env's tokens, in order.
  for b in range(comp.shape[0]):
    ot = out["completion"][b][obs[b] > 0]
    assert set(ot.tolist()) <= set(OBS + (14,)), ot
  assert np.all(out["sampler_logp"][model == 0] == 0)

  rows = jax.tree.map(lambda x: np.repeat(x, G, 0), batch)
  rows.update(completion=out["completion"], completion_mask=comp)
  rl = rl_config.RLConfig(group_size=G, max_new_tokens=4)
  step = mt.MultiTurnRLStep(CFG, rl, optim.make_optimizer(optim.OptimConfig()), None, EOS,
                            env=ScriptEnv())
  logp, _ = jax.jit(step.completion_logprobs)(params, rows)
  np.testing.assert_allclose(np.asarray(logp) * model, out["sampler_logp"], atol=2e-5)


def test_turn_counters_rewards_and_final_turn():
  params = testing.tiny_params(CFG)
  out = rollout(params, prompts(R=8, seed=1), jax.random.key(0), spec())
  for b in range(8):
    t = int(out["turns"][b])
    assert 1 <= t <= 3
    assert np.all(out["turn_rewards"][b, t:] == 0)
    # The final turn is the last run of model tokens in the buffer.
    model_toks = out["completion"][b][out["model_mask"][b] > 0]
    fl = int(out["final_turn_mask"][b].sum())
    np.testing.assert_array_equal(out["final_turn"][b, :fl], model_toks[len(model_toks) - fl:])
    ended_on_eos = fl > 0 and out["final_turn"][b, fl - 1] == EOS
    if t < 3:  # ended early: only EOS ends a ScriptEnv trajectory
      assert ended_on_eos and out["finished"][b]
    else:
      assert out["finished"][b] == ended_on_eos
  assert np.all(out["env_calls"] <= out["turns"])


# ---------------------------------------------------------------------------
# The in-graph calculator.
# ---------------------------------------------------------------------------
TOK = load_tokenizer("builtin")


def calc_turns(texts, L=10, stop=True):
  ids = [TOK.encode(t) for t in texts]
  toks = np.zeros((len(texts), L), np.int32)
  mask = np.zeros((len(texts), L), np.float32)
  for i, x in enumerate(ids):
    toks[i, :len(x)], mask[i, :len(x)] = x, 1
  return jnp.asarray(toks), jnp.asarray(mask), jnp.full((len(texts),), stop)


def test_calculator_env_answers_calls_and_rejects_malformed_ones():
  env = CalculatorEnv(TOK)
  texts = ["345*67>", "3-10>", "12+0>", "3**4>", "12>", "+3>", "12345+1>", "7", "99*99"]
  toks, mask, stopped = calc_turns(texts)
  stopped = stopped.at[7].set(True)  # "7" + EOS would be the answer turn
  _, es = env.step((), toks, mask, stopped, jnp.ones((9,), bool), {})
  obs = [TOK.decode(np.asarray(es.obs_tokens_BO[i, :int(es.obs_len_B[i])])) for i in range(9)]
  assert obs[:3] == ["23115:", "-7:", "12:"]
  assert obs[3:7] == ["error:"] * 4  # two operators, none, a sign, a 5-digit operand
  assert obs[7:] == ["", ""] and list(np.asarray(es.done_B)) == [False] * 7 + [True, True]
  np.testing.assert_array_equal(es.info["tool_calls"], [1, 1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(es.info["tool_errors"], [0, 0, 0, 1, 1, 1, 1, 0, 0])


def test_calculator_transcript_and_final_turn_reward():
  """The demonstration's observation is what the env returns; the final turn is
  scored by the registry's "correct" component."""
  from jaxrl_llm.envs.calculator import transcript_tokens
  cfg = testing.tiny_config("qwen3", vocab_size=TOK.vocab_size, hidden_size=32,
                            intermediate_size=64)
  env = CalculatorEnv(TOK)
  ids, model_mask = transcript_tokens(TOK, "345*67=", "23115")
  script = np.asarray(ids, np.int32)
  assert model_mask == [1] * 7 + [0] * 6 + [1] * 6
  toks, mask, stopped = calc_turns(["345*67>"], L=8)
  _, es = env.step((), toks, mask, stopped, jnp.ones((1,), bool), {})
  np.testing.assert_array_equal(np.asarray(es.obs_tokens_BO[0, :int(es.obs_len_B[0])]),
                                script[7:13])
  # Reward of the final turn through the registry's "correct" component.
  reward_fn = registry.build_reward_fn((("correct", 1.0),), TOK)
  rl = rl_config.RLConfig(group_size=1, max_new_tokens=8,
                          multiturn=MultiTurnConfig(enabled=True, max_turns=3))
  step = mt.MultiTurnRLStep(cfg, rl, optim.make_optimizer(optim.OptimConfig()), reward_fn,
                            TOK.eos_id, env=env)
  final = np.zeros((1, 8), np.int32)
  final[0, :6] = script[13:]
  ans = np.asarray([TOK.encode("23115") + [TOK.eos_id]], np.int32)
  ro = dict(prompt_tokens=np.asarray([TOK.encode("345*67=")]), prompt_mask=np.ones((1, 7)),
            final_turn=final, final_turn_mask=(final > 0).astype(np.float32),
            finished=np.asarray([True]), turn_rewards=np.zeros((1, 3), np.float32),
            answer_tokens=ans, answer_mask=np.ones_like(ans))
  r, comps, _ = step.score(ro)
  assert float(r[0]) == 1.0 and float(comps["correct"][0]) == 1.0
  final[0, 0] = TOK.encode("3")[0]  # a wrong answer
  r, _, _ = step.score(dict(ro, final_turn=final))
  assert float(r[0]) == 0.0


# ---------------------------------------------------------------------------
# The RL step over trajectories.
# ---------------------------------------------------------------------------
def env_reward(inputs):
  frac = jnp.sum((inputs.completion_BL == TARGET) * inputs.completion_mask_BL, 1) / 4.0
  return frac, {"correct": (frac > 0.25).astype(jnp.float32)}


def build(rl, mesh_shape=(1, 1, 1), reward=env_reward):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  step = mt.MultiTurnRLStep(CFG, rl, tx, reward, EOS, mesh=mesh, env=ScriptEnv())
  return step, state, sh, mesh


def mt_rl(preset="grpo", **kw):
  return rl_config.from_preset(preset, group_size=4, max_new_tokens=4, kl_coef=0.0,
                               multiturn=MultiTurnConfig(enabled=True, max_turns=3), **kw)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "rloo"])
def test_rl_step_over_trajectories_updates_and_masks_observations(preset):
  step, state, sh, mesh = build(mt_rl(preset))
  batch = sharding.shard_batch(prompts(), mesh)
  before = jax.device_get(state.params)
  fn = jax.jit(step.__call__)
  new, m = fn(state, batch, jax.random.key(2), None, None)
  assert np.isfinite(float(m["loss/policy"]))
  assert float(m["multiturn/turns"]) >= 1 and float(m["multiturn/obs_tokens"]) > 0
  assert "reward/env_turn_reward" in m and "multiturn/calls" in m
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(new.params))
  assert any(jax.tree.leaves(changed))
  # The loss mask is the model mask: the rows the update trains on.
  ro = jax.jit(step.rollout)(state.params, batch, jax.random.key(2), 0)
  r, c, _ = step.score(ro)
  rows, *_ = step.prepare(state, ro, r, c, None)
  np.testing.assert_array_equal(rows["loss_mask"], ro["model_mask"])


def test_one_jit_equals_split_mode_with_an_in_graph_env():
  step, state, sh, mesh = build(mt_rl("dr_grpo"))
  batch = prompts()
  one = jax.jit(step.__call__)
  s1, m1 = one(jax.tree.map(jnp.copy, state), batch, jax.random.key(5), None, None)
  split = mt.make_multiturn_split_step(step)
  # Same trajectories for the same key.
  rows = jax.tree.map(lambda x: np.repeat(x, 4, 0), batch)
  key = jax.random.split(jax.random.fold_in(jax.random.key(5), 0))[0]
  a = jax.device_get(jax.jit(step.rollout)(state.params, batch, key, 0))
  b = jax.device_get(split.rollout(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                                   key, rows))
  for k in ("completion", "model_mask", "obs_mask", "turns", "turn_rewards", "final_turn"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_allclose(a["sampler_logp"], b["sampler_logp"], atol=1e-5)
  s2, m2 = split(state, batch, jax.random.key(5), None)
  # One Adam step at lr 1e-2; the modes are different programs, and an element whose
  # gradient is at rounding level moves differently by a small fraction of lr (seen:
  # 1.2e-6): atol lr/1000.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
               s1.params, s2.params)
  np.testing.assert_allclose(m1["reward/mean"], m2["reward/mean"], rtol=1e-6)


def test_eight_devices_equal_one_device():
  rl = mt_rl("grpo", epochs=1, minibatches=2)

  def run(mesh_shape):
    step, state, sh, mesh = build(rl, mesh_shape)
    fn = jax.jit(step.__call__, in_shardings=(sh, None, None, None, None),
                 out_shardings=(sh, sharding.replicated(mesh)))
    batch = sharding.shard_batch(prompts(R=4), mesh)
    for i in range(2):
      state, m = fn(state, batch, jax.random.key(3 + i), None, None)
    return jax.device_get(state), jax.device_get(m)

  s1, m1 = run((1, 1, 1))
  s8, m8 = run((2, 2, 2))
  # Two Adam steps at lr 1e-2 move a weight by up to 2e-2; an element whose gradient
  # is at rounding level turns 1-vs-8-device rounding into up to ~1e-4 (seen: 4.5e-5).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4),
               s1.params, s8.params)
  for k in ("reward/mean", "loss/policy", "multiturn/turns", "multiturn/obs_tokens"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6)


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="remax"):
    build(rl_config.RLConfig(group_size=2, max_new_tokens=4, advantage="remax",
                             multiturn=MultiTurnConfig(enabled=True)))
  with pytest.raises(ValueError, match="max_turns"):
    MultiTurnConfig(max_turns=0)
  with pytest.raises(ValueError, match="env"):
    MultiTurnConfig(env="chess")
  rl = rl_config.RLConfig(multiturn={"enabled": True, "max_turns": 4})
  assert rl.multiturn.max_turns == 4 and dataclasses.is_dataclass(rl.multiturn)
