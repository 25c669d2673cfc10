"""Final answers of math text: of a reference field (`gold_answer`) and of a completion.

Standard library only (no jax, numpy or sympy), so any process can import it;
`jaxrl_llm.rewards.host.math_reward` compares the two with `math_equal`.

Reference fields come in two public formats:

  GSM8K  "...rationale with <<48/2=24>> calculator notes...\\n#### 1,234"
         -> "1234" (thousands separators and a trailing period dropped;
         signs and decimals kept)
  MATH   "...so the sum is $\\boxed{\\frac{1}{2}}$." -> "\\frac{1}{2}"
         (the last box; nested braces allowed)

Anything else is taken as the answer itself, stripped ("72", "\\frac{1}{2}").

A completion's answer is, first match wins: the last ``\\boxed{...}``; the
rest of the line after the last ``####``; the last "the answer is X" or "the
final answer is X" (any case); with ``last_number_fallback``, the last number
in the text. A rule that finds only empty text passes to the next.
"""

from __future__ import annotations

import re

__all__ = ["braced_group", "extract_completion_answer", "gold_answer", "last_boxed",
           "last_number"]

# A number as written in prose: "-1,234.5", "3/4", ".5" (commas are thousands separators).
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_SEPARATED_NUMBER_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_GSM8K_MARK = "####"
_ANSWER_IS_RE = re.compile(r"\b(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
# "18 dollars", "5 apples each": a number followed by words only.
_NUMBER_THEN_WORDS_RE = re.compile(r"([-+]?[\d,]*\.?\d+)\s+[A-Za-z][A-Za-z\s]*")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def braced_group(text: str, start: int) -> tuple[str, int] | None:
  """The content of the brace group opening at ``text[start] == '{'`` and the index after it.

  Braces nest: ``braced_group("{a{b}c}", 0) == ("a{b}c", 7)``. None when
  ``text[start]`` is not ``{`` or the group is never closed.
  """
  if start >= len(text) or text[start] != "{":
    return None
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), None if there is none.

  Nested braces are matched (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``);
  the brace-less form ``\\boxed 5`` gives its argument up to the next space or
  ``$``. An unclosed box counts as none.
  """
  best = -1
  command = ""
  for cmd in ("\\boxed", "\\fbox"):
    i = text.rfind(cmd)
    if i > best:
      best, command = i, cmd
  if best < 0:
    return None
  i = best + len(command)
  while i < len(text) and text[i] == " ":
    i += 1
  group = braced_group(text, i)
  if group is not None:
    return group[0]
  m = re.match(r"[^\s${}]+", text[i:])
  return m.group(0) if m else None


def last_number(text: str) -> str | None:
  """The last number in prose ("-1,234.5" -> "-1234.5", "3/4"), None if there is none."""
  numbers = _NUMBER_RE.findall(text)
  return numbers[-1].replace(",", "") if numbers else None


def _clean(answer: str) -> str:
  """Strips whitespace, ``$`` and ``**`` wrappers and a trailing period; "1,234" -> "1234".

  Only a whole answer written with thousands separators loses its commas, so a
  list such as "1,2" is kept as it is.
  """
  s = answer.strip()
  previous = None
  while s != previous:
    previous = s
    s = s.strip().removeprefix("\\$").strip("$*").strip().removesuffix(".").strip()
  if _SEPARATED_NUMBER_RE.fullmatch(s):
    s = s.replace(",", "")
  return s


def _after_last_mark(text: str) -> str | None:
  """The rest of the line after the last ``####``, cleaned; None without a mark."""
  i = text.rfind(_GSM8K_MARK)
  if i < 0:
    return None
  return _clean(text[i + len(_GSM8K_MARK):].split("\n", 1)[0])


def _gold_once(text: str) -> str:
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  marked = _after_last_mark(text)
  if marked is not None:
    return marked
  return text.strip()


def gold_answer(answer_text: str) -> str:
  """The final answer of a reference ``answer`` field (GSM8K, MATH or plain).

  The content of the last ``\\boxed{}`` (MATH solutions), else the rest of the
  line after the last ``####`` (GSM8K: "#### 1,234" -> "1234", "#### -3" ->
  "-3", "#### 0.5" -> "0.5"), else the stripped text. Applied until nothing
  changes, so ``gold_answer(gold_answer(x)) == gold_answer(x)``. Returns ""
  for a field whose box or ``####`` line is empty (e.g. "#### ").
  """
  if not isinstance(answer_text, str):
    raise ValueError(  # noqa: TRY004
        f"gold_answer needs the reference answer as a str, got {type(answer_text).__name__}; "
        f"convert it with str(...) first.")
  current = answer_text
  while True:  # each rewrite is strictly shorter, so this ends
    rewritten = _gold_once(current)
    if rewritten == current:
      return current
    current = rewritten


def _answer_is(text: str) -> str | None:
  """X of the last "the answer is X" / "the final answer is X", or None."""
  matches = list(_ANSWER_IS_RE.finditer(text))
  if not matches:
    return None
  rest = text[matches[-1].end():].split("\n", 1)[0].strip()
  if rest.startswith("$"):  # "$x$" or "$$x$$": the math span
    inner = rest.lstrip("$")
    end = inner.find("$")
    rest = inner if end < 0 else inner[:end]
  else:
    end = _SENTENCE_END_RE.search(rest)
    rest = rest if end is None else rest[:end.start()]
  rest = _clean(rest)
  m = _NUMBER_THEN_WORDS_RE.fullmatch(rest)
  return _clean(m.group(1)) if m else rest


def extract_completion_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
  """The final answer of a model completion, or None when it states none.

  First match wins:
    1. the content of the last ``\\boxed{...}`` (nested braces allowed);
    2. the rest of the line after the last ``####`` ("#### 1,234." -> "1234");
    3. X in the last "the answer is X" / "The final answer is X" (any case):
       the ``$...$`` span when X starts with ``$``, else up to the end of the
       sentence; ``$`` and a trailing period stripped; "18 dollars" -> "18";
    4. only when ``last_number_fallback``: the last number in the text.
  A rule that finds only empty text passes to the next one.
  """
  if not isinstance(text, str):
    raise ValueError(  # noqa: TRY004
        f"extract_completion_answer needs the completion as a str, got {type(text).__name__}.")
  boxed = last_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  for rule in (_after_last_mark, _answer_is):
    found = rule(text)
    if found:
      return found
  return last_number(text) if last_number_fallback else None
