"""LoRA adapters in the Hugging Face PEFT layout, in and out.

A PEFT LoRA adapter directory holds

  adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
  adapter_model.safetensors  base_model.model.model.layers.{i}.{module}.lora_A.weight [r, in]
                             base_model.model.model.layers.{i}.{module}.lora_B.weight [out, r]

with module one of self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, and
PEFT computing  y = W x + s · B_hf (A_hf x),  s = lora_alpha / r
(lora_alpha / √r with use_rslora). Our adapters (`jaxrl_llm.lora`) hold the
same product with the matrices the other way round:

  A_hf = A[i].reshape(in, R)ᵀ       B_hf = B[i].reshape(R, out)ᵀ

where in / out flatten the projection's own axes in the order Hugging Face
flattens them (heads-major, as `hf._TensorSpec`).

PiSSA adapters train against a residual base, not the original weights, so
they export as a rank-2R LoRA of the original weights (the conversion PEFT
itself uses for PiSSA):  s·A·B − s·A₀·B₀ = s·[A, A₀]·[B; −B₀],  with
lora_alpha = 2·alpha so that s is unchanged; the base to load it on is the
starting model, `lora.merge(lora.reference_params(params), s)`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxrl_llm import lora as lora_lib
from jaxrl_llm.models import hf
from jaxrl_llm.models.config import ModelConfig

PathLike = Union[str, os.PathLike]
Params = dict[str, Any]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
# our target -> Hugging Face module path under model.layers.{i}.
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")
_RESAVE = ("re-save the adapter (PEFT's save_pretrained, or jaxrl_llm.models.peft.save_peft), "
           "or copy the adapter directory again")


def _hf_pair(a: np.ndarray, b: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """One layer's (A [in..., R], B [R, out...]) -> (lora_A [R, in], lora_B [out, R])."""
  R = a.shape[-1]
  return a.reshape(-1, R).T, b.reshape(R, -1).T


def save_peft(cfg: ModelConfig, params: Params, path: PathLike, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> Path:
  """Writes the adapters of `params` as a PEFT LoRA adapter directory.

  Args:
    cfg: the model config; cfg.lora gives rank, alpha, dropout and targets.
    params: params with adapters (`lora.add_adapters` layout).
    path: the adapter directory (created; existing files are replaced).
    base_model_name_or_path: recorded in adapter_config.json (where PEFT finds
      the base model: e.g. the directory `save_hf` wrote the base to).
    dtype: storage dtype of the tensors; default: the adapters' own.

  Returns:
    The adapter directory.
  """
  if cfg.lora is None or not lora_lib.has_adapters(params):
    raise ValueError("save_peft: the params carry no LoRA adapters (set model.lora.rank > 0 "
                     "and pass the params of a LoRA run)")
  layers = params["layers"]
  pissa = any(k.endswith(lora_lib.A0_SUFFIX) for k in layers)
  rank = cfg.lora.rank * (2 if pissa else 1)
  tensors = {}
  for name in cfg.lora.target_modules:
    n_in = lora_lib.IN_AXES[name]
    a = np.asarray(jax.device_get(layers[name + lora_lib.A_SUFFIX]), np.float32)
    b = np.asarray(jax.device_get(layers[name + lora_lib.B_SUFFIX]), np.float32)
    if pissa:  # s·A·B − s·A₀·B₀ as one rank-2R product on the original weights
      a0 = np.asarray(jax.device_get(layers[name + lora_lib.A0_SUFFIX]), np.float32)
      b0 = np.asarray(jax.device_get(layers[name + lora_lib.B0_SUFFIX]), np.float32)
      a = np.concatenate([a, a0], axis=-1)
      b = np.concatenate([b, -b0], axis=1)
    out_dtype = np.dtype(jnp.dtype(dtype or layers[name + lora_lib.A_SUFFIX].dtype))
    for i in range(a.shape[0]):
      a_hf, b_hf = _hf_pair(a[i], b[i], n_in)
      key = f"{PREFIX}{i}.{MODULES[name]}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_hf.astype(out_dtype))
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_hf.astype(out_dtype))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
      "lora_alpha": float(cfg.lora.alpha) * (2 if pissa else 1),
      "lora_dropout": float(cfg.lora.dropout),
      "target_modules": sorted(MODULES[t].split(".")[-1] for t in cfg.lora.target_modules),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
      "base_model_name_or_path": base_model_name_or_path or None,
  }
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
  with open(path / ADAPTER_CONFIG_NAME, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return path


def read_adapter_config(path: PathLike) -> lora_lib.LoraConfig:
  """The `LoraConfig` of a PEFT adapter directory (refuses what we cannot represent)."""
  file = Path(path) / ADAPTER_CONFIG_NAME
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: {path} is not a PEFT adapter directory")
  c = hf._read_json(file)
  where = f"PEFT adapter {path}"
  missing = [k for k in REQUIRED_KEYS if c.get(k) is None]
  if missing:
    raise ValueError(f"{file} has no {missing[0]!r} (a LoRA adapter config needs "
                     f"{list(REQUIRED_KEYS)}; missing: {missing}): {_RESAVE}")
  if c.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{where}: peft_type={c.get('peft_type')!r}; only LORA adapters load")
  unsupported = {
      "use_dora": bool(c.get("use_dora")), "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
      "rank_pattern": bool(c.get("rank_pattern")), "alpha_pattern": bool(c.get("alpha_pattern")),
      "layers_to_transform": c.get("layers_to_transform") is not None,
      "modules_to_save": bool(c.get("modules_to_save")),
      "bias": c.get("bias", "none") != "none",
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(f"{where}: {bad} are not supported (only plain LoRA: one rank and alpha "
                     "for every targeted projection, no DoRA, bias or extra modules); merge "
                     "the adapter in PEFT (merge_and_unload) and load the merged model instead")
  targets = c.get("target_modules")
  if isinstance(targets, str):
    targets = [targets]
  names = {m.split(".")[-1]: t for t, m in MODULES.items()}
  unknown = [t for t in targets or () if t not in names]
  if unknown or not targets:
    raise ValueError(f"{where}: target_modules={c.get('target_modules')!r}; name modules "
                     f"among {sorted(names)}")
  r, alpha = _number(c, "r", file), _number(c, "lora_alpha", file)
  if r != int(r) or r < 1:
    raise ValueError(f"{file}: r={c['r']!r} must be a whole number >= 1 (the adapter rank)")
  r = int(r)
  if c.get("use_rslora"):
    alpha = alpha * math.sqrt(r)  # s = lora_alpha / √r = alpha / r
  order = list(MODULES)
  return lora_lib.LoraConfig(rank=r, alpha=alpha, dropout=float(c.get("lora_dropout", 0.0)),
                             target_modules=tuple(sorted((names[t] for t in targets),
                                                         key=order.index)))


def _number(c: dict, key: str, file: Path) -> float:
  """c[key] as a finite float; anything else names the key and file."""
  value = c[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{file}: {key}={value!r} must be a finite number; {_RESAVE}")
  return float(value)


def load_peft(cfg: ModelConfig, params: Params, path: PathLike,
              shardings: Any = None) -> tuple[ModelConfig, Params]:
  """Adds the adapters of a PEFT LoRA directory to base `params`.

  Returns (cfg with cfg.lora from adapter_config.json, params with the
  adapters as trainable leaves). Tensors are read in float32 and stored in
  each projection's dtype. `shardings`: None, one Sharding, or the params
  pytree of shardings of the adapted model.
  """
  lora = read_adapter_config(path)
  if lora_lib.has_adapters(params):
    raise ValueError("load_peft: these params already carry LoRA adapters")
  file = Path(path) / ADAPTER_WEIGHTS_NAME
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found (PEFT adapters saved as .bin are not read: "
                            "re-save them with safe_serialization=True)")
  layers = dict(params["layers"])
  L = cfg.num_layers
  found: set[str] = set()
  with hf._safe_open(file) as f:
    stored = {}
    for key in f.keys():
      tail = key[key.index("layers."):] if "layers." in key else key
      stored[tail.replace(".default.", ".")] = key
    for name in lora.target_modules:
      w = layers[name]
      n_in = lora_lib.IN_AXES[name]
      in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
      a = np.empty((L, *in_shape, lora.rank), np.float32)
      b = np.empty((L, lora.rank, *out_shape), np.float32)
      for i in range(L):
        for which, target in (("lora_A", a), ("lora_B", b)):
          tail = f"layers.{i}.{MODULES[name]}.{which}.weight"
          if tail not in stored:
            raise ValueError(f"PEFT adapter {path}: tensor {tail!r} is missing")
          found.add(stored[tail])
          t = f.get_tensor(stored[tail]).astype(np.float32)
          want = ((lora.rank, math.prod(in_shape)) if which == "lora_A" else
                  (math.prod(out_shape), lora.rank))
          if t.shape != want:
            raise ValueError(f"PEFT adapter {path}: {stored[tail]} has shape {t.shape}, "
                             f"expected {want} for this model and r={lora.rank}")
          target[i] = t.T.reshape(target.shape[1:])
      layers[name + lora_lib.A_SUFFIX] = jnp.asarray(a, w.dtype)
      layers[name + lora_lib.B_SUFFIX] = jnp.asarray(b, w.dtype)
    extra = sorted(set(stored.values()) - found)
  if extra:
    raise ValueError(f"PEFT adapter {path}: tensors the adapter config does not describe: "
                     f"{extra[:4]}")
  out = dict(params, layers=layers)
  if shardings is not None:
    out = jax.device_put(out, shardings)
  return cfg.replace(lora=lora), out
