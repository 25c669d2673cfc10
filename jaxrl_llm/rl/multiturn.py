"""Multi-turn rollouts and the RL step over trajectories.

A trajectory alternates model turns and environment observations in ONE KV
cache; the history is never prefilled again:

  PREFILL    the prompt, once (shared by its G samples, `sampling.prefill`)
  RESET      the environment's first observation, appended (O slots)
  TURN t     decode up to `turn_tokens` tokens (a `lax.while_loop` over the
             rows still running; a row's turn ends on EOS or an env stop token)
  STEP       env.step(turn tokens) -> (observation, reward, done) per row
  APPEND     the observation's tokens run through the model as one chunk of O
             slots (padding slots invalid), the next-token logits taken at the
             row's last real observation token; then TURN t + 1

Per-row state: the turn counter, `active_B` (the trajectory is running), the
RoPE position and the write pointer into the completion buffer. The cache
holds gaps (slots of rows that had finished a turn or had shorter
observations are invalid, never attended), but each row's tokens are packed
left-aligned in the completion buffer and their RoPE positions are
prompt_len + (index in that buffer): exactly the positions and visible
tokens of the training forward over [prompt | completion], so the tokens
trained on are the tokens sampled, with the same log-probs up to float
rounding (tested in tests/multiturn_test.py). Observations are tokenised on
their own and appended (append-only), never re-tokenised with the model's
text.

Outputs (B rows, C = T·turn_tokens + T·O buffer columns):
  completion      [B, C] model and observation tokens, packed, pad after
  completion_mask [B, C] 1 on every real token (the training forward's context)
  model_mask      [B, C] 1 on model tokens only: the loss mask
  sampler_logp    [B, C] the sampler's log-probs on model tokens (0 elsewhere)
  final_turn      [B, L] the last model turn of each row (scored by reward_fn)
  turn_rewards    [B, T] the environment's reward for each turn (0 after done)
  turns [B], finished [B] (the last turn ended on a stop token and the
  trajectory ended by itself, not by running out of turns), lengths [B]
  (model tokens) and env_<key> [B] (the environment's info, summed over turns).

Random draws: the key of a model token is fold_in(row key, its index in the
completion buffer), the single-turn sampler's rule (with one turn and no
observation the rollout equals `sampling.sample`, tested).

Two ways to run it: `multiturn_rollout` with an in-graph environment
(`jaxrl_llm.envs.InGraphEnv`) traces everything into one program, the RL step
included (`MultiTurnRLStep`). `make_multiturn_split_step` compiles each stage
on its own and calls the environment between them on the host: a
`jaxrl_llm.envs.HostEnvAdapter` (Python environments and tools), or an
in-graph environment jitted on its own (the same trajectories as one jit).

Not done here: decode compaction (every row stays in the decode batch until
the turn ends for all) and remax's greedy baseline.

Shape letters: R prompts, G group size, B = R·G rows, P prompt length, T
turns, L tokens per turn, O observation tokens, C completion columns, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import sampling, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.rl import rl_step as rls

# Rollout arrays that are not per-prompt task data (kept out of RewardInputs.task).
_ROLLOUT_KEYS = ("completion", "completion_mask", "model_mask", "obs_mask", "sampler_logp",
                 "finished", "lengths", "turns", "final_turn", "final_turn_mask",
                 "turn_rewards")


@dataclasses.dataclass(frozen=True)
class TurnSpec:
  """Static shape and sampling options of a multi-turn rollout."""
  max_turns: int
  turn_tokens: int
  obs_len: int
  eos_id: int
  stop_tokens: tuple[int, ...] = ()   # env stop tokens (EOS always stops a turn)
  pad_id: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  categorical: str = "gumbel"         # sampling.choose_tokens
  # A turn ending on EOS ends the trajectory. False for chat models whose turns end on
  # the EOS (<|im_end|> in Qwen / Hermes / ChatML tokenizers): then only the
  # environment's done or max_turns ends it (see envs.base.OBSERVATION_TEMPLATES).
  eos_ends: bool = True
  logits_processor: Optional[Callable] = None
  cache_dtype: Optional[str] = None

  def __post_init__(self):
    if self.max_turns < 1 or self.turn_tokens < 1 or self.obs_len < 1:
      raise ValueError(f"multi-turn rollout needs max_turns, turn_tokens and obs_len >= 1; "
                       f"got {self.max_turns}, {self.turn_tokens}, {self.obs_len}")

  @property
  def completion_len(self) -> int:
    """C: T model turns and T observations (the reset one and T − 1 between turns)."""
    return self.max_turns * (self.turn_tokens + self.obs_len)


class TurnState(NamedTuple):
  """The carry of a multi-turn rollout between stages (a pytree)."""
  cache: Any
  logits_BV: jax.Array      # next-token logits of each row
  pos_B: jax.Array          # RoPE position of the row's next token
  n_B: jax.Array            # tokens written to the completion buffer
  active_B: jax.Array       # the trajectory is still running
  row_keys_B: jax.Array
  tokens_BC: jax.Array
  model_mask_BC: jax.Array
  obs_mask_BC: jax.Array
  logp_BC: jax.Array
  final_BL: jax.Array
  final_mask_BL: jax.Array
  finished_B: jax.Array
  turns_B: jax.Array
  turn_rewards_BT: jax.Array
  info: dict


def start(cfg: ModelConfig, params, prompt_tokens_RP, prompt_mask_RP, rng, spec: TurnSpec, *,
          group_size: int = 1, info_keys=()) -> TurnState:
  """PREFILL: the prompts into a cache sized for the whole trajectory."""
  R, P = prompt_tokens_RP.shape
  B, C, L = R * group_size, spec.completion_len, spec.turn_tokens
  logits_BV, cache, prompt_len_B = sampling.prefill(
      cfg, params, prompt_tokens_RP, prompt_mask_RP, cache_size=P + C, group_size=group_size,
      cache_dtype=spec.cache_dtype)
  zeros = lambda shape, dt: jnp.zeros(shape, dt)
  return TurnState(
      cache=cache, logits_BV=logits_BV.astype(jnp.float32), pos_B=prompt_len_B,
      n_B=zeros((B,), jnp.int32), active_B=jnp.ones((B,), bool),
      row_keys_B=sampling.row_keys(rng, B),
      tokens_BC=jnp.full((B, C), spec.pad_id, jnp.int32),
      model_mask_BC=zeros((B, C), jnp.float32), obs_mask_BC=zeros((B, C), jnp.float32),
      logp_BC=zeros((B, C), jnp.float32), final_BL=jnp.full((B, L), spec.pad_id, jnp.int32),
      final_mask_BL=zeros((B, L), jnp.float32), finished_B=zeros((B,), bool),
      turns_B=zeros((B,), jnp.int32), turn_rewards_BT=zeros((B, spec.max_turns), jnp.float32),
      info={k: zeros((B,), jnp.float32) for k in info_keys})


def append_observation(cfg: ModelConfig, params, st: TurnState, obs_BO, obs_len_B,
                       spec: TurnSpec) -> TurnState:
  """APPEND: each running row's observation (its first obs_len_B tokens) into
  the cache and the completion buffer, as one chunk; rows with nothing to
  append keep their next-token logits."""
  B, C = st.tokens_BC.shape
  O = spec.obs_len
  obs_BO = jnp.asarray(obs_BO, jnp.int32)
  if obs_BO.shape != (B, O):
    raise ValueError(f"observation tokens have shape {obs_BO.shape}; the environment must "
                     f"return [rows, obs_len] = {(B, O)}")
  len_B = jnp.where(st.active_B, jnp.clip(jnp.asarray(obs_len_B, jnp.int32), 0, O), 0)
  j_O = jnp.arange(O, dtype=jnp.int32)[None, :]
  valid_BO = j_O < len_B[:, None]
  h_BOD, cache = decoder.forward_with_cache(cfg, params, jnp.where(valid_BO, obs_BO, spec.pad_id),
                                            st.pos_B[:, None] + j_O, valid_BO, st.cache,
                                            return_hidden=True)
  last_B = jnp.maximum(len_B - 1, 0)
  h_B1D = jnp.take_along_axis(h_BOD, last_B[:, None, None], axis=1)
  logits_BV = decoder.unembed(cfg, params, h_B1D)[:, 0].astype(jnp.float32)
  logits_BV = jnp.where((len_B > 0)[:, None], logits_BV, st.logits_BV)
  rows_BO = jnp.broadcast_to(jnp.arange(B)[:, None], (B, O))
  col_BO = jnp.where(valid_BO, st.n_B[:, None] + j_O, C)  # column C is dropped
  return st._replace(
      cache=cache, logits_BV=logits_BV, pos_B=st.pos_B + len_B, n_B=st.n_B + len_B,
      tokens_BC=st.tokens_BC.at[rows_BO, col_BO].set(obs_BO, mode="drop"),
      obs_mask_BC=st.obs_mask_BC.at[rows_BO, col_BO].set(1.0, mode="drop"))


def decode_turn(cfg: ModelConfig, params, st: TurnState, spec: TurnSpec):
  """TURN: up to `turn_tokens` tokens for every running row.

  Returns (state, turn_tokens_BL, turn_mask_BL, stopped_B); stopped_B: the
  turn ended on EOS or an env stop token (False: it ran out of tokens).
  """
  B, C = st.tokens_BC.shape
  L = spec.turn_tokens
  stop_ids = jnp.asarray((spec.eos_id,) + tuple(spec.stop_tokens), jnp.int32)
  rows_B = jnp.arange(B, dtype=jnp.int32)

  def body(carry):
    s, done_B, stopped_B, turn_BL, turn_len_B, st = carry
    live_B = ~done_B
    ctx = sampling.DecodeContext(s, rows_B, turn_BL, live_B, B)
    keys_B = jax.vmap(jax.random.fold_in)(st.row_keys_B, st.n_B)
    token_B, logp_B = sampling.choose_tokens(
        st.logits_BV, ctx, keys_B, logits_processor=spec.logits_processor, greedy=spec.greedy,
        temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
        categorical=spec.categorical)
    stop_B = live_B & jnp.any(token_B[:, None] == stop_ids[None, :], axis=1)
    col_B = jnp.where(live_B, st.n_B, C)  # column C is dropped
    token_in_B = jnp.where(live_B, token_B, spec.pad_id)
    logits, cache = decoder.forward_with_cache(cfg, params, token_in_B[:, None],
                                               st.pos_B[:, None], live_B[:, None], st.cache)
    live = live_B.astype(jnp.int32)
    st = st._replace(
        # A row that has ended its turn keeps its logits (the next turn starts from them).
        cache=cache, logits_BV=jnp.where(live_B[:, None], logits[:, 0].astype(jnp.float32),
                                         st.logits_BV),
        pos_B=st.pos_B + live,
        n_B=st.n_B + live,
        tokens_BC=st.tokens_BC.at[rows_B, col_B].set(token_B, mode="drop"),
        model_mask_BC=st.model_mask_BC.at[rows_B, col_B].set(1.0, mode="drop"),
        logp_BC=st.logp_BC.at[rows_B, col_B].set(logp_B, mode="drop"))
    turn_BL = turn_BL.at[rows_B, jnp.where(live_B, s, L)].set(token_B, mode="drop")
    return (s + 1, done_B | stop_B, stopped_B | stop_B, turn_BL, turn_len_B + live, st)

  def cond(carry):
    return (carry[0] < L) & jnp.any(~carry[1])

  carry = (jnp.zeros((), jnp.int32), ~st.active_B, jnp.zeros((B,), bool),
           jnp.full((B, L), spec.pad_id, jnp.int32), jnp.zeros((B,), jnp.int32), st)
  _, _, stopped_B, turn_BL, turn_len_B, st = jax.lax.while_loop(cond, body, carry)
  turn_mask_BL = (jnp.arange(L)[None, :] < turn_len_B[:, None]).astype(jnp.float32)
  return st, turn_BL, turn_mask_BL, stopped_B


def record_step(st: TurnState, turn: int, turn_BL, turn_mask_BL, stopped_B, reward_B, done_B,
                info: Mapping[str, Any], spec: TurnSpec) -> TurnState:
  """STEP bookkeeping: turn rewards, counters, the final turn, which rows go on."""
  was_active_B = st.active_B
  act = was_active_B.astype(jnp.float32)
  n_B = jnp.sum(turn_mask_BL > 0, axis=1).astype(jnp.int32)
  last_B = jnp.take_along_axis(turn_BL, jnp.maximum(n_B - 1, 0)[:, None], axis=1)[:, 0]
  ended_eos_B = stopped_B & (n_B > 0) & (last_B == spec.eos_id)
  ends_B = jnp.asarray(done_B, bool) | (ended_eos_B if spec.eos_ends else False)
  keep = was_active_B[:, None]
  new_info = dict(st.info)
  for k in st.info:
    if k in info:
      new_info[k] = st.info[k] + jnp.asarray(info[k], jnp.float32) * act
  return st._replace(
      active_B=was_active_B & ~ends_B & (turn < spec.max_turns - 1),
      final_BL=jnp.where(keep, turn_BL, st.final_BL),
      final_mask_BL=jnp.where(keep, turn_mask_BL, st.final_mask_BL),
      finished_B=jnp.where(was_active_B, stopped_B & ends_B, st.finished_B),
      turns_B=st.turns_B + was_active_B.astype(jnp.int32),
      turn_rewards_BT=st.turn_rewards_BT.at[:, turn].set(
          jnp.asarray(reward_B, jnp.float32) * act),
      info=new_info)


def finish(st: TurnState) -> dict:
  """The rollout's per-row arrays (see the module docstring)."""
  out = dict(completion=st.tokens_BC,
             completion_mask=jnp.maximum(st.model_mask_BC, st.obs_mask_BC),
             model_mask=st.model_mask_BC, obs_mask=st.obs_mask_BC, sampler_logp=st.logp_BC,
             finished=st.finished_B, lengths=jnp.sum(st.model_mask_BC, axis=1).astype(jnp.int32),
             turns=st.turns_B, final_turn=st.final_BL, final_turn_mask=st.final_mask_BL,
             turn_rewards=st.turn_rewards_BT)
  out.update({f"env_{k}": v for k, v in st.info.items()})
  return out


def _has_reset_observation(env) -> bool:
  from jaxrl_llm.envs.base import InGraphEnv
  return type(env).reset is not InGraphEnv.reset


def multiturn_rollout(cfg: ModelConfig, params, prompt_tokens_RP, prompt_mask_RP, rng, env,
                      task_B: Mapping[str, Any], spec: TurnSpec, *, group_size: int = 1) -> dict:
  """A whole multi-turn rollout with an in-graph environment (pure JAX; jit it).

  prompt_tokens_RP: left-padded prompts, [R, P] (B = R·G rows, each prompt
  prefilled once); task_B: the per-row task arrays the environment reads
  (already repeated to B rows).
  """
  params = decoder.decode_params(cfg, params)
  st = start(cfg, params, prompt_tokens_RP, prompt_mask_RP, rng, spec, group_size=group_size,
             info_keys=env.info_keys)
  env_state, obs_BO, obs_len_B = env.reset(task_B)
  if _has_reset_observation(env):
    st = append_observation(cfg, params, st, obs_BO, obs_len_B, spec)
  for turn in range(spec.max_turns):
    st, turn_BL, turn_mask_BL, stopped_B = decode_turn(cfg, params, st, spec)
    env_state, es = env.step(env_state, turn_BL, turn_mask_BL, stopped_B, st.active_B, task_B)
    st = record_step(st, turn, turn_BL, turn_mask_BL, stopped_B, es.reward_B, es.done_B,
                     es.info, spec)
    if turn < spec.max_turns - 1:
      st = append_observation(cfg, params, st, es.obs_tokens_BO, es.obs_len_B, spec)
  return finish(st)


# ---------------------------------------------------------------------------
# The RL step over trajectories.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MultiTurnRLStep(rls.RLStep):
  """`RLStep` whose rollout is multi-turn: GRPO / Dr. GRPO / RLOO / ... over trajectories.

  reward_B = outcome_weight · reward_fn(final model turn) + turn_reward_weight · Σ_t r_t
  (rl.multiturn); reward_fn may be None (environment rewards only). The loss
  mask is the model mask: observation tokens are context, never trained on.
  `rl.max_new_tokens` is the per-turn budget unless rl.multiturn.turn_tokens
  is set, and is also the constant of Dr. GRPO's normaliser.
  """
  env: Any = None

  def __post_init__(self):
    rl = self.rl
    if self.env is None:
      raise ValueError("MultiTurnRLStep needs env: an in-graph environment "
                       "(jaxrl_llm.envs.InGraphEnv), e.g. envs.make_env('calculator', tokenizer)")
    if rl.advantage == "remax":
      raise ValueError("advantage='remax' needs a greedy baseline rollout, which the "
                       "multi-turn rollout does not run; use grpo, dr_grpo or rloo")
    if rl.max_len_schedule != "none":
      raise ValueError(f"rl.max_len_schedule={rl.max_len_schedule!r} is not supported with "
                       "rl.multiturn; the per-turn budget is rl.multiturn.turn_tokens")

  def turn_spec(self) -> TurnSpec:
    rl, mt = self.rl, self.rl.multiturn
    return TurnSpec(max_turns=mt.max_turns, turn_tokens=mt.turn_tokens or rl.max_new_tokens,
                    obs_len=self.env.obs_len, eos_id=self.eos_id,
                    stop_tokens=tuple(self.env.stop_tokens), pad_id=self.pad_id,
                    temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                    categorical=rl.rollout_categorical, eos_ends=mt.eos_ends,
                    logits_processor=self.rollout_processor())

  @property
  def length_widths(self) -> tuple[int, ...]:
    """One width, the whole buffer: no length-bucketed update over trajectories
    (`rl.length_buckets` cuts columns of rl.max_new_tokens-wide arrays)."""
    return (self.turn_spec().completion_len,)

  def rollout(self, params, batch, rng, step) -> dict:
    del step
    from jaxrl_llm.envs.base import InGraphEnv
    if not isinstance(self.env, InGraphEnv):
      raise ValueError(
          f"the multi-turn environment {type(self.env).__name__} runs on the host between "
          "compiled turns, not inside one jit: set trainer.split_mode=True "
          "(make_multiturn_split_step) and trainer.actor_devices=0")
    rl = self.rl
    rows = rls._repeat(dict(batch), rl.group_size)
    shared = rl.rollout_shared_prefix and rl.group_size > 1
    prompts = batch if shared else rows
    out = multiturn_rollout(self.model, params, prompts["prompt_tokens"],
                            prompts["prompt_mask"], rng, self.env, rows, self.turn_spec(),
                            group_size=rl.group_size if shared else 1)
    return dict(rows, **out)

  def reward_inputs(self, ro, baseline: bool = False) -> RewardInputs:
    del baseline
    task = {k: v for k, v in ro.items() if k not in rls.PROMPT_KEYS + _ROLLOUT_KEYS
            and not k.startswith("env_")}
    return RewardInputs(ro["prompt_tokens"], ro["prompt_mask"], ro["final_turn"],
                        ro["final_turn_mask"], ro["finished"], task)

  def score(self, ro, reward_params=None):
    mt = self.rl.multiturn
    turn_B = jnp.sum(ro["turn_rewards"], axis=1)
    comps = {"env_turn_reward": turn_B}
    rewards_B = mt.turn_reward_weight * turn_B
    if self.reward_fn is not None:
      outcome_B, parts, _ = super().score(ro, reward_params)
      comps.update(parts)
      rewards_B = rewards_B + mt.outcome_weight * outcome_B
    return rewards_B, comps, None

  def prepare(self, state, ro, rewards_B, comps, ref_params, baseline_B=None):
    rows, metrics, extra, valid_B, kl_BL = super().prepare(state, ro, rewards_B, comps,
                                                           ref_params, baseline_B)
    rows["loss_mask"] = rows["loss_mask"] * rows["model_mask"]
    if kl_BL is not None:
      kl_BL = kl_BL * rows["model_mask"]
    metrics["multiturn/turns"] = jnp.mean(ro["turns"].astype(jnp.float32))
    metrics["multiturn/obs_tokens"] = jnp.mean(jnp.sum(ro["obs_mask"], axis=1))
    for k, v in ro.items():
      if k.startswith("env_"):
        metrics[f"multiturn/{k[4:]}"] = jnp.mean(v)
    return rows, metrics, extra, valid_B, kl_BL

  def __call__(self, state, batch, rng, ref_params=None, reward_params=None):
    with sharding.activation_rules(self.mesh, self.rules):
      rng = jax.random.fold_in(rng, state.step)
      rollout_rng, update_rng = jax.random.split(rng)
      ro = self.rollout(state.params, batch, rollout_rng, state.step)
      rewards_B, comps, _ = self.score(ro, reward_params)
      return self.learn(state, ro, rewards_B, comps, update_rng, ref_params)


# ---------------------------------------------------------------------------
# Split mode: compiled stages, the environment on the host between them.
# ---------------------------------------------------------------------------
def make_split_rollout(cfg: ModelConfig, spec: TurnSpec, env, *, group_size: int = 1,
                       mesh=None, rules=sharding.DEFAULT_RULES):
  """`rollout(params, prompt_tokens, prompt_mask, rng, task_B) -> dict` with each
  stage jitted once and `env` called between them.

  env: a `jaxrl_llm.envs.HostEnvAdapter` (numpy in, numpy out, on the host:
  Python environments, tools, time limits) or an `InGraphEnv` (its step
  jitted on its own: the same trajectories as `multiturn_rollout`).
  """
  from jaxrl_llm.envs.base import InGraphEnv
  in_graph = isinstance(env, InGraphEnv)

  def scoped(fn):
    def run(*args):
      with sharding.activation_rules(mesh, rules):
        return fn(*args)
    return run

  start_jit = jax.jit(scoped(lambda p, t, m, r: start(
      cfg, decoder.decode_params(cfg, p), t, m, r, spec, group_size=group_size,
      info_keys=env.info_keys)))
  append_jit = jax.jit(scoped(lambda p, st, o, n: append_observation(
      cfg, decoder.decode_params(cfg, p), st, o, n, spec)))
  decode_jit = jax.jit(scoped(lambda p, st: decode_turn(cfg, decoder.decode_params(cfg, p),
                                                        st, spec)))
  record_jit = jax.jit(lambda st, t, *a: record_step(st, t, *a, spec), static_argnums=1)
  finish_jit = jax.jit(finish)
  env_step = jax.jit(env.step) if in_graph else env.step
  reset_has_obs = _has_reset_observation(env) if in_graph else True

  def rollout(params, prompt_tokens, prompt_mask, rng, task_B):
    st = start_jit(params, prompt_tokens, prompt_mask, rng)
    env_state, obs_BO, obs_len_B = (jax.jit(env.reset) if in_graph else env.reset)(task_B)
    if reset_has_obs:
      st = append_jit(params, st, obs_BO, obs_len_B)
    for turn in range(spec.max_turns):
      st, turn_BL, turn_mask_BL, stopped_B = decode_jit(params, st)
      if in_graph:
        env_state, es = env_step(env_state, turn_BL, turn_mask_BL, stopped_B, st.active_B,
                                 task_B)
      else:
        env_state, es = env.step(env_state, *(np.asarray(jax.device_get(x)) for x in (
            turn_BL, turn_mask_BL, stopped_B, st.active_B)), task_B)
      st = record_jit(st, turn, turn_BL, turn_mask_BL, stopped_B, es.reward_B, es.done_B,
                      {k: es.info[k] for k in env.info_keys if k in es.info})
      if turn < spec.max_turns - 1:
        st = append_jit(params, st, es.obs_tokens_BO, es.obs_len_B)
    return finish_jit(st)

  return rollout


def make_multiturn_split_step(step: MultiTurnRLStep, env=None,
                              host_reward: Optional[Callable] = None):
  """Split mode of `MultiTurnRLStep`: compiled turns with `env` between them,
  then rewards, then the learn jit.

  env: defaults to step.env (in-graph, jitted on its own); pass a
  `HostEnvAdapter` for Python environments and tools. host_reward(rollout
  numpy) -> (outcome_B, {name: values_B}) replaces step.reward_fn on the final
  turn (it sees the rollout dict: final_turn, final_turn_mask, ...). Set
  rl.tis_cap > 0 to weight the loss by truncated importance ratios against
  the sampler's log-probs.
  """
  env = step.env if env is None else env
  rl = step.rl
  spec = dataclasses.replace(step.turn_spec(), obs_len=env.obs_len,
                             stop_tokens=tuple(env.stop_tokens))
  shared = rl.rollout_shared_prefix and rl.group_size > 1
  rollout = make_split_rollout(step.model, spec, env, group_size=rl.group_size if shared else 1,
                               mesh=step.mesh, rules=step.rules)
  score_jit = jax.jit(step.score)
  combined_host_reward = (None if host_reward is None
                          else combine_host_reward(rl.multiturn, host_reward))

  def learn(state, ro, rewards_B, comps, rng, ref_params):
    with sharding.activation_rules(step.mesh, step.rules):
      return step.learn(state, ro, rewards_B, comps, rng, ref_params)
  learn_jit = jax.jit(learn, donate_argnums=(0,))

  def run(state, batch, rng, ref_params=None):
    rng = jax.random.fold_in(rng, state.step)
    rollout_rng, update_rng = jax.random.split(rng)
    rows = rls._repeat(dict(batch), rl.group_size)
    prompts = batch if shared else rows
    out = rollout(state.params, prompts["prompt_tokens"], prompts["prompt_mask"], rollout_rng,
                  rows)
    ro = dict(rows, **out)
    if host_reward is not None:
      rewards_B, comps = combined_host_reward(sharding.to_host(ro))
    else:
      rewards_B, comps, _ = score_jit(ro)
    comps = {k: jnp.asarray(v, jnp.float32) for k, v in comps.items()}
    return learn_jit(state, ro, jnp.asarray(rewards_B, jnp.float32), comps, update_rng,
                     ref_params)

  run.rollout = rollout
  return run


# ---------------------------------------------------------------------------
# From an experiment config (the launcher's kind="rl" with rl.multiturn.enabled).
# ---------------------------------------------------------------------------
def build_step(cfg, model_cfg: ModelConfig, tx, reward_fn, tokenizer, mesh, *,
               examples: Optional[Sequence[Mapping]] = None) -> MultiTurnRLStep:
  """The multi-turn RL step of an `ExperimentConfig` (rl.multiturn.env and its options).

  A host environment (`envs.config.HOST_ENVS`, e.g. "tool") becomes the
  step's env and runs in split mode only (`make_multiturn_split_step`); each
  row's environment is reset with its example, looked up by prompt_id in
  `examples` (the training split). The config's "tool" environment does not
  read them (the final turn is scored by reward.components), so without
  `examples` every row's example is {}.
  """
  from jaxrl_llm.envs.calculator import make_env
  from jaxrl_llm.envs.config import DEFAULT_OBS_LEN, HOST_ENVS
  from jaxrl_llm.envs.tools import make_tool_env
  mtc = cfg.rl.multiturn
  options = dict(mtc.env_options)
  if mtc.env in HOST_ENVS:
    if examples is None:
      examples = collections.defaultdict(dict)  # prompt id -> {}
    options.setdefault("obs_len", DEFAULT_OBS_LEN[mtc.env])
    env = make_tool_env(tokenizer, examples, **options)
  else:
    env = make_env(mtc.env, tokenizer, **options)
  return MultiTurnRLStep(model_cfg, cfg.rl, tx, reward_fn, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, mesh=mesh, rules=cfg.mesh.rules, env=env)


def combine_host_reward(mtc, host_reward: Callable) -> Callable:
  """A host scorer of whole trajectories from one of their outcome (`MultiTurnRLStep.score`
  on the host): rollout numpy -> (rewards_B, comps) with

    rewards_B = mtc.outcome_weight · outcome_B + mtc.turn_reward_weight · Σ_t turn_rewards_t

  where host_reward(rollout) -> (outcome_B, comps) and comps gains "env_turn_reward".
  """
  def score(ro):
    outcome_B, comps = host_reward(ro)
    turn_B = np.sum(np.asarray(ro["turn_rewards"], np.float32), axis=1)
    rewards_B = (np.float32(mtc.outcome_weight) * np.asarray(outcome_B, np.float32)
                 + np.float32(mtc.turn_reward_weight) * turn_B)
    return rewards_B, dict(comps, env_turn_reward=turn_B)
  return score


def final_turn_host_reward(scorer: Callable) -> Callable:
  """A split-mode host scorer of single-turn rollouts (`rewards.registry.host_scorer`)
  applied to each trajectory's final model turn."""
  def score(ro):
    return scorer(dict(ro, completion=ro["final_turn"], completion_mask=ro["final_turn_mask"]))
  return score


def evaluate(step: MultiTurnRLStep, params, batches, correct_fn: Callable, *,
             greedy: bool = True, rng=None, max_turns: Optional[int] = None) -> dict:
  """Accuracy of multi-turn rollouts (one per prompt) over `batches`.

  correct_fn(rollout numpy dict) -> bool [B] (e.g. the final turn equals the
  answer); the batch's non-numeric entries (e.g. answer strings) reach it,
  not the jit. Returns accuracy, mean turns and tool calls per trajectory.
  """
  spec = dataclasses.replace(step.turn_spec(), greedy=greedy, logits_processor=None)
  if max_turns is not None:  # e.g. 1: the answer without any tool call
    spec = dataclasses.replace(spec, max_turns=max_turns)
  fn = jax.jit(lambda p, b, k: multiturn_rollout(step.model, p, b["prompt_tokens"],
                                                 b["prompt_mask"], k, step.env, b, spec))
  rng = jax.random.key(0) if rng is None else rng
  hits, turns, n, info = 0.0, 0.0, 0, {}
  for i, batch in enumerate(batches):
    arrays = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    ro = jax.device_get(fn(params, arrays, jax.random.fold_in(rng, i)))
    ro = dict(batch, **ro)
    hits += float(np.sum(correct_fn(ro)))
    turns += float(np.sum(ro["turns"]))
    for k, v in ro.items():
      if k.startswith("env_"):
        info[k[4:]] = info.get(k[4:], 0.0) + float(np.sum(v))
    n += len(ro["turns"])
  return dict(accuracy=hits / max(n, 1), turns=turns / max(n, 1),
              **{k: v / max(n, 1) for k, v in info.items()})
