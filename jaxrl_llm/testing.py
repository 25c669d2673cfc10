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


def target_token_reward(target: int):
  """A dense toy reward: the fraction of completion tokens equal to `target`.

  Returns ``reward_fn(inputs) -> (frac_B, {"correct": frac_B > 1/2,
  "target_frac": frac_B})`` in the RL step's reward signature; every step
  moves the policy towards emitting `target`, which makes learning visible
  in a few steps of a random tiny model.
  """
  import jax.numpy as jnp

  def reward_fn(inputs):
    m_BL = inputs.completion_mask_BL
    frac_B = (jnp.sum((inputs.completion_BL == target) * m_BL, 1)
              / jnp.maximum(jnp.sum(m_BL, 1), 1))
    return frac_B, {"correct": (frac_B > 0.5).astype(jnp.float32), "target_frac": frac_B}

  return reward_fn


def toy_prompt_batch(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0):
  """Random prompts (ids >= 3) as the RL step's batch dict; row 0 left-padded by 2."""
  import numpy as np

  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, vocab_size, size=(num_prompts, prompt_len)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0
  tokens[0, :2] = 0
  return dict(prompt_tokens=tokens, prompt_mask=mask,
              prompt_id=np.arange(num_prompts, dtype=np.int32))


def random_hf_model(config_class: str, vocab_size: int, seed: int = 0, **config_kwargs):
  """A random float32 `transformers` causal LM (2 layers), norms and biases random too.

  For logit parity tests against CPU torch: norm weights ~ 1 + 0.2·N(0, 1),
  biases ~ 0.2·N(0, 1), every other weight ~ N(0, 0.1²), so that no parameter
  sits at an initial value that could hide a conversion bug.
  """
  import torch
  import transformers

  config = getattr(transformers, config_class)(
      vocab_size=vocab_size, num_hidden_layers=2, rms_norm_eps=1e-6, bos_token_id=None,
      eos_token_id=None, pad_token_id=None, **config_kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
  return model.eval()
