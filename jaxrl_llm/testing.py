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


def tiny_instruct_checkpoint(path, tokenizer_dir, *, family: str = "qwen2", seed: int = 0):
  """A random tiny HF checkpoint with a chat tokenizer: what a user's instruct model looks like.

  Writes `save_hf` weights (vocab = the tokenizer's) and copies the
  tokenizer files of `tokenizer_dir` (tokenizer.json, tokenizer_config.json,
  ...) next to them, so the directory serves as both `model.path` and
  `data.tokenizer`. Returns the path as a string.
  """
  import pathlib
  import shutil

  from jaxrl_llm.models.hf import save_hf
  from jaxrl_llm.tokenizers import load_tokenizer

  tokenizer = load_tokenizer(str(tokenizer_dir))
  cfg = tiny_config(family, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
  out = save_hf(cfg, tiny_params(cfg, seed), path)
  for file in sorted(pathlib.Path(tokenizer_dir).iterdir()):
    if file.is_file():
      shutil.copy(file, pathlib.Path(out) / file.name)
  return str(out)
