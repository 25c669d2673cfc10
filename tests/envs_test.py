"""Host environments and tools: time limits, errors as observations, tool-call
parsing, the calculator / Python / retrieval tools, and a host environment
between compiled turns (split mode)."""
import time

import jax
import numpy as np
import pytest

from jaxrl_llm import optim, sharding, testing
from jaxrl_llm.envs import (
  Calculator,
  CalculatorEnv,
  HostEnvAdapter,
  PythonTool,
  Retriever,
  StepResult,
  TimeLimitExceeded,
  ToolCall,
  ToolCallError,
  ToolEnv,
  call_with_time_limit,
  format_tool_call,
  parse_tool_calls,
  tools,
)
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import multiturn as mt
from jaxrl_llm.tokenizers import load_tokenizer
from jaxrl_llm.train_state import create_train_state

TOK = load_tokenizer("builtin")


# ---------------------------------------------------------------------------
# Tool-call parsing.
# ---------------------------------------------------------------------------
def test_parse_tool_calls_json_in_tags():
  text = ("think <tool_call>" '{"name": "calculator", "arguments": {"expression": "2+3"}}'
          "</tool_call> and <tool_call>"
          '{"name": "search", "arguments": "{\\"query\\": \\"jax\\"}"}</tool_call>')
  assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "2+3"}),
                                    ToolCall("search", {"query": "jax"})]
  assert parse_tool_calls(format_tool_call("python", {"code": "print(1)"})) == [
      ToolCall("python", {"code": "print(1)"})]
  assert parse_tool_calls("no call here") == []


@pytest.mark.parametrize("body,needle", [
    ("{not json}", "not valid JSON"),
    ('{"arguments": {}}', '"name"'),
    ('{"name": "calculator", "arguments": [1]}', "JSON object"),
    ('{"name": "calculator", "arguments": "{oops"}', "not JSON"),
])
def test_malformed_tool_calls_are_errors(body, needle):
  (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
  assert isinstance(call, ToolCallError) and needle in call.message
  (call,) = parse_tool_calls('<tool_call>{"name": "x"}')
  assert isinstance(call, ToolCallError) and "unclosed" in call.message


# ---------------------------------------------------------------------------
# Tools.
# ---------------------------------------------------------------------------
def test_calculator_tool_is_safe_arithmetic():
  calc = Calculator()
  assert calc("345*67") == "23115"
  assert calc("(2+3)*-4") == "-20"
  assert calc("7/2") == "3.5" and calc("2**10") == "1024"
  for bad, msg in [("__import__('os').system('x')", "not allowed"), ("a+1", "not allowed"),
                   ("1/0", "division by zero"), ("9**9**9", "exponent"),
                   ("1" * 300, "longer than"), ("2+", "not an arithmetic")]:
    with pytest.raises(ValueError, match=msg):
      calc(bad)


def test_python_tool_limits():
  tool = PythonTool(timeout_s=20, cpu_s=1, memory_mb=256)
  assert tool("import math\nprint(math.factorial(10))") == "3628800\n"
  with pytest.raises(RuntimeError, match="CPU time limit"):  # RLIMIT_CPU
    tool("while True: pass")
  with pytest.raises(TimeLimitExceeded):  # the wall clock, e.g. a blocked child
    PythonTool(timeout_s=0.5, cpu_s=30)("while True: pass")
  with pytest.raises(RuntimeError, match="open"):
    tool("open('x', 'w')")
  with pytest.raises(RuntimeError, match="not allowed"):
    tool("import socket")
  # Even with the builtins escaped, the OS refuses file writes (RLIMIT_FSIZE = 0).
  with pytest.raises(RuntimeError, match="File too large"):
    tool("f = print.__self__.open('x', 'w'); f.write('abc'); f.close()")
  with pytest.raises(RuntimeError, match="MemoryError"):
    tool("x = bytearray(1 << 30)")


def test_python_tool_has_no_network():
  import socket
  import threading
  if tools.network_isolation_error() is not None:
    pytest.skip(f"no network namespaces here: {tools.network_isolation_error()}")
  server = socket.create_server(("127.0.0.1", 0))
  port = server.getsockname()[1]
  threading.Thread(target=lambda: server.accept(), daemon=True).start()
  escape = ("s = print.__self__.__import__('socket'); "
            f"c = s.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')")
  assert PythonTool(timeout_s=20, network="unisolated")(escape) == "connected\n"  # reachable
  with pytest.raises(RuntimeError, match="unreachable|refused"):
    PythonTool(timeout_s=20)(escape)  # the same escape, inside an empty network namespace
  server.close()
  with pytest.raises(ValueError, match="network"):
    PythonTool(network="on")


def test_python_tool_refuses_to_start_without_isolation(monkeypatch):
  monkeypatch.setitem(tools._ISOLATION, "error", "OSError: unshare(CLONE_NEWNET) failed")
  with pytest.raises(RuntimeError, match="network='unisolated'"):
    PythonTool()
  assert PythonTool(network="unisolated")("print(1)") == "1\n"


def test_retriever_bm25_ranks_matching_documents():
  docs = ["the cat sat on the mat", "dogs chase cats", "jax is a numerical library",
          "the mat is red"]
  r = Retriever(docs, top_k=2)
  assert r.search("red mat") == [3, 0]
  assert r.search("library jax")[0] == 2
  assert r("zebra") == "no results"
  assert r("red mat").startswith("[1] the mat is red")


def test_tool_env_runs_calls_and_turns_errors_into_observations():
  def slow(x):
    time.sleep(2)
    return x

  env = ToolEnv({"calculator": lambda expression: Calculator()(expression), "slow": slow},
                score=lambda ex, text: float(text.strip() == ex["answer"]), timeout_s=0.5)
  assert env.reset({"answer": "5"}) == ""
  res = env.step(format_tool_call("calculator", {"expression": "2+3"}))
  assert res == StepResult("5", 0.0, False, {"tool_calls": 1.0, "tool_errors": 0.0})
  res = env.step("<tool_call>{bad</tool_call>" + format_tool_call("nope", {})
                 + format_tool_call("calculator", {"x": 1})
                 + format_tool_call("slow", {"x": "1"}))
  lines = res.observation.splitlines()
  assert "not valid JSON" in lines[0] and "unknown tool" in lines[1]
  assert "bad arguments" in lines[2] and "longer than" in lines[3]
  assert res.info["tool_errors"] == 4.0 and not res.done
  assert env.step("5") == StepResult("", 1.0, True, {"tool_calls": 0.0, "tool_errors": 0.0})


def test_call_with_time_limit():
  assert call_with_time_limit(lambda a: a + 1, 1, timeout_s=1.0) == 2
  with pytest.raises(TimeLimitExceeded):
    call_with_time_limit(time.sleep, 1.0, timeout_s=0.1)
  with pytest.raises(ZeroDivisionError):
    call_with_time_limit(lambda: 1 / 0, timeout_s=1.0)


# ---------------------------------------------------------------------------
# The host adapter.
# ---------------------------------------------------------------------------
class EchoEnv:
  """Observation: "ab" after each turn; crashes on rows whose example says so."""

  def reset(self, example):
    self.example = example
    return "c"

  def step(self, text):
    if self.example.get("crash"):
      raise RuntimeError("boom")
    if self.example.get("hang"):
      time.sleep(5)
    return StepResult("ab", float(len(text)), False, {})


def adapter(examples, obs_len=4, timeout_s=0.5):
  return HostEnvAdapter(EchoEnv, TOK, examples, obs_len=obs_len, timeout_s=timeout_s)


def test_host_adapter_time_limits_and_errors_become_observations():
  ad = adapter([{}, {"crash": True}, {"hang": True}], obs_len=8)
  _, obs, n = ad.reset({"prompt_id": np.arange(3)})
  np.testing.assert_array_equal(n, [1, 1, 1])
  toks = np.asarray([TOK.encode("12") + [0]] * 3, np.int32)
  mask = (toks > 0).astype(np.float32)
  _, es = ad.step((), toks, mask, np.zeros(3, bool), np.ones(3, bool), {})
  texts = [TOK.decode(es.obs_tokens_BO[i, :es.obs_len_B[i]]) for i in range(3)]
  assert texts[0] == "ab" and es.reward_B[0] == 2.0
  assert texts[1].startswith("error") and texts[2].startswith("error")
  np.testing.assert_array_equal(es.info["env_errors"], [0, 1, 1])
  np.testing.assert_array_equal(es.info["env_timeouts"], [0, 0, 1])
  # Observations longer than obs_len are cut and counted.
  np.testing.assert_array_equal(es.info["obs_truncated"], [0, 1, 1])
  assert not es.done_B.any()


def test_host_env_between_compiled_turns_trains_only_model_tokens():
  cfg = testing.tiny_config("qwen3", vocab_size=TOK.vocab_size, hidden_size=32,
                            intermediate_size=64)
  rl = rl_config.from_preset("grpo", group_size=2, max_new_tokens=3, kl_coef=0.0, tis_cap=2.0,
                             multiturn=MultiTurnConfig(enabled=True, max_turns=2))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh)
  step = mt.MultiTurnRLStep(cfg, rl, tx, None, TOK.eos_id, mesh=mesh, env=CalculatorEnv(TOK))
  examples = [{}, {"crash": True}]
  host = adapter(examples, obs_len=4)
  run = mt.make_multiturn_split_step(step, env=host)
  prompts = np.asarray([TOK.encode("12+3="), TOK.encode("45-6=")], np.int32)
  batch = dict(prompt_tokens=prompts, prompt_mask=np.ones_like(prompts),
               prompt_id=np.arange(2, dtype=np.int32))
  rows = {k: np.repeat(v, 2, 0) for k, v in batch.items()}
  ro = jax.device_get(run.rollout(state.params, prompts, batch["prompt_mask"],
                                  jax.random.key(1), rows))
  c, obs = ro["completion"], ro["obs_mask"]
  turns = ro["turns"]
  # Reset "c", then "ab" before a second turn; a crash gives an error observation.
  assert TOK.decode(c[0][obs[0] > 0]) == "c" + ("ab" if turns[0] == 2 else "")
  assert TOK.decode(c[2][obs[2] > 0]) == "c" + ("erro" if turns[2] == 2 else "")
  np.testing.assert_array_equal(ro["env_env_errors"], [0, 0, turns[2], turns[3]])
  # The per-turn rewards are the decoded model turns' lengths (EchoEnv).
  assert ro["turn_rewards"][0, 0] == len(TOK.decode(
      [t for t in c[0][ro["model_mask"][0] > 0][:3] if t != TOK.eos_id]))
  new, m = run(state, batch, jax.random.key(1))
  assert np.isfinite(float(m["loss/policy"])) and "multiturn/env_errors" in m
