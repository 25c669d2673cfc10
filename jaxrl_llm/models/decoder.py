"""A pure-functional decoder-only transformer (Llama / Qwen2 / Qwen3 family).

Parameters are a nested dict of arrays; layers are stacked along a leading
`layers` axis and run with `lax.scan` (fast compiles, one layer's activations
live at a time). The KV cache is a dict pytree passed in and returned, with
one buffer per layer; decoding unrolls the layers (see `forward_with_cache`).

Shape letters:
  B batch, T query time, S key/cache time, L layers, D hidden size,
  N query heads, K key/value heads, H head dim, F MLP hidden size, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrl_llm import lora as lora_lib
from jaxrl_llm import quantize, sharding, tree_paths
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.sharding import constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]


# ---------------------------------------------------------------------------
# Parameters: shapes and logical axes in one table.
# ---------------------------------------------------------------------------
def param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Every parameter's (shape, logical axis names), keyed by 'a/b' path.

  Sharding maps the logical names to mesh axes (see `jaxrl_llm.sharding`).
  """
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  table = {
      "embed": ((V, D), ("vocab", "embed")),
      "layers/attn_norm": ((L, D), ("layers", "norm")),
      "layers/q": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
      "layers/k": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/v": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
      "layers/o": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
      "layers/mlp_norm": ((L, D), ("layers", "norm")),
      "layers/gate": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/up": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/down": ((L, F, D), ("layers", "mlp", "embed")),
      "final_norm": ((D,), ("norm",)),
  }
  if cfg.qkv_bias:
    table["layers/q_bias"] = ((L, N, H), ("layers", "heads", "head_dim"))
    table["layers/k_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
    table["layers/v_bias"] = ((L, K, H), ("layers", "kv_heads", "head_dim"))
  if cfg.qk_norm:
    table["layers/q_norm"] = ((L, H), ("layers", "norm"))
    table["layers/k_norm"] = ((L, H), ("layers", "norm"))
  if not cfg.tie_embeddings:
    table["lm_head"] = ((D, V), ("embed", "vocab"))
  if cfg.lora is not None:  # adapters next to their projections (`jaxrl_llm.lora`)
    table.update(lora_lib.adapter_table(table, cfg.lora))
  return table




def param_logical_axes(cfg: ModelConfig) -> Params:
  """The params pytree with each leaf replaced by its logical axis names (a quantized
  base weight: a QArray of them, `quantize.abstract_axes`)."""
  return tree_paths.unflatten(quantize.abstract_axes(
      cfg.lora, {k: axes for k, (_, axes) in param_table(cfg).items()}))


def param_shapes(cfg: ModelConfig) -> Params:
  """The params pytree as `jax.ShapeDtypeStruct`s (no memory); a quantized base
  weight (model.lora.quantize_base) is a QArray of them."""
  dt = cfg.weights_dtype
  return tree_paths.unflatten(quantize.abstract_shapes(
      cfg.lora, {k: jax.ShapeDtypeStruct(s, dt) for k, (s, _) in param_table(cfg).items()}))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters: normal(0, 0.02) weights, ones for norms, zeros for biases;
  LoRA adapters (when cfg.lora is set) as `lora.add_adapters` makes them."""
  if cfg.lora is not None:
    base_rng, adapter_rng = jax.random.split(rng)
    params = lora_lib.add_adapters(cfg.lora, init_params(cfg.replace(lora=None), base_rng),
                                   adapter_rng)
    return quantize.quantize_params(cfg.lora, params)  # lora.quantize_base; else unchanged
  table = param_table(cfg)
  keys = jax.random.split(rng, len(table))
  flat = {}
  for key, (path, (shape, _)) in zip(keys, sorted(table.items())):
    name = path.split("/")[-1]
    if "norm" in name:
      value = jnp.ones(shape, cfg.weights_dtype)
    elif "bias" in name:
      value = jnp.zeros(shape, cfg.weights_dtype)
    else:
      value = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(cfg.weights_dtype)
    flat[path] = value
  return tree_paths.unflatten(flat)


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """y = x / sqrt(mean(x²) + eps) * weight, statistics in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies θ^(-2i/H), with Llama-3 scaling when configured."""
  H = cfg.resolved_head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq
  low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
  return jnp.where(wavelen > low_wavelen, inv_freq / rs.factor,
                   jnp.where(wavelen < high_wavelen, inv_freq, interpolated))


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, half-split layout: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
  """Position of each token inside its segment (restarts at every new segment).

  Left padding (segment 0 then 1) gives the prompt's first real token
  position 0; packed rows restart at each segment boundary.
  """
  T = segment_ids_BT.shape[1]
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  prev = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids_BT != prev, t, 0)
  return t - jax.lax.cummax(starts, axis=1)


def _attention_impl(cfg: ModelConfig) -> Optional[str]:
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  # cuDNN's fused kernel needs half precision; everything else takes XLA's.
  if jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "xla"


def attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, kv_len_B=None, *,
              return_residual: bool = False):
  """Grouped-query softmax attention through `jax.nn.dot_product_attention`.

  `kv_len_B` (optional) bounds the key slots that can be attended, [0,
  kv_len): the mask (None: every slot below kv_len) already excludes the
  rest, and the fused GPU kernel then skips reading them (the empty tail of
  a preallocated KV cache). `return_residual`: also the log-sum-exp of each
  query's scores, lse_BTN (`shared_prefix.merge`).

  Under a mesh of several devices (`sharding.activation_rules`) each device
  attends its own rows and heads (`jax.shard_map`; the batch over the
  `act_batch` axes, the heads over `act_heads` when that axis divides the
  query and the key/value heads alike). Attention needs nothing from other
  rows or heads, so this is the same computation with no collective; it also
  keeps XLA's partitioner away from the fused kernel's own partitioning rule,
  which fails to compile some 8-way sharded training steps (cuDNN on GPU;
  BENCHMARKS.md, "The cuDNN attention partitioner").
  """
  impl = _attention_impl(cfg)

  def attend(q, k, v, mask, kv_len):
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None, :, :],
        key_value_seq_lengths=kv_len, implementation=impl, return_residual=return_residual)

  active = sharding.active_mesh_rules()
  if active is None or active[0].size == 1:
    return attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, kv_len_B)
  mesh, rules = active
  q_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None), rules, mesh,
                                    q_BTNH.shape)
  kv_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None), rules, mesh,
                                     k_BSKH.shape)
  heads = q_spec[2] if q_spec[2] == kv_spec[2] else None  # GQA groups stay on one device
  batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
  spec_BTNH = P(batch, None, heads, None)  # also the keys' and values' [B, S, K, H]
  args = {"q": (q_BTNH, spec_BTNH), "k": (k_BSKH, spec_BTNH), "v": (v_BSKH, spec_BTNH)}
  if mask_BTS is not None:
    args["mask"] = (mask_BTS, P(batch, None, None))
  if kv_len_B is not None:
    args["kv_len"] = (kv_len_B, P(batch))

  def local(*xs):
    named = dict(zip(args, xs, strict=True))
    return attend(named["q"], named["k"], named["v"], named.get("mask"), named.get("kv_len"))

  out_specs = (spec_BTNH, P(batch, None, heads)) if return_residual else spec_BTNH
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(s for _, s in args.values()),
                       out_specs=out_specs, check_vma=False)(*(x for x, _ in args.values()))


def _layer(cfg: ModelConfig, lp: Params, x_BTD, positions_BT, inv_freq, attend_fn,
           lora_dropout_key=None):
  """One pre-norm block: x + attn(norm(x)); x + mlp(norm(x)).

  `attend_fn(q_BTNH, k_BTKH, v_BTKH) -> (attn_BTNH, aux)` attends the new
  tokens' queries to the keys they see (the same tokens, or a KV cache the
  new keys are written into) and returns what it stored as `aux`.
  `lora_dropout_key` (training only): this layer's key for the adapters' input
  dropout (`lora.dropout_fn`), one independent mask per projection.
  """
  dt = cfg.compute_dtype
  scale = None if cfg.lora is None else cfg.lora.scale

  def proj(eq, x, name):
    """A projection, plus its low-rank update s·(x·A)·B where the params hold adapters."""
    drop = (None if lora_dropout_key is None or cfg.lora is None else
            lora_lib.dropout_fn(cfg.lora, lora_dropout_key, name))
    return lora_lib.projection(eq, x, lp, name, dt, scale, drop, cfg.decode_matmul)
  h = rms_norm(x_BTD, lp["attn_norm"], cfg.rms_norm_eps)
  q = proj("BTD,DNH->BTNH", h, "q")
  k = proj("BTD,DKH->BTKH", h, "k")
  v = proj("BTD,DKH->BTKH", h, "v")
  if cfg.qkv_bias:
    q = q + lp["q_bias"].astype(dt)
    k = k + lp["k_bias"].astype(dt)
    v = v + lp["v_bias"].astype(dt)
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
  q = apply_rope(q, positions_BT, inv_freq)
  k = apply_rope(k, positions_BT, inv_freq)
  q = constrain(q, ("act_batch", "act_len", "act_heads", None))
  attn_BTNH, aux = attend_fn(q, k, v)
  x_BTD = x_BTD + proj("BTNH,NHD->BTD", attn_BTNH, "o")
  x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))

  h = rms_norm(x_BTD, lp["mlp_norm"], cfg.rms_norm_eps)
  gate = proj("BTD,DF->BTF", h, "gate")
  up = proj("BTD,DF->BTF", h, "up")
  act = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
  x_BTD = x_BTD + proj("BTF,FD->BTD", act, "down")
  x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
  return x_BTD, aux


def _fused_attention_forward(prim, *_, **__) -> bool:
  """The forward of JAX's cuDNN fused attention (its output and softmax statistics)."""
  return prim.name.startswith("dot_product_attention_fwd")


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # dots_no_batch, and the fused attention's forward is kept rather than rerun in the
    # backward (XLA's attention has no such kernel: there it is dots_no_batch).
    "dots_no_batch_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _fused_attention_forward),
}


def _maybe_remat(cfg: ModelConfig, fn):
  if cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)


def _scan_layers(cfg: ModelConfig, body, carry, layer_params):
  """lax.scan over the stacked layer axis, or an unrolled Python loop."""
  if cfg.scan_layers:
    return jax.lax.scan(body, carry, layer_params)
  outs = []
  for i in range(cfg.num_layers):
    carry, out = body(carry, jax.tree.map(lambda p, i=i: p[i], layer_params))
    outs.append(out)
  stacked = None if outs[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return carry, stacked


# ---------------------------------------------------------------------------
# Forward passes.
# ---------------------------------------------------------------------------
def embed(cfg: ModelConfig, params: Params, tokens_BT: jax.Array) -> jax.Array:
  x = jnp.take(params["embed"], tokens_BT, axis=0).astype(cfg.compute_dtype)
  return constrain(x, ("act_batch", "act_len", "act_embed"))


def unembed(cfg: ModelConfig, params: Params, h_BTD: jax.Array) -> jax.Array:
  """Logits from final hidden states (in the compute dtype)."""
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    return jnp.einsum("BTD,VD->BTV", h_BTD, params["embed"].astype(dt))
  return jnp.einsum("BTD,DV->BTV", h_BTD, params["lm_head"].astype(dt))


def unembed_float32(cfg: ModelConfig, params: Params, h_BTD: jax.Array) -> jax.Array:
  """Logits from final hidden states as float32, written by the GEMM itself.

  The forward multiplies compute-dtype operands and keeps the float32
  accumulator (logits = h · Wᵀ, never rounded to the compute dtype); the
  backward casts the logits' cotangent to the compute dtype first, so its two
  products (∂h = g · W, ∂W = gᵀ · h) run in the compute dtype, as `unembed`'s do.
  """
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    return _logits_float32("VD", h_BTD.astype(dt), params["embed"].astype(dt))
  return _logits_float32("DV", h_BTD.astype(dt), params["lm_head"].astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logits_float32(w_spec: str, h_BTD: jax.Array, w: jax.Array) -> jax.Array:
  """h · W in float32; w_spec: "VD" (the tied embedding) or "DV" (lm_head)."""
  return jnp.einsum(f"BTD,{w_spec}->BTV", h_BTD, w, preferred_element_type=jnp.float32)


def _logits_float32_fwd(w_spec, h_BTD, w):
  return _logits_float32(w_spec, h_BTD, w), (h_BTD, w)


def _logits_float32_bwd(w_spec, residuals, g_BTV):
  h_BTD, w = residuals
  g_BTV = g_BTV.astype(h_BTD.dtype)
  dh_BTD = jnp.einsum(f"BTV,{w_spec}->BTD", g_BTV, w)
  dw = jnp.einsum(f"BTD,BTV->{w_spec}", h_BTD, g_BTV)
  return dh_BTD, dw


_logits_float32.defvjp(_logits_float32_fwd, _logits_float32_bwd)


def hidden_states(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *,
                  positions_BT: Optional[jax.Array] = None,
                  segment_ids_BT: Optional[jax.Array] = None,
                  lora_dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Final-norm hidden states [B, T, D] of a full (uncached) forward.

  lora_dropout_rng: training-time dropout on the LoRA adapters' inputs
    (cfg.lora.dropout; one key per layer is split from it). None: no dropout.

  segment_ids_BT: 0 marks padding, equal positive ids mark one sequence; a
    token attends to earlier tokens of its own segment (left padding and
    packing). None means one unpadded sequence per row.
  positions_BT: rotary positions; by default the index inside the segment.
  """
  B, T = tokens_BT.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  if positions_BT is None:
    positions_BT = positions_from_segments(segment_ids_BT)
  causal_TS = jnp.tril(jnp.ones((T, T), bool))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  mask_BTS = causal_TS[None] & same_BTS & (segment_ids_BT[:, None, :] != 0)

  def attend_fn(q, k, v):
    return attention(cfg, q, k, v, mask_BTS), None

  return layer_stack(cfg, params, tokens_BT, positions_BT, attend_fn,
                     lora_dropout_rng=lora_dropout_rng)


def layer_stack(cfg: ModelConfig, params: Params, tokens_BT: jax.Array,
                positions_BT: jax.Array, attend_fn: Callable, *,
                lora_dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Embedding, the (scanned, rematerialised) layers and the final norm of a full
  forward: hidden states [B, T, D]. Every layer attends through `attend_fn(q_BTNH,
  k_BTKH, v_BTKH) -> (attn_BTNH, None)`, which decides who sees whom
  (`hidden_states`: segments; `shared_prompt`: a group's prompt once)."""
  inv_freq = rope_inv_freq(cfg)
  dropout = (lora_dropout_rng is not None and cfg.lora is not None and cfg.lora.dropout > 0)
  layer_xs = ((params["layers"], jax.random.split(lora_dropout_rng, cfg.num_layers))
              if dropout else (params["layers"], None))

  def body(x, xs):
    lp, key = xs
    x, _ = _layer(cfg, lp, x, positions_BT, inv_freq, attend_fn, lora_dropout_key=key)
    return x, None

  x, _ = _scan_layers(cfg, _maybe_remat(cfg, body), embed(cfg, params, tokens_BT), layer_xs)
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def forward(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *,
            positions_BT: Optional[jax.Array] = None,
            segment_ids_BT: Optional[jax.Array] = None) -> jax.Array:
  """Logits [B, T, V] of a full forward pass (see `hidden_states`)."""
  h = hidden_states(cfg, params, tokens_BT, positions_BT=positions_BT,
                    segment_ids_BT=segment_ids_BT)
  return unembed(cfg, params, h)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int,
               dtype: Optional[str] = None) -> Cache:
  """An empty KV cache: one k and one v buffer [B, S, K, H] per layer, per-slot
  validity [B, S] and the write index.

  Per-layer buffers (tuples of L arrays, not one stacked [L, ...] array) let
  the decode loop update and read each layer's cache in place; a slice of a
  stacked cache is a copy on GPU.
  """
  dt = jnp.dtype(dtype) if dtype is not None else cfg.compute_dtype
  shape = (batch_size, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
  return {
      "k": tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
      "v": tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers)),
      "valid": jnp.zeros((batch_size, max_len), bool),  # [B, S]
      "index": jnp.zeros((), jnp.int32),  # next slot to write
  }


def cache_take_rows(cache: Cache, rows_B: jax.Array) -> Cache:
  """The cache of rows `rows_B` (a gather along the batch axis of every buffer).

  The write index is shared by all rows, so it carries over unchanged. Used to
  compact a decode batch to its live rows (`sampling.sample`).
  """
  take = lambda x: jnp.take(x, rows_B, axis=0)
  return {"k": tuple(map(take, cache["k"])), "v": tuple(map(take, cache["v"])),
          "valid": take(cache["valid"]), "index": cache["index"]}


def cache_expand(cache: Cache, repeats: int, max_len: int) -> Cache:
  """Each row repeated `repeats` times (row r -> rows r·G .. r·G + G − 1, as
  `jnp.repeat`), and the slot axis grown to `max_len` empty slots.

  A prompt prefilled once this way serves the G samples of its group: one
  prefill per prompt instead of one per sample.
  """
  S = cache["valid"].shape[1]
  if max_len < S:
    raise ValueError(f"cache_expand: max_len {max_len} < the cache's {S} slots")

  def grow(x):
    x = jnp.repeat(x, repeats, axis=0) if repeats > 1 else x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, max_len - S)
    return jnp.pad(x, pad)
  return {"k": tuple(map(grow, cache["k"])), "v": tuple(map(grow, cache["v"])),
          "valid": grow(cache["valid"]), "index": cache["index"]}


def decode_params(cfg: ModelConfig, params: Params) -> Params:
  """The weights as the decode loop reads them, made once per `sampling.sample`.

  Matmul weights are cast to the compute dtype (the forward casts them the
  same way; norm weights stay as stored) and "layers" becomes a tuple of
  per-layer trees instead of stacked [L, ...] arrays: slicing and casting
  once, before the loop, spares a per-layer copy at every generated token.
  Costs one copy of the weights (in the compute dtype) while it is alive.
  Idempotent.
  """
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  dt = cfg.compute_dtype
  params = jax.tree_util.tree_map_with_path(  # a QArray (quantized base): its scales are cast
      lambda path, p: p if "norm" in jax.tree_util.keystr(path) else p.astype(dt), params,
      is_leaf=quantize.is_quantized)
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda p, i=i: p[i], params["layers"])
                                   for i in range(num_layers)))


def forward_with_cache(cfg: ModelConfig, params: Params, tokens_BT: jax.Array,
                       positions_BT: jax.Array, valid_BT: jax.Array,
                       cache: Cache, *, return_hidden: bool = False
                       ) -> tuple[jax.Array, Cache]:
  """Run T new tokens against the cache; returns logits [B, T, V] and the cache.

  With return_hidden=True the first output is the final-norm hidden states
  [B, T, D] instead (e.g. to unembed only the last prefill position).

  The new keys/values are written at slots [index, index + T) for every row
  (left-padded batches stay aligned); `valid_BT` marks real tokens, so pad
  slots are never attended. A query at slot index + i attends valid slots
  <= index + i. The layers are unrolled (the cache is per layer, see
  `init_cache`); `params` may be stored params or `decode_params` output.
  """
  B, T = tokens_BT.shape
  S = cache["k"][0].shape[1]
  index = cache["index"]
  valid_BS = jax.lax.dynamic_update_slice(cache["valid"], valid_BT.astype(bool), (0, index))
  slot_S = jnp.arange(S)
  query_slot_T = index + jnp.arange(T)
  mask_BTS = valid_BS[:, None, :] & (slot_S[None, None, :] <= query_slot_T[None, :, None])
  filled_B = jnp.full((B,), index + T, jnp.int32)  # slots past the filled prefix: unread

  def attend_fn(k_cache, v_cache):
    def attend(q, k, v):
      kc = write_slots(k_cache, k, index)
      vc = write_slots(v_cache, v, index)
      attn = attention(cfg, q, kc.astype(cfg.compute_dtype), vc.astype(cfg.compute_dtype),
                       mask_BTS, filled_B)
      return attn, (kc, vc)
    return attend

  out, kv = run_layers(cfg, params, tokens_BT, positions_BT,
                       [attend_fn(*kv) for kv in zip(cache["k"], cache["v"], strict=True)],
                       return_hidden=return_hidden)
  new_cache = {"k": tuple(kc for kc, _ in kv), "v": tuple(vc for _, vc in kv),
               "valid": valid_BS, "index": index + T}
  return out, new_cache


def write_slots(cache_BSKH: jax.Array, new_BTKH: jax.Array, index) -> jax.Array:
  """The cache with slots [index, index + T) of every row replaced by `new`."""
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_update_slice(cache_BSKH, new_BTKH.astype(cache_BSKH.dtype),
                                      (zero, index, zero, zero))


def run_layers(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array,
               attend_fns: Sequence[Callable], *, return_hidden: bool = False):
  """Embedding, the unrolled layers (layer i attends through `attend_fns[i]`, see
  `_layer`), final norm and unembedding; returns (logits or hidden states, the
  layers' attention aux outputs). `params` may be stored or `decode_params`."""
  inv_freq = rope_inv_freq(cfg)
  params = decode_params(cfg, params)
  x = embed(cfg, params, tokens_BT)
  auxes = []
  for lp, attend in zip(params["layers"], attend_fns, strict=True):
    x, aux = _layer(cfg, lp, x, positions_BT, inv_freq, attend)
    auxes.append(aux)
  h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  return (h if return_hidden else unembed(cfg, params, h)), auxes


@functools.partial(jax.named_call, name="token_logprobs")
def token_logprobs(cfg: ModelConfig, params: Params, h_BTD: jax.Array,
                   targets_BT: jax.Array, *, temperature: float = 1.0,
                   chunk_size: int = 512, with_entropy: bool = False):
  """log π(target_t | context) from hidden states, in chunks over time.

  Logits are formed chunk by chunk (`chunk_size` positions at a time), so a
  float32 [B, T, V] tensor never exists; log-softmax is in float32 because
  bf16 log-probs lose the small differences that importance ratios need.
  With cfg.float32_logprob_head the head's GEMM writes the float32 logits
  itself (`unembed_float32`) instead of rounding them to the compute dtype
  and converting them back.
  Returns logps_BT (and entropy_BT of the tempered distribution if asked).
  """
  B, T, D = h_BTD.shape
  c = min(chunk_size, T)
  pad = (-T) % c
  h = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
  tgt = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  n = (T + pad) // c
  h_nBcD = h.reshape(B, n, c, D).swapaxes(0, 1)
  tgt_nBc = tgt.reshape(B, n, c).swapaxes(0, 1)

  def one_chunk(_, xs):
    h_c, t_c = xs
    head = unembed_float32 if cfg.float32_logprob_head else unembed
    logits = head(cfg, params, h_c).astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0] - logz
    if with_entropy:
      probs = jax.nn.softmax(logits, axis=-1)
      ent = logz - jnp.sum(probs * logits, axis=-1)
      return None, (logp, ent)
    return None, (logp, jnp.zeros_like(logp))

  one_chunk = jax.checkpoint(one_chunk)  # recompute chunk logits in backward
  _, (logp, ent) = jax.lax.scan(one_chunk, None, (h_nBcD, tgt_nBc))
  logp = logp.swapaxes(0, 1).reshape(B, n * c)[:, :T]
  ent = ent.swapaxes(0, 1).reshape(B, n * c)[:, :T]
  return (logp, ent) if with_entropy else logp
