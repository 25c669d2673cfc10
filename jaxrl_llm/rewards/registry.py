"""Reward components by name, built for a tokenizer and a task.

A config names weighted components, e.g. (("correct", 1.0), ("format", 0.1));
`build_reward_fn` turns them into one in-graph function
`fn(RewardInputs) -> (total_B, {name: value_B})` for the RL step.

Components:
  correct    exact match of the answer tokens, ended by EOS (in-graph)
  format     the answer uses only digits and '-', ended by EOS (in-graph)
  countdown  the expression uses the given numbers and hits the target
             (host verifier through jax.pure_callback)
  math       math answer equivalence (host, sympy / math-verify, with timeouts)
  answer_id  a label, not a reward: an int id of the answer span (the tokens
             before EOS), equal for equal spans (`verifiers.answer_id`, a
             polynomial hash mod a prime < 2**24, so exact in float32); the RL
             step passes it to advantage="copo" as its answer labels. Weight 0
             only: (("correct", 1.0), ("answer_id", 0.0)).

Batch keys the components read (see `jaxrl_llm.data.pipeline`):
answer_tokens / answer_mask (answer + EOS, right-padded), prompt_id.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from jaxrl_llm.rewards import verifiers
from jaxrl_llm.rewards.base import RewardInputs, compose

COMPONENTS = ("correct", "format", "countdown", "math", "answer_id")
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


def _host_text_reward(score: Callable[[str, dict], float], tokenizer, examples: Sequence[dict],
                      timeout_s: float):
  """An in-graph reward that decodes completions on the host and scores them."""
  from jaxrl_llm.rewards.host import HostReward

  def fn(prompt_text, completion_text, example):
    return score(completion_text, example)

  host = HostReward(fn, tokenizer.decode, timeout_s=timeout_s)
  host.set_examples(list(examples))

  def reward(inputs: RewardInputs):
    ids = inputs.task_array("prompt_id")
    return host.in_graph(inputs._replace(task=dict(inputs.task, example_index_B=ids)))
  return reward


def build_reward_fn(components: Sequence[tuple[str, float]], tokenizer, *,
                    examples: Optional[Sequence[dict]] = None, host_timeout_s: float = 5.0):
  """One composed in-graph reward function from named, weighted components.

  `examples` (the training split, indexed by `prompt_id`) is needed by the
  host components, which look up each completion's reference there.

  The "answer_id" label must have weight 0 (ValueError otherwise): compose adds
  0 · id to the total and reports the ids, exact in float32 since they are
  < 2**24, as component "answer_id".
  """
  eos = tokenizer.eos_id
  parts = {}
  for name, weight in components:
    if name == "correct":
      fn = functools.partial(correct_reward, eos_id=eos)
    elif name == "format":
      allowed = sorted({i for ch in "0123456789-" for i in tokenizer.encode(ch)})
      fn = functools.partial(verifiers.format_reward, allowed_ids=allowed, eos_id=eos)
    elif name in ("countdown", "math"):
      if examples is None:
        raise ValueError(f"reward component {name!r} runs on the host and needs the "
                         "training examples (indexed by prompt_id)")
      if name == "countdown":
        from jaxrl_llm.data import tasks
        score = lambda text, ex: float(tasks.countdown_correct(ex["numbers"], ex["target"],
                                                               text.strip()))
      else:
        from jaxrl_llm.rewards import host
        score = lambda text, ex: float(host.math_equal(host.extract_answer(text),
                                                       str(ex["answer"])))
      fn = _host_text_reward(score, tokenizer, examples, host_timeout_s)
    elif name == "answer_id":
      _check_label_weight(name, weight)
      fn = functools.partial(verifiers.answer_id, eos_id=eos)
    else:
      raise ValueError(f"unknown reward component {name!r}; choose from {COMPONENTS}")
    parts[name] = (fn, float(weight))
  if not parts:
    raise ValueError(f"reward.components is empty; name at least one of {COMPONENTS}")
  _check_has_reward(components)
  return compose(parts)


def host_scorer(components: Sequence[tuple[str, float]], tokenizer, examples: Sequence[dict]):
  """Split-mode rewards: a NumPy function over a fetched rollout dict.

  "answer_id" gives the same ids as the in-graph component (int32 values).
  """
  from jaxrl_llm.data import tasks
  from jaxrl_llm.rewards import host

  for name, weight in components:
    if name in LABEL_COMPONENTS:
      _check_label_weight(name, weight)
  _check_has_reward(components)
  # Compiled once here, not dispatched op by op at every step.
  answer_ids = jax.jit(functools.partial(verifiers.answer_span_id, eos_id=tokenizer.eos_id))

  def score(ro) -> tuple[np.ndarray, dict]:
    texts = tokenizer.decode_batch([
        [int(t) for t, m in zip(row, mask) if m] for row, mask in
        zip(np.asarray(ro["completion"]), np.asarray(ro["completion_mask"]))])
    finished = np.asarray(ro["finished"])
    ids = np.asarray(ro["prompt_id"])
    parts = {}
    for name, _ in components:
      if name == "answer_id":
        parts[name] = np.asarray(answer_ids(np.asarray(ro["completion"]),
                                            np.asarray(ro["completion_mask"]), finished))
        continue
      vals = []
      for text, fin, i in zip(texts, finished, ids):
        ex = examples[int(i)]
        if name in ("correct", "format"):
          ok = fin and (tasks.is_correct(ex, text) if name == "correct"
                        else bool(text.strip()) and all(c in "0123456789-" for c in text.strip()))
        elif name == "countdown":
          ok = tasks.countdown_correct(ex["numbers"], ex["target"], text.strip())
        elif name == "math":
          ok = host.math_equal(host.extract_answer(text), str(ex["answer"]))
        else:
          raise ValueError(f"unknown reward component {name!r}; choose from {COMPONENTS}")
        vals.append(float(ok))
      parts[name] = np.asarray(vals, np.float32)
    total = sum(w * parts[n] for n, w in components)
    return np.asarray(total, np.float32), parts
  return score
