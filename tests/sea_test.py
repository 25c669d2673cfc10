"""SEA with an online-trained epistemic reward model (jaxrl_llm.preference.sea): the label
buffer, the anchored ensemble, the step (Thompson-sampled pairs labelled by the verifier,
mixed preference learning) and a run from a config file."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing, trainer
from jaxrl_llm.preference import online, sea
from jaxrl_llm.preference.step import PreferenceConfig
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, TARGET = 16, 2, 7
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def test_push_fills_a_ring_buffer():
  buf, valid, nxt = jnp.zeros((4, 2)), jnp.zeros((4,)), jnp.int32(0)
  d = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  buf, valid, nxt = sea.push(buf, valid, nxt, d, jnp.array([1.0, 0.0, 1.0]))
  np.testing.assert_array_equal(buf[:, 0], [1, 2, 3, 0])
  np.testing.assert_array_equal(valid, [1, 0, 1, 0])
  buf, valid, nxt = sea.push(buf, valid, nxt, d + 10, jnp.ones((3,)))
  np.testing.assert_array_equal(buf[:, 0], [12, 13, 3, 11])  # slots 3, 0, 1
  np.testing.assert_array_equal(valid, [1, 1, 1, 1])
  assert int(nxt) == 2


def test_ensemble_gradient_step_golden():
  """One step of L_e = mean_n −log σ(w_e·d_n) + (λ/2)‖w_e − w_e⁰‖², by hand."""
  w0 = jnp.array([[0.5, -0.5], [0.0, 1.0]])
  w = w0 + jnp.array([[0.1, 0.0], [0.0, -0.2]])
  d = jnp.array([[1.0, 2.0], [-1.0, 0.5], [9.0, 9.0]])
  valid = jnp.array([1.0, 1.0, 0.0])  # the third slot is empty
  lam, lr = 0.3, 0.5
  new, bt = sea.train_ensemble(w, w0, d, valid, anchor_coef=lam, learning_rate=lr, steps=1)
  wn, w0n, dn = np.asarray(w), np.asarray(w0), np.asarray(d)[:2]
  margin = wn @ dn.T                                      # [E, 2]
  grad = -(1 / (1 + np.exp(margin))) @ dn / 2 + lam * (wn - w0n)
  np.testing.assert_allclose(new, wn - lr * grad, rtol=1e-5)
  np.testing.assert_allclose(bt, np.mean(np.log1p(np.exp(-(np.asarray(new) @ dn.T))), 1),
                             rtol=1e-5)


def test_ensemble_learns_the_labels_and_stays_uncertain_off_the_data():
  """Trained on pairs whose features vary only in the first 4 of 8 dimensions, the
  ensemble mean orders held-out pairs like the true reward, and the members still
  disagree (by their draws) along the 4 dimensions no label constrains."""
  rng = np.random.default_rng(0)
  D = 8
  w_true = np.r_[rng.normal(size=4), np.zeros(4)]
  d = np.c_[rng.normal(size=(256, 4)), np.zeros((256, 4))]
  d = d * np.sign(d @ w_true)[:, None]  # oriented chosen − rejected
  cfg = sea.SEAConfig(enabled=True, num_members=16, anchor_coef=0.01)
  rm = sea.init_extra(cfg, D, jax.random.key(0))["sea"]
  w, _ = sea.train_ensemble(rm["w_ED"], rm["w0_ED"], jnp.asarray(d, jnp.float32),
                            jnp.ones((256,)), anchor_coef=0.01, learning_rate=0.5, steps=200)
  test = np.c_[rng.normal(size=(200, 4)), np.zeros((200, 4))]
  agree = np.mean(np.sign(test @ np.asarray(w).mean(0)) == np.sign(test @ w_true))
  assert agree > 0.95, agree
  seen = np.c_[np.eye(4), np.zeros((4, 4))]
  unseen = np.c_[np.zeros((4, 4)), np.eye(4)]
  spread = lambda x: np.mean(np.std(x @ np.asarray(w).T, axis=1))
  np.testing.assert_allclose(np.asarray(w)[:, 4:], np.asarray(rm["w0_ED"])[:, 4:], rtol=1e-5)
  assert spread(unseen) > 0.2 and np.isfinite(spread(seen))


def target_reward(inputs):
  """The oracle: fraction of completion tokens equal to TARGET."""
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"target_frac": frac}


def _prompts(num=8, P=5):
  rng = np.random.RandomState(0)
  return {"prompt_tokens": rng.randint(3, VOCAB, size=(num, P)).astype(np.int32),
          "prompt_mask": np.ones((num, P), np.int32)}


def _build(sea_cfg, num_samples=4):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: sea.init_extra(sea_cfg, 32,
                                                                 jax.random.key(1)))
  on = online.OnlineDPOConfig(num_samples=num_samples, max_new_tokens=6,
                              preference=PreferenceConfig(beta=0.1))
  base = online.OnlineDPOStep(CFG, on, tx, target_reward, eos_id=EOS, mesh=mesh)
  step = sea.SEAStep(base, sea_cfg)
  ref = jax.tree.map(jnp.copy, state.params)
  return sea.jit_sea_step(step, sh, sh.params), state, ref


@pytest.mark.parametrize("mixed_ratio", [0.0, 0.25])
def test_step_labels_the_thompson_pair_by_the_oracle_and_trains_the_ensemble(mixed_ratio):
  cfg = sea.SEAConfig(enabled=True, num_members=4, buffer_size=16, mixed_ratio=mixed_ratio)
  fn, state, ref = _build(cfg)
  w_before = np.asarray(jax.device_get(state.extra["sea"]["w_ED"]))
  R = 8
  fills, accs, rewards = [], [], []
  for i in range(3):
    state, m = fn(state, _prompts(), jax.random.key(i), ref, None)
    fills.append(float(m["sea/buffer_fill"]))
    accs.append(float(m["sea/rm_accuracy"]))
    rewards.append(float(m["reward/mean"]))
    assert float(m["sea/oracle_queries"]) == 2 * R
    assert float(m["online/chosen_reward"]) >= float(m["online/rejected_reward"])
    # pref/pairs is the summed pair weight: (1 − γ)·oracle pairs + γ·model pairs.
    oracle_pairs = float(m["online/valid_pair_frac"]) * R
    model_pairs = float(m["sea/model_pair_frac"]) * R
    np.testing.assert_allclose(m["pref/pairs"],
                               (1 - mixed_ratio) * oracle_pairs + mixed_ratio * model_pairs,
                               rtol=1e-5)
  rm = jax.device_get(state.extra["sea"])
  # 3 steps × 8 labels into 16 slots: the buffer wrapped and holds the valid ones.
  assert int(rm["next"]) == (3 * R) % 16
  np.testing.assert_allclose(fills[-1], np.mean(rm["valid_N"]))
  assert fills[-1] > 0
  assert not np.allclose(rm["w_ED"], w_before)  # the ensemble is trained online
  np.testing.assert_array_equal(rm["w0_ED"], w_before)  # its anchors are not
  assert accs[-1] >= 0.5
  if mixed_ratio:
    assert float(m["sea/model_pair_frac"]) > 0


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="sea.num_members"):
    sea.SEAConfig(num_members=1)
  with pytest.raises(ValueError, match="sea.mixed_ratio"):
    sea.SEAConfig(mixed_ratio=1.0)
  c = _experiment()
  c.kind = "rl"
  with pytest.raises(ValueError, match="kind='online_dpo'"):
    config_lib.from_configdict(c)
  c = _experiment()
  c.reward.components = (("reward_model", 1.0),)
  c.reward.reward_model_path = "/x"
  with pytest.raises(ValueError, match="drop 'reward_model'"):
    config_lib.from_configdict(c)


def _experiment(**sea_fields):
  c = config_lib.default_configdict(kind="online_dpo")
  c.model.builtin = "nano"
  config_lib.use_builtin_task(c, "arithmetic", max_digits=1, batch_size=8, num_train=64,
                              num_test=8)
  c.eval.num_examples = 0
  c.online.num_samples = 4
  c.online.max_new_tokens = 4
  c.reward.components = (("correct", 1.0), ("format", 0.5))  # format: few ties
  c.checkpoint.async_save = False
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.sea.enabled = True
  for k, v in sea_fields.items():
    setattr(c.sea, k, v)
  return c


def _warm_experiment(**sea_fields):
  """_experiment after a short SFT warm-start, so the samples' verifier scores differ."""
  c = _experiment(**sea_fields)
  c.data.seq_len = 32
  c.trainer.sft_warmstart.num_steps = 30
  c.trainer.sft_warmstart.learning_rate = 1e-2
  c.trainer.sft_warmstart.batch_size = 16
  return c


def test_run_from_a_config_file_and_resume(tmp_path):
  """kind='online_dpo' with sea.enabled through trainer.run: the SEA metrics are logged and
  the ensemble is checkpointed with the run (a resumed run continues from it)."""
  workdir = str(tmp_path / "sea")
  trainer.run(config_lib.from_configdict(_warm_experiment(mixed_ratio=0.5)), workdir)
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in rows if "sea/rm_loss" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(np.isfinite(r["loss/total"]) and r["sea/oracle_queries"] == 16 for r in steps)
  c = _warm_experiment(mixed_ratio=0.5)
  c.trainer.num_steps = 3
  trainer.run(config_lib.from_configdict(c), workdir)
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  filled = [r["sea/buffer_fill"] for r in rows if "sea/buffer_fill" in r]
  # The buffer came back with the state: step 3 adds to steps 1-2's labels.
  assert len(filled) == 3 and 0 < filled[0] < filled[1] < filled[2]
