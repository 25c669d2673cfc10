"""ACNCHOR ground-truth injection (jaxrl_llm.rl.anchor): which rows, what they hold, the
injected rows' importance weight, and its effect inside the one-jit RL step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing
from jaxrl_llm.rl import anchor, policy_losses
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, PAD = 16, 2, 0
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def test_injected_rows_are_the_last_of_each_all_fail_group():
  correct = jnp.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1], jnp.float32)
  np.testing.assert_array_equal(anchor.all_fail_groups(correct, 3), [True, False, True, False])
  np.testing.assert_array_equal(np.nonzero(anchor.injected_rows(correct, 3))[0], [2, 8])


def _rollout(L=4):
  """2 groups of 2: group 0 all fail, group 1 has a success."""
  return dict(
      prompt_tokens=jnp.ones((4, 3), jnp.int32), prompt_mask=jnp.ones((4, 3), jnp.int32),
      completion=jnp.full((4, L), 9, jnp.int32), completion_mask=jnp.ones((4, L), jnp.int32),
      sampler_logp=jnp.full((4, L), -1.5), finished=jnp.zeros((4,), bool),
      lengths=jnp.full((4,), L, jnp.int32),
      answer_tokens=jnp.array([[5, 6, EOS]] * 2 + [[7, EOS, PAD]] * 2, jnp.int32),
      answer_mask=jnp.array([[1, 1, 1]] * 2 + [[1, 1, 0]] * 2, jnp.int32))


def test_inject_writes_the_answer_as_a_completion():
  ro = _rollout(L=4)
  out = anchor.inject(ro, jnp.array([0.0, 0.0, 1.0, 0.0]), 2, PAD)
  np.testing.assert_array_equal(out[anchor.ANCHOR_KEY], [False, True, False, False])
  np.testing.assert_array_equal(out["completion"][1], [5, 6, EOS, PAD])
  np.testing.assert_array_equal(out["completion_mask"][1], [1, 1, 1, 0])
  assert bool(out["finished"][1]) and int(out["lengths"][1]) == 3
  np.testing.assert_array_equal(out["sampler_logp"][1], 0.0)
  for k in ("completion", "completion_mask", "sampler_logp", "finished", "lengths"):
    np.testing.assert_array_equal(np.delete(np.asarray(out[k]), 1, 0),
                                  np.delete(np.asarray(ro[k]), 1, 0), err_msg=k)
  # A budget shorter than the answer: cut, and not finished (its EOS is cut off).
  short = anchor.inject(_rollout(L=2), jnp.zeros((4,)), 2, PAD)
  np.testing.assert_array_equal(short["completion"][1], [5, 6])
  assert not bool(short["finished"][1])
  assert int(short["lengths"][3]) == 2 and bool(short["finished"][3])  # [7, EOS] fits
  with pytest.raises(ValueError, match="answer_tokens"):
    anchor.inject({k: v for k, v in ro.items() if k != "answer_tokens"}, jnp.zeros((4,)), 2,
                  PAD)


def test_unit_behaviour_weight_is_the_unclipped_policy_probability():
  """old log-prob 0 (behaviour probability 1): for A > 0 the ppo_clip token loss is
  −π_θ(y_t)·A exactly, even where π_θ < 1 − ε (no clipping), so its gradient is
  −A·∇π_θ(y_t)."""
  logp = jnp.log(jnp.array([[0.9, 0.5, 0.01]]))
  adv = jnp.full((1, 3), 2.0)
  mask = jnp.ones((1, 3))
  loss_fn = lambda lp: policy_losses.policy_loss("ppo_clip", lp, jnp.zeros_like(lp), adv, mask,
                                                 eps_low=0.2, eps_high=0.2)[0]
  np.testing.assert_allclose(loss_fn(logp), -2.0 * np.array([[0.9, 0.5, 0.01]]), rtol=1e-6)
  grad = jax.grad(lambda lp: jnp.sum(loss_fn(lp)))(logp)
  np.testing.assert_allclose(grad, -2.0 * np.array([[0.9, 0.5, 0.01]]), rtol=1e-5)


def exact_match_reward(inputs):
  """1 when the completion equals the answer tokens (answer + EOS), else 0."""
  ans, ans_m = inputs.task_array("answer_tokens"), inputs.task_array("answer_mask")
  L = inputs.completion_BL.shape[1]
  ans = jnp.pad(ans, ((0, 0), (0, L - ans.shape[1])), constant_values=PAD)
  ans_m = jnp.pad(ans_m, ((0, 0), (0, L - ans_m.shape[1])))
  same = jnp.all(jnp.where(ans_m > 0, inputs.completion_BL == ans, inputs.completion_mask_BL
                           == 0), axis=1)
  r = same.astype(jnp.float32)
  return r, {"correct": r}


def _batch():
  return dict(prompt_tokens=np.array([[3, 4, 5], [6, 7, 8]], np.int32),
              prompt_mask=np.ones((2, 3), np.int32), prompt_id=np.arange(2, dtype=np.int32),
              answer_tokens=np.array([[11, 12, 13, EOS], [14, 15, EOS, PAD]], np.int32),
              answer_mask=np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32))


@functools.lru_cache(maxsize=None)
def _template():
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  return jax.device_get(state), sh, tx, mesh


def _answer_logp(params):
  """Σ_t log π(y*_t) of each prompt's reference answer."""
  b = _batch()
  rows = dict(prompt_tokens=b["prompt_tokens"], prompt_mask=b["prompt_mask"],
              completion=b["answer_tokens"], completion_mask=b["answer_mask"])
  rl = rl_config.RLConfig(group_size=1, max_new_tokens=4)
  step = rls.RLStep(CFG, rl, None, None, eos_id=EOS)
  logp, _ = jax.jit(step.completion_logprobs)(params, rows)
  return np.sum(np.asarray(logp) * b["answer_mask"], axis=1)


@pytest.mark.parametrize("weight", [None, "old_policy"])
def test_step_learns_the_reference_only_with_injection(weight):
  """A random policy never matches the 4-token answers, so every group fails. Without
  ACNCHOR every GRPO advantage is 0 and the step leaves the params unchanged; with it
  one row per group is y* (reward 1, correct), and one step raises log π(y*)."""
  G = 4
  anchor_cfg = (anchor.AnchorConfig() if weight is None
                else anchor.AnchorConfig(enabled=True, importance_weight=weight))
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=4, kl_coef=0.0,
                             anchor=anchor_cfg)
  host, sh, tx, mesh = _template()
  step = rls.RLStep(CFG, rl, tx, exact_match_reward, eos_id=EOS, pad_id=PAD, mesh=mesh)
  state = jax.device_put(host, sh)
  new, m = rls.jit_rl_step(step, sh)(state, _batch(), jax.random.key(0))
  before, after = _answer_logp(host.params), _answer_logp(jax.device_get(new.params))
  if weight is None:
    assert float(m["reward/mean"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, host.params, jax.device_get(new.params))
    return
  np.testing.assert_allclose(m["reward/anchor_injected"], 1 / G)
  np.testing.assert_allclose(m["rl/accuracy"], 1 / G)
  np.testing.assert_allclose(m["reward/mean"], 1 / G)
  assert np.all(after > before + 0.05), (before, after)


def test_unit_behaviour_sets_the_injected_rows_old_logprobs_to_zero():
  """The injected rows' old log-probs are log 1 = 0; the others are π_old's."""
  G = 4
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=4, kl_coef=0.0,
                             anchor=anchor.AnchorConfig(enabled=True,
                                                        importance_weight="unit_behaviour"))
  host, sh, tx, mesh = _template()
  step = rls.RLStep(CFG, rl, tx, exact_match_reward, eos_id=EOS, pad_id=PAD, mesh=mesh)
  state = jax.device_put(host, sh)
  batch = _batch()

  @jax.jit
  def prepared(state, batch):
    ro = step.rollout(state.params, batch, jax.random.key(0), state.step)
    rewards_B, comps, base_B = step.score(ro)
    ro, rewards_B, comps, base_B = anchor.inject_and_score(step, ro, rewards_B, comps, base_B)
    rows = step.prepare(state, ro, rewards_B, comps, None, base_B)[0]
    return rows, step._batched_logprobs(state.params, rows)

  rows, pi_old = jax.device_get(prepared(state, batch))
  flag = rows[anchor.ANCHOR_KEY]
  np.testing.assert_array_equal(np.nonzero(flag)[0], [G - 1, 2 * G - 1])
  np.testing.assert_array_equal(rows["old_logp"][flag], 0.0)
  np.testing.assert_allclose(rows["old_logp"][~flag], pi_old[~flag], rtol=1e-6)
  np.testing.assert_array_equal(rows["rewards"][flag], 1.0)
  _, m = rls.jit_rl_step(step, sh)(state, batch, jax.random.key(0))
  np.testing.assert_allclose(m["reward/anchor_injected"], 1 / G)


def test_config_validation_and_config_file_path():
  with pytest.raises(ValueError, match="importance_weight"):
    anchor.AnchorConfig(enabled=True, importance_weight="one")
  for kwargs, field in [({"group_size": 1}, "group_size"), ({"tis_cap": 2.0}, "tis_cap"),
                        ({"advantage": "gae"}, "advantage")]:
    with pytest.raises(ValueError, match=f"RLConfig.{field}="):
      rl_config.RLConfig(anchor=anchor.AnchorConfig(enabled=True), **kwargs)
  c = config_lib.default_configdict(kind="rl")
  c.rl.anchor.enabled = True
  c.rl.anchor.importance_weight = "old_policy"
  cfg = config_lib.from_configdict(c)
  assert cfg.rl.anchor == anchor.AnchorConfig(enabled=True, importance_weight="old_policy")
  tx = optim.make_optimizer(optim.OptimConfig())
  with pytest.raises(ValueError, match="split_mode"):
    rls.make_split_step(rls.RLStep(CFG, cfg.rl, tx, None, eos_id=EOS))
