"""Synthetic verifiable tasks: arithmetic and countdown.

Pure Python with a numpy `Generator`, so an example list is a function of
`(task, split, num, seed, options)` alone. Prompts are short because the
built-in model is tiny (about 16 prompt tokens and 8 completion tokens with the
built-in character-level tokenizer).

Formats (the completion is scored without its end-of-sequence token):

  arithmetic   prompt "12+345="            answer "357"
               prompt "345-12="            answer "333"
               prompt "12*34="             answer "408"   (with ops="+-*")
               An answer is the exact decimal result; it starts with "-" only
               when `allow_negative=True`. Scored by `arithmetic_correct`:
               the completion, stripped of surrounding whitespace, must equal
               the answer exactly.
  countdown    prompt "3 5 7 -> 22:"       answer "3*5+7"
               The numbers are sorted ascending; the answer is one expression
               that reaches the target (any other valid one is also correct).
               Scored by `countdown_correct`: an expression over + - * and
               parentheses with integer literals, each prompt number used at
               most once, equal to the target.

Every example is a plain dict (JSON- and TFDS-friendly):

  {"task": "arithmetic", "prompt": "12+345=", "answer": "357"}
  {"task": "countdown", "prompt": "3 5 7 -> 22:", "answer": "3*5+7",
   "numbers": [3, 5, 7], "target": 22}

Splits: a problem belongs to "test" when a stable hash of `task` and its prompt
falls below `test_fraction`, otherwise to "train". The split is a property of
the problem, not of the seed, so train and test never share a prompt whatever
seeds are used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.1
_OPS = "+-*"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _apply(op: str, a: int, b: int) -> int:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  return a * b


def split_of(task: str, prompt: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
  """Returns "test" or "train" for a problem, from a stable hash of its prompt.

  blake2b rather than Python's `hash`, which is salted per process.
  """
  digest = hashlib.blake2b(f"{task}\x00{prompt}".encode(), digest_size=8).digest()
  return "test" if int.from_bytes(digest, "big") / 2.0**64 < test_fraction else "train"


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArithmeticOptions:
  """Options of the arithmetic task.

  Each operand first draws its digit count uniformly from
  [min_digits, max_digits], then a uniform value with that many digits
  (1-digit operands include 0), so short and long problems are equally common.
  """
  min_digits: int = 1  # fewest digits of an operand
  max_digits: int = 3  # most digits of an operand
  ops: str = "+-"  # operators to draw from, a subset of "+-*"
  allow_negative: bool = False  # if False, "a-b" is drawn with a >= b

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(
          "ArithmeticOptions needs 1 <= min_digits <= max_digits, got "
          f"min_digits={self.min_digits}, max_digits={self.max_digits}")
    if not self.ops or any(op not in _OPS for op in self.ops):
      raise ValueError(
          f"ArithmeticOptions.ops must be a non-empty subset of {_OPS!r}, got {self.ops!r}")


def _operand(rng: np.random.Generator, opts: ArithmeticOptions) -> int:
  digits = int(rng.integers(opts.min_digits, opts.max_digits + 1))
  low = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(low, 10**digits))


def _sample_arithmetic(rng: np.random.Generator, opts: ArithmeticOptions) -> dict[str, Any]:
  a, b = _operand(rng, opts), _operand(rng, opts)
  op = opts.ops[int(rng.integers(len(opts.ops)))]
  if op == "-" and not opts.allow_negative and a < b:
    a, b = b, a
  return {"task": "arithmetic", "prompt": f"{a}{op}{b}=", "answer": str(_apply(op, a, b))}


def arithmetic_correct(answer: str | int, completion: str) -> bool:
  """True iff `completion`, without surrounding whitespace, is exactly `answer`.

  Exact string match: "0357" or "+357" are wrong for "357", which is what a
  token-level verifier over the same text would decide.
  """
  return completion.strip() == str(answer).strip()


# ---------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CountdownOptions:
  """Options of the countdown task.

  A problem draws `num_numbers` integers in [min_number, max_number], combines
  all of them in random order with a random binary tree of operators from
  `ops`, and keeps the result as the target when it lies in
  [min_target, max_target] and is not itself one of the numbers.
  """
  num_numbers: int = 3  # how many numbers the prompt lists
  min_number: int = 1  # smallest number
  max_number: int = 20  # largest number
  min_target: int = 1  # smallest target
  max_target: int = 100  # largest target
  ops: str = "+-*"  # operators of the generated expression, a subset of "+-*"

  def __post_init__(self):
    if self.num_numbers < 2:
      raise ValueError(f"CountdownOptions.num_numbers must be >= 2, got {self.num_numbers}")
    if not 0 <= self.min_number <= self.max_number:
      raise ValueError(
          "CountdownOptions needs 0 <= min_number <= max_number, got "
          f"min_number={self.min_number}, max_number={self.max_number}")
    if self.min_target > self.max_target:
      raise ValueError(
          "CountdownOptions needs min_target <= max_target, got "
          f"min_target={self.min_target}, max_target={self.max_target}")
    if not self.ops or any(op not in _OPS for op in self.ops):
      raise ValueError(
          f"CountdownOptions.ops must be a non-empty subset of {_OPS!r}, got {self.ops!r}")


def _random_expression(rng: np.random.Generator, numbers: Sequence[int],
                       ops: str) -> tuple[int, str, int]:
  """A random expression over all `numbers` in the given order.

  Returns (value, text, precedence of the top operator); the text carries only
  the parentheses that precedence requires.
  """
  if len(numbers) == 1:
    return numbers[0], str(numbers[0]), 3
  cut = int(rng.integers(1, len(numbers)))
  op = ops[int(rng.integers(len(ops)))]
  left_value, left_text, left_prec = _random_expression(rng, numbers[:cut], ops)
  right_value, right_text, right_prec = _random_expression(rng, numbers[cut:], ops)
  prec = _PRECEDENCE[op]
  if left_prec < prec:
    left_text = f"({left_text})"
  # a-(b+c) and a-(b-c) need their parentheses; a+(b-c) and a*(b*c) do not.
  if right_prec < prec or (right_prec == prec and op == "-"):
    right_text = f"({right_text})"
  return _apply(op, left_value, right_value), f"{left_text}{op}{right_text}", prec


def _sample_countdown(rng: np.random.Generator, opts: CountdownOptions) -> dict[str, Any] | None:
  numbers = [int(x) for x in rng.integers(opts.min_number, opts.max_number + 1,
                                          size=opts.num_numbers)]
  order = [numbers[i] for i in rng.permutation(len(numbers))]
  target, expression, _ = _random_expression(rng, order, opts.ops)
  if not opts.min_target <= target <= opts.max_target or target in numbers:
    return None  # rejected; the caller draws again
  numbers.sort()
  prompt = " ".join(str(n) for n in numbers) + f" -> {target}:"
  return {"task": "countdown", "prompt": prompt, "answer": expression,
          "numbers": numbers, "target": target}


_MAX_EXPRESSION_CHARS = 256
_MAX_NESTING = 32
_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|([-+*()]))")  # ASCII digits only


class _InvalidExpression(Exception):
  pass


class _Parser:
  """Recursive descent over  expr := term (("+"|"-") term)*,
  term := factor ("*" factor)*,  factor := INT | "(" expr ")".

  No unary operators, no other characters: nothing is ever evaluated as code.
  """

  def __init__(self, text: str):
    self.tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
      match = _TOKEN_RE.match(text, pos)
      if match is None:
        raise _InvalidExpression(f"unexpected character at {pos}")
      self.tokens.append(match.group(1) or match.group(2))
      pos = match.end()
    self.pos = 0
    self.depth = 0
    self.literals: list[int] = []

  def _peek(self) -> str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def _take(self) -> str:
    token = self._peek()
    if token is None:
      raise _InvalidExpression("unexpected end")
    self.pos += 1
    return token

  def parse(self) -> int:
    if not self.tokens:
      raise _InvalidExpression("empty")
    value = self._expr()
    if self._peek() is not None:
      raise _InvalidExpression(f"trailing {self._peek()!r}")
    return value

  def _expr(self) -> int:
    value = self._term()
    while self._peek() in ("+", "-"):
      op = self._take()
      value = _apply(op, value, self._term())
    return value

  def _term(self) -> int:
    value = self._factor()
    while self._peek() == "*":
      self._take()
      value *= self._factor()
    return value

  def _factor(self) -> int:
    token = self._take()
    if token == "(":
      self.depth += 1
      if self.depth > _MAX_NESTING:
        raise _InvalidExpression("nested too deeply")
      value = self._expr()
      if self._take() != ")":
        raise _InvalidExpression("missing ')'")
      self.depth -= 1
      return value
    if token in "+-*)" or (len(token) > 1 and token[0] == "0"):
      raise _InvalidExpression(f"expected a number, got {token!r}")
    self.literals.append(int(token))
    return int(token)


def countdown_correct(prompt_numbers: Sequence[int], target: int, expression_text: str) -> bool:
  """True iff `expression_text` is a valid expression equal to `target`.

  Valid: integer literals (no leading zeros), binary + - *, parentheses and
  spaces only; each literal is one of `prompt_numbers`, and no number is used
  more often than it appears there. Anything else (other characters, unary
  minus, division, empty text, unbalanced parentheses, over 256 characters or
  32 nested parentheses) is simply incorrect; this function never raises on
  the completion text.
  """
  if not isinstance(expression_text, str) or len(expression_text) > _MAX_EXPRESSION_CHARS:
    return False
  try:
    parser = _Parser(expression_text)
    value = parser.parse()
  except _InvalidExpression:
    return False
  available = list(prompt_numbers)
  for literal in parser.literals:
    if literal not in available:
      return False
    available.remove(literal)
  return value == int(target)


# ---------------------------------------------------------------------------
# Registry and generation
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
  """One synthetic task: how to draw a problem and how to score a completion."""
  name: str
  options: type  # frozen dataclass of the task's keyword options
  sample: Callable[[np.random.Generator, Any], dict[str, Any] | None]  # None = rejected draw
  correct: Callable[[dict[str, Any], str], bool]  # (example, completion) -> bool


TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic",
        options=ArithmeticOptions,
        sample=_sample_arithmetic,
        correct=lambda example, completion: arithmetic_correct(example["answer"], completion),
    ),
    "countdown": Task(
        name="countdown",
        options=CountdownOptions,
        sample=_sample_countdown,
        correct=lambda example, completion: countdown_correct(
            example["numbers"], example["target"], completion),
    ),
}


def is_correct(example: dict[str, Any], completion: str) -> bool:
  """Scores `completion` (decoded text, without EOS) against an example of any task."""
  return _get_task(example["task"]).correct(example, completion)


def _get_task(task: str) -> Task:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  return TASKS[task]


def generate(task: str, split: str, num: int, seed: int, *,
             test_fraction: float = DEFAULT_TEST_FRACTION, unique: bool = False,
             **opts: Any) -> list[dict[str, Any]]:
  """Generates `num` examples of `task` from `split`, deterministically.

  Args:
    task: a key of `TASKS` ("arithmetic" or "countdown").
    split: "train" or "test" (see the module docstring for how they are split).
    num: number of examples.
    seed: seed of the numpy generator; the same arguments give the same list.
    test_fraction: share of all problems that belong to "test", in (0, 1).
    unique: if True, no prompt repeats within the returned list.
    **opts: fields of the task's options dataclass (`ArithmeticOptions`,
      `CountdownOptions`).

  Returns:
    A list of example dicts, as described in the module docstring.

  Raises:
    ValueError: for an unknown task, split or option, or when the split holds
      too few problems for `num` (with `unique=True`).
  """
  spec = _get_task(task)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
  if num < 0:
    raise ValueError(f"num must be >= 0, got {num}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  fields = [f.name for f in dataclasses.fields(spec.options)]
  unknown = sorted(set(opts) - set(fields))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for task {task!r}; valid options: {fields}")
  options = spec.options(**opts)

  rng = np.random.default_rng(seed)
  examples: list[dict[str, Any]] = []
  seen: set[str] = set()
  # A split holds about test_fraction (or 1 - test_fraction) of all draws, and
  # countdown rejects some draws; this bound only stops a hopeless search.
  max_draws = 1000 + int(100 * num / min(test_fraction, 1.0 - test_fraction))
  for _ in range(max_draws):
    if len(examples) == num:
      return examples
    example = spec.sample(rng, options)
    if example is None or split_of(task, example["prompt"], test_fraction) != split:
      continue
    if unique:
      if example["prompt"] in seen:
        continue
      seen.add(example["prompt"])
    examples.append(example)
  if len(examples) == num:
    return examples
  raise ValueError(
      f"found only {len(examples)} of {num} {'unique ' if unique else ''}{task!r} problems "
      f"in split {split!r} after {max_draws} draws with {options}; ask for fewer, "
      "widen the options, or set unique=False")


def corpus(num: int, seed: int) -> Iterator[str]:
  """Yields `num` lines `prompt + answer`, for training a tokenizer.

  Alternates arithmetic (all of "+-*", negative results allowed, 1-3 digits)
  and countdown problems from the train split, so every character either task
  can produce appears.
  """
  num_arithmetic = (num + 1) // 2
  arithmetic = generate("arithmetic", "train", num_arithmetic, seed, ops="+-*",
                        allow_negative=True)
  countdown = generate("countdown", "train", num - num_arithmetic, seed)
  for i in range(num):
    example = arithmetic[i // 2] if i % 2 == 0 else countdown[i // 2]
    yield example["prompt"] + example["answer"]
