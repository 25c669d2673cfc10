"""Shared pieces of the TRL (PyTorch) peer runs: model, tokenizer, step timer.

The model is the same Qwen2.5 architecture as jaxrl_llm's benchmarks, from a
`transformers.Qwen2Config` with random initialisation (nothing is
downloaded). The tokenizer is a word-level tokenizer over the whole
151936-id vocabulary: token i is the word "t<i>", so a text of n
space-separated words is exactly n tokens and random prompts are easy to
make. Ids 0..3 are <pad>, <s>, </s>, <unk>.

No JAX here (it would take the GPU's memory from PyTorch).
"""

from __future__ import annotations

import time

import numpy as np

SIZES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864),
    "smoke": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(vocab_size: int):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
  fast.padding_side = "left"
  return fast


def make_model(size: str, dtype: str):
  import torch
  from transformers import AutoModelForCausalLM, Qwen2Config

  cfg = Qwen2Config(**SIZES[size], tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                    max_position_embeddings=32768, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, use_cache=True)
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype),
                                           attn_implementation="sdpa")
  return model


def save_model(size: str, dtype: str, path: str) -> str:
  """Writes the random model to `path` (TRL builds its reference model from a path)."""
  make_model(size, dtype).save_pretrained(path)
  return path


def random_text(rng: np.random.Generator, n: int, vocab_size: int) -> str:
  return " ".join(f"t{i}" for i in rng.integers(len(SPECIALS), vocab_size, size=n))


def step_timer_callback():
  """A TrainerCallback recording the wall time at the end of each optimizer step."""
  import torch
  from transformers import TrainerCallback

  class StepTimer(TrainerCallback):
    def __init__(self):
      self.marks = []

    def on_train_begin(self, args, state, control, **kw):
      torch.cuda.synchronize() if torch.cuda.is_available() else None
      self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
      torch.cuda.synchronize() if torch.cuda.is_available() else None
      self.marks.append(time.perf_counter())

    def step_times(self):
      return [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]

  return StepTimer()


def torch_info() -> dict:
  import torch
  import transformers
  import trl
  info = {"torch": torch.__version__, "transformers": transformers.__version__,
          "trl": trl.__version__, "cuda": torch.cuda.is_available()}
  if torch.cuda.is_available():
    info["device_kind"] = torch.cuda.get_device_name(0)
    info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
  return info
