"""Pre-DPO (jaxrl_llm.preference.pre_dpo): the guiding reference is π_ref, the data
weights it implies, config validation, and a two-round run through trainer.run."""

import json
import os

import jax
import numpy as np
import preference_step_test as pst
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import trainer
from jaxrl_llm.preference import losses, pre_dpo
from jaxrl_llm.preference import step as ps


def test_pair_weights_are_the_dpo_gradient_weight():
  # λ = σ(−β·h): 1/2 at a zero margin, → 1 for a pair the policy gets wrong
  # relative to the reference, → 0 for one it already separates more.
  margin = np.array([0.0, -3.0, 3.0, np.log(3.0)], np.float32)
  np.testing.assert_allclose(pre_dpo.dpo_pair_weights(margin),
                             [0.5, 1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(3.0)), 0.25],
                             rtol=1e-6)
  # It is the derivative of the DPO loss −log σ(β·h) with respect to β·h, negated.
  grad = jax.grad(lambda m: -jax.nn.log_sigmoid(m))(1.3)
  np.testing.assert_allclose(-grad, pre_dpo.dpo_pair_weights(np.float32(1.3)), rtol=1e-6)


def test_guiding_reference_is_pi_ref_and_sets_the_pair_weights():
  """One DPO step with a guiding reference: the loss and the logged weights
  pref/dpo_weight(_std) are DPO's with that model's log-probs as π_ref."""
  pref = ps.PreferenceConfig(losses=(("dpo", 1.0),), beta=0.5)
  batch = pst.pair_batch(8)
  step, state, sh, _ = pst.build(pref)
  params = jax.device_get(state.params)
  guide = pst.perturbed_ref(params)
  logps = jax.jit(lambda p, b: ps.pair_logprobs(pst.CFG, p, b))
  (c, r), (gc, gr) = logps(params, batch), logps(guide, batch)
  pair = losses.PairLogps(c, r, gc, gr, batch["chosen_mask"], batch["rejected_mask"])
  loss_B, lm = losses.dpo(pair, beta=0.5)
  w = batch["pair_weight"]
  lam = np.asarray(pre_dpo.dpo_pair_weights(lm["margin_B"]))
  mean = lambda x: np.sum(w * x) / w.sum()
  assert np.std(lam[w > 0]) > 1e-4  # the guide gives pairs different weights

  fn = ps.jit_preference_step(step, sh, sh.params)
  _, m = fn(state, batch, jax.random.key(0), guide)
  np.testing.assert_allclose(m["loss/dpo"], mean(loss_B), rtol=1e-5)
  np.testing.assert_allclose(m["pref/dpo_weight"], mean(lam), rtol=1e-5)
  np.testing.assert_allclose(m["pref/dpo_weight_std"],
                             np.sqrt(mean(lam**2) - mean(lam)**2), rtol=1e-3, atol=1e-6)

  # π_ref = the starting policy (plain DPO): every pair weighs σ(0) = 1/2.
  step, state, sh, _ = pst.build(pref)
  _, m0 = ps.jit_preference_step(step, sh, sh.params)(state, batch, jax.random.key(0),
                                                       jax.device_get(state.params))
  np.testing.assert_allclose(m0["pref/dpo_weight"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m0["pref/dpo_weight_std"], 0.0, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reference_from="/x", guiding_steps=2), "both name a guiding reference"),
    (dict(guiding_steps=-1), "guiding_steps must be an int >= 0"),
    (dict(guiding_losses=(("simpo", 1.0),)), "guiding_steps=0"),
    (dict(losses=(("simpo", 1.0),), guiding_steps=2), "never read"),
    (dict(guiding_steps=2, reference="precomputed"), "reference='on_the_fly'"),
    (dict(losses=(("kto", 1.0),), guiding_steps=2), "paired losses only"),
    (dict(guiding_steps=2, guiding_losses=(("kto", 1.0),)), "guiding_losses must be paired"),
])
def test_invalid_guiding_reference_config(kwargs, match):
  kwargs = {"losses": (("dpo", 1.0),), **kwargs}
  with pytest.raises(ValueError, match=match):
    ps.PreferenceConfig(**kwargs)


def _experiment(**pref):
  c = config_lib.default_configdict(kind="dpo")
  c.model.builtin = "nano"
  config_lib.use_builtin_task(c, "preference_arithmetic", max_digits=1, batch_size=8,
                              num_train=64, num_test=8)
  c.eval.num_examples = 0
  c.preference.losses = (("dpo", 1.0),)
  c.preference.beta = 0.5
  c.optim.learning_rate = 1e-2
  c.checkpoint.async_save = False
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  for k, v in pref.items():
    setattr(c.preference, k, v)
  return config_lib.from_configdict(c)


def _metrics(workdir):
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))
          if "pref/dpo_weight" in x]


def test_two_round_run_from_config(tmp_path):
  """guiding_steps=3: round 1 (DPO from the start) in <workdir>/guiding_reference, then
  round 2 from the same start against it. Round 2's first step re-weights the pairs
  (weights ≠ 1/2, spread > 0) where plain DPO's are all 1/2; reference_from with the
  round-1 workdir gives the same round 2, so the guide's params are what π_ref reads."""
  plain = str(tmp_path / "plain")
  trainer.run(_experiment(), plain)
  first_plain = _metrics(plain)[0]
  assert first_plain["pref/dpo_weight"] == pytest.approx(0.5, abs=1e-6)
  assert first_plain["pref/dpo_weight_std"] == pytest.approx(0.0, abs=1e-6)

  two_round = str(tmp_path / "pre_dpo")
  trainer.run(_experiment(guiding_steps=3), two_round)
  guide_dir = os.path.join(two_round, pre_dpo.GUIDING_DIR)
  assert [m["step"] for m in _metrics(guide_dir)] == [1, 2, 3]
  # Round 1 is plain DPO from the same start: its first step is the plain run's.
  assert _metrics(guide_dir)[0]["loss/dpo"] == pytest.approx(first_plain["loss/dpo"],
                                                             rel=1e-5)
  first = _metrics(two_round)[0]
  assert first["pref/dpo_weight_std"] > 1e-3
  assert abs(first["pref/dpo_weight"] - 0.5) > 1e-3
  # Round 2 starts from the starting policy: the guide already prefers the chosen
  # answers (h < 0 against it), so the first-step loss is above plain DPO's log 2.
  assert first["loss/dpo"] > first_plain["loss/dpo"]

  from_dir = str(tmp_path / "from_dir")
  trainer.run(_experiment(reference_from=guide_dir), from_dir)
  again = _metrics(from_dir)[0]
  for k in ("loss/dpo", "pref/dpo_weight", "pref/dpo_weight_std"):
    assert again[k] == pytest.approx(first[k], rel=1e-5, abs=1e-7), k
