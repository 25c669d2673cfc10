"""Test setup: 8 fake CPU devices, float32 matmuls, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives
in conftest.py (pytest imports it first).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them dominates, so the CPU backend compiles
# without LLVM's expensive optimisations (a third less time, measured on single tests)
# and emits fusions through XLA's older elemental emitter rather than its MLIR fusion
# emitters (45 % less CPU time on two of the slowest tests, cold; a test bound by its
# programs' run time took 10 % longer). Subprocesses started by the tests inherit these
# flags unless they set their own.
# XLA aborts the process on a flag it does not know, and jax is not pinned, so the first
# process of a run starts jax once with these flags and keeps only those this XLA takes
# (the processes it starts inherit the result).
_SPEED_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                "--xla_cpu_use_fusion_emitters=false")


def _xla_takes(flags: str) -> bool:
  import subprocess
  import sys
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                         capture_output=True, timeout=300)
  return probe.returncode == 0


if not os.environ.get("JAXRL_TESTS_XLA_FLAGS_CHECKED"):
  _new = [f for f in _SPEED_FLAGS if f.split("=")[0] not in _flags]
  if _new and not _xla_takes(" ".join([_flags, *_new])):
    _kept = [f for f in _new if _xla_takes(f"{_flags} {f}")]
    print(f"tests/conftest.py: this XLA does not take {sorted(set(_new) - set(_kept))}; "
          "running without them")
    _new = _kept
  _flags = " ".join([_flags, *_new])
  os.environ["JAXRL_TESTS_XLA_FLAGS_CHECKED"] = "1"
os.environ["XLA_FLAGS"] = _flags.strip()
# Programs compiled by one test (or test process) are reused by the others: a persistent
# compilation cache shared by the xdist workers and subprocesses of this run and kept for
# the next run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import pathlib
  import tempfile
  _cache_dir = pathlib.Path(tempfile.gettempdir()) / "jaxrl_llm_tests_xla_cache"
  # jax writes an entry's "-cache" file, then its "-atime" file: an entry without the
  # latter was cut short by a killed process (or predates the size limit below) and must
  # never be read (deserialising one crashed a worker). The first process of a run
  # (pytest itself; workers and subprocesses inherit the variable) removes them.
  for _entry in _cache_dir.glob("*-cache"):
    if not _entry.with_name(_entry.name[:-len("-cache")] + "-atime").exists():
      _entry.unlink(missing_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache_dir)
# Also for a cache directory given from outside: a size limit makes jax guard the cache's
# reads and writes with a file lock (without one, a worker can read an entry another is
# still writing and abort in deserialising). With that limit every write also lists and
# reads every entry (jax's least-recently-used eviction), so a write costs time in
# proportion to the entries: 0.46 s each at the 7,920 entries of a full run, most of them
# single eager operations compiled in under 0.05 s. Only compiles of 0.05 s or more are
# cached: an eighth of the entries, holding over half of the compile time (measured on
# lora_test.py and shared_prefix_test.py).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
