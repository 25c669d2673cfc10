"""Length-bucketed micro-batches: train on the completion columns rows use.

A ragged rollout fills few of its [B, L] completion slots (W5: 24 %), yet a
forward / backward over the padded batch costs as if every row ran to the
budget L. Here the rows are ordered by length before they are cut into
micro-batches, and each micro-batch is cut to the smallest static width

  W_k  in  widths = {min(L, round_up(⌈L / 2^k⌉, 64)) : k = 0 … n − 1}

that holds its longest completion (`lax.switch` over n compiled branches,
one per width). Columns beyond a row's last completion token carry mask 0
and attend to nothing the kept columns need (attention is causal), so the
loss sums, gradients and log-probs are the unbucketed ones: only float
summation order differs (tests/length_buckets_test.py checks both the
update and the log-probs against the full width).

Cost model: a micro-batch costs about (P + W_k) / (P + L) of the full one,
with P the prompt width; reordering rows costs one gather.

Shape letters: B rows, L completion budget, K rows of a minibatch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

ALIGN = 64  # widths are multiples of this (unless the budget itself is smaller)


def bucket_widths(max_len: int, num_buckets: int) -> tuple[int, ...]:
  """The static completion widths, ascending; a single width means no bucketing.

  >>> bucket_widths(1024, 4)
  (128, 256, 512, 1024)
  """
  if num_buckets < 1:
    raise ValueError(f"num_buckets={num_buckets} must be >= 1 (1 turns bucketing off)")
  widths = set()
  for k in range(num_buckets):
    w = -(-max_len // 2 ** k)
    widths.add(min(max_len, -(-w // ALIGN) * ALIGN))
  return tuple(sorted(widths))


def completion_lengths(completion_mask_BL: jax.Array) -> jax.Array:
  """Index after each row's last completion token (0 for an empty row), int32 [B]."""
  L = completion_mask_BL.shape[1]
  pos_BL = jnp.arange(1, L + 1, dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(completion_mask_BL > 0, pos_BL, 0), axis=1)


def sort_by_length(idx_UK: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Each minibatch's row indices [U, K] reordered by completion length (ascending):
  consecutive micro-batches then hold rows of similar lengths. The minibatch's
  rows are the same, so its exact gradient is too."""
  order_UK = jnp.argsort(lengths_B[idx_UK], axis=1, stable=True)
  return jnp.take_along_axis(idx_UK, order_UK, axis=1)


def completion_keys(rows: Mapping[str, jax.Array], max_len: int) -> tuple[str, ...]:
  """The [B, L, ...] per-token arrays of `rows` (everything but the prompt)."""
  return tuple(k for k, v in rows.items()
               if not k.startswith("prompt") and v.ndim >= 2 and v.shape[1] == max_len)


def _switch(fn: Callable, widths: tuple[int, ...], max_len: int, finish: Callable) -> Callable:
  def run(params, rows):
    keys = completion_keys(rows, max_len)
    need_width = jnp.max(completion_lengths(rows["completion_mask"]))
    branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), need_width, side="left")

    def at_width(w, p, r):
      cut = {k: (v[:, :w] if k in keys else v) for k, v in r.items()}
      return finish(fn(p, cut), w)

    branches = [lambda p, r, w=w: at_width(w, p, r) for w in widths]
    return jax.lax.switch(jnp.minimum(branch, len(widths) - 1), branches, params, rows)

  return fn if len(widths) == 1 else run


def bucketed(fn: Callable, widths: tuple[int, ...], max_len: int) -> Callable:
  """`fn(params, rows)` run on rows cut to the smallest width holding every completion.

  For outputs that do not depend on the width (scalars, sums, gradients); per-token
  outputs go through `bucketed_per_token`.
  """
  return _switch(fn, widths, max_len, lambda out, w: out)


def bucketed_per_token(fn: Callable, widths: tuple[int, ...], max_len: int) -> Callable:
  """Like `bucketed` for `fn(params, rows) -> pytree of [B, W, ...]` per-token arrays,
  zero-padded back to [B, L, ...] (the cut columns hold no completion token)."""
  def pad(x, w):
    return jnp.pad(x, [(0, 0), (0, max_len - w)] + [(0, 0)] * (x.ndim - 2))

  return _switch(fn, widths, max_len, lambda out, w: jax.tree.map(lambda x: pad(x, w), out))
