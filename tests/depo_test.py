"""DEPO: offline curation, explorability, the replay sampler, config and a run from a config."""

import json
import os

import jax
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing, trainer
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.data.pipeline import DataIterator
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import depo, depo_run
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state


def test_pass_rates_and_difficulty_band_golden():
  correct_NK = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]])
  p = depo.pass_rates_N(correct_NK)
  np.testing.assert_allclose(p, [0.0, 0.25, 0.75, 1.0])
  # The default band drops the groups with no reward spread at the start (p = 0 or 1).
  cfg = depo.DEPOConfig()
  np.testing.assert_array_equal(
      depo.difficulty_band_N(p, cfg.difficulty_low, cfg.difficulty_high),
      [False, True, True, False])
  np.testing.assert_array_equal(depo.difficulty_band_N(p, 0.25, 0.5), [False, True, False, False])


def test_k_center_picks_golden():
  # Mean 4.8: the most central point is 2 (index 2); the farthest from it is 11 (index 4);
  # then min distances are 0: 2, 1: 1, 3: 1, so index 0.
  emb_ND = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
  np.testing.assert_array_equal(depo.k_center_N(emb_ND, 3), [2, 4, 0])
  np.testing.assert_array_equal(depo.k_center_N(emb_ND, 1), [2])
  with pytest.raises(ValueError, match="k-center needs"):
    depo.k_center_N(emb_ND, 6)
  h_NTD = np.array([[[3.0, 4.0], [9.0, 9.0]], [[1.0, 0.0], [0.0, 1.0]]])
  mask_NT = np.array([[1, 0], [1, 1]])
  np.testing.assert_allclose(depo.mean_pool_ND(h_NTD, mask_NT),
                             [[0.6, 0.8], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_explorability_golden():
  # Group 0: rewards (1, 0, 0, 0): μ = 1/4, σ = √(3)/4, Â⁺ = √3, Â⁻ = −1/√3.
  # Group 1: all correct: no spread, E = 0.
  rewards_RG = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  entropy_RG = np.array([[0.5, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
  a_pos, a_neg = np.sqrt(3.0), 1 / np.sqrt(3.0)
  e = np.asarray(depo.explorability_R(rewards_RG, entropy_RG))
  np.testing.assert_allclose(e, [a_pos * 0.5 + a_neg * (1 + 2 + 3), 0.0], rtol=1e-5)
  # Cap c = 3: negatives with H > 3 · H̄⁺ = 1.5 are left out.
  e = np.asarray(depo.explorability_R(rewards_RG, entropy_RG, negative_entropy_cap=3.0))
  np.testing.assert_allclose(e, [a_pos * 0.5 + a_neg * 1.0, 0.0], rtol=1e-5)
  logp_RGL = np.array([[[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]]])
  mask_RGL = np.array([[[1, 1, 0], [1, 0, 0]]])
  np.testing.assert_allclose(depo.sequence_entropy_RG(logp_RGL, mask_RGL), [[1.5, 0.5]])


def test_keep_ratio_and_ranking_golden():
  assert [depo.keep_ratio(e, 1.0, 0.25, 0.4) for e in range(5)] == [1.0, 0.75, 0.5, 0.4, 0.4]
  visits = {0: 2, 1: 1, 2: 1, 4: 3, 5: 1}   # prompt 3 never visited
  score = {0: 0.5, 1: 2.0, 2: 0.0, 4: 0.5, 5: 0.0}
  # Visited, ranked by (score desc, visits asc, id): 1, 0, 4, 2, 5; ⌊0.6·5⌋ = 3 kept.
  kept, skipped = depo.rank_prompts(range(6), score, visits, 0.6)
  assert kept == [3, 1, 0, 4] and skipped == [2, 5]
  # Under-explored: visited < 2 times; fewest visits first, then higher score, then id.
  assert depo.replay_candidates([2, 5, 4], score, visits, 2) == [2, 5]
  visits[5] = 0
  assert depo.replay_candidates([2, 5, 4], score, visits, 2) == [5, 2]
  assert depo.replay_candidates([2, 5, 4], score, visits, 0) == []


def _sampler(**fields):
  cfg = depo.DEPOConfig(enabled=True, **fields)
  return depo.DEPOSampler(None, range(6), 4, cfg, seed=3)


def test_sampler_filters_and_replays_the_under_explored():
  """Epoch 0 visits 4 of 6 prompts; epoch 1 (ρ = 0.5) keeps the 2 unvisited and the 2
  best-scored, skips the 2 others and replays the better of them first, one per batch."""
  s = _sampler(keep_ratio_start=1.0, keep_ratio_decay=0.5, replay_fraction=0.25)
  assert s.replay_slots == 1
  first = s.next_indices()
  order0 = [int(i) for i in np.random.default_rng([3, 0]).permutation(6)]
  assert first == order0[:4]
  s.observe(np.asarray(first, np.float64))   # E(x) = x: higher ids explore more
  second = s.next_indices()                  # 2 left < 4: epoch 1 starts
  low, high = sorted(first)[:2], sorted(first)[2:]
  fresh = sorted(set(range(6)) - set(first))
  assert s.epoch == 1 and sorted(s.order) == sorted(fresh + high)
  assert s.skipped == 2 and second[-1] == low[1] and s.buffer == [low[0]]
  assert second[:3] == s.order[:3]
  m = s.metrics()
  assert (m["depo/skipped"], m["depo/replayed"], m["depo/buffer_size"],
          m["depo/epoch_prompts"]) == (2.0, 1.0, 1.0, 4.0)
  s.observe(np.ones(4))
  # The state round-trips through JSON and continues identically.
  state = json.loads(json.dumps(s.get_state()))
  assert state["visits"] == [int(i in first) + int(i in second) for i in state["ids"]]
  t = _sampler(keep_ratio_start=1.0, keep_ratio_decay=0.5, replay_fraction=0.25)
  t.set_state(state)
  assert [t.next_indices() for _ in range(3)] == [s.next_indices() for _ in range(3)]
  with pytest.raises(ValueError, match="not written by an rl.depo run"):
    t.set_state({"epoch": 0, "position": 0})


def test_sampler_without_online_filter_keeps_every_prompt():
  s = _sampler(online=False, pool_size=6)
  seen = []
  for _ in range(3):
    seen.append(s.next_indices())
    s.observe(np.zeros(4))
  assert s.skipped_total == 0 and s.replayed_total == 0 and s.epoch == 2
  with pytest.raises(ValueError, match="fewer than data.batch_size"):
    depo.DEPOSampler(None, range(3), 4, depo.DEPOConfig(enabled=True))


def test_step_returns_the_explorability_of_its_own_groups():
  """The jitted DEPOStep's per-group E(x) equals the formula applied to the rollout and
  rewards that the same step draws (rows of a group are consecutive)."""
  vocab, eos, G = 16, 2, 4
  model = testing.tiny_config("llama", vocab_size=vocab)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(model, tx, jax.random.key(0), mesh)
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=5, kl_coef=0.0,
                             depo=depo.DEPOConfig(enabled=True))
  step = depo_run.depo_step(rls.RLStep(model, rl, tx, testing.target_token_reward(5),
                                       eos_id=eos, mesh=mesh))
  batch = testing.toy_prompt_batch(3, 4, vocab)
  rng = jax.random.key(1)
  # The rollout and rewards the step draws (its own rng split), before the update.
  rollout_rng, _ = jax.random.split(jax.random.fold_in(rng, state.step))
  ro = jax.jit(lambda p, b, r: step.rollout(p, b, r, 0))(state.params, batch, rollout_rng)
  rewards_B, _, _ = step.score(ro)
  L = ro["completion"].shape[1]
  entropy_RG = depo.sequence_entropy_RG(np.reshape(ro["sampler_logp"], (3, G, L)),
                                        np.reshape(ro["completion_mask"], (3, G, L)))
  want = depo.explorability_R(np.reshape(rewards_B, (3, G)), entropy_RG)
  _, m = rls.jit_rl_step(step, sh)(state, batch, rng)
  np.testing.assert_allclose(m[depo_run.GROUP_KEY], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["depo/explorability"], np.mean(want), rtol=1e-5)
  assert float(np.max(want)) > 0   # the dense reward spreads inside a group


def test_config_errors_name_the_fix():
  for fields, match in [({"difficulty_samples": 1}, "difficulty_samples"),
                        ({"difficulty_low": 0.8, "difficulty_high": 0.2}, "difficulty_low"),
                        ({"keep_ratio_min": 0.0}, "keep_ratio_min"),
                        ({"replay_fraction": 1.0}, "replay_fraction"),
                        ({"pool_size": 8, "diversity_size": 16}, "raise pool_size"),
                        ({"enabled": True, "online": False}, "nothing to do")]:
    with pytest.raises(ValueError, match=match):
      depo.DEPOConfig(**fields)
  on = {"enabled": True}
  for kwargs, field in [({"group_size": 1}, "group_size"), ({"advantage": "gae"}, "advantage")]:
    with pytest.raises(ValueError, match=f"RLConfig.{field}="):
      rl_config.RLConfig(depo=on, **kwargs)
  c = _experiment()
  c.kind = "dpo"
  c.data.source = "preference_arithmetic"
  with pytest.raises(ValueError, match="kind='dpo'"):
    config_lib.from_configdict(c)
  c = _experiment()
  c.trainer.split_mode = True
  with pytest.raises(ValueError, match="split_mode=False"):
    config_lib.from_configdict(c)
  c = _experiment()
  c.rl.depo.pool_size, c.rl.depo.diversity_size = 4, 0
  with pytest.raises(ValueError, match="pool_size=4 is smaller"):
    config_lib.from_configdict(c)


def _experiment():
  c = config_lib.default_configdict(kind="rl", rl_preset="grpo")
  c.model.builtin = "nano"
  config_lib.use_builtin_task(c, "arithmetic", max_digits=1, batch_size=8, num_train=64,
                              num_test=8)
  c.eval.num_examples = 0
  c.rl.group_size = 4
  c.rl.max_new_tokens = 4
  c.rl.kl_coef = 0.0
  c.reward.components = (("correct", 1.0), ("format", 0.5))  # format: spread in a group
  c.checkpoint.async_save = False
  c.checkpoint.save_interval_steps = 2
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.rl.depo.enabled = True
  c.rl.depo.pool_size = 32
  c.rl.depo.diversity_size = 24
  c.rl.depo.difficulty_samples = 2
  c.rl.depo.difficulty_low = 0.0     # the random policy solves nothing: keep p = 0
  c.rl.depo.difficulty_high = 0.0
  c.rl.depo.keep_ratio_decay = 0.5
  return c


def test_run_from_a_config_file(tmp_path):
  """rl.depo through trainer.run on the built-in task: the curation is counted per criterion
  and stored (and read back, as a resumed run does); the step logs E(x) and the sampler's
  counters, never the per-group array; the checkpoint holds the sampler's state."""
  workdir = str(tmp_path / "depo")
  c = _experiment()
  c.trainer.num_steps = 4
  cfg = config_lib.from_configdict(c)
  assert cfg.rl.depo.diversity_size == 24 and cfg.rl.depo.enabled
  trainer.run(cfg, workdir)
  saved = json.loads(open(os.path.join(workdir, depo_run.CURATION_FILE)).read())
  counts = saved["counts"]
  assert counts["usable"] == 64 and counts["dropped_pool"] == 32
  assert counts["dropped_diversity"] == 8
  assert counts["kept"] == len(saved["kept"]) == len(set(saved["prompt_ids"]))
  # The random policy solves nothing (p = 0 everywhere): all 24 kept, 3 batches in epoch 0.
  assert counts["dropped_too_hard"] == counts["dropped_too_easy"] == 0
  assert counts["kept"] == 24
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in rows if "depo/explorability" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  assert not any(k.startswith("depo_groups") for r in rows for k in r)
  assert all(np.isfinite(r["depo/explorability"]) and r["depo/explorability"] >= 0
             for r in steps)
  assert any(r["depo/explorability"] > 0 for r in steps)  # the format reward has spread
  assert [r["depo/epoch"] for r in steps] == [0.0, 0.0, 0.0, 1.0]
  # Epoch 1 (ρ = 0.5): ⌊0.5·24⌋ prompts skipped, all visited once, so all under-explored:
  # the buffer replays them ⌊0.25·8⌋ = 2 per batch.
  assert [r["depo/replayed"] for r in steps] == [0.0, 0.0, 0.0, 2.0]
  assert (steps[3]["depo/skipped"], steps[3]["depo/epoch_prompts"],
          steps[3]["depo/buffer_size"]) == (12.0, 12.0, 10.0)
  # The checkpoint of step 4 holds the sampler: 4 batches of 8 scored, epoch 1.
  state = Checkpointer(workdir, create=False).restore_extra(4)["data"]
  assert state["depo"] == 1 and state["epoch"] == 1 and sum(state["visits"]) == 32
  assert len(state["buffer"]) == 10 and len(state["order"]) == 12
  # A resumed run reads the curation back instead of scoring again.
  encoded = DataIterator(cfg.data, "train", workdir=workdir).encoded
  lines = []
  idx = depo_run.load_or_curate(cfg, workdir, None, None, encoded, say=lines.append)
  assert idx.tolist() == saved["kept"] and "read from" in lines[0]
