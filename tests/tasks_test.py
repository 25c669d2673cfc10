"""Tests for jaxrl_llm.data.tasks."""

import re

import pytest

from jaxrl_llm.data import tasks

_ARITHMETIC_RE = re.compile(r"^(\d+)([-+*])(\d+)=$")
_COUNTDOWN_RE = re.compile(r"^(\d+(?: \d+)*) -> (\d+):$")


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_generate_is_deterministic(task):
  first = tasks.generate(task, "train", 50, seed=7)
  assert first == tasks.generate(task, "train", 50, seed=7)
  assert first != tasks.generate(task, "train", 50, seed=8)
  assert len(first) == 50
  assert all(e["task"] == task for e in first)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_splits_are_disjoint(task):
  train = {e["prompt"] for seed in range(3) for e in tasks.generate(task, "train", 300, seed)}
  test = {e["prompt"] for seed in range(3) for e in tasks.generate(task, "test", 300, seed)}
  assert train and test
  assert not train & test
  assert all(tasks.split_of(task, p) == "test" for p in test)


def test_test_fraction_sets_split_sizes():
  # All 1-digit additions: 100 problems; about test_fraction of them are test.
  prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
  num_test = sum(tasks.split_of("arithmetic", p, test_fraction=0.3) == "test" for p in prompts)
  assert 15 <= num_test <= 45
  test = tasks.generate("arithmetic", "test", 1000, 0, test_fraction=0.3, max_digits=1, ops="+")
  assert {e["prompt"] for e in test} == {
      p for p in prompts if tasks.split_of("arithmetic", p, test_fraction=0.3) == "test"}


def test_arithmetic_answers_and_options():
  for e in tasks.generate("arithmetic", "train", 500, 0, ops="+-*", allow_negative=True):
    a, op, b = _ARITHMETIC_RE.match(e["prompt"]).groups()
    a, b = int(a), int(b)
    assert e["answer"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
    assert len(str(a)) <= 3 and len(str(b)) <= 3
    assert tasks.arithmetic_correct(e["answer"], e["answer"])
  examples = tasks.generate("arithmetic", "train", 500, 0, ops="-")
  assert all(not e["answer"].startswith("-") for e in examples)
  assert any(e["answer"].startswith("-") for e in tasks.generate(
      "arithmetic", "train", 500, 0, ops="-", allow_negative=True))
  wide = tasks.generate("arithmetic", "train", 200, 0, min_digits=4, max_digits=5)
  for e in wide:
    a, _, b = _ARITHMETIC_RE.match(e["prompt"]).groups()
    assert 4 <= len(a) <= 5 and 4 <= len(b) <= 5


def test_arithmetic_prompts_are_short():
  examples = tasks.generate("arithmetic", "train", 1000, 0)
  assert max(len(e["prompt"]) for e in examples) <= 8  # "999+999="
  assert max(len(e["answer"]) for e in examples) <= 4  # "1998"


def test_countdown_examples_are_valid():
  for e in tasks.generate("countdown", "train", 500, 0):
    numbers, target = _COUNTDOWN_RE.match(e["prompt"]).groups()
    assert [int(n) for n in numbers.split()] == e["numbers"] == sorted(e["numbers"])
    assert int(target) == e["target"]
    assert len(e["numbers"]) == 3 and all(1 <= n <= 20 for n in e["numbers"])
    assert 1 <= e["target"] <= 100 and e["target"] not in e["numbers"]
    assert tasks.countdown_correct(e["numbers"], e["target"], e["answer"])
    assert tasks.is_correct(e, e["answer"])
    assert len(e["prompt"]) <= 16


def test_countdown_options():
  examples = tasks.generate("countdown", "train", 200, 0, num_numbers=4, max_number=9,
                            max_target=50, ops="+-")
  for e in examples:
    assert len(e["numbers"]) == 4 and max(e["numbers"]) <= 9 and e["target"] <= 50
    assert "*" not in e["answer"]
    assert tasks.countdown_correct(e["numbers"], e["target"], e["answer"])


def test_unique_and_exhaustion():
  examples = tasks.generate("arithmetic", "train", 60, 0, unique=True, max_digits=1, ops="+")
  assert len({e["prompt"] for e in examples}) == 60
  # Only 100 one-digit additions exist, about 10 of them in test.
  with pytest.raises(ValueError, match="unique"):
    tasks.generate("arithmetic", "test", 50, 0, unique=True, max_digits=1, ops="+")


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="sudoku"), "unknown task 'sudoku'"),
    (dict(split="valid"), "unknown split 'valid'"),
    (dict(num=-1), "num must be >= 0"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(digits=3), r"unknown option\(s\) \['digits'\]"),
    (dict(ops="/"), "ops must be a non-empty subset"),
    (dict(min_digits=3, max_digits=2), "min_digits"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
  args = dict(task="arithmetic", split="train", num=3, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    tasks.generate(**args)


def test_generate_zero():
  assert tasks.generate("countdown", "test", 0, 0) == []


@pytest.mark.parametrize("completion, expected", [
    ("357", True), (" 357\n", True), ("0357", False), ("+357", False), ("35 7", False),
    ("", False), ("357=", False), ("358", False),
])
def test_arithmetic_correct(completion, expected):
  assert tasks.arithmetic_correct("357", completion) is expected


@pytest.mark.parametrize("expression, expected", [
    ("3*5+7", True),
    (" 7 + 3 * 5 ", True),
    ("(7+15)", False),  # 15 is not a prompt number
    ("(5-3)*7+8", False),  # 8 is not a prompt number
    ("5*(7-3)+2", False),
    ("7*3+5-4", False),
    ("(3+5)*7", False),  # 56
    ("7*(5-3)+3", False),  # 3 used twice
    ("3*5+7+0", False),  # 0 is not a prompt number
    ("((3)*(5))+(7)", True),
])
def test_countdown_correct_values(expression, expected):
  assert tasks.countdown_correct([3, 5, 7], 22, expression) is expected


def test_countdown_correct_uses_numbers_at_most_once():
  assert tasks.countdown_correct([3, 3, 5], 14, "3*3+5")  # both 3s
  assert not tasks.countdown_correct([3, 4, 5], 14, "3*3+5")  # one 3 only
  assert tasks.countdown_correct([2, 5, 9], 10, "2*5")  # not all numbers needed
  assert tasks.countdown_correct([2, 5, 9], 10, "5*2")
  assert tasks.countdown_correct([12, 20], 8, "20-12")
  assert not tasks.countdown_correct([12, 20], 8, "2*4")


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')",
    "exec('x=1')",
    "3**5",
    "15/3+7",
    "-3+25",
    "3+-5",
    "+3+19",
    "03*5+7",
    "3*5+7)",
    "(3*5+7",
    "()",
    "",
    "   ",
    "3 5 7",
    "3*5+7=22",
    "3*5+7\x00",
    "2e1+2",
    "0x16",
    "1_5+7",
    "\u0663*5+7",  # Arabic-Indic digit three
    "3*5+7;",
    "3*5+" + "7" * 300,
    "(" * 1000 + "22" + ")" * 1000,
    "(" * 40 + "3*5+7" + ")" * 40,
])
def test_countdown_correct_rejects_garbage(expression):
  assert tasks.countdown_correct([3, 5, 7, 22], 22, expression) is False


def test_countdown_correct_rejects_non_strings():
  assert tasks.countdown_correct([3, 5, 7], 22, None) is False
  assert tasks.countdown_correct([3, 5, 7], 22, b"3*5+7") is False


def test_countdown_correct_allows_moderate_nesting():
  assert tasks.countdown_correct([3, 5, 7], 22, "(" * 10 + "3*5+7" + ")" * 10)


def test_is_correct_dispatches_by_task():
  arithmetic = {"task": "arithmetic", "prompt": "1+2=", "answer": "3"}
  countdown = {"task": "countdown", "prompt": "1 2 4 -> 12:", "answer": "(1+2)*4",
               "numbers": [1, 2, 4], "target": 12}
  assert tasks.is_correct(arithmetic, "3") and not tasks.is_correct(arithmetic, "4")
  assert tasks.is_correct(countdown, "4*(2+1)") and not tasks.is_correct(countdown, "12")
  with pytest.raises(ValueError, match="unknown task"):
    tasks.is_correct({"task": "chess"}, "e4")


def test_corpus():
  lines = list(tasks.corpus(101, 0))
  assert len(lines) == 101 and lines == list(tasks.corpus(101, 0))
  assert any("->" in line for line in lines) and any("=" in line for line in lines)
  assert set("".join(tasks.corpus(2000, 0))) == set("0123456789+-*()=:> ")
