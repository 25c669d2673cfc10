"""The rollout engine: prefill once per prompt, then a compiled decode loop.

`sample` generates up to `max_new_tokens` tokens after left-padded prompts.
Everything has static shapes and runs inside one jit (the RL step's too):

  PREFILL    each prompt runs once. With `group_size=G` the prompts are
             [R, P] and the output has B = R·G rows (row r·G + g is sample g
             of prompt r, the `jnp.repeat` order); the prompt's KV cache is
             computed on R rows and copied to its G rows
             (`decoder.cache_expand`), so a group's prompt costs one prefill;
             with `shared_prefix_attention` the copy is never made and each
             decode step reads a prompt's K/V once per group
             (`models.shared_prefix`, cascade attention).
  DECODE     `lax.while_loop`s over a preallocated per-layer KV cache.
             Compaction (`compaction_min_rows` > 0): the batch runs in
             buckets of B, B/2, B/4, ... rows. When the live rows of a bucket
             of b rows fall to b/2 or fewer, they (and their caches and
             next-token logits) are gathered into a bucket of b/2 rows and
             decoding continues there; finished rows then cost nothing. Each
             bucket is one compiled loop, so shapes stay static; the
             smallest bucket keeps going until every row has stopped.
  BUDGET     `max_len` (a run-time scalar, e.g. a length schedule's budget
             at this step) ends the decode there: rows still running are
             truncated (`finished_B` False) and no step past it runs.
  HOOK       `logits_processor(logits_BV, ctx) -> logits_BV` edits the
             float32 next-token logits before temperature / top-k / top-p
             (or argmax); `ctx` is a `DecodeContext`. Built-ins:
             `ban_tokens`, `min_new_tokens`, `force_lengths`, `force_prefix`,
             composed with `chain`.

Random draws are keyed per (row, step): the key of row i at step t is
fold_in(fold_in(rng, i), t), with i the row's index in the output. A row's
samples therefore do not depend on which other rows share its batch, so
shared-prefix prefill and compaction change no token: `group_size=G` gives
exactly `sample(jnp.repeat(prompts, G, 0), ...)`, and compaction on gives
exactly compaction off (up to float rounding of batched matmuls).

Outputs are scattered back to the caller's row order: tokens, masks, lengths,
sampling log-probs. The weights are cast to the compute dtype and split out
of their stacked arrays once, before the loop (`decoder.decode_params`), and
the cache has one buffer per layer, so a decode step reads each in place.
`sample` is a pure function: jit it (or call it inside a jitted step) with
the sampling options bound, e.g.

  gen = jax.jit(functools.partial(sample, cfg, max_new_tokens=64, top_p=0.9))
  out = gen(params, prompt_tokens_BP, prompt_mask_BP, rng)

Shape letters: R prompts, G group size, B rows (R·G), P prompt length,
L max new tokens, S cache length, V vocab.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.models import decoder, shared_prefix
from jaxrl_llm.models.config import ModelConfig

_NEG_INF = -1e30


class SampleOutput(NamedTuple):
  tokens_BL: jax.Array     # completion tokens, pad_id after the end
  mask_BL: jax.Array       # 1.0 on completion tokens (the stop token included)
  lengths_B: jax.Array     # number of completion tokens per row
  logprobs_BL: jax.Array   # log-prob of each token under the sampling distribution
  finished_B: jax.Array    # True where a stop token ended the row (False: truncated)
  # int32 [len(bucket_sizes(B, compaction_min_rows))]: decode steps run at each
  # batch size (one entry, the steps run, without compaction).
  bucket_steps: Optional[jax.Array] = None


class DecodeContext(NamedTuple):
  """What a logits processor sees at one decode step.

  Here B is the number of rows in the current decode batch: the caller's
  batch, or a compacted bucket of it. Every live row has generated exactly
  `step` tokens so far (rows advance in lockstep).
  """
  step: jax.Array       # int32 scalar: completion index of the token being chosen (0 = first)
  row_B: jax.Array      # int32 [B]: each row's index in the output (stable under compaction)
  tokens_BL: jax.Array  # int32 [B, L]: each row's completion so far (pad_id from `step` on)
  live_B: jax.Array     # bool [B]: rows still generating (the others' logits are ignored)
  num_rows: int         # rows of the output (static): row_B is in [0, num_rows)


# logits_processor(logits_BV float32, ctx) -> logits_BV: jittable and pure. A
# token is excluded by giving it a logit of -1e30 (or lower); a processor that
# excludes every token of a row makes that row's draw undefined.
LogitsProcessor = Callable[[jax.Array, DecodeContext], jax.Array]


# ---------------------------------------------------------------------------
# Logits processors.
# ---------------------------------------------------------------------------
def _token_ids(name: str, token_ids: Sequence[int]) -> np.ndarray:
  ids = np.asarray(tuple(int(t) for t in token_ids), np.int32).reshape(-1)
  if ids.size and ids.min() < 0:
    raise ValueError(f"{name}: token ids must be >= 0, got {ids.tolist()}")
  return ids


def _check_vocab(name: str, ids: np.ndarray, vocab: int):
  if ids.size and ids.max() >= vocab:
    raise ValueError(f"{name}: token id {int(ids.max())} is outside the vocabulary of "
                     f"{vocab} tokens")


def _is_any(token_ids: np.ndarray, vocab: int) -> jax.Array:
  """bool [V]: True at the given ids."""
  return jnp.zeros((vocab,), bool).at[jnp.asarray(token_ids)].set(True)


def _only(logits_BV: jax.Array, force_B: jax.Array, token_id) -> jax.Array:
  """Rows where `force_B`: every token but `token_id` (scalar or [B]) excluded."""
  vocab_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
  target = jnp.asarray(token_id, jnp.int32)
  target_B1 = target[:, None] if target.ndim else target
  forced_BV = jnp.where(vocab_V[None, :] == target_B1, 0.0, _NEG_INF)
  return jnp.where(force_B[:, None], forced_BV, logits_BV)


def ban_tokens(token_ids: Sequence[int]) -> LogitsProcessor:
  """Never sample `token_ids` (their logits become -1e30 at every step)."""
  ids = _token_ids("ban_tokens", token_ids)

  def process(logits_BV, ctx):
    del ctx
    if not ids.size:
      return logits_BV
    _check_vocab("ban_tokens", ids, logits_BV.shape[-1])
    return jnp.where(_is_any(ids, logits_BV.shape[-1])[None, :], _NEG_INF, logits_BV)
  return process


def min_new_tokens(num_tokens: int, stop_tokens: Sequence[int]) -> LogitsProcessor:
  """No stop token among the first `num_tokens` tokens of a completion (stop ids
  excluded while step < num_tokens, as HF's min_new_tokens): a row that stops
  has at least `num_tokens` tokens before its stop token."""
  ids = _token_ids("min_new_tokens", stop_tokens)
  if num_tokens < 0:
    raise ValueError(f"min_new_tokens: num_tokens must be >= 0, got {num_tokens}")

  def process(logits_BV, ctx):
    if not ids.size or num_tokens == 0:
      return logits_BV
    _check_vocab("min_new_tokens", ids, logits_BV.shape[-1])
    ban_BV = _is_any(ids, logits_BV.shape[-1])[None, :] & (ctx.step < num_tokens)
    return jnp.where(ban_BV, _NEG_INF, logits_BV)
  return process


def force_lengths(lengths_B, eos_id: int) -> LogitsProcessor:
  """Row i's completion is exactly `lengths_B[i]` tokens, its last one `eos_id`.

  At step t (0-based) of row i: t < n_i − 1 → `eos_id` excluded; t = n_i − 1
  → only `eos_id` allowed (log-prob 0). n_i larger than the budget: the row
  never stops and is truncated at the budget. `lengths_B` is indexed by the
  row's output index (`DecodeContext.row_B`), so it has one entry per output
  row; entries below 1 count as 1.
  """
  if eos_id < 0:
    raise ValueError(f"force_lengths: eos_id must be a token id >= 0, got {eos_id}")
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  if lengths_B.ndim != 1:
    raise ValueError(f"force_lengths: lengths_B must be 1-D [rows], got {lengths_B.shape}")

  def process(logits_BV, ctx):
    _check_vocab("force_lengths", np.asarray([eos_id]), logits_BV.shape[-1])
    if lengths_B.shape[0] < ctx.num_rows:
      raise ValueError(f"force_lengths: {lengths_B.shape[0]} lengths for {ctx.num_rows} rows; "
                       "give one length per output row")
    last_B = jnp.maximum(lengths_B[ctx.row_B], 1) - 1
    early_B = ctx.step < last_B
    vocab_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
    logits_BV = jnp.where(early_B[:, None] & (vocab_V[None, :] == eos_id), _NEG_INF, logits_BV)
    return _only(logits_BV, ctx.step == last_B, eos_id)
  return process


def force_prefix(prefix_tokens: Sequence[int]) -> LogitsProcessor:
  """The first len(prefix_tokens) tokens of every completion are `prefix_tokens`
  (a forced format, e.g. an opening tag); each forced token has log-prob 0."""
  ids = _token_ids("force_prefix", prefix_tokens)

  def process(logits_BV, ctx):
    if not ids.size:
      return logits_BV
    _check_vocab("force_prefix", ids, logits_BV.shape[-1])
    K = ids.size
    target = jnp.asarray(ids)[jnp.minimum(ctx.step, K - 1)]
    force_B = jnp.broadcast_to(ctx.step < K, ctx.row_B.shape)
    return _only(logits_BV, force_B, target)
  return process


def chain(*processors: Optional[LogitsProcessor]) -> Optional[LogitsProcessor]:
  """The processors applied in order (None entries skipped); None if none is left."""
  procs = tuple(p for p in processors if p is not None)
  if not procs:
    return None
  if len(procs) == 1:
    return procs[0]

  def process(logits_BV, ctx):
    for p in procs:
      logits_BV = p(logits_BV, ctx)
    return logits_BV
  return process


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


# ---------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------
def bucket_sizes(batch: int, compaction_min_rows: int) -> tuple[int, ...]:
  """Decode batch sizes with compaction: B, B/2, B/4, ... while the size is even
  and its half is >= `compaction_min_rows` (0: no compaction, just (B,))."""
  sizes = [batch]
  if compaction_min_rows > 0:
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= compaction_min_rows:
      sizes.append(sizes[-1] // 2)
  return tuple(sizes)


def prefill(cfg: ModelConfig, params, prompt_tokens_RP: jax.Array, prompt_mask_RP: jax.Array,
            *, cache_size: int, group_size: int = 1, cache_dtype: Optional[str] = None,
            shared_prefix_attention: bool = False):
  """Run left-padded prompts once into a fresh KV cache of `cache_size` slots.

  Returns (logits_BV of the next token, cache, prompt_len_B) for B = R·G rows:
  with `group_size` G > 1 each prompt's cache is computed once and copied to
  its G rows (`decoder.cache_expand`), or, with `shared_prefix_attention`,
  kept once per group (`shared_prefix.SharedPrefixCache`, cache_size − P
  completion slots per row). Only the last position is unembedded.
  """
  R, P = prompt_tokens_RP.shape
  G = int(group_size)
  if shared_prefix_attention and cache_size <= P:
    raise ValueError(f"prefill: cache_size {cache_size} leaves no completion slot after the "
                     f"{P} prompt slots; give cache_size = prompt length + max new tokens")
  prompt_mask_RP = prompt_mask_RP.astype(bool)
  prompt_len_R = jnp.sum(prompt_mask_RP, axis=1).astype(jnp.int32)
  positions_RP = jnp.maximum(jnp.cumsum(prompt_mask_RP, axis=1) - 1, 0)
  one_copy = G > 1 or shared_prefix_attention
  cache = decoder.init_cache(cfg, R, P if one_copy else cache_size, cache_dtype)
  h_RPD, cache = decoder.forward_with_cache(cfg, params, prompt_tokens_RP, positions_RP,
                                            prompt_mask_RP, cache, return_hidden=True)
  logits_RV = decoder.unembed(cfg, params, h_RPD[:, -1:])[:, 0]
  if shared_prefix_attention:  # one prompt cache per group, attended once per group
    cache = shared_prefix.from_prompt_cache(cache, prompt_len_R, G, cache_size - P)
  elif G > 1:  # one prompt cache per group, copied to its G rows
    cache = decoder.cache_expand(cache, G, cache_size)
  return jnp.repeat(logits_RV, G, axis=0), cache, jnp.repeat(prompt_len_R, G)


def _decode_forward(cfg, params, token_b, positions_b1, live_b, row_b, cache):
  """One decode step of the live and finished rows against either cache kind."""
  if isinstance(cache, shared_prefix.SharedPrefixCache):
    return shared_prefix.forward(cfg, params, token_b[:, None], positions_b1, row_b, cache)
  return decoder.forward_with_cache(cfg, params, token_b[:, None], positions_b1,
                                    live_b[:, None], cache)


def _take_rows(cache, rows_b):
  if isinstance(cache, shared_prefix.SharedPrefixCache):
    return shared_prefix.take_rows(cache, rows_b)
  return decoder.cache_take_rows(cache, rows_b)


def row_keys(rng: jax.Array, num_rows: int) -> jax.Array:
  """One PRNG key per output row: `rng` itself when it is already [num_rows]
  keys, else fold_in(rng, i) for row i."""
  if rng.shape == (num_rows,):  # the caller's own key per row
    return rng
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(num_rows))


CATEGORICAL_DRAWS = ("gumbel", "inverse_cdf")


def categorical_inverse_cdf(keys_b: jax.Array, logits_bV: jax.Array,
                            chunk: int = 2048) -> jax.Array:
  """One draw per row from softmax(logits_bV), by inverting its cumulative sum.

  With e_i = exp(l_i − max l) and c_i = e_0 + ... + e_i, row b draws one
  uniform u and returns the first i with c_i > u·c_{V−1}: token i is chosen
  with probability e_i / Σe. A row needs one uniform instead of one per
  vocabulary entry (`jax.random.categorical` adds Gumbel noise to every
  logit), and the [b, V] logits are only read, by reductions
  (`inverse_cdf_index`).
  """
  u_b = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys_b)
  return inverse_cdf_index(u_b, logits_bV, chunk)


def inverse_cdf_index(u_b: jax.Array, logits_bV: jax.Array, chunk: int = 2048) -> jax.Array:
  """The first i with c_i > u·c_{V−1} (see `categorical_inverse_cdf`), u in [0, 1).

  The vocabulary is cut into chunks of `chunk` entries: a reduction gives each
  chunk's mass, a short cumulative sum over the chunks finds the chunk that
  holds u·Σe, and a cumulative sum over that chunk's entries alone finds the
  token. Entries of zero mass (logits of −1e30 or −inf) are never chosen:
  float rounding past the end of a sum falls back to the last entry with mass.
  """
  b, V = logits_bV.shape
  S = min(chunk, V)
  C = -(-V // S)
  l_bV = logits_bV.astype(jnp.float32)
  l_bCS = jnp.pad(l_bV, ((0, 0), (0, C * S - V)), constant_values=-jnp.inf).reshape(b, C, S)
  m_b11 = jnp.max(l_bV, axis=-1)[:, None, None]
  mass_bC = jnp.sum(jnp.exp(l_bCS - m_b11), axis=-1)
  cdf_bC = jnp.cumsum(mass_bC, axis=-1)
  target_b = u_b * cdf_bC[:, -1]

  def first_above(cdf_bN, value_b, mass_bN):
    """The first index whose cumulative sum exceeds value, else the last with mass."""
    n = cdf_bN.shape[-1]
    last_b = n - 1 - jnp.argmax(mass_bN[:, ::-1] > 0, axis=-1)
    return jnp.minimum(jnp.sum(cdf_bN <= value_b[:, None], axis=-1), last_b)

  c_b = first_above(cdf_bC, target_b, mass_bC)
  before_b = (jnp.take_along_axis(cdf_bC, c_b[:, None], axis=-1)
              - jnp.take_along_axis(mass_bC, c_b[:, None], axis=-1))[:, 0]
  e_bS = jnp.exp(jnp.take_along_axis(l_bCS, c_b[:, None, None], axis=1)[:, 0] - m_b11[:, 0])
  s_b = first_above(jnp.cumsum(e_bS, axis=-1), target_b - before_b, e_bS)
  return (c_b * S + s_b).astype(jnp.int32)


def _check_categorical(categorical):
  if categorical not in CATEGORICAL_DRAWS:
    raise ValueError(f"categorical must be one of {CATEGORICAL_DRAWS}, got {categorical!r}")


def choose_tokens(logits_bV: jax.Array, ctx: DecodeContext, keys_b: jax.Array, *,
                  logits_processor: Optional[LogitsProcessor] = None, greedy: bool = False,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  categorical: str = "gumbel"):
  """(token_b, log p(token_b)) of one decode step, each row drawn with its key.

  log p = processed logit[token] − logsumexp(processed logits), so no [b, V]
  log-softmax is materialised; greedy takes the argmax (keys unused).
  `categorical`: how a token is drawn, "gumbel" (`jax.random.categorical`:
  the argmax of the logits plus a Gumbel draw per vocabulary entry) or
  "inverse_cdf" (`categorical_inverse_cdf`: one uniform per row). Both draw
  from the same distribution; for the same key they pick different tokens.
  """
  _check_categorical(categorical)
  processed = logits_bV.astype(jnp.float32)
  if logits_processor is not None:
    processed = logits_processor(processed, ctx).astype(jnp.float32)
  if greedy:
    token_b = jnp.argmax(processed, axis=-1).astype(jnp.int32)
  else:
    processed = process_logits(processed, temperature=temperature, top_k=top_k, top_p=top_p)
    if categorical == "inverse_cdf":
      token_b = categorical_inverse_cdf(keys_b, processed)
    else:
      token_b = jax.vmap(jax.random.categorical)(keys_b, processed).astype(jnp.int32)
  chosen_b = jnp.take_along_axis(processed, token_b[:, None], axis=-1)[:, 0]
  return token_b, chosen_b - jax.nn.logsumexp(processed, axis=-1)


def _validate(prompt_tokens, prompt_mask, max_new_tokens, temperature, top_k, top_p,
              cache_size, group_size, compaction_min_rows, max_len):
  if prompt_tokens.ndim != 2:
    raise ValueError("prompt_tokens_BP must be [batch, prompt_len], got shape "
                     f"{prompt_tokens.shape}")
  if prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_mask_BP shape {prompt_mask.shape} != prompt_tokens_BP shape "
                     f"{prompt_tokens.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"group_size must be an int >= 1 (samples per prompt), got {group_size!r}")
  if compaction_min_rows < 0:
    raise ValueError(f"compaction_min_rows must be >= 0 (0 disables compaction), got "
                     f"{compaction_min_rows}")
  if isinstance(max_len, (int, np.integer)) and not 1 <= max_len <= max_new_tokens:
    raise ValueError(f"max_len must be in [1, max_new_tokens={max_new_tokens}], got {max_len}")
  P = prompt_tokens.shape[1]
  if P + max_new_tokens > cache_size:
    raise ValueError(
        f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds "
        f"the KV cache size {cache_size}; raise cache_size, shorten or truncate the prompts, "
        "or lower max_new_tokens")


def sample(cfg: ModelConfig, params, prompt_tokens_BP: jax.Array, prompt_mask_BP: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, stop_tokens: Sequence[int] = (),
           pad_id: int = 0, cache_size: Optional[int] = None,
           cache_dtype: Optional[str] = None,
           logits_processor: Optional[LogitsProcessor] = None, group_size: int = 1,
           compaction_min_rows: int = 0, shared_prefix_attention: bool = False,
           max_len: Union[int, jax.Array, None] = None,
           categorical: str = "gumbel") -> SampleOutput:
  """Sample up to `max_new_tokens` tokens after left-padded prompts.

  Args:
    prompt_tokens_BP: int prompts, left-padded (every row ends at column P-1);
      [R, P] with `group_size` G > 1 (then the output has R·G rows).
    prompt_mask_BP: 1 on real prompt tokens, 0 on left padding.
    rng: a PRNG key; the same key gives the same samples. Or one key per
      output row, shape [B] (e.g. from the example's id, so that a row's
      samples depend on nothing else); row i then uses rng[i] in place of
      fold_in(rng, i).
    greedy: argmax decoding (temperature / top-k / top-p ignored).
    stop_tokens: ids that end a row (the stop token is part of the completion).
    cache_size: KV cache length; defaults to P + max_new_tokens.
    cache_dtype: KV cache dtype; defaults to the model's compute dtype.
    logits_processor: `(logits_BV, DecodeContext) -> logits_BV`, applied to
      the float32 logits of every step before temperature / top-k / top-p.
    group_size: G samples per prompt, the prompt prefilled once for all G.
    shared_prefix_attention: keep one copy of each prompt's K/V for its G
      rows and read it once per group per decode step (cascade attention,
      `models.shared_prefix`) instead of a copy per row. Same samples up to
      float rounding (the softmax is summed in two parts).
    compaction_min_rows: > 0 turns compaction on: the decode batch halves
      whenever half or fewer of its rows are live, down to buckets of this
      many rows (see `bucket_sizes`). 0 keeps the full batch to the end, as
      do stop_tokens with no id >= 0 (no row can end early).
    max_len: run-time budget in [1, max_new_tokens] (an int or a traced
      int32 scalar); decoding stops there. None: max_new_tokens.
    categorical: how each token is drawn from the processed distribution,
      "gumbel" (one Gumbel draw per vocabulary entry) or "inverse_cdf" (one
      uniform per row; `categorical_inverse_cdf`). Same distribution,
      different tokens for the same key.

  Returns a `SampleOutput` in the caller's row order; `logprobs_BL` are
  log-probs under the distribution actually sampled from (after the logits
  processor, temperature, top-k and top-p; the processed log-softmax for
  greedy). A token forced by a processor has log-prob 0.
  """
  R, P = prompt_tokens_BP.shape
  cache_size = cache_size or P + max_new_tokens
  _validate(prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature, top_k, top_p,
            cache_size, group_size, compaction_min_rows, max_len)
  _check_categorical(categorical)
  if not isinstance(shared_prefix_attention, (bool, np.bool_)):
    raise ValueError("shared_prefix_attention must be a Python bool (a static argument "
                     f"under jit), got {type(shared_prefix_attention).__name__}")
  G = int(group_size)
  B, L = R * G, max_new_tokens
  stop_ids = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)
  prompt_mask_BP = prompt_mask_BP.astype(bool)
  params = decoder.decode_params(cfg, params)  # cast and split once, not per token
  budget = L if max_len is None else jnp.clip(jnp.asarray(max_len, jnp.int32), 1, L)

  # PREFILL: each prompt once; only the last position is unembedded.
  logits_RV, cache, prompt_len_B = prefill(cfg, params, prompt_tokens_BP, prompt_mask_BP,
                                           cache_size=cache_size, group_size=G,
                                           cache_dtype=cache_dtype,
                                           shared_prefix_attention=shared_prefix_attention)
  row_keys_B = row_keys(rng, B)

  def choose(logits_bV, ctx):
    keys_b = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B[ctx.row_B], ctx.step)
    return choose_tokens(logits_bV, ctx, keys_b, logits_processor=logits_processor,
                         greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                         categorical=categorical)

  # DECODE: sample a token per live row, scatter it to its output row, run it
  # through the model. `b` is the current bucket's row count.
  def body(carry):
    step, row_b, done_b, logits_bV, cache, out = carry
    tokens_BL, logprobs_BL, lengths_B, finished_B = out
    live_b = ~done_b
    ctx = DecodeContext(step, row_b, tokens_BL[row_b], live_b, B)
    token_b, logp_b = choose(logits_bV, ctx)
    stop_b = live_b & jnp.any(token_b[:, None] == stop_ids[None, :], axis=1)
    write_b = jnp.where(live_b, row_b, B)  # index B is out of range: dropped
    tokens_BL = tokens_BL.at[write_b, step].set(token_b, mode="drop")
    logprobs_BL = logprobs_BL.at[write_b, step].set(logp_b, mode="drop")
    lengths_B = lengths_B.at[write_b].set(step + 1, mode="drop")
    finished_B = finished_B.at[write_b].set(stop_b, mode="drop")
    token_b = jnp.where(live_b, token_b, pad_id)
    positions_b1 = (prompt_len_B[row_b] + step)[:, None]
    logits, cache = _decode_forward(cfg, params, token_b, positions_b1, live_b, row_b, cache)
    out = (tokens_BL, logprobs_BL, lengths_B, finished_B)
    return step + 1, row_b, done_b | stop_b, logits[:, 0], cache, out

  def run_bucket(carry, next_size):
    def cond(carry):
      step, done_b = carry[0], carry[2]
      live = jnp.sum(~done_b)
      go = (step < budget) & (live > 0)
      return go if next_size is None else go & (live > next_size)
    return jax.lax.while_loop(cond, body, carry)

  out = (jnp.full((B, L), pad_id, jnp.int32), jnp.zeros((B, L), jnp.float32),
         jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
  carry = (jnp.zeros((), jnp.int32), jnp.arange(B, dtype=jnp.int32), jnp.zeros((B,), bool),
           logits_RV, cache, out)
  # Rows end only on a stop token (>= 0): without one, compaction could never
  # trigger, so its loops are not compiled.
  can_stop = any(int(t) >= 0 for t in stop_tokens)
  sizes = bucket_sizes(B, compaction_min_rows if can_stop else 0)
  steps = []
  for next_size in sizes[1:] + (None,):
    start = carry[0]
    carry = run_bucket(carry, next_size)
    steps.append(carry[0] - start)
    if next_size is not None:
      # COMPACT: live rows first (in row order), then finished ones to fill.
      step, row_b, done_b, logits_bV, cache, out = carry
      keep = jnp.argsort(done_b, stable=True)[:next_size]
      carry = (step, row_b[keep], done_b[keep], logits_bV[keep],
               _take_rows(cache, keep), out)
  tokens_BL, logprobs_BL, lengths_B, finished_B = carry[-1]
  mask_BL = (jnp.arange(L)[None, :] < lengths_B[:, None]).astype(jnp.float32)
  return SampleOutput(tokens_BL, mask_BL, lengths_B, logprobs_BL, finished_B,
                      jnp.stack(steps).astype(jnp.int32))
