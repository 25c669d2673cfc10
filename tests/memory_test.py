"""The memory planner: exact parameter / optimizer shards, golden formulas, check_fits."""
import jax
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import memory, optim, sharding, testing
from jaxrl_llm.models import ModelConfig, decoder
from jaxrl_llm.train_state import TrainState, state_shardings

CFG = testing.tiny_config("qwen3", vocab_size=50, hidden_size=32, intermediate_size=64)
# Qwen2.5-7B-like shapes: large enough that every term matters.
BIG = ModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                  num_kv_heads=4, intermediate_size=18944, qkv_bias=True, family="qwen2",
                  dtype="bfloat16", remat="full")


def _shard_bytes(abstract, shardings):
  """Bytes of one device's shard of every leaf, from the shardings training uses."""
  return sum(int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
             for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 1), (1, 4, 2), (8, 1, 1), (2, 2, 2)])
def test_parameter_and_optimizer_bytes_equal_the_real_shards(shape):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape), jax.devices()[:int(np.prod(shape))])
  params = decoder.param_shapes(CFG)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params), extra={})
  shardings = state_shardings(abstract, CFG, mesh)  # what create_train_state uses
  plan = memory.plan_memory(CFG, shape, batch_size=8, seq_len=16)
  assert plan.components["parameters"] == _shard_bytes(abstract.params, shardings.params)
  # Adam's two moments, like the params; the optimizer's scalar counters are not counted.
  opt = _shard_bytes(abstract.opt_state, shardings.opt_state)
  assert 0 <= opt - plan.components["optimizer state"] <= 64


def test_golden_values_of_the_formulas():
  """Hand-computed terms for BIG on fsdp=8 (bf16 compute, f32 params, remat full)."""
  plan = memory.plan_memory(BIG, (1, -1, 1), num_devices=8, batch_size=16, group_size=8,
                            seq_len=1280, kv_cache_len=1280, prefill_len=256, reference=True,
                            microbatches=8)
  c = plan.components
  n = BIG.num_params()
  # Every weight has an `embed` axis sharded 8 ways except the norms and biases (replicated).
  replicated = 28 * (2 * 3584 + (28 + 2 * 4) * 128) + 3584
  p_elems = (n - replicated) / 8 + replicated
  assert c["parameters"] == pytest.approx(4 * p_elems)
  assert c["optimizer state"] == pytest.approx(2 * 4 * p_elems)  # two float32 moments
  assert c["gradients"] == pytest.approx(2 * 4 * p_elems)
  assert c["reference params"] == c["parameters"]
  # k and v: 2 × L × r × S × K × H × 2 bytes, r = 128 rollout rows / 8 devices.
  assert c["KV cache"] == 2 * 28 * 16 * 1280 * 4 * 128 * 2
  # remat "full": L × b·T·D·c saved + one layer's working set + the log-prob head chunk;
  # b = 128 rows / 8 micro-batches / 8 devices = 2.
  b, T, D, F, N, K, H, V = 2, 1280, 3584, 18944, 28, 4, 128, 152064
  layer = b * T * 2 * (6 * D + (2 * N + 3 * K) * H + 5 * F) + b * N * T * T * 6
  assert c["activations"] == pytest.approx(28 * b * T * D * 2 + layer + 3 * b * 512 * V * 4)
  assert plan.peak_bytes == pytest.approx(
      plan.static_bytes + max(c["KV cache"] + c["rollout working set"],
                              c["gradients"] + c["activations"]))
  assert 20 * memory.GiB < plan.peak_bytes < 30 * memory.GiB


def test_activations_follow_remat_microbatches_and_tensor_parallelism():
  def act(model=BIG, mesh=(1, 8, 1), **kw):
    kw = dict(dict(batch_size=64, seq_len=1024, microbatches=1), **kw)
    return memory.plan_memory(model, mesh, **kw).components["activations"]
  remats = [act(BIG.replace(remat=r)) for r in ("none", "dots", "dots_no_batch", "full")]
  assert remats == sorted(remats, reverse=True) and remats[0] > 3 * remats[-1]
  assert act(microbatches=4) == pytest.approx(act() / 4, rel=1e-9)
  # Same rows per device (64 / 4 = 128 / 8); tensor parallelism halves heads and mlp.
  assert act(mesh=(1, 4, 2)) < 0.8 * act(mesh=(1, 8, 1), batch_size=128)
  # No KV cache without a rollout; the cache scales with its length and dtype.
  assert "KV cache" not in memory.plan_memory(BIG, (1, 8, 1), batch_size=8,
                                              seq_len=64).components
  kv = lambda **kw: memory.plan_memory(BIG, (1, 8, 1), batch_size=8, seq_len=64,
                                       **kw).components["KV cache"]
  assert kv(kv_cache_len=2048) == 2 * kv(kv_cache_len=1024)
  assert kv(kv_cache_len=1024, kv_cache_dtype="float32") == 2 * kv(kv_cache_len=1024)


def test_kept_attention_forward_is_counted():
  # W1's update on one device: 16 micro-batches of 32 rows, 768 tokens, Qwen2.5-0.5B
  # (24 layers, 14 heads of 64). Kept per layer: the bf16 output and float32 statistics.
  model = ModelConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                      num_kv_heads=2, intermediate_size=4864, qkv_bias=True, family="qwen2",
                      dtype="bfloat16", tie_embeddings=True)
  act = lambda remat: memory.plan_memory(model.replace(remat=remat), (1, 1, 1), batch_size=64,
                                         seq_len=768, group_size=8, microbatches=16,
                                         num_devices=1).components["activations"]
  extra = act("dots_no_batch_attention") - act("dots_no_batch")
  assert extra == pytest.approx(24 * 32 * 768 * 14 * (64 * 2 + 4))
  assert 0.9 * 2**30 < extra < 1.1 * 2**30  # W1 measured +1.02 GiB of peak (BENCHMARKS.md)


def test_check_fits_raises_with_the_numbers():
  plan = memory.plan_memory(BIG, (1, -1, 1), num_devices=8, batch_size=16, group_size=8,
                            seq_len=1280, kv_cache_len=1280, reference=True, microbatches=8)
  assert memory.check_fits(plan, 80 * memory.GiB) is plan
  with pytest.raises(memory.MemoryPlanError) as e:
    memory.check_fits(plan, 16 * memory.GiB)
  msg = str(e.value)
  assert "does not fit" in msg and "14.40 GiB usable (90% of 16.00 GiB)" in msg
  assert f"{plan.peak_bytes / memory.GiB:.2f} GiB" in msg
  assert "Largest: optimizer state" in msg and "fsdp" in msg  # names the component and a remedy
  assert "peak (estimate)" in msg  # the table is part of the message
  long = memory.plan_memory(BIG.replace(remat="none"), (1, 8, 1), batch_size=64, seq_len=4096)
  with pytest.raises(memory.MemoryPlanError, match="Largest: activations.*remat='full'"):
    memory.check_fits(long, 80 * memory.GiB)


def test_table_and_validation():
  plan = memory.plan_memory(CFG, sharding.mesh_preset("fsdp_tensor"), num_devices=8,
                            batch_size=8, group_size=4, seq_len=24, kv_cache_len=24,
                            description="tiny")
  table = plan.table()
  assert "mesh data=1 fsdp=4 tensor=2 (8 devices): tiny" in table
  for name in plan.components:
    assert name in table
  assert "peak (estimate)" in table
  with pytest.raises(ValueError, match="optimizer='lamb'"):
    memory.plan_memory(CFG, batch_size=8, seq_len=8, optimizer="lamb")
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    memory.plan_memory(CFG, batch_size=0, seq_len=8)
  with pytest.raises(ValueError, match="not num_devices=4"):
    memory.plan_memory(CFG, (1, 8, 1), num_devices=4, batch_size=8, seq_len=8)


def test_plan_for_experiment_reads_the_config():
  c = config_lib.default_configdict(kind="rl", rl_preset="grpo")
  c.model.builtin = "nano"
  c.data.batch_size, c.data.max_prompt_len, c.rl.group_size, c.rl.max_new_tokens = 16, 12, 8, 6
  cfg = config_lib.from_configdict(c)
  model = config_lib.builtin_model_config(cfg.model, 64)
  plan = memory.plan_for_experiment(cfg, model, num_devices=8)
  same = memory.plan_memory(model, (1, 8, 1), batch_size=16, group_size=8, seq_len=18,
                            kv_cache_len=18, prefill_len=12, reference=cfg.rl.needs_reference)
  assert plan.components == same.components
  sft = memory.plan_for_experiment(config_lib.from_configdict(
      config_lib.default_configdict(kind="sft")), model, num_devices=8)
  assert "KV cache" not in sft.components
  c.rl.update_shared_prompt = True  # counted per row: an upper bound, and the plan says so
  shared = memory.plan_for_experiment(config_lib.from_configdict(c), model, num_devices=8)
  assert shared.components == plan.components
  assert any("upper bound" in n for n in shared.notes)
  assert not any("upper bound" in n for n in plan.notes)
