"""Cooper (jaxrl_llm.rl.cooper): pair selection, the reward-model loss, the RM update
inside the step, config errors and a run from a config through `trainer.run`."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import sharding, testing, tokenizers, trainer
from jaxrl_llm.preference import reward_model as rm_lib
from jaxrl_llm.rl import cooper
from jaxrl_llm.train_state import TrainState

TOK = tokenizers.load_tokenizer("builtin")


def softplus(x):
  return math.log1p(math.exp(x))


def test_pair_loss_golden():
  pos = jnp.array([[1.0, 0.5, 2.0], [0.0, 1.5, -1.0]])   # K = 2 heads, N = 3 pairs
  neg = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.5, 3.0]])
  valid = jnp.array([True, True, False])
  loss, m = cooper.pair_loss(pos, neg, valid)
  # −log σ(d) = log(1 + e^{−d}); per pair the mean over heads; pair 3 is masked.
  pair1 = (softplus(-1.0) + softplus(1.0)) / 2       # d = 1, −1
  pair2 = (softplus(0.5) + softplus(-1.0)) / 2       # d = −0.5, 1
  assert float(loss) == pytest.approx((pair1 + pair2) / 2, rel=1e-6)
  # Mean head margins: 0 (not > 0), 0.25; the masked pair (−1) does not count.
  assert float(m["pair_acc"]) == pytest.approx(0.5)
  assert float(m["margin"]) == pytest.approx(0.125)
  assert float(m["pairs"]) == 2
  # ∂L/∂s⁺_{0,0} = −σ(−d)·(1/K)·(1/N) with d = 1.
  grad = jax.grad(lambda p: cooper.pair_loss(p, neg, valid)[0])(pos)
  assert float(grad[0, 0]) == pytest.approx(-(1 / (1 + math.exp(1.0))) / 4, rel=1e-6)
  assert float(jnp.abs(grad[:, 2]).sum()) == 0.0
  # No valid pair: loss 0 and no gradient (not NaN).
  loss0, m0 = cooper.pair_loss(pos, neg, jnp.zeros(3, bool))
  assert float(loss0) == 0.0 and float(m0["pairs"]) == 0


def test_select_pairs_takes_the_first_positive_and_the_chosen_negative():
  G = 4
  correct = jnp.array([0, 1, 0, 1,    # mixed: positives 1, 3; negatives 0, 2
                       1, 1, 1, 1,    # all correct: no negative
                       0, 0, 0, 0,    # all wrong: no positive
                       1, 0, 0, 0], bool)  # mixed; its negatives tie on the RM score
  rm = jnp.array([0.1, 9.0, 0.7, 5.0,
                  1.0, 2.0, 3.0, 4.0,
                  1.0, 2.0, 3.0, 4.0,
                  0.0, 0.3, 0.3, -1.0])
  pos, neg, valid = cooper.select_pairs(correct, rm, G, "hardest")
  np.testing.assert_array_equal(valid, [True, False, False, True])
  np.testing.assert_array_equal(pos[valid], [1, 12])
  np.testing.assert_array_equal(neg[valid], [2, 13])   # top RM score of the wrong; ties: first
  pos, neg, valid = cooper.select_pairs(correct, rm, G, "first")
  np.testing.assert_array_equal(neg[valid], [0, 13])
  with pytest.raises(ValueError, match="negative"):
    cooper.select_pairs(correct, rm, G, "easiest")


def test_reward_model_update_trains_on_valid_pairs_only():
  cfg = testing.tiny_config(vocab_size=TOK.vocab_size)
  params = jax.jit(lambda k: rm_lib.init_reward_model(cfg, k, 2))(jax.random.key(0))
  c = cooper.CooperConfig(enabled=True, rm_learning_rate=1e-2, rm_steps=3)
  tx = cooper.rm_optimizer(c)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     extra={})
  step = cooper.CooperStep(base=None, cooper=c, rm_model=cfg, rm_tx=tx, verifier_fn=None)
  rng = np.random.RandomState(0)
  B, P, L = 8, 5, 3
  ro = {"prompt_tokens": rng.randint(3, 40, (B, P)).astype(np.int32),
        "prompt_mask": np.ones((B, P), np.int32),
        "completion": rng.randint(3, 40, (B, L)).astype(np.int32),
        "completion_mask": np.ones((B, L), np.int32)}
  update = jax.jit(step.update_reward_model)
  pos, neg = jnp.array([0, 4]), jnp.array([1, 5])
  new, m = update(state, ro, pos, neg, jnp.array([True, False]))
  assert float(m["cooper/pairs"]) == 1 and float(m["cooper/groups_without_pair"]) == 1
  assert int(new.step) == 3
  assert float(m["cooper/rm_loss_after"]) < float(m["cooper/rm_loss"])  # the pair was learned
  assert not np.allclose(jax.device_get(new.params["head"]), jax.device_get(params["head"]))
  # The RM loss of that pair as `pair_loss` gives it, before the update.
  scores = jax.jit(lambda p, *rows: rm_lib.reward_scores(cfg, p, *rows))(
      params, *(ro[k][[0, 1]] for k in ("prompt_tokens", "prompt_mask", "completion",
                                         "completion_mask")))
  expected, _ = cooper.pair_loss(scores[:, :1], scores[:, 1:], jnp.array([True]))
  assert float(m["cooper/rm_loss"]) == pytest.approx(float(expected), rel=1e-5)
  # No valid pair: the RM state is left exactly as it was (momentum does not move it).
  moved, _ = update(new, ro, pos, neg, jnp.array([False, False]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(moved), jax.device_get(new))


def tiny_experiment(kind, source="arithmetic"):
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


def cooper_experiment(rm_dir="/some/rm"):
  c = tiny_experiment("rl")
  c.rl.group_size, c.rl.max_new_tokens = 4, 2
  c.reward.components = (("reward_model", 1.0),)
  c.reward.reward_model_path = str(rm_dir)
  c.cooper.enabled = True
  return c


def test_config_errors_name_the_fix():
  build = lambda c: config_lib.from_configdict(c)
  cfg = build(cooper_experiment())
  assert cfg.cooper.enabled and cfg.cooper.negative == "hardest"
  c = cooper_experiment()
  c.reward.components = (("correct", 1.0),)
  c.reward.reward_model_path = ""
  with pytest.raises(ValueError, match="add \\('reward_model', 1.0\\)"):
    build(c)
  c = cooper_experiment()
  c.rl.anchor.enabled = True
  with pytest.raises(ValueError, match="rl.anchor.enabled=False"):
    build(c)
  c = cooper_experiment()
  c.rl.advantage = "gae"
  with pytest.raises(ValueError, match="critic-free"):
    build(c)
  c = cooper_experiment()
  c.cooper.verifier = "reward_model"
  with pytest.raises(ValueError, match="cooper.verifier"):
    build(c)
  c = cooper_experiment()
  c.cooper.rm_steps = 0
  with pytest.raises(ValueError, match="cooper.rm_steps"):
    build(c)
  c = cooper_experiment()
  c.cooper.negative = "random"
  with pytest.raises(ValueError, match="cooper.negative"):
    build(c)
  with pytest.raises(ValueError, match="kind='rl'"):
    config_lib.ExperimentConfig(kind="dpo", cooper=cooper.CooperConfig(enabled=True))


def save_reward_model(workdir):
  """What a kind='reward_model' run leaves in its workdir: a 2-head RM checkpoint and the
  run's config snapshot (written directly: no preference training needed here)."""
  from jaxrl_llm.checkpoint import Checkpointer
  cfg = config_lib.from_configdict(tiny_experiment("reward_model", "preference_arithmetic"))
  cfg = dataclasses.replace(cfg, reward_model=dataclasses.replace(cfg.reward_model, num_heads=2))
  model = trainer.model_config(cfg, TOK)
  params = jax.jit(lambda k: rm_lib.init_reward_model(model, k, 2))(jax.random.key(1))
  ckpt = Checkpointer(os.fspath(workdir))
  ckpt.save(1, {"params": params}, extra={"config": config_lib.to_dict(cfg)}, force=True)
  ckpt.wait()
  ckpt.close()


def test_run_from_a_config_trains_policy_and_reward_model(tmp_path, monkeypatch):
  """A 2-step run on the built-in arithmetic task: the RM restored from a reward-model
  workdir is updated in the step and the policy trains on its reward."""
  rm_dir = tmp_path / "rm"
  save_reward_model(rm_dir)

  c = cooper_experiment(rm_dir)
  c.optim.learning_rate = 1e-3
  c.cooper.rm_learning_rate = 1e-3
  c.cooper.verifier = "format"   # a random policy meets it in some samples: mixed groups
  # Completions of digits, '-' and EOS only, so that format-valid and invalid samples mix.
  allowed = {TOK.eos_id} | {i for ch in "0123456789-" for i in TOK.encode(ch)}
  c.rl.banned_tokens = tuple(i for i in range(TOK.vocab_size) if i not in allowed)
  cfg = config_lib.from_configdict(c)

  seen = []
  jit = cooper.jit_cooper_step

  def recording_jit(*args, **kwargs):
    fn = jit(*args, **kwargs)

    def run(state, *rest):
      if not seen:
        seen.append(jax.device_get((state.params, state.extra["cooper"].params)))
      out = fn(state, *rest)
      seen.append(jax.device_get((out[0].params, out[0].extra["cooper"].params)))
      return out
    return run
  monkeypatch.setattr(cooper, "jit_cooper_step", recording_jit)
  workdir = tmp_path / "cooper"
  trainer.run(cfg, os.fspath(workdir))
  rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  steps = [r for r in rows if "cooper/pairs" in r]
  assert [r["step"] for r in steps] == [1, 2]
  for r in steps:
    assert r["cooper/pairs"] + r["cooper/groups_without_pair"] == 8   # one slot per prompt
    assert np.isfinite(r["cooper/rm_loss"]) and 0 <= r["cooper/rm_pair_acc"] <= 1
    assert r["rl/accuracy"] == pytest.approx(r["reward/verified"])   # the verifier's accuracy
  assert sum(r["cooper/pairs"] for r in steps) > 0
  assert len(seen) == 3
  (policy0, rm0), (policy2, rm2) = seen[0], seen[-1]
  # The step started from the saved reward model's weights ...
  restored = trainer.restore_reward_model(cfg, TOK, sharding.make_mesh(cfg.mesh))
  jax.tree.map(np.testing.assert_array_equal, rm0, jax.device_get(restored.params))
  # ... and both models moved.
  assert not np.allclose(rm2["head"], rm0["head"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), policy2, policy0))
  assert any(changed)
  assert any(r["grad/global_norm"] > 0 for r in steps)
