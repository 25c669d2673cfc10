"""Tests for jaxrl_llm.rewards.answers: final answers of references and completions.

Expected answers are read off the texts by hand. The fixtures under
tests/fixtures/{gsm8k,math} are small hand-written rows in the public formats.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from jaxrl_llm.rewards import answers

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def _rows(name, split):
  with open(FIXTURES / name / f"{split}.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("text, want", [
    # GSM8K: '#### N' with separators dropped, signs and decimals kept.
    ("She sells 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("Total: <<1236+48=1284>>1284\n#### 1,284", "1284"),
    ("#### 8,820,000", "8820000"),
    ("It drops to 7 - 12 = <<7-12=-5>>-5 degrees.\n#### -5", "-5"),
    ("#### 16.8", "16.8"),
    ("#### 42.", "42"),
    ("#### $1,234.50", "1234.50"),
    ("first #### 1\nthen #### 2\n", "2"),
    # MATH: the last box, nested braces matched.
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{3} then $\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{\\sqrt{2}}{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5$", "5"),
    # Plain answers.
    ("  72 ", "72"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("1,2", "1,2"),
    # No answer in the field.
    ("####", ""),
    ("\\boxed{}", ""),
])
def test_gold_answer(text, want):
  assert answers.gold_answer(text) == want
  assert answers.gold_answer(want) == want  # idempotent


@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_answer_of_fixtures(split):
  gsm8k = [answers.gold_answer(r["answer"]) for r in _rows("gsm8k", split)]
  want = {"train": ["15", "1284", "-5", "8.75", "270", "144", "15000", "4.5"],
          "test": ["210", "407", "-23", "16.8", "8820000", "28", "46", "12"]}[split]
  assert gsm8k == want
  for row in _rows("math", split):
    # The solution's last box is the row's answer field.
    assert answers.gold_answer(row["solution"]) == row["answer"]
    assert answers.gold_answer(row["answer"]) == row["answer"]
  for row in _rows("gsm8k", split) + _rows("math", split):
    for field in row.values():
      once = answers.gold_answer(str(field))
      assert answers.gold_answer(once) == once


def test_gold_answer_rejects_non_text():
  with pytest.raises(ValueError, match="str"):
    answers.gold_answer(72)


@pytest.mark.parametrize("text, want, want_with_fallback", [
    ("so \\boxed{\\frac{3}{4}} and then \\boxed{7}", "7", "7"),
    ("nested \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"),
    ("the box beats '####': #### 5 \\boxed{6}", "6", "6"),
    ("work <<2*3=6>>\n#### 1,234\nextra 9", "1234", "1234"),
    ("#### -3.5.", "-3.5", "-3.5"),
    ("So the answer is 18 dollars.", "18", "18"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}",
     "\\frac{1}{2}"),
    ("THE ANSWER IS: **-7**.", "-7", "-7"),
    ("the answer is 3, no wait, the answer is 1,500.", "1500", "1500"),
    ("The answer is $$42$$", "42", "42"),
    ("an empty box \\boxed{} then the answer is 4", "4", "4"),
    # Only the fallback reads a bare number.
    ("we get 12 apples, then -3.5", None, "-3.5"),
    ("a total of 1,000,000 and 3/4", None, "3/4"),
    # Nothing to find.
    ("no numbers here", None, None),
    ("", None, None),
])
def test_extract_completion_answer(text, want, want_with_fallback):
  assert answers.extract_completion_answer(text) == want
  assert answers.extract_completion_answer(text, last_number_fallback=True) == want_with_fallback


def test_completion_and_reference_agree_on_gsm8k_rationales():
  # A model that writes a rationale in the dataset's own format states the gold answer.
  for row in _rows("gsm8k", "train") + _rows("gsm8k", "test"):
    assert answers.extract_completion_answer(row["answer"]) == answers.gold_answer(row["answer"])


def test_braced_group_and_last_boxed():
  assert answers.braced_group("{a{b}c}d", 0) == ("a{b}c", 7)
  assert answers.braced_group("x{a}", 0) is None
  assert answers.braced_group("{unclosed", 0) is None
  assert answers.last_boxed("no box") is None
  assert answers.last_boxed("\\boxed{\\frac{1}{2}") is None  # never closed
  assert answers.last_number("x -1,234.5 y") == "-1234.5"
  assert answers.last_number("none") is None


def test_import_is_standard_library_only():
  # The math worker process loads this module by path; it must not pull in jax or numpy.
  code = ("import sys, importlib.util as iu; "
          f"spec = iu.spec_from_file_location('answers', {answers.__file__!r}); "
          "m = iu.module_from_spec(spec); spec.loader.exec_module(m); "
          "print(sorted(k for k in ('jax', 'numpy', 'sympy') if k in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
