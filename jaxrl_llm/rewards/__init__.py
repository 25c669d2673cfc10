"""Rewards: the in-graph protocol, token-level verifiers, shaping, and host rewards.

`base`, `verifiers` and `shaping` are pure jnp; `answers` (final answers of
GSM8K / MATH text) is pure Python. `host` (Python rewards, math answer
checking, `math_reward`) is imported on first access, `jaxrl_llm.rewards.host`,
so importing this package stays light.
"""

import importlib

from jaxrl_llm.rewards import answers, base, shaping, verifiers
from jaxrl_llm.rewards.base import RewardInputs, compose

__all__ = ["RewardInputs", "answers", "base", "compose", "host", "math_reward", "shaping",
           "verifiers"]


def __getattr__(name):
  if name == "host":
    return importlib.import_module("jaxrl_llm.rewards.host")
  if name == "math_reward":
    return importlib.import_module("jaxrl_llm.rewards.host").math_reward
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
