"""Reward components by name, built for a tokenizer and a task.

A config names weighted components, e.g. (("correct", 1.0), ("format", 0.1));
`build_reward_fn` turns them into one in-graph function
`fn(RewardInputs) -> (total_B, {name: value_B})` for the RL step.

Components:
  correct    exact match of the answer tokens, ended by EOS (in-graph)
  format     the answer uses only digits and '-', ended by EOS (in-graph)
  countdown  the expression uses the given numbers and hits the target
             (host verifier through jax.pure_callback)
  math       `host.math_reward`: the completion's final answer (\\boxed{}, '####',
             "the answer is X"; the last number too with
             math_last_number_fallback) equals the final answer of the
             example's "answer" field (GSM8K '#### N', MATH \\boxed{}, or plain)
             by `host.math_equal` (host, sympy / math-verify, with timeouts)
  answer_id  a label, not a reward: an int id of the answer span (the tokens
             before EOS), equal for equal spans (`verifiers.answer_id`, a
             polynomial hash mod a prime < 2**24, so exact in float32); the RL
             step passes it to advantage="copo" as its answer labels. Weight 0
             only: (("correct", 1.0), ("answer_id", 0.0)).
  reward_model  a trained reward model's (aggregated) score, in-graph; its params
             are an argument of the step (`reward_params`), so the composed fn
             is fn(inputs, reward_params). Built from the workdir of a
             kind="reward_model" run (config: reward.reward_model_path).

Batch keys the components read (see `jaxrl_llm.data.pipeline`):
answer_tokens / answer_mask (answer + EOS, right-padded), prompt_id.

`host_scorer` gives the same components for the split-mode RL step (rollout
jit -> host -> update jit), computed by the same functions, so both modes
agree on every component.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxrl_llm.rewards import verifiers
from jaxrl_llm.rewards.base import RewardInputs, compose

COMPONENTS = ("correct", "format", "countdown", "math", "answer_id", "reward_model")
# The component whose function takes the step's reward_params (a reward model's weights).
REWARD_MODEL = "reward_model"
# Components scored in Python on decoded text (through jax.pure_callback in the one-jit step).
HOST_COMPONENTS = ("countdown", "math")
# Characters a "format"-valid answer may use.
FORMAT_CHARS = "0123456789-"
# Per-example arrays of the rollout that the in-graph components read.
_IN_GRAPH_TASK_KEYS = ("answer_tokens", "answer_mask")
# Components that label completions rather than score them: weight 0, not summed into the reward.
LABEL_COMPONENTS = ("answer_id",)


def _check_label_weight(name: str, weight) -> None:
  if float(weight) != 0.0:
    raise ValueError(
        f"reward component {name!r} is a label (an id of each completion's answer span, read "
        f"by advantage='copo' as its answer labels), not a reward: give it weight 0.0, e.g. "
        f"(('correct', 1.0), ({name!r}, 0.0)); got weight {weight!r}")


def _check_has_reward(components: Sequence[tuple[str, float]]) -> None:
  if all(name in LABEL_COMPONENTS for name, _ in components):
    raise ValueError(f"reward.components {tuple(components)!r} has no reward, only labels "
                     f"{LABEL_COMPONENTS}; add one of "
                     f"{tuple(c for c in COMPONENTS if c not in LABEL_COMPONENTS)}")


def _answer_inputs(inputs: RewardInputs, eos_id: int) -> RewardInputs:
  """Map the data pipeline's answer arrays onto the verifiers' keys (EOS dropped)."""
  answer = inputs.task_array("answer_tokens")
  mask = (inputs.task_array("answer_mask") != 0) & (answer != eos_id)
  task = dict(inputs.task, answer_BA=answer, answer_mask_BA=mask)
  return inputs._replace(task=task)


def correct_reward(inputs: RewardInputs, *, eos_id: int):
  return verifiers.exact_match(_answer_inputs(inputs, eos_id), eos_id=eos_id)


def _in_graph_component(name: str, weight, tokenizer):
  """The jnp reward function of an in-graph component (None for a host component)."""
  eos = tokenizer.eos_id
  if name == "correct":
    return functools.partial(correct_reward, eos_id=eos)
  if name == "format":
    allowed = sorted({i for ch in FORMAT_CHARS for i in tokenizer.encode(ch)})
    return functools.partial(verifiers.format_reward, allowed_ids=allowed, eos_id=eos)
  if name == "answer_id":
    _check_label_weight(name, weight)
    return functools.partial(verifiers.answer_id, eos_id=eos)
  if name in HOST_COMPONENTS:
    return None
  raise ValueError(f"unknown reward component {name!r}; choose from {COMPONENTS}")


def _countdown_score(completion_text: str, example: Mapping) -> float:
  from jaxrl_llm.data import tasks
  return float(tasks.countdown_correct(example["numbers"], example["target"],
                                       completion_text.strip()))


def _check_examples(name: str, examples: Optional[Sequence[Mapping]]) -> None:
  """Refuses, before training starts, a table a host component cannot score."""
  if examples is None:
    raise ValueError(f"reward component {name!r} runs on the host and needs the "
                     "training examples (indexed by prompt_id)")
  from jaxrl_llm.rewards import host
  for i, example in enumerate(examples):
    try:
      if name == "math":
        host.example_gold_answer(example)
      elif not isinstance(example, Mapping) or not {"numbers", "target"} <= set(example):
        raise ValueError(f"a countdown example needs 'numbers' and 'target' fields; this one "  # noqa: TRY301
                         f"has {sorted(example) if isinstance(example, Mapping) else example!r}")
    except ValueError as e:
      raise ValueError(f"reward component {name!r}: training example {i}: {e}") from e


def _host_reward(name: str, tokenizer, examples: Optional[Sequence[Mapping]], *,
                 host_timeout_s: float, math_last_number_fallback: bool):
  """The `HostReward` of a host component over the example table (indexed by prompt_id)."""
  from jaxrl_llm.rewards import host
  _check_examples(name, examples)
  if name == "math":
    score = functools.partial(host.math_reward, last_number_fallback=math_last_number_fallback)
  else:
    score = _countdown_score
  reward = host.HostReward(lambda prompt_text, completion_text, example:
                           score(completion_text, example),
                           tokenizer.decode, timeout_s=host_timeout_s)
  reward.set_examples(list(examples))
  return reward


def _host_in_graph(reward) -> Callable[[RewardInputs], jax.Array]:
  def fn(inputs: RewardInputs):
    ids = inputs.task_array("prompt_id")
    return reward.in_graph(inputs._replace(task=dict(inputs.task, example_index_B=ids)))
  return fn


def _reward_model_weight(components: Sequence[tuple[str, float]],
                         reward_model: Optional[Callable]) -> Optional[float]:
  """The weight of the "reward_model" component (None without one), checked against the
  model given: named at most once, and named exactly when a model is given."""
  weights = [float(w) for n, w in components if n == REWARD_MODEL]
  if len(weights) > 1:
    raise ValueError(f"reward.components names 'reward_model' {len(weights)} times; once")
  if weights and reward_model is None:
    raise ValueError("reward component 'reward_model' needs a trained reward model: set "
                     "reward.reward_model_path to the workdir of a kind='reward_model' run")
  if reward_model is not None and not weights:
    raise ValueError("a reward model was given but reward.components does not name "
                     "'reward_model'; add (('reward_model', 1.0),) or drop the model")
  return weights[0] if weights else None


def _with_reward_model(verifiers_fn: Optional[Callable], reward_model: Callable, weight: float):
  """fn(inputs, reward_params): the verifier components plus weight · the reward model.

  The reward model's own components (e.g. rm_mean, rm_std, rm_members_BK) are
  passed through; its aggregated score is component "reward_model".
  """
  def fn(inputs: RewardInputs, reward_params):
    rm_B, rm_comps = reward_model(inputs, reward_params)
    rm_B = jax.numpy.asarray(rm_B, jax.numpy.float32)
    total_B, parts = (verifiers_fn(inputs) if verifiers_fn is not None
                      else (jax.numpy.zeros_like(rm_B), {}))
    return total_B + weight * rm_B, {**parts, REWARD_MODEL: rm_B, **rm_comps}
  return fn


def build_reward_fn(components: Sequence[tuple[str, float]], tokenizer, *,
                    examples: Optional[Sequence[Mapping]] = None, host_timeout_s: float = 5.0,
                    math_last_number_fallback: bool = False,
                    reward_model: Optional[Callable] = None):
  """One composed in-graph reward function from named, weighted components.

  `examples` (the training split, indexed by `prompt_id`) is needed by the
  host components, which look up each completion's reference there; they are
  checked here (a math example without a usable "answer", a countdown example
  without "numbers"/"target" is refused with its index). "math" scores with
  `host.math_reward`, taking the last number of a completion that states no
  answer when `math_last_number_fallback` (config: reward.math_last_number_fallback).
  Each host call is abandoned after `host_timeout_s` (reward 0, counted).

  The "answer_id" label must have weight 0 (ValueError otherwise): compose adds
  0 · id to the total and reports the ids, exact in float32 since they are
  < 2**24, as component "answer_id".

  A "reward_model" component needs `reward_model`, an in-graph
  fn(inputs, rm_params) -> (rewards_B, comps) (`reward_model.reward_model_fn`);
  the result is then fn(inputs, reward_params) -> (total_B, comps).
  """
  rm_weight = _reward_model_weight(components, reward_model)
  parts = {}
  for name, weight in components:
    if name == REWARD_MODEL:
      continue
    fn = _in_graph_component(name, weight, tokenizer)
    if fn is None:
      fn = _host_in_graph(_host_reward(name, tokenizer, examples, host_timeout_s=host_timeout_s,
                                       math_last_number_fallback=math_last_number_fallback))
    parts[name] = (fn, float(weight))
  if not components:
    raise ValueError(f"reward.components is empty; name at least one of {COMPONENTS}")
  _check_has_reward(components)
  if rm_weight is not None:
    return _with_reward_model(compose(parts) if parts else None, reward_model, rm_weight)
  return compose(parts)


def rollout_reward_inputs(ro: Mapping[str, Any]) -> RewardInputs:
  """`RewardInputs` of a fetched rollout dict (NumPy arrays), for the in-graph components.

  Reads completion, completion_mask, finished, and when present prompt_tokens,
  prompt_mask (no built-in component reads them: (B, 0) when absent) and the
  task arrays the built-in components read, answer_tokens and answer_mask.
  """
  missing = [k for k in ("completion", "completion_mask", "finished") if k not in ro]
  if missing:
    raise ValueError(f"the rollout dict lacks {missing}; it has keys {sorted(ro)}")
  completion_BL = np.asarray(ro["completion"])
  batch = completion_BL.shape[0]
  prompt_BP = np.asarray(ro.get("prompt_tokens", np.zeros((batch, 0), np.int32)))
  prompt_mask_BP = np.asarray(ro.get("prompt_mask", np.zeros(prompt_BP.shape, np.int32)))
  task = {k: np.asarray(ro[k]) for k in _IN_GRAPH_TASK_KEYS if k in ro}
  return RewardInputs(prompt_BP, prompt_mask_BP, completion_BL, np.asarray(ro["completion_mask"]),
                      np.asarray(ro["finished"]), task)


def host_scorer(components: Sequence[tuple[str, float]], tokenizer,
                examples: Optional[Sequence[Mapping]], *, host_timeout_s: float = 5.0,
                math_last_number_fallback: bool = False,
                reward_model: Optional[Callable] = None, reward_params=None):
  """Split-mode rewards: `score(ro) -> (total_B, {name: value_B})` over a fetched rollout dict.

  Gives the values of `build_reward_fn` with the same arguments, by the same
  code: the in-graph components ("correct", "format", "answer_id") run their
  jnp functions, jitted once here, on the rollout's arrays; the host
  components ("countdown", "math") run the same `HostReward` the one-jit step
  calls through jax.pure_callback, with each completion's example looked up by
  ``ro["prompt_id"]``. total_B = Σ_k w_k · value_k (float32, component order);
  rewards are float32, the "answer_id" label int32 (equal to the in-graph ids).
  A "reward_model" component runs `reward_model(inputs, reward_params)` (as
  in `build_reward_fn`) in the same jitted call as the in-graph components;
  its extra outputs (e.g. rm_std) follow the named components.
  """
  in_graph, host_parts = {}, {}
  uses_rm = _reward_model_weight(components, reward_model) is not None
  for name, weight in components:
    if name == REWARD_MODEL:
      continue
    fn = _in_graph_component(name, weight, tokenizer)
    if fn is None:
      host_parts[name] = _host_reward(name, tokenizer, examples, host_timeout_s=host_timeout_s,
                                      math_last_number_fallback=math_last_number_fallback)
    else:
      in_graph[name] = fn
  if not components:
    raise ValueError(f"reward.components is empty; name at least one of {COMPONENTS}")
  _check_has_reward(components)
  def graph_parts(inputs, rm_params):
    out = {name: fn(inputs) for name, fn in in_graph.items()}
    if uses_rm:
      rm_B, rm_comps = reward_model(inputs, rm_params)
      out.update({REWARD_MODEL: jax.numpy.asarray(rm_B, jax.numpy.float32), **rm_comps})
    return out
  # Compiled once here, not dispatched op by op at every step.
  in_graph_jit = jax.jit(graph_parts)

  def score(ro: Mapping[str, Any]) -> tuple[np.ndarray, dict]:
    inputs = rollout_reward_inputs(ro)
    parts = ({k: np.asarray(v) for k, v in in_graph_jit(inputs, reward_params).items()}
             if in_graph or uses_rm else {})
    if host_parts:
      if "prompt_id" not in ro:
        raise ValueError(f"host reward components {sorted(host_parts)} look examples up by "
                         f"ro['prompt_id'], which the rollout dict lacks (keys {sorted(ro)})")
      index_B = np.asarray(ro["prompt_id"], np.int32)
      for name, reward in host_parts.items():
        parts[name] = reward(inputs.prompt_tokens_BP, inputs.prompt_mask_BP, inputs.completion_BL,
                             inputs.completion_mask_BL, index_B)
    named = {name: parts[name] if name in LABEL_COMPONENTS else parts[name].astype(np.float32)
             for name, _ in components}
    total_B = np.zeros((inputs.completion_BL.shape[0],), np.float32)
    for name, weight in components:
      total_B = total_B + np.float32(weight) * named[name].astype(np.float32)
    return total_B, {**named, **{k: v for k, v in parts.items() if k not in named}}
  return score
