"""Sharded forward/gradients equal one device; rules; micro-batching is exact."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm import sharding, testing
from jaxrl_llm.models import forward
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import create_train_state, param_shardings

CFG = testing.tiny_config("qwen2", hidden_size=64, num_heads=4, num_kv_heads=2,
                          intermediate_size=128)


def _loss(params, tokens):
  logits = forward(CFG, params, tokens)
  return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3])


@functools.lru_cache(maxsize=None)
def _reference():
  params = testing.tiny_params(CFG)
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, CFG.vocab_size)
  return params, tokens, jax.device_get(forward(CFG, params, tokens)), jax.device_get(
      jax.grad(_loss)(params, tokens))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_forward_and_grads_on_mesh_equal_one_device(shape):
  params, tokens, ref_logits, ref_grads = _reference()
  mesh = sharding.make_mesh(sharding.MeshConfig(shape))
  p_sh = param_shardings(CFG, mesh)
  params = jax.device_put(params, p_sh)
  tokens = sharding.shard_batch(np.asarray(tokens), mesh)

  def fwd(p, t):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return forward(CFG, p, t)

  def grad(p, t):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return jax.grad(_loss)(p, t)

  logits = jax.jit(fwd)(params, tokens)
  grads = jax.jit(grad, out_shardings=p_sh)(params, tokens)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(grads), ref_grads)
  # Parameters really are split: the tensor axis shards heads, fsdp the embed dim.
  q_spec = p_sh["layers"]["q"].spec
  if shape[2] > 1:
    assert q_spec[2] == "tensor"
  if shape[1] > 1:
    assert q_spec[1] == "fsdp"


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 2, 4)))
  # 2 kv heads cannot split over tensor=4: replicated on that axis instead of failing.
  spec = sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"),
                                  sharding.DEFAULT_RULES, mesh, (2, 64, 2, 16))
  assert spec == P(None, "fsdp", None, None)
  with pytest.raises(ValueError, match="mesh axis"):
    sharding.MeshConfig((1, -1, 1), rules=(("embed", "model"),))
  with pytest.raises(ValueError, match="devices"):
    sharding.resolve_mesh_shape((3, 1, 1), 8)


def test_sft_microbatches_equal_one_batch():
  """Gradient accumulation weights tokens exactly: 1 vs 4 micro-batches, same update.

  Plain SGD, so the update is linear in the gradient (Adam's first step is
  sign-like and would turn rounding-level differences into ±lr).
  """
  tx = optax.sgd(1.0)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, CFG.vocab_size, (8, 10)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[:, 7:] = 0
  seg[0, 4:] = 2  # a packed row
  loss_mask = (rng.rand(8, 10) > 0.3).astype(np.int32) * (seg > 0)
  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=loss_mask)
  out = []
  for micro in (1, 4):
    state, _ = create_train_state(CFG, tx, jax.random.key(0), mesh)
    step = jax.jit(functools.partial(sft_step, cfg=CFG, tx=tx, microbatches=micro))
    state, metrics = step(state, batch, None)
    out.append((jax.device_get(state.params), float(metrics["loss/nll"])))
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               out[0][0], out[1][0])


@pytest.mark.parametrize("shape,heads_split", [((2, 2, 2), True), ((1, 2, 4), False)])
def test_attention_runs_per_shard_and_equals_one_device(shape, heads_split):
  """Under a mesh, `decoder.attention` runs as a shard_map over rows and heads
  (heads only where the tensor axis divides the key/value heads too): outputs,
  log-sum-exps and gradients equal the unsharded call, with a mask and with
  key lengths."""
  from jaxrl_llm.models import decoder
  B, T, S, N, K, H = 8, 3, 7, 4, 2, 16
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, N, H))
  k, v = (jax.random.normal(x, (B, S, K, H)) for x in ks[1:3])
  mask = jax.random.bernoulli(ks[3], 0.7, (B, T, S)).at[:, :, 0].set(True)
  kv_len = jnp.arange(B, dtype=jnp.int32) % S + 1
  mesh = sharding.make_mesh(sharding.MeshConfig(shape))

  def run(q, k, v, mask, kv_len):
    o, lse = decoder.attention(CFG, q, k, v, mask, kv_len, return_residual=True)
    return jnp.sum(o * o) + jnp.sum(lse), (o, lse)

  ref_grads, (ref_o, ref_lse) = jax.grad(run, argnums=(0, 1, 2), has_aux=True)(
      q, k, v, mask, kv_len)

  def sharded(*args):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return jax.grad(run, argnums=(0, 1, 2), has_aux=True)(*args)

  closed = jax.make_jaxpr(sharded)(q, k, v, mask, kv_len)
  q_specs = [e.params["in_specs"][0] for e in closed.jaxpr.eqns
             if e.primitive.name == "shard_map"]
  assert q_specs, "attention did not run as a shard_map under the mesh"
  assert all((q_spec[2] is not None) == heads_split for q_spec in q_specs), q_specs
  grads, (o, lse) = jax.jit(sharded)(q, k, v, mask, kv_len)
  np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_policy_sees_the_attention_inside_its_shard_map():
  """A layer's checkpoint policy (e.g. remat="dots_no_batch_attention", which keeps the
  fused attention's forward) is asked about the primitives inside the attention's
  shard_map, not about the shard_map as one opaque call."""
  from jaxrl_llm.models import decoder
  mesh = sharding.make_mesh(sharding.MeshConfig((2, 2, 2)))
  q, kv = jnp.ones((4, 8, 4, 16)), jnp.ones((4, 8, 2, 16))
  seen = []

  def policy(prim, *_, **__):
    seen.append(prim.name)
    return False

  def loss(q, k, v):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return jnp.sum(decoder.attention(CFG, q, k, v))

  closed = jax.make_jaxpr(jax.grad(jax.checkpoint(loss, policy=policy)))(q, kv, kv)
  assert "shard_map" in str(closed)  # the attention did run as a shard_map
  assert "shard_map" not in seen and {"dot_general", "exp"} <= set(seen), sorted(set(seen))
