"""Name -> function tables of the RL step (advantage estimators, policy losses).

`add` and `remove` hold the checks both tables share; the tables themselves
stay plain dicts in their modules (`advantages.OUTCOME_ESTIMATORS`,
`policy_losses.POLICY_LOSSES`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def add(table: dict[str, Callable], kind: str, name: str, fn: Callable, *, overwrite: bool,
        num_positional: int, keywords: tuple[str, ...], call: str) -> Callable:
  """table[name] = fn after checking the name, duplicates and fn's signature.

  `fn` must accept `num_positional` positional arguments and `keywords` (the
  dispatcher's call, spelled `call` in the error). Returns fn.
  """
  if not isinstance(name, str) or not name or name != name.strip():
    raise ValueError(f"A {kind} name must be a non-empty string without surrounding "
                     f"whitespace, got {name!r}.")
  if name in table and not overwrite:
    raise ValueError(f"A {kind} named {name!r} is already registered; pass overwrite=True "
                     f"to replace it.")
  if not callable(fn):
    raise ValueError(f"The {kind} {name!r} must be callable, got {fn!r}.")
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):  # no signature to read (some C callables)
    sig = None
  if sig is not None:
    try:
      sig.bind_partial(*([None] * num_positional), **dict.fromkeys(keywords))
    except TypeError as e:
      raise ValueError(f"{kind} {name!r}: {fn!r} cannot be called as {call} ({e}).") from None
  table[name] = fn
  return fn


def remove(table: dict[str, Callable], builtins: frozenset[str], kind: str, name: str) -> None:
  """del table[name]; built-in names cannot be removed."""
  if name in builtins:
    raise ValueError(f"{name!r} is a built-in {kind} and cannot be unregistered (register "
                     f"another function with overwrite=True to replace it).")
  if name not in table:
    raise ValueError(f"No {kind} named {name!r} is registered.")
  del table[name]


def keyword_parameters(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
  """(parameter names fn takes by keyword, whether it takes **kwargs).

  An unreadable signature (some C callables) accepts anything.
  """
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return frozenset(), True
  named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                        p.KEYWORD_ONLY))
  return named, any(p.kind is p.VAR_KEYWORD for p in params)
