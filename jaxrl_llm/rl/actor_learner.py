"""Asynchronous actor–learner RL (Cleanba-style): two meshes, a fixed lag, no lost prompts.

The devices split into an actor group (`trainer.actor_devices` = a of N) and a
learner group (the other N − a), each with its own mesh of the configured
shape. The actor samples G completions per prompt and scores them with the
in-graph reward (`RLStep.rollout` + `RLStep.score`); the learner runs
everything after the reward (`RLStep.learn`: shaping, reference, advantages,
update). Parameters go learner → actor and rollouts actor → learner with
`jax.device_put` between the meshes (device to device, no host round trip).

Lag schedule (reproducible, independent of timing; Cleanba, Huang et al. 2023).
The rollout consumed by learner step s is sampled with θ_v, the parameters
after v updates, where

    v(s) = max(s − k(s), s₀),   k(s) = rl.async_lag (0 from a ReMix
                                 reincarnation step on, `off_policy.lag_at`),

and s₀ is the step the loop started (or resumed) from: during the first k
steps (the warm-up) the actor uses θ_{s₀}. Rollout s is dispatched at the
start of learner step v(s), as soon as θ_{v(s)} exists, so up to k + 1
rollouts are in flight; JAX's asynchronous dispatch runs the actor's rollout
s + k on its devices while the learner updates on rollout s. Nothing waits
on the host except the metrics of the previous step (`metrics.AsyncMetrics`).
The random draws are the one-jit step's: rollout s uses the first half of
split(fold_in(seed, s)) and update s the second, so k = 0 reproduces the
synchronous one-jit step on the learner's mesh bit for bit, and a run with
k ≥ 1 is reproducible run to run.

Prompts. `PromptPipeline` reads batches ahead for the rollouts in flight and
reports, as the data position saved with a checkpoint, the position of the
first batch the learner has not consumed, so a resumed run (after a kill or
an exception, with rollouts in flight) neither skips nor repeats prompts. The
in-flight rollouts are not saved: a resumed run samples them again from the
restored parameters (a fresh warm-up), so steps after a resume match an
uninterrupted run in their prompts, not in their sampled tokens.

Tests (tests/actor_learner_test.py): the pipelined run equals a plain loop that
samples rollout s with θ_{v(s)}; k = 0 equals `jit_rl_step` bit for bit on a
mesh of the learner's shape; k = 1 is reproducible; a kill with a rollout in
flight and a resume consume the prompts of an uninterrupted run. User docs:
docs/async.md.

Host-scored rewards (`host_reward`, e.g. the `math` / `countdown`
components through `rewards.registry.host_scorer`): the actor then samples
only, and each rollout is fetched and scored on the host by one background
thread as soon as the actor has finished it (in dispatch order, so the
rewards do not depend on timing); the learner step that consumes rollout s
waits for its rewards only. A host scorer is a pure function of the rollout,
so a run with k ≥ 1 stays reproducible and scores exactly what the in-graph
version of the same component would (tested with "correct").

Multi-turn rollouts (`rl.multiturn`, `jaxrl_llm.rl.multiturn.MultiTurnRLStep`)
run on the actor like single-turn ones when the environment is in-graph; a
host environment needs the split rollout and is refused here.

Off-policy corrections for the lagged data (TIS / MIS, V-trace, ReMix) are
`rl.off_policy` (`jaxrl_llm.rl.off_policy`), applied inside the learner's loss.
Metrics added per step: "async/staleness" (s − v(s)) and "async/in_flight".
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import sharding
from jaxrl_llm.rl import off_policy
from jaxrl_llm.rl.rl_step import RLStep
from jaxrl_llm.train_state import param_shardings

REFERENCE_KEY = "remix_reference"  # TrainState.extra: the reference after a reincarnation


def split_devices(actor_devices: int, devices: Optional[Sequence[jax.Device]] = None
                  ) -> tuple[list, list]:
  """The first `actor_devices` devices act, the rest learn."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if not 1 <= actor_devices <= n - 1:
    raise ValueError(f"trainer.actor_devices={actor_devices}: must be between 1 and {n - 1} "
                     f"(the actor takes that many of the {n} devices and the learner the rest; "
                     "0 runs the synchronous step)")
  if jax.process_count() > 1:
    raise ValueError("trainer.actor_devices > 0 runs in one process; multi-process runs use "
                     "the synchronous step (trainer.actor_devices=0)")
  return devices[:actor_devices], devices[actor_devices:]


def check_batch(batch_size: int, actor_mesh, learner_mesh, rules) -> None:
  """The prompt batch must split over the batch shards of both meshes."""
  for name, mesh in (("actor", actor_mesh), ("learner", learner_mesh)):
    shards = sharding.batch_shards(mesh, rules)
    if batch_size % shards:
      raise ValueError(f"data.batch_size={batch_size} does not split over the {shards} batch "
                       f"shards of the {name} mesh {dict(mesh.shape)}: use a multiple of "
                       f"{shards}, or change trainer.actor_devices / mesh.shape")


class PromptPipeline:
  """A data iterator read ahead for rollouts in flight; its state is the learner's position.

  `next()` returns the batch of the next learner step; `peek(i)` the batch i
  steps after it (read from the wrapped iterator as needed). `get_state()` is
  the wrapped iterator's position before the first batch `next()` has not
  returned yet, so a checkpoint never counts prompts that are only in flight.
  """

  def __init__(self, iterator):
    self.iterator = iterator
    self._ahead: collections.deque = collections.deque()  # (position before, batch)

  def __iter__(self):
    return self

  def __next__(self):
    if self._ahead:
      return self._ahead.popleft()[1]
    return next(self.iterator)

  def peek(self, i: int):
    while len(self._ahead) <= i:
      position = dict(self.iterator.get_state())
      self._ahead.append((position, next(self.iterator)))
    return self._ahead[i][1]

  def get_state(self):
    return dict(self._ahead[0][0]) if self._ahead else self.iterator.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._ahead.clear()
    self.iterator.set_state(state)

  @property
  def in_flight(self) -> int:
    """Batches read ahead of the learner."""
    return len(self._ahead)


def with_reference_in_state(state, shardings):
  """Adds a copy of the params to TrainState.extra (ReMix reincarnation replaces it later)."""
  ref = jax.tree.map(jnp.copy, state.params)
  return (state.replace(extra={**state.extra, REFERENCE_KEY: ref}),
          shardings.replace(extra={**shardings.extra, REFERENCE_KEY: shardings.params}))


class ActorLearner:
  """The `step_fn(state, batch, rng) -> (state, metrics)` of an asynchronous run.

  `batch` is learner step s's prompt batch (on the actor mesh, as the trainer
  loop shards it); later batches come from `pipeline.peek`. Call it with
  consecutive steps; the first call reads the start step from `state.step`.
  """
  # Called with (step, prompt ids of the rollout the learner consumes) when set; for tests
  # and debugging (it fetches the ids to the host).
  consume_hook: Optional[Callable[[int, np.ndarray], None]] = None

  def __init__(self, step: RLStep, actor_mesh, learner_mesh, state_shardings,
               pipeline: PromptPipeline, num_steps: int, *, lag: int, reincarnate_step: int = 0,
               ref_params=None, reward_params=None, host_reward: Optional[Callable] = None):
    if lag < 0:
      raise ValueError(f"rl.async_lag={lag}: must be >= 0")
    if host_reward is not None and step.rl.advantage == "remax":
      raise ValueError("rl.advantage='remax' scores a greedy baseline in-graph, which host-"
                       "scored rewards do not do: use grpo, dr_grpo or rloo, or in-graph "
                       "reward components")
    self.host_reward = host_reward
    # One worker: rollouts are scored one at a time, in the order they were dispatched.
    self._scorer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host_reward")
                    if host_reward is not None else None)
    self.actor_step = dataclasses.replace(step, mesh=actor_mesh)
    self.learner_step = dataclasses.replace(step, mesh=learner_mesh)
    self.actor_mesh, self.learner_mesh = actor_mesh, learner_mesh
    self.pipeline, self.num_steps = pipeline, num_steps
    self.lag, self.reincarnate_step = lag, reincarnate_step
    self.ref_params, self.reward_params = ref_params, reward_params
    self.actor_params_sharding = param_shardings(step.model, actor_mesh, step.rules)
    self._pending: dict[int, tuple[int, Any]] = {}   # step -> (params version, rollout)
    self._next: Optional[int] = None
    self._start = 0
    rep = sharding.replicated(learner_mesh)
    self._act = jax.jit(self._actor_fn)
    self._learn = jax.jit(self._learner_fn, donate_argnums=(0,),
                          out_shardings=(state_shardings, rep))
    self._reincarnate = jax.jit(
        lambda st: st.replace(extra={**st.extra,
                                     REFERENCE_KEY: jax.tree.map(jnp.copy, st.params)}),
        donate_argnums=(0,), out_shardings=state_shardings)

  # ------------------------------------------------------------------ stages
  def _actor_fn(self, params, batch, rng, step_idx, reward_params):
    """ROLLOUT + REWARD on the actor mesh, with the one-jit step's rollout key."""
    st = self.actor_step
    with sharding.activation_rules(st.mesh, st.rules):
      rollout_rng, _ = jax.random.split(jax.random.fold_in(rng, step_idx))
      ro = st.rollout(params, batch, rollout_rng, step_idx)
      if self.host_reward is not None:  # scored on the host (`_score_on_host`)
        return ro
      rewards_B, comps, baseline_B = st.score(ro, reward_params)
      return ro, rewards_B, comps, baseline_B

  def _score_on_host(self, ro):
    """REWARD on the host: fetch the rollout (waits for the actor) and score it."""
    rewards_B, comps = self.host_reward(sharding.to_host(ro))
    comps = {k: np.asarray(v) for k, v in comps.items()}
    return ro, np.asarray(rewards_B, np.float32), comps, None

  def _learner_fn(self, state, rollout, rng, ref_params):
    """Everything after REWARD on the learner mesh, with the one-jit step's update key."""
    st = self.learner_step
    ro, rewards_B, comps, baseline_B = rollout
    if REFERENCE_KEY in state.extra:
      ref_params = state.extra[REFERENCE_KEY]
    with sharding.activation_rules(st.mesh, st.rules):
      _, update_rng = jax.random.split(jax.random.fold_in(rng, state.step))
      return st.learn(state, ro, rewards_B, comps, update_rng, ref_params, baseline_B)

  # ---------------------------------------------------------------- schedule
  def lag_at(self, s: int) -> int:
    return off_policy.lag_at(s, self.lag, self.reincarnate_step)

  def version(self, s: int) -> int:
    """The params version θ_v that samples the rollout of learner step s."""
    return max(s - self.lag_at(s), self._start)

  def _to_learner(self, tree):
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding.batch_sharding(self.learner_mesh,
                                                            self.learner_step.rules, x.ndim)),
        tree)

  def __call__(self, state, batch, rng):
    if self._next is None:
      self._next = self._start = int(state.step)  # the only host sync on the state
    s = self._next
    # Dispatch every rollout whose params version is now available (θ_s).
    actor_params = None
    j = s
    while j < self.num_steps and self.version(j) <= s:
      if j not in self._pending:
        if actor_params is None:
          actor_params = jax.device_put(state.params, self.actor_params_sharding)
        b = batch if j == s else sharding.shard_batch(self.pipeline.peek(j - s - 1),
                                                      self.actor_mesh, self.actor_step.rules)
        rollout = self._act(actor_params, b, rng, jnp.asarray(j, jnp.int32),
                            self.reward_params)
        if self._scorer is not None:
          rollout = self._scorer.submit(self._score_on_host, rollout)
        self._pending[j] = (s, rollout)
      j += 1
    if self.reincarnate_step and s == self.reincarnate_step:
      state = self._reincarnate(state)   # ReMix: the reference becomes the current policy
    version, rollout = self._pending.pop(s)
    if self._scorer is not None:
      rollout = rollout.result()  # the host's rewards of rollout s (raises what the scorer did)
    rollout = self._to_learner(rollout)
    if self.consume_hook is not None:
      ids = np.asarray(jax.device_get(rollout[0]["prompt_id"]))
      self.consume_hook(s, ids[::self.learner_step.rl.group_size])
    state, metrics = self._learn(state, rollout, rng, self.ref_params)
    metrics = dict(metrics)
    metrics["async/staleness"] = np.float32(s - version)
    metrics["async/in_flight"] = np.float32(len(self._pending))
    self._next = s + 1
    return state, metrics


def check_async_config(cfg) -> None:
  """What the actor–learner run cannot do, refused with the field and the fix."""
  rl = cfg.rl
  if rl.multiturn.enabled:
    from jaxrl_llm.envs.config import HOST_ENVS
    if rl.multiturn.env in HOST_ENVS:
      raise ValueError(
          f"rl.multiturn.env={rl.multiturn.env!r} is a host environment, which runs between "
          f"compiled turns (split mode), not inside the actor's jit: with rl.multiturn.enabled "
          f"set trainer.actor_devices=0 (and trainer.split_mode=True), or use an in-graph "
          f"environment (trainer.actor_devices={cfg.trainer.actor_devices})")
  if rl.length_shaping == "hapo" and rl.hapo_num_prompts < cfg.data.num_train:
    raise ValueError(f"rl.hapo_num_prompts={rl.hapo_num_prompts} must cover every training "
                     f"prompt id (data.num_train={cfg.data.num_train})")


def build_host_reward(cfg, tokenizer, examples) -> Optional[Callable]:
  """The host scorer of the run's reward components when one of them is scored on
  the host (`rewards.registry.HOST_COMPONENTS`), else None (the actor scores in-graph).

  Multi-turn: the components score the final model turn, combined with the
  environment's turn rewards (`multiturn.combine_host_reward`).
  """
  from jaxrl_llm.rewards import registry
  if not any(n in registry.HOST_COMPONENTS for n, _ in cfg.reward.components):
    return None
  scorer = registry.host_scorer(cfg.reward.components, tokenizer, examples,
                                math_last_number_fallback=cfg.reward.math_last_number_fallback)
  if cfg.rl.multiturn.enabled:
    from jaxrl_llm.rl import multiturn as multiturn_lib
    return multiturn_lib.combine_host_reward(
        cfg.rl.multiturn, multiturn_lib.final_turn_host_reward(scorer))
  return scorer


def run_rl_async(cfg, workdir: str) -> dict[str, float]:
  """`trainer.run_rl` with trainer.actor_devices > 0: the asynchronous actor–learner run."""
  from jaxrl_llm import trainer as trainer_lib  # the loop, model and data set-up
  from jaxrl_llm.data.builders import load_split
  from jaxrl_llm.rewards import registry
  from jaxrl_llm.rl import rl_step as rl_lib
  rl = cfg.rl
  check_async_config(cfg)
  actor_devices, learner_devices = split_devices(cfg.trainer.actor_devices)
  actor_mesh = sharding.make_mesh(cfg.mesh, actor_devices)
  learner_mesh = sharding.make_mesh(cfg.mesh, learner_devices)
  check_batch(cfg.data.batch_size, actor_mesh, learner_mesh, cfg.mesh.rules)
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = trainer_lib._common(  # noqa: SLF001
      cfg, workdir, "rl", extra_fn=lambda: rl_lib.init_rl_extra(rl), devices=learner_devices)
  host_needed = any(n in registry.HOST_COMPONENTS for n, _ in cfg.reward.components)
  examples = list(load_split(cfg.data, "train", workdir=workdir)) if host_needed else None
  host_reward = build_host_reward(cfg, tok, examples)
  rm = trainer_lib.restore_reward_model(cfg, tok, actor_mesh)
  reward_fn = None if host_reward is not None else registry.build_reward_fn(
      cfg.reward.components, tok, reward_model=None if rm is None else rm.reward_fn(),
      math_last_number_fallback=cfg.reward.math_last_number_fallback)
  if rl.multiturn.enabled:  # an in-graph environment between the actor's turns
    from jaxrl_llm.rl import multiturn as multiturn_lib
    step = multiturn_lib.build_step(cfg, model_cfg, tx, reward_fn, tok, mesh)
  else:
    step = rl_lib.RLStep(model_cfg, rl, tx, reward_fn, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         mesh=mesh, rules=cfg.mesh.rules, skip_nonfinite=True)
  ref_params = None
  reincarnate = rl.off_policy.remix_reincarnate_step
  if reincarnate:  # the reference lives in the state (checkpointed: it changes mid-run)
    state, sh = with_reference_in_state(state, sh)
  elif rl.needs_reference and model_cfg.lora is None:  # LoRA: the step reads the frozen base
    ref_params = jax.tree.map(jnp.copy, state.params)  # before the state is donated
  pipeline = PromptPipeline(it)
  actor_learner = ActorLearner(step, actor_mesh, mesh, sh, pipeline, cfg.trainer.num_steps,
                               lag=rl.async_lag, reincarnate_step=reincarnate,
                               ref_params=ref_params,
                               reward_params=None if rm is None else rm.params,
                               host_reward=host_reward)
  trainer_lib.say(f"actor–learner: actor mesh {dict(actor_mesh.shape)} on "
                  f"{len(actor_devices)} devices, learner mesh {dict(mesh.shape)} on "
                  f"{len(learner_devices)}, lag {rl.async_lag}, correction "
                  f"{rl.off_policy.correction!r}, rewards "
                  f"{'on the host' if host_reward is not None else 'in-graph'}"
                  f"{', multi-turn' if rl.multiturn.enabled else ''}")
  return trainer_lib._loop(trainer_lib.Run(  # noqa: SLF001
      cfg, workdir, actor_mesh, model_cfg, tok, tx, state, sh, pipeline, actor_learner,
      "rl/completion_tokens", evaluate))
