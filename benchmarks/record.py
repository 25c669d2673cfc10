"""Records and tables of the benchmarks, free of JAX (the PyTorch peers use it too).

Importing JAX in a PyTorch process would initialise its GPU backend and take
most of the device memory, so nothing here imports it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from typing import Any, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summarize(times: Sequence[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "repeats": len(times), "all_s": [round(t, 6) for t in times]}


def commit() -> str:
  env = os.environ.get("JAXRL_COMMIT")
  if env:
    return env
  head = os.path.join(REPO, ".git", "HEAD")
  try:
    with open(head) as f:
      ref = f.read().strip()
    if ref.startswith("ref: "):
      with open(os.path.join(REPO, ".git", ref[5:])) as f:
        return f.read().strip()
    return ref
  except OSError:
    return "unknown"


def out_dir(args) -> str:
  path = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
  os.makedirs(path, exist_ok=True)
  return path


def portable_argv(args) -> list[str]:
  """sys.argv with the script relative to the repo and the output folder as <out>/name."""
  out = os.path.abspath(out_dir(args))
  argv = []
  for a in sys.argv:
    full = os.path.abspath(a) if os.sep in a else a
    if full == out:
      a = "<out>/" + os.path.basename(out)
    elif full.startswith(REPO + os.sep):
      a = os.path.relpath(full, REPO)
    argv.append(a)
  return argv


def write_json(args, name: str, record: dict) -> str:
  """Adds date, commit, argv and smoke flag to `record`; writes OUT/name[_tag].json."""
  full = {"workload": name,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit(), "python": platform.python_version(),
          "smoke": bool(getattr(args, "smoke", False)), "argv": portable_argv(args)}
  full.update(record)
  suffix = f"_{args.tag}" if getattr(args, "tag", "") else ""
  path = os.path.join(out_dir(args), f"{name}{suffix}.json")
  with open(path, "w") as f:
    json.dump(full, f, indent=1, default=_json_default)
  print(f"record: {path}")
  return path


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]):
  """A short fixed-width table (printed last by every script)."""
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[fmt(v) for v in r] for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
            for i, h in enumerate(header)]
  print(f"\n== {title}")
  print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
  for r in cells:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  sys.stdout.flush()
