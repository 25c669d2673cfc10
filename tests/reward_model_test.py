"""Reward models: readout, ensembles, sharding, in-graph use, Bradley–Terry training."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import optim, sft, sharding, testing, tokenizers
from jaxrl_llm.data import builders, pipeline, tasks
from jaxrl_llm.preference import reward_model as rmm
from jaxrl_llm.preference import rm_losses
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.train_state import create_train_state

TOK = tokenizers.load_tokenizer("builtin")
CFG = testing.tiny_config("qwen3", vocab_size=TOK.vocab_size, hidden_size=32,
                          intermediate_size=64)
OPTS = dict(min_digits=1, max_digits=1, ops="+-", test_fraction=0.3)
PREF_DATA = pipeline.DataConfig(source="preference_arithmetic", max_prompt_len=6,
                                max_completion_len=4)


def preference_examples(examples, seed):
  rng = np.random.default_rng(seed)
  return [{"prompt": e["prompt"], "chosen": e["answer"],
           "rejected": builders.wrong_answer(e["answer"], rng)} for e in examples]


def make_tx(lr, eps=1e-8):
  return optim.make_optimizer(optim.OptimConfig(learning_rate=lr, grad_clip_norm=1.0, eps=eps))


@functools.lru_cache(maxsize=None)
def init_fn(num_heads):
  """A jitted initialiser (eager init runs one small program per op)."""
  return jax.jit(lambda key: rmm.init_reward_model(CFG, key, num_heads))


def test_scores_read_the_last_completion_token():
  params = init_fn(3)(jax.random.key(0))
  assert params["head"].shape == (32, 3)
  # Row 1 is row 0 with junk after the end of the completion (mask 0).
  prompt = np.array([[0, 0, 1, 5, 14, 7, 19]] * 2, np.int32)
  comp = np.array([[8, 2, 0, 0], [8, 2, 9, 9]], np.int32)
  cmask = np.array([[1, 1, 0, 0]] * 2, np.int32)
  s = jax.jit(functools.partial(rmm.reward_scores, CFG))(
      params, prompt, (prompt > 0).astype(np.int32), comp, cmask)
  assert s.shape == (3, 2)
  np.testing.assert_allclose(s[:, 0], s[:, 1], rtol=1e-5, atol=1e-6)
  # The score is the head applied to the final hidden state of the EOS token.
  from jaxrl_llm.models import decoder
  h = jax.jit(functools.partial(decoder.hidden_states, CFG))(
      params["trunk"], jnp.asarray([[1, 5, 14, 7, 19, 8, 2]]))
  np.testing.assert_allclose(s[:, 0], h[0, -1] @ params["head"], rtol=1e-4, atol=1e-5)


def test_ensemble_aggregations_and_in_graph_reward_fn():
  params = init_fn(3)(jax.random.key(1))
  exs = preference_examples(tasks.generate("arithmetic", "train", 6, 0, **OPTS), 0)
  b = pipeline.make_batch(exs, PREF_DATA, tokenizer=TOK)
  inputs = RewardInputs(b["prompt_tokens"], b["prompt_mask"], b["chosen_tokens"],
                        b["chosen_mask"], np.ones(6, bool), {})
  fns = {name: rmm.reward_model_fn(CFG, 3, name, lam=0.5, with_members=True)
         for name in ("mean", "worst_case", "uncertainty_weighted")}

  @jax.jit
  def all_rewards(inputs, rm_params):  # as a step would: params traced, not constants
    return {name: fn(inputs, rm_params) for name, fn in fns.items()}

  out = all_rewards(inputs, params)
  scores_KB = out["mean"][1]["rm_members_BK"].T
  assert scores_KB.shape == (3, 6)
  assert float(jnp.mean(jnp.std(scores_KB, 0))) > 0.05  # heads differ from the start
  want = {"mean": rm_losses.ensemble_mean(scores_KB),
          "worst_case": rm_losses.ensemble_worst_case(scores_KB),
          "uncertainty_weighted": rm_losses.ensemble_uncertainty_weighted(scores_KB, lam=0.5)}
  for name, expected in want.items():
    rewards, comps = out[name]
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(comps["rm_mean"], jnp.mean(scores_KB, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(comps["rm_std"], jnp.std(scores_KB, 0), rtol=1e-4, atol=1e-5)
  # New params reuse the compiled program.
  out2 = all_rewards(inputs, init_fn(3)(jax.random.key(2)))
  assert all_rewards._cache_size() == 1
  assert not np.allclose(out2["mean"][0], out["mean"][0])


# ---------------------------------------------------------------------------
# Bradley–Terry training on the synthetic arithmetic pairs.
# ---------------------------------------------------------------------------
# Tied embeddings: the trunk's predicted answer and the embedding of the answer
# actually written share a space, which makes "is this the answer I expect"
# easy to read out at the EOS token.
RM_CFG = testing.tiny_config("llama", vocab_size=TOK.vocab_size, hidden_size=64,
                             intermediate_size=128, tie_embeddings=True)


def sft_trunk(steps):
  """A tiny LM SFT'd on single-digit +/- problems (the RM's initialisation)."""
  train = tasks.generate("arithmetic", "train", 40 * steps, 0, **OPTS)
  tx = make_tx(3e-3)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, _ = create_train_state(RM_CFG, tx, jax.random.key(0), mesh)
  fn = jax.jit(functools.partial(sft.sft_step, cfg=RM_CFG, tx=tx, mesh=mesh),
               donate_argnums=(0,))
  data = pipeline.DataConfig(source="arithmetic", max_prompt_len=6, max_answer_len=4, seq_len=48)
  for i in range(steps):
    rows = pipeline.make_batch(train[40 * i:40 * (i + 1)], data, "sft", tokenizer=TOK)
    state, _ = fn(state, {k: v[:8] for k, v in rows.items()}, jax.random.key(0))
  return jax.device_get(state.params)


def unique_problems(split, seed):
  return list({e["prompt"]: e for e in tasks.generate("arithmetic", split, 3000, seed,
                                                      **OPTS)}.values())


def pairs(problems, seeds):
  batches = [pipeline.make_batch(preference_examples(problems, s), PREF_DATA, tokenizer=TOK)
             for s in seeds]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_sharded_state_places_the_head_like_the_embedding():
  mesh = sharding.make_mesh(sharding.MeshConfig((2, 2, 2)))
  sh = rmm.reward_model_shardings(CFG, mesh, 3)
  # head [D, K]: D over fsdp like the trunk's embed axis, the K heads replicated.
  assert tuple(sh["head"].spec) == ("fsdp", None)
  assert sh["trunk"]["lm_head"].spec[0] == "fsdp"


def test_bradley_terry_training_reaches_high_held_out_accuracy():
  """BT on train-split pairs, from an SFT'd trunk, 4 heads, chosen-NLL regulariser.

  Held-out pairs are never trained on: fresh draws over the train-split
  problems (new wrong answers), and pairs over the unseen test-split
  problems (the RM must also generalise the arithmetic). Across seeds this
  recipe gave 0.97-0.99 and 0.85-0.93 (and 0.78 on unseen problems when
  compiled with the suite's unoptimised LLVM flags, tests/conftest.py: the
  float rounding differs); without the regulariser (sft_coef=0) or with fewer
  heads the unseen-problem accuracy swung between 0.5 and 0.9.
  """
  trunk = sft_trunk(300)
  tx = make_tx(1e-3)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = rmm.create_reward_model_state(RM_CFG, tx, jax.random.key(0), mesh, num_heads=4,
                                            trunk_params=trunk)
  step = rmm.RewardModelStep(RM_CFG, tx, num_heads=4, sft_coef=1.0, mesh=mesh)
  fn = rmm.jit_reward_model_step(step, sh)
  train = tasks.generate("arithmetic", "train", 64 * 200, 1, **OPTS)
  for i in range(200):
    batch = pipeline.make_batch(preference_examples(train[64 * i:64 * (i + 1)], 100 + i),
                                PREF_DATA, tokenizer=TOK)
    state, m = fn(state, batch, jax.random.key(i))

  @jax.jit
  def accuracy(params, batch):
    chosen_KN, rejected_KN = step.pair_scores(params, batch)
    return jnp.mean(rmm.aggregate(chosen_KN) > rmm.aggregate(rejected_KN))

  fresh = float(accuracy(state.params, pairs(unique_problems("train", 9), (15, 16))))
  unseen = float(accuracy(state.params, pairs(unique_problems("test", 1), (5, 6, 7))))
  print(f"held-out pair accuracy: fresh pairs {fresh:.3f}, unseen problems {unseen:.3f}; "
        f"last train batch {float(m['rm/accuracy']):.3f}, head std {float(m['rm/head_std']):.3f}")
  assert fresh > 0.9
  assert unseen > 0.7  # chance is 0.5
  assert float(m["rm/head_std"]) > 0 and np.isfinite(float(m["loss/sft"]))


# ---------------------------------------------------------------------------
# A trained reward model as the reward of a run, from a config (nano model, 2 steps).
# ---------------------------------------------------------------------------
def tiny_experiment(kind, source="arithmetic"):
  from jaxrl_llm import config as config_lib
  c = config_lib.default_configdict(kind=kind)
  c.model.builtin = "nano"
  c.data.source = source
  c.data.num_train, c.data.num_test = 64, 8
  c.data.batch_size = 8
  c.data.max_prompt_len, c.data.max_answer_len, c.data.max_completion_len = 12, 6, 6
  c.eval.num_examples = 0
  c.checkpoint.async_save = False
  c.trainer.num_steps = 2
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


def test_rl_with_a_reward_model_reward_from_a_config(tmp_path):
  from jaxrl_llm.checkpoint import Checkpointer
  c = tiny_experiment("reward_model", "preference_arithmetic")
  c.reward_model.num_heads = 2
  c.reward_model.aggregation = "worst_case"
  rm_dir = tmp_path / "rm"
  run_experiment(c, rm_dir)

  c = tiny_experiment("rl")
  c.rl.group_size, c.rl.max_new_tokens = 4, 4
  c.reward.components = (("reward_model", 1.0), ("format", 0.5))
  c.reward.reward_model_path = str(rm_dir)
  rows = run_experiment(c, tmp_path / "rl")
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    # total = 1.0 · RM score + 0.5 · format; worst_case: the RM score is min over 2 heads.
    assert r["reward/mean"] == pytest.approx(r["reward/reward_model"] + 0.5 * r["reward/format"],
                                             abs=1e-5)
    assert r["reward/reward_model"] <= r["reward/rm_mean"] and r["reward/rm_std"] > 0
  assert rows[0]["grad/global_norm"] > 0  # RM scores are continuous: the policy gets a gradient
  # Split mode (rewards scored between the two compiled halves) trains the same run.
  c.trainer.split_mode = True
  split_rows = run_experiment(c, tmp_path / "rl_split")
  for r, s in zip(rows, split_rows):
    for key in ("reward/mean", "reward/reward_model", "reward/rm_std", "grad/global_norm"):
      assert s[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), key

  # The restored model: the run's heads and aggregation, its last params, on this mesh.
  mesh = sharding.make_mesh(sharding.MeshConfig())
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import trainer
  cfg = config_lib.from_configdict(c)
  rm = trainer.restore_reward_model(cfg, TOK, mesh)
  assert (rm.num_heads, rm.aggregation, rm.step) == (2, "worst_case", 2)
  assert rm.params["head"].shape == (rm.model.hidden_size, 2)
  conservative = dataclasses.replace(cfg, reward=dataclasses.replace(
      cfg.reward, reward_model_aggregation="uncertainty_weighted"))
  assert trainer.restore_reward_model(conservative, TOK, mesh).aggregation == (
      "uncertainty_weighted")
  saved = Checkpointer(str(rm_dir), create=False).restore_params(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), rm.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(rm.params))

  restore = functools.partial(rmm.restore_reward_model, mesh=mesh,
                              model_config_fn=lambda spec: rm.model)
  with pytest.raises(ValueError, match="kind='rl' run, not a reward model"):
    restore(str(tmp_path / "rl"))
  with pytest.raises(FileNotFoundError, match="reward_model_path"):
    restore(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="same tokenizer"):
    restore(str(rm_dir), tokenizer="/other/tokenizer")


def test_reward_model_component_and_model_must_come_together():
  from jaxrl_llm import config as config_lib
  from jaxrl_llm.rewards import registry
  rm_fn = rmm.reward_model_fn(CFG, 2)
  with pytest.raises(ValueError, match="reward_model_path"):
    registry.build_reward_fn((("reward_model", 1.0),), TOK)
  with pytest.raises(ValueError, match="does not name 'reward_model'"):
    registry.build_reward_fn((("correct", 1.0),), TOK, reward_model=rm_fn)
  c = tiny_experiment("rl")
  c.reward.components = (("reward_model", 1.0),)
  with pytest.raises(ValueError, match="reward_model_path is empty"):
    config_lib.from_configdict(c)
  c.reward.reward_model_path = "/some/rm"
  c.reward.reward_model_aggregation = "median"
  with pytest.raises(ValueError, match="reward_model_aggregation='median'"):
    config_lib.from_configdict(c)
  c.reward.reward_model_aggregation = ""
  c.reward.components = (("correct", 1.0),)
  with pytest.raises(ValueError, match="does not use it"):
    config_lib.from_configdict(c)


def test_split_mode_scores_the_reward_model_as_the_one_jit_step():
  from jaxrl_llm.rewards import registry
  params = init_fn(2)(jax.random.key(5))
  exs = preference_examples(tasks.generate("arithmetic", "train", 4, 0, **OPTS), 0)
  b = pipeline.make_batch(exs, PREF_DATA, tokenizer=TOK)
  ro = {"prompt_tokens": b["prompt_tokens"], "prompt_mask": b["prompt_mask"],
        "completion": b["chosen_tokens"], "completion_mask": b["chosen_mask"],
        "finished": np.asarray([True, False, True, True])}
  components = (("format", 0.5), ("reward_model", 2.0))
  rm_fn = rmm.reward_model_fn(CFG, 2)
  one_jit = registry.build_reward_fn(components, TOK, reward_model=rm_fn)
  total, comps = jax.jit(one_jit)(registry.rollout_reward_inputs(ro), params)
  split_total, split_comps = registry.host_scorer(components, TOK, None, reward_model=rm_fn,
                                                  reward_params=params)(ro)
  assert list(split_comps)[:2] == ["format", "reward_model"]
  assert set(split_comps) == set(comps)
  for name in comps:
    np.testing.assert_allclose(split_comps[name], comps[name], rtol=1e-6, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(split_total, total, rtol=1e-6, atol=1e-6)
  assert np.ptp(split_comps["reward_model"]) > 0  # the model scores rows differently
  with pytest.raises(ValueError, match="reward_model_path"):
    registry.host_scorer(components, TOK, None)
  with pytest.raises(ValueError, match="does not name 'reward_model'"):
    registry.host_scorer((("format", 1.0),), TOK, None, reward_model=rm_fn)


def test_reward_model_component_adds_its_weighted_score_to_the_verifiers():
  from jaxrl_llm.rewards import registry
  params = init_fn(2)(jax.random.key(4))
  exs = preference_examples(tasks.generate("arithmetic", "train", 4, 0, **OPTS), 0)
  b = pipeline.make_batch(exs, PREF_DATA, tokenizer=TOK)
  inputs = RewardInputs(b["prompt_tokens"], b["prompt_mask"], b["chosen_tokens"],
                        b["chosen_mask"], np.ones((4,), bool), {})
  fn = registry.build_reward_fn((("format", 0.5), ("reward_model", 2.0)), TOK,
                                reward_model=rmm.reward_model_fn(CFG, 2, with_members=True))
  total, comps = jax.jit(fn)(inputs, params)
  scores = rmm.reward_scores(CFG, params, b["prompt_tokens"], b["prompt_mask"],
                             b["chosen_tokens"], b["chosen_mask"])
  np.testing.assert_allclose(comps["reward_model"], scores.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, 0.5 * comps["format"] + 2.0 * scores.mean(0), rtol=1e-5,
                             atol=1e-6)
  assert comps["rm_members_BK"].shape == (4, 2)
