"""`MultiTurnConfig`: the `rl.multiturn` section of an experiment config.

With `enabled=True` the RL step's rollout is multi-turn (`jaxrl_llm.rl.multiturn`):
up to `max_turns` model turns of at most `turn_tokens` tokens each, with the
environment's observation (at most `obs_len` tokens) appended to the KV cache
after every turn but the last. The reward of a trajectory is

  reward_B = outcome_weight · reward_fn(final model turn) + turn_reward_weight · Σ_t r_t

with r_t the environment's reward for turn t. Only model tokens enter the loss.

Environments (`env`):

  calculator  in-graph (`jaxrl_llm.envs.calculator`): runs in the one-jit step,
              split mode and the asynchronous actor–learner run.
  tool        a host `ToolEnv` per trajectory behind a `HostEnvAdapter`
              (`jaxrl_llm.envs.tools.make_tool_env`): needs trainer.split_mode=True
              and trainer.actor_devices=0. env_options: tools (names from
              `tools.TOOL_NAMES`), corpus (a local file for "retrieval"), obs_len,
              timeout_s, tool_timeout_s, template, max_calls_per_turn,
              done_on_error, error_reward, python_network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ENVS = ("calculator", "tool")
HOST_ENVS = ("tool",)  # Python environments between compiled turns (split mode only)
# Observation tokens per turn of each environment when env_options sets no obs_len.
DEFAULT_OBS_LEN = {"calculator": 10, "tool": 64}


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
  enabled: bool = False
  max_turns: int = 2            # T: model turns per trajectory
  turn_tokens: int = 0          # tokens per model turn; 0: rl.max_new_tokens
  env: str = "calculator"       # one of ENVS (see the module docstring)
  # (key, value) options of the environment, e.g. (("obs_len", 8),)
  env_options: tuple[tuple[str, Any], ...] = ()
  outcome_weight: float = 1.0   # weight of reward.components scored on the final model turn
  turn_reward_weight: float = 1.0  # weight of the environment's summed per-turn rewards
  # A turn ending on EOS ends the trajectory. Set False for chat models whose turns end
  # on the tokenizer's EOS (Qwen / Hermes / ChatML: <|im_end|>), or no observation is
  # ever appended; the environment's done (ToolEnv: a turn without a tool call) or
  # max_turns then ends the trajectory.
  eos_ends: bool = True

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"rl.multiturn.{field}={getattr(self, field)!r}: {msg}")
    if isinstance(self.env_options, dict):
      object.__setattr__(self, "env_options", tuple(sorted(self.env_options.items())))
    object.__setattr__(self, "env_options", tuple(tuple(p) for p in self.env_options))
    check(isinstance(self.enabled, bool), "enabled", "must be a bool")
    check(self.max_turns >= 1, "max_turns", "must be >= 1 (model turns per trajectory)")
    check(self.turn_tokens >= 0, "turn_tokens", "must be >= 0 (0: rl.max_new_tokens per turn)")
    check(self.env in ENVS, "env", f"choose one of {ENVS}")
    check(all(len(p) == 2 and isinstance(p[0], str) for p in self.env_options), "env_options",
          "must be (name, value) pairs, e.g. (('obs_len', 8),)")

  def completion_len(self, max_new_tokens: int) -> int:
    """Completion columns of a trajectory: T turns and T observations (reset + between turns)."""
    obs_len = dict(self.env_options).get("obs_len", 0) or DEFAULT_OBS_LEN[self.env]
    return self.max_turns * ((self.turn_tokens or max_new_tokens) + obs_len)
