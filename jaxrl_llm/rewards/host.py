"""Host-side (Python) rewards: math answer checking and a thread-pool reward wrapper.

`math_reward(completion, example)` is the one math scorer of training and
evaluation: 1.0 iff the completion's final answer
(`answers.extract_completion_answer`) equals the reference's final answer
(`answers.gold_answer` of ``example["answer"]``, so GSM8K rationales ending in
``#### 72`` and MATH solutions with ``\\boxed{}`` work as given) by
`math_equal`.

`math_equal` decides whether two math answers agree: normalised string
equality, then exact rational comparison of plain numbers, then symbolic
comparison (math-verify when installed, else sympy). The symbolic step runs in
a separate worker process that is killed when a call exceeds its timeout, so a
pathological expression (say ``9^9^9^9``) costs at most ``timeout_s`` and
cannot stall the trainer; a timeout answers False and is counted in
`math_equal_stats`.

`HostReward` runs an arbitrary Python reward
``fn(prompt_text, completion_text, example) -> float`` over a batch, many calls
at a time, each bounded by a timeout (answer 0.0, counted in ``.stats``). Its
`HostReward.in_graph` method adapts it to the in-graph protocol of
`jaxrl_llm.rewards.base` through `jax.pure_callback`, so it can be called from
the jitted RL step.

This module imports neither jax nor sympy at import time (jax is imported by
`HostReward.in_graph`, sympy only inside the worker process). Worker
processes need a POSIX system (``select`` on pipes).

Shape suffixes:
  B: completions in the batch.
  P: prompt length (tokens).
  L: completion length (tokens).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

# The worker process loads this module by file path, without its package (see _WORKER_BOOTSTRAP).
from jaxrl_llm.rewards.answers import (
    braced_group,
    extract_completion_answer,
    gold_answer,
    last_boxed,
    last_number,
)

if TYPE_CHECKING:
  import jax

  from jaxrl_llm.rewards.base import RewardInputs

# --------------------------------------------------------------------------
# Answer extraction and normalisation
# --------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_RATIO_RE = re.compile(r"[-+]?\d+/\d+")
_LATEX_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_MAX_ANSWER_CHARS = 1000


def extract_answer(text: str) -> str:
  """The final answer in a model response, or "" when none is found.

  Kept for existing callers; new code uses `math_reward`, or
  `answers.extract_completion_answer` (which also reads "the answer is X"
  and drops thousands separators after ``####``). In order of preference:
  the content of the last ``\\boxed{...}`` (nested braces allowed); the rest
  of the line after the last ``####`` (GSM8K style); the last number in the
  text (``-1,234.5`` and ``3/4`` forms, thousands separators removed).
  """
  if not isinstance(text, str):
    raise ValueError(f"extract_answer needs a str, got {type(text).__name__}.")  # noqa: TRY004
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  mark = text.rfind("####")
  if mark >= 0:
    return text[mark + 4:].split("\n", 1)[0].strip().rstrip(".").strip()
  return last_number(text) or ""


def normalize_answer(text: str) -> str:
  """Canonical string form of an answer, used before any comparison.

  Takes the last ``\\boxed{}`` content if any and drops a leading ``####``;
  removes ``$``, ``\\left``/``\\right``, thin spaces, ``\\text{}`` wrappers
  (keeping their content), percent signs, degree marks, a leading ``x =``,
  a trailing period, thousands separators and all whitespace; maps
  ``\\dfrac``/``\\tfrac`` to ``\\frac``.
  """
  s = text.strip()
  boxed = last_boxed(s)
  if boxed is not None:
    s = boxed
  s = s.strip()
  s = s.removeprefix("####")
  for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""),
                   ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                   ("^{\\circ}", ""), ("^\\circ", ""), ("\\%", ""), ("%", ""),
                   ("\\$", ""), ("$", "")):
    s = s.replace(old, new)
  s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
  s = re.sub(r"^\s*[A-Za-z]\s*=(?!=)", "", s)
  s = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", s)
  s = re.sub(r"\s+", "", s)
  return s.rstrip(".")


def _as_fraction(s: str) -> Fraction | None:
  """Exact value of a plain number ("12", "-0.5", "1e-3", "3/4", "\\frac{3}{4}")."""
  if _PLAIN_NUMBER_RE.fullmatch(s) or _RATIO_RE.fullmatch(s):
    try:
      return Fraction(s)
    except (ValueError, ZeroDivisionError):
      return None
  m = _LATEX_FRAC_RE.fullmatch(s)
  if m and int(m.group(3)) != 0:
    value = Fraction(int(m.group(2)), int(m.group(3)))
    return -value if m.group(1) else value
  return None


# --------------------------------------------------------------------------
# Symbolic comparison (runs inside the worker process)
# --------------------------------------------------------------------------

_SYMPY_NAMES = ("Symbol", "Integer", "Float", "Rational", "sqrt", "pi", "E", "I", "oo",
                "exp", "log", "ln", "sin", "cos", "tan", "Abs", "factorial", "binomial")
_SAFE_EXPR_RE = re.compile(r"[0-9A-Za-z_+\-*/^().\s]*")


def _replace_command(s: str, command: str, nargs: int, fmt: Callable[..., str]) -> str | None:
  """Rewrites every ``\\command{a}{b}...`` (innermost first); None on malformed input."""
  while True:
    i = s.rfind(command)
    if i < 0:
      return s
    j = i + len(command)
    args = []
    for _ in range(nargs):
      group = braced_group(s, j)
      if group is None:
        return None
      args.append(group[0])
      j = group[1]
    s = s[:i] + fmt(*args) + s[j:]


def _latex_to_sympy_text(s: str) -> str | None:
  """A small LaTeX subset to sympy syntax; None when the input is outside it."""
  s = _replace_command(s, "\\frac", 2, lambda a, b: f"(({a})/({b}))")
  if s is None:
    return None
  s = _replace_command(s, "\\sqrt", 1, lambda a: f"sqrt({a})")
  if s is None:
    return None
  for old, new in (("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\infty", "oo"),
                   ("\\ln", "log"), ("\\log", "log"), ("\\exp", "exp"), ("\\sin", "sin"),
                   ("\\cos", "cos"), ("\\tan", "tan"), ("{", "("), ("}", ")")):
    s = s.replace(old, new)
  if len(s) > 400 or not _SAFE_EXPR_RE.fullmatch(s) or "__" in s:
    return None
  if re.search(r"\.\s*[A-Za-z_]", s):  # attribute access, never math
    return None
  return s.replace("^", "**")


def _sympy_equal(pred: str, gold: str) -> bool:
  import sympy
  from sympy.parsing.sympy_parser import (
      convert_xor,
      implicit_multiplication_application,
      parse_expr,
      standard_transformations,
  )
  texts = [_latex_to_sympy_text(pred), _latex_to_sympy_text(gold)]
  if None in texts:
    return False
  # No builtins, and only the sympy names above: parse_expr evaluates its input.
  namespace = {"__builtins__": {}}
  namespace.update({name: getattr(sympy, name) for name in _SYMPY_NAMES})
  transformations = standard_transformations + (implicit_multiplication_application,
                                                 convert_xor)
  a, b = (parse_expr(t, local_dict={}, global_dict=dict(namespace),
                     transformations=transformations) for t in texts)
  diff = sympy.simplify(a - b)
  if diff == 0:
    return True
  if not diff.free_symbols:
    value = complex(sympy.N(diff, 30))
    scale = max(1.0, abs(complex(sympy.N(b, 30))))
    return abs(value) <= 1e-12 * scale
  return bool(a.equals(b))


def _symbolic_equal(pred: str, gold: str, math_verify: Any) -> bool:
  if math_verify is not None:
    try:
      gold_parsed = math_verify.parse("\\boxed{" + gold + "}")
      pred_parsed = math_verify.parse("\\boxed{" + pred + "}")
      verified = bool(gold_parsed and pred_parsed
                      and math_verify.verify(gold_parsed, pred_parsed))
    except Exception:  # noqa: BLE001 - any parser failure falls back to sympy
      verified = False
    if verified:
      return True
  return _sympy_equal(pred, gold)


def _worker_main() -> None:
  """Worker process loop: one JSON request per line in, one JSON answer per line out."""
  try:
    import math_verify
  except ImportError:
    math_verify = None
  import sympy  # noqa: F401 - import before announcing readiness, not inside a timed call
  sys.stdout.write("ready\n")
  sys.stdout.flush()
  for line in sys.stdin:
    try:
      request = json.loads(line)
      equal = _symbolic_equal(request["pred"], request["gold"], math_verify)
      answer = {"equal": bool(equal)}
    except Exception as e:  # noqa: BLE001 - any failure means "not shown equal"
      answer = {"equal": False, "error": f"{type(e).__name__}: {e}"[:200]}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


# Runs this file as a script without adding any directory to sys.path, so that
# the worker imports only the standard library, numpy and sympy. The answers
# module is loaded by path under its own name first, so that this file's import
# of it does not import the jaxrl_llm.rewards package (and with it jax).
_WORKER_BOOTSTRAP = (
    "import sys, runpy, importlib.util as iu; del sys.path[0]; "
    "spec = iu.spec_from_file_location(sys.argv[2], sys.argv[3]); "
    "module = sys.modules[spec.name] = iu.module_from_spec(spec); "
    "spec.loader.exec_module(module); "
    "runpy.run_path(sys.argv[1])['_worker_main']()")
_ANSWERS_MODULE = braced_group.__module__


class _MathWorker:
  """One worker process; `ask` returns None when the answer misses its deadline."""

  def __init__(self, startup_timeout_s: float):
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER_BOOTSTRAP, os.path.abspath(__file__), _ANSWERS_MODULE,
         os.path.abspath(sys.modules[_ANSWERS_MODULE].__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        close_fds=True)
    self._buffer = b""
    if self._readline(startup_timeout_s) != "ready":
      self.close()
      raise RuntimeError("The math worker process failed to start.")

  def _readline(self, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    fd = self.proc.stdout.fileno()
    while b"\n" not in self._buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return None
      ready, _, _ = select.select([fd], [], [], remaining)
      if not ready:
        return None
      chunk = os.read(fd, 65536)
      if not chunk:
        raise EOFError("The math worker process exited.")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line.decode()

  def ask(self, pred: str, gold: str, timeout_s: float) -> bool | None:
    self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
    self.proc.stdin.flush()
    line = self._readline(timeout_s)
    return None if line is None else bool(json.loads(line)["equal"])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass


class _MathWorkerPool:
  """Idle worker processes shared by all callers; a timed-out worker is killed."""

  def __init__(self, max_idle: int = 8, startup_timeout_s: float = 120.0):
    self._lock = threading.Lock()
    self._idle: list[_MathWorker] = []
    self._all: set[_MathWorker] = set()
    self._max_idle = max_idle
    self._startup_timeout_s = startup_timeout_s
    self.stats = {"calls": 0, "symbolic_calls": 0, "timeouts": 0, "errors": 0}

  def count(self, key: str) -> None:
    with self._lock:
      self.stats[key] += 1

  def equal(self, pred: str, gold: str, timeout_s: float) -> bool:
    with self._lock:
      worker = self._idle.pop() if self._idle else None
    try:
      if worker is None:
        worker = _MathWorker(self._startup_timeout_s)
        with self._lock:
          self._all.add(worker)
      answer = worker.ask(pred, gold, timeout_s)
    except (OSError, EOFError, RuntimeError, ValueError):
      self._retire(worker)
      self.count("errors")
      return False
    if answer is None:
      self._retire(worker)
      self.count("timeouts")
      return False
    with self._lock:
      if len(self._idle) < self._max_idle:
        self._idle.append(worker)
        worker = None
    if worker is not None:
      self._retire(worker)
    return answer

  def _retire(self, worker: _MathWorker | None) -> None:
    if worker is None:
      return
    worker.close()
    with self._lock:
      self._all.discard(worker)

  def close_all(self) -> None:
    with self._lock:
      workers, self._all, self._idle = list(self._all), set(), []
    for worker in workers:
      worker.close()


_POOL = _MathWorkerPool()
atexit.register(_POOL.close_all)


@functools.cache
def _require_symbolic_backend() -> None:
  """Fails loudly, once, instead of letting every symbolic check answer False."""
  if not any(importlib.util.find_spec(m) for m in ("sympy", "math_verify")):
    raise ImportError(
        "math_equal needs sympy (pip install sympy) or math-verify for symbolic answers.")


def math_equal_stats() -> dict[str, int]:
  """Counters of `math_equal`: calls, symbolic_calls, timeouts, errors."""
  with _POOL._lock:
    return dict(_POOL.stats)


def reset_math_equal_stats() -> None:
  with _POOL._lock:
    for key in _POOL.stats:
      _POOL.stats[key] = 0


def math_equal(pred: str, gold: str, timeout_s: float = 2.0) -> bool:
  """Whether a predicted math answer equals the reference answer.

  Both strings go through `normalize_answer` (so a ``\\boxed{}`` response or
  a ``#### 42`` line works directly), then, first match wins:
    1. equal normalised strings;
    2. both plain numbers (integers, decimals, scientific notation, ``a/b``,
       ``\\frac{a}{b}``): exact rational equality, so "1/2" = "0.5";
    3. symbolic: math-verify when installed, else sympy on a LaTeX subset
       (``\\frac``, ``\\sqrt``, ``\\cdot``, ``^``, ``\\pi``), equal when
       simplify(a − b) = 0 (or |a − b| ≤ 1e-12·max(1, |b|) for constants).
       This step runs in a worker process bounded by ``timeout_s`` (process
       startup excluded); a timeout, a crash or anything unparsable answers
       False. Timeouts and errors are counted in `math_equal_stats`.
  Answers longer than 1000 characters are compared as strings only.
  """
  if not isinstance(pred, str) or not isinstance(gold, str):
    raise ValueError(  # noqa: TRY004
        f"math_equal compares strings, got {type(pred).__name__} and {type(gold).__name__}.")
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}.")
  _POOL.count("calls")
  p, g = normalize_answer(pred), normalize_answer(gold)
  if p == g:
    return bool(p)
  if not p or not g or len(p) > _MAX_ANSWER_CHARS or len(g) > _MAX_ANSWER_CHARS:
    return False
  p_num, g_num = _as_fraction(p), _as_fraction(g)
  if p_num is not None and g_num is not None:
    return p_num == g_num
  _require_symbolic_backend()
  _POOL.count("symbolic_calls")
  return _POOL.equal(p, g, timeout_s)


def example_gold_answer(example: Mapping[str, Any]) -> str:
  """`answers.gold_answer` of ``example["answer"]``, with errors naming the problem.

  Raises ValueError when the example has no "answer" field (the message names
  the fields it has) or when that field holds no final answer (e.g. "#### ").
  """
  if not isinstance(example, Mapping):
    raise ValueError(  # noqa: TRY004
        f"a math example must be a mapping with an 'answer' field, got {type(example).__name__}")
  if "answer" not in example:
    raise ValueError(
        f"a math example needs an 'answer' field (a GSM8K rationale ending in '#### N', a "
        f"MATH solution with \\boxed{{...}}, or the answer itself); this one has fields "
        f"{sorted(example)}. Map the dataset's answer field onto 'answer' with "
        f"data.field_map, e.g. (('answer', 'solution'),).")
  gold = gold_answer(str(example["answer"]))
  if not gold:
    raise ValueError(f"the example's 'answer' field {str(example['answer'])[-200:]!r} holds no "
                     f"final answer (an empty \\boxed{{}} or '####' line); fix or drop the row")
  return gold


def math_reward(completion: str, example: Mapping[str, Any], *,
                last_number_fallback: bool = False, timeout_s: float = 2.0) -> float:
  """1.0 iff the completion's final answer equals the example's, else 0.0.

    pred = answers.extract_completion_answer(completion, last_number_fallback=...)
    gold = answers.gold_answer(str(example["answer"]))
    reward = 1.0 if pred is not None and math_equal(pred, gold, timeout_s) else 0.0

  So a GSM8K rationale ("... #### 1,234") scores 1.0 against its own row and
  "\\boxed{0.5}" scores 1.0 against a MATH answer "\\frac{1}{2}". A completion
  without a stated answer scores 0.0. Raises ValueError when the example has no
  usable "answer" field (see `example_gold_answer`).
  """
  gold = example_gold_answer(example)
  pred = extract_completion_answer(completion, last_number_fallback=last_number_fallback)
  if pred is None:
    return 0.0
  return 1.0 if math_equal(pred, gold, timeout_s=timeout_s) else 0.0


# --------------------------------------------------------------------------
# HostReward: a Python reward over a batch, with per-call timeouts
# --------------------------------------------------------------------------


class HostReward:
  """A Python reward function run over a batch of token ids on the host.

  ``fn(prompt_text, completion_text, example) -> float`` scores one
  completion; ``decode_fn(token_ids: list[int]) -> str`` turns the masked
  token ids of a prompt or completion into text (e.g. a tokenizer's
  ``decode``); ``example`` is ``self.examples[example_index]`` (see
  `set_examples`), or {} when no index or table is given.

  Calls run concurrently, at most ``num_workers`` at a time, each on its own
  daemon thread. A call still running ``timeout_s`` after it started is
  abandoned: its reward is 0.0 and ``stats["timeouts"]`` counts it (Python
  cannot stop a thread, so the abandoned call finishes in the background; put
  unbounded work behind `math_equal`, whose worker process is killed instead).
  An exception in ``fn`` is re-raised when ``on_error="raise"`` (default), or
  scored 0.0 and counted in ``stats["errors"]`` when ``on_error="zero"``.
  A non-finite reward counts as an error.

  With ``eos_id`` set, a completion is cut at its first ``eos_id`` before
  decoding.
  """

  def __init__(
      self,
      fn: Callable[[str, str, Mapping[str, Any]], float],
      decode_fn: Callable[[list[int]], str],
      *,
      timeout_s: float = 10.0,
      num_workers: int = 8,
      eos_id: int | None = None,
      on_error: str = "raise",
  ):
    if not callable(fn) or not callable(decode_fn):
      raise ValueError("fn and decode_fn must be callable.")  # noqa: TRY004
    if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
      raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}.")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
      raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
    if on_error not in ("raise", "zero"):
      raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}.")
    self.fn = fn
    self.decode_fn = decode_fn
    self.timeout_s = float(timeout_s)
    self.num_workers = num_workers
    self.eos_id = eos_id
    self.on_error = on_error
    self.examples: list[Mapping[str, Any]] | None = None
    self.stats = {"calls": 0, "timeouts": 0, "errors": 0}
    self._stats_lock = threading.Lock()

  def set_examples(self, examples: Sequence[Mapping[str, Any]]) -> None:
    """Sets the host-side table that ``example_index_B`` indexes into."""
    examples = list(examples)
    for i, ex in enumerate(examples):
      if not isinstance(ex, Mapping):
        raise ValueError(f"examples[{i}] must be a mapping, got {type(ex).__name__}.")  # noqa: TRY004
    self.examples = examples

  def reset_stats(self) -> None:
    with self._stats_lock:
      for key in self.stats:
        self.stats[key] = 0

  def _count(self, key: str, n: int = 1) -> None:
    with self._stats_lock:
      self.stats[key] += n

  def _example(self, index: int | None) -> Mapping[str, Any]:
    if index is None or self.examples is None:
      return {}
    if not 0 <= index < len(self.examples):
      raise ValueError(
          f"example index {index} is outside the example table (size {len(self.examples)}).")
    return self.examples[index]

  def _decode_rows(self, tokens: np.ndarray, mask: np.ndarray, cut_at_eos: bool) -> list[str]:
    texts = []
    for row, keep in zip(tokens, mask):
      ids = row[keep != 0]
      if cut_at_eos and self.eos_id is not None:
        stops = np.flatnonzero(ids == self.eos_id)
        if stops.size:
          ids = ids[:stops[0]]
      texts.append(self.decode_fn([int(i) for i in ids]))
    return texts

  def __call__(
      self,
      prompt_tokens_BP: Any,
      prompt_mask_BP: Any,
      completion_BL: Any,
      completion_mask_BL: Any,
      example_index_B: Any = None,
  ) -> np.ndarray:
    """Rewards of a batch: float32 (B,)."""
    prompt_BP, pmask_BP = np.asarray(prompt_tokens_BP), np.asarray(prompt_mask_BP)
    comp_BL, cmask_BL = np.asarray(completion_BL), np.asarray(completion_mask_BL)
    if comp_BL.ndim != 2 or comp_BL.shape != cmask_BL.shape:
      raise ValueError(
          f"completion_BL and completion_mask_BL must both be (B, L); got {comp_BL.shape} "
          f"and {cmask_BL.shape}.")
    batch = comp_BL.shape[0]
    if prompt_BP.ndim != 2 or prompt_BP.shape != pmask_BP.shape or prompt_BP.shape[0] != batch:
      raise ValueError(
          f"prompt_tokens_BP and prompt_mask_BP must both be ({batch}, P); got "
          f"{prompt_BP.shape} and {pmask_BP.shape}.")
    if example_index_B is None:
      indices = [None] * batch
    else:
      index_B = np.asarray(example_index_B)
      if index_B.shape != (batch,):
        raise ValueError(f"example_index_B must have shape ({batch},), got {index_B.shape}.")
      indices = [int(i) for i in index_B]
    jobs = list(zip(self._decode_rows(prompt_BP, pmask_BP, cut_at_eos=False),
                    self._decode_rows(comp_BL, cmask_BL, cut_at_eos=True),
                    [self._example(i) for i in indices]))
    self._count("calls", batch)
    return self._run(jobs)

  def _run(self, jobs: list[tuple[str, str, Mapping[str, Any]]]) -> np.ndarray:
    rewards = np.zeros((len(jobs),), np.float32)
    done = threading.Condition()
    outcomes: dict[int, tuple[str, Any]] = {}

    def work(i: int) -> None:
      try:
        value = float(self.fn(*jobs[i]))
        if not np.isfinite(value):
          raise ValueError(f"reward function returned {value}")
        outcome = ("ok", value)
      except Exception as e:  # noqa: BLE001 - reported to the caller below
        outcome = ("error", e)
      with done:
        outcomes[i] = outcome
        done.notify()

    started: dict[int, float] = {}  # index -> start time, for calls in flight
    next_job = 0
    with done:
      while next_job < len(jobs) or started:
        while next_job < len(jobs) and len(started) < self.num_workers:
          started[next_job] = time.monotonic()
          threading.Thread(target=work, args=(next_job,), daemon=True).start()
          next_job += 1
        now = time.monotonic()
        for i in [i for i in started if i in outcomes]:
          del started[i]
          status, value = outcomes[i]
          if status == "ok":
            rewards[i] = value
          elif self.on_error == "raise":
            raise RuntimeError(f"Host reward function failed on example {i}.") from value
          else:
            self._count("errors")
        for i in [i for i, t0 in started.items() if now - t0 >= self.timeout_s]:
          del started[i]  # abandoned; a late outcome is ignored
          self._count("timeouts")
        if started and not any(i in outcomes for i in started):
          deadline = min(started.values()) + self.timeout_s
          done.wait(timeout=max(deadline - time.monotonic(), 0.0))
    return rewards

  def in_graph(self, inputs: RewardInputs) -> jax.Array:
    """This reward as an in-graph function, usable inside `jax.jit`.

    Calls the host through `jax.pure_callback` with result
    ``ShapeDtypeStruct((B,), float32)``. ``inputs.task["example_index_B"]``,
    when present, selects each completion's row of ``self.examples``. As for
    any pure callback, XLA may skip the call when the result is unused, so
    ``stats`` count host calls actually made.
    """
    import jax
    import jax.numpy as jnp

    batch = inputs.completion_BL.shape[0]
    args = [inputs.prompt_tokens_BP, inputs.prompt_mask_BP, inputs.completion_BL,
            inputs.completion_mask_BL]
    task = inputs.task if inputs.task is not None else {}
    if "example_index_B" in task:
      args.append(jnp.asarray(task["example_index_B"], jnp.int32))

    chunked = [_column_chunks(a) for a in args]

    def callback(*chunk_lists):
      return self(*(np.concatenate([np.asarray(c) for c in chunks], axis=-1)
                    for chunks in chunk_lists))

    return jax.pure_callback(
        callback, jax.ShapeDtypeStruct((batch,), jnp.float32), *chunked,
        vmap_method="sequential")


# A callback operand of more than ~64 KiB deadlocks XLA:CPU when the computation spans
# several CPU devices (jax 0.10: the operand's host copy waits on the devices' thread pool,
# whose threads wait in a collective for the device running the callback). Operands are
# passed in column chunks under this size instead; tests/rewards_test.py checks a large
# host-reward batch on 8 CPU devices.
_CALLBACK_CHUNK_BYTES = 32 * 1024


def _column_chunks(x: jax.Array) -> tuple[jax.Array, ...]:
  """`x` split along its last axis into pieces of at most _CALLBACK_CHUNK_BYTES (on CPU)."""
  import jax
  if jax.default_backend() != "cpu" or x.ndim == 0 or x.nbytes <= _CALLBACK_CHUNK_BYTES:
    return (x,)
  row_bytes = max(x.nbytes // x.shape[-1], 1)
  width = max(_CALLBACK_CHUNK_BYTES // row_bytes, 1)
  return tuple(x[..., i:i + width] for i in range(0, x.shape[-1], width))
