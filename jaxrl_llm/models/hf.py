"""Hugging Face checkpoints: config mapping and safetensors load / save.

Reads and writes the `transformers` layout of LlamaForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM (config.json + model.safetensors, or
sharded shards + model.safetensors.index.json) with the `safetensors` library
alone: no torch at run time. bfloat16 tensors come back as `ml_dtypes`
arrays, which numpy and jax both understand.

Weight layout. A Hugging Face `nn.Linear` stores W as [out, in] and computes
x Wᵀ; this package stores the [in, out] matrix with heads split out:

  HF name (per layer i)              HF shape     ours (stacked over L)
  self_attn.q_proj.weight            [N*H, D]     layers/q      [L, D, N, H]
  self_attn.k_proj.weight / v_proj   [K*H, D]     layers/k, v   [L, D, K, H]
  self_attn.o_proj.weight            [D, N*H]     layers/o      [L, N, H, D]
  self_attn.{q,k,v}_proj.bias        [N*H]/[K*H]  layers/q_bias [L, N, H] ...
  self_attn.{q,k}_norm.weight        [H]          layers/q_norm [L, H] ...
  mlp.gate_proj.weight / up_proj     [F, D]       layers/gate   [L, D, F]
  mlp.down_proj.weight               [D, F]       layers/down   [L, F, D]
  input_layernorm.weight             [D]          layers/attn_norm [L, D]
  post_attention_layernorm.weight    [D]          layers/mlp_norm  [L, D]
  model.embed_tokens.weight          [V, D]       embed   [V, D]
  model.norm.weight                  [D]          final_norm [D]
  lm_head.weight (untied only)       [V, D]       lm_head [D, V]

Shape letters: L layers, D hidden size, N query heads, K key/value heads,
H head dim, F MLP hidden size, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrl_llm import tree_paths
from jaxrl_llm.models.config import ModelConfig, RopeScaling, dtype_name
from jaxrl_llm.models.decoder import Params, param_table

PathLike = str | os.PathLike

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# architecture -> family (which is also its model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_FAMILY_TO_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Defaults that `transformers` applies when a field is absent from config.json.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_HEAD_DIM_QWEN3 = 128

# Tensors some exporters write that carry no weights: RoPE tables are
# recomputed from the config.
_HARMLESS_EXTRA = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_MODEL_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


# ---------------------------------------------------------------------------
# Config mapping.
# ---------------------------------------------------------------------------
def _family_from_hf(hf_config: dict) -> str:
  """The decoder family from `architectures` (preferred) and `model_type`."""
  archs = hf_config.get("architectures") or []
  model_type = hf_config.get("model_type")
  supported_types = tuple(ARCHITECTURES.values())
  if archs:
    families = {ARCHITECTURES[a] for a in archs if a in ARCHITECTURES}
    if not families:
      raise ValueError(
          f"Unsupported Hugging Face architecture: architectures={archs!r}; "
          f"supported: {tuple(ARCHITECTURES)}")
    if len(families) > 1:
      raise ValueError(f"architectures={archs!r} names more than one model family")
    family = families.pop()
    if model_type is not None and model_type != family:
      raise ValueError(
          f"architectures={archs!r} implies model_type={family!r}, but config has "
          f"model_type={model_type!r}")
    return family
  if model_type in supported_types:
    return model_type
  raise ValueError(
      f"Unsupported Hugging Face model: model_type={model_type!r} and no architectures "
      f"field; supported model_type values: {supported_types}, architectures: "
      f"{tuple(ARCHITECTURES)}")


def _require(hf_config: dict, key: str):
  if hf_config.get(key) is None:
    raise ValueError(f"Hugging Face config is missing required field {key!r}")
  return hf_config[key]


def _rope_from_hf(hf_config: dict, max_positions: int) -> tuple[float, RopeScaling | None]:
  """(rope_theta, rope_scaling) from either config style.

  The newer style keeps everything in `rope_parameters` ({"rope_type",
  "rope_theta", "factor", ...}); the older one has a top-level `rope_theta`
  and an optional `rope_scaling` dict (type under "rope_type" or "type").
  When both styles are present they must agree.
  """
  def normalise(params: dict | None, source: str):
    if not params:
      return None
    if not isinstance(params, dict):
      raise TypeError(f"{source} must be a dict, got {params!r}")
    if "full_attention" in params and isinstance(params["full_attention"], dict):
      # Per-layer-type nesting; these models only have full-attention layers.
      params = params["full_attention"]
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
          f"Unsupported rope type {rope_type!r} in {source}; supported rope types: "
          f"{SUPPORTED_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
      raise ValueError(
          f"{source}.partial_rotary_factor={partial!r} is not supported; only 1.0 "
          "(rotary embedding over the whole head) is")
    scaling = None
    if rope_type == "llama3":
      missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
      if missing:
        raise ValueError(f"{source} with rope_type 'llama3' is missing {missing}")
      scaling = RopeScaling(
          factor=float(params["factor"]),
          low_freq_factor=float(params["low_freq_factor"]),
          high_freq_factor=float(params["high_freq_factor"]),
          # transformers falls back to max_position_embeddings as well.
          original_max_position_embeddings=int(
              params.get("original_max_position_embeddings", max_positions)))
    return params.get("rope_theta"), scaling, rope_type

  top_theta = hf_config.get("rope_theta")
  new = normalise(hf_config.get("rope_parameters"), "rope_parameters")
  old = normalise(hf_config.get("rope_scaling"), "rope_scaling")
  if new is not None and old is not None and new[1:] != old[1:]:
    raise ValueError(
        "rope_parameters and rope_scaling disagree: "
        f"{hf_config.get('rope_parameters')!r} vs {hf_config.get('rope_scaling')!r}")
  chosen = new or old
  theta = None
  scaling = None
  if chosen is not None:
    theta, scaling, _ = chosen
  if theta is None:
    theta = top_theta if top_theta is not None else 10000.0
  if top_theta is not None and not math.isclose(float(top_theta), float(theta)):
    raise ValueError(
        f"rope_theta={top_theta!r} disagrees with rope_parameters.rope_theta={theta!r}")
  return float(theta), scaling


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
  """A `ModelConfig` from a Hugging Face config.json dict.

  Supports LlamaForCausalLM (model_type "llama"), Qwen2ForCausalLM ("qwen2":
  bias on q/k/v) and Qwen3ForCausalLM ("qwen3": RMSNorm on q and k, explicit
  head_dim), with default or "llama3" RoPE in either the `rope_parameters` or
  the `rope_theta` + `rope_scaling` style. Anything these models cannot
  express (o_proj / MLP biases, sliding-window attention, other activations
  or rope types) raises a ValueError naming the field, the value found and
  what is supported.

  overrides: `ModelConfig` fields to set on top, e.g. dtype="bfloat16",
    remat="full".
  """
  if not isinstance(hf_config, dict):
    raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
  unknown = sorted(set(overrides) - _MODEL_CONFIG_FIELDS)
  if unknown:
    raise ValueError(
        f"Unknown ModelConfig override(s) {unknown}; valid fields: "
        f"{sorted(_MODEL_CONFIG_FIELDS)}")
  family = _family_from_hf(hf_config)

  hidden_act = hf_config.get("hidden_act", "silu")
  if hidden_act != "silu":
    raise ValueError(f"hidden_act={hidden_act!r} is not supported; supported: 'silu'")
  if hf_config.get("mlp_bias"):
    raise ValueError(
        f"mlp_bias={hf_config['mlp_bias']!r} is not supported; supported: false "
        "(MLP projections without bias)")
  if family in ("llama", "qwen3") and hf_config.get("attention_bias"):
    raise ValueError(
        f"attention_bias={hf_config['attention_bias']!r} for model_type {family!r} puts a "
        "bias on q/k/v and o_proj, which is not supported; supported: false (Qwen2 "
        "checkpoints, with bias on q/k/v only, are supported)")
  if hf_config.get("use_sliding_window"):
    raise ValueError(
        f"use_sliding_window={hf_config['use_sliding_window']!r} is not supported; "
        "supported: false (full attention in every layer)")
  layer_types = hf_config.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise ValueError(
        f"layer_types={layer_types!r} is not supported; supported: 'full_attention' "
        "in every layer")

  hidden = int(_require(hf_config, "hidden_size"))
  num_heads = int(_require(hf_config, "num_attention_heads"))
  num_kv_heads = hf_config.get("num_key_value_heads")
  num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
  head_dim = hf_config.get("head_dim")
  if head_dim is None and family == "qwen3":
    head_dim = _DEFAULT_HEAD_DIM_QWEN3
  if head_dim is not None:
    head_dim = int(head_dim)
    if hidden % num_heads == 0 and head_dim == hidden // num_heads:
      head_dim = None  # the implied value; keep the config minimal
  max_positions = int(hf_config.get("max_position_embeddings")
                      or _DEFAULT_MAX_POSITIONS[family])
  rope_theta, rope_scaling = _rope_from_hf(hf_config, max_positions)

  fields: dict[str, Any] = {
      "vocab_size": int(_require(hf_config, "vocab_size")),
      "hidden_size": hidden,
      "num_layers": int(_require(hf_config, "num_hidden_layers")),
      "num_heads": num_heads,
      "num_kv_heads": num_kv_heads,
      "intermediate_size": int(_require(hf_config, "intermediate_size")),
      "head_dim": head_dim,
      "family": family,
      "rms_norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
      "rope_theta": rope_theta,
      "rope_scaling": rope_scaling,
      "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
      "qkv_bias": family == "qwen2",
      "qk_norm": family == "qwen3",
      "max_position_embeddings": max_positions,
  }
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
  """The Hugging Face config.json dict of `cfg` (inverse of `config_from_hf`).

  RoPE is written in both styles (`rope_parameters`, and `rope_theta` +
  `rope_scaling`) so that old and new `transformers` versions read it. The
  storage dtype is `cfg.param_dtype`. Raises ValueError for feature
  combinations the Hugging Face class of `cfg.family` cannot express
  (e.g. Llama with qkv_bias, Qwen2 without it).
  """
  family = cfg.family
  expected_bias = family == "qwen2"
  expected_norm = family == "qwen3"
  if cfg.qkv_bias != expected_bias:
    raise ValueError(
        f"qkv_bias={cfg.qkv_bias} cannot be written as a Hugging Face {family!r} model, "
        f"which has qkv_bias={expected_bias}")
  if cfg.qk_norm != expected_norm:
    raise ValueError(
        f"qk_norm={cfg.qk_norm} cannot be written as a Hugging Face {family!r} model, "
        f"which has qk_norm={expected_norm}")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rs = cfg.rope_scaling
    rope_scaling = {
        "rope_type": "llama3",
        "factor": float(rs.factor),
        "low_freq_factor": float(rs.low_freq_factor),
        "high_freq_factor": float(rs.high_freq_factor),
        "original_max_position_embeddings": int(rs.original_max_position_embeddings),
    }
    rope = dict(rope_scaling, rope_theta=float(cfg.rope_theta))
  out: dict[str, Any] = {
      "architectures": [_FAMILY_TO_ARCH[family]],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": float(cfg.rms_norm_eps),
      "rope_theta": float(cfg.rope_theta),
      "rope_scaling": rope_scaling,
      "rope_parameters": rope,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": cfg.param_dtype,
  }
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif family == "qwen3":
    out.update(attention_bias=False)
  if family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# ---------------------------------------------------------------------------
# Tensor mapping.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _TensorSpec:
  """One Hugging Face tensor and where it lives in our params.

  ours = (w.T if transpose else w).reshape(ours_shape), written at
  params[path][layer] (or params[path] when layer is None).
  """
  hf_name: str
  hf_shape: tuple[int, ...]
  path: str
  layer: int | None
  ours_shape: tuple[int, ...]
  transpose: bool

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return (w.T if self.transpose else w).reshape(self.ours_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.transpose:
      return x.reshape(self.hf_shape[::-1]).T
    return x.reshape(self.hf_shape)


# our layer leaf -> (HF suffix under model.layers.{i}., transpose)
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


def _tensor_specs(cfg: ModelConfig) -> list[_TensorSpec]:
  """Every Hugging Face tensor of `cfg`, in checkpoint order."""
  table = param_table(cfg)
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  # HF shapes of the matrices, [out, in]; vectors are flat.
  matrix_hf_shapes = {
      "q": (N * H, D), "k": (K * H, D), "v": (K * H, D), "o": (D, N * H),
      "gate": (F, D), "up": (F, D), "down": (D, F), "lm_head": (V, D),
  }

  def spec(hf_name, path, layer, transpose):
    shape = table[path][0]
    ours_shape = shape if layer is None else shape[1:]
    if transpose:
      hf_shape = matrix_hf_shapes[path.split("/")[-1]]
    elif path == "embed":
      hf_shape = shape
    else:
      hf_shape = (math.prod(ours_shape),)
    return _TensorSpec(hf_name, hf_shape, path, layer, ours_shape, transpose)

  specs = [spec(_GLOBAL_TENSORS["embed"][0], "embed", None, False)]
  for i in range(cfg.num_layers):
    for leaf, (suffix, transpose) in _LAYER_TENSORS.items():
      if f"layers/{leaf}" in table:
        specs.append(spec(f"model.layers.{i}.{suffix}", f"layers/{leaf}", i, transpose))
  for path in ("final_norm", "lm_head"):
    if path in table:
      hf_name, transpose = _GLOBAL_TENSORS[path]
      specs.append(spec(hf_name, path, None, transpose))
  return specs


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------
_DAMAGED = ("it is damaged or incomplete (an interrupted download or copy?): download or copy "
            "the checkpoint again")


def _read_json(path: Path) -> dict:
  """The JSON object in `path`; damaged JSON, or JSON that is not an object, raises a
  ValueError naming the file."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); {_DAMAGED}") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object of fields; "
                     f"{_DAMAGED}")
  return obj


@contextlib.contextmanager
def _safe_open(file: Path):
  """`safe_open(file)` for numpy; a damaged file raises a ValueError naming it."""
  try:
    with safe_open(file, framework="np") as f:
      yield f
  except SafetensorError as e:
    raise ValueError(f"{file} is not a readable safetensors file ({e}); {_DAMAGED}") from e


def _tensor_locations(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file holding it (single file or sharded)."""
  index_file = path / WEIGHTS_INDEX_NAME
  single_file = path / WEIGHTS_NAME
  if index_file.is_file():
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_file} has no 'weight_map' dict")
    locations = {name: path / fname for name, fname in weight_map.items()}
    for shard in sorted(set(locations.values())):
      if not shard.is_file():
        raise FileNotFoundError(f"Shard {shard} listed in {index_file} does not exist")
    return locations
  if single_file.is_file():
    with _safe_open(single_file) as f:
      names = f.keys()
    return {name: single_file for name in names}
  pickles = sorted(p.name for p in path.glob("*.bin"))
  hint = (f"; found {pickles}, PyTorch pickle weights are not read: convert them to "
          "safetensors" if pickles else "")
  raise FileNotFoundError(
      f"No safetensors weights in {path}: expected {WEIGHTS_NAME} or "
      f"{WEIGHTS_INDEX_NAME}{hint}")


def _tensor_shapes(locations: dict[str, Path]) -> dict[str, tuple[int, ...]]:
  """Shapes from the safetensors headers (no tensor data is read)."""
  by_file: dict[Path, list[str]] = {}
  for name, file in locations.items():
    by_file.setdefault(file, []).append(name)
  shapes = {}
  for file, names in by_file.items():
    with _safe_open(file) as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise ValueError(f"Tensor {name!r} is listed in the index but missing from {file}")
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def _describe(cfg: ModelConfig) -> str:
  return (f"{cfg.family} with {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads of dim {cfg.resolved_head_dim}, "
          f"vocab {cfg.vocab_size}, tie_embeddings={cfg.tie_embeddings}")


def _check_tensors(cfg: ModelConfig, specs: list[_TensorSpec],
                   shapes: dict[str, tuple[int, ...]], where: Path, strict: bool) -> None:
  """Every expected tensor present with its expected shape; extras reported."""
  expected = {s.hf_name: s for s in specs}
  missing = [n for n in expected if n not in shapes]
  if missing:
    listed = ", ".join(f"{n} (expected shape {expected[n].hf_shape})" for n in missing[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    raise ValueError(
        f"Checkpoint {where} is missing {len(missing)} tensor(s) of a "
        f"{_describe(cfg)}: {listed}{more}")
  wrong = [(n, s.hf_shape, shapes[n]) for n, s in expected.items() if shapes[n] != s.hf_shape]
  if wrong:
    listed = "; ".join(f"{n}: expected shape {e}, found {f}" for n, e, f in wrong[:8])
    more = f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""
    raise ValueError(
        f"Checkpoint {where} has {len(wrong)} tensor(s) of the wrong shape for a "
        f"{_describe(cfg)}: {listed}{more}")
  extra = sorted(
      n for n in shapes
      if n not in expected and not _HARMLESS_EXTRA.search(n)
      # Some tied checkpoints also store the (identical) output matrix.
      and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    msg = (f"Checkpoint {where} has {len(extra)} tensor(s) that a {_describe(cfg)} does "
           f"not use: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if strict:
      raise ValueError(msg + " (pass strict=False to ignore them)")
    warnings.warn(msg, stacklevel=3)


def _placement(shardings: Any, path: str):
  """The sharding of leaf `path` from one Sharding or a params-shaped pytree."""
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  node = shardings
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"shardings has no entry for parameter {path!r}")
    node = node[key]
  return node


def load_hf(path: PathLike, dtype: str = "float32", *, param_dtype: str | None = None,
            strict: bool = True, shardings: Any = None, lora_adapter: PathLike | None = None,
            **overrides) -> tuple[ModelConfig, Params]:
  """Reads a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors, or sharded
      model-*.safetensors with model.safetensors.index.json.
    dtype: compute dtype of the returned config ("float32", "bfloat16",
      "float16", or the dtype object: `jnp.bfloat16`, `np.float32`, ...).
    param_dtype: storage dtype of the returned params; defaults to `dtype`.
      Tensors are converted from whatever dtype the files hold.
    strict: tensors the config does not use raise a ValueError when True,
      a warning when False. Always ignored: `*rotary_emb.inv_freq` buffers and,
      for tied embeddings, a stored `lm_head.weight` (the embedding is used).
    shardings: None (default device), one `jax.sharding.Sharding` for every
      leaf, or a params-shaped pytree of them (e.g. from
      `jaxrl_llm.sharding.tree_shardings`); each leaf is placed as soon as it
      is assembled on the host.
    lora_adapter: a Hugging Face PEFT LoRA adapter directory
      (adapter_config.json + adapter_model.safetensors) to add on top of the
      base: the returned cfg.lora comes from its config and the params carry
      its adapters (`jaxrl_llm.models.peft.load_peft`); `shardings`, when a
      pytree, is then the adapted model's.
    **overrides: further `ModelConfig` fields (e.g. remat="full").

  Returns:
    (cfg, params) with params laid out as `decoder.param_table(cfg)`.

  Raises:
    FileNotFoundError: missing directory, config.json or weight files.
    ValueError: unsupported architecture / config fields, missing tensors,
      tensors of the wrong shape, unexpected tensors (strict).
  """
  if lora_adapter is not None:  # the base first, then its adapters (jaxrl_llm.models.peft)
    from jaxrl_llm import lora as lora_lib
    from jaxrl_llm.models import peft
    base_sh = (lora_lib.base_params(shardings) if isinstance(shardings, dict) else shardings)
    cfg, params = load_hf(path, dtype, param_dtype=param_dtype, strict=strict,
                          shardings=base_sh, **overrides)
    return peft.load_peft(cfg, params, lora_adapter,
                          shardings=shardings if isinstance(shardings, dict) else None)
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist")
  config_file = path / CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} not found: {path} is not a Hugging Face checkpoint")
  cfg = config_from_hf(_read_json(config_file), dtype=dtype,
                       param_dtype=param_dtype or dtype, **overrides)
  locations = _tensor_locations(path)
  specs = _tensor_specs(cfg)
  _check_tensors(cfg, specs, _tensor_shapes(locations), path, strict)

  # Fill one host buffer per stacked leaf, reading each file once; tensors
  # are cast to the storage dtype on assignment.
  np_dtype = np.dtype(cfg.weights_dtype)
  buffers = {p: np.empty(shape, np_dtype) for p, (shape, _) in param_table(cfg).items()}
  by_file: dict[Path, list[_TensorSpec]] = {}
  for spec in specs:
    by_file.setdefault(locations[spec.hf_name], []).append(spec)
  for file, file_specs in by_file.items():
    with _safe_open(file) as f:
      for spec in file_specs:
        value = spec.to_ours(f.get_tensor(spec.hf_name))
        if spec.layer is None:
          buffers[spec.path][...] = value
        else:
          buffers[spec.path][spec.layer] = value

  flat = {}
  for leaf_path in list(buffers):
    host = buffers.pop(leaf_path)  # drop the host copy once it is on device
    sharding = _placement(shardings, leaf_path)
    flat[leaf_path] = (jnp.asarray(host) if sharding is None
                       else jax.device_put(host, sharding))
  return cfg, tree_paths.unflatten(flat)




# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------
def _flat_params(cfg: ModelConfig, params: Params) -> dict[str, Any]:
  """'a/b' -> leaf for every entry of `param_table(cfg)`, shapes checked."""
  table = param_table(cfg)
  flat = {}
  for leaf_path, (shape, _) in table.items():
    node = params
    for key in leaf_path.split("/"):
      if not isinstance(node, dict) or key not in node:
        raise ValueError(f"params is missing {leaf_path!r} (expected shape {shape})")
      node = node[key]
    if tuple(node.shape) != shape:
      raise ValueError(
          f"params[{leaf_path!r}] has shape {tuple(node.shape)}, expected {shape} for a "
          f"{_describe(cfg)}")
    flat[leaf_path] = node
  found = {"/".join(str(getattr(k, "key", k)) for k in kp)
           for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  extra = sorted(found - set(table))
  if extra:
    raise ValueError(f"params has entries a {_describe(cfg)} does not have: {extra}")
  return flat


def _write_json(obj: dict, file: Path) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def save_hf(cfg: ModelConfig, params: Params, path: PathLike, *,
            shard_size_bytes: int = 5 * 2**30, dtype: str | None = None,
            extra_config: dict | None = None,
            generation_config: dict | None = None,
            overwrite: bool = False) -> Path:
  """Writes `params` as a Hugging Face checkpoint that `transformers` loads.

  The directory gets config.json, generation_config.json and the weights:
  model.safetensors, or model-0000i-of-0000n.safetensors shards plus
  model.safetensors.index.json when the tensors exceed `shard_size_bytes`.
  Everything is written into a temporary sibling directory that is renamed
  to `path` at the end, so an interrupted save never leaves a complete-looking
  checkpoint. Tied embeddings store no lm_head tensor.

  Args:
    cfg, params: the model; params laid out as `decoder.param_table(cfg)`.
      Arrays are copied to the host one tensor at a time (they must be fully
      addressable from this process).
    path: the checkpoint directory; must not exist or be empty unless
      `overwrite`.
    shard_size_bytes: largest shard size (a single larger tensor gets a shard
      of its own).
    dtype: storage dtype of the written tensors; defaults to cfg.param_dtype.
    extra_config: fields merged into config.json (e.g. bos_token_id,
      eos_token_id).
    generation_config: contents of generation_config.json; by default the
      bos/eos/pad token ids found in the config.
    overwrite: replace an existing non-empty directory.

  Params with LoRA adapters are written merged (W + s·A·B, `lora.merge`),
  as a plain model; `jaxrl_llm.models.peft.save_peft` writes the adapters
  alone.

  Returns:
    The checkpoint directory.
  """
  from jaxrl_llm import lora as lora_lib
  if lora_lib.has_adapters(params):
    if cfg.lora is None:
      raise ValueError("save_hf: the params carry LoRA adapters but cfg.lora is None: pass the "
                       "model config of the LoRA run")
    params = lora_lib.merge(params, cfg.lora.scale)
  cfg = cfg.replace(lora=None)
  path = Path(path)
  if shard_size_bytes <= 0:
    raise ValueError(f"shard_size_bytes must be > 0, got {shard_size_bytes}")
  save_dtype = dtype_name(dtype or cfg.param_dtype)
  if save_dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={save_dtype!r}; choose one of ('float32', 'bfloat16', 'float16')")
  if path.exists():
    if not path.is_dir():
      raise FileExistsError(f"{path} exists and is not a directory")
    if any(path.iterdir()) and not overwrite:
      raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")

  hf_config = config_to_hf(cfg)
  hf_config["dtype"] = save_dtype
  hf_config.update(extra_config or {})
  if generation_config is None:
    generation_config = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if hf_config.get(k) is not None}
  flat = _flat_params(cfg, params)
  specs = _tensor_specs(cfg)
  np_dtype = np.dtype(jnp.dtype(save_dtype))

  shards: list[list[_TensorSpec]] = [[]]
  shard_bytes = 0
  total_bytes = 0
  for spec in specs:
    nbytes = math.prod(spec.hf_shape) * np_dtype.itemsize
    if shards[-1] and shard_bytes + nbytes > shard_size_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(spec)
    shard_bytes += nbytes
    total_bytes += nbytes
  if len(shards) == 1:
    names = [WEIGHTS_NAME]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  def hf_tensor(spec: _TensorSpec) -> np.ndarray:
    leaf = flat[spec.path]
    value = np.asarray(jax.device_get(leaf if spec.layer is None else leaf[spec.layer]))
    return np.ascontiguousarray(spec.to_hf(value).astype(np_dtype))

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    weight_map = {}
    for name, shard in zip(names, shards):
      # "format": "pt" is the metadata transformers expects in safetensors files.
      save_file({s.hf_name: hf_tensor(s) for s in shard}, str(tmp / name),
                metadata={"format": "pt"})
      weight_map.update({s.hf_name: name for s in shard})
    if len(shards) > 1:
      _write_json({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                  tmp / WEIGHTS_INDEX_NAME)
    _write_json(hf_config, tmp / CONFIG_NAME)
    _write_json(generation_config, tmp / GENERATION_CONFIG_NAME)
    _install(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _install(tmp: Path, path: Path) -> None:
  """Moves the finished `tmp` directory to `path` (replacing what was there)."""
  if not path.exists():
    os.rename(tmp, path)
    return
  old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
  os.rename(path, old / path.name)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)
