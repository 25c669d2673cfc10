"""Device kernels from a `jax.profiler.trace` Perfetto file."""

from __future__ import annotations

import glob
import gzip
import json
import os

# Without a device stream (CPU), the compiled ops run on these host threads.
_CPU_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")


def device_kernels(trace_dir: str) -> list[tuple[str, str, float]]:
  """(kernel name, its HLO instruction or '', µs) for each kernel on the device streams
  of the newest Perfetto trace under `trace_dir` (on CPU: XLA's host threads)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    events = json.load(f)["traceEvents"]
  names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "/device:" in name}
  cpu_threads = {(e["pid"], e.get("tid")) for e in events
                 if e.get("ph") == "M" and e.get("name") == "thread_name"
                 and str(e.get("args", {}).get("name", "")).startswith(_CPU_THREADS)}
  if not device_pids and not cpu_threads:
    raise ValueError(f"no device stream in the trace; processes: {sorted(names.values())}")
  out = []
  for e in events:
    if e.get("ph") != "X":
      continue
    on_device = e.get("pid") in device_pids
    on_cpu = not device_pids and (e["pid"], e.get("tid")) in cpu_threads
    if on_device or on_cpu:
      out.append((e["name"], str(e.get("args", {}).get("hlo_op", "")), float(e.get("dur", 0.0))))
  return out
