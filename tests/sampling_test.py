"""Sampler: cached decode vs full forward, greedy, top-k/top-p, determinism, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import sampling, testing
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


# ---------------------------------------------------------------------------
# The rollout engine: shared-prefix prefill, compaction, budget, processors.
# ---------------------------------------------------------------------------
_ENGINE_STATIC = ("max_new_tokens", "greedy", "temperature", "stop_tokens", "group_size",
                  "compaction_min_rows", "logits_processor", "top_k", "shared_prefix_attention",
                  "categorical")


@functools.partial(jax.jit, static_argnames=_ENGINE_STATIC)
def _engine(params, toks, mask, rng, max_len=None, **kw):
  return sample(CFG, params, toks, mask, rng, max_len=max_len, **kw)


def _assert_same_samples(a, b, atol=1e-5):
  np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
  np.testing.assert_array_equal(a.lengths_B, b.lengths_B)
  np.testing.assert_array_equal(a.finished_B, b.finished_B)
  np.testing.assert_array_equal(a.mask_BL, b.mask_BL)
  np.testing.assert_allclose(a.logprobs_BL, b.logprobs_BL, atol=atol)


# Lengths 1..8 over 8 rows (row i stops after LENGTHS[i] tokens): rows finish one
# by one, so every compaction bucket (8, 4, 2, 1 rows) runs.
LENGTHS = np.array([3, 1, 8, 2, 6, 4, 7, 5], np.int32)
EOS_ID = 1


def test_group_size_prefills_once_and_equals_repeated_prompts():
  toks, mask = _prompts()
  kw = dict(max_new_tokens=6, stop_tokens=(5,))
  shared = _engine(PARAMS, toks, mask, jax.random.key(7), group_size=3, **kw)
  plain = _engine(PARAMS, jnp.repeat(toks, 3, 0), jnp.repeat(mask, 3, 0), jax.random.key(7),
                  **kw)
  assert shared.tokens_BL.shape == (6, 6)
  _assert_same_samples(shared, plain)
  # The G samples of one prompt differ from each other (per-row keys).
  assert not np.array_equal(shared.tokens_BL[0], shared.tokens_BL[1])


def test_force_lengths_is_exact_and_truncates_past_the_budget():
  toks, mask = _prompts()
  lengths = np.array([1, 4, 6, 9], np.int32)  # 9 > budget 6: truncated
  out = _engine(PARAMS, jnp.repeat(toks, 2, 0), jnp.repeat(mask, 2, 0), jax.random.key(0),
                max_new_tokens=6, stop_tokens=(EOS_ID,),
                logits_processor=sampling.force_lengths(lengths, EOS_ID))
  np.testing.assert_array_equal(out.lengths_B, [1, 4, 6, 6])
  np.testing.assert_array_equal(out.finished_B, [True, True, True, False])
  tokens = np.asarray(out.tokens_BL)
  for i, n in enumerate([1, 4, 6, 6]):
    eos_at = np.nonzero(tokens[i, :n] == EOS_ID)[0].tolist()
    assert eos_at == ([n - 1] if lengths[i] <= 6 else []), (i, tokens[i])
    assert np.all(tokens[i, n:] == 0)
    if lengths[i] <= 6:
      assert float(out.logprobs_BL[i, n - 1]) == 0.0  # forced: probability 1
  assert np.all(np.asarray(out.logprobs_BL)[:, :3][[1, 2, 3]] < 0)  # free tokens: p < 1


def test_banned_tokens_are_never_sampled():
  toks, mask = _prompts()
  rows_t, rows_m = jnp.repeat(toks, 16, 0), jnp.repeat(mask, 16, 0)
  kw = dict(max_new_tokens=8, temperature=3.0)  # flat distribution: every id is drawn
  free = np.asarray(_engine(PARAMS, rows_t, rows_m, jax.random.key(1), **kw).tokens_BL)
  banned = tuple(int(t) for t in np.unique(free)[:40])  # ids that do occur without the ban
  out = _engine(PARAMS, rows_t, rows_m, jax.random.key(1),
                logits_processor=sampling.ban_tokens(banned), **kw)
  assert not np.isin(np.asarray(out.tokens_BL), banned).any()
  assert len(np.unique(np.asarray(out.tokens_BL))) > 20


def test_min_new_tokens_and_forced_prefix():
  toks, mask = _prompts()
  rows_t, rows_m = jnp.repeat(toks, 8, 0), jnp.repeat(mask, 8, 0)
  free = np.asarray(_engine(PARAMS, rows_t, rows_m, jax.random.key(2), max_new_tokens=8,
                            temperature=2.0).tokens_BL)
  stop = int(np.bincount(free[:, :3].ravel()).argmax())  # a stop id drawn early
  kw = dict(max_new_tokens=8, temperature=2.0, stop_tokens=(stop,))
  early = _engine(PARAMS, rows_t, rows_m, jax.random.key(2), **kw)
  assert int(jnp.min(early.lengths_B)) <= 3
  late = _engine(PARAMS, rows_t, rows_m, jax.random.key(2),
                 logits_processor=sampling.min_new_tokens(5, (stop,)), **kw)
  assert int(jnp.min(late.lengths_B)) >= 5
  assert not np.isin(np.asarray(late.tokens_BL)[:, :5], [stop]).any()
  prefix = (9, 10, 11)
  forced = _engine(PARAMS, rows_t, rows_m, jax.random.key(2),
                   logits_processor=sampling.chain(sampling.force_prefix(prefix), None), **kw)
  np.testing.assert_array_equal(forced.tokens_BL[:, :3], np.tile(prefix, (16, 1)))
  np.testing.assert_array_equal(forced.logprobs_BL[:, :3], 0.0)


def _no_repeat(logits_BV, ctx):
  """Bans each row's previous token: reads ctx.tokens_BL and ctx.step."""
  prev_B = ctx.tokens_BL[:, jnp.maximum(ctx.step - 1, 0)]
  ban_BV = (jnp.arange(logits_BV.shape[-1])[None, :] == prev_B[:, None]) & (ctx.step > 0)
  return jnp.where(ban_BV, -1e30, logits_BV)


@pytest.mark.parametrize("greedy,cascade", [(False, False), (True, False), (False, True)])
def test_compaction_equals_full_batch_decode(greedy, cascade):
  """Compaction on vs off (and, with `cascade`, compaction on with the prompt's
  K/V kept once per group, `shared_prefix_attention`) give the same samples."""
  toks, mask = _prompts()
  proc = sampling.chain(sampling.force_lengths(LENGTHS, EOS_ID), _no_repeat)
  kw = dict(max_new_tokens=8, stop_tokens=(EOS_ID,), group_size=4, greedy=greedy,
            logits_processor=proc)
  full = _engine(PARAMS, toks, mask, jax.random.key(4), **kw)
  compact = _engine(PARAMS, toks, mask, jax.random.key(4), compaction_min_rows=1,
                    shared_prefix_attention=cascade, **kw)
  _assert_same_samples(full, compact)
  np.testing.assert_array_equal(full.lengths_B, LENGTHS)
  # Buckets 8, 4, 2, 1: 8 rows until 4 are done (step 4), 4 until 6 are done
  # (step 6), 2 until 7 are done (step 7), then the last row alone.
  np.testing.assert_array_equal(compact.bucket_steps, [4, 2, 1, 1])
  np.testing.assert_array_equal(full.bucket_steps, [8])
  tokens = np.asarray(compact.tokens_BL)
  for i, n in enumerate(LENGTHS):  # the processor saw each row's own history
    assert np.all(tokens[i, 1:n] != tokens[i, :n - 1])


def test_budget_stops_decoding_and_equals_the_cut_full_decode():
  toks, mask = _prompts()
  kw = dict(max_new_tokens=8, stop_tokens=(EOS_ID,), group_size=4,
            logits_processor=sampling.force_lengths(LENGTHS, EOS_ID))
  full = _engine(PARAMS, toks, mask, jax.random.key(5), **kw)
  for budget in (3, 6):
    cut = _engine(PARAMS, toks, mask, jax.random.key(5), max_len=jnp.int32(budget),
                  compaction_min_rows=2, **kw)
    expect_len = np.minimum(LENGTHS, budget)
    np.testing.assert_array_equal(cut.lengths_B, expect_len)
    np.testing.assert_array_equal(cut.finished_B, LENGTHS <= budget)
    keep = np.arange(8)[None, :] < expect_len[:, None]
    np.testing.assert_array_equal(cut.tokens_BL, np.where(keep, full.tokens_BL, 0))
    np.testing.assert_allclose(cut.logprobs_BL, np.where(keep, full.logprobs_BL, 0), atol=1e-5)
    assert int(jnp.sum(cut.bucket_steps)) == budget  # no decode step past the budget


@pytest.mark.parametrize("cascade", [False, True])
def test_sharded_engine_equals_one_device(cascade):
  from jaxrl_llm import sharding
  from jaxrl_llm.train_state import param_shardings
  toks, mask = _prompts()
  toks, mask = jnp.tile(toks, (2, 1)), jnp.tile(mask, (2, 1))  # 4 prompts x G=4 = 16 rows
  lengths = np.concatenate([LENGTHS, LENGTHS[::-1]])
  kw = dict(max_new_tokens=8, stop_tokens=(EOS_ID,), group_size=4, compaction_min_rows=4,
            logits_processor=sampling.force_lengths(lengths, EOS_ID),
            shared_prefix_attention=cascade)
  one = _engine(PARAMS, toks, mask, jax.random.key(6), **dict(kw, shared_prefix_attention=False))
  mesh = sharding.make_mesh(sharding.MeshConfig((2, 2, 2)))
  params = jax.device_put(PARAMS, param_shardings(CFG, mesh))

  def run(p, t, m, key):
    with sharding.activation_rules(mesh, sharding.DEFAULT_RULES):
      return sample(CFG, p, t, m, key, **kw)
  sharded = jax.jit(run)(params, sharding.shard_batch(np.asarray(toks), mesh),
                         sharding.shard_batch(np.asarray(mask), mesh), jax.random.key(6))
  _assert_same_samples(jax.device_get(sharded), one, atol=1e-4)
  np.testing.assert_array_equal(one.bucket_steps, [4, 2, 2])  # 16, 8 then 4 rows


def test_engine_argument_errors():
  toks, mask = _prompts()
  with pytest.raises(ValueError, match="group_size"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, group_size=0)
  with pytest.raises(ValueError, match="compaction_min_rows"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, compaction_min_rows=-1)
  with pytest.raises(ValueError, match="max_len"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, max_len=3)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2,
           logits_processor=sampling.ban_tokens([CFG.vocab_size]))
  with pytest.raises(ValueError, match=">= 0"):
    sampling.ban_tokens([-1])
  with pytest.raises(ValueError, match="one length per output row"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, group_size=2,
           logits_processor=sampling.force_lengths([2, 2, 2], EOS_ID))
  assert sampling.bucket_sizes(512, 64) == (512, 256, 128, 64)
  assert sampling.bucket_sizes(24, 4) == (24, 12, 6)
  assert sampling.bucket_sizes(512, 0) == (512,)


def test_per_row_keys_make_a_row_independent_of_its_batch():
  """rng of shape [B]: row i's samples depend on rng[i] only (what evaluation relies on)."""
  toks, mask = _prompts()
  toks4, mask4 = jnp.concatenate([toks, toks[::-1]]), jnp.concatenate([mask, mask[::-1]])
  keys = jax.random.split(jax.random.key(7), 4)
  full = sample(CFG, PARAMS, toks4, mask4, keys, max_new_tokens=6, temperature=1.5)
  part = sample(CFG, PARAMS, toks4[2:], mask4[2:], keys[2:], max_new_tokens=6, temperature=1.5)
  _assert_same_samples(jax.tree.map(lambda x: x[2:], full), part)
  default = sample(CFG, PARAMS, toks4, mask4, keys[0], max_new_tokens=6, temperature=1.5)
  assert not np.array_equal(default.tokens_BL, full.tokens_BL)


def test_inverse_cdf_draws_follow_the_softmax_and_never_pick_excluded_tokens():
  """200,000 draws over 37 tokens in chunks of 8 (the last chunk padded): each
  token's frequency is its softmax probability within 4.5 standard errors;
  tokens at -1e30 (as top-k / top-p leave them) are never drawn."""
  V, n = 37, 200_000
  logits = jax.random.normal(jax.random.key(0), (V,)) * 1.5
  excluded = np.array([0, 8, 9, 20, 36])  # chunk edges included
  logits = logits.at[excluded].set(-1e30)
  keys = jax.random.split(jax.random.key(1), n)
  draw = jax.jit(functools.partial(sampling.categorical_inverse_cdf, chunk=8))
  tokens = np.asarray(draw(keys, jnp.broadcast_to(logits, (n, V))))
  freq = np.bincount(tokens, minlength=V) / n
  p = np.asarray(jax.nn.softmax(logits))
  assert freq[excluded].sum() == 0
  np.testing.assert_array_less(np.abs(freq - p), 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_inverse_cdf_index_at_the_ends_of_the_unit_interval():
  """u = 0 gives the first token with mass; u at (or past, by rounding) 1 gives
  the last one with mass, never an excluded or padded entry."""
  logits = jnp.full((3, 11), -1e30).at[0, 4].set(2.0).at[1, [1, 6, 7]].set(0.5)
  logits = logits.at[2].set(jnp.linspace(-1, 1, 11))
  for u, expect in ((0.0, [4, 1, 0]), (1.0, [4, 7, 10]), (1.5, [4, 7, 10])):
    idx = sampling.inverse_cdf_index(jnp.full((3,), u), logits, chunk=4)
    np.testing.assert_array_equal(idx, expect)
  # Interior: u picks the token whose cumulative interval holds it.
  p = np.asarray(jax.nn.softmax(logits[2]))
  cdf = np.cumsum(p)
  for j in (0, 3, 5, 9):
    u = (cdf[j] - p[j] / 2) * np.ones(3, np.float32)
    assert int(sampling.inverse_cdf_index(jnp.asarray(u), logits, chunk=4)[2]) == j


def test_inverse_cdf_sampler_keeps_the_engine_equalities():
  """`categorical="inverse_cdf"`: the same key gives the same samples, G > 1
  equals repeated prompts, compaction equals the full batch, log-probs are the
  full forward's; an unknown name is refused."""
  toks, mask = _prompts()
  proc = sampling.force_lengths(LENGTHS, EOS_ID)
  kw = dict(max_new_tokens=8, stop_tokens=(EOS_ID,), logits_processor=proc,
            categorical="inverse_cdf")
  shared = _engine(PARAMS, toks, mask, jax.random.key(4), group_size=4,
                   compaction_min_rows=1, **kw)
  plain = _engine(PARAMS, jnp.repeat(toks, 4, 0), jnp.repeat(mask, 4, 0), jax.random.key(4),
                  **kw)
  _assert_same_samples(shared, plain)
  gumbel = _engine(PARAMS, toks, mask, jax.random.key(4), group_size=4,
                   **dict(kw, categorical="gumbel"))
  assert not np.array_equal(gumbel.tokens_BL, shared.tokens_BL)
  out = sample(CFG, PARAMS, toks, mask, jax.random.key(2), max_new_tokens=6,
               categorical="inverse_cdf")
  for b in range(2):
    real = np.asarray(toks[b])[np.asarray(mask[b]) == 1]
    seq = jnp.concatenate([jnp.asarray(real), out.tokens_BL[b]])[None]
    logp = jax.nn.log_softmax(forward(CFG, PARAMS, seq), -1)[0]
    P = len(real)
    np.testing.assert_allclose(out.logprobs_BL[b], logp[np.arange(P - 1, P + 5),
                                                        out.tokens_BL[b]], atol=1e-4)
  with pytest.raises(ValueError, match="categorical must be one of"):
    sample(CFG, PARAMS, toks, mask, jax.random.key(0), max_new_tokens=2, categorical="topk")
