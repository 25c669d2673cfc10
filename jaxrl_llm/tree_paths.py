"""Nested parameter dicts <-> flat ``{"a/b/c": leaf}`` dicts.

The model, LoRA and the Hugging Face converter all name a leaf by its
slash-joined path (``"layers/q_proj"``); these two functions are the only
place that translates between the two layouts.
"""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (every non-mapping value is a leaf)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``; the inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
