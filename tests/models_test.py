"""Decoder invariants: cached == full forward, packing, causality, remat, log-probs."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import testing
from jaxrl_llm.models import (
  ModelConfig,
  decoder,
  forward,
  forward_with_cache,
  hidden_states,
  init_cache,
  param_logical_axes,
  param_shapes,
  token_logprobs,
)
from jaxrl_llm.models.decoder import decode_params, positions_from_segments


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def model(request):
  cfg = testing.tiny_config(request.param)
  return cfg, testing.tiny_params(cfg)


def test_param_table_matches_init(model):
  cfg, params = model
  shapes = param_shapes(cfg)
  axes = param_logical_axes(cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  for s, p, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(params),
                     jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    assert s.shape == p.shape and len(a) == p.ndim
  assert sum(p.size for p in jax.tree.leaves(params)) == cfg.num_params()


def test_causal(model):
  cfg, params = model
  toks = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  changed = toks.at[:, 6:].set((toks[:, 6:] + 1) % cfg.vocab_size)
  a, b = forward(cfg, params, toks), forward(cfg, params, changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_cached_prefill_and_decode_equal_full_forward(model):
  cfg, params = model
  T = 9
  toks = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
  full = forward(cfg, params, toks)
  cache = init_cache(cfg, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(T), (2, T))
  valid = jnp.ones((2, T), bool)
  logits, cache = forward_with_cache(cfg, params, toks[:, :5], pos[:, :5], valid[:, :5], cache)
  outs = [logits]
  for t in range(5, T):
    logits, cache = forward_with_cache(cfg, params, toks[:, t:t + 1], pos[:, t:t + 1],
                                       valid[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == T
  # One k and one v buffer per layer, so decoding updates and reads them in place.
  assert len(cache["k"]) == len(cache["v"]) == cfg.num_layers
  assert cache["k"][0].shape == (2, 16, cfg.num_kv_heads, cfg.resolved_head_dim)


def test_decode_params_cast_split_and_give_the_same_logits(model):
  cfg, params = model
  dp = decode_params(cfg, params)
  assert decode_params(cfg, dp) is dp  # idempotent
  assert isinstance(dp["layers"], tuple) and len(dp["layers"]) == cfg.num_layers
  for i, layer in enumerate(dp["layers"]):
    np.testing.assert_array_equal(layer["q"], params["layers"]["q"][i])
  toks = jax.random.randint(jax.random.key(5), (2, 6), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  valid = jnp.ones((2, 6), bool)
  a, _ = forward_with_cache(cfg, params, toks, pos, valid, init_cache(cfg, 2, 8))
  b, _ = forward_with_cache(cfg, dp, toks, pos, valid, init_cache(cfg, 2, 8))
  np.testing.assert_array_equal(a, b)
  # bf16 compute: matmul weights cast once, norm weights kept as stored.
  bf = cfg.replace(dtype="bfloat16")
  dp16 = decode_params(bf, params)
  assert dp16["layers"][0]["q"].dtype == jnp.bfloat16 and dp16["embed"].dtype == jnp.bfloat16
  assert dp16["layers"][0]["attn_norm"].dtype == dp16["final_norm"].dtype == jnp.float32
  a, _ = forward_with_cache(bf, params, toks, pos, valid, init_cache(bf, 2, 8))
  b, _ = forward_with_cache(bf, dp16, toks, pos, valid, init_cache(bf, 2, 8))
  np.testing.assert_array_equal(a, b)


def test_left_padding_equals_unpadded(model):
  cfg, params = model
  toks = jax.random.randint(jax.random.key(3), (1, 6), 1, cfg.vocab_size)
  ref = forward(cfg, params, toks)
  padded = jnp.concatenate([jnp.zeros((1, 3), toks.dtype), toks], axis=1)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
  out = forward(cfg, params, padded, segment_ids_BT=seg)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5, rtol=1e-5)


def test_packing_equals_separate(model):
  cfg, params = model
  a = jax.random.randint(jax.random.key(4), (1, 4), 1, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(5), (1, 5), 1, cfg.vocab_size)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), a.dtype)], axis=1)
  seg = jnp.array([[1] * 4 + [2] * 5 + [0] * 2])
  out = forward(cfg, params, packed, segment_ids_BT=seg)
  np.testing.assert_allclose(out[:, :4], forward(cfg, params, a), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 4:9], forward(cfg, params, b), atol=1e-5, rtol=1e-5)


def test_positions_from_segments():
  seg = jnp.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]])


def test_attention_remat_policy_keeps_the_fused_forward_and_weight_dots():
  policy = decoder._REMAT["dots_no_batch_attention"]
  for name in ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"):
    assert policy(SimpleNamespace(name=name))
  assert not policy(SimpleNamespace(name="dot_product_attention_bwd"))
  assert not policy(SimpleNamespace(name="exp"))
  # A weight matmul (no batch dims) is saved, as under dots_no_batch.
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  eqn = jax.make_jaxpr(jnp.dot)(x, w).jaxpr.eqns[0]
  assert policy(eqn.primitive, x, w, **eqn.params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch_attention"])
def test_remat_and_unrolled_layers_same_grads(remat):
  cfg = testing.tiny_config("llama")
  params = testing.tiny_params(cfg)
  toks = jax.random.randint(jax.random.key(6), (2, 8), 0, cfg.vocab_size)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(forward(c, p, toks))[..., 0])

  ref = jax.grad(loss)(params, cfg)
  for variant in (cfg.replace(remat=remat), cfg.replace(scan_layers=False)):
    g = jax.grad(loss)(params, variant)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), ref, g)


@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_chunked_token_logprobs_equal_full_log_softmax(chunk):
  cfg = testing.tiny_config("qwen2", tie_embeddings=True)
  params = testing.tiny_params(cfg)
  toks = jax.random.randint(jax.random.key(7), (2, 10), 0, cfg.vocab_size)
  h = hidden_states(cfg, params, toks[:, :-1])
  logp, ent = token_logprobs(cfg, params, h, toks[:, 1:], chunk_size=chunk,
                             temperature=0.7, with_entropy=True)
  full = jax.nn.log_softmax(forward(cfg, params, toks[:, :-1]) / 0.7)
  ref = jnp.take_along_axis(full, toks[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(logp, ref, atol=1e-5)
  np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(full) * full, -1), atol=1e-5)


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr, inside scans, checkpoints and custom rules too."""
  from jax.extend import core as jcore
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from _dot_generals(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from _dot_generals(sub)


@pytest.mark.parametrize("tie", [True, False])
def test_float32_logprob_head_keeps_the_accumulator_and_a_bf16_backward(tie):
  cfg = testing.tiny_config("qwen2", tie_embeddings=tie).replace(dtype="bfloat16")
  params = testing.tiny_params(cfg)
  toks = jax.random.randint(jax.random.key(7), (2, 10), 0, cfg.vocab_size)
  h_BTD, tgt = hidden_states(cfg, params, toks[:, :-1]), toks[:, 1:]
  assert h_BTD.dtype == jnp.bfloat16
  f32_head = cfg.replace(float32_logprob_head=True)
  # The same bf16 operands multiplied in float32: what the float32 head computes.
  w_DV = (params["embed"].T if tie else params["lm_head"]).astype(jnp.bfloat16)
  exact = jnp.einsum("BTD,DV->BTV", h_BTD.astype(jnp.float32), w_DV.astype(jnp.float32))
  ref = jnp.take_along_axis(jax.nn.log_softmax(exact), tgt[..., None], -1)[..., 0]
  new = token_logprobs(f32_head, params, h_BTD, tgt, chunk_size=4)
  old = token_logprobs(cfg, params, h_BTD, tgt, chunk_size=4)
  err_new, err_old = float(jnp.max(jnp.abs(new - ref))), float(jnp.max(jnp.abs(old - ref)))
  assert err_new * 100 < err_old, (err_new, err_old)  # the bf16 logits' rounding is gone

  def loss(p, h, c):
    return jnp.sum(token_logprobs(c, p, h, tgt, chunk_size=4) * jnp.arange(9.0))
  grads = jax.grad(loss, argnums=(0, 1))
  (gp_new, gh_new), (gp_old, gh_old) = grads(params, h_BTD, f32_head), grads(params, h_BTD, cfg)
  head = "embed" if tie else "lm_head"
  for a, b in ((gp_new[head], gp_old[head]), (gh_new, gh_old)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=0.02 * np.abs(b).max())
  # The backward's products take bf16 operands (an f32 cotangent would make them f32 GEMMs).
  jaxpr = jax.make_jaxpr(grads, static_argnums=2)(params, h_BTD, f32_head).jaxpr
  dots = list(_dot_generals(jaxpr))
  assert len(dots) >= 3
  for eqn in dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn


def test_bf16_compute_close_to_fp32():
  cfg = testing.tiny_config("llama")
  params = testing.tiny_params(cfg)
  toks = jax.random.randint(jax.random.key(8), (2, 8), 0, cfg.vocab_size)
  ref = forward(cfg, params, toks)
  out = forward(cfg.replace(dtype="bfloat16"), params, toks)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


@pytest.mark.parametrize("bad, msg", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(family="gpt2"), "family"),
    (dict(dtype="int8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors(bad, msg):
  base = dict(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
              intermediate_size=16)
  base.update(bad)
  with pytest.raises(ValueError, match=msg):
    ModelConfig(**base)


def test_cache_expand_and_take_rows_equal_a_prefill_per_row():
  """Prefill R prompts once, copy each to G rows (and later keep some rows):
  decoding then equals a cache prefilled on every row separately."""
  from jaxrl_llm.models.decoder import cache_expand, cache_take_rows
  cfg = testing.tiny_config("qwen2")
  params = testing.tiny_params(cfg)
  R, G, P = 2, 3, 5
  toks = jax.random.randint(jax.random.key(9), (R, P), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(P), (R, P))
  valid = jnp.ones((R, P), bool).at[0, :2].set(False)  # left padding on prompt 0
  _, once = forward_with_cache(cfg, params, toks, pos, valid, init_cache(cfg, R, P))
  once = cache_expand(once, G, 8)
  rep = lambda x: jnp.repeat(x, G, axis=0)
  _, each = forward_with_cache(cfg, params, rep(toks), rep(pos), rep(valid),
                               init_cache(cfg, R * G, 8))
  np.testing.assert_array_equal(once["valid"], each["valid"])
  # Slots of left padding are never attended (their keys hold whatever an
  # all-masked query produced); every valid slot matches.
  live = np.asarray(each["valid"])[:, :, None, None]
  for a, b in zip(once["k"] + once["v"], each["k"] + each["v"]):
    np.testing.assert_allclose(np.where(live, a, 0), np.where(live, b, 0), atol=1e-6)
  nxt = jax.random.randint(jax.random.key(10), (R * G, 1), 0, cfg.vocab_size)
  step_pos = jnp.full((R * G, 1), P)
  a, _ = forward_with_cache(cfg, params, nxt, step_pos, jnp.ones((R * G, 1), bool), once)
  rows = jnp.array([4, 1])
  kept = cache_take_rows(once, rows)
  assert kept["k"][0].shape[0] == 2 and int(kept["index"]) == P
  b, _ = forward_with_cache(cfg, params, nxt[rows], step_pos[rows], jnp.ones((2, 1), bool),
                            kept)
  np.testing.assert_allclose(b, a[rows], atol=1e-5)
  with pytest.raises(ValueError, match="max_len"):
    cache_expand(init_cache(cfg, 1, 8), 2, 4)



def test_the_float32_head_is_reachable_from_a_config_file():
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import trainer
  cd = config_lib.default_configdict()
  cd.model.float32_logprob_head = True
  cfg = config_lib.from_configdict(cd)
  model_cfg = trainer.model_config(cfg, tokenizer=SimpleNamespace(vocab_size=64))
  assert model_cfg.float32_logprob_head
