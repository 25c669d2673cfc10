"""The grouped training forward (jaxrl_llm/models/shared_prompt.py) equals the per-row
forward on every real token: hidden states, log-probs and their gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import testing
from jaxrl_llm.models import decoder, shared_prompt

R, G, P, L = 3, 4, 7, 6


def _rows(vocab, seed=0):
  """R left-padded prompts, G right-padded completions of each (lengths vary, one empty)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, (R, P))
  plen = np.array([P, 4, 1])
  pmask = np.arange(P)[None] >= (P - plen)[:, None]
  comp = rng.integers(1, vocab, (R, G, L))
  clen = rng.integers(0, L + 1, (R, G))
  clen[0, 0], clen[1, 2] = L, 0
  cmask = np.arange(L)[None, None] < clen[..., None]
  return (jnp.asarray(np.where(pmask, prompt, 0)), jnp.asarray(pmask),
          jnp.asarray(np.where(cmask, comp, 0)), jnp.asarray(cmask))


def _per_row(cfg, params, prompt, pmask, comp, cmask):
  """`RLStep.completion_logprobs`' layout: each completion after its own prompt copy."""
  rep = lambda x: jnp.repeat(x, G, axis=0)
  tokens = jnp.concatenate([rep(prompt), comp.reshape(R * G, L)], axis=1)
  seg = jnp.concatenate([rep(pmask), cmask.reshape(R * G, L)], axis=1).astype(jnp.int32)
  return decoder.hidden_states(cfg, params, tokens, segment_ids_BT=seg)[:, P - 1:P + L - 1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hidden_states_equal_the_per_row_forward(family):
  cfg = testing.tiny_config(family)
  params = testing.tiny_params(cfg)
  prompt, pmask, comp, cmask = _rows(cfg.vocab_size)
  ref = _per_row(cfg, params, prompt, pmask, comp, cmask)
  got = shared_prompt.completion_hidden_states(cfg, params, prompt, pmask, comp, cmask)
  assert got.shape == ref.shape == (R * G, L, cfg.hidden_size)
  # Real positions: the prompt's last token and every completion token but the last.
  real = jnp.concatenate([jnp.ones((R * G, 1), bool), cmask.reshape(R * G, L)[:, :-1]], 1)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(real)],
                             np.asarray(ref)[np.asarray(real)], atol=2e-5, rtol=1e-5)


def test_log_prob_gradients_equal_the_per_row_forward():
  cfg = testing.tiny_config("qwen2", tie_embeddings=True)
  params = testing.tiny_params(cfg)
  prompt, pmask, comp, cmask = _rows(cfg.vocab_size, seed=1)
  weights = jax.random.normal(jax.random.key(2), (R * G, L)) * cmask.reshape(R * G, L)

  def loss(p, grouped):
    if grouped:
      h = shared_prompt.completion_hidden_states(cfg, p, prompt, pmask, comp, cmask)
    else:
      h = _per_row(cfg, p, prompt, pmask, comp, cmask)
    return jnp.sum(decoder.token_logprobs(cfg, p, h, comp.reshape(R * G, L)) * weights)
  (v_ref, g_ref), (v, g) = (jax.value_and_grad(loss)(params, x) for x in (False, True))
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, g_ref)


def test_wrong_shapes_are_refused():
  cfg = testing.tiny_config("llama")
  params = testing.tiny_params(cfg)
  prompt, pmask, comp, cmask = _rows(cfg.vocab_size)
  with pytest.raises(ValueError, match=r"must be \[R, P\] and \[R, G, L\]"):
    shared_prompt.completion_hidden_states(cfg, params, prompt, pmask, comp,
                                           cmask.reshape(R * G, L))


# ---------------------------------------------------------------- in the RL step
VOCAB, EOS, NEW = 16, 2, 24
STEP_CFG = testing.tiny_config("qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
FORCED = np.array([3, 5, 24, 10, 8, 30, 12, 9, 1, 2, 20, 6, 11, 17, 4, 7], np.int32)


def _even_reward(inputs):
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL % 2 == 0) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def _rl_run(shared, microbatches=2, mesh_shape=(1, 1, 1), **rl_kwargs):
  from jaxrl_llm import optim, sampling, sharding
  from jaxrl_llm.rl import config as rl_config
  from jaxrl_llm.rl import rl_step as rls
  from jaxrl_llm.train_state import create_train_state
  rl = rl_config.from_preset("grpo", group_size=4, max_new_tokens=NEW,
                             microbatches=microbatches, kl_coef=0.05,
                             update_shared_prompt=shared, **rl_kwargs)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0))
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape), jax.devices()[:n])
  state, _ = create_train_state(STEP_CFG, tx, jax.random.key(0), mesh)
  step = rls.RLStep(STEP_CFG, rl, tx, _even_reward, eos_id=EOS, mesh=mesh,
                    logits_processor=sampling.force_lengths(FORCED, EOS))
  rng = np.random.RandomState(0)
  pmask = np.ones((4, 6), np.int32)
  pmask[1, :2] = pmask[3, :4] = 0  # left-padded prompts
  batch = dict(prompt_tokens=rng.randint(3, VOCAB, size=(4, 6)).astype(np.int32) * pmask,
               prompt_mask=pmask, prompt_id=np.arange(4, dtype=np.int32))
  ref = jax.tree.map(jnp.copy, state.params)
  with sharding.activation_rules(mesh, step.rules):
    ro = jax.jit(lambda p, b: step.rollout(p, b, jax.random.key(1), 0))(state.params, batch)
    logp = jax.jit(step._batched_logprobs)(state.params, ro) * ro["completion_mask"]
    new_state, metrics = jax.jit(step.learn)(state, ro, *step.score(ro)[:2],
                                             jax.random.key(2), ref)
  return jax.device_get((logp, new_state.params, metrics, state.params))


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_rl_step_with_the_shared_prompt_update_equals_the_per_row_update(mesh_shape):
  """On one device, and on 8 (data, fsdp, tensor) against the per-row update on 8."""
  (logp1, p1, m1, p0), (logp2, p2, m2, _) = (_rl_run(s, mesh_shape=mesh_shape)
                                             for s in (False, True))
  np.testing.assert_allclose(logp2, logp1, rtol=1e-5, atol=1e-5)
  for k in ("loss/policy", "loss/kl", "rl/entropy", "grad/global_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-4, atol=1e-6)
  # Adam divides by each gradient element's magnitude: summation-order rounding moves a
  # few elements by ~1e-5 at lr 1e-2 (as in tests/length_buckets_test.py).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5), p2, p1)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                            jax.tree.leaves(p0)))
  assert moved > 1e-3  # the update did change the parameters it compares


def test_group_minibatch_indices_shuffle_whole_groups():
  from jaxrl_llm.rl import rl_step as rls
  idx = np.asarray(rls.group_minibatch_indices(jax.random.key(0), 16, 4, epochs=2,
                                               minibatches=2))
  assert idx.shape == (4, 8)
  for epoch in idx.reshape(2, 16):
    assert sorted(epoch) == list(range(16))  # every row once per epoch
    groups = epoch.reshape(4, 4)
    np.testing.assert_array_equal(groups % 4, np.tile(np.arange(4), (4, 1)))  # in order
    assert (groups // 4 == groups[:, :1] // 4).all()  # one group per run of 4
  assert (idx.reshape(2, 16)[0] != np.arange(16)).any()  # shuffled
  np.testing.assert_array_equal(  # one optimizer step: the rollout's order
      rls.group_minibatch_indices(jax.random.key(0), 16, 4, 1, 1), np.arange(16)[None])


def test_several_optimizer_steps_equal_the_per_row_update_on_the_same_groups(monkeypatch):
  """epochs x minibatches > 1: whole groups are shuffled; given those same row orders the
  per-row update takes the same steps."""
  from jaxrl_llm.rl import rl_step as rls
  on = _rl_run(True, microbatches=1, epochs=2, minibatches=2)
  monkeypatch.setattr(rls.RLStep, "minibatch_indices", lambda self, rng, B, cm=None:
                      rls.group_minibatch_indices(rng, B, self.rl.group_size,
                                                  self.rl.epochs, self.rl.minibatches))
  off = _rl_run(False, microbatches=1, epochs=2, minibatches=2)
  (logp1, p1, m1, _), (logp2, p2, m2, _) = off, on
  np.testing.assert_allclose(logp2, logp1, rtol=1e-5, atol=1e-5)
  for k in ("loss/policy", "loss/kl", "rl/entropy", "grad/global_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5), p2, p1)


def test_shared_prompt_update_refuses_what_breaks_group_order():
  from jaxrl_llm.rl import config as rl_config
  for bad, match in ((dict(length_buckets=4), "length_buckets > 1"),
                     (dict(multiturn=dict(enabled=True)), "single-turn")):
    with pytest.raises(ValueError, match=match):
      rl_config.from_preset("grpo", update_shared_prompt=True, **bad)
  with pytest.raises(ValueError, match="not whole groups of group_size=4"):
    _rl_run(True, microbatches=8)  # 16 rows / 8 = 2 rows per micro-batch


def test_a_warning_names_groups_that_do_not_split_over_the_batch_axes(caplog):
  from jaxrl_llm import sharding
  cfg = testing.tiny_config("llama")
  params = testing.tiny_params(cfg)
  prompt, pmask, comp, cmask = _rows(cfg.vocab_size)  # R = 3 groups
  for shape, warns in (((2, 2, 2), True), ((1, 8, 1), True), ((1, 1, 8), False)):
    mesh = sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:8])
    caplog.clear()
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      shared_prompt.completion_hidden_states(cfg, params, prompt, pmask, comp, cmask)
    assert any("3 groups per micro-batch" in r.getMessage() for r in caplog.records) == warns
