"""The train state pytree and its sharded creation.

`TrainState` holds only arrays (step, params, optimizer state, small extra
tables such as HAPO's per-prompt history); the optimizer transformation and
the model config are bound to the step function, not stored in the state.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm import lora, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: completed optimizer steps (RL: completed rl_steps)
  params: Any
  opt_state: Any
  extra: dict           # e.g. {"hapo_history": int32[num_prompts]}
  # PPO's critic {"params", "opt_state"} (`jaxrl_llm.rl.critic`); None without one.
  critic: Any = None

  def apply_gradients(self, tx: optax.GradientTransformation, grads) -> "TrainState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES):
  return sharding.tree_shardings(mesh, rules, decoder.param_logical_axes(cfg),
                                 decoder.param_shapes(cfg))


def _like_params(tree, params_struct, param_sh, replicated, trainable_struct=None,
                 trainable_sh=None):
  """Shardings for an optimizer state: param-shaped subtrees follow the params (and,
  under LoRA, subtrees shaped like the trainable adapters follow theirs)."""
  structs = [s for s in (params_struct, trainable_struct) if s is not None]

  def is_params(node):
    return any(jax.tree.structure(node) == s for s in structs)

  def pick(node):
    if not is_params(node):
      return replicated
    return param_sh if jax.tree.structure(node) == params_struct else trainable_sh

  return jax.tree.map(pick, tree, is_leaf=is_params)


def state_shardings(abstract_state: TrainState, cfg: ModelConfig, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES) -> TrainState:
  """A TrainState of NamedShardings matching `abstract_state`."""
  rep = NamedSharding(mesh, P())
  p_sh = param_shardings(cfg, mesh, rules)
  params_struct = jax.tree.structure(abstract_state.params)
  trainable_struct = trainable_sh = None
  if lora.has_adapters(abstract_state.params):  # optimizer state of the adapters only
    trainable_struct = jax.tree.structure(lora.trainable_params(abstract_state.params))
    trainable_sh = lora.trainable_params(p_sh)
  return TrainState(
      step=rep,
      params=p_sh,
      opt_state=_like_params(abstract_state.opt_state, params_struct, p_sh, rep,
                             trainable_struct, trainable_sh),
      extra=jax.tree.map(lambda _: rep, abstract_state.extra),
      critic=None if abstract_state.critic is None else _critic_shardings(
          abstract_state.critic, cfg, mesh, rules),
  )


def _critic_shardings(abstract_critic, cfg: ModelConfig, mesh: Mesh, rules):
  """The critic's shardings under the policy's config (a value model of another
  config gets its own from `critic.add_critic`)."""
  from jaxrl_llm.rl import critic as critic_lib  # the critic module imports this one
  return critic_lib.critic_state_shardings(abstract_critic, cfg, mesh, rules)


def create_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: Mesh, rules=sharding.DEFAULT_RULES, *,
                       params: Optional[Any] = None,
                       extra_fn: Callable[[], dict] = dict) -> tuple[TrainState, TrainState]:
  """Initialise (or adopt `params`) a sharded TrainState; returns (state, shardings).

  Params are created directly in their shards: `jax.eval_shape` gives the
  shapes, `jax.jit(out_shardings=...)` materialises them, so no device ever
  holds the full model.
  """
  def init(rng, params):
    if params is None:
      params = decoder.init_params(cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), extra=extra_fn())

  abstract = jax.eval_shape(init, rng, params)
  shardings = state_shardings(abstract, cfg, mesh, rules)
  if params is not None:
    params = jax.device_put(params, shardings.params)
  state = jax.jit(init, out_shardings=shardings)(rng, params)
  return state, shardings


def accumulate_gradients(loss_fn: Callable, params, batch, num_micro: int):
  """Exact gradient accumulation over micro-batches with `lax.scan`.

  `loss_fn(params, micro) -> (total, (denom, sums))` returns a weighted loss
  SUM and its denominator (see `policy_losses.aggregate`). The result is
  (Σ ∇total / Σ denom, Σ denom, Σ sums): the gradient of the full-batch loss,
  whatever the split.

  Params with LoRA adapters: only the trainable leaves (`lora.is_trainable`)
  are differentiated; the frozen base is closed over (its gradient is never
  formed) and reported as zeros, which `lora.freeze_base` ignores.
  """
  if lora.has_adapters(params):
    trainable, frozen = lora.split_trainable(params)
    grads, denom, sums = _accumulate(
        lambda t, micro: loss_fn(lora.combine(t, frozen), micro), trainable, batch, num_micro)
    return lora.combine(grads, jax.tree.map(jnp.zeros_like, frozen)), denom, sums
  return _accumulate(loss_fn, params, batch, num_micro)


def _accumulate(loss_fn: Callable, params, batch, num_micro: int):
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {num_micro} "
                       "micro-batches")
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])

  micro = jax.tree.map(split, batch)
  grad_fn = jax.grad(loss_fn, has_aux=True)
  first = jax.tree.map(lambda x: x[0], micro)
  sums_shape = jax.eval_shape(lambda: loss_fn(params, first)[1][1])

  def body(acc, xs):
    grads, (denom, sums) = grad_fn(params, xs)
    return jax.tree.map(jnp.add, acc, (grads, denom, sums)), None

  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
  (grads, denom, sums), _ = jax.lax.scan(body, init, micro)
  # In each param's dtype: a float32 denominator must not promote bf16 gradients (the
  # optimizer state would change dtype across the step).
  grads = jax.tree.map(lambda g: (g / jnp.maximum(denom, 1e-8)).astype(g.dtype), grads)
  return grads, denom, sums


def apply_update(state: TrainState, tx: optax.GradientTransformation, grads, *,
                 skip_nonfinite: bool = True) -> tuple[TrainState, dict]:
  """Optimizer update; with skip_nonfinite a NaN/Inf gradient leaves the state as is."""
  from jaxrl_llm.metrics import apply_if_finite
  new_state = state.apply_gradients(tx, grads)
  # Integer leaves (the codes of a quantized frozen base) never have a gradient: left out.
  grad_norm = optax.tree.norm([g for g in jax.tree.leaves(grads)
                               if jnp.issubdtype(g.dtype, jnp.inexact)])
  finite = jnp.isfinite(grad_norm)
  if skip_nonfinite:
    new_state, finite = apply_if_finite(new_state, state, grads)
  return new_state, {"grad/global_norm": grad_norm,
                     "train/skipped_updates": 1.0 - finite.astype(jnp.float32)}
