"""Host environments and tools: time limits, errors as observations, tool-call
parsing, the calculator / Python / retrieval tools, observation templates with a
chat tokenizer, a host environment between compiled turns (split mode), TIS over
trajectories, ToolEnv inside the RL step and the "tool" environment from a config."""
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing, trainer
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
from jaxrl_llm.envs.base import OBSERVATION_TEMPLATES
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import multiturn as mt
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.tokenizers import load_tokenizer
from jaxrl_llm.train_state import create_train_state

TOK = load_tokenizer("builtin")
CHAT_DIR = pathlib.Path(__file__).parent / "fixtures" / "tiny_chat_tokenizer"


@pytest.fixture(scope="module")
def chat_tok():
  """The tiny Qwen-style chat tokenizer (EOS = <|im_end|>), as tests/tokenizers_test.py."""
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  return load_tokenizer(CHAT_DIR)


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


def nano_step(tok, env, *, logits_processor=None, **rl_kw):
  """A multi-turn GRPO step of the nano-sized model over `tok`'s vocabulary; rl_kw
  override the RL config (multiturn: two turns)."""
  cfg = testing.tiny_config("llama", vocab_size=tok.vocab_size)  # the "nano" model
  kw = dict(group_size=2, max_new_tokens=3, kl_coef=0.0,
            multiturn=MultiTurnConfig(enabled=True, max_turns=2))
  kw.update(rl_kw)
  rl = rl_config.from_preset("grpo", **kw)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2))
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, _ = create_train_state(cfg, tx, jax.random.key(0), mesh)
  step = mt.MultiTurnRLStep(cfg, rl, tx, None, tok.eos_id, pad_id=tok.pad_id, mesh=mesh,
                            env=env, logits_processor=logits_processor)
  return step, state


def prompt_batch(tok, texts):
  ids = [tok.encode(t) for t in texts]
  P = max(map(len, ids))
  toks = np.full((len(ids), P), tok.pad_id, np.int32)
  mask = np.zeros((len(ids), P), np.int32)
  for i, x in enumerate(ids):  # left-padded
    toks[i, P - len(x):], mask[i, P - len(x):] = x, 1
  return dict(prompt_tokens=toks, prompt_mask=mask, prompt_id=np.arange(len(ids), dtype=np.int32))


def split_rollout(run, state, batch, G, key=1):
  rows = {k: np.repeat(v, G, 0) for k, v in batch.items()}
  out = run.rollout(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                    jax.random.key(key), rows)
  return dict(rows, **jax.device_get(out))


def test_host_env_between_compiled_turns_trains_only_model_tokens():
  step, state = nano_step(TOK, CalculatorEnv(TOK), tis_cap=2.0)
  examples = [{}, {"crash": True}]
  host = adapter(examples, obs_len=4)
  run = mt.make_multiturn_split_step(step, env=host)
  batch = prompt_batch(TOK, ["12+3=", "45-6="])
  ro = split_rollout(run, state, batch, 2)
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


# ---------------------------------------------------------------------------
# Truncated importance sampling over trajectories.
# ---------------------------------------------------------------------------
def loss_and_grads(step):
  """(params, mb) -> loss = Σtotal / Σdenom of one micro-batch (`RLStep.loss`) and its
  gradient, jitted."""
  def fn(params, mb):
    total, (denom, _) = step.loss(params, mb)
    return total / denom
  return jax.jit(jax.value_and_grad(fn))


def test_tis_weights_the_loss_on_model_tokens_only():
  """w_t = min(exp(logp_old − logp_sampler), C) multiplies the loss of model tokens;
  observation tokens (no sampler log-prob) are outside the loss whatever w is there."""
  cap = 2.0
  step, state = nano_step(TOK, CalculatorEnv(TOK), tis_cap=cap)
  run = mt.make_multiturn_split_step(step, env=adapter([{}, {}], obs_len=4))
  ro = split_rollout(run, state, prompt_batch(TOK, ["12+3=", "45-6="]), 2)
  rewards, comps, _ = step.score(ro)
  rows, *_ = step.prepare(state, ro, rewards, comps, None)
  model, obs = np.asarray(ro["model_mask"]), np.asarray(ro["obs_mask"])
  assert obs.sum() > 0 and model.sum() > 0
  np.testing.assert_array_equal(rows["loss_mask"], model)
  rng = np.random.RandomState(0)
  mb = {k: np.asarray(rows[k]) for k in rls.TRAIN_KEYS if k in rows}
  mb["adv"] = rng.normal(size=model.shape).astype(np.float32)  # nonzero on every column
  logp, _ = jax.device_get(jax.jit(step.completion_logprobs)(state.params, mb))
  # The sampler's log-probs are the training policy's on model tokens (0 on observations).
  np.testing.assert_allclose(mb["sampler_logp"], logp * model, atol=2e-5)

  # Behaviour log-probs off by ±1.5 nats: some weights capped, some below 1.
  delta = rng.uniform(-1.5, 1.5, size=model.shape).astype(np.float32)
  sampler = (mb["sampler_logp"] + delta) * model
  w = np.minimum(np.exp(logp - sampler), cap) * model
  assert (w[model > 0] == cap).any() and (w[model > 0] < 0.5).any()
  tis_loss = loss_and_grads(step)
  # The uncorrected loss: sampler log-probs equal to the training ones give w = 1 exactly.
  plain_loss = lambda params, mb_: tis_loss(params, dict(mb_, sampler_logp=logp))
  loss, grads = tis_loss(state.params, dict(mb, sampler_logp=sampler))
  # The same as the uncorrected loss with each token's advantage scaled by w_t.
  want, want_grads = plain_loss(state.params, dict(mb, adv=mb["adv"] * w))
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads, want_grads)
  unweighted, _ = plain_loss(state.params, mb)
  assert abs(float(loss) - float(unweighted)) > 1e-3  # the weights matter
  # Observation tokens: any sampler log-prob and advantage there leaves loss and gradient.
  noisy = dict(mb, sampler_logp=sampler + 7.0 * obs, adv=mb["adv"] + 50.0 * obs)
  loss_obs, grads_obs = tis_loss(state.params, noisy)
  assert float(loss_obs) == float(loss)
  jax.tree.map(np.testing.assert_array_equal, grads_obs, grads)
  # On-policy data (the sampler's own log-probs): w = 1 on model tokens, the plain loss,
  # although w = min(exp(logp), C) != 1 on the observation tokens.
  on_policy, _ = tis_loss(state.params, mb)
  np.testing.assert_allclose(on_policy, unweighted, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Chat observation templates (Qwen / ChatML) with a chat tokenizer.
# ---------------------------------------------------------------------------
class ConstEnv:
  """Observation "5" after every turn; never done."""

  def reset(self, example):
    return ""

  def step(self, text):
    return StepResult("5", 0.0, False, {})


@pytest.mark.parametrize("name,role,content", [
    ("qwen", "user", "<tool_response>\n5\n</tool_response>"),
    ("chatml", "tool", "5")])
def test_observation_templates_are_the_chat_templates_tool_message(chat_tok, name, role,
                                                                   content):
  """After an assistant turn ending on <|im_end|>, the observation is the chat template's
  rendering of the tool result message, then the next assistant header."""
  ad = HostEnvAdapter(ConstEnv, chat_tok, [{}], obs_len=64, template=name)
  obs, n, _ = ad._encode(["5"])
  ids = obs[0, :n[0]].tolist()
  assert ids == chat_tok.encode(OBSERVATION_TEMPLATES[name].format(observation="5"))
  messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "call"}]
  before = chat_tok.apply_chat_template(messages, add_generation_prompt=False)
  after = chat_tok.apply_chat_template(messages + [{"role": role, "content": content}])
  assert before.endswith("call<|im_end|>\n")
  # The turn ends on <|im_end|> (sampled, a model token); the template adds the rest.
  assert before[:-1] + OBSERVATION_TEMPLATES[name].format(observation="5") == after
  im_start, im_end = chat_tok.token_to_id("<|im_start|>"), chat_tok.token_to_id("<|im_end|>")
  assert ids.count(im_start) == 2 and ids.count(im_end) == 1
  assert chat_tok.decode(ids[ids.index(im_start) + 1:]).startswith(role + "\n")


def test_chat_rollout_is_append_only_and_needs_eos_ends_false(chat_tok):
  """With the chat tokenizer and the qwen template: the trained tokens are the sampled
  ones, the observations the template's ids; a turn ending on <|im_end|> (the EOS)
  ends the trajectory unless rl.multiturn.eos_ends=False."""
  eos = chat_tok.eos_id
  host = HostEnvAdapter(ConstEnv, chat_tok, [{}, {}], obs_len=48, template="qwen")
  obs_ids = chat_tok.encode(OBSERVATION_TEMPLATES["qwen"].format(observation="5"))
  batch = prompt_batch(chat_tok, [chat_tok.apply_chat_template([{"role": "user", "content": c}])
                                  for c in ("2+3?", "7*6?")])
  mtc = MultiTurnConfig(enabled=True, max_turns=3, eos_ends=False)
  # Sampled turns (they end on EOS or run out of tokens): trained log-probs = sampled ones.
  step, state = nano_step(chat_tok, host, max_new_tokens=4, multiturn=mtc)
  ro = split_rollout(mt.make_multiturn_split_step(step), state, batch, 2)
  model, obs = ro["model_mask"], ro["obs_mask"]
  assert np.all(ro["turns"] == 3)
  for b in range(4):
    np.testing.assert_array_equal(ro["completion"][b][obs[b] > 0], obs_ids * 2)
  logp, _ = jax.jit(step.completion_logprobs)(state.params, ro)
  np.testing.assert_allclose(np.asarray(logp) * model, ro["sampler_logp"], atol=2e-5)

  # Turns forced to "Hi<|im_end|>": the conversation is the chat template's rendering.
  hi = chat_tok.encode("Hi")

  def force(logits_BV, ctx):
    target = jnp.asarray(hi + [eos])[jnp.minimum(ctx.step, len(hi))]
    return jnp.where(jnp.arange(logits_BV.shape[-1])[None] == target, 0.0,
                     jnp.full_like(logits_BV, -1e9))

  step, state = nano_step(chat_tok, host, max_new_tokens=4, multiturn=mtc,
                          logits_processor=force)
  ro = split_rollout(mt.make_multiturn_split_step(step), state, batch, 2)
  assert np.all(ro["turns"] == 3) and not ro["finished"].any()
  messages = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "Hi"}]
  messages += [{"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
               {"role": "assistant", "content": "Hi"}] * 2
  text = chat_tok.apply_chat_template(messages, add_generation_prompt=False)[:-1]
  ids = np.concatenate([ro["prompt_tokens"][0][ro["prompt_mask"][0] > 0],
                        ro["completion"][0][ro["completion_mask"][0] > 0]]).tolist()
  assert ids == chat_tok.encode(text)
  # With eos_ends=True the same "Hi<|im_end|>" turn ends the trajectory: nothing appended.
  turn = np.asarray([hi + [eos]], np.int32)
  for eos_ends, active in ((False, True), (True, False)):
    sp = dataclasses.replace(step.turn_spec(), eos_ends=eos_ends)
    st = mt.TurnState(*[None] * len(mt.TurnState._fields))._replace(  # what STEP reads
        active_B=jnp.ones((1,), bool), final_BL=jnp.zeros_like(turn),
        final_mask_BL=jnp.zeros(turn.shape), finished_B=jnp.zeros((1,), bool),
        turns_B=jnp.zeros((1,), jnp.int32), turn_rewards_BT=jnp.zeros((1, 3)), info={})
    st = mt.record_step(st, 0, turn, np.ones(turn.shape, np.float32), np.ones(1, bool),
                        np.zeros(1), np.zeros(1, bool), {}, sp)
    assert bool(st.active_B[0]) == active and bool(st.finished_B[0]) == eos_ends


# ---------------------------------------------------------------------------
# ToolEnv inside the split-mode RL step.
# ---------------------------------------------------------------------------
def scripted_turns(tok, texts, width):
  """A logits processor that makes row b's every turn the tokens of texts[b] + EOS."""
  ids = [tok.encode(t) + [tok.eos_id] for t in texts]
  assert max(map(len, ids)) <= width, max(map(len, ids))
  table = np.full((len(ids), width), tok.eos_id, np.int32)
  for b, x in enumerate(ids):
    table[b, :len(x)] = x
  table = jnp.asarray(table)

  def process(logits_BV, ctx):
    target_B = table[ctx.row_B, jnp.minimum(ctx.step, width - 1)]
    return jnp.where(jnp.arange(logits_BV.shape[-1])[None] == target_B[:, None], 0.0, -1e9)
  return process


def test_tool_env_in_the_rl_step_masks_and_counts_errors(chat_tok):
  """ToolEnv behind HostEnvAdapter in make_multiturn_split_step on the nano model: a
  calculator call, a malformed call, a tool past ToolEnv's time limit, and a turn whose
  tool calls together pass the adapter's limit. Error observations are appended,
  counted, and outside the loss."""
  def z():
    time.sleep(3)
    return "late"

  tools_ = {"calculator": Calculator(), "z": z}
  host = HostEnvAdapter(lambda: ToolEnv(tools_, timeout_s=0.4), chat_tok, [{}, {}],
                        obs_len=64, timeout_s=0.7, template="qwen", error_reward=-1.0,
                        info_keys=("tool_calls", "tool_errors"))
  slow = '<tool_call>{"name":"z"}</tool_call>'
  texts = ["<tool_call>{bad</tool_call>",                                 # malformed
           '<tool_call>{"name":"calculator","arguments":{"expression":"2+3"}}</tool_call>',
           slow,                            # one call past ToolEnv's 0.4 s: a ToolEnv error
           slow * 2]                        # 2 x 0.4 s > 0.7 s: past the adapter's limit
  width = 72
  step, state = nano_step(chat_tok, host, max_new_tokens=width,
                          logits_processor=scripted_turns(chat_tok, texts, width),
                          multiturn=MultiTurnConfig(enabled=True, max_turns=2, eos_ends=False))
  run = mt.make_multiturn_split_step(step)
  batch = prompt_batch(chat_tok, ["2+3?", "7*6?"])  # rows 0, 1: prompt 0; rows 2, 3: prompt 1
  ro = split_rollout(run, state, batch, 2)
  obs_text = [chat_tok.decode(ro["completion"][b][ro["obs_mask"][b] > 0]) for b in range(4)]
  assert "<tool_response>\nerror: the tool call is not valid JSON" in obs_text[0]
  assert "<tool_response>\n5\n</tool_response>" in obs_text[1]
  assert "error: z took longer than 0.4 s" in obs_text[2]
  assert "error: time limit exceeded" in obs_text[3]
  assert np.all(ro["turns"] == 2)
  np.testing.assert_array_equal(ro["env_env_errors"], [0, 0, 0, 2])
  np.testing.assert_array_equal(ro["env_env_timeouts"], [0, 0, 0, 2])
  np.testing.assert_array_equal(ro["env_tool_errors"], [2, 0, 2, 0])
  np.testing.assert_array_equal(ro["env_tool_calls"], [2, 2, 2, 0])
  # The loss mask is the model mask: every observation token, errors included, is context.
  rewards, comps, _ = step.score(ro)
  rows, *_ = step.prepare(state, ro, rewards, comps, None)
  np.testing.assert_array_equal(rows["loss_mask"], ro["model_mask"])
  assert np.all(np.asarray(rows["loss_mask"])[ro["obs_mask"] > 0] == 0)
  # The step itself: trained, with the counts as metrics (means over rows).
  before = jax.device_get(state.params)
  new, m = run(state, batch, jax.random.key(1))
  assert np.isfinite(float(m["loss/policy"]))
  assert float(m["multiturn/env_errors"]) == 0.5 and float(m["multiturn/env_timeouts"]) == 0.5
  assert float(m["multiturn/tool_errors"]) == 1.0 and float(m["multiturn/tool_calls"]) == 1.5
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(new.params))
  assert any(jax.tree.leaves(changed))


# ---------------------------------------------------------------------------
# rl.multiturn.env = "tool" from a config.
# ---------------------------------------------------------------------------
def test_tool_env_options_build_the_named_tools(tmp_path):
  corpus = tmp_path / "docs.jsonl"
  corpus.write_text('{"text": "jax is a numerical library"}\n{"text": "the mat is red"}\n')
  env = tools.make_tool_env(TOK, [{}], tools="calculator,retrieval", corpus=str(corpus),
                            obs_len=16)
  tool_env = env.make_env()
  assert sorted(tool_env.tools) == ["calculator", "retrieval"]
  assert tool_env.run_call(ToolCall("retrieval", {"query": "red mat"})) == (
      "[1] the mat is red", False)
  assert env.info_keys[:2] == ("tool_calls", "tool_errors") and env.obs_len == 16
  with pytest.raises(ValueError, match="corpus="):
    tools.build_tools(("retrieval",))
  with pytest.raises(ValueError, match="calculator"):
    tools.build_tools(("shell",))
  with pytest.raises(ValueError, match="text"):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    tools.read_corpus(str(tmp_path / "bad.jsonl"))
  # A host environment cannot be traced into the one-jit step.
  step, state = nano_step(TOK, env)
  with pytest.raises(ValueError, match="trainer.split_mode=True"):
    step.rollout(state.params, prompt_batch(TOK, ["1+2="]), jax.random.key(0), 0)


def test_tool_env_from_a_config_dict_runs_two_steps(chat_tok, tmp_path):
  """rl.multiturn.env="tool" with env_options from the config: every turn is forced to a
  calculator call (rl.forced_prefix), the host ToolEnv runs it between the turns."""
  call = chat_tok.encode('<tool_call>{"name":"calculator","arguments":{"expression":"2+3"}}'
                         '</tool_call>') + [chat_tok.eos_id]
  c = config_lib.default_configdict(kind="rl", rl_preset="grpo")
  config_lib.use_builtin_task(c, "arithmetic", max_digits=1, batch_size=8, num_train=32,
                              num_test=4)
  c.data.tokenizer, c.data.add_bos = str(CHAT_DIR), False
  c.model.builtin = "tiny"  # 256 positions: prompt + 2 x (call + observation)
  c.rl.group_size, c.rl.max_new_tokens, c.rl.kl_coef = 2, len(call), 0.0
  c.rl.forced_prefix = tuple(call)
  c.rl.multiturn.enabled = True
  c.rl.multiturn.max_turns = 2
  c.rl.multiturn.eos_ends = False
  c.rl.multiturn.env = "tool"
  c.rl.multiturn.env_options = (("tools", "calculator"), ("obs_len", 8))
  c.reward.components = (("correct", 1.0),)
  c.eval.num_examples = 0
  c.trainer.split_mode = True
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.checkpoint.async_save = False
  trainer.run(config_lib.from_configdict(c), str(tmp_path))
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  steps = [r for r in rows if "multiturn/tool_calls" in r]
  assert len(steps) == 2
  for r in steps:  # two calls per trajectory, each answered "5" (one observation token)
    assert r["multiturn/tool_calls"] == 2.0 and r["multiturn/tool_errors"] == 0.0
    assert r["multiturn/env_errors"] == 0.0 and r["multiturn/obs_tokens"] == 1.0
    assert r["multiturn/turns"] == 2.0 and np.isfinite(r["loss/policy"])
