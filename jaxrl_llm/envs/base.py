"""The environment protocol of multi-turn rollouts.

A trajectory alternates model turns and observations:

  prompt | model turn 1 | observation 1 | model turn 2 | ... | model turn T

  reset(example) -> observation            the first observation (may be empty)
  step(model turn) -> (observation, reward, done)

Two kinds of environments implement it:

  InGraphEnv     pure JAX over token arrays, all rows at once: reset(task) and
                 step(state, turn tokens, ...) are traced into the rollout, so
                 a whole multi-turn rollout (and the RL step around it) stays
                 one jitted program. Static shapes: an observation is at most
                 `obs_len` tokens (right-padded, `obs_len_B` real ones).
  HostEnv        plain Python, one object per trajectory, reading and writing
                 text: reset(example) -> str, step(assistant_text) ->
                 StepResult. `HostEnvAdapter` drives one per row between the
                 compiled decode turns (split mode): every call runs under a
                 time limit, and an exception or a time-out becomes an error
                 observation (counted in the step's info), never a crashed run.

Observations are tokenised on their own and appended after the model's
tokens (append-only): the model's sampled tokens are never decoded and
re-encoded, so the tokens trained on are exactly the tokens sampled.

Shape letters: B rows, L turn tokens, O observation tokens.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

import numpy as np


class EnvStep(NamedTuple):
  """What an environment returns for one turn of every row."""
  obs_tokens_BO: Any   # int32 [B, O]: the observation, right-padded
  obs_len_B: Any       # int32 [B]: real observation tokens (0: nothing to append)
  reward_B: Any        # float32 [B]: this turn's reward
  done_B: Any          # bool [B]: the trajectory ends after this turn
  info: Mapping[str, Any]  # {name: float32 [B]}: per-row counts/flags, summed over turns


class InGraphEnv(abc.ABC):
  """An environment written as pure JAX functions over token arrays (all rows at once).

  `task` holds the batch's per-row arrays (prompt_tokens, answer_tokens,
  answer_mask, ...), already repeated to B rows. `obs_len` and `info_keys`
  are static. Rows that are already done are still passed (static shapes);
  the rollout ignores what the environment returns for them.
  """
  obs_len: int
  info_keys: tuple[str, ...] = ()

  def reset(self, task: Mapping[str, Any]):
    """(env_state, obs_tokens_BO, obs_len_B): the state and a first observation
    appended after the prompt (obs_len_B = 0 appends nothing)."""
    import jax.numpy as jnp
    B = task["prompt_tokens"].shape[0]
    return (), jnp.zeros((B, self.obs_len), jnp.int32), jnp.zeros((B,), jnp.int32)

  @abc.abstractmethod
  def step(self, state, turn_tokens_BL, turn_mask_BL, stopped_B, active_B,
           task: Mapping[str, Any]):
    """(state, EnvStep) after the model's turn.

    turn_tokens_BL: this turn's model tokens, left-aligned (pad after);
    turn_mask_BL: 1 on them; stopped_B: the turn ended on a stop token
    (False: it ran out of its token budget); active_B: rows whose trajectory
    was still running (the others' outputs are ignored).
    """

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    """Token ids that end a model turn (besides EOS)."""
    return ()


class StepResult(NamedTuple):
  """A host environment's answer to one model turn."""
  observation: str
  reward: float = 0.0
  done: bool = False
  info: Mapping[str, float] = {}


@runtime_checkable
class HostEnv(Protocol):
  """A Python environment for one trajectory."""

  def reset(self, example: Mapping[str, Any]) -> str:
    """The first observation, appended after the prompt ("" for none)."""

  def step(self, assistant_text: str) -> StepResult:
    """The environment's answer to the model's turn (its text, stop token excluded)."""


class TimeLimitExceeded(Exception):
  """A host environment call ran longer than its time limit."""


def call_with_time_limit(fn: Callable[..., Any], *args, timeout_s: float) -> Any:
  """fn(*args) in a daemon thread; TimeLimitExceeded after `timeout_s` seconds.

  The thread of a call that times out is abandoned, not killed (Python
  cannot stop a thread): it keeps running in the background and its result
  is dropped. Code that may hang for good, or must not keep running, belongs
  in a subprocess (see `jaxrl_llm.envs.tools.PythonTool`). Exceptions of fn
  propagate.
  """
  if timeout_s <= 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  box: queue.Queue = queue.Queue(maxsize=1)

  def target():
    try:
      box.put((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - handed to the caller
      box.put((False, e))

  threading.Thread(target=target, daemon=True).start()
  try:
    ok, value = box.get(timeout=timeout_s)
  except queue.Empty:
    raise TimeLimitExceeded(f"{getattr(fn, '__name__', 'call')} took longer than "
                            f"{timeout_s:g} s") from None
  if not ok:
    raise value
  return value


# Observation templates: the text appended after a model turn. "{observation}"
# is replaced by the environment's text. The model turn ends on its stop token
# (e.g. <|im_end|>), so the template opens the next message and then the
# assistant's turn again: "qwen" is Qwen2.5's rendering of a tool message (a user
# turn holding <tool_response>), "chatml" a message of role "tool".
# With these templates <|im_end|> is usually the tokenizer's EOS, and a turn that
# ends on EOS ends the trajectory unless rl.multiturn.eos_ends=False
# (TurnSpec.eos_ends): set it False, or no observation is ever appended.
OBSERVATION_TEMPLATES = {
    "plain": "{observation}",
    "qwen": ("\n<|im_start|>user\n<tool_response>\n{observation}\n</tool_response><|im_end|>\n"
             "<|im_start|>assistant\n"),
    "chatml": "\n<|im_start|>tool\n{observation}<|im_end|>\n<|im_start|>assistant\n",
}


def observation_template(name_or_template: str) -> str:
  """A template by name (`OBSERVATION_TEMPLATES`) or a literal containing "{observation}"."""
  if name_or_template in OBSERVATION_TEMPLATES:
    return OBSERVATION_TEMPLATES[name_or_template]
  if "{observation}" not in name_or_template:
    raise ValueError(f"observation template {name_or_template!r} is neither one of "
                     f"{tuple(OBSERVATION_TEMPLATES)} nor a string containing '{{observation}}'")
  return name_or_template


class HostEnvAdapter:
  """Drives one `HostEnv` per row with the `InGraphEnv` step signature, on numpy arrays.

  Used between compiled decode turns (the split multi-turn rollout). Each
  reset/step call runs under `timeout_s`; an exception or a time-out becomes
  the observation "error: ..." with reward `error_reward` (and ends the
  trajectory when `done_on_error`). Observations longer than `obs_len`
  tokens are cut to it. Each is counted in the step's info: "env_errors",
  "env_timeouts", "obs_truncated", plus the environments' own info keys
  (`info_keys`; a missing one counts 0).

  examples: the dataset's examples, looked up by each row's `prompt_id`.
  """

  def __init__(self, make_env: Callable[[], HostEnv], tokenizer, examples: Sequence[Mapping],
               *, obs_len: int, timeout_s: float = 10.0, template: str = "plain",
               done_on_error: bool = False, error_reward: float = 0.0,
               info_keys: Sequence[str] = (), stop_tokens: Sequence[int] = ()):
    if obs_len < 1:
      raise ValueError(f"obs_len must be >= 1 (observation tokens per turn), got {obs_len}")
    self.make_env = make_env
    self.tokenizer = tokenizer
    self.examples = examples
    self.obs_len = int(obs_len)
    self.timeout_s = float(timeout_s)
    self.template = observation_template(template)
    self.done_on_error = done_on_error
    self.error_reward = float(error_reward)
    self.info_keys = tuple(info_keys) + ("env_errors", "env_timeouts", "obs_truncated")
    self._stop_tokens = tuple(int(t) for t in stop_tokens)
    self.envs: list[Optional[HostEnv]] = []

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    return self._stop_tokens

  def _guarded(self, fn, *args):
    """(value, error text or None, timed out)."""
    try:
      return call_with_time_limit(fn, *args, timeout_s=self.timeout_s), None, False
    except TimeLimitExceeded as e:
      return None, f"error: time limit exceeded ({e})", True
    except Exception as e:  # noqa: BLE001 - an environment bug becomes an observation
      return None, f"error: {type(e).__name__}: {e}", False

  def _encode(self, texts: Sequence[str]):
    B = len(texts)
    obs_BO = np.full((B, self.obs_len), self.tokenizer.pad_id, np.int32)
    len_B = np.zeros((B,), np.int32)
    truncated_B = np.zeros((B,), np.float32)
    for b, text in enumerate(texts):
      if not text:
        continue
      ids = self.tokenizer.encode(self.template.format(observation=text))
      if len(ids) > self.obs_len:
        truncated_B[b] = 1.0
        ids = ids[:self.obs_len]
      obs_BO[b, :len(ids)] = ids
      len_B[b] = len(ids)
    return obs_BO, len_B, truncated_B

  def reset(self, task: Mapping[str, Any]):
    ids = np.asarray(task["prompt_id"]).reshape(-1)
    texts, self.envs = [], []
    self._reset_errors = np.zeros((ids.size,), np.float32)
    for b, i in enumerate(ids):
      env, error, _ = self._guarded(self.make_env)
      text = ""
      if error is None:
        text, error, _ = self._guarded(env.reset, self.examples[int(i)])
      if error is not None:
        self._reset_errors[b] = 1.0
        text = error
      self.envs.append(env)
      texts.append(text or "")
    obs_BO, len_B, _ = self._encode(texts)
    return (), obs_BO, len_B

  def step(self, state, turn_tokens_BL, turn_mask_BL, stopped_B, active_B, task):
    tokens = np.asarray(turn_tokens_BL)
    mask = np.asarray(turn_mask_BL) > 0
    B = tokens.shape[0]
    active = np.asarray(active_B, bool)
    reward_B = np.zeros((B,), np.float32)
    done_B = np.zeros((B,), bool)
    info = {k: np.zeros((B,), np.float32) for k in self.info_keys}
    if getattr(self, "_reset_errors", None) is not None:
      info["env_errors"] += self._reset_errors
      self._reset_errors = None
    texts = [""] * B
    stop = set(self._stop_tokens) | {self.tokenizer.eos_id}
    for b in range(B):
      if not active[b]:
        continue
      ids = [int(t) for t in tokens[b][mask[b]]]
      if ids and ids[-1] in stop:
        ids = ids[:-1]
      env = self.envs[b]
      result, error, timed_out = (None, "error: the environment failed to start", False) \
          if env is None else self._guarded(env.step, self.tokenizer.decode(ids))
      if error is None and not isinstance(result, StepResult):
        try:
          result = StepResult(*result)
        except TypeError:
          error = (f"error: step returned {type(result).__name__}; return a StepResult "
                   "(observation, reward, done)")
      if error is not None:
        info["env_errors"][b] += 1.0
        info["env_timeouts"][b] += float(timed_out)
        texts[b], reward_B[b], done_B[b] = error, self.error_reward, self.done_on_error
        continue
      texts[b], reward_B[b], done_B[b] = str(result.observation), result.reward, result.done
      for k, v in dict(result.info).items():
        if k in info:
          info[k][b] += float(v)
    obs_BO, len_B, truncated_B = self._encode([t if not d else "" for t, d in
                                               zip(texts, done_B, strict=True)])
    info["obs_truncated"] += truncated_B
    return state, EnvStep(obs_BO, len_B, reward_B, done_B, info)
