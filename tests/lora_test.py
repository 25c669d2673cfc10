"""LoRA / PiSSA: config checks, adapters as a params transform, frozen base, reference,
merge, sharding equality and a short LoRA RL run through the trainer."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from jaxrl_llm import config as config_lib
from jaxrl_llm import lora, optim, sharding, testing, trainer, tree_paths
from jaxrl_llm.models import decoder
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import accumulate_gradients, create_train_state

LORA = lora.LoraConfig(rank=4, alpha=8.0)
BASE = testing.tiny_config("qwen2")
CFG = BASE.replace(lora=LORA)
TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 9)).astype(np.int32)


def _trained_adapters(params, seed=1):
  """Params whose adapters are random (as after training): B no longer zero."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  layers = {k: (0.05 * jax.random.normal(next(keys), v.shape) if k.endswith(("_lora_a",
                                                                              "_lora_b"))
                else v) for k, v in params["layers"].items()}
  return dict(params, layers=layers)


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, msg", [
    (dict(rank=-1), "rank"),
    (dict(rank=4, target_modules=("q", "qkv", "fc")), r"unknown module\(s\) \['qkv', 'fc'\]"),
    (dict(rank=4, target_modules=()), "empty"),
    (dict(rank=4, init="olora"), "init"),
    (dict(rank=4, alpha=0.0), "alpha"),
    (dict(rank=4, dropout=1.0), "dropout"),
    (dict(rank=0, init="pissa"), "rank=0 turns LoRA off"),
])
def test_config_errors_name_the_field(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    lora.LoraConfig(**kwargs)


def test_config_accepts_hf_names_and_is_reachable_from_config_files():
  assert lora.LoraConfig(rank=2, target_modules=("q_proj", "down_proj")).target_modules == (
      "q", "down")
  c = config_lib.default_configdict(kind="rl")
  c.model.lora.rank = 8
  c.model.lora.target_modules = ("q", "v")
  cfg = config_lib.from_configdict(c)
  assert cfg.model.lora == lora.LoraConfig(rank=8, target_modules=("q", "v"))
  c.model.lora.target_modules = ("q", "wq")
  with pytest.raises(ValueError, match=r"config.model.lora.*\['wq'\]"):
    config_lib.from_configdict(c)
  c.model.lora.target_modules = ("q",)
  c.model.lora.dropout = 0.1
  with pytest.raises(ValueError, match="dropout.*kind='sft' only"):
    config_lib.from_configdict(c)


# ---------------------------------------------------------------------------
# Adapters as a params transform.
# ---------------------------------------------------------------------------
def test_zero_init_b_gives_the_base_logits_and_reference_is_the_base():
  base = testing.tiny_params(BASE)
  params = lora.add_adapters(LORA, base, jax.random.key(1))
  assert set(params["layers"]) - set(base["layers"]) == {
      f"{t}{s}" for t in lora.TARGETS for s in ("_lora_a", "_lora_b")}
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
      lambda x: x.shape, decoder.param_shapes(CFG))
  want = decoder.forward(BASE, base, TOKENS)
  np.testing.assert_array_equal(decoder.forward(CFG, params, TOKENS), want)
  trained = _trained_adapters(params)
  assert not np.allclose(decoder.forward(CFG, trained, TOKENS), want, atol=1e-3)
  # The reference (adapters off) is the base model, and shares its arrays.
  ref = lora.reference_params(trained)
  np.testing.assert_array_equal(decoder.forward(CFG, ref, TOKENS), want)
  assert ref["layers"]["q"] is trained["layers"]["q"]


def test_pissa_reconstructs_the_weights_and_its_reference_is_the_original_model():
  cfg = BASE.replace(lora=LORA.replace(init="pissa"))
  base = testing.tiny_params(BASE)
  params = lora.add_adapters(cfg.lora, base, jax.random.key(1))
  for name in lora.TARGETS:  # the residual is no longer W, base + s·A·B is
    assert not np.allclose(params["layers"][name], base["layers"][name], atol=1e-3)
  merged = lora.merge(params, cfg.lora.scale)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), merged, base)
  want = decoder.forward(BASE, base, TOKENS)
  np.testing.assert_allclose(decoder.forward(cfg, params, TOKENS), want, atol=2e-5)
  trained = _trained_adapters(params)
  np.testing.assert_allclose(decoder.forward(cfg, lora.reference_params(trained), TOKENS),
                             want, atol=2e-5)
  with pytest.raises(ValueError, match="PiSSA needs rank <= 32"):
    lora.add_adapters(LORA.replace(rank=40, init="pissa"), base, jax.random.key(0))


def test_pissa_takes_one_two_dimensional_svd_per_layer():
  """A batched SVD of all layers hung 8 CPU devices (jaxlib's LAPACK kernel waits on the
  intra-op thread pool from inside it): PiSSA's SVD runs one layer's matrix at a time."""
  cfg = BASE.replace(lora=LORA.replace(init="pissa"))
  jaxpr = jax.make_jaxpr(lambda p: lora.add_adapters(cfg.lora, p, jax.random.key(1)))(
      testing.tiny_params(BASE))

  def svd_operand_ranks(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "svd":
        yield eqn.invars[0].aval.ndim
      for sub in jex_core.jaxprs_in_params(eqn.params):
        yield from svd_operand_ranks(sub)

  ranks = list(svd_operand_ranks(jaxpr.jaxpr))
  assert ranks and set(ranks) == {2}, ranks


def test_merged_weights_equal_the_unmerged_path():
  params = _trained_adapters(lora.add_adapters(LORA, testing.tiny_params(BASE),
                                               jax.random.key(1)))
  merged = lora.merge(params, LORA.scale)
  assert not lora.has_adapters(merged)
  np.testing.assert_allclose(decoder.forward(BASE, merged, TOKENS),
                             decoder.forward(CFG, params, TOKENS), atol=2e-5)
  bf16 = lora.merge(params, LORA.scale, dtype=jnp.bfloat16)
  assert bf16["layers"]["q"].dtype == jnp.bfloat16
  assert bf16["layers"]["attn_norm"].dtype == jnp.float32  # norms stay as stored
  # The cached (decode) path reads adapters too.
  cache = decoder.init_cache(CFG, 2, 9)
  valid = jnp.ones(TOKENS.shape, bool)
  pos = jnp.broadcast_to(jnp.arange(9), TOKENS.shape)
  cached, _ = decoder.forward_with_cache(CFG, params, TOKENS, pos, valid, cache)
  np.testing.assert_allclose(cached, decoder.forward(CFG, params, TOKENS), atol=2e-5)


def test_dropout_touches_only_the_adapter_branch_and_follows_its_key():
  cfg = CFG.replace(lora=LORA.replace(dropout=0.5))
  params = lora.add_adapters(cfg.lora, testing.tiny_params(BASE), jax.random.key(1))
  h = lambda p, key=None: decoder.hidden_states(cfg, p, TOKENS, lora_dropout_rng=key)
  # B = 0: the adapter branch adds nothing, so dropout on its input changes nothing.
  np.testing.assert_array_equal(h(params, jax.random.key(5)), h(params))
  trained = _trained_adapters(params)
  k1, k2 = jax.random.key(5), jax.random.key(6)
  np.testing.assert_array_equal(h(trained, k1), h(trained, k1))
  assert not np.allclose(h(trained, k1), h(trained, k2), atol=1e-4)
  assert not np.allclose(h(trained, k1), h(trained), atol=1e-4)
  # Dropout 0 (or no key): the deterministic forward.
  np.testing.assert_array_equal(
      decoder.hidden_states(CFG, trained, TOKENS, lora_dropout_rng=k1), h(trained))


def test_adapters_without_lora_settings_are_refused():
  params = lora.add_adapters(LORA, testing.tiny_params(BASE), jax.random.key(1))
  with pytest.raises(ValueError, match="no lora settings"):
    decoder.forward(BASE, params, TOKENS)


# ---------------------------------------------------------------------------
# Training touches only the adapters.
# ---------------------------------------------------------------------------
def _sft_batch():
  rng = np.random.RandomState(0)
  return dict(tokens=rng.randint(0, 128, size=(4, 12)).astype(np.int32),
              segment_ids=np.ones((4, 12), np.int32),
              loss_mask=np.ones((4, 12), np.int32))


def test_gradients_reach_only_adapters_and_optimizer_state_is_adapters_only():
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2,
                                                               weight_decay=0.1)))
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh)
  before = jax.device_get(state.params)
  trainable = lora.trainable_params(before)
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(trainable))  # Adam mu, nu
  loss = functools.partial(__import__("jaxrl_llm.sft", fromlist=["x"]).sft_loss, CFG)
  # At initialisation B = 0, so dL/dA = (dL/dy · s·Bᵀ) contracted with x is exactly zero and
  # only B gets a gradient; once B has moved (as after a step), A gets one too.
  grads0, _, _ = accumulate_gradients(loss, state.params, _sft_batch(), 2)
  grads1, _, _ = accumulate_gradients(loss, _trained_adapters(state.params), _sft_batch(), 2)
  for path, g in tree_paths.flatten(grads0).items():
    if path.endswith("_lora_b"):
      assert np.abs(np.asarray(g)).max() > 0, path
    elif path.endswith("_lora_a"):
      assert not np.asarray(g).any(), path
  for path, g in tree_paths.flatten(grads1).items():
    if lora.is_trainable(path):
      assert np.abs(np.asarray(g)).max() > 0, path
    else:
      assert not np.asarray(g).any(), path  # exactly zero: never differentiated
  step = jax.jit(functools.partial(sft_step, cfg=CFG, tx=tx, microbatches=2, mesh=mesh),
                 donate_argnums=(0,))
  for _ in range(2):
    state, metrics = step(state, _sft_batch(), jax.random.key(0))
  after = jax.device_get(state.params)
  for path, value in tree_paths.flatten(after).items():
    old = tree_paths.flatten(before)[path]
    if lora.is_trainable(path):
      assert not np.array_equal(value, old), path
    else:
      np.testing.assert_array_equal(value, old, err_msg=path)  # weight decay too: frozen
  assert metrics["grad/global_norm"] > 0


@pytest.mark.parametrize("lora_cfg", [LORA, None])
def test_bfloat16_params_keep_their_gradient_and_optimizer_state_dtypes(lora_cfg):
  """param_dtype bfloat16: gradients come back in bf16 (the float32 token count must not
  promote them), so the optimizer state keeps its dtypes across a step (apply_if_finite's
  cond needs equal dtypes on both sides), with and without adapters."""
  from jaxrl_llm.sft import sft_loss
  from jaxrl_llm.train_state import apply_update
  cfg = BASE.replace(lora=lora_cfg, param_dtype="bfloat16")
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2))
  if lora_cfg is not None:
    tx = lora.freeze_base(tx)
  state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh)

  def update(st):
    grads, _, _ = accumulate_gradients(functools.partial(sft_loss, cfg), st.params,
                                       _sft_batch(), 2)
    return grads, apply_update(st, tx, grads)[0]
  grads, new = jax.jit(update)(state)
  dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)
  assert dtypes(grads) == dtypes(state.params)
  assert dtypes(new.opt_state) == dtypes(state.opt_state)
  assert dtypes(new.params) == dtypes(state.params)


# ---------------------------------------------------------------------------
# RL: reference from the frozen base, 8 devices = 1.
# ---------------------------------------------------------------------------
VOCAB, EOS, TARGET = 16, 2, 7
RL_CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, lora=LORA)


def _target_reward(inputs):
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def _rl_steps(mesh_shape, n=2, ref_copy=False, model_cfg=RL_CFG):
  rl = rl_config.from_preset("grpo", group_size=4, max_new_tokens=5, minibatches=2,
                             kl_coef=0.05)
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2)))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  state, sh = create_train_state(model_cfg, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  step = rls.RLStep(model_cfg, rl, tx, _target_reward, eos_id=EOS, mesh=mesh)
  ref = jax.tree.map(jnp.copy, lora.reference_params(state.params)) if ref_copy else None
  ref_sh = lora.reference_params(sh.params) if ref_copy else None
  fn = rls.jit_rl_step(step, sh, None, ref_sh)
  rng = np.random.RandomState(0)
  batch = dict(prompt_tokens=rng.randint(3, VOCAB, size=(4, 5)).astype(np.int32),
               prompt_mask=np.ones((4, 5), np.int32), prompt_id=np.arange(4, dtype=np.int32))
  batch = sharding.shard_batch(batch, mesh)
  for _ in range(n):
    state, metrics = fn(state, batch, jax.random.key(3), ref)
  return jax.device_get(state), jax.device_get(metrics)


def test_lora_rl_step_eight_devices_equal_one_and_reference_is_the_frozen_base():
  s1, m1 = _rl_steps((1, 1, 1))
  s8, m8 = _rl_steps((2, 2, 2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               s1.params, s8.params)
  for k in ("reward/mean", "loss/policy", "rl/approx_kl"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6)
  # The implicit reference (no ref_params) equals an explicit copy of the base.
  sc, mc = _rl_steps((1, 1, 1), ref_copy=True)
  np.testing.assert_allclose(m1["rl/approx_kl"], mc["rl/approx_kl"], rtol=1e-6)
  assert m1["rl/approx_kl"] > 0  # the adapters moved the policy away from the base
  jax.tree.map(np.testing.assert_array_equal, s1.params, sc.params)


def test_merged_rollout_samples_what_the_low_rank_path_samples():
  unmerged_s, unmerged_m = _rl_steps((1, 1, 1))
  merged_cfg = RL_CFG.replace(lora=LORA.replace(merged_rollout=True))
  merged_s, merged_m = _rl_steps((1, 1, 1), model_cfg=merged_cfg)
  for k in ("reward/mean", "loss/policy", "rl/approx_kl"):
    np.testing.assert_allclose(merged_m[k], unmerged_m[k], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               merged_s.params, unmerged_s.params)


# ---------------------------------------------------------------------------
# The trainer: a short LoRA GRPO run on the built-in task.
# ---------------------------------------------------------------------------
def _tiny_rl(workdir_steps=3, **lora_kw):
  c = config_lib.default_configdict(kind="rl", rl_preset="grpo")
  c.model.builtin = "nano"
  config_lib.use_builtin_task(c, batch_size=8, num_train=64, num_test=8)
  c.eval.num_examples, c.eval.batch_size = 8, 8
  c.rl.group_size, c.rl.max_new_tokens, c.rl.kl_coef = 4, 4, 0.05
  c.optim.learning_rate = 1e-2
  c.trainer.num_steps, c.trainer.log_every, c.trainer.progress = workdir_steps, 1, False
  c.trainer.sft_warmstart.num_steps = 2
  c.trainer.sft_warmstart.batch_size = 8
  c.checkpoint.async_save = False
  c.checkpoint.save_interval_steps = 2
  c.model.lora.rank = 4
  for k, v in lora_kw.items():
    setattr(c.model.lora, k, v)
  return config_lib.from_configdict(c)


@pytest.mark.slow
def test_trainer_runs_lora_rl_from_a_full_sft_warmstart(tmp_path):
  cfg = _tiny_rl(init="pissa")
  workdir = str(tmp_path / "run")
  trainer.run(cfg, workdir)
  tok = __import__("jaxrl_llm.tokenizers", fromlist=["x"]).load_tokenizer("builtin")
  model_cfg = trainer.model_config(cfg, tok)
  assert model_cfg.lora == cfg.model.lora
  mesh = sharding.make_mesh(cfg.mesh)
  from jaxrl_llm.checkpoint import Checkpointer
  from jaxrl_llm.train_state import param_shardings
  params = jax.device_get(Checkpointer(workdir, create=False).restore_params(
      trainer._abstract_params(model_cfg, param_shardings(model_cfg, mesh))))
  warm = jax.device_get(Checkpointer(workdir + "/sft_warmstart", create=False).restore_params(
      trainer._abstract_params(model_cfg.replace(lora=None), param_shardings(
          model_cfg.replace(lora=None), mesh))))
  # The frozen residual + the starting adapters are the warm-started weights, untouched.
  start = lora.merge(lora.reference_params(params), cfg.model.lora.scale)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), start, warm)
  # (The 2-step warm start never answers correctly, so the rewards are all 0 and GRPO's
  # advantages and updates are 0 here: adapter movement is covered by the RL-step tests.)
  assert Checkpointer(workdir, create=False).latest_step() == 3
  assert set(lora.trainable_params(params)["layers"]) == {
      f"{t}{s}" for t in lora.TARGETS for s in ("_lora_a", "_lora_b")}


# ---------------------------------------------------------------------------
# The memory planner counts the frozen base, the adapters and their optimizer state exactly.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("init, mesh_shape", [("gaussian", (1, 1, 1)), ("pissa", (1, 4, 2))])
def test_memory_plan_counts_adapters_frozen_base_and_optimizer_state_exactly(init, mesh_shape):
  from jaxrl_llm import memory
  cfg = CFG.replace(lora=LORA.replace(init=init))
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape),
                            jax.devices()[:int(np.prod(mesh_shape))])
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2)))
  state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh)
  per_device = lambda leaves: sum(max(s.data.nbytes for s in x.addressable_shards)
                                  for x in leaves if x.ndim > 0)
  plan = memory.plan_memory(cfg, mesh_shape, batch_size=8, seq_len=16, reference=True,
                            num_devices=int(np.prod(mesh_shape)))
  assert plan.components["parameters"] == per_device(jax.tree.leaves(state.params))
  assert plan.components["optimizer state"] == per_device(jax.tree.leaves(state.opt_state))
  trainable = per_device(jax.tree.leaves(lora.trainable_params(state.params)))
  assert plan.components["gradients"] == 2 * trainable
  assert "reference params" not in plan.components  # π_ref is the frozen base: no copy
  full = memory.plan_memory(BASE, mesh_shape, batch_size=8, seq_len=16, reference=True,
                            num_devices=int(np.prod(mesh_shape)))
  assert full.components["reference params"] == full.components["parameters"]
  assert plan.components["optimizer state"] < full.components["optimizer state"]
