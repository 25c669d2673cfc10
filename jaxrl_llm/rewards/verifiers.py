"""In-graph verifiers: correctness and format rewards computed on token ids.

Each verifier follows the `jaxrl_llm.rewards.base` protocol,
``fn(inputs: RewardInputs, **options) -> rewards_B`` (float32 0/1); bind the
options with `functools.partial`. They use static shapes only and no Python
control flow on array values, so they run inside the jitted RL step.

The answer span of a completion is its tokens before the first stop token
(``eos_id``, one id or several) or before the end of its mask, whichever comes
first. Completions are left-aligned (position 0 is the first sampled token);
reference answers in ``task["answer_BA"]`` are left-aligned with a prefix mask
``task["answer_mask_BA"]``. Scoring on token ids assumes the answer's
tokenisation is canonical (the tokenizer encodes the reference the way the
policy is expected to write it), which holds for character-level and digit
tokenizers; use `jaxrl_llm.rewards.host` to compare decoded text instead.

Shape suffixes:
  B: completions in the batch, B = prompts × G.
  L: completion length (tokens).
  A: reference answer length (tokens).
  D: the ten digits '0'..'9'.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.rewards.base import RewardInputs, check_inputs

Array = jax.Array

# 10^k for k = 0..9; int32 holds every integer of at most nine significant digits.
_POW10 = tuple(10 ** k for k in range(10))
MAX_INT_DIGITS = 9

# Answer ids (`answer_span_id`): a polynomial hash modulo the largest prime below 2**24, so
# float32 (which holds every integer up to 2**24) carries the ids exactly.
ANSWER_ID_PRIME = 16_777_213
ANSWER_ID_BASE = 10_368_892  # a primitive root modulo ANSWER_ID_PRIME
ANSWER_ID_MAX_LEN = 2 ** 20  # keeps the 12-bit half-sums of the hash below 2**32
TRUNCATED_MODES = ("span", "one")
_FINISHED_MARK, _TRUNCATED_MARK = 1, 2


def _id_tuple(name: str, ids: Any) -> tuple[int, ...]:
  """One token id or a sequence of them, as a non-empty tuple of Python ints."""
  if isinstance(ids, bool):
    raise ValueError(f"{name} must be a token id or a sequence of ids, got {ids!r}.")  # noqa: TRY004
  if np.ndim(ids) == 0:
    return (int(ids),)
  try:
    out = tuple(int(i) for i in ids)
  except TypeError:
    raise ValueError(
        f"{name} must be a token id or a sequence of ids, got {ids!r}.") from None
  if not out:
    raise ValueError(f"{name} must contain at least one token id.")
  return out


def _isin(tokens: Array, ids: tuple[int, ...]) -> Array:
  return jnp.isin(tokens, jnp.asarray(ids, dtype=tokens.dtype))


def answer_span(completion_BL: Any, mask_BL: Any, *, eos_id: Any) -> tuple[Array, Array]:
  """The answer span of each completion: tokens before the first stop or mask end.

  Returns ``(span_mask_BL, span_len_B)`` where span_len_b = min{t : y_{b,t} ∈ eos
  or m_{b,t} = 0} (L when there is none) and span_mask_{b,t} = [t < span_len_b].
  """
  eos = _id_tuple("eos_id", eos_id)
  completion_BL = jnp.asarray(completion_BL)
  mask_BL = jnp.asarray(mask_BL) != 0
  if completion_BL.ndim != 2 or completion_BL.shape != mask_BL.shape:
    raise ValueError(
        f"completion_BL and mask_BL must both be (B, L); got {completion_BL.shape} "
        f"and {mask_BL.shape}.")
  length = completion_BL.shape[1]
  stop_BL = _isin(completion_BL, eos) | ~mask_BL
  span_len_B = jnp.where(
      jnp.any(stop_BL, axis=-1), jnp.argmax(stop_BL, axis=-1), length).astype(jnp.int32)
  span_mask_BL = jnp.arange(length, dtype=jnp.int32)[None, :] < span_len_B[:, None]
  return span_mask_BL, span_len_B


def exact_match(inputs: RewardInputs, *, eos_id: Any) -> Array:
  """1.0 where the completion's answer span equals the reference answer token for token.

  correct_b = finished_b ∧ (span_len_b = |a_b|) ∧ ∀ t < |a_b|: y_{b,t} = a_{b,t},
  with a_b = ``task["answer_BA"]``, |a_b| = Σ ``task["answer_mask_BA"]`` and the
  span as in `answer_span`. A truncated completion (``finished_B`` False) is
  never correct, even if its prefix matches. Works for any L and A: an answer
  longer than L can never be matched.
  """
  check_inputs(inputs)
  answer_BA = inputs.task_array("answer_BA")
  answer_mask_BA = inputs.task_array("answer_mask_BA") != 0
  batch, length = inputs.completion_BL.shape
  if answer_BA.ndim != 2 or answer_BA.shape != answer_mask_BA.shape or answer_BA.shape[0] != batch:
    raise ValueError(
        f"task['answer_BA'] and task['answer_mask_BA'] must both be ({batch}, A); got "
        f"{answer_BA.shape} and {answer_mask_BA.shape}.")
  _, span_len_B = answer_span(inputs.completion_BL, inputs.completion_mask_BL, eos_id=eos_id)
  answer_len_B = jnp.sum(answer_mask_BA, axis=-1, dtype=jnp.int32)
  # Positions past min(L, A) need no comparison: span_len = |a| forces |a| <= min(L, A).
  n = min(length, answer_BA.shape[1])
  completion = jnp.asarray(inputs.completion_BL)[:, :n]
  same = (completion == answer_BA[:, :n].astype(completion.dtype)) | ~answer_mask_BA[:, :n]
  correct_B = (jnp.asarray(inputs.finished_B, bool) & (span_len_B == answer_len_B)
               & jnp.all(same, axis=-1))
  return correct_B.astype(jnp.float32)


def format_reward(
    inputs: RewardInputs,
    *,
    allowed_ids: Sequence[int],
    eos_id: Any,
    allow_empty: bool = False,
) -> Array:
  """1.0 where the completion finished and its answer span uses only ``allowed_ids``.

  format_b = finished_b ∧ ∀ t < span_len_b: y_{b,t} ∈ allowed_ids
             ∧ (span_len_b > 0 unless ``allow_empty``).
  E.g. ``allowed_ids`` = the digit ids (plus '-') for an arithmetic task.
  """
  check_inputs(inputs)
  allowed = _id_tuple("allowed_ids", allowed_ids)
  span_mask_BL, span_len_B = answer_span(
      inputs.completion_BL, inputs.completion_mask_BL, eos_id=eos_id)
  ok_BL = _isin(jnp.asarray(inputs.completion_BL), allowed) | ~span_mask_BL
  ok_B = jnp.asarray(inputs.finished_B, bool) & jnp.all(ok_BL, axis=-1)
  if not allow_empty:
    ok_B = ok_B & (span_len_B > 0)
  return ok_B.astype(jnp.float32)


def tokens_to_int(
    tokens_BL: Any,
    mask_BL: Any,
    digit_ids: Sequence[int],
    minus_id: int | None = None,
) -> tuple[Array, Array]:
  """Parses the masked tokens of each row as a decimal integer, in-graph.

  The masked tokens (in order) must read ``[-]d…d``: an optional leading minus
  (when ``minus_id`` is given) followed by at least one digit, where
  ``digit_ids[k]`` is the token of digit k. Then

    value_b = ± Σ_t d_t · 10^(number of digits after t),

  computed in int32; leading zeros are allowed. ``ok_b`` is False (and value 0)
  when a masked token is neither a digit nor the leading minus, when there is
  no digit, or when the number has more than nine significant digits (it would
  overflow int32).

  Returns ``(value_B int32, ok_B bool)``.
  """
  digits = _id_tuple("digit_ids", digit_ids)
  if len(digits) != 10 or len(set(digits)) != 10:
    raise ValueError(
        f"digit_ids must hold 10 distinct token ids, for '0'..'9'; got {digit_ids!r}.")
  if minus_id is not None:
    minus_id = _id_tuple("minus_id", minus_id)
    if len(minus_id) != 1 or minus_id[0] in digits:
      raise ValueError(f"minus_id must be one token id that is not a digit id; got {minus_id!r}.")
    minus_id = minus_id[0]
  tokens_BL = jnp.asarray(tokens_BL)
  m_BL = jnp.asarray(mask_BL) != 0
  if tokens_BL.ndim != 2 or tokens_BL.shape != m_BL.shape:
    raise ValueError(
        f"tokens_BL and mask_BL must both be (B, L); got {tokens_BL.shape} and {m_BL.shape}.")
  length = tokens_BL.shape[1]
  t_L = jnp.arange(length, dtype=jnp.int32)

  match_BLD = tokens_BL[:, :, None] == jnp.asarray(digits, tokens_BL.dtype)
  is_digit_BL = m_BL & jnp.any(match_BLD, axis=-1)
  d_BL = jnp.argmax(match_BLD, axis=-1).astype(jnp.int32)

  if minus_id is None:
    is_minus_BL = jnp.zeros_like(m_BL)
  else:
    first_B = jnp.argmax(m_BL, axis=-1)  # first masked position
    is_minus_BL = m_BL & (tokens_BL == minus_id) & (t_L[None, :] == first_B[:, None])
  negative_B = jnp.any(is_minus_BL, axis=-1)
  bad_B = jnp.any(m_BL & ~is_digit_BL & ~is_minus_BL, axis=-1)

  n_digits_B = jnp.sum(is_digit_BL, axis=-1, dtype=jnp.int32)
  after_BL = n_digits_B[:, None] - jnp.cumsum(is_digit_BL, axis=-1, dtype=jnp.int32)
  significant_BL = is_digit_BL & (jnp.cumsum(is_digit_BL & (d_BL > 0), axis=-1) > 0)
  n_significant_B = jnp.sum(significant_BL, axis=-1, dtype=jnp.int32)
  # Leading zeros may sit more than 9 places up; they contribute 0 whatever the power.
  pow_BL = jnp.asarray(_POW10, jnp.int32)[jnp.clip(after_BL, 0, MAX_INT_DIGITS)]
  magnitude_B = jnp.sum(jnp.where(is_digit_BL, d_BL * pow_BL, 0), axis=-1, dtype=jnp.int32)

  ok_B = ~bad_B & (n_digits_B > 0) & (n_significant_B <= MAX_INT_DIGITS)
  value_B = jnp.where(negative_B, -magnitude_B, magnitude_B)
  return jnp.where(ok_B, value_B, 0).astype(jnp.int32), ok_B


def numeric_match(
    inputs: RewardInputs,
    *,
    digit_ids: Sequence[int],
    minus_id: int | None = None,
    eos_id: Any,
) -> Array:
  """1.0 where the answer span parses as an integer equal to ``task["target_B"]``.

  correct_b = finished_b ∧ ok_b ∧ value_b = target_b, with (value, ok) =
  `tokens_to_int` of the answer span (see `answer_span`). Unlike `exact_match`,
  "007" and "7" both match target 7.
  """
  check_inputs(inputs)
  target_B = inputs.task_array("target_B")
  batch = inputs.completion_BL.shape[0]
  if target_B.shape != (batch,):
    raise ValueError(f"task['target_B'] must have shape ({batch},), got {target_B.shape}.")
  span_mask_BL, _ = answer_span(inputs.completion_BL, inputs.completion_mask_BL, eos_id=eos_id)
  value_B, ok_B = tokens_to_int(inputs.completion_BL, span_mask_BL, digit_ids, minus_id)
  correct_B = jnp.asarray(inputs.finished_B, bool) & ok_B & (value_B == target_B)
  return correct_B.astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _powers_mod(base: int, count: int, prime: int) -> np.ndarray:
  """base^t mod prime for t = 0 .. count − 1, as uint32."""
  out = np.empty((count,), np.uint32)
  value = 1
  for t in range(count):
    out[t] = value
    value = value * base % prime
  out.flags.writeable = False
  return out


def _mulmod(a: Array, b: Array, prime: int) -> Array:
  """(a · b) mod prime for uint32 a, b in [0, prime), prime < 2**24, exact in uint32.

  Horner over the bytes of b = b2·2^16 + b1·2^8 + b0:
  a·b = ((a·b2)·2^8 + a·b1)·2^8 + a·b0, reducing after every step. Each product
  a·b_k < 2^24 · 2^8 and each r·2^8 (r < prime) stays below 2^32; each sum of two
  residues stays below 2^25.
  """
  r = (a * (b >> 16)) % prime
  r = ((r << 8) % prime + (a * ((b >> 8) & 0xFF)) % prime) % prime
  return ((r << 8) % prime + (a * (b & 0xFF)) % prime) % prime


def answer_span_id(
    completion_BL: Any,
    mask_BL: Any,
    finished_B: Any,
    *,
    eos_id: Any,
    truncated: str = "span",
    base: int = ANSWER_ID_BASE,
) -> Array:
  """An int32 id of each completion's answer span: equal spans get equal ids.

  With the span y_{b,0..n−1} of `answer_span` (n = span_len_b; tokens at and after
  the first stop token and outside the mask are ignored), c_t = y_{b,t} + 1, a mark
  τ_b = 1 when ``finished_B`` else 2, p = ``ANSWER_ID_PRIME`` = 16 777 213 (the
  largest prime below 2^24) and x = ``base``:

    id_b = (Σ_{t<n} c_t · x^t + τ_b · x^n) mod p    ∈ [0, p),

  computed exactly in uint32 (see `_mulmod`; needs L ≤ ``ANSWER_ID_MAX_LEN`` = 2^20).
  Equal (span, mark) pairs give equal ids. Different pairs (other tokens, the same
  tokens in another order, one a prefix of the other, finished vs truncated) are
  different polynomials in x of degree ≤ L: for a base drawn uniformly they
  collide with probability ≤ L/p (Schwartz–Zippel); with the fixed default base
  the ids of completions not crafted against it behave as uniform draws from p
  values, a collision probability ≈ 1/p ≈ 6·10⁻⁸ per pair, ≤ G(G−1)/(2p) per group
  (≈ 7·10⁻⁶ for G = 16). A collision merges two labels of one group, which only
  lowers that group's answer entropy. Token ids must lie in [0, p − 1), true of
  every real vocabulary.

  Truncated completions (``finished_B`` False) have no final answer:
    truncated="span"  (default) hash their whole span with the mark τ = 2, an id
                      space of their own (a truncated span and a finished one
                      with the same tokens get different ids, w.h.p.);
    truncated="one"   all share the id 2 (the "no answer" outcome, the empty
                      truncated span's id).

  Ids are < 2^24, so a float32 copy (`base.compose` casts components to float32)
  holds them exactly.
  """
  if truncated not in TRUNCATED_MODES:
    raise ValueError(f"truncated must be one of {TRUNCATED_MODES}, got {truncated!r}.")
  prime = ANSWER_ID_PRIME
  if isinstance(base, bool) or int(base) != base or not 2 <= base < prime:
    raise ValueError(f"base must be an integer in [2, {prime}), got {base!r}.")
  completion_BL = jnp.asarray(completion_BL)
  span_mask_BL, span_len_B = answer_span(completion_BL, mask_BL, eos_id=eos_id)
  batch, length = completion_BL.shape
  finished_B = jnp.asarray(finished_B)
  if finished_B.shape != (batch,):
    raise ValueError(f"finished_B must have shape ({batch},), got {finished_B.shape}.")
  if length > ANSWER_ID_MAX_LEN:
    raise ValueError(f"answer ids support completions of at most {ANSWER_ID_MAX_LEN} tokens, "
                     f"got L = {length}.")
  finished_B = finished_B.astype(bool)
  u32 = jnp.uint32
  pow_L1 = jnp.asarray(_powers_mod(int(base), length + 1, prime))  # x^t, t = 0..L
  c_BL = jnp.where(span_mask_BL, (completion_BL.astype(u32) + 1) % prime, 0).astype(u32)
  term_BL = _mulmod(c_BL, pow_L1[None, :length], prime)
  # Σ_t term_t mod p: each term < 2^24 splits into 12-bit halves whose sums over
  # L ≤ 2^20 positions stay below 2^32.
  lo_B = jnp.sum(term_BL & 0xFFF, axis=-1, dtype=u32) % prime
  hi_B = jnp.sum(term_BL >> 12, axis=-1, dtype=u32) % prime
  mark_B = jnp.where(finished_B, _FINISHED_MARK, _TRUNCATED_MARK).astype(u32)
  mark_term_B = _mulmod(mark_B, pow_L1[span_len_B], prime)
  id_B = (_mulmod(hi_B, jnp.asarray(1 << 12, u32), prime) + lo_B + mark_term_B) % prime
  if truncated == "one":
    id_B = jnp.where(finished_B, id_B, _TRUNCATED_MARK)
  return id_B.astype(jnp.int32)


def answer_id(
    inputs: RewardInputs,
    *,
    eos_id: Any,
    truncated: str = "span",
    base: int = ANSWER_ID_BASE,
) -> Array:
  """`answer_span_id` of each completion (int32 [B]): an outcome label, not a reward.

  Equal ids = the same answer span, e.g. for COPO's answer entropy (the RL step
  passes a reward component named "answer_id" to the advantage estimator as
  ``answers_B``); give it weight 0 in `base.compose`.
  """
  check_inputs(inputs)
  return answer_span_id(inputs.completion_BL, inputs.completion_mask_BL, inputs.finished_B,
                        eos_id=eos_id, truncated=truncated, base=base)
