"""Model configuration for the Llama / Qwen2 / Qwen3 decoder family."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from jaxrl_llm.lora import LoraConfig

FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# Weight products of a decode step (one token per row): XLA's GEMM, or the Pallas
# decode matmul (jaxrl_llm/decode_matmul.py; GPU, one device per model replica);
# "pallas_interpret" runs that kernel through the Pallas interpreter (tests). On an
# H100 it made W3's b64 step 7.6 % slower than XLA's fused GEMMs (BENCHMARKS.md,
# 2026-12-07), so "xla" is the default.
DECODE_MATMULS = ("xla", "pallas", "pallas_interpret")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_no_batch_attention")


def dtype_name(dtype) -> str:
  """A dtype given as a string or a JAX / NumPy dtype object (`jnp.bfloat16`,
  `np.float32`, `np.dtype("float16")`) as its name ("bfloat16", ...); anything
  else is returned unchanged, for the caller's validation to name."""
  if isinstance(dtype, str):
    return dtype
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return dtype


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling ("llama3" rope_type).

  Wavelengths longer than original_max_position / low_freq_factor are divided
  by `factor`, shorter than original_max_position / high_freq_factor are kept,
  and the band in between is interpolated smoothly.
  """
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(
          "RopeScaling.high_freq_factor must exceed low_freq_factor, got "
          f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer.

  Covers Llama 3.x (rope scaling "llama3"), Qwen2/2.5 (bias on q/k/v) and
  Qwen3 (RMSNorm on q and k per head, explicit head_dim). Grouped-query
  attention when num_kv_heads < num_heads (MQA when 1).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: Optional[int] = None  # None -> hidden_size // num_heads
  family: str = "llama"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 family: bias on the q, k and v projections.
  qk_norm: bool = False   # Qwen3 family: RMSNorm over head_dim of q and k.
  max_position_embeddings: int = 4096
  dtype: str = "float32"        # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of the parameters
  # Rematerialisation policy of each layer (REMAT_POLICIES): "dots_no_batch" keeps the weight
  # matmuls' outputs; "dots_no_batch_attention" also the cuDNN attention forward (W1 on an
  # H100: -1.1 % step time, +1 GiB, BENCHMARKS.md "Where W1's update goes").
  remat: str = "none"
  attention_impl: str = "auto"  # jax.nn.dot_product_attention implementation
  scan_layers: bool = True      # lax.scan over stacked layers (fast compile)
  decode_matmul: str = "xla"    # one of DECODE_MATMULS
  # The log-prob head's unembedding GEMM writes float32 logits (`decoder.unembed_float32`)
  # instead of compute-dtype logits converted to float32 afterwards: log-probs without the
  # bf16 rounding of their logits, for more bytes (W1 on an H200: +2.4 % step time,
  # BENCHMARKS.md "Where W1's update goes").
  float32_logprob_head: bool = False
  lora: Optional[LoraConfig] = None  # low-rank adapters (`jaxrl_llm.lora`); None: none

  def __post_init__(self):
    def _check(cond, msg):
      if not cond:
        raise ValueError(f"ModelConfig: {msg}")
    for name in ("dtype", "param_dtype"):  # jnp.bfloat16 etc. are accepted as their names
      object.__setattr__(self, name, dtype_name(getattr(self, name)))
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "num_kv_heads", "intermediate_size"):
      value = getattr(self, name)
      _check(isinstance(value, int) and value > 0,
             f"{name} must be a positive int, got {value!r}")
    _check(self.family in FAMILIES,
           f"family={self.family!r} is not supported; choose one of {FAMILIES}")
    _check(self.num_heads % self.num_kv_heads == 0,
           f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
           f"({self.num_kv_heads})")
    if self.head_dim is None:
      _check(self.hidden_size % self.num_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
             f"({self.num_heads}) when head_dim is not given")
    else:
      _check(self.head_dim > 0, f"head_dim must be > 0, got {self.head_dim}")
    _check(self.resolved_head_dim % 2 == 0,
           f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")
    _check(self.dtype in DTYPES, f"dtype={self.dtype!r}; choose one of {tuple(DTYPES)}")
    _check(self.param_dtype in DTYPES,
           f"param_dtype={self.param_dtype!r}; choose one of {tuple(DTYPES)}")
    _check(self.remat in REMAT_POLICIES,
           f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    _check(self.attention_impl in ATTENTION_IMPLS,
           f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}")
    _check(self.decode_matmul in DECODE_MATMULS,
           f"decode_matmul={self.decode_matmul!r}; choose one of {DECODE_MATMULS}")
    _check(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
    _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if isinstance(self.lora, dict):
      object.__setattr__(self, "lora", LoraConfig(**self.lora))
    if self.lora is not None and not self.lora.enabled:
      object.__setattr__(self, "lora", None)  # rank 0: no adapters

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weights_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings included, counted once when tied)."""
    d, h, f = self.hidden_size, self.resolved_head_dim, self.intermediate_size
    n, k = self.num_heads, self.num_kv_heads
    attn = d * n * h + 2 * d * k * h + n * h * d
    if self.qkv_bias:
      attn += (n + 2 * k) * h
    if self.qk_norm:
      attn += 2 * h
    per_layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d
