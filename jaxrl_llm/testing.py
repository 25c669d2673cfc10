"""Tiny models and helpers shared by tests, notebooks and docs."""

from __future__ import annotations

import jax

from jaxrl_llm.models.config import ModelConfig


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
  """A 2-layer model small enough for unit tests on CPU (vocab 128)."""
  base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=64, family=family, rope_theta=10000.0)
  if family == "qwen2":
    base["qkv_bias"] = True
  if family == "qwen3":
    base.update(qk_norm=True, head_dim=16)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_params(cfg: ModelConfig, seed: int = 0):
  from jaxrl_llm.models import init_params
  return init_params(cfg, jax.random.key(seed))
