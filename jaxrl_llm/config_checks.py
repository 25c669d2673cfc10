"""Checks shared by the config dataclasses and the loaders of secondary models.

`require_finite` is what every config dataclass with float fields runs from
its ``__post_init__``: `config.from_dict` already refuses a non-finite number
read from a config file, and this catches the same value when the dataclass is
built directly in Python (``RLConfig(temperature=float("inf"))``).

`check_secondary_model_lengths` and `require_positions` refuse a secondary
model (distillation teacher, HF critic, reward model) whose
``max_position_embeddings`` is below the sequences it will score: RoPE was
trained on positions below it, and the decoder would run past it without a
word.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


def _nonfinite(value: Any, name: str, allow_inf: bool) -> list[tuple[str, float]]:
  """(dotted name, value) of every float in `value` (a number or nested tuples/lists) that is
  NaN, or ±inf unless `allow_inf`."""
  if isinstance(value, bool):
    return []
  if isinstance(value, float):
    bad = math.isnan(value) or (math.isinf(value) and not allow_inf)
    return [(name, value)] if bad else []
  if isinstance(value, (tuple, list)):
    return [hit for i, v in enumerate(value) for hit in _nonfinite(v, f"{name}[{i}]", allow_inf)]
  return []


def require_finite(config: Any, section: str, allow_inf: Iterable[str] = ()) -> None:
  """Refuses NaN or ±inf in the float fields of dataclass `config` (and in the tuples of
  its fields, e.g. (name, weight) pairs); nested dataclasses check themselves.

  Args:
    config: a dataclass instance.
    section: its dotted place in the experiment config (e.g. "rl"), for the message.
    allow_inf: names of the fields where ±inf is a meaningful setting (NaN is still refused).

  Raises:
    ValueError: naming the first offending field and its value.
  """
  allowed = frozenset(allow_inf)
  names = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(allowed - names)
  if unknown:  # a renamed field must not silently lose its exemption
    raise ValueError(f"require_finite({type(config).__name__}): allow_inf names {unknown}, "
                     f"which are not fields; valid fields: {sorted(names)}")
  for f in dataclasses.fields(config):
    hits = _nonfinite(getattr(config, f.name), f"{section}.{f.name}", f.name in allowed)
    if hits:
      name, value = hits[0]
      also = "NaN" if f.name in allowed else "NaN or inf"
      raise ValueError(f"{name}={value!r} must be a finite number ({also} is never a valid "
                       "setting): set it to a finite value")


def require_positions(length: int, max_positions: int, model: str, fix: str = "") -> None:
  """Refuses sequences of `length` tokens for a model of `max_positions` positions.

  `model` names the model (e.g. "the distillation teacher 'path'"); `fix`, when given,
  replaces the default advice.
  """
  if length > max_positions:
    raise ValueError(
        f"{model} is given sequences of {length} tokens, more than its "
        f"max_position_embeddings={max_positions}: "
        + (fix or "shorten the prompts and generations (data.max_prompt_len, the "
           "max_new_tokens of the run), or use a model with a longer context"))


def scored_sequence_config(cfg: Any) -> Any:
  """`cfg` without the sequences only the trained model sees: the held-out evaluation
  (eval.num_examples) and the SFT warm-start stage (trainer.sft_warmstart.num_steps).

  `config.sequence_budgets` of the result lists what a secondary model (teacher, critic,
  reward model) scores: the rollouts or training rows of the run's kind.
  """
  trainer = cfg.trainer
  return dataclasses.replace(
      cfg, eval=dataclasses.replace(cfg.eval, num_examples=0),
      trainer=dataclasses.replace(
          trainer, sft_warmstart=dataclasses.replace(trainer.sft_warmstart, num_steps=0)))


def check_secondary_model_lengths(cfg: Any, max_positions: int, model: str) -> None:
  """`config.check_sequence_lengths` for a secondary model of run `cfg`
  (an `ExperimentConfig`): refuses it when a sequence it scores is longer than its
  `max_positions`, naming the run's setting, both numbers and `model`."""
  from jaxrl_llm import config as config_lib
  config_lib.check_sequence_lengths(scored_sequence_config(cfg), max_positions, model)
