"""W5's forced completion lengths for the peer runs (`--ragged` of trl_grpo / tunix_grpo).

The lengths are W5's own draw, `w5_ragged_grpo_step.ragged_lengths` (fixed
log-normal, median 150 — 6 under `--smoke` — seed 0), one per completion.
Completion index i maps to prompt i // G, sample i % G: prompt-major, the G
samples of a prompt contiguous, the row order of W5's batch and the row order
in which both peers' GRPO trainers generate (each script checks it).

Completion i is n_i tokens, its last one EOS: EOS is excluded at steps
t < n_i − 1 and is the only choice at t = n_i − 1. Rows with n_i above the
budget never sample EOS and stop at the budget. Useful tokens = Σ min(n_i,
budget), EOS counted, the figure W5 reports.

Importing the W5 module imports JAX (through jaxrl_llm) without starting a
backend; a PyTorch process sets JAX_PLATFORMS=cpu first all the same, so that
nothing can take GPU memory from PyTorch.
"""

from __future__ import annotations

import numpy as np

EOS_ID = 2  # the peers' word tokenizers: ids 0..3 are pad, bos, eos, unk (W5 uses 2 too)
BUDGET = 1024
SMOKE_BUDGET = 32  # W5's --smoke budget
MEDIAN, SMOKE_MEDIAN = 150.0, 6.0


def budget(arg: int | None, smoke: bool) -> int:
  """The `--budget` flag: W5's budget (1024; 32 under --smoke) unless given."""
  if arg is None:
    return SMOKE_BUDGET if smoke else BUDGET
  if arg < 1:
    raise ValueError(f"--budget must be >= 1 new token, got {arg}")
  return arg


def forced_lengths(num: int, budget_tokens: int, smoke: bool) -> np.ndarray:
  """[num] int32: completion i's forced length n_i (>= 1; may exceed the budget)."""
  from benchmarks.w5_ragged_grpo_step import ragged_lengths

  return ragged_lengths(num, budget_tokens, median=SMOKE_MEDIAN if smoke else MEDIAN)


def describe(budget_tokens: int, smoke: bool) -> str:
  median = SMOKE_MEDIAN if smoke else MEDIAN
  return (f"W5's: log-normal median {median:g}, sigma ln({budget_tokens}/{median:g})/1.645, "
          "seed 0, clipped below at 1; completion i = prompt i // G, sample i % G")


def length_stats(forced: np.ndarray, budget_tokens: int) -> dict:
  """The `lengths` block of W5's record, plus the useful-token count."""
  lengths = np.minimum(forced, budget_tokens)
  return {"median": float(np.median(lengths)), "mean": float(lengths.mean()),
          "truncated_frac": float(np.mean(forced > budget_tokens)),
          "max": int(lengths.max()), "useful_tokens": int(lengths.sum())}


def check_lengths(got, want, what: str) -> None:
  """Raises if the generated lengths differ from the forced ones (row by row)."""
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape or not np.array_equal(got, want):
    if got.shape != want.shape:
      raise AssertionError(f"{what}: {got.shape} rows, {want.shape} forced lengths")
    bad = np.flatnonzero(got != want)[:8]
    raise AssertionError(
        f"{what}: forced lengths not met: rows {bad.tolist()} got {got[bad].tolist()}, "
        f"want {want[bad].tolist()}")
