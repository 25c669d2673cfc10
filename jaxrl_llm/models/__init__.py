"""Decoder models (Llama / Qwen2 / Qwen3 family) and Hugging Face interop."""

from jaxrl_llm.models.config import ModelConfig, RopeScaling
from jaxrl_llm.models.decoder import (
    forward,
    forward_with_cache,
    hidden_states,
    init_cache,
    init_params,
    param_logical_axes,
    param_shapes,
    param_table,
    token_logprobs,
    unembed,
)

__all__ = [
    "ModelConfig", "RopeScaling", "forward", "forward_with_cache", "hidden_states",
    "init_cache", "init_params", "param_logical_axes", "param_shapes", "param_table",
    "token_logprobs", "unembed", "load_hf", "save_hf",
]


def load_hf(*args, **kwargs):
  """See `jaxrl_llm.models.hf.load_hf` (imported lazily: safetensors I/O)."""
  from jaxrl_llm.models import hf
  return hf.load_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
  """See `jaxrl_llm.models.hf.save_hf`."""
  from jaxrl_llm.models import hf
  return hf.save_hf(*args, **kwargs)
