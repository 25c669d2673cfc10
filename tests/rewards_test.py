"""Tests for jaxrl_llm.rewards: protocol, verifiers, shaping and host rewards.

Expected values are worked out by hand (or by plain-Python loops following the
formula written next to them), independently of the implementation.
"""

import functools
import json
import math
import pathlib
import sys
import time
import types
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config, rewards, tokenizers
from jaxrl_llm.data import tasks
from jaxrl_llm.rewards import answers, base, host, registry, shaping, verifiers
from jaxrl_llm.rl import advantages, rl_step

# A toy vocabulary: pad 0, eos 2, digits '0'..'9' are ids 10..19, '-' is 20,
# letters 'a'.. are 30...
PAD, EOS, MINUS = 0, 2, 20
DIGITS = tuple(range(10, 20))


def _num(text):
  """Token ids of a string of digits and '-'."""
  return [MINUS if ch == "-" else DIGITS[int(ch)] for ch in text]


def _pad(rows, width):
  tokens = np.full((len(rows), width), PAD, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask


def _inputs(completions, finished, width, task=None):
  comp, mask = _pad(completions, width)
  batch = len(completions)
  return base.RewardInputs(
      prompt_tokens_BP=jnp.ones((batch, 3), jnp.int32),
      prompt_mask_BP=jnp.ones((batch, 3), bool),
      completion_BL=jnp.asarray(comp),
      completion_mask_BL=jnp.asarray(mask),
      finished_B=jnp.asarray(finished, bool),
      task={k: jnp.asarray(v) for k, v in (task or {}).items()},
  )


def _answers(answers, width):
  tokens, mask = _pad(answers, width)
  return {"answer_BA": tokens, "answer_mask_BA": mask}


# --------------------------------------------------------------------------
# base
# --------------------------------------------------------------------------


def test_package_exports():
  assert rewards.RewardInputs is base.RewardInputs
  assert rewards.host is host


def test_reward_inputs_lengths_and_task_errors():
  inputs = _inputs([[10, 11, EOS], [10]], [True, False], 4)
  np.testing.assert_array_equal(inputs.lengths_B, [3, 1])
  with pytest.raises(ValueError, match="answer_BA"):
    inputs.task_array("answer_BA")


def test_compose_weighted_total_and_parts():
  inputs = _inputs([[10], [11], [12]], [True] * 3, 2)
  first = lambda x: jnp.asarray([1.0, 0.0, 1.0])
  second = lambda x: x.lengths_B.astype(jnp.float32) * 2  # [2, 2, 2]
  fn = base.compose({"a": (first, 1.0), "b": (second, -0.5)})
  for f in (fn, jax.jit(fn)):
    total, parts = f(inputs)
    # total = 1.0 * a - 0.5 * b
    np.testing.assert_allclose(total, [0.0, -1.0, 0.0])
    np.testing.assert_allclose(parts["a"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(parts["b"], [2.0, 2.0, 2.0])
    assert total.dtype == jnp.float32


def test_compose_rejects_bad_components():
  with pytest.raises(ValueError):
    base.compose({})
  with pytest.raises(ValueError):
    base.compose({"a": lambda x: x})
  with pytest.raises(ValueError):
    base.compose({"a": ("not callable", 1.0)})
  with pytest.raises(ValueError, match="shape"):
    base.compose({"a": (lambda x: jnp.zeros((5,)), 1.0)})(_inputs([[10]], [True], 2))


# --------------------------------------------------------------------------
# verifiers
# --------------------------------------------------------------------------


def test_answer_span():
  comp, mask = _pad([[10, EOS, 11], [10, 11], [EOS], []], 4)
  span_mask, span_len = verifiers.answer_span(comp, mask, eos_id=EOS)
  np.testing.assert_array_equal(span_len, [1, 2, 0, 0])
  np.testing.assert_array_equal(span_mask[1], [1, 1, 0, 0])
  # Several stop ids: the first one of either counts.
  _, span_len = verifiers.answer_span(comp, mask, eos_id=(EOS, 11))
  np.testing.assert_array_equal(span_len, [1, 1, 0, 0])
  _, span_len = verifiers.answer_span(comp, mask, eos_id=np.int32(EOS))
  np.testing.assert_array_equal(span_len, [1, 2, 0, 0])


EXACT_CASES = [
    # (completion, finished, answer, expected)
    (_num("12") + [EOS], True, _num("12"), 1.0),      # match
    (_num("12") + [EOS], True, _num("123"), 0.0),     # completion shorter than answer
    (_num("123") + [EOS], True, _num("12"), 0.0),     # completion longer
    (_num("13") + [EOS], True, _num("12"), 0.0),      # wrong token
    (_num("12"), False, _num("12"), 0.0),             # truncated: never correct
    (_num("12") + [EOS, 11], True, _num("12"), 1.0),  # tokens after eos ignored
    ([EOS], True, [], 1.0),                           # empty answer, empty span
]


@pytest.mark.parametrize("jit", [False, True])
def test_exact_match(jit):
  comps, fins, answers, expected = zip(*EXACT_CASES)
  inputs = _inputs(comps, fins, 5, _answers(answers, 4))
  fn = functools.partial(verifiers.exact_match, eos_id=EOS)
  out = (jax.jit(fn) if jit else fn)(inputs)
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == jnp.float32


def test_exact_match_answer_longer_than_completion_and_mask_without_eos():
  # L = 2 < A = 4: the 3-token answer cannot be matched; the 2-token one can,
  # here with a mask that stops before the (absent) stop token.
  inputs = _inputs([_num("12"), _num("12"), _num("12")], [True, True, True], 2,
                   _answers([_num("123"), _num("12"), _num("1")], 4))
  np.testing.assert_array_equal(verifiers.exact_match(inputs, eos_id=EOS), [0.0, 1.0, 0.0])


def test_format_reward():
  allowed = DIGITS + (MINUS,)
  inputs = _inputs(
      [_num("-12") + [EOS],  # digits and minus, finished -> 1
       [10, 30, EOS],        # a letter -> 0
       _num("12"),           # not finished -> 0
       [EOS],                # empty -> 0 (1 with allow_empty)
       _num("7") + [EOS, 30]],  # after eos ignored -> 1
      [True, True, False, True, True], 5)
  fn = functools.partial(verifiers.format_reward, allowed_ids=allowed, eos_id=EOS)
  np.testing.assert_array_equal(jax.jit(fn)(inputs), [1, 0, 0, 0, 1])
  np.testing.assert_array_equal(
      verifiers.format_reward(inputs, allowed_ids=allowed, eos_id=EOS, allow_empty=True),
      [1, 0, 0, 1, 1])


INT_CASES = [
    # (text or token list, expected value, expected ok)
    ("123", 123, True),
    ("-45", -45, True),
    ("007", 7, True),
    ("0", 0, True),
    ("-0", 0, True),
    ("", 0, False),            # empty
    ("-", 0, False),           # no digit
    ("1-2", 0, False),         # minus not leading
    ("--3", 0, False),
    ("999999999", 999999999, True),     # nine significant digits fit int32
    ("1000000000", 0, False),           # ten do not
    ("000000000000012", 12, True),      # leading zeros do not count
    ([DIGITS[4], 30], 0, False),        # a non-digit token
]


@pytest.mark.parametrize("jit", [False, True])
def test_tokens_to_int(jit):
  rows = [_num(t) if isinstance(t, str) else t for t, _, _ in INT_CASES]
  tokens, mask = _pad(rows, 16)
  fn = functools.partial(verifiers.tokens_to_int, digit_ids=DIGITS, minus_id=MINUS)
  value, ok = (jax.jit(fn) if jit else fn)(tokens, mask)
  np.testing.assert_array_equal(value, [v for _, v, _ in INT_CASES])
  np.testing.assert_array_equal(ok, [k for _, _, k in INT_CASES])
  assert value.dtype == jnp.int32


def test_tokens_to_int_mask_and_no_minus():
  tokens, _ = _pad([_num("1234"), _num("-5")], 4)
  mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], bool)  # reads "23" and "-5"
  value, ok = verifiers.tokens_to_int(tokens, mask, DIGITS, MINUS)
  np.testing.assert_array_equal(value, [23, -5])
  np.testing.assert_array_equal(ok, [True, True])
  value, ok = verifiers.tokens_to_int(tokens, mask, DIGITS)  # '-' is not allowed
  np.testing.assert_array_equal(ok, [True, False])
  with pytest.raises(ValueError, match="10 distinct"):
    verifiers.tokens_to_int(tokens, mask, DIGITS[:9])
  with pytest.raises(ValueError, match="minus_id"):
    verifiers.tokens_to_int(tokens, mask, DIGITS, DIGITS[0])


def test_numeric_match():
  inputs = _inputs(
      [_num("007") + [EOS], _num("-12") + [EOS], _num("12") + [EOS], _num("7"), [30, EOS]],
      [True, True, True, False, True], 5,
      {"target_B": np.array([7, -12, -12, 7, 0], np.int32)})
  fn = functools.partial(verifiers.numeric_match, digit_ids=DIGITS, minus_id=MINUS, eos_id=EOS)
  # "007" = 7; "-12" = -12; "12" != -12; truncated; not a number.
  np.testing.assert_array_equal(jax.jit(fn)(inputs), [1, 1, 0, 0, 0])


# --------------------------------------------------------------------------
# answer ids (outcome labels for COPO)
# --------------------------------------------------------------------------


def _reference_answer_id(span, finished, truncated="span"):
  """The docstring's formula in Python ints: (Σ_t (y_t + 1)·x^t + τ·x^n) mod p."""
  p, x = verifiers.ANSWER_ID_PRIME, verifiers.ANSWER_ID_BASE
  if not finished and truncated == "one":
    return 2
  mark = 1 if finished else 2
  return (sum((y + 1) * pow(x, t, p) for t, y in enumerate(span))
          + mark * pow(x, len(span), p)) % p


def _answer_ids(completions, finished, width, jit=False, **options):
  inputs = _inputs(completions, finished, width)
  fn = functools.partial(verifiers.answer_id, eos_id=EOS, **options)
  return np.asarray((jax.jit(fn) if jit else fn)(inputs))


@pytest.mark.parametrize("jit", [False, True])
def test_answer_id_equal_spans_equal_ids(jit):
  inputs = _inputs([_num("12") + [EOS],
                    _num("12") + [EOS, 11, EOS],  # tokens after EOS are ignored
                    _num("12"),                   # EOS left out of the mask, still finished
                    _num("12") + [EOS]],
                   [True] * 4, 7)
  # Padding (outside the mask) holds anything: it is ignored.
  completion = np.asarray(inputs.completion_BL).copy()
  completion[3, 3:] = [13, 14, 15, 16]
  inputs = inputs._replace(completion_BL=jnp.asarray(completion))
  fn = functools.partial(verifiers.answer_id, eos_id=EOS)
  ids = (jax.jit(fn) if jit else fn)(inputs)
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, [_reference_answer_id(_num("12"), True)] * 4)


@pytest.mark.parametrize("jit", [False, True])
def test_answer_id_different_spans_different_ids(jit):
  spans = [_num("12"), _num("21"),                  # same tokens, other order
           _num("123"), _num("132"), _num("321"), _num("213"),
           _num("1234"), _num("1235"), _num("1243"),  # differ after a shared prefix
           _num("1"), [], _num("0"), _num("00"), _num("-12"), [PAD], [PAD, PAD]]
  ids = _answer_ids([s + [EOS] for s in spans], [True] * len(spans), 6, jit=jit)
  assert len(set(ids.tolist())) == len(spans)
  assert np.all((ids >= 0) & (ids < 2 ** 24))  # exact in float32
  np.testing.assert_array_equal(ids, [_reference_answer_id(s, True) for s in spans])


def test_answer_id_all_short_spans_are_distinct():
  # Every span of at most 3 tokens over the 11 symbols 0-9 and '-': 1 + 11 + 121 + 1331.
  symbols = [*DIGITS, MINUS]
  spans = [[]] + [[a] for a in symbols] + [[a, b] for a in symbols for b in symbols]
  spans += [[a, b, c] for a in symbols for b in symbols for c in symbols]
  ids = _answer_ids([s + [EOS] for s in spans], [True] * len(spans), 4, jit=True)
  assert len(set(ids.tolist())) == len(spans) == 1464


def test_answer_id_truncated():
  comps = [_num("12") + [EOS], _num("12"), _num("12"), _num("345"), [EOS]]
  finished = [True, True, False, False, True]
  ids = _answer_ids(comps, finished, 3)
  # Truncated rows are hashed with their own mark: "12" truncated != "12" finished.
  assert ids[0] == ids[1] != ids[2] != ids[3]
  np.testing.assert_array_equal(
      ids, [_reference_answer_id(s, f) for s, f in
            zip([_num("12"), _num("12"), _num("12"), _num("345"), []], finished)])
  one = _answer_ids(comps, finished, 3, truncated="one")
  np.testing.assert_array_equal(one, [ids[0], ids[1], 2, 2, ids[4]])


def test_answer_id_matches_the_formula_on_random_rows():
  rng = np.random.default_rng(0)
  batch, length = 32, 300
  tokens_BL = rng.integers(0, 250_000, (batch, length)).astype(np.int32)
  tokens_BL[rng.random((batch, length)) < 0.01] = EOS
  lengths_B = rng.integers(0, length + 1, batch)
  mask_BL = np.arange(length)[None, :] < lengths_B[:, None]
  finished_B = rng.random(batch) < 0.5
  ids = verifiers.answer_span_id(tokens_BL, mask_BL, finished_B, eos_id=EOS)
  want = []
  for row, n, fin in zip(tokens_BL, lengths_B, finished_B):
    span = []
    for y in row[:n]:
      if y == EOS:
        break
      span.append(int(y))
    want.append(_reference_answer_id(span, fin))
  np.testing.assert_array_equal(ids, want)


def test_answer_id_errors():
  comp, mask = _pad([_num("1")], 2)
  with pytest.raises(ValueError, match="truncated"):
    verifiers.answer_span_id(comp, mask, [True], eos_id=EOS, truncated="drop")
  with pytest.raises(ValueError, match="base"):
    verifiers.answer_span_id(comp, mask, [True], eos_id=EOS, base=1)
  with pytest.raises(ValueError, match="finished_B"):
    verifiers.answer_span_id(comp, mask, [True, False], eos_id=EOS)


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

_CHARS = {**{d: str(k) for k, d in enumerate(DIGITS)}, MINUS: "-"}
TOK = types.SimpleNamespace(
    eos_id=EOS,
    encode=lambda text: _num(text),
    decode_batch=lambda rows: ["".join(_CHARS.get(t, "?") for t in row if t != EOS)
                               for row in rows],
)
CORRECT_AND_IDS = (("correct", 1.0), ("answer_id", 0.0))


def _task_inputs(texts, reference, finished=None):
  """One completion per text (EOS-terminated), each scored against `reference`."""
  rows = [_num(t) + [EOS] for t in texts]
  answers, answer_mask = _pad([_num(reference) + [EOS]] * len(texts), 4)
  return _inputs(rows, finished or [True] * len(texts), 6,
                 {"answer_tokens": answers, "answer_mask": answer_mask})


def test_registry_answer_id_component():
  fn = registry.build_reward_fn(CORRECT_AND_IDS, TOK)
  inputs = _task_inputs(["3", "5", "3", "12"], "3")
  total, comps = jax.jit(fn)(inputs)
  np.testing.assert_array_equal(total, [1.0, 0.0, 1.0, 0.0])  # answer_id adds nothing
  np.testing.assert_array_equal(comps["correct"], total)
  want = [_reference_answer_id(_num(t), True) for t in ("3", "5", "3", "12")]
  # compose casts components to float32; the ids (< 2**24) survive exactly.
  np.testing.assert_array_equal(np.asarray(comps["answer_id"]).astype(np.int64), want)
  assert comps["answer_id"][0] == comps["answer_id"][2] != comps["answer_id"][1]


@pytest.mark.parametrize("weight", [1.0, -0.5, 1e-3])
def test_registry_rejects_weighted_answer_id(weight):
  components = (("correct", 1.0), ("answer_id", weight))
  with pytest.raises(ValueError, match="label.*not a reward"):
    registry.build_reward_fn(components, TOK)
  with pytest.raises(ValueError, match="label.*not a reward"):
    registry.host_scorer(components, TOK, [])


def test_registry_rejects_labels_without_a_reward():
  with pytest.raises(ValueError, match="no reward"):
    registry.build_reward_fn((("answer_id", 0.0),), TOK)


def test_host_scorer_answer_ids_match_in_graph():
  components = (("format", 1.0), ("answer_id", 0.0))
  inputs = _task_inputs(["3", "5", "3", "12", "7"], "3", [True, True, True, True, False])
  _, comps = registry.build_reward_fn(components, TOK)(inputs)
  ro = {"completion": np.asarray(inputs.completion_BL),
        "completion_mask": np.asarray(inputs.completion_mask_BL),
        "finished": np.asarray(inputs.finished_B), "prompt_id": np.zeros((5,), np.int32)}
  total, parts = registry.host_scorer(components, TOK, [{}])(ro)
  np.testing.assert_array_equal(total, [1.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(parts["answer_id"], np.asarray(comps["answer_id"]))
  assert parts["answer_id"].dtype == np.int32


def test_copo_with_answer_ids_differs_from_rewards_as_labels():
  # Three groups of 4, reference answer 3: all wrong with 3 distinct answers, all wrong
  # with one answer, and half right with 3 distinct answers.
  texts = ["5", "5", "7", "9"] + ["5", "5", "5", "5"] + ["3", "3", "7", "9"]
  fn = registry.build_reward_fn(CORRECT_AND_IDS, TOK)

  @jax.jit
  def both(inputs):
    rewards_B, comps = fn(inputs)
    return (advantages.copo_terms(rewards_B, 4, answers_B=comps["answer_id"]),
            advantages.copo_terms(rewards_B, 4))

  by_id, by_reward = both(_task_inputs(texts, "3"))
  # H_p = −Σ_a q_a log2 q_a: {1/2, 1/4, 1/4} -> 1.5 bits, {1} -> 0, and by reward
  # {0: 1} -> 0 for the all-wrong groups, {1/2, 1/2} -> 1 bit for the mixed one.
  np.testing.assert_allclose(by_id.entropy_P, [1.5, 0.0, 1.5], atol=1e-6)
  np.testing.assert_allclose(by_reward.entropy_P, [0.0, 0.0, 1.0], atol=1e-6)
  # w_i = sigmoid(k·(H_p − b))·[r_i ≠ 0], k = 5, b = 1: only the mixed group's right rows.
  sig = lambda z: 1.0 / (1.0 + math.exp(-z))
  np.testing.assert_allclose(by_id.weight_B[8:], [sig(2.5)] * 2 + [0.0] * 2, rtol=1e-5)
  np.testing.assert_allclose(by_reward.weight_B[8:], [sig(0.0)] * 2 + [0.0] * 2, rtol=1e-5)
  # A_i = (1 − w_i)·A^glob_i + w_i·A^loc_i with A^loc, A^glob the same either way.
  np.testing.assert_allclose(by_id.local_B, by_reward.local_B)
  np.testing.assert_allclose(by_id.global_B, by_reward.global_B)
  for terms, w in ((by_id, sig(2.5)), (by_reward, sig(0.0))):
    want = (1 - w) * terms.global_B[8] + w * terms.local_B[8]
    np.testing.assert_allclose(terms.adv_B[8], want, rtol=1e-5)
  assert abs(float(by_id.adv_B[8]) - float(by_reward.adv_B[8])) > 0.1
  # Rewards as labels lump the two all-wrong groups together; the ids tell them apart.
  assert by_reward.entropy_P[0] == by_reward.entropy_P[1]
  assert by_id.entropy_P[0] > by_id.entropy_P[1]


# --------------------------------------------------------------------------
# shaping
# --------------------------------------------------------------------------


def test_length_mask():
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], np.int32)
  new, truncated = jax.jit(shaping.length_mask)(mask, jnp.int32(3))
  np.testing.assert_array_equal(new, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(truncated, [True, False, True])
  assert new.dtype == mask.dtype


def test_dler_truncation_and_difficulty_budget():
  r = np.array([1.0, 1.0, 0.5, 0.0])
  lengths = np.array([10, 30, 20, 50])
  # budget 20: lengths 30 and 50 exceed it -> 0.
  np.testing.assert_allclose(shaping.dler_truncation(r, lengths, 20), [1.0, 0.0, 0.5, 0.0])
  np.testing.assert_allclose(
      jax.jit(shaping.dler_truncation)(r, lengths, jnp.array([5, 40, 40, 40])),
      [0.0, 1.0, 0.5, 0.0])
  # Two groups of 4: accuracies 0.75 and 0.25; threshold 0.75 -> group 0 easy.
  correct = np.array([1, 1, 1, 0, 0, 1, 0, 0])
  budget = shaping.difficulty_aware_budget(correct, 4, 100, 40, 0.75)
  np.testing.assert_array_equal(budget, [40] * 4 + [100] * 4)
  with pytest.raises(ValueError, match="multiple"):
    shaping.difficulty_aware_budget(correct[:7], 4, 100, 40, 0.75)


def _hapo_ref(length, correct, h, weight):
  if h is None:
    return 0.0
  f = math.cos(min(math.pi / 2 * length / max(h, 1), math.pi))
  return weight * (f if correct else min(f, 0.0))


def test_hapo_length_reward_golden():
  none = shaping.HAPO_NO_HISTORY
  lengths = [50, 100, 200, 300, 50, 150, 300, 80]
  correct = [1, 1, 1, 1, 0, 0, 0, 1]
  history = [100, 100, 100, 100, 100, 100, 100, none]
  out = jax.jit(functools.partial(shaping.hapo_length_reward, weight=0.5))(
      np.array(lengths), np.array(correct), np.array(history, np.int32))
  expected = [_hapo_ref(l, c, None if h == none else h, 0.5)
              for l, c, h in zip(lengths, correct, history)]
  # By hand: 0.5*cos(π/4), 0.5*cos(π/2)=0, 0.5*cos(π)=-0.5, -0.5 (capped);
  # incorrect: 0 (short, not rewarded), 0.5*cos(3π/4), -0.5; no history -> 0.
  np.testing.assert_allclose(expected, [0.5 * math.sqrt(0.5), 0.0, -0.5, -0.5,
                                        0.0, 0.5 * math.cos(3 * math.pi / 4), -0.5, 0.0],
                             atol=1e-12)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_hapo_incorrect_never_exceeds_correct():
  lengths = np.arange(0, 400)
  h = np.full_like(lengths, 100)
  good = shaping.hapo_length_reward(lengths, np.ones_like(lengths), h)
  bad = shaping.hapo_length_reward(lengths, np.zeros_like(lengths), h)
  assert np.all(np.abs(bad) <= np.abs(good) + 1e-6)
  assert np.all(bad <= 0.0)


def test_hapo_history_across_two_steps():
  g = 2
  history = shaping.hapo_init_history(4)
  prompt_ids = np.array([3, 1])  # two groups: prompt 3 and prompt 1

  # Step 1: nothing seen yet, so the length reward is 0 everywhere.
  lengths1 = np.array([40, 20, 30, 10])
  correct1 = np.array([1, 1, 0, 0])
  r1 = shaping.hapo_length_reward(lengths1, correct1, history[np.repeat(prompt_ids, g)])
  np.testing.assert_array_equal(r1, np.zeros(4))
  history = jax.jit(shaping.hapo_update_history, static_argnums=4)(
      history, prompt_ids, lengths1, correct1, g)
  none = shaping.HAPO_NO_HISTORY
  np.testing.assert_array_equal(history, [none, none, none, 20])  # prompt 1: no correct

  # Step 2: prompt 3 again (h = 20) and prompt 3 once more in the same batch.
  prompt_ids = np.array([3, 3])
  lengths2 = np.array([10, 40, 15, 30])
  correct2 = np.array([1, 1, 1, 0])
  r2 = shaping.hapo_length_reward(lengths2, correct2, history[np.repeat(prompt_ids, g)])
  # h = 20: cos(π/4), cos(π) = -1, cos(3π/8), incorrect min(cos(3π/4), 0).
  np.testing.assert_allclose(r2, [math.cos(math.pi / 4), -1.0, math.cos(3 * math.pi / 8),
                                  math.cos(3 * math.pi / 4)], atol=1e-6)
  history = shaping.hapo_update_history(history, prompt_ids, lengths2, correct2, g)
  np.testing.assert_array_equal(history, [none, none, none, 10])  # min(20, 10, 15)
  # Ids outside [0, N) change nothing.
  same = shaping.hapo_update_history(history, np.array([-1, 4]), lengths2, correct2, g)
  np.testing.assert_array_equal(same, history)


def test_grpo_lambda_golden():
  g = 4
  # Group accuracies: 1.0, 0.5, 0.75, 0.0.
  correct = np.array([1, 1, 1, 1,  1, 0, 1, 0,  1, 1, 1, 0,  0, 0, 0, 0])
  lengths = np.array([10, 20, 30, 40,  10, 20, 30, 40,  50, 60, 70, 80,  10, 20, 30, 40])
  selected = shaping.grpo_lambda_groups(correct, g, 0.5)
  # k = ceil(0.5 * 4) = 2 -> threshold = 2nd largest accuracy = 0.75 -> groups 0 and 2.
  np.testing.assert_array_equal(selected, [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4)
  fn = functools.partial(shaping.grpo_lambda, group_size=g, top_fraction=0.5,
                         length_weight=0.5, max_len=100)
  out = jax.jit(fn)(correct, lengths)
  expected = []
  for i, (c, l) in enumerate(zip(correct, lengths)):
    sel = (i // g) in (0, 2)
    expected.append(c * (1 - 0.5 * l / 100) if sel else float(c))  # c·(1 − α·|y|/L_max)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  np.testing.assert_allclose(out[:4], [0.95, 0.9, 0.85, 0.8], atol=1e-6)


def test_grpo_lambda_ties_and_extremes():
  correct = np.array([1, 1, 1, 1, 1, 0, 0, 0])  # accuracies 1, 1, 0.5, 0 with G = 2
  # k = ceil(0.25 * 4) = 1, but groups 0 and 1 tie at the top: both selected.
  np.testing.assert_array_equal(shaping.grpo_lambda_groups(correct, 2, 0.25),
                                [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(shaping.grpo_lambda_groups(correct, 2, 0.0), [0] * 8)
  # top_fraction 1: every group with a correct answer.
  np.testing.assert_array_equal(shaping.grpo_lambda_groups(correct, 2, 1.0),
                                [1, 1, 1, 1, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="top_fraction"):
    shaping.grpo_lambda_groups(correct, 2, 1.5)


def test_siri_schedule():
  fn = functools.partial(shaping.siri_max_length, short_len=256, long_len=1024, period=10,
                         compress_fraction=0.3)
  steps = [0, 1, 2, 3, 9, 10, 12, 13, 25]
  expected = [256, 256, 256, 1024, 1024, 256, 256, 1024, 1024]  # φ = step mod 10 < 3
  assert [int(fn(s)) for s in steps] == expected
  np.testing.assert_array_equal(jax.jit(jax.vmap(fn))(jnp.array(steps)), expected)
  with pytest.raises(ValueError):
    shaping.siri_max_length(0, short_len=2048, long_len=1024, period=10, compress_fraction=0.5)


def test_staged_max_length():
  fn = functools.partial(shaping.staged_max_length, stage_steps=(0, 100, 300),
                         stage_lengths=(512, 1024, 2048))
  for step, want in [(0, 512), (99, 512), (100, 1024), (299, 1024), (300, 2048), (10**6, 2048)]:
    assert int(fn(step)) == want
    assert int(jax.jit(fn)(jnp.int32(step))) == want
  with pytest.raises(ValueError, match="start at 0"):
    shaping.staged_max_length(0, stage_steps=(5, 10), stage_lengths=(1, 2))
  with pytest.raises(ValueError):
    shaping.staged_max_length(0, stage_steps=(0, 10), stage_lengths=(1,))


def _rep_ref(tokens, mask, n):
  """Plain-Python reference: fraction of valid n-grams seen earlier."""
  grams = [tuple(tokens[t:t + n]) for t in range(len(tokens) - n + 1)
           if all(mask[t:t + n])]
  if not grams:
    return 0.0
  return sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams)


def test_ngram_repetition_penalty_crafted():
  rows = [[1, 2, 3, 1, 2, 3],   # n-grams 123 231 312 123: 1 repeat of 4
          [5, 5, 5, 5, 5, 5],   # 4 identical n-grams: 3 repeats
          [1, 2, 3, 4, 5, 6],   # none repeat
          [1, 2, 3, 1, 2],      # 3 n-grams, none repeat
          [7, 7]]               # shorter than n: 0
  tokens, mask = _pad(rows, 6)
  fn = functools.partial(shaping.ngram_repetition_penalty, n=3)
  out = jax.jit(fn)(tokens, mask)
  np.testing.assert_allclose(out, [0.25, 0.75, 0.0, 0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(shaping.ngram_repetition_penalty(tokens, mask, n=1),
                             [0.5, 5 / 6, 0.0, 0.4, 0.5], atol=1e-7)
  # L < n: zeros with the right shape.
  np.testing.assert_array_equal(shaping.ngram_repetition_penalty(tokens[:, :2], mask[:, :2]),
                                np.zeros(5))


def test_ngram_repetition_penalty_matches_reference():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 3, size=(6, 24))
  lengths = rng.integers(0, 25, size=6)
  mask = np.arange(24)[None, :] < lengths[:, None]
  mask[0, 5] = False  # a hole: n-grams covering it do not count
  for n in (2, 3, 4):
    want = [_rep_ref(list(t), list(m), n) for t, m in zip(tokens, mask)]
    np.testing.assert_allclose(shaping.ngram_repetition_penalty(tokens, mask, n=n), want,
                               atol=1e-6)


def test_repetition_penalty_weight():
  fn = functools.partial(shaping.repetition_penalty_weight, start=0.0, end=0.2, warmup_steps=100)
  # w = 0 + 0.2 * min(step / 100, 1)
  for step, want in [(0, 0.0), (25, 0.05), (100, 0.2), (500, 0.2)]:
    np.testing.assert_allclose(jax.jit(fn)(step), want, atol=1e-7)
  np.testing.assert_allclose(
      shaping.repetition_penalty_weight(3, start=1.0, end=0.5, warmup_steps=0), 0.5)


# --------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pred, gold, want", [
    ("1/2", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("The answer is \\boxed{\\dfrac{1}{2}}.", "1/2", True),
    ("#### 42", "42", True),
    ("$1,234$", "1234", True),
    ("x = 5", "5", True),
    ("0.3333", "1/3", False),
    ("43", "42", False),
    ("(x+1)^2", "x^2 + 2x + 1", True),     # sympy: simplify(a − b) = 0
    ("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}", True),
    ("garbage ?!", "42", False),
    ("", "", False),
])
def test_math_equal(pred, gold, want):
  assert host.math_equal(pred, gold) is want


def test_math_equal_timeout_is_counted():
  before = host.math_equal_stats()["timeouts"]
  start = time.monotonic()
  # A power tower: the worker process is killed once the timeout passes.
  assert host.math_equal("9^9^9^9", "1", timeout_s=0.3) is False
  assert host.math_equal_stats()["timeouts"] == before + 1
  assert time.monotonic() - start < 30  # process startup (not timed) + 0.3 s


def test_extract_answer():
  assert host.extract_answer("so \\boxed{\\frac{3}{4}} and \\boxed{7}") == "7"
  assert host.extract_answer("nested \\boxed{\\frac{1}{\\sqrt{2}}} done") == "\\frac{1}{\\sqrt{2}}"
  assert host.extract_answer("work\n#### 1,234\n") == "1,234"
  assert host.extract_answer("we get 12 apples, then -3.5") == "-3.5"
  assert host.extract_answer("a total of 1,000,000 and 3/4") == "3/4"
  assert host.extract_answer("no numbers here") == ""


def _decode(ids):
  return "".join("-" if i == MINUS else str(i - DIGITS[0]) for i in ids if i != EOS)


def _answer_reward(prompt_text, completion_text, example):
  if example.get("slow"):
    time.sleep(2.0)
  return 1.0 if completion_text == example.get("answer") else 0.0


def test_host_reward_call():
  reward = host.HostReward(_answer_reward, _decode, timeout_s=5.0, num_workers=2, eos_id=EOS)
  reward.set_examples([{"answer": "12"}, {"answer": "-3"}, {"answer": "7"}])
  comp, cmask = _pad([_num("12") + [EOS], _num("-3") + [EOS, 11], _num("8") + [EOS],
                      _num("7")], 5)
  prompt, pmask = _pad([[10], [11], [12], [13]], 2)
  out = reward(prompt, pmask, comp, cmask, np.array([0, 1, 2, 2]))
  np.testing.assert_array_equal(out, [1.0, 1.0, 0.0, 1.0])
  assert out.dtype == np.float32
  assert reward.stats == {"calls": 4, "timeouts": 0, "errors": 0}
  # No example table and no index: every example is {}.
  seen = []
  host.HostReward(lambda p, c, e: seen.append((p, c, dict(e))) or 0.0, _decode)(
      prompt[:1], pmask[:1], comp[:1], cmask[:1])
  assert seen == [("0", "12", {})]


def test_host_reward_timeout_and_errors():
  reward = host.HostReward(_answer_reward, _decode, timeout_s=0.2, num_workers=4)
  reward.set_examples([{"answer": "1"}, {"answer": "1", "slow": True}])
  comp, cmask = _pad([_num("1"), _num("1"), _num("1")], 2)
  prompt, pmask = _pad([[10]] * 3, 1)
  start = time.monotonic()
  out = reward(prompt, pmask, comp, cmask, np.array([0, 1, 0]))
  assert time.monotonic() - start < 1.5  # the slow call is abandoned, not awaited
  np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
  assert reward.stats["timeouts"] == 1

  def broken(p, c, e):
    raise KeyError("boom")

  with pytest.raises(RuntimeError, match="failed"):
    host.HostReward(broken, _decode)(prompt, pmask, comp, cmask)
  lenient = host.HostReward(broken, _decode, on_error="zero")
  np.testing.assert_array_equal(lenient(prompt, pmask, comp, cmask), [0.0, 0.0, 0.0])
  assert lenient.stats["errors"] == 3
  with pytest.raises(ValueError, match="outside"):
    reward(prompt, pmask, comp, cmask, np.array([0, 1, 5]))
  with pytest.raises(ValueError):
    host.HostReward(broken, _decode, timeout_s=0)


def test_host_reward_in_graph_under_jit():
  reward = host.HostReward(_answer_reward, _decode, timeout_s=5.0, eos_id=EOS)
  reward.set_examples([{"answer": "12"}, {"answer": "5"}])
  inputs = _inputs([_num("12") + [EOS], _num("5") + [EOS], _num("6") + [EOS]],
                   [True] * 3, 4, {"example_index_B": np.array([0, 1, 1], np.int32)})
  exact = functools.partial(verifiers.format_reward, allowed_ids=DIGITS, eos_id=EOS)
  fn = base.compose({"host": (reward.in_graph, 1.0), "format": (exact, 0.5)})
  total, parts = jax.jit(fn)(inputs)
  np.testing.assert_array_equal(parts["host"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(total, [1.5, 1.5, 0.5])
  assert reward.stats["calls"] == 3


# --------------------------------------------------------------------------
# math_reward, and split mode (host_scorer) == one-jit mode for every component
# --------------------------------------------------------------------------

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BUILTIN = tokenizers.load_tokenizer("builtin")


def _fixture(name, split):
  with open(FIXTURES / name / f"{split}.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", ["train", "test"])
def test_math_reward_gsm8k_rationales_score_their_own_gold(split):
  for row in _fixture("gsm8k", split):
    assert host.math_reward(row["answer"], row) == 1.0
    gold = answers.gold_answer(row["answer"])
    assert host.math_reward(f"The answer is {gold}.", row) == 1.0
    wrong = str(Fraction(gold) + 1)  # every GSM8K fixture answer is a plain number
    assert host.math_reward(f"#### {wrong}", row) == 0.0
    assert host.math_reward(f"The answer is {wrong}.", row) == 0.0


def test_math_reward_gsm8k_forms():
  row = _fixture("gsm8k", "train")[1]  # "... #### 1,284"
  assert host.math_reward("#### 1284", row) == 1.0
  assert host.math_reward("\\boxed{1,284}", row) == 1.0
  assert host.math_reward("The final answer is $1,284$.", row) == 1.0
  assert host.math_reward("so 1284 pencils", row) == 0.0  # no stated answer
  assert host.math_reward("so 1284 pencils", row, last_number_fallback=True) == 1.0
  negative, decimal = _fixture("gsm8k", "train")[2], _fixture("gsm8k", "train")[3]
  assert host.math_reward("it is -5 degrees\n#### -5", negative) == 1.0
  assert host.math_reward("#### 5", negative) == 0.0
  assert host.math_reward("the answer is 8.750", decimal) == 1.0
  assert host.math_reward("the answer is 35/4", decimal) == 1.0  # exact rational equality
  assert host.math_reward("the answer is 8.7", decimal) == 0.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_math_reward_math_fixture(split):
  for row in _fixture("math", split):
    assert host.math_reward(row["solution"], row) == 1.0
    assert host.math_reward("\\boxed{" + row["answer"] + "}", row) == 1.0
    assert host.math_reward("\\boxed{" + row["answer"] + "+1}", row) == 0.0


def test_math_reward_equivalent_forms():
  half = _fixture("math", "train")[0]  # answer \frac{1}{2}
  assert host.math_reward("\\boxed{0.5}", half) == 1.0
  assert host.math_reward("The answer is 1/2.", half) == 1.0
  assert host.math_reward("\\boxed{\\dfrac{2}{4}}", half) == 1.0
  assert host.math_reward("\\boxed{0.55}", half) == 0.0
  # The solution itself as the reference field: its last box is the gold answer.
  assert host.math_reward("\\boxed{0.5}", {"answer": half["solution"]}) == 1.0
  root = _fixture("math", "test")[2]  # \frac{\sqrt{2}}{2}, nested braces
  assert host.math_reward("\\boxed{\\frac{1}{\\sqrt{2}}}", root) == 1.0  # symbolic (sympy)
  assert host.math_reward("no answer stated", root) == 0.0


def test_math_reward_errors_name_the_problem():
  row = _fixture("math", "train")[0]
  no_answer = {k: v for k, v in row.items() if k != "answer"}
  with pytest.raises(ValueError, match=r"'answer' field.*\['level', 'problem', 'solution'"):
    host.math_reward("\\boxed{1}", no_answer)
  with pytest.raises(ValueError, match="no final answer"):
    host.math_reward("\\boxed{1}", {"answer": "work\n#### "})


def _pad_rows(rows, width, pad):
  tokens = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  return tokens, mask


def _rollout(tok, examples, completions, prompt_ids, finished):
  """A fetched rollout dict as `RLStep.rollout` makes it (B rows, NumPy).

  A finished completion ends with EOS (in the mask); an unfinished one is cut
  at L = 24 tokens without EOS, as the sampler leaves a truncated completion.
  """
  length = 24
  prompts, prompt_mask = _pad_rows([tok.encode(examples[i]["prompt"]) for i in prompt_ids], 16,
                                   tok.pad_id)
  answer_rows = [tok.encode(str(examples[i].get("answer", ""))[:10]) + [tok.eos_id]
                 for i in prompt_ids]
  answer_tokens, answer_mask = _pad_rows(answer_rows, 11, tok.pad_id)
  rows = [(tok.encode(text) + [tok.eos_id])[:length] if fin else tok.encode(text)[:length]
          for text, fin in zip(completions, finished)]
  completion, completion_mask = _pad_rows(rows, length, tok.pad_id)
  return {"prompt_tokens": prompts, "prompt_mask": prompt_mask,
          "prompt_id": np.asarray(prompt_ids, np.int32),
          "answer_tokens": answer_tokens, "answer_mask": answer_mask,
          "completion": completion, "completion_mask": completion_mask,
          "finished": np.asarray(finished, bool),
          "sampler_logp": np.zeros(completion.shape, np.float32),
          "lengths": completion_mask.sum(1).astype(np.int32)}


def _one_jit_rewards(components, tok, examples, ro, **kwargs):
  """The one-jit step's rewards: build_reward_fn under jit on `RLStep.reward_inputs(ro)`."""
  fn = registry.build_reward_fn(components, tok, examples=examples, **kwargs)
  # reward_inputs reads self.rl only for the ReMax baseline.
  inputs = rl_step.RLStep.reward_inputs(types.SimpleNamespace(rl=None),
                                        {k: jnp.asarray(v) for k, v in ro.items()})
  total, parts = jax.jit(fn)(inputs)
  return np.asarray(total), {k: np.asarray(v) for k, v in parts.items()}


def _assert_split_equals_one_jit(components, tok, examples, ro, **kwargs):
  total, parts = _one_jit_rewards(components, tok, examples, ro, **kwargs)
  split_total, split_parts = registry.host_scorer(components, tok, examples, **kwargs)(ro)
  assert list(split_parts) == [name for name, _ in components]
  for name in split_parts:
    np.testing.assert_array_equal(split_parts[name], parts[name], err_msg=name)
  np.testing.assert_array_equal(split_total, total)
  assert split_total.dtype == np.float32
  return split_total, split_parts


def test_host_scorer_equals_in_graph_on_a_file_dataset_without_task():
  # Rows as a JSONL file gives them: no "task" key (the old split scorer raised KeyError).
  examples = [{"prompt": ex["prompt"], "answer": ex["answer"]}
              for ex in tasks.generate("arithmetic", "train", 3, seed=0)]
  assert [ex["answer"] for ex in examples] == ["707", "1", "28"]
  completions = ["707", "708", "1", "abc", "28", "28", "", "-1"]
  prompt_ids = [0, 0, 1, 1, 2, 2, 2, 1]
  finished = [True, True, True, True, True, False, True, True]
  ro = _rollout(BUILTIN, examples, completions, prompt_ids, finished)
  components = (("correct", 1.0), ("format", 0.25), ("answer_id", 0.0))
  total, parts = _assert_split_equals_one_jit(components, BUILTIN, examples, ro)
  # correct: finished and equal to the answer; format: finished, non-empty, digits and '-'.
  np.testing.assert_array_equal(parts["correct"], [1, 0, 1, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(parts["format"], [1, 1, 1, 0, 1, 0, 0, 1])
  np.testing.assert_allclose(total, [1.25, 0.25, 1.25, 0, 1.25, 0, 0, 0.25])
  assert parts["answer_id"].dtype == np.int32
  assert parts["answer_id"][4] != parts["answer_id"][5]  # "28" + EOS vs truncated "28"


@pytest.mark.parametrize("fallback", [False, True])
def test_host_scorer_equals_in_graph_math_on_gsm8k(fallback):
  examples = [dict(row, prompt=f"q{i}") for i, row in enumerate(_fixture("gsm8k", "train"))]
  # Text the builtin tokenizer spells (lowercase letters, digits, '-', spaces).
  completions = ["the answer is 15", "the answer is 16", "so 1284", "the answer is 1284",
                 "it is -5", "the answer is -5", "many words",
                 "the answer is 144 and then it goes on"]
  prompt_ids = [0, 0, 1, 1, 2, 2, 3, 5]
  finished = [True, True, True, True, True, True, True, False]
  ro = _rollout(BUILTIN, examples, completions, prompt_ids, finished)
  components = (("math", 1.0), ("answer_id", 0.0))
  _, parts = _assert_split_equals_one_jit(components, BUILTIN, examples, ro,
                                          math_last_number_fallback=fallback)
  # math reads the text only: the truncated "the answer is 144 and th" states 144 (the RL
  # step's overlong shaping, not the reward, handles truncation).
  want = [1, 0, fallback, 1, fallback, 1, 0, 1]
  np.testing.assert_array_equal(parts["math"], np.asarray(want, np.float32))
  # The math component on token arrays is math_reward on the decoded completions.
  texts = BUILTIN.decode_batch([row[m != 0] for row, m in
                                zip(ro["completion"], ro["completion_mask"])])
  by_text = [host.math_reward(t, examples[i], last_number_fallback=fallback)
             for t, i in zip(texts, prompt_ids)]
  np.testing.assert_array_equal(parts["math"], np.asarray(by_text, np.float32))


def test_host_scorer_equals_in_graph_countdown():
  examples = tasks.generate("countdown", "train", 2, seed=0)
  assert [(ex["numbers"], ex["target"]) for ex in examples] == [([11, 13, 18], 42),
                                                                ([11, 12, 13], 14)]
  completions = ["13+11+18", "18+13+11", "13+11", "12-11+13", "11*12", "(13-12)+13"]
  ro = _rollout(BUILTIN, examples, completions, [0, 0, 0, 1, 1, 1], [True] * 6)
  components = (("countdown", 1.0), ("format", 0.5))
  _, parts = _assert_split_equals_one_jit(components, BUILTIN, examples, ro)
  np.testing.assert_array_equal(parts["countdown"], [1, 1, 0, 1, 0, 0])


def test_host_components_refuse_unusable_examples_up_front():
  math_rows = _fixture("math", "train")
  broken = math_rows[:3] + [{"problem": "p", "solution": "s"}]
  for build in (lambda: registry.build_reward_fn((("math", 1.0),), BUILTIN, examples=broken),
                lambda: registry.host_scorer((("math", 1.0),), BUILTIN, broken)):
    with pytest.raises(ValueError, match=r"'math': training example 3: .*\['problem', 'sol"):
      build()
  with pytest.raises(ValueError, match="'countdown': training example 0: .*'numbers'"):
    registry.host_scorer((("countdown", 1.0),), BUILTIN, math_rows)
  with pytest.raises(ValueError, match="needs the training examples"):
    registry.build_reward_fn((("math", 1.0),), BUILTIN)


def test_math_last_number_fallback_reaches_the_reward_from_a_config():
  c = config.default_configdict(kind="rl")
  c.reward.components = (("math", 1.0),)
  c.reward.math_last_number_fallback = True
  cfg = config.from_configdict(c)
  assert cfg.reward.math_last_number_fallback is True
  examples = [{"prompt": "q", "answer": "#### 12"}]
  ro = _rollout(BUILTIN, examples, ["so 12", "so 13"], [0, 0], [True, True])
  score = registry.host_scorer(cfg.reward.components, BUILTIN, examples,
                               math_last_number_fallback=cfg.reward.math_last_number_fallback)
  np.testing.assert_array_equal(score(ro)[1]["math"], [1.0, 0.0])
  with pytest.raises(ValueError, match="math_last_number_fallback"):
    config.RewardSpec(math_last_number_fallback="yes")


def test_host_scorer_needs_the_reward_model_it_names():
  with pytest.raises(ValueError, match="needs a trained reward model.*reward_model_path"):
    registry.host_scorer((("reward_model", 1.0),), BUILTIN, [])


def test_host_reward_in_graph_large_batch_on_8_cpu_devices():
  """Operands over 64 KiB used to deadlock XLA:CPU across devices; they go in chunks."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((8,), ("d",))
  B, L = 64, 1024                      # completions: 256 KiB of int32
  rng = np.random.default_rng(0)
  comp = rng.integers(3, 20, size=(B, L)).astype(np.int32)
  mask = (np.arange(L)[None] < rng.integers(1, L, size=(B, 1))).astype(np.int32)
  reward = host.HostReward(lambda p, c, ex: float(len(c)), lambda ids: "x" * len(ids))
  inputs = base.RewardInputs(
      prompt_tokens_BP=np.ones((B, 4), np.int32), prompt_mask_BP=np.ones((B, 4), np.int32),
      completion_BL=comp, completion_mask_BL=mask, finished_B=np.ones((B,), bool), task={})
  sharded = jax.device_put(inputs, NamedSharding(mesh, P("d")))

  @jax.jit
  def total(inputs):
    r_B = reward.in_graph(inputs)
    return jnp.sum(r_B * jnp.sum(inputs.completion_mask_BL, axis=1)), r_B

  s, r_B = total(sharded)
  np.testing.assert_array_equal(np.asarray(r_B), mask.sum(axis=1).astype(np.float32))
  assert float(s) == pytest.approx(float(np.sum(mask.sum(axis=1) ** 2)), rel=1e-6)


# ---------------------------------------------------------------------------
# math_equal's math-verify path (a fake math_verify module stands in for the package).
# ---------------------------------------------------------------------------
_FAKE_MATH_VERIFY = '''"""A stand-in for math-verify: 'apple' equals 'banana', nothing else."""
import os


def parse(text):
  return [text]


def verify(gold, pred):
  with open(os.environ["FAKE_MATH_VERIFY_LOG"], "a") as f:
    f.write(f"{gold[0]} {pred[0]}\\n")
  return {gold[0], pred[0]} == {"\\\\boxed{apple}", "\\\\boxed{banana}"}
'''


def _fake_math_verify_module():
  module = types.ModuleType("math_verify")
  exec(compile(_FAKE_MATH_VERIFY, "math_verify.py", "exec"), module.__dict__)  # noqa: S102
  return module


def test_math_worker_routes_through_math_verify_in_sys_modules(monkeypatch, tmp_path, capsys):
  """The worker loop imports math_verify (here a fake in sys.modules) and asks it first;
  when it does not verify, sympy decides."""
  import io
  log = tmp_path / "calls.txt"
  monkeypatch.setenv("FAKE_MATH_VERIFY_LOG", str(log))
  monkeypatch.setitem(sys.modules, "math_verify", _fake_math_verify_module())
  requests = [("apple", "banana"), ("x+x", "2*x"), ("cherry", "banana")]
  monkeypatch.setattr(sys, "stdin", io.StringIO(
      "".join(json.dumps({"pred": p, "gold": g}) + "\n" for p, g in requests)))
  host._worker_main()
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "ready"
  assert [json.loads(line)["equal"] for line in lines[1:]] == [True, True, False]
  # Each request went to math_verify.verify(gold, pred) with both sides boxed.
  assert log.read_text().splitlines() == [r"\boxed{banana} \boxed{apple}",
                                          r"\boxed{2*x} \boxed{x+x}",
                                          r"\boxed{banana} \boxed{cherry}"]


def test_math_worker_without_math_verify_uses_sympy(monkeypatch, capsys):
  import io
  monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
  monkeypatch.setattr(sys, "stdin", io.StringIO(
      json.dumps({"pred": "apple", "gold": "banana"}) + "\n"
      + json.dumps({"pred": "x+x", "gold": "2*x"}) + "\n"))
  host._worker_main()
  lines = capsys.readouterr().out.splitlines()
  assert [json.loads(line)["equal"] for line in lines[1:]] == [False, True]


def test_math_equal_uses_an_installed_math_verify(monkeypatch, tmp_path):
  """End to end: math_equal's worker process imports an installed math_verify (the fake on
  PYTHONPATH) and routes symbolic answers through it; without it, sympy alone decides."""
  package = tmp_path / "site"
  package.mkdir()
  (package / "math_verify.py").write_text(_FAKE_MATH_VERIFY)
  log = tmp_path / "calls.txt"
  monkeypatch.setenv("FAKE_MATH_VERIFY_LOG", str(log))
  monkeypatch.setenv("PYTHONPATH", str(package))
  pool = host._MathWorkerPool()  # fresh workers, started with this environment
  monkeypatch.setattr(host, "_POOL", pool)
  try:
    assert host.math_equal("apple", "banana", timeout_s=30.0) is True
    assert host.math_equal("x+x", "2*x", timeout_s=30.0) is True     # fake says no: sympy
    assert host.math_equal("cherry", "banana", timeout_s=30.0) is False
    assert host.math_equal("7", "7.0") is True                       # numbers: no worker
  finally:
    pool.close_all()
  assert len(log.read_text().splitlines()) == 3
  monkeypatch.delenv("PYTHONPATH")
  plain = host._MathWorkerPool()
  monkeypatch.setattr(host, "_POOL", plain)
  try:
    assert host.math_equal("apple", "banana", timeout_s=30.0) is False
    assert host.math_equal("x+x", "2*x", timeout_s=30.0) is True
  finally:
    plain.close_all()
  assert len(log.read_text().splitlines()) == 3
