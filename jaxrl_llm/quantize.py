"""A quantized frozen base under LoRA (QLoRA-style), through qwix.

With `model.lora.quantize_base` = "int8", "int4" or "nf4", the seven frozen
projection weights of the decoder (q, k, v, o, gate, up, down; all of them,
whichever carry adapters) are stored as qwix `QArray`s in the params pytree:

  W ≈ Ŵ = dequantize(Q) = scale · code(qvalue)        (qwix.quantize / qwix.dequantize)

and the decoder contracts the activations with the QArray through
`qwix.einsum` (`lora.projection`), which dequantizes the weight to the
compute dtype inside the matmul's fusion. The adapters A, B, the embeddings,
norms and biases stay floating point; only the adapters train (Dettmers et al.
2023, "QLoRA": a 4-bit NormalFloat base, 16-bit LoRA adapters).

Layouts (per layer; W is [in..., out...], the layer axis always has its own
scales, so `lax.scan` slices a QArray like any stacked weight):

  "int8"  symmetric absmax per output channel: scale[o] = max_i |W[i, o]| / 127.5,
          q = round(W / scale) in int8 (qwix's symmetric int bound is qmax + 0.5).
          1 byte per element + one float32 scale per output channel.
  "int4"  symmetric absmax per block of `quantize_block_size` consecutive
          elements along the last input axis, per output channel (and per
          index of the other input axes, e.g. o's heads): scale = absmax / 7.5,
          q = round(W / scale) clipped to [-8, 7] in int4.
  "nf4"   the same blocks; q = the nearest of the 16 NormalFloat-4 levels
          (quantiles of N(0, 1) scaled to [-1, 1], QLoRA appendix E) to
          W / absmax, stored as uint4 indices.
          4-bit: 0.5 byte per element + 4 bytes per block (1/16 byte per
          element for blocks of 64). A block is min(block size, axis) long;
          an axis longer than the block must be a multiple of it.

Scales are float32 (QLoRA's double quantization of the scales is not done).
The weights are quantized from float32, layer by layer (`lax.map`), once: at
initialisation and when a run starts or resumes from its model source (the
same float weights give the same codes: quantization is deterministic).

The reference policy (adapters off, `lora.reference_params`) reads the same
quantized base; merged weights (`lora.merge`: merged rollout, `save_hf`) are
the dequantized base plus s·A·B.

Checkpoints: a quantized base is never written; `model.lora.quantize_base`
requires `adapter_only_checkpoints=True` (the base is re-read and re-quantized
on resume). User guide: docs/lora.md, "Quantized frozen base".
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import qwix

from jaxrl_llm import lora as lora_lib

QArray = qwix.QArray
# The logical type qwix stores for each kind, and its bits per element.
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
BITS = {"int8": 8, "int4": 4, "nf4": 4}
SCALE_DTYPE = jnp.float32
PROJECTIONS = lora_lib.TARGETS


def enabled(lora: Optional[lora_lib.LoraConfig]) -> bool:
  """Whether these LoRA settings quantize the frozen base."""
  return lora is not None and lora.quantize_base != "none"


def is_quantized(x: Any) -> bool:
  return isinstance(x, QArray)


def block_length(dim: int, block_size: int, name: str = "") -> int:
  """The block along an input axis of `dim` elements: `block_size`, or the whole
  axis when it is shorter; an axis longer than the block must be a multiple of it."""
  if dim % block_size == 0:
    return block_size
  if dim < block_size:
    return dim
  raise ValueError(f"lora.quantize_block_size={block_size} does not divide the {dim} input "
                   f"elements of the {name or 'projection'} weight: choose a block size that "
                   f"divides {dim} (e.g. 32 or 64)")


def layout(name: str, layer_shape: Sequence[int], kind: str, block_size: int
           ) -> tuple[tuple[int, ...], dict[int, int]]:
  """(channelwise axes, {tiled axis: block}) of one layer's weight [in..., out...]
  for qwix.quantize (see the module docstring)."""
  n_in = lora_lib.IN_AXES[name]
  ndim = len(layer_shape)
  if kind == "int8":
    return tuple(range(n_in, ndim)), {}
  last_in = n_in - 1
  block = block_length(layer_shape[last_in], block_size, name)
  return tuple(a for a in range(ndim) if a != last_in), {last_in: block}


def quantize_weight(w: jax.Array, name: str, kind: str, block_size: int) -> QArray:
  """A stacked projection weight [L, in..., out...] as a QArray with per-layer
  scales, quantized from float32 one layer at a time (bounds the working memory)."""
  channelwise, tiled = layout(name, w.shape[1:], kind, block_size)

  def one(w_layer):
    return qwix.quantize(w_layer.astype(SCALE_DTYPE), QTYPES[kind],
                         channelwise_axes=channelwise, tiled_axes=tiled)
  return jax.lax.map(one, w)


def dequantize(x: Any, dtype=None) -> Any:
  """A QArray as a dense array (in `dtype`, default float32); other values unchanged."""
  if not is_quantized(x):
    return x
  return qwix.dequantize(x.astype(dtype or SCALE_DTYPE))


def quantize_params(lora: lora_lib.LoraConfig, params: Mapping[str, Any]) -> dict[str, Any]:
  """The params with the projection weights of `params["layers"]` quantized as
  `lora.quantize_base` says (the identity for "none"). Pure; adapters and every
  other leaf are kept as they are. A weight that is already a QArray is kept."""
  if not enabled(lora):
    return dict(params)
  layers = dict(params["layers"])
  for name in PROJECTIONS:
    if name in layers and not is_quantized(layers[name]):
      layers[name] = quantize_weight(layers[name], name, lora.quantize_base,
                                     lora.quantize_block_size)
  return dict(params, layers=layers)


# ---------------------------------------------------------------------------
# The abstract layout: shapes, logical axes and bytes (decoder, shardings, memory).
# ---------------------------------------------------------------------------
def _projection(path: str) -> Optional[str]:
  parent, _, name = path.rpartition("/")
  return name if parent == "layers" and name in PROJECTIONS else None


def abstract_shapes(lora: Optional[lora_lib.LoraConfig], flat: Mapping[str, Any]
                    ) -> dict[str, Any]:
  """`{path: ShapeDtypeStruct}` with each projection replaced by the QArray of
  ShapeDtypeStructs that `quantize_params` makes of it."""
  if not enabled(lora):
    return dict(flat)
  out = dict(flat)
  for path, sds in flat.items():
    name = _projection(path)
    if name is not None:
      out[path] = jax.eval_shape(functools.partial(
          quantize_weight, name=name, kind=lora.quantize_base,
          block_size=lora.quantize_block_size), sds)
  return out


def abstract_axes(lora: Optional[lora_lib.LoraConfig], flat_axes: Mapping[str, tuple]
                  ) -> dict[str, Any]:
  """`{path: logical axes}` with each projection's axes as a QArray of axes: the
  codes and the scales carry the weight's logical names (a scale axis of size 1,
  or one a mesh axis does not divide, is replicated: `sharding.logical_to_spec`)."""
  if not enabled(lora):
    return dict(flat_axes)
  qtype = QTYPES[lora.quantize_base]
  return {path: (QArray(axes, axes, None, qtype) if _projection(path) else axes)
          for path, axes in flat_axes.items()}


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def bits(dtype) -> int:
  """Bits per element of a stored dtype (4 for int4 / uint4: packed in device memory)."""
  dtype = jnp.dtype(dtype)
  return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * dtype.itemsize


def tree_bytes(shapes_tree: Any, axes_tree: Any, elems: Callable[[tuple, tuple], int],
               float_bytes: Optional[int] = None) -> float:
  """Σ_leaves elems(logical axes, shape) × bytes per element of a params tree.

  `elems` counts one device's elements of a logically named array
  (`memory._Sharder.elems`). Quantized codes count their bits (4-bit: half a
  byte); floating-point leaves (weights, adapters, scales) their own bytes, or
  `float_bytes` when given (e.g. the compute dtype of a sampling copy).
  """
  axes = jax.tree.leaves(axes_tree, is_leaf=_is_axes)
  shapes = jax.tree.leaves(shapes_tree)
  if len(axes) != len(shapes):
    raise ValueError(f"tree_bytes: {len(axes)} axis tuples for {len(shapes)} leaves")
  total = 0.0
  for names, sds in zip(axes, shapes):
    is_float = jnp.issubdtype(sds.dtype, jnp.floating)
    per = float_bytes if (float_bytes is not None and is_float) else bits(sds.dtype) / 8
    total += elems(names, sds.shape) * per
  return total


# ---------------------------------------------------------------------------
# Starting params of a run (`lora.initial_params_with_adapters`).
# ---------------------------------------------------------------------------
def initial_params(cfg, workdir: str, model_cfg, param_shardings, base_initial_params: Callable,
                   rng: jax.Array):
  """The starting params of a run with a quantized base: the float base and adapters
  exactly as an unquantized LoRA run reads them (HF checkpoint, init_from, SFT
  warm-start), then `quantize_params` into `param_shardings`. None for a fresh
  init (`decoder.init_params` quantizes)."""
  from jaxrl_llm.train_state import param_shardings as make_shardings
  float_cfg = model_cfg.replace(lora=model_cfg.lora.replace(quantize_base="none"))
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  params = lora_lib.initial_params_with_adapters(
      cfg, workdir, float_cfg, make_shardings(float_cfg, mesh, cfg.mesh.rules),
      base_initial_params, rng)
  if params is None:
    return None
  quantize = jax.jit(functools.partial(quantize_params, model_cfg.lora),
                     out_shardings=param_shardings, donate_argnums=(0,))
  return quantize(params)
