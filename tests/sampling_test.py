"""Sampler: cached decode vs full forward, greedy, top-k/top-p, determinism, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import testing
from jaxrl_llm.models import forward
from jaxrl_llm.sampling import process_logits, sample

CFG = testing.tiny_config("qwen3")
PARAMS = testing.tiny_params(CFG)


def _prompts():
  toks = jnp.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], jnp.int32)
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  return toks, mask


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "temperature", "top_k",
                                             "top_p", "stop_tokens"))
def _gen(params, toks, mask, rng, **kw):
  return sample(CFG, params, toks, mask, rng, **kw)


def test_logprobs_match_full_forward_of_the_sampled_sequence():
  toks, mask = _prompts()
  out = _gen(PARAMS, toks, mask, jax.random.key(0), max_new_tokens=6)
  assert out.tokens_BL.shape == (2, 6)
  for b in range(2):
    real = np.asarray(toks[b])[np.asarray(mask[b]) == 1]
    seq = jnp.concatenate([jnp.asarray(real), out.tokens_BL[b]])[None]
    logp = jax.nn.log_softmax(forward(CFG, PARAMS, seq), -1)[0]
    P = len(real)
    expected = logp[np.arange(P - 1, P + 5), out.tokens_BL[b]]
    np.testing.assert_allclose(out.logprobs_BL[b], expected, atol=1e-4)


def test_greedy_is_argmax_of_full_forward_and_low_temperature_equals_greedy():
  toks, mask = _prompts()
  greedy = _gen(PARAMS, toks, mask, jax.random.key(0), max_new_tokens=5, greedy=True)
  seq = jnp.concatenate([toks[1:], greedy.tokens_BL[1:]], axis=1)
  logits = forward(CFG, PARAMS, seq)
  np.testing.assert_array_equal(jnp.argmax(logits[0, 4:9], -1), greedy.tokens_BL[1])
  cold = _gen(PARAMS, toks, mask, jax.random.key(3), max_new_tokens=5, temperature=1e-6)
  np.testing.assert_array_equal(cold.tokens_BL, greedy.tokens_BL)


def test_same_rng_same_samples_different_rng_different():
  toks, mask = _prompts()
  a = _gen(PARAMS, toks, mask, jax.random.key(1), max_new_tokens=8)
  b = _gen(PARAMS, toks, mask, jax.random.key(1), max_new_tokens=8)
  c = _gen(PARAMS, toks, mask, jax.random.key(2), max_new_tokens=8)
  np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
  assert not np.array_equal(a.tokens_BL, c.tokens_BL)


def test_stop_tokens_end_rows_and_mask_after():
  toks, mask = _prompts()
  greedy = _gen(PARAMS, toks, mask, jax.random.key(0), max_new_tokens=6, greedy=True)
  stop = int(greedy.tokens_BL[0, 2])
  out = _gen(PARAMS, toks, mask, jax.random.key(0), max_new_tokens=6, greedy=True,
             stop_tokens=(stop,))
  row = np.asarray(out.tokens_BL[0])
  first = int(np.argmax(row == stop))
  assert int(out.lengths_B[0]) == first + 1 and bool(out.finished_B[0])
  np.testing.assert_array_equal(out.mask_BL[0], (np.arange(6) <= first).astype(np.float32))
  assert np.all(row[first + 1:] == 0)
  np.testing.assert_array_equal(out.logprobs_BL[0, first + 1:], 0.0)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.3), (5, 0.5)])
def test_topk_topp_never_emit_excluded_tokens(top_k, top_p):
  logits = jax.random.normal(jax.random.key(4), (4, CFG.vocab_size)) * 3
  processed = process_logits(logits, top_k=top_k, top_p=top_p)
  allowed = processed > -1e29
  # Reference: keep the top-k, then the smallest prefix of sorted probs reaching top_p.
  for b in range(4):
    order = np.argsort(-np.asarray(logits[b]))
    keep = set(order[:top_k]) if top_k else set(order)
    probs = np.exp(np.asarray(logits[b])[order] - np.max(logits[b]))
    kept_probs = np.where([o in keep for o in order], probs, 0.0)
    kept_probs /= kept_probs.sum()
    cum = np.cumsum(kept_probs) - kept_probs
    nucleus = {o for o, c, k in zip(order, cum, kept_probs) if c < top_p and k > 0}
    assert set(np.nonzero(np.asarray(allowed[b]))[0]) == nucleus
  draws = jax.random.categorical(jax.random.key(5), processed[:, None, :], shape=(4, 500))
  assert bool(jnp.all(jnp.take_along_axis(allowed, draws, axis=1)))


def test_sampled_tokens_respect_top_k():
  toks, mask = _prompts()
  out = _gen(PARAMS, toks, mask, jax.random.key(6), max_new_tokens=6, top_k=2)
  seq = jnp.concatenate([toks[1:], out.tokens_BL[1:]], axis=1)
  top2 = jax.lax.top_k(forward(CFG, PARAMS, seq)[0, 4:10], 2)[1]
  assert bool(jnp.all(jnp.any(top2 == out.tokens_BL[1][:, None], axis=1)))


def test_prompt_longer_than_cache_is_a_clear_error():
  toks, mask = _prompts()
  with pytest.raises(ValueError, match="exceeds the KV cache size"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=8, cache_size=10)
  with pytest.raises(ValueError, match="temperature"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, temperature=0.0)
