"""Host tools for multi-turn environments, tool-call parsing and `ToolEnv`.

Tool calls: JSON in tags (Hermes / Qwen style),

  <tool_call>{"name": "calculator", "arguments": {"expression": "345*67"}}</tool_call>

`parse_tool_calls(text)` returns one `ToolCall` per tag pair, or a
`ToolCallError` for a malformed one (bad JSON, no "name", "arguments" not an
object or a JSON string of one, an unclosed tag); `ToolEnv` turns an error
into an observation ("error: ...") and the trajectory goes on.

Tools (each returns text; an exception becomes an error observation):

  Calculator   arithmetic on numbers with + - * / // % ** and parentheses,
               evaluated by walking Python's AST (`ast.parse(mode="eval")`);
               names, calls, attributes, subscripts and every other node are
               refused, so nothing is ever executed as code. Limits: 200
               characters, exponents of at most 100 with |base| <= 10^6,
               results below 10^100 in magnitude.
  PythonTool   a Python snippet in a child process (`python -I`), what it
               prints is the observation. Limits that the OS enforces
               (resource.setrlimit in the child): CPU seconds (RLIMIT_CPU),
               address space (RLIMIT_AS), no file writes (RLIMIT_FSIZE = 0:
               writing any byte to a file kills the child with SIGXFSZ), one
               process (RLIMIT_NPROC, not enforced for root); no network: the
               child enters a fresh Linux network namespace (unshare(2) with
               CLONE_NEWNET, or CLONE_NEWUSER | CLONE_NEWNET without root),
               which has no interface up, not even loopback; a wall-clock
               time-out kills the child's whole process group; an empty
               temporary working directory and an empty environment. Where
               namespaces are unavailable (not Linux, or user namespaces
               disabled) the tool refuses to start unless it is built with
               `network="unisolated"`, an explicit opt-out. Limits that are NOT
               a security boundary on their own: restricted builtins (no open,
               exec, eval, input) and an import allowlist (math, re, itertools,
               ...; no socket, os, subprocess), which a determined snippet can
               escape in CPython; the OS limits above still hold then.
  Retriever    BM25 (Robertson & Zaragoza 2009, k1 = 1.5, b = 0.75) over a
               local list of documents; returns the top-k documents.

Each tool call runs under a time limit (`ToolEnv.timeout_s`); the host
adapter (`HostEnvAdapter`) adds its own limit per environment call.
"""

from __future__ import annotations

import ast
import collections
import json
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

from jaxrl_llm.envs.base import StepResult, TimeLimitExceeded, call_with_time_limit

# ---------------------------------------------------------------------------
# Tool-call parsing.
# ---------------------------------------------------------------------------
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolCall(NamedTuple):
  name: str
  arguments: Mapping[str, Any]


class ToolCallError(NamedTuple):
  message: str


def parse_tool_calls(text: str) -> list:
  """[ToolCall | ToolCallError] for every <tool_call>...</tool_call> in `text`, in order."""
  calls, pos = [], 0
  while True:
    start = text.find(CALL_OPEN, pos)
    if start < 0:
      return calls
    end = text.find(CALL_CLOSE, start + len(CALL_OPEN))
    if end < 0:
      calls.append(ToolCallError(f"unclosed {CALL_OPEN}: end the call with {CALL_CLOSE}"))
      return calls
    calls.append(_parse_one(text[start + len(CALL_OPEN):end].strip()))
    pos = end + len(CALL_CLOSE)


def _parse_one(body: str):
  try:
    obj = json.loads(body)
  except json.JSONDecodeError as e:
    return ToolCallError(f"the tool call is not valid JSON ({e.msg} at char {e.pos})")
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
    return ToolCallError('a tool call is a JSON object {"name": ..., "arguments": {...}}')
  args = obj.get("arguments", {})
  if isinstance(args, str):  # some templates pass the arguments as a JSON string
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
      return ToolCallError(f"the arguments of {obj['name']!r} are a string that is not JSON")
  if not isinstance(args, dict):
    return ToolCallError(f"the arguments of {obj['name']!r} must be a JSON object")
  return ToolCall(obj["name"], args)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
  """The text of one call, as `parse_tool_calls` reads it."""
  return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': dict(arguments)})}{CALL_CLOSE}"


# ---------------------------------------------------------------------------
# Calculator.
# ---------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Calculator:
  """Safe arithmetic (see the module docstring); `__call__(expression) -> str`."""
  name = "calculator"
  max_chars = 200
  max_exponent = 100
  max_pow_base = 10 ** 6
  max_magnitude = 10 ** 100

  def __call__(self, expression: str) -> str:
    value = self.evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
      value = int(value)
    return str(value)

  def evaluate(self, expression: str):
    if not isinstance(expression, str):
      raise ValueError("expression must be a string")  # noqa: TRY004
    if len(expression) > self.max_chars:
      raise ValueError(f"expression longer than {self.max_chars} characters")
    try:
      tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
      raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return self._eval(tree.body)

  def _check(self, value):
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError("the result is not finite")
    if abs(value) >= self.max_magnitude:
      raise ValueError("the result is too large")
    return value

  def _eval(self, node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return self._check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
      return _UNARY[type(node.op)](self._eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      a, b = self._eval(node.left), self._eval(node.right)
      if isinstance(node.op, ast.Pow) and (abs(b) > self.max_exponent
                                           or abs(a) > self.max_pow_base):
        raise ValueError(f"exponent above {self.max_exponent} or base above "
                         f"{self.max_pow_base}")
      try:
        return self._check(_BINOPS[type(node.op)](a, b))
      except ZeroDivisionError:
        raise ValueError("division by zero") from None
    raise ValueError(f"{type(node).__name__} is not allowed: numbers, + - * / // % ** and "
                     "parentheses only")


# ---------------------------------------------------------------------------
# Sandboxed Python.
# ---------------------------------------------------------------------------
ALLOWED_IMPORTS = ("math", "cmath", "re", "itertools", "functools", "collections", "statistics",
                   "fractions", "decimal", "heapq", "bisect", "string", "operator")
_RUNNER = r"""
import builtins, sys
ALLOWED = set(sys.argv[1].split(","))
_import = builtins.__import__
def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
  if level != 0 or name.split(".")[0] not in ALLOWED:
    raise ImportError(f"import of {name!r} is not allowed; allowed: {sorted(ALLOWED)}")
  return _import(name, globals, locals, fromlist, level)
safe = {k: getattr(builtins, k) for k in dir(builtins)
        if k not in ("open", "exec", "eval", "compile", "input", "breakpoint", "help",
                     "exit", "quit", "__import__", "memoryview", "globals", "locals", "vars")}
safe["__import__"] = guarded_import
code = sys.stdin.read()
exec(compile(code, "<tool>", "exec"), {"__builtins__": safe, "__name__": "__main__"})
"""


CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NETWORK_MODES = ("isolated", "unisolated")


def _enter_empty_network_namespace() -> None:
  """unshare(2) into a new network namespace (no interfaces up); raises OSError."""
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.unshare(CLONE_NEWNET) == 0:  # root (CAP_SYS_ADMIN)
    return
  if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # unprivileged user namespaces
    return
  errno = ctypes.get_errno()
  raise OSError(errno, f"unshare(CLONE_NEWNET) failed: {os.strerror(errno)}")


_ISOLATION: dict[str, Optional[str]] = {}


def network_isolation_error() -> Optional[str]:
  """None when a child process can enter an empty network namespace here, else why
  not (probed once per process with a trivial child)."""
  if "error" not in _ISOLATION:
    try:
      subprocess.run([sys.executable, "-I", "-c", "pass"], check=True, env={},
                     preexec_fn=_enter_empty_network_namespace, capture_output=True,
                     timeout=30)
      _ISOLATION["error"] = None
    except (OSError, subprocess.SubprocessError) as e:
      _ISOLATION["error"] = f"{type(e).__name__}: {e}"
  return _ISOLATION["error"]


def _limit_child(cpu_s: int, memory_bytes: int, isolate_network: bool) -> Callable[[], None]:
  def apply():
    import resource
    if isolate_network:
      _enter_empty_network_namespace()
    # SIGXCPU at the soft limit (reported as such); SIGKILL one second later.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
      resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    except (ValueError, OSError):
      pass
  return apply


class PythonTool:
  """Runs a Python snippet in a limited child process (see the module docstring)."""
  name = "python"

  def __init__(self, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               max_output_chars: int = 2000, allowed_imports: Sequence[str] = ALLOWED_IMPORTS,
               network: str = "isolated"):
    if timeout_s <= 0 or cpu_s < 1 or memory_mb < 16:
      raise ValueError(f"PythonTool needs timeout_s > 0, cpu_s >= 1 and memory_mb >= 16; got "
                       f"{timeout_s}, {cpu_s}, {memory_mb}")
    if network not in NETWORK_MODES:
      raise ValueError(f"PythonTool(network={network!r}): choose one of {NETWORK_MODES}")
    if network == "isolated" and network_isolation_error() is not None:
      raise RuntimeError(
          "PythonTool cannot cut the child off the network on this machine "
          f"({network_isolation_error()}); run on Linux with root or user namespaces "
          "enabled (sysctl kernel.unprivileged_userns_clone=1), or pass "
          "network='unisolated' to run snippets with the network reachable")
    self.isolate_network = network == "isolated"
    self.timeout_s, self.cpu_s, self.memory_mb = float(timeout_s), int(cpu_s), int(memory_mb)
    self.max_output_chars = int(max_output_chars)
    self.allowed_imports = tuple(allowed_imports)

  def __call__(self, code: str) -> str:
    if not isinstance(code, str):
      raise ValueError("code must be a string")  # noqa: TRY004
    with tempfile.TemporaryDirectory(prefix="jaxrl_tool_") as cwd:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-c", _RUNNER, ",".join(self.allowed_imports)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
          env={}, start_new_session=True,
          preexec_fn=_limit_child(self.cpu_s, self.memory_mb << 20, self.isolate_network))
      try:
        out, err = proc.communicate(code.encode(), timeout=self.timeout_s)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise TimeLimitExceeded(f"python took longer than {self.timeout_s:g} s") from None
    out_text = out.decode(errors="replace")
    if proc.returncode != 0:
      lines = err.decode(errors="replace").strip().splitlines()
      reason = lines[-1] if lines else f"killed by signal {-proc.returncode}"
      if proc.returncode < 0 and not lines:
        reason = {9: "killed (CPU or memory limit)", 24: "CPU time limit",
                  25: "file writes are not allowed"}.get(-proc.returncode, reason)
      raise RuntimeError(reason)
    return out_text[:self.max_output_chars]


# ---------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


class Retriever:
  """BM25 over a list of documents; `__call__(query, k=...) -> str` (top-k, ranked).

  score(q, d) = Σ_{w∈q} idf(w) · f(w,d)·(k1+1) / (f(w,d) + k1·(1 − b + b·|d|/avgdl)),
  idf(w) = ln(1 + (N − n(w) + 0.5) / (n(w) + 0.5)).
  """
  name = "search"

  def __init__(self, documents: Sequence[str], *, k1: float = 1.5, b: float = 0.75,
               top_k: int = 3):
    if not documents:
      raise ValueError("Retriever needs at least one document")
    self.documents = list(documents)
    self.k1, self.b, self.top_k = float(k1), float(b), int(top_k)
    self._tf = [collections.Counter(_words(d)) for d in self.documents]
    self._len = [sum(tf.values()) for tf in self._tf]
    self._avg = max(sum(self._len) / len(self._len), 1e-9)
    df = collections.Counter(w for tf in self._tf for w in tf)
    n = len(self.documents)
    self._idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

  def scores(self, query: str) -> list[float]:
    out = []
    for tf, dl in zip(self._tf, self._len, strict=True):
      s = 0.0
      for w in _words(query):
        f = tf.get(w, 0)
        if f:
          s += self._idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * dl
                                                                  / self._avg))
      out.append(s)
    return out

  def search(self, query: str, k: Optional[int] = None) -> list[int]:
    """Indices of the top-k documents with a positive score, best first."""
    s = self.scores(query)
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return [i for i in order[:k or self.top_k] if s[i] > 0]

  def __call__(self, query: str, k: Optional[int] = None) -> str:
    hits = self.search(query, k)
    if not hits:
      return "no results"
    return "\n".join(f"[{rank + 1}] {self.documents[i]}" for rank, i in enumerate(hits))


# ---------------------------------------------------------------------------
# A host environment over tools.
# ---------------------------------------------------------------------------
class ToolEnv:
  """A `HostEnv`: each model turn's tool calls are run and their results are the
  observation; a turn without a tool call is the final answer.

  tools: {name: callable(**arguments) -> str}. score(example, final text) ->
  float is the final reward (0 if None). A malformed call, an unknown tool,
  bad arguments, an exception or a time-out in a tool become "error: ..."
  lines of the observation; `info` counts tool_calls and tool_errors.
  """

  def __init__(self, tools: Mapping[str, Callable[..., str]], *,
               score: Optional[Callable[[Mapping, str], float]] = None, timeout_s: float = 5.0,
               max_calls_per_turn: int = 4):
    self.tools = dict(tools)
    self.score = score
    self.timeout_s = float(timeout_s)
    self.max_calls_per_turn = int(max_calls_per_turn)
    self.example: Mapping = {}

  def reset(self, example: Mapping[str, Any]) -> str:
    self.example = example
    return ""

  def run_call(self, call) -> tuple[str, bool]:
    """(text, is_error) of one parsed call."""
    if isinstance(call, ToolCallError):
      return f"error: {call.message}", True
    if call.name not in self.tools:
      return f"error: unknown tool {call.name!r}; tools: {sorted(self.tools)}", True
    try:
      return str(call_with_time_limit(lambda: self.tools[call.name](**call.arguments),
                                      timeout_s=self.timeout_s)), False
    except TimeLimitExceeded:
      return f"error: {call.name} took longer than {self.timeout_s:g} s", True
    except TypeError as e:
      return f"error: bad arguments for {call.name}: {e}", True
    except Exception as e:  # noqa: BLE001 - a tool failure is an observation
      return f"error: {call.name}: {e}", True

  def step(self, assistant_text: str) -> StepResult:
    calls = parse_tool_calls(assistant_text)
    if not calls:
      reward = float(self.score(self.example, assistant_text)) if self.score else 0.0
      return StepResult("", reward, True, {"tool_calls": 0.0, "tool_errors": 0.0})
    lines, errors = [], 0
    for call in calls[:self.max_calls_per_turn]:
      text, is_error = self.run_call(call)
      errors += is_error
      lines.append(text)
    if len(calls) > self.max_calls_per_turn:
      lines.append(f"error: at most {self.max_calls_per_turn} tool calls per turn")
      errors += 1
    return StepResult("\n".join(lines), 0.0, False,
                      {"tool_calls": float(len(calls)), "tool_errors": float(errors)})


# ---------------------------------------------------------------------------
# From a config: rl.multiturn.env = "tool".
# ---------------------------------------------------------------------------
TOOL_NAMES = ("calculator", "python", "retrieval")


def read_corpus(path: str) -> list[str]:
  """The documents of a local corpus file: the "text" field of each line of a .jsonl
  file, else each non-empty line."""
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  if str(path).endswith(".jsonl"):
    docs = []
    for i, line in enumerate(lines):
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{path}:{i + 1}: each line of a .jsonl corpus must be an object "
                         'with a "text" string')
      docs.append(row["text"])
    return docs
  return lines


def build_tools(names, *, corpus: Optional[str] = None, python_network: str = "isolated",
                tool_timeout_s: float = 5.0, top_k: int = 3) -> dict[str, Callable[..., str]]:
  """{name: tool} for tool names of `TOOL_NAMES` (a sequence or "a,b"); the model calls
  each by that name: calculator(expression), python(code), retrieval(query)."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  names = tuple(names)
  unknown = [n for n in names if n not in TOOL_NAMES]
  if not names or unknown:
    raise ValueError(f"rl.multiturn.env_options tools={names!r}: name one or more of "
                     f"{TOOL_NAMES}")
  tools: dict[str, Callable[..., str]] = {}
  for name in names:
    if name == "calculator":
      tools[name] = Calculator()
    elif name == "python":
      tools[name] = PythonTool(timeout_s=tool_timeout_s, network=python_network)
    else:
      if not corpus:
        raise ValueError("tool 'retrieval' needs a local corpus: set rl.multiturn.env_options "
                         "corpus='/path/to/docs.txt' (one document per line, or .jsonl with "
                         "a \"text\" field)")
      tools[name] = Retriever(read_corpus(corpus), top_k=top_k)
  return tools


def make_tool_env(tokenizer, examples: Sequence[Mapping], *, tools=("calculator",),
                  corpus: Optional[str] = None, obs_len: int = 64, timeout_s: float = 10.0,
                  tool_timeout_s: float = 5.0, template: str = "plain",
                  max_calls_per_turn: int = 4, done_on_error: bool = False,
                  error_reward: float = 0.0, python_network: str = "isolated", top_k: int = 3):
  """A `HostEnvAdapter` running one `ToolEnv` per trajectory (rl.multiturn.env="tool").

  The tools are built once and shared by every row's ToolEnv (they keep no
  per-trajectory state). A turn without a tool call ends the trajectory (its
  reward then comes from reward.components on the final turn); tool_calls and
  tool_errors are counted per row with the adapter's env_errors, env_timeouts
  and obs_truncated. timeout_s bounds each environment call (all of a turn's
  tool calls), tool_timeout_s each tool call.
  """
  from jaxrl_llm.envs.base import HostEnvAdapter
  built = build_tools(tools, corpus=corpus, python_network=python_network,
                      tool_timeout_s=tool_timeout_s, top_k=top_k)
  return HostEnvAdapter(
      lambda: ToolEnv(built, timeout_s=tool_timeout_s, max_calls_per_turn=max_calls_per_turn),
      tokenizer, examples, obs_len=obs_len, timeout_s=timeout_s, template=template,
      done_on_error=done_on_error, error_reward=error_reward,
      info_keys=("tool_calls", "tool_errors"))
