"""Rewards: the in-graph protocol, token-level verifiers, shaping, and host rewards.

`base`, `verifiers` and `shaping` are pure jnp. `host` (Python rewards, math
answer checking) is imported on first access, `jaxrl_llm.rewards.host`, so
importing this package stays light.
"""

import importlib

from jaxrl_llm.rewards import base, shaping, verifiers
from jaxrl_llm.rewards.base import RewardInputs, compose

__all__ = ["RewardInputs", "base", "compose", "host", "shaping", "verifiers"]


def __getattr__(name):
  if name == "host":
    return importlib.import_module("jaxrl_llm.rewards.host")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
