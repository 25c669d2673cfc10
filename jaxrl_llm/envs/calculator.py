"""The calculator environment: an in-graph tool over token arrays (pure JAX).

A trajectory of the built-in calculator task (prompt "345*67=", answer "23115"):

  prompt    345*67=
  turn 1    345*67>          a tool call: `a op b` closed by the call token ">"
  obs 1     23115:           the environment's result, closed by ":"
  turn 2    23115</s>        the final answer, ended by EOS: the trajectory ends

A model turn that ends on the call token is parsed as `a op b`: digits, one
operator of + - *, digits (each operand 1..`max_operand_digits` digits, no
sign). A well-formed call gets its exact integer result as the observation;
anything else gets the observation "error:" (and `error_reward`). A turn
that ends on EOS or runs out of tokens without a call ends the trajectory:
the reward of the final answer comes from the run's reward components
(e.g. "correct" on the final turn, `jaxrl_llm.rl.multiturn`).

Every id comes from the tokenizer, which must encode each digit, operator,
the call token and the end token as one token each (the built-in
character-level tokenizer does). Results fit int32: operands of at most 4
digits.

Shape letters: B rows, L turn tokens, O observation tokens, K result digits.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.envs.base import EnvStep, InGraphEnv

_OPS = "+-*"
_MAX_DIGITS = 4  # a*b of two 4-digit operands < 10^8 fits int32
_RESULT_DIGITS = 2 * _MAX_DIGITS


def _single_id(tokenizer, text: str) -> int:
  ids = tokenizer.encode(text)
  if len(ids) != 1:
    raise ValueError(f"the calculator environment needs {text!r} to be one token of the "
                     f"tokenizer, got ids {ids}; use a tokenizer with single-character digit, "
                     "operator and marker tokens (e.g. data.tokenizer='builtin')")
  return int(ids[0])


class CalculatorEnv(InGraphEnv):
  """`a op b` tool calls answered with their exact result (see the module docstring)."""
  info_keys = ("tool_calls", "tool_errors")

  def __init__(self, tokenizer, *, call_token: str = ">", end_token: str = ":",
               error_text: str = "error:", max_operand_digits: int = _MAX_DIGITS,
               error_reward: float = 0.0, obs_len: int = 0):
    if not 1 <= max_operand_digits <= _MAX_DIGITS:
      raise ValueError(f"max_operand_digits must be in [1, {_MAX_DIGITS}] (results must fit "
                       f"int32), got {max_operand_digits}")
    self.digit_ids = tuple(_single_id(tokenizer, str(d)) for d in range(10))
    self.op_ids = tuple(_single_id(tokenizer, op) for op in _OPS)
    self.call_id = _single_id(tokenizer, call_token)
    self.end_id = _single_id(tokenizer, end_token)
    self.error_ids = tuple(int(i) for i in tokenizer.encode(error_text))
    self.max_operand_digits = int(max_operand_digits)
    self.error_reward = float(error_reward)
    need = max(_RESULT_DIGITS + 2, len(self.error_ids))  # sign, digits, end token
    self.obs_len = int(obs_len) or need
    if self.obs_len < need:
      raise ValueError(f"obs_len={obs_len} cannot hold a result (sign, {_RESULT_DIGITS} digits "
                       f"and the end token) or the error text: use obs_len >= {need}")
    vocab = max(self.digit_ids + self.op_ids + (self.call_id, self.end_id) + self.error_ids) + 1
    digit_of = np.full((vocab,), -1, np.int32)
    digit_of[list(self.digit_ids)] = np.arange(10)
    op_of = np.full((vocab,), -1, np.int32)
    op_of[list(self.op_ids)] = np.arange(len(_OPS))
    self._digit_of, self._op_of = digit_of, op_of

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    return (self.call_id,)

  def parse_calls(self, turn_tokens_BL, turn_mask_BL, stopped_B):
    """(is_call_B, valid_B, result_B): the turn ends on the call token; it is a
    well-formed `a op b`; its int32 value (0 where not valid)."""
    B, L = turn_tokens_BL.shape
    n_B = jnp.sum(turn_mask_BL > 0, axis=1).astype(jnp.int32)
    last_B = jnp.take_along_axis(turn_tokens_BL, jnp.maximum(n_B - 1, 0)[:, None], 1)[:, 0]
    is_call_B = stopped_B & (n_B > 0) & (last_B == self.call_id)
    body_BL = jnp.arange(L)[None, :] < (n_B - 1)[:, None]  # tokens before the call token
    safe_BL = jnp.clip(turn_tokens_BL, 0, self._digit_of.shape[0] - 1)
    in_vocab_BL = (turn_tokens_BL >= 0) & (turn_tokens_BL < self._digit_of.shape[0])
    digit_BL = jnp.where(in_vocab_BL, jnp.asarray(self._digit_of)[safe_BL], -1)
    op_BL = jnp.where(in_vocab_BL, jnp.asarray(self._op_of)[safe_BL], -1)
    is_digit_BL, is_op_BL = digit_BL >= 0, op_BL >= 0
    num_ops_B = jnp.sum(is_op_BL & body_BL, axis=1)
    k_B = jnp.argmax(is_op_BL & body_BL, axis=1).astype(jnp.int32)  # the operator's position
    t_L = jnp.arange(L)[None, :]
    left_BL, right_BL = t_L < k_B[:, None], (t_L > k_B[:, None]) & body_BL
    len_a_B, len_b_B = k_B, n_B - 1 - k_B - 1
    D = self.max_operand_digits
    valid_B = (is_call_B & (num_ops_B == 1) & jnp.all(is_digit_BL | ~body_BL | is_op_BL, axis=1)
               & (len_a_B >= 1) & (len_a_B <= D) & (len_b_B >= 1) & (len_b_B <= D))

    def value(part_BL, end_B):
      # Σ_t digit_t · 10^(end − 1 − t) over the part's positions t < end.
      power_BL = jnp.clip(end_B[:, None] - 1 - t_L, 0, D - 1)
      place_BL = jnp.asarray([10 ** i for i in range(D)], jnp.int32)[power_BL]
      return jnp.sum(jnp.where(part_BL & valid_B[:, None], jnp.maximum(digit_BL, 0) * place_BL,
                               0), axis=1)

    a_B, b_B = value(left_BL, k_B), value(right_BL, n_B - 1)
    op_B = jnp.take_along_axis(op_BL, k_B[:, None], 1)[:, 0]
    result_B = jnp.where(op_B == 0, a_B + b_B, jnp.where(op_B == 1, a_B - b_B, a_B * b_B))
    return is_call_B, valid_B, jnp.where(valid_B, result_B, 0)

  def result_tokens(self, value_B):
    """(obs_BO, len_B): the decimal digits of value_B (a "-" first if negative),
    then the end token."""
    O, K = self.obs_len, _RESULT_DIGITS
    neg_B = value_B < 0
    mag_B = jnp.abs(value_B)
    ndig_B = jnp.maximum(1, jnp.sum(mag_B[:, None] >= jnp.asarray(
        [10 ** i for i in range(K)], jnp.int32)[None, :], axis=1)).astype(jnp.int32)
    j_O = jnp.arange(O)[None, :]
    start_B = neg_B.astype(jnp.int32)  # digits start after the sign
    pos_BO = j_O - start_B[:, None]  # index of the digit (most significant first)
    power_BO = jnp.clip(ndig_B[:, None] - 1 - pos_BO, 0, K - 1)
    pow10_K = jnp.asarray([10 ** i for i in range(K)], jnp.int32)
    digit_BO = (mag_B[:, None] // pow10_K[power_BO]) % 10
    obs_BO = jnp.asarray(self.digit_ids, jnp.int32)[digit_BO]
    obs_BO = jnp.where((j_O == 0) & neg_B[:, None], self.op_ids[1], obs_BO)
    end_B = start_B + ndig_B
    obs_BO = jnp.where(j_O == end_B[:, None], self.end_id, obs_BO)
    obs_BO = jnp.where(j_O > end_B[:, None], 0, obs_BO)
    return obs_BO.astype(jnp.int32), end_B + 1

  def step(self, state, turn_tokens_BL, turn_mask_BL, stopped_B, active_B,
           task: Mapping[str, Any]):
    del task
    is_call_B, valid_B, result_B = self.parse_calls(turn_tokens_BL, turn_mask_BL, stopped_B)
    res_BO, res_len_B = self.result_tokens(result_B)
    B = turn_tokens_BL.shape[0]
    err = jnp.asarray(self.error_ids, jnp.int32)
    err_BO = jnp.zeros((B, self.obs_len), jnp.int32).at[:, :err.shape[0]].set(err[None, :])
    obs_BO = jnp.where(valid_B[:, None], res_BO, err_BO)
    obs_len_B = jnp.where(valid_B, res_len_B, err.shape[0])
    error_B = is_call_B & ~valid_B
    active = active_B.astype(jnp.float32)
    info = {"tool_calls": valid_B.astype(jnp.float32) * active,
            "tool_errors": error_B.astype(jnp.float32) * active}
    reward_B = jnp.where(error_B, self.error_reward, 0.0).astype(jnp.float32)
    return state, EnvStep(obs_BO, jnp.where(is_call_B, obs_len_B, 0).astype(jnp.int32),
                          reward_B, ~is_call_B, info)


# ---------------------------------------------------------------------------
# The built-in task: multi-digit arithmetic, with transcripts of tool use.
# ---------------------------------------------------------------------------
def tool_transcript(prompt: str, answer: str, *, call_token: str = ">",
                    end_token: str = ":") -> list[tuple[str, str]]:
  """A demonstration of the calculator for an arithmetic example ("345*67=",
  "23115"): [("model", "345*67>"), ("obs", "23115:"), ("model", "23115")]; the
  final model turn is followed by EOS."""
  expression = prompt.rstrip("=").strip()
  return [("model", expression + call_token), ("obs", answer + end_token), ("model", answer)]


def transcript_tokens(tokenizer, prompt: str, answer: str, **kw) -> tuple[list[int], list[int]]:
  """(completion ids, model mask) of `tool_transcript`, EOS after the last turn;
  the mask is 1 on model tokens only (append-only: each piece encoded on its own)."""
  ids, mask = [], []
  parts = tool_transcript(prompt, answer, **kw)
  for i, (who, text) in enumerate(parts):
    piece = tokenizer.encode(text) + ([tokenizer.eos_id] if i == len(parts) - 1 else [])
    ids += piece
    mask += [1 if who == "model" else 0] * len(piece)
  return ids, mask


def make_env(name: str, tokenizer, **options) -> InGraphEnv:
  """An in-graph environment by name (`jaxrl_llm.envs.config.ENVS`)."""
  if name == "calculator":
    return CalculatorEnv(tokenizer, **options)
  raise ValueError(f"unknown environment {name!r}; choose 'calculator'")
