"""Environments for multi-turn rollouts: the reset/step protocol, in-graph
environments over token arrays, host environments with time limits, and tools.

See `jaxrl_llm.envs.base` for the protocol, `jaxrl_llm.envs.tools` for the
host tools and tool-call parsing, and `jaxrl_llm.rl.multiturn` for the
rollout that drives them.
"""

from jaxrl_llm.envs.base import (
                                 EnvStep,
                                 HostEnv,
                                 HostEnvAdapter,
                                 InGraphEnv,
                                 StepResult,
                                 TimeLimitExceeded,
                                 call_with_time_limit,
)
from jaxrl_llm.envs.calculator import CalculatorEnv, make_env
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.envs.tools import (
                                  Calculator,
                                  PythonTool,
                                  Retriever,
                                  ToolCall,
                                  ToolCallError,
                                  ToolEnv,
                                  format_tool_call,
                                  make_tool_env,
                                  parse_tool_calls,
)

__all__ = ["Calculator", "CalculatorEnv", "EnvStep", "HostEnv", "HostEnvAdapter", "InGraphEnv",
           "MultiTurnConfig", "PythonTool", "Retriever", "StepResult", "TimeLimitExceeded",
           "ToolCall", "ToolCallError", "ToolEnv", "call_with_time_limit", "format_tool_call",
           "make_env", "make_tool_env", "parse_tool_calls"]
