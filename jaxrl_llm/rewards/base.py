"""The reward-function protocol: `RewardInputs` in, one float32 reward per completion out.

An in-graph reward function is any callable

  fn(inputs: RewardInputs) -> rewards_B   (float32, shape (B,))

built from jnp operations on static shapes, so it runs inside the jitted RL
step right after the rollout. Bind options with `functools.partial`, e.g.
``functools.partial(verifiers.exact_match, eos_id=2)``. Per-example data the
reward needs (reference answers, numeric targets, an index into a host-side
table) travels in ``inputs.task``, a dict of arrays whose leading axis is B, so
it is sharded and sliced together with the completions.

Host (Python) rewards fit the same protocol through
`jaxrl_llm.rewards.host.HostReward.in_graph`, which wraps the Python call in
`jax.pure_callback`.

`compose` adds weighted components into one reward and keeps the unweighted
components for logging:

  total_B = Σ_k w_k · r_k(inputs)_B

Completions are grouped contiguously: row b = p * G + g is completion g of
prompt p. Completions are left-aligned: position 0 is the first sampled token,
``completion_mask_BL`` is 1 on sampled tokens (the stop token included or not,
as the sampler chooses; the verifiers accept both).

Shape suffixes:
  B: completions in the batch, B = prompts × G.
  P: prompt length (tokens).
  L: completion length (tokens).
  A: reference answer length (tokens).
  G: group size (completions per prompt).
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class RewardInputs(NamedTuple):
  """Everything an in-graph reward function sees about a batch of completions.

  A NamedTuple, hence a pytree: it can be passed through `jax.jit`, sharded
  and sliced like any other batch.
  """
  prompt_tokens_BP: Array   # int, prompt token ids (padding where ~mask)
  prompt_mask_BP: Array     # bool/int, 1 on real prompt tokens
  completion_BL: Array      # int, sampled token ids, left-aligned
  completion_mask_BL: Array  # bool/int, 1 on sampled tokens
  finished_B: Array         # bool, True when the completion ended with a stop
                            # token, False when it was truncated at the max length
  task: Mapping[str, Array]  # per-example arrays with leading axis B, e.g.
                            # answer_BA, answer_mask_BA, target_B, example_index_B

  @property
  def lengths_B(self) -> Array:
    """Number of completion tokens, Σ_t mask_{b,t} (int32)."""
    return jnp.sum(jnp.asarray(self.completion_mask_BL) != 0, axis=-1, dtype=jnp.int32)

  def task_array(self, key: str) -> Array:
    """``task[key]``, with an error naming the missing key and the keys present."""
    task = self.task if self.task is not None else {}
    if key not in task:
      raise ValueError(
          f"This reward needs task[{key!r}], but the task dict has keys "
          f"{sorted(task)}.")
    return jnp.asarray(task[key])


RewardFn = Callable[[RewardInputs], Array]
ComposedRewardFn = Callable[[RewardInputs], tuple[Array, dict[str, Array]]]


def check_inputs(inputs: RewardInputs) -> None:
  """Raises ValueError unless the shapes of ``inputs`` are consistent."""
  if not isinstance(inputs, RewardInputs):
    raise ValueError(f"Expected RewardInputs, got {type(inputs).__name__}.")  # noqa: TRY004
  c, cm = jnp.shape(inputs.completion_BL), jnp.shape(inputs.completion_mask_BL)
  if len(c) != 2 or c != cm:
    raise ValueError(
        f"completion_BL and completion_mask_BL must both be (B, L); got {c} and {cm}.")
  p, pm = jnp.shape(inputs.prompt_tokens_BP), jnp.shape(inputs.prompt_mask_BP)
  if len(p) != 2 or p != pm or p[0] != c[0]:
    raise ValueError(
        f"prompt_tokens_BP and prompt_mask_BP must both be (B, P) with B = {c[0]}; "
        f"got {p} and {pm}.")
  if jnp.shape(inputs.finished_B) != (c[0],):
    raise ValueError(
        f"finished_B must have shape ({c[0]},), got {jnp.shape(inputs.finished_B)}.")


def compose(components: Mapping[str, tuple[RewardFn, Any]]) -> ComposedRewardFn:
  """Combines reward functions into ``fn(inputs) -> (total_B, per_component)``.

  ``components`` maps a name to ``(reward_fn, weight)``. The returned function
  evaluates every component once and returns

    total_B = Σ_k weight_k · r_k(inputs)   (float32)
    per_component = {name_k: r_k(inputs)}  (unweighted, float32, for logging
                                            as e.g. ``reward/<name>``)

  Weights are Python numbers or scalar arrays (a traced scalar works, e.g. a
  scheduled penalty weight closed over by the caller). Component order is the
  mapping's order.
  """
  if not isinstance(components, Mapping) or not components:
    raise ValueError("compose needs a non-empty mapping name -> (reward_fn, weight).")
  checked = {}
  for name, spec in components.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"Component names must be non-empty strings, got {name!r}.")
    if not isinstance(spec, tuple) or len(spec) != 2:
      raise ValueError(
          f"Component {name!r} must be a (reward_fn, weight) tuple, got {spec!r}.")
    fn, weight = spec
    if not callable(fn):
      raise ValueError(f"Component {name!r}: {fn!r} is not callable.")  # noqa: TRY004
    if jnp.ndim(weight) != 0:
      raise ValueError(
          f"Component {name!r}: the weight must be a scalar, got shape {jnp.shape(weight)}.")
    checked[name] = (fn, weight)

  def composed(inputs: RewardInputs) -> tuple[Array, dict[str, Array]]:
    batch = inputs.completion_BL.shape[0]
    parts = {}
    total_B = jnp.zeros((batch,), jnp.float32)
    for name, (fn, weight) in checked.items():
      r_B = jnp.asarray(fn(inputs)).astype(jnp.float32)
      if r_B.shape != (batch,):
        raise ValueError(
            f"Reward component {name!r} returned shape {r_B.shape}; expected ({batch},).")
      parts[name] = r_B
      total_B = total_B + jnp.asarray(weight, jnp.float32) * r_B
    return total_B, parts

  return composed
