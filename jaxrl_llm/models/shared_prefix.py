"""Cascade attention over a shared prompt: one copy of a group's prompt K/V.

With `group_size` G, the G samples of a prompt share its K/V. The contiguous
cache (`decoder.init_cache`) stores it G times and every decode step reads it
G times. This cache keeps two parts per layer:

  prefix   k, v [R, P, K, H]   the R prompts' K/V, once per group, packed to
                               the front of the slot axis (prompt r fills
                               slots [0, len_r))
  suffix   k, v [b, L, K, H]   each decode row's completion K/V; all rows
                               write slot `index` at the same step

and a decode step attends in two passes merged by their log-sum-exps
(cascade attention; the softmax over the union of both key sets):

  o_pre, lse_pre = attend(q of the G rows of each group stacked as G queries
                          [R, G, N, H], prefix [R, P])       reads R·P slots
  o_suf, lse_suf = attend(q [b, 1, N, H], suffix [b, L])     reads b·(index+1)
  o = (o_pre·e^(lse_pre − m) + o_suf·e^(lse_suf − m)) / (e^(lse_pre − m) + e^(lse_suf − m)),
      m = max(lse_pre, lse_suf)

Both passes are `jax.nn.dot_product_attention` with key lengths and no mask
(cuDNN's fused kernel on GPU skips the slots past a row's length), so the
prompt's K/V is read once per group per step instead of G times. Rotary
positions are explicit, so moving the prompt to the front of its slots
changes nothing.

Timed on an H100 (BENCHMARKS.md, 2026-12-07): at W3's batch 512 as 64
prompts × 8 the decode step was 9.8 % slower with it (4.37 against 3.98 ms),
though it reads 1.4 GB less K/V per step, so `rl.rollout_shared_prefix_attention`
is off by default.

Rows stay in their output order or a compacted subset of it (`take_rows`):
the caller passes `row_b`, each decode row's output row. Output row i is
sample i mod G of prompt i // G (the `jnp.repeat` order), so its query goes
to slot (i // G, i mod G) of the prefix pass. Slots of finished rows stay empty.
Until the first compaction every row is present and in order
(`rows_in_order`), and those slots are a reshape: no scatter, no gather.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["prefix_k", "prefix_v", "prefix_len_R", "k", "v", "index"],
                   meta_fields=["group_size", "rows_in_order"])
@dataclasses.dataclass(frozen=True)
class SharedPrefixCache:
  prefix_k: tuple        # per layer [R, P, K, H]
  prefix_v: tuple
  prefix_len_R: jax.Array  # int32 [R]: prompt tokens of each group (slots [0, len))
  k: tuple               # per layer [b, L, K, H]: the decode rows' completions
  v: tuple
  index: jax.Array       # int32 scalar: the next completion slot
  group_size: int        # G (static)
  # (static) the decode rows are every output row, in order (before any
  # compaction), so the queries reshape into group slots with no scatter
  rows_in_order: bool = True


def from_prompt_cache(cache_RP: dict, prompt_len_R: jax.Array, group_size: int,
                      max_new_tokens: int) -> SharedPrefixCache:
  """The cache of R left-padded prompts (`decoder.forward_with_cache` over
  `decoder.init_cache(cfg, R, P)`) as a shared prefix for R·G decode rows,
  with `max_new_tokens` empty completion slots per row."""
  k0 = cache_RP["k"][0]
  R, P = k0.shape[:2]
  pad_R = P - prompt_len_R
  # Row r's prompt sits at slots [pad_r, P): move it to [0, len_r).
  src_RP = jnp.minimum(jnp.arange(P)[None, :] + pad_R[:, None], P - 1)
  pack = lambda x: jnp.take_along_axis(x, src_RP[:, :, None, None], axis=1)
  B = R * int(group_size)
  empty = lambda x: jnp.zeros((B, max_new_tokens) + x.shape[2:], x.dtype)
  return SharedPrefixCache(
      prefix_k=tuple(map(pack, cache_RP["k"])), prefix_v=tuple(map(pack, cache_RP["v"])),
      prefix_len_R=prompt_len_R.astype(jnp.int32),
      k=tuple(map(empty, cache_RP["k"])), v=tuple(map(empty, cache_RP["v"])),
      index=jnp.zeros((), jnp.int32),
      group_size=int(group_size))


def take_rows(cache: SharedPrefixCache, rows_b: jax.Array) -> SharedPrefixCache:
  """The decode rows `rows_b` (compaction): their completion K/V; the prefix is
  shared and stays whole."""
  take = lambda x: jnp.take(x, rows_b, axis=0)
  return dataclasses.replace(cache, k=tuple(map(take, cache.k)), v=tuple(map(take, cache.v)),
                             rows_in_order=False)


def merge(o_a: jax.Array, lse_a: jax.Array, o_b: jax.Array, lse_b: jax.Array) -> jax.Array:
  """Softmax attention over the union of two key sets from each set's output
  o [..., N, H] and log-sum-exp lse [..., N]: the lse-weighted mean."""
  m = jnp.maximum(lse_a, lse_b)
  w_a = jnp.exp(lse_a - m)[..., None]
  w_b = jnp.exp(lse_b - m)[..., None]
  o = (o_a.astype(jnp.float32) * w_a + o_b.astype(jnp.float32) * w_b) / (w_a + w_b)
  return o.astype(o_a.dtype)


def cascade_attention(cfg: ModelConfig, q_b1NH, prefix_k, prefix_v, prefix_len_R,
                      k_bLKH, v_bLKH, filled, row_b, group_size: int,
                      rows_in_order: bool = False):
  """One decode token's attention to its group's prompt and its own completion
  (the first `filled` completion slots); see the module docstring.
  `rows_in_order` (static): row_b is arange(R·G), so the group slots are a reshape."""
  b, _, N, H = q_b1NH.shape
  R = prefix_k.shape[0]
  G = group_size
  q_slots = (q_b1NH if rows_in_order else
             jnp.zeros((R * G, N, H), q_b1NH.dtype).at[row_b].set(q_b1NH[:, 0]))
  o_pre, lse_pre = decoder.attention(cfg, q_slots.reshape(R, G, N, H), prefix_k, prefix_v,
                                     kv_len_B=prefix_len_R, return_residual=True)
  if rows_in_order:
    o_pre_b, lse_pre_b = o_pre.reshape(b, 1, N, H), lse_pre.reshape(b, 1, N)
  else:
    o_pre_b = o_pre.reshape(R * G, N, H)[row_b][:, None]
    lse_pre_b = lse_pre.reshape(R * G, N)[row_b][:, None]
  o_suf, lse_suf = decoder.attention(cfg, q_b1NH, k_bLKH, v_bLKH,
                                     kv_len_B=jnp.full((b,), filled, jnp.int32),
                                     return_residual=True)
  return merge(o_pre_b, lse_pre_b, o_suf, lse_suf)


def forward(cfg: ModelConfig, params, tokens_b1: jax.Array, positions_b1: jax.Array,
            row_b: jax.Array, cache: SharedPrefixCache) -> tuple[jax.Array, SharedPrefixCache]:
  """One decode step of b rows (`row_b`: each one's output row) against a
  shared-prefix cache: logits [b, 1, V] and the cache with each row's new K/V
  in completion slot `index`."""
  if tokens_b1.shape[1] != 1:
    raise ValueError(f"shared_prefix.forward decodes one token per row, got {tokens_b1.shape}")
  dt = cfg.compute_dtype
  index = cache.index

  def attend_fn(prefix_k, prefix_v, k_cache, v_cache):
    def attend(q, k, v):
      kc = decoder.write_slots(k_cache, k, index)
      vc = decoder.write_slots(v_cache, v, index)
      attn = cascade_attention(cfg, q, prefix_k.astype(dt), prefix_v.astype(dt),
                               cache.prefix_len_R, kc.astype(dt), vc.astype(dt), index + 1,
                               row_b, cache.group_size, cache.rows_in_order)
      return attn, (kc, vc)
    return attend

  attends = [attend_fn(*layer) for layer in zip(cache.prefix_k, cache.prefix_v, cache.k,
                                                 cache.v, strict=True)]
  logits, kv = decoder.run_layers(cfg, params, tokens_b1, positions_b1, attends)
  return logits, dataclasses.replace(cache, k=tuple(kc for kc, _ in kv),
                                     v=tuple(vc for _, vc in kv), index=index + 1)
