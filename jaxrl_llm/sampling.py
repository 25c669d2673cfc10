"""Autoregressive sampling: one prefill, then a `lax.while_loop` decode.

Everything has static shapes: the KV cache is preallocated for prompt plus
`max_new_tokens`, finished rows keep running (their outputs are masked) and
the loop exits early once every row has emitted a stop token. The weights
are cast to the compute dtype and split out of their stacked arrays once,
before the loop (`decoder.decode_params`), and the cache has one buffer per
layer, so a decode step reads each in place. `sample` is a
pure function: jit it (or call it inside a jitted step) with the sampling
options bound, e.g.

  gen = jax.jit(functools.partial(sample, cfg, max_new_tokens=64, top_p=0.9))
  out = gen(params, prompt_tokens_BP, prompt_mask_BP, rng)

Shape letters: B batch, P prompt length, L max new tokens, S cache length,
V vocab.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig

_NEG_INF = -1e30


class SampleOutput(NamedTuple):
  tokens_BL: jax.Array     # completion tokens, pad_id after the end
  mask_BL: jax.Array       # 1.0 on completion tokens (the stop token included)
  lengths_B: jax.Array     # number of completion tokens per row
  logprobs_BL: jax.Array   # log-prob of each token under the sampling distribution
  finished_B: jax.Array    # True where a stop token ended the row (False: truncated)


def process_logits(logits_BV: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> jax.Array:
  """Float32 logits of the sampling distribution: temperature, top-k, top-p.

  Excluded tokens get -1e30. top-p keeps the smallest set of most likely
  tokens whose probability reaches `top_p` (always at least one token).
  """
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, _NEG_INF, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest kept logit: the last sorted token whose preceding mass < p.
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG_INF, logits)
  return logits


def _validate(prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature, top_k, top_p,
              cache_size):
  if prompt_tokens_BP.ndim != 2:
    raise ValueError("prompt_tokens_BP must be [batch, prompt_len], got shape "
                     f"{prompt_tokens_BP.shape}")
  if prompt_mask_BP.shape != prompt_tokens_BP.shape:
    raise ValueError(f"prompt_mask_BP shape {prompt_mask_BP.shape} != prompt_tokens_BP shape "
                     f"{prompt_tokens_BP.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  P = prompt_tokens_BP.shape[1]
  if P + max_new_tokens > cache_size:
    raise ValueError(
        f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds "
        f"the KV cache size {cache_size}; raise cache_size, shorten or truncate the prompts, "
        "or lower max_new_tokens")


def sample(cfg: ModelConfig, params, prompt_tokens_BP: jax.Array, prompt_mask_BP: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, stop_tokens: Sequence[int] = (),
           pad_id: int = 0, cache_size: Optional[int] = None,
           cache_dtype: Optional[str] = None) -> SampleOutput:
  """Sample up to `max_new_tokens` tokens after left-padded prompts.

  Args:
    prompt_tokens_BP: int prompts, left-padded (every row ends at column P-1).
    prompt_mask_BP: 1 on real prompt tokens, 0 on left padding.
    rng: a PRNG key; the same key gives the same samples.
    greedy: argmax decoding (temperature / top-k / top-p ignored).
    stop_tokens: ids that end a row (the stop token is part of the completion).
    cache_size: KV cache length; defaults to P + max_new_tokens.
    cache_dtype: KV cache dtype; defaults to the model's compute dtype.

  Returns a `SampleOutput`; `logprobs_BL` are log-probs under the distribution
  actually sampled from (after temperature, top-k and top-p; the plain
  log-softmax for greedy).
  """
  B, P = prompt_tokens_BP.shape
  cache_size = cache_size or P + max_new_tokens
  _validate(prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature, top_k, top_p,
            cache_size)
  stop_ids = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
  prompt_mask_BP = prompt_mask_BP.astype(bool)
  params = decoder.decode_params(cfg, params)  # cast and split once, not per token

  # PREFILL: the whole prompt in one pass; only the last position is unembedded.
  prompt_len_B = jnp.sum(prompt_mask_BP, axis=1).astype(jnp.int32)
  positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0)
  cache = decoder.init_cache(cfg, B, cache_size, cache_dtype)
  h_BPD, cache = decoder.forward_with_cache(cfg, params, prompt_tokens_BP, positions_BP,
                                            prompt_mask_BP, cache, return_hidden=True)
  logits_BV = decoder.unembed(cfg, params, h_BPD[:, -1:])[:, 0]

  def choose(logits_BV, key):
    """(token_B, log p(token_B)); log p = logit[token] − logsumexp(logits), so no
    [B, V] log-softmax is materialised."""
    if greedy:
      processed = logits_BV.astype(jnp.float32)
      token_B = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    else:
      processed = process_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
      token_B = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
    chosen_B = jnp.take_along_axis(processed, token_B[:, None], axis=-1)[:, 0]
    return token_B, chosen_B - jax.nn.logsumexp(processed, axis=-1)

  # DECODE: sample a token, record it, run it through the model.
  def cond(state):
    step, done_B = state[0], state[1]
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, done_B, logits_BV, cache, tokens_BL, mask_BL, logprobs_BL = state
    token_B, logp_B = choose(logits_BV, jax.random.fold_in(rng, step))
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, pad_id)
    tokens_BL = tokens_BL.at[:, step].set(token_B)
    mask_BL = mask_BL.at[:, step].set(live_B.astype(jnp.float32))
    logprobs_BL = logprobs_BL.at[:, step].set(jnp.where(live_B, logp_B, 0.0))
    done_B = done_B | jnp.any(token_B[:, None] == stop_ids[None, :], axis=1)
    logits, cache = decoder.forward_with_cache(
        cfg, params, token_B[:, None], (prompt_len_B + step)[:, None], live_B[:, None], cache)
    return step + 1, done_B, logits[:, 0], cache, tokens_BL, mask_BL, logprobs_BL

  state = (jnp.zeros((), jnp.int32), jnp.zeros((B,), bool), logits_BV, cache,
           jnp.full((B, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((B, max_new_tokens), jnp.float32),
           jnp.zeros((B, max_new_tokens), jnp.float32))
  _, done_B, _, _, tokens_BL, mask_BL, logprobs_BL = jax.lax.while_loop(cond, body, state)
  lengths_B = jnp.sum(mask_BL, axis=1).astype(jnp.int32)
  return SampleOutput(tokens_BL, mask_BL, lengths_B, logprobs_BL, done_B)
