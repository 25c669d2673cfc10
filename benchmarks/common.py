"""Shared pieces of the GPU benchmarks: model shapes, timing, memory, records.

Every workload script (w1_grpo_step.py ... w4_dpo_step.py) times with the
same rules (see the project's BENCHMARKS.md):

  * the first call(s) compile and warm up and are never timed;
  * each timed call ends with `jax.block_until_ready` before the clock is read;
  * many repeats, the median is reported (min and max are kept in the record);
  * inputs are random (never all-zero or all-equal).

Peak device memory comes from `jax.devices()[0].memory_stats()`
("peak_bytes_in_use"); it is a high-water mark for the whole process, so each
workload runs in its own process (`run_ours.sh`).

A record is one JSON file: device, jax version, commit, config, medians.
The commit comes from $JAXRL_COMMIT (the GPU copy of the tree may have no
.git), else from .git/HEAD read as a file; never from a git command.

Run as modules from the repository root, e.g.
  python -m benchmarks.w2_train_step --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from benchmarks.record import REPO, commit, out_dir, print_table, summarize, write_json  # noqa: F401
from jaxrl_llm.models.config import ModelConfig

# ---------------------------------------------------------------------------
# Model shapes (random initialisation; no weights are needed to measure speed).
# ---------------------------------------------------------------------------
# Qwen2.5 architectures: qkv bias, tied embeddings, rope theta 1e6, eps 1e-6.
QWEN25 = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                 num_kv_heads=2, intermediate_size=4864),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12,
                 num_kv_heads=2, intermediate_size=8960),
    # CPU smoke shape: same structure (GQA, bias, tied), tiny sizes.
    "smoke": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, intermediate_size=128),
}


def qwen25_config(size: str, *, dtype: str = "bfloat16", param_dtype: str = "float32",
                  remat: str = "none", attention_impl: str = "auto",
                  max_position_embeddings: int = 32768) -> ModelConfig:
  """A Qwen2.5 architecture as a `ModelConfig` (built by hand, no download)."""
  return ModelConfig(family="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
                     rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
                     dtype=dtype, param_dtype=param_dtype, remat=remat,
                     attention_impl=attention_impl, **QWEN25[size])


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls per token: all but norms and biases.

  The tied embedding counts once, as the unembedding matmul (the lookup does
  no arithmetic). This is the N of the 6·N·tokens training-FLOP count.
  """
  d, h, f = cfg.hidden_size, cfg.resolved_head_dim, cfg.intermediate_size
  n, k = cfg.num_heads, cfg.num_kv_heads
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def attention_flops_fwd(cfg: ModelConfig, batch: int, seq: int) -> float:
  """Forward FLOPs of causal self-attention (QKᵀ and PV), the useful half only."""
  qk_pv = 2 * 2 * seq * seq * cfg.num_heads * cfg.resolved_head_dim  # full square
  return 0.5 * qk_pv * cfg.num_layers * batch


def pallas_decode_matmul() -> str:
  """`ModelConfig.decode_matmul` for the Pallas kernel on this backend: the
  compiled kernel on GPU, the Pallas interpreter elsewhere (--smoke)."""
  return "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"


def param_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
  return cfg.num_params() * dtype_bytes


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
  """Bytes of K and V of one token over all layers."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * dtype_bytes


# ---------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------
def block(tree):
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
               max_seconds: Optional[float] = None) -> list[float]:
  """Seconds of each timed call of `fn` (blocked on its outputs).

  `warmup` calls run first, untimed (compilation, autotuning, allocation).
  With `max_seconds`, stops early once the timed calls have used that much
  wall time (at least 2 timed calls are made whenever repeats >= 2).
  """
  for _ in range(warmup):
    block(fn())
  times = []
  start_all = time.perf_counter()
  for i in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
    if (max_seconds is not None and i >= 1
        and time.perf_counter() - start_all > max_seconds):
      break
  return times


def memory_stats() -> dict:
  """Device memory high-water mark and limit in bytes ({} where not reported)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU backends may not implement it
    stats = {}
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keep if k in stats}


def peak_gib() -> Optional[float]:
  peak = memory_stats().get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


# ---------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------
def device_info() -> dict:
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": getattr(dev, "device_kind", "?"),
          "device_count": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version()}
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except Exception:
    pass
  return info


def write_record(args, name: str, config: dict, results: Any) -> str:
  return write_json(args, name, {"device": device_info(), "config": config,
                                 "results": results, "memory": memory_stats()})


def load_floors(args) -> dict:
  """The measured ceilings written by floors.py ({} if not measured yet)."""
  path = os.path.join(out_dir(args), "floors.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get("results", {})


def base_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (correctness only)")
  p.add_argument("--out", default="", help="record folder (default: benchmarks/results)")
  p.add_argument("--tag", default="", help="suffix of the record's file name")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  return p


def random_tokens(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
  """Uniform random token ids in [3, vocab) (0..2 left for pad/bos/eos)."""
  return rng.integers(3, vocab, size=shape, dtype=np.int32)
