"""Cascade attention over a shared prompt (jaxrl_llm/models/shared_prefix.py):
the log-sum-exp merge, the cache's one prompt copy per group, and samples
equal to those of the contiguous cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import sampling
from jaxrl_llm.models import shared_prefix
from jaxrl_llm.sampling import sample
from jaxrl_llm.testing import tiny_config, tiny_params


def test_merge_of_two_key_sets_is_attention_over_their_union():
  kq, k1, v1, k2, v2 = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(kq, (3, 1, 4, 8))       # [B, T, N, H], 2 KV heads (GQA)
  ka, va = jax.random.normal(k1, (3, 5, 2, 8)), jax.random.normal(v1, (3, 5, 2, 8))
  kb, vb = jax.random.normal(k2, (3, 6, 2, 8)), jax.random.normal(v2, (3, 6, 2, 8))
  len_a, len_b = jnp.array([5, 2, 4]), jnp.array([1, 6, 3])
  o_a, lse_a = jax.nn.dot_product_attention(q, ka, va, key_value_seq_lengths=len_a,
                                            return_residual=True)
  o_b, lse_b = jax.nn.dot_product_attention(q, kb, vb, key_value_seq_lengths=len_b,
                                            return_residual=True)
  merged = shared_prefix.merge(o_a, lse_a, o_b, lse_b)
  # Reference: one softmax over the valid keys of both sets, in float64.
  q64, ka64, va64, kb64, vb64 = (np.asarray(x, np.float64) for x in (q, ka, va, kb, vb))
  for i in range(3):
    k = np.concatenate([ka64[i, :len_a[i]], kb64[i, :len_b[i]]])  # [S, K, H]
    v = np.concatenate([va64[i, :len_a[i]], vb64[i, :len_b[i]]])
    k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)      # query head n uses KV head n // 2
    s = np.einsum("nh,snh->ns", q64[i, 0], k) / np.sqrt(8)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(merged[i, 0], np.einsum("ns,snh->nh", p, v), atol=1e-5)


def test_the_cache_keeps_one_prompt_copy_per_group_packed_to_the_front():
  cfg = tiny_config("llama")
  params = tiny_params(cfg)
  toks = jnp.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], jnp.int32)
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  _, cache, _ = sampling.prefill(cfg, params, toks, mask, cache_size=5 + 6, group_size=3,
                                 shared_prefix_attention=True)
  _, plain, _ = sampling.prefill(cfg, params, toks, mask, cache_size=5, group_size=1)
  assert isinstance(cache, shared_prefix.SharedPrefixCache) and cache.group_size == 3
  assert cache.prefix_k[0].shape[:2] == (2, 5) and cache.k[0].shape[:2] == (6, 6)
  np.testing.assert_array_equal(cache.prefix_len_R, [3, 5])
  # Prompt 0's 3 tokens sit at slots 2..4 of the left-padded cache, 0..2 here.
  np.testing.assert_array_equal(cache.prefix_k[0][0, :3], plain["k"][0][0, 2:])
  np.testing.assert_array_equal(cache.prefix_v[1][1], plain["v"][1][1])
  assert cache.rows_in_order  # every output row, in order, until a compaction


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_samples_equal_the_contiguous_cache(family):
  """Ragged prompts, G = 4, a larger cache than needed, sampling at T = 1.3:
  the same tokens and log-probs with and without the shared prefix."""
  cfg = tiny_config(family)
  params = tiny_params(cfg)
  rng = np.random.default_rng(0)
  lengths = np.array([2, 7, 4])
  toks = rng.integers(3, cfg.vocab_size, size=(3, 7)).astype(np.int32)
  mask = (np.arange(7)[None, :] >= 7 - lengths[:, None]).astype(np.int32)
  kw = dict(max_new_tokens=6, group_size=4, temperature=1.3, cache_size=7 + 9)
  outs = [sample(cfg, params, jnp.asarray(toks * mask), jnp.asarray(mask), jax.random.key(2),
                 shared_prefix_attention=c, **kw) for c in (False, True)]
  np.testing.assert_array_equal(outs[0].tokens_BL, outs[1].tokens_BL)
  np.testing.assert_allclose(outs[0].logprobs_BL, outs[1].logprobs_BL, atol=1e-5)
  assert len(np.unique(np.asarray(outs[1].tokens_BL))) > 3  # not a degenerate sample


def test_errors_name_the_problem():
  cfg = tiny_config("llama")
  params = tiny_params(cfg)
  toks = jnp.array([[3, 4]], jnp.int32)
  _, cache, _ = sampling.prefill(cfg, params, toks, jnp.ones_like(toks), cache_size=6,
                                 group_size=2, shared_prefix_attention=True)
  with pytest.raises(ValueError, match="leaves no completion slot"):
    sampling.prefill(cfg, params, toks, jnp.ones_like(toks), cache_size=2, group_size=2,
                     shared_prefix_attention=True)
  with pytest.raises(ValueError, match="one token per row"):
    shared_prefix.forward(cfg, params, jnp.zeros((2, 2), jnp.int32),
                          jnp.zeros((2, 2), jnp.int32), jnp.arange(2), cache)


def test_rows_in_order_reshape_equals_the_scatter_and_compaction_clears_it():
  cfg = tiny_config("qwen3")
  kq, kp, kv, ks, kt = jax.random.split(jax.random.key(1), 5)
  R, G, P, L, K, N, H = 2, 3, 5, 4, cfg.num_kv_heads, cfg.num_heads, cfg.resolved_head_dim
  q = jax.random.normal(kq, (R * G, 1, N, H))
  prefix_k, prefix_v = jax.random.normal(kp, (R, P, K, H)), jax.random.normal(kv, (R, P, K, H))
  k, v = jax.random.normal(ks, (R * G, L, K, H)), jax.random.normal(kt, (R * G, L, K, H))
  args = (cfg, q, prefix_k, prefix_v, jnp.array([3, 5]), k, v, 2, jnp.arange(R * G), G)
  np.testing.assert_allclose(shared_prefix.cascade_attention(*args, rows_in_order=True),
                             shared_prefix.cascade_attention(*args, rows_in_order=False),
                             atol=1e-6)
  params = tiny_params(cfg)
  toks = jnp.array([[3, 4]], jnp.int32)
  _, cache, _ = sampling.prefill(cfg, params, toks, jnp.ones_like(toks), cache_size=6,
                                 group_size=2, shared_prefix_attention=True)
  assert cache.rows_in_order
  assert not shared_prefix.take_rows(cache, jnp.array([1])).rows_in_order
