"""Tests for jaxrl_llm.optim: schedules, decay mask, clipping, config checks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_llm import optim


def _lr(cfg, step):
  return float(optim.make_schedule(cfg)(step))


def test_constant_schedule_with_warmup():
  cfg = optim.OptimConfig(learning_rate=1e-3, warmup_steps=10)
  # lr(s) = lr * s / W during warm-up.
  assert _lr(cfg, 0) == 0.0
  np.testing.assert_allclose(_lr(cfg, 5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(_lr(cfg, 10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(_lr(cfg, 10_000), 1e-3, rtol=1e-6)


def test_constant_schedule_without_warmup():
  cfg = optim.OptimConfig(learning_rate=3e-4)
  np.testing.assert_allclose(_lr(cfg, 0), 3e-4, rtol=1e-6)
  np.testing.assert_allclose(_lr(cfg, 123), 3e-4, rtol=1e-6)


def test_cosine_schedule():
  lr, w, n, r = 1e-3, 10, 110, 0.1
  cfg = optim.OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=w,
                          total_steps=n, end_lr_ratio=r)

  def expected(s):
    # r*lr + (lr - r*lr) * (1 + cos(pi*(s-W)/(N-W))) / 2
    return r * lr + (lr - r * lr) * (1 + math.cos(math.pi * (s - w) /
                                                  (n - w))) / 2

  np.testing.assert_allclose(_lr(cfg, 3), lr * 3 / w, rtol=1e-5)
  np.testing.assert_allclose(_lr(cfg, w), lr, rtol=1e-5)
  for s in (20, 60, 100):
    np.testing.assert_allclose(_lr(cfg, s), expected(s), rtol=1e-5)
  # Halfway through the decay the cosine is at the midpoint.
  np.testing.assert_allclose(_lr(cfg, 60), (lr + r * lr) / 2, rtol=1e-5)
  np.testing.assert_allclose(_lr(cfg, n), r * lr, rtol=1e-5)
  np.testing.assert_allclose(_lr(cfg, 10 * n), r * lr, rtol=1e-5)


def test_linear_schedule():
  cfg = optim.OptimConfig(learning_rate=2e-3, schedule="linear",
                          warmup_steps=4, total_steps=24, end_lr_ratio=0.0)
  np.testing.assert_allclose(_lr(cfg, 2), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(_lr(cfg, 4), 2e-3, rtol=1e-6)
  # lr + (0 - lr) * (14 - 4) / (24 - 4) = lr / 2
  np.testing.assert_allclose(_lr(cfg, 14), 1e-3, rtol=1e-6)
  assert _lr(cfg, 24) == pytest.approx(0.0, abs=1e-12)
  assert _lr(cfg, 50) == pytest.approx(0.0, abs=1e-12)


def test_schedule_is_jittable():
  cfg = optim.OptimConfig(learning_rate=1.0, schedule="cosine",
                          warmup_steps=2, total_steps=10)
  sched = optim.make_schedule(cfg)
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(1)), 0.5, rtol=1e-6)


def test_decay_mask_by_name_and_rank():
  params = {
      "embed": jnp.zeros((16, 8)),
      "layers": {
          # Stacked over 3 layers: rank 2, excluded by name only.
          "attn_norm": jnp.ones((3, 8)),
          "q_proj": {"kernel": jnp.zeros((3, 8, 8)), "bias": jnp.zeros((3, 8))},
          "mlp": {"up": jnp.zeros((3, 8, 32))},
      },
      "final_norm": {"scale": jnp.ones((8,))},
      "LayerNorm_0": {"scale": jnp.ones((2, 8))},
      "logit_scale": jnp.ones(()),
      "head": jax.ShapeDtypeStruct((8, 16), jnp.float32),
  }
  mask = optim.decay_mask(params)
  assert mask == {
      "embed": True,
      "layers": {
          "attn_norm": False,
          "q_proj": {"kernel": True, "bias": False},
          "mlp": {"up": True},
      },
      "final_norm": {"scale": False},
      "LayerNorm_0": {"scale": False},
      "logit_scale": False,
      "head": True,
  }


def test_weight_decay_skips_masked_params():
  cfg = optim.OptimConfig(learning_rate=0.1, weight_decay=0.5,
                          grad_clip_norm=None)
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2)), "layers": {"norm": jnp.ones((3, 2))}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only the decay term moves: -lr * wd * w.
  np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["layers"]["norm"], np.zeros((3, 2)))


def _two_steps(cfg, scale):
  """Adam update at step 2 after a unit-norm step 1, with grads * scale."""
  tx = optim.make_optimizer(cfg)
  params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5, 2))}
  g1 = {"a": jnp.full((4, 3), 0.1), "b": jnp.full((5, 2), -0.2)}
  g1 = jax.tree.map(lambda x: x / optax.tree.norm(g1), g1)
  g2 = {"a": jnp.linspace(-1, 1, 12).reshape(4, 3),
        "b": jnp.linspace(0, 2, 10).reshape(5, 2)}
  g2 = jax.tree.map(lambda x: x / optax.tree.norm(g2), g2)
  state = tx.init(params)
  _, state = tx.update(g1, state, params)
  updates, _ = tx.update(jax.tree.map(lambda x: x * scale, g2), state, params)
  return updates


def test_clipping_bounds_update():
  clipped = optim.OptimConfig(learning_rate=1.0, grad_clip_norm=1.0)
  # A 1e6x gradient is clipped back to norm 1: same update as the unit one.
  big = _two_steps(clipped, 1e6)
  unit = _two_steps(clipped, 1.0)
  chex.assert_trees_all_close(big, unit, rtol=1e-5, atol=1e-7)
  # Adam's per-coordinate step is bounded by lr * |m| / sqrt(v) <= lr * ~1.
  assert float(optax.tree.norm(big)) < 1.0 * np.sqrt(22)

  unclipped = optim.OptimConfig(learning_rate=1.0, grad_clip_norm=None)
  big_raw = _two_steps(unclipped, 1e6)
  diff = optax.tree.norm(jax.tree.map(lambda x, y: x - y, big_raw, big))
  assert float(diff) > 1e-2


@pytest.mark.parametrize("kwargs, field", [
    ({"schedule": "exp"}, "schedule"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"schedule": "cosine", "warmup_steps": 10, "total_steps": 10},
     "total_steps"),
    ({"schedule": "linear"}, "total_steps"),
    ({"end_lr_ratio": 1.5}, "end_lr_ratio"),
    ({"b1": 1.0}, "b1"),
    ({"b2": -0.1}, "b2"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -1e-2}, "weight_decay"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
])
def test_invalid_config(kwargs, field):
  with pytest.raises(ValueError, match=f"OptimConfig.{field}="):
    optim.OptimConfig(**kwargs)


@pytest.mark.parametrize("field", ["learning_rate", "eps", "weight_decay", "grad_clip_norm"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_hyper_parameters_are_refused(field, value):
  # learning_rate=inf passed `> 0` and trained to non-finite parameters.
  with pytest.raises(ValueError, match=f"OptimConfig.{field}=.*must be a finite number"):
    optim.OptimConfig(**{field: value})


def test_invalid_schedule_lists_choices():
  with pytest.raises(ValueError, match=r"constant.*cosine.*linear"):
    optim.OptimConfig(schedule="step")


def test_clipping_off_with_zero():
  cfg = optim.OptimConfig(grad_clip_norm=0)
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((2, 2))}
  updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
  assert updates["w"].shape == (2, 2)


@pytest.mark.parametrize("kwargs, field", [
    ({"optimizer": "lion"}, "optimizer"),
    ({"momentum_reset_interval": -1}, "momentum_reset_interval"),
    ({"reset_warmup_steps": 1.5}, "reset_warmup_steps"),
    ({"spike_clip_delay": 0}, "spike_clip_delay"),
    ({"spike_threshold": -1.0}, "spike_threshold"),
    ({"norm_gamma1": 1.0}, "norm_gamma1"),
    ({"clip_gamma3": -0.5}, "clip_gamma3"),
])
def test_invalid_spam_config(kwargs, field):
  with pytest.raises(ValueError, match=f"OptimConfig.{field}="):
    optim.OptimConfig(**kwargs)


@pytest.mark.parametrize("name", ["spam", "stable_spam"])
def test_spam_optimizers_equal_adamw_on_a_smooth_first_step(name):
  # Before any reset or spike, step 0 of SPAM is Adam's; Stable-SPAM's first
  # step is Adam's on a rescaled gradient, and Adam's first step is sign(g).
  # Decay and learning rate are applied as in AdamW.
  base = dict(learning_rate=0.1, weight_decay=0.5, grad_clip_norm=None)
  params = {"w": jnp.full((2, 3), 2.0), "norm": jnp.ones((3,))}
  grads = {"w": jnp.arange(6.0).reshape(2, 3) - 2.5, "norm": jnp.array([1.0, -3.0, 0.5])}
  ref_tx = optim.make_optimizer(optim.OptimConfig(**base))
  tx = optim.make_optimizer(optim.OptimConfig(optimizer=name, **base))
  ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
  got, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)
  # -lr * (sign(g) + wd * w) for the decayed matrix, -lr * sign(g) for the norm.
  np.testing.assert_allclose(got["norm"], [-0.1, 0.1, -0.1], rtol=1e-5)


def test_spam_fields_reach_the_experiment_config():
  import ml_collections

  from jaxrl_llm import config as config_lib
  c = ml_collections.ConfigDict({"optimizer": "stable_spam", "momentum_reset_interval": 1000})
  cfg = config_lib.from_dict(optim.OptimConfig, c, "config.optim")
  assert cfg.optimizer == "stable_spam"
  assert cfg.momentum_reset_interval == 1000
  with pytest.raises(ValueError, match="config.optim: OptimConfig.optimizer="):
    config_lib.from_dict(optim.OptimConfig, {"optimizer": "spamm"}, "config.optim")
