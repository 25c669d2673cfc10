"""A quantized frozen base (QLoRA-style, qwix): config checks, layout, log-prob agreement with
the float base, gradients only for adapters, the RL step on 1 and 8 devices with the
reference on the same quantized base, exact memory plan, adapter-only checkpoint resume."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import lora, memory, optim, quantize, sharding, testing, tree_paths
from jaxrl_llm.checkpoint import CheckpointConfig, Checkpointer
from jaxrl_llm.models import decoder
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import create_train_state, param_shardings


def qlora(kind="nf4", **kw):
  return lora.LoraConfig(rank=4, alpha=8.0, quantize_base=kind, adapter_only_checkpoints=True,
                         **kw)


def _mesh(shape):
  return sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:int(np.prod(shape))])


def _tx():
  return lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2,
                                                                 weight_decay=0.1)))


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, msg", [
    (dict(rank=0, quantize_base="nf4"), "needs LoRA: a quantized base must stay frozen"),
    (dict(rank=4, quantize_base="fp4"), "choose one of"),
    (dict(rank=4, quantize_base="int8"), "needs lora.adapter_only_checkpoints=True"),
    (dict(rank=4, quantize_base="nf4", adapter_only_checkpoints=True, quantize_block_size=0),
     "quantize_block_size"),
])
def test_config_errors_name_the_field(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    lora.LoraConfig(**kwargs)


def test_config_is_reachable_from_a_config_file_and_block_size_must_divide():
  from jaxrl_llm import config as config_lib
  c = config_lib.default_configdict(kind="sft")
  c.model.lora.rank = 4
  c.model.lora.quantize_base = "nf4"
  with pytest.raises(ValueError, match="adapter_only_checkpoints=True"):
    config_lib.from_configdict(c)
  c.model.lora.adapter_only_checkpoints = True
  assert config_lib.from_configdict(c).model.lora.quantize_base == "nf4"
  # 32 input elements: blocks of 64 become one block of 32; 24 neither divides nor covers it.
  assert quantize.block_length(32, 64) == 32 and quantize.block_length(128, 64) == 64
  assert quantize.layout("o", (4, 32, 128), "nf4", 64) == ((0, 2), {1: 32})  # [N, H, D]
  assert quantize.layout("o", (4, 32, 128), "int8", 64) == ((2,), {})  # per output channel
  with pytest.raises(ValueError, match="quantize_block_size=24 does not divide the 32 input"):
    quantize.layout("q", (32, 4, 8), "nf4", 24)


# ---------------------------------------------------------------------------
# Layout and log-prob agreement with the float base.
# ---------------------------------------------------------------------------
# The built-in "tiny" model's shape (qwen3 family, D=128, 4 layers, F=384, head_dim 32) with
# vocab 256 and random weights: projections N(0, 1/fan_in), embeddings N(0, 0.1²).
AGREE_CFG = testing.tiny_config("qwen3", vocab_size=256, hidden_size=128, num_layers=4,
                                num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384,
                                tie_embeddings=True)
# Measured (seed 0, 8 × 63 tokens) -> asserted bound, per kind:
#   relative RMS weight error  int8 0.0065-0.0072, int4 0.095-0.103, nf4 0.087-0.092
#   mean |Δ log p| (nats)       int8 0.026, int4 0.375, nf4 0.357
#   max  |Δ log p|              int8 0.124, int4 1.69,  nf4 1.40
BOUNDS = {"int8": (0.01, 0.04, 0.2), "int4": (0.12, 0.5, 2.5), "nf4": (0.1, 0.5, 2.0)}


@pytest.fixture(scope="module")
def float_model():
  cfg = AGREE_CFG.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))
  p = decoder.init_params(cfg, jax.random.key(0))
  layers = dict(p["layers"])
  for name in lora.TARGETS:
    w = layers[name]
    fan_in = int(np.prod(w.shape[1:1 + lora.IN_AXES[name]]))
    layers[name] = w / (0.02 * np.sqrt(fan_in))
  return cfg, dict(p, layers=layers, embed=p["embed"] * 5.0)


def _logps(cfg, params, tokens):
  @jax.jit
  def f(params):
    h = decoder.hidden_states(cfg, params, tokens[:, :-1])
    return decoder.token_logprobs(cfg, params, h, tokens[:, 1:])
  return np.asarray(f(params))


def test_layout_and_logprob_agreement_with_the_float_base(float_model):
  cfg, params = float_model
  tokens = np.random.RandomState(0).randint(0, 256, size=(8, 64)).astype(np.int32)
  ref = _logps(cfg, lora.reference_params(params), tokens)
  errors = {}
  for kind, (w_bound, mean_bound, max_bound) in BOUNDS.items():
    q_lora = cfg.lora.replace(quantize_base=kind, adapter_only_checkpoints=True)
    q_cfg = cfg.replace(lora=q_lora)
    q = quantize.quantize_params(q_lora, params)
    # The abstract layout (shardings, checkpoints, memory) is what quantize_params makes.
    assert (jax.tree.structure(jax.eval_shape(lambda p: p, q)) ==  # noqa: B023
            jax.tree.structure(decoder.param_shapes(q_cfg)))
    jax.tree.map(lambda a, s: (a.shape, a.dtype) == (s.shape, s.dtype) or pytest.fail(kind),
                 q, decoder.param_shapes(q_cfg))
    qv = q["layers"]
    # int8: one scale per output channel; 4-bit: blocks of 64 inputs (o: head_dim 32 = one block).
    expected = {"int8": ((4, 1, 4, 32), (4, 1, 1, 128), jnp.int8),
                "int4": ((4, 2, 4, 32), (4, 4, 1, 128), jnp.int4),
                "nf4": ((4, 2, 4, 32), (4, 4, 1, 128), jnp.uint4)}[kind]
    assert (qv["q"].scale.shape, qv["o"].scale.shape, qv["q"].qvalue.dtype) == expected
    for name in lora.TARGETS:
      w = params["layers"][name]
      rel = float(jnp.sqrt(jnp.mean((quantize.dequantize(qv[name]) - w) ** 2)) / jnp.std(w))
      assert 1e-4 < rel < w_bound, (kind, name, rel)
    # Adapters, embeddings and norms stay float and unchanged.
    for path, v in tree_paths.flatten(q).items():
      if not quantize.is_quantized(v):
        np.testing.assert_array_equal(v, tree_paths.flatten(params)[path])
    delta = np.abs(_logps(q_cfg, lora.reference_params(q), tokens) - ref)
    errors[kind] = delta.mean()
    assert 1e-3 < delta.mean() < mean_bound and delta.max() < max_bound, (
        kind, delta.mean(), delta.max())
  assert errors["int8"] < errors["nf4"] / 5 and errors["int8"] < errors["int4"] / 5


# ---------------------------------------------------------------------------
# Training from a float model source: gradients reach only adapters, the quantized base
# never changes, and adapter-only checkpoints resume on the re-quantized base.
# ---------------------------------------------------------------------------
def _sft_batch():
  rng = np.random.RandomState(0)
  return dict(tokens=rng.randint(0, 128, size=(4, 12)).astype(np.int32),
              segment_ids=np.ones((4, 12), np.int32), loss_mask=np.ones((4, 12), np.int32))


@pytest.fixture(scope="module")
def sft_run():
  """Two SFT steps of a tiny qwen2 model with an nf4 base read from a float source."""
  from jaxrl_llm import config as config_lib
  cfg = testing.tiny_config("qwen2", lora=qlora("nf4"))
  exp = config_lib.from_configdict(config_lib.default_configdict(kind="sft"))
  mesh = _mesh((1, 1, 1))
  float_base = decoder.init_params(cfg.replace(lora=None), jax.random.key(5))

  def start():  # a run's starting params from its float model source, as the trainer reads them
    return quantize.initial_params(exp, "", cfg, param_shardings(cfg, mesh),
                                   lambda *_: jax.tree.map(jnp.copy, float_base),
                                   rng=jax.random.key(1))

  tx = _tx()
  state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh, params=start())
  initial = jax.device_get(state)
  step = jax.jit(functools.partial(sft_step, cfg=cfg, tx=tx, microbatches=2, mesh=mesh))
  for _ in range(2):
    state, metrics = step(state, _sft_batch(), jax.random.key(0))
  return dict(cfg=cfg, start=start, float_base=float_base, initial=initial, state=state,
              metrics=jax.device_get(metrics))


def test_gradients_reach_only_adapters_and_the_quantized_base_stays_frozen(sft_run):
  before, metrics = sft_run["initial"].params, sft_run["metrics"]
  assert all(quantize.is_quantized(before["layers"][t]) for t in lora.TARGETS)
  # Adam moments for the adapters only: the quantized base has no optimizer state.
  n_moments = sum(x.size for x in jax.tree.leaves(sft_run["initial"].opt_state) if x.ndim > 0)
  assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(lora.trainable_params(before)))
  assert np.isfinite(metrics["loss/nll"]) and metrics["grad/global_norm"] > 0
  after = jax.device_get(sft_run["state"].params)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  flat_before = tree_paths.flatten(before)
  for path, value in tree_paths.flatten(after).items():
    if lora.is_trainable(path):  # every adapter moved (A too, once B left zero)
      assert not np.array_equal(value, flat_before[path]), path
    else:  # the codes and scales of the quantized base, bit for bit (weight decay too)
      jax.tree.map(np.testing.assert_array_equal, value, flat_before[path])


def test_adapter_only_checkpoint_resumes_on_the_requantized_base(sft_run, tmp_path):
  state = sft_run["state"]
  ckpt = lora.AdapterOnlyCheckpointer(
      Checkpointer(str(tmp_path), CheckpointConfig(async_save=False)), state)
  assert ckpt.save(2, state, force=True)
  ckpt.close()
  # A new process: its starting state re-reads the float source and re-quantizes it to the
  # same codes (quantization is deterministic); the adapters come from the checkpoint.
  fresh = jax.device_put(sft_run["initial"].replace(params=sft_run["start"]()),
                         jax.tree.map(lambda x: x.sharding, state))
  resumed = lora.AdapterOnlyCheckpointer(Checkpointer(str(tmp_path), create=False), fresh)
  restored, _ = resumed.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh))
  resumed.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  # The codes are those of the float base quantized by hand.
  expected = quantize.quantize_weight(sft_run["float_base"]["layers"]["down"], "down", "nf4", 64)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params["layers"]["down"]),
               jax.device_get(expected))


# ---------------------------------------------------------------------------
# RL: one-jit step on 1 and 8 devices; the reference is the same quantized base.
# ---------------------------------------------------------------------------
VOCAB, EOS, TARGET = 16, 2, 7
RL_CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, lora=qlora("nf4"))


def _target_reward(inputs):
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def _rl_steps(mesh_shape, n=2):
  rl = rl_config.from_preset("grpo", group_size=4, max_new_tokens=5, minibatches=1,
                             kl_coef=0.05)
  tx = lora.freeze_base(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2)))
  mesh = _mesh(mesh_shape)
  state, sh = create_train_state(RL_CFG, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  step = rls.RLStep(RL_CFG, rl, tx, _target_reward, eos_id=EOS, mesh=mesh)
  fn = rls.jit_rl_step(step, sh, None, None)
  rng = np.random.RandomState(0)
  batch = sharding.shard_batch(
      dict(prompt_tokens=rng.randint(3, VOCAB, size=(4, 5)).astype(np.int32),
           prompt_mask=np.ones((4, 5), np.int32), prompt_id=np.arange(4, dtype=np.int32)), mesh)
  start = jax.device_get(state.params)
  metrics = []
  for _ in range(n):
    state, m = fn(state, batch, jax.random.key(3), None)
    metrics.append(jax.device_get(m))
  return start, jax.device_get(state), metrics


def test_quantized_rl_step_trains_adapters_and_reference_is_the_quantized_base():
  start, state, (m1, m2) = _rl_steps((1, 1, 1))
  # One minibatch: step 1 measures the KL before its update, with B = 0. It is exactly 0
  # only if the implicit reference (adapters off) reads the policy's own quantized base.
  assert m1["rl/approx_kl"] == 0.0
  assert m2["rl/approx_kl"] > 0  # the adapters moved the policy away from the base
  assert all(np.isfinite(m[k]) for m in (m1, m2) for k in ("loss/policy", "reward/mean"))
  flat = tree_paths.flatten(start)
  moved = 0
  for path, value in tree_paths.flatten(state.params).items():
    if lora.is_trainable(path):
      moved += not np.array_equal(value, flat[path])
    else:
      jax.tree.map(np.testing.assert_array_equal, value, flat[path])
  assert moved > 0


def test_dpo_on_a_quantized_base_starts_at_log2_and_trains_adapters_only():
  from jaxrl_llm import tokenizers
  from jaxrl_llm.data import builders, pipeline, tasks
  from jaxrl_llm.preference import step as ps
  tok = tokenizers.load_tokenizer("builtin")
  cfg = testing.tiny_config("qwen3", vocab_size=tok.vocab_size, lora=qlora("int4"))
  rng = np.random.default_rng(0)
  pairs = [{"prompt": e["prompt"], "chosen": e["answer"],
            "rejected": builders.wrong_answer(e["answer"], rng)}
           for e in tasks.generate("arithmetic", "train", 8, 0)]
  batch = pipeline.make_batch(pairs, pipeline.DataConfig(
      source="preference_arithmetic", max_prompt_len=8, max_completion_len=5), tokenizer=tok)
  batch["pair_weight"] = np.ones((8,), np.float32)
  mesh = _mesh((1, 1, 1))
  tx = _tx()
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh)
  before = jax.device_get(state.params)
  step = ps.PreferenceStep(cfg, ps.PreferenceConfig(losses=(("dpo", 1.0),)), tx, mesh)
  fn = ps.jit_preference_step(step, sh)  # no ref_params: the adapters-off quantized base
  losses = []
  for i in range(2):
    state, m = fn(state, batch, jax.random.key(i), None)
    losses.append(float(m["loss/dpo"]))
  # Step 1: B = 0, the policy is its reference (the same quantized base): every margin is 0.
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)
  assert losses[1] != pytest.approx(np.log(2.0), abs=1e-6)
  after = tree_paths.flatten(jax.device_get(state.params))
  for path, value in tree_paths.flatten(before).items():
    if not lora.is_trainable(path):
      jax.tree.map(np.testing.assert_array_equal, value, after[path])


# ---------------------------------------------------------------------------
# Memory planner: the quantized base's bytes, exactly.
# ---------------------------------------------------------------------------
def test_memory_plan_counts_the_quantized_base_exactly():
  # int8 on one device, by hand: float32 leaves 4 B, codes 1 B, one float32 scale per layer and
  # output channel (o: D outputs; q: N·H; gate/up: F; down: D).
  cfg = testing.tiny_config("qwen2", lora=qlora("int8"))
  float_cfg = cfg.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))
  table = decoder.param_table(float_cfg)
  L, D, F, N, K, H = 2, 32, 64, 4, 2, 8
  outputs = {"q": N * H, "k": K * H, "v": K * H, "o": D, "gate": F, "up": F, "down": D}
  expected = sum(int(np.prod(shape)) * (1 if path.split("/")[-1] in lora.TARGETS else 4)
                 for path, (shape, _) in table.items()) + 4 * L * sum(outputs.values())
  plan = memory.plan_memory(cfg, (1, 1, 1), batch_size=8, seq_len=16, kv_cache_len=16,
                            reference=True, num_devices=1)
  assert plan.components["parameters"] == expected
  assert "reference params" not in plan.components
  float_plan = memory.plan_memory(float_cfg, (1, 1, 1), batch_size=8, seq_len=16,
                                  kv_cache_len=16, reference=True, num_devices=1)
  # The sampling copy keeps the codes: smaller than the float model's.
  assert (plan.components["rollout working set"]
          < float_plan.components["rollout working set"])
  # nf4 on 8 devices (fsdp 4 × tensor 2): the largest shard of every real array, 4-bit codes
  # at half a byte (packed), scales sharded like their weights where the sizes divide.
  cfg = testing.tiny_config("qwen2", lora=qlora("nf4"))
  mesh = _mesh((1, 4, 2))
  params = jax.jit(functools.partial(decoder.init_params, cfg),
                   out_shardings=param_shardings(cfg, mesh))(jax.random.key(0))
  per_device = lambda leaves: sum(max(s.data.size for s in x.addressable_shards)
                                  * quantize.bits(x.dtype) / 8 for x in leaves if x.ndim > 0)
  plan = memory.plan_memory(cfg, (1, 4, 2), batch_size=8, seq_len=16, num_devices=8)
  assert plan.components["parameters"] == per_device(jax.tree.leaves(params))
  adapters = jax.tree.leaves(lora.trainable_params(params))
  assert plan.components["optimizer state"] == 2 * per_device(adapters)  # Adam, adapters only
  assert per_device(jax.tree.leaves(params["layers"]["q"].qvalue)) == L * D * N * H / 2 / 8
