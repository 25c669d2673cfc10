"""Online alignment: pair selection (best/worst, SEA, DICE), the one-jit online DPO step,
iterative / self-rewarding DPO."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import optim, sharding, testing
from jaxrl_llm.models import decoder
from jaxrl_llm.preference import online
from jaxrl_llm.preference import reward_model as rmm
from jaxrl_llm.preference.step import PreferenceConfig, PreferenceStep, pair_logprobs
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, TARGET = 16, 2, 7
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def target_reward(inputs):
  """The rule: completion tokens should be TARGET; reward = their fraction (verifier)."""
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"target_frac": frac}


def prompts(num=8, P=5, seed=0):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, VOCAB, size=(num, P)).astype(np.int32)
  mask = np.ones_like(toks)
  toks[0, :2], mask[0, :2] = 0, 0  # one left-padded prompt
  return {"prompt_tokens": toks, "prompt_mask": mask}


@functools.lru_cache(maxsize=None)
def _template(lr=3e-3, mesh_shape=(1, 1, 1)):
  """A host copy of a fresh TrainState: later states are device_puts, not new compiles."""
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  return jax.device_get(state), sh, tx, mesh


def fresh_state(mesh_shape=(1, 1, 1)):
  host, sh, tx, mesh = _template(mesh_shape=mesh_shape)
  return jax.device_put(host, sh), sh, tx, mesh


def build(online_cfg, reward=target_reward, mesh_shape=(1, 1, 1)):
  state, sh, tx, mesh = fresh_state(mesh_shape)
  step = online.OnlineDPOStep(CFG, online_cfg, tx, reward, eos_id=EOS, mesh=mesh)
  return step, state, sh, mesh


# ---------------------------------------------------------------------------
# Pair selection on crafted scores.
# ---------------------------------------------------------------------------
def test_best_worst_masks_ties():
  scores = jnp.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [2.0, -1.0, 2.0]])
  chosen, rejected, valid = online.select_best_worst(scores)
  np.testing.assert_array_equal(chosen, [1, 0, 0])
  np.testing.assert_array_equal(rejected, [0, 0, 1])
  np.testing.assert_array_equal(valid, [True, False, True])


def test_sea_thompson_first_and_max_disagreement_second():
  # 2 members, 1 prompt, 4 responses; member 0 likes response 0, member 1 response 3.
  members = jnp.array([[[5.0, 1.0, 1.0, 0.0]],
                       [[0.0, 1.0, 3.0, 5.0]]])
  rewards = jnp.mean(members, 0)  # [[2.5, 1.0, 2.0, 2.5]]
  for seed in range(4):
    chosen, rejected, valid = online.select_sea(members, rewards, jax.random.key(seed))
    # first = 0 (member 0): std_e(R_e(0) − R_e(g)) = [−, 2.5, 3.5, 5] -> second = 3;
    # first = 3 (member 1): std_e(R_e(3) − R_e(g)) = [5, 2.5, 1.5, −] -> second = 0.
    assert {int(chosen[0]), int(rejected[0])} == {0, 3}
    assert not bool(valid[0])  # equal rewards 2.5 = 2.5: a tie, masked out

  # "score" disagreement: std_e R_e(g) = [2.5, 2.5, 4]; response 2 is the most
  # uncertain, so the pair is {Thompson first, 2}, and the first depends on
  # which member was drawn: both occur over seeds.
  members = jnp.array([[[5.0, 0.0, -4.0]], [[0.0, 5.0, 4.0]]])
  rewards = jnp.mean(members, 0)  # [[2.5, 2.5, 0.0]]
  pairs = set()
  for seed in range(16):
    chosen, rejected, valid = online.select_sea(members, rewards, jax.random.key(seed),
                                                disagreement="score")
    assert int(rejected[0]) == 2 and bool(valid[0])
    pairs.add((int(chosen[0]), int(rejected[0])))
  assert pairs == {(0, 2), (1, 2)}

  # Ordering follows the aggregated reward.
  members = jnp.array([[[4.0, 0.0, 1.0]], [[4.0, 2.0, -3.0]]])
  rewards = jnp.array([[4.0, 1.0, -1.0]])
  chosen, rejected, valid = online.select_sea(members, rewards, jax.random.key(1))
  # first = 0 for either member; std_e(R_e(0) − R_e(g)) = [−, 1, 2] -> second = 2.
  assert (int(chosen[0]), int(rejected[0]), bool(valid[0])) == (0, 2, True)
  with pytest.raises(ValueError, match="disagreement"):
    online.select_sea(members, rewards, jax.random.key(0), disagreement="var")


def test_dice_scores_rank_by_implicit_reward_with_length_penalty():
  logp = jnp.array([[-1.0, -1.0, 0.0], [-0.5, -0.5, -0.5], [-2.0, 0.0, 0.0]])
  ref = jnp.array([[-2.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], jnp.float32)
  # β·Σ m (logp − ref) − α·|y|: [0.5·2 − 0.2·2, 0.5·1.5 − 0.2·3, 0.5·(−1) − 0.2·1]
  s = online.dice_scores(logp, ref, mask, beta=0.5, length_penalty=0.2)
  np.testing.assert_allclose(s, [0.6, 0.15, -0.7], rtol=1e-6)
  chosen, rejected, valid = online.select_best_worst(s.reshape(1, 3))
  assert (int(chosen[0]), int(rejected[0]), bool(valid[0])) == (0, 2, True)
  # A large length penalty flips the ranking towards the shortest response.
  s = online.dice_scores(logp, ref, mask, beta=0.5, length_penalty=2.0)
  assert int(jnp.argmax(s)) == 2


def test_config_validation():
  with pytest.raises(ValueError, match="num_samples"):
    online.OnlineDPOConfig(num_samples=1)
  with pytest.raises(ValueError, match="selection"):
    online.OnlineDPOConfig(selection="random")
  with pytest.raises(ValueError, match="not a pairwise loss"):
    online.OnlineDPOConfig(preference=PreferenceConfig(losses=(("kto", 1.0),)))
  with pytest.raises(ValueError, match="needs a reward_fn"):
    online.OnlineDPOStep(CFG, online.OnlineDPOConfig(), optim.make_optimizer(
        optim.OptimConfig(learning_rate=1e-3)), None, eos_id=EOS)


# ---------------------------------------------------------------------------
# The one-jit online step.
# ---------------------------------------------------------------------------
def test_online_dpo_raises_reward():
  cfg = online.OnlineDPOConfig(num_samples=4, max_new_tokens=6,
                               preference=PreferenceConfig(beta=0.1))
  step, state, sh, mesh = build(cfg)
  ref = jax.tree.map(jnp.copy, state.params)
  fn = online.jit_online_dpo_step(step, sh, sh.params)
  batch = sharding.shard_batch(prompts(), mesh)
  rewards = []
  for i in range(24):
    state, m = fn(state, batch, jax.random.key(i), ref, None)
    rewards.append(float(m["reward/mean"]))
  assert fn._cache_size() == 1
  assert 0.0 <= float(m["online/valid_pair_frac"]) <= 1.0
  assert float(m["online/chosen_reward"]) >= float(m["online/rejected_reward"])
  print("online DPO reward/mean:", np.round(rewards, 2))
  assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.25, rewards


@pytest.mark.parametrize("selection", ["best_worst", "dice"])
def test_eight_devices_equal_one_device(selection):
  """Sampling, scoring, pair selection and the update: the same on a (2, 2, 2) mesh."""
  cfg = online.OnlineDPOConfig(num_samples=4, max_new_tokens=5, selection=selection,
                               preference=PreferenceConfig(beta=0.1))
  results = []
  for mesh_shape in ((1, 1, 1), (2, 2, 2)):
    step, state, sh, mesh = build(cfg, mesh_shape=mesh_shape)
    ref = jax.device_put(perturb(state.params), sh.params)
    fn = online.jit_online_dpo_step(step, sh, sh.params)
    batch = sharding.shard_batch(prompts(), mesh)
    for i in range(2):
      state, m = fn(state, batch, jax.random.key(i), ref, None)
    results.append((jax.device_get(state.params), jax.device_get(m)))
  (p1, m1), (p8, m8) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), p1, p8)
  for k in ("reward/mean", "loss/total", "online/valid_pair_frac", "online/selection_score_gap",
            "online/response_length"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_sea_and_dice_steps_run():
  # A 3-head RM sharing the policy's architecture; its trunk is the initial policy.
  rm_params = {"trunk": _template()[0].params,
               "head": np.random.default_rng(3).standard_normal((32, 3)).astype(np.float32)}
  rm_fn = rmm.reward_model_fn(CFG, 3, "mean", with_members=True)
  cfg = online.OnlineDPOConfig(num_samples=4, max_new_tokens=4, selection="sea",
                               preference=PreferenceConfig(losses=(("ipo", 1.0),)))
  step, state, sh, mesh = build(cfg, reward=rm_fn)
  ref = jax.tree.map(jnp.copy, state.params)
  fn = online.jit_online_dpo_step(step, sh, sh.params, None)
  state, m = fn(state, prompts(), jax.random.key(0), ref, rm_params)
  # RM scores are continuous: every pair is valid.
  assert float(m["online/valid_pair_frac"]) == 1.0 and np.isfinite(float(m["loss/total"]))
  assert "reward/rm_std" in m and "reward/rm_members_BK" not in m

  cfg = online.OnlineDPOConfig(num_samples=4, max_new_tokens=4, selection="dice",
                               dice_length_penalty=0.01)
  step, state, sh, mesh = build(cfg, reward=None)
  fn = online.jit_online_dpo_step(step, sh, sh.params)
  ref = jax.device_put(perturb(state.params), sh.params)
  state, m = fn(state, prompts(), jax.random.key(0), ref, None)
  assert np.isfinite(float(m["loss/total"])) and float(m["online/selection_score_gap"]) > 0


def perturb(params):
  leaves, tree = jax.tree.flatten(jax.device_get(params))
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(tree, [x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype)
                                   for x in leaves])


# ---------------------------------------------------------------------------
# Iterative / self-rewarding DPO.
# ---------------------------------------------------------------------------
def test_iterative_self_rewarding_dpo_rounds():
  """Two rounds: sample, the policy judges its own samples, pairs, offline DPO steps."""
  state, sh, tx, mesh = fresh_state()
  step = PreferenceStep(CFG, PreferenceConfig(beta=0.1), tx, mesh)
  before = jax.device_get(state.params)
  # Self-rewarding: score = log π(yes | prompt, response, suffix), suffix and yes
  # are token ids of this toy vocabulary.
  judge = online.SelfJudge(suffix_tokens=(5, 6), yes_id=9)
  state, history = online.iterative_dpo(
      step, state, [prompts(seed=s) for s in range(2)], jax.random.key(0), judge=judge,
      eos_id=EOS, num_samples=4, max_new_tokens=5, train_steps=2, state_shardings=sh)
  assert [h["round"] for h in history] == [0, 1]
  assert int(state.step) == 4
  for h in history:
    # Judge scores are log-probs (continuous): every pair is valid.
    assert h["online/valid_pair_frac"] == 1.0 and h["judge/score_mean"] < 0
    assert np.isfinite(h["loss/total"]) and h["pref/pairs"] == 8
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state.params))
  assert all(jax.tree.leaves(changed))


def test_self_judge_reads_a_contiguous_sequence():
  """Padding between response and suffix is invisible: same score as the packed row."""
  from jaxrl_llm.rewards.base import RewardInputs
  params = _template()[0].params
  judge = online.SelfJudge(suffix_tokens=(5, 6), yes_id=9)
  inputs = RewardInputs(np.array([[0, 4, 8, 3]], np.int32), np.array([[0, 1, 1, 1]], np.int32),
                        np.array([[7, 7, EOS, 0, 0]], np.int32),
                        np.array([[1, 1, 1, 0, 0]], np.int32), np.array([True]), {})
  got = jax.jit(lambda p: online.self_judge_scores(CFG, p, inputs, judge, EOS))(params)
  logits = jax.jit(lambda p: decoder.forward(CFG, p, jnp.array([[4, 8, 3, 7, 7, 5, 6]])))(params)
  want = jax.nn.log_softmax(logits[0, -1].astype(jnp.float32))[9]
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_round_pairs_reference_is_the_round_start_policy_or_the_fixed_one():
  """update_reference: π_ref log-probs of the pairs are the sampling policy's; else ref_params'."""
  state, sh, tx, mesh = fresh_state()
  batch = prompts()
  ref = perturb(state.params)
  logps = {}
  for update in (True, False):
    cfg = online.IterativeDPOConfig(steps_per_round=1, num_samples=4, max_new_tokens=4,
                                    update_reference=update)
    rounds = online.IterativeDPO(CFG, cfg, tx, target_reward, eos_id=EOS, mesh=mesh)
    pairs, stats = jax.jit(rounds.round_pairs)(state.params, batch, jax.random.key(0), ref, None)
    want_params = state.params if update else ref
    want, _ = jax.jit(lambda p, b: pair_logprobs(CFG, p, b))(want_params, pairs)
    np.testing.assert_allclose(pairs["ref_chosen_logps"], want, rtol=1e-5, atol=1e-5)
    logps[update] = np.asarray(pairs["ref_chosen_logps"])
    assert {"judge/score_mean", "online/valid_pair_frac", "reward/target_frac"} <= set(stats)
  assert not np.allclose(logps[True], logps[False])
  with pytest.raises(ValueError, match="needs ref_params"):
    rounds.round_pairs(state.params, batch, jax.random.key(0), None, None)


def test_round_prompts_give_one_batch_per_round_and_resume_mid_round():
  class Counter:
    def __init__(self):
      self.i = 0
    def __next__(self):
      self.i += 1
      return {"prompt_tokens": np.full((2, 3), self.i)}
    def get_state(self):
      return {"i": self.i}
    def set_state(self, state):
      self.i = state["i"]
    stats = {"epochs": 0}

  it = online.RoundPrompts(Counter(), steps_per_round=3)
  drawn = [next(it) for _ in range(7)]
  assert [int(b["prompt_tokens"][0, 0]) if b else 0 for b in drawn] == [1, 0, 0, 2, 0, 0, 3]
  state = it.get_state()
  assert state == {"prompts": {"i": 3}, "steps": 7} and it.stats == {"epochs": 0}
  resumed = online.RoundPrompts(Counter(), steps_per_round=3)
  resumed.set_state(state)
  assert [bool(next(resumed)) for _ in range(3)] == [False, False, True]
  with pytest.raises(ValueError, match="'prompts' and 'steps'"):
    resumed.set_state({"i": 3})


def test_self_judge_from_text_checks_the_tokens():
  from jaxrl_llm.tokenizers import load_tokenizer
  tok = load_tokenizer("builtin")
  judge = online.self_judge_from_text(tok, " correct:", "y")
  assert judge.suffix_tokens == tuple(tok.encode(" correct:"))
  assert judge.yes_id == tok.encode("y")[0]
  with pytest.raises(ValueError, match="ONE token"):
    online.self_judge_from_text(tok, " correct:", "yes")
  with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
    online.self_judge_from_text(tok, " correct?", "y")


# ---------------------------------------------------------------------------
# From a config file, through trainer.run (nano model, a few steps).
# ---------------------------------------------------------------------------
def tiny_experiment(kind, source="arithmetic", steps=2):
  from jaxrl_llm import config as config_lib
  c = config_lib.default_configdict(kind=kind)
  c.model.builtin = "nano"
  c.data.source = source
  c.data.num_train, c.data.num_test = 64, 8
  c.data.batch_size = 8
  c.data.max_prompt_len, c.data.max_answer_len, c.data.max_completion_len = 12, 6, 6
  c.eval.num_examples = 0
  c.checkpoint.async_save = False
  c.trainer.num_steps = steps
  c.trainer.log_every = 1
  c.trainer.progress = False
  return c


def run_experiment(c, workdir):
  import json
  import os

  from jaxrl_llm import config as config_lib
  from jaxrl_llm import trainer
  trainer.run(config_lib.from_configdict(c), os.fspath(workdir))
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
  """A 2-head reward model and a short SFT policy (2 steps each), by their workdirs."""
  root = tmp_path_factory.mktemp("runs")
  c = tiny_experiment("reward_model", "preference_arithmetic")
  c.reward_model.num_heads = 2
  run_experiment(c, root / "rm")
  c = tiny_experiment("sft")
  c.data.seq_len = 32
  run_experiment(c, root / "sft")
  return {"rm": str(root / "rm"), "sft": str(root / "sft")}


def test_sea_and_dice_from_a_config_with_a_reward_model(trained_runs, tmp_path):
  c = tiny_experiment("online_dpo")
  c.online.num_samples, c.online.max_new_tokens = 4, 4
  c.online.selection = "sea"
  c.reward.components = (("reward_model", 1.0),)
  c.reward.reward_model_path = trained_runs["rm"]
  rows = run_experiment(c, tmp_path / "sea")
  assert [r["step"] for r in rows] == [1, 2]
  # The ensemble's continuous scores: every SEA pair is valid, and the members disagree.
  assert all(r["online/valid_pair_frac"] == 1.0 and r["reward/rm_std"] > 0 for r in rows)

  # DICE: π_ref is another run's policy (here the SFT run), so implicit rewards differ.
  c.online.selection = "dice"
  c.online.reference_from = trained_runs["sft"]
  rows = run_experiment(c, tmp_path / "dice")
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["online/valid_pair_frac"] == 1.0 and rows[0]["online/selection_score_gap"] > 0
  assert "reward/reward_model" in rows[0]  # the reward model is only logged by DICE


def test_online_config_errors_name_the_fix():
  from jaxrl_llm import config as config_lib
  c = tiny_experiment("online_dpo")
  c.online.selection = "sea"
  with pytest.raises(ValueError, match="reward-model ensemble"):
    config_lib.from_configdict(c)
  c.online.selection = "dice"
  with pytest.raises(ValueError, match="reference_from"):
    config_lib.from_configdict(c)
  c.online.dice_length_penalty = 0.01  # lengths differ: DICE can start from π_θ = π_ref
  config_lib.from_configdict(c)
  c.online.preference.losses = (("simpo", 1.0),)
  c.online.preference.reference = "none"
  c.online.selection, c.online.reference_from = "best_worst", "/some/run"
  with pytest.raises(ValueError, match="reads no reference"):
    config_lib.from_configdict(c)
  c = tiny_experiment("iterative_dpo")
  c.iterative.judge = "self"
  c.reward.components = (("reward_model", 1.0),)
  c.reward.reward_model_path = "/some/rm"
  with pytest.raises(ValueError, match="judge='self'"):
    config_lib.from_configdict(c)


@pytest.mark.parametrize("judge", ["self", "reward_model"])
def test_iterative_dpo_kind_runs_a_round(judge, trained_runs, tmp_path):
  c = tiny_experiment("iterative_dpo", steps=2)
  c.iterative.steps_per_round = 2  # trainer.num_steps = 2: one round
  c.iterative.num_samples, c.iterative.max_new_tokens = 4, 4
  if judge == "self":
    c.iterative.judge = "self"
    c.iterative.judge_suffix, c.iterative.judge_yes = " correct:", "y"
  else:
    c.reward.components = (("reward_model", 1.0),)
    c.reward.reward_model_path = trained_runs["rm"]
  rows = run_experiment(c, tmp_path / judge)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    # Continuous judge scores: every pair of the round is valid; both steps train on it.
    assert r["iterative/round"] == 0.0 and r["online/valid_pair_frac"] == 1.0
    assert r["pref/pairs"] == 8.0 and np.isfinite(r["loss/total"])
  # The second step trains on the same pairs: the judge's numbers are the round's.
  assert rows[0]["judge/score_mean"] == rows[1]["judge/score_mean"]
  assert rows[0]["pref/logps_chosen"] != rows[1]["pref/logps_chosen"]


def test_iterative_dpo_resumed_mid_round_equals_a_straight_run(tmp_path):
  """The round's pairs and reference live in the checkpointed state: resuming is exact."""
  from jaxrl_llm.checkpoint import Checkpointer

  def config(steps):
    c = tiny_experiment("iterative_dpo", steps=steps)
    c.iterative.steps_per_round = 2  # rounds start at steps 0 and 2
    c.iterative.num_samples, c.iterative.max_new_tokens = 4, 4
    c.iterative.judge = "self"
    c.iterative.judge_suffix, c.iterative.judge_yes = " correct:", "y"
    c.checkpoint.save_interval_steps = 1
    return c

  straight = run_experiment(config(3), tmp_path / "straight")
  run_experiment(config(1), tmp_path / "resumed")   # stops inside round 0
  resumed = run_experiment(config(3), tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [1, 2, 3]
  for a, b in zip(straight, resumed):
    for key in ("loss/total", "grad/global_norm", "judge/score_mean", "pref/logps_chosen"):
      assert a[key] == b[key], (a["step"], key)

  def position(workdir):  # the prompt iterator's state and the steps drawn, at the end
    return Checkpointer(str(workdir), create=False).restore_extra()["data"]
  assert position(tmp_path / "straight") == position(tmp_path / "resumed")
  assert position(tmp_path / "resumed")["steps"] == 3
