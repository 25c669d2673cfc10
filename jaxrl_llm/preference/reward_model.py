"""Reward models: a scalar head (or an ensemble of K heads) on the decoder trunk.

Params: {"trunk": decoder params, "head": [D, K]}. The reward of a (prompt,
completion) row is read at the last real completion token (the EOS token for
pipeline batches and finished samples), where the causal trunk has seen the
whole response:

  R_k(x, y) = h_T(x, y) · w_k,    h_T the final-norm hidden state at that token.

K ≥ 1 heads on one shared trunk form a cheap ensemble (Zhang et al. 2024,
"Improving Reinforcement Learning from Human Feedback with Efficient Reward
Model Ensemble"); the heads differ by their initialisation. Training is
Bradley–Terry per head (`rm_losses.bradley_terry`), averaged over heads:

  ℓ = (1/K) Σ_k −log σ(R_k(x, y_w) − R_k(x, y_l) − m),

with an optional per-pair margin m from the batch (key "margin"), and
optionally the chosen responses' NLL through the trunk's LM head as a
regulariser (`RewardModelStep.sft_coef`). Ensemble
rewards are aggregated by name (`rm_losses.ENSEMBLE_AGGREGATIONS`): "mean",
"worst_case" (min_k) or "uncertainty_weighted" (mean − λ·var), Coste et al.
2024, "Reward Model Ensembles Help Mitigate Overoptimization".

`reward_model_fn` turns a trained RM into an in-graph reward for the RL and
online-DPO steps; its params are an argument (traced, sharded), never a
constant folded into the compiled program. `restore_reward_model` reads a
trained RM back from the workdir of a kind="reward_model" run (its config
snapshot gives the architecture and the heads, its checkpoint the params):
what a config's `reward.reward_model_path` points at.

Shape letters: B rows, N pairs, K heads, P prompt length, L completion
length, T = P + L, D hidden size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm import config_checks, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.preference import rm_losses
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update

HEAD_AXES = ("embed", None)  # head [D, K]


# ---------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------
def init_reward_model(cfg: ModelConfig, rng: jax.Array, num_heads: int = 1,
                      trunk_params=None) -> dict[str, Any]:
  """RM params; the trunk is `trunk_params` (e.g. an SFT policy) or a fresh init.

  Heads are normal(0, 1/√D), so each starts with unit-scale rewards
  (the final norm makes h_T unit-scale) and the members of an ensemble differ.
  """
  if num_heads < 1:
    raise ValueError(f"init_reward_model: num_heads must be >= 1, got {num_heads}")
  trunk_rng, head_rng = jax.random.split(rng)
  trunk = decoder.init_params(cfg, trunk_rng) if trunk_params is None else trunk_params
  D = cfg.hidden_size
  head = jax.random.normal(head_rng, (D, num_heads), jnp.float32) / jnp.sqrt(D)
  return {"trunk": trunk, "head": head.astype(cfg.weights_dtype)}


def reward_model_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  return {"trunk": decoder.param_logical_axes(cfg), "head": HEAD_AXES}


def reward_model_shapes(cfg: ModelConfig, num_heads: int) -> dict[str, Any]:
  return {"trunk": decoder.param_shapes(cfg),
          "head": jax.ShapeDtypeStruct((cfg.hidden_size, num_heads), cfg.weights_dtype)}


def reward_model_shardings(cfg: ModelConfig, mesh: Mesh, num_heads: int,
                           rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
  """NamedShardings of the RM params (the trunk as the policy, the head by `embed`)."""
  return sharding.tree_shardings(mesh, rules, reward_model_logical_axes(cfg),
                                 reward_model_shapes(cfg, num_heads))


def create_reward_model_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                              rng: jax.Array, mesh: Mesh, rules=sharding.DEFAULT_RULES, *,
                              num_heads: int = 1, trunk_params=None
                              ) -> tuple[TrainState, TrainState]:
  """A sharded TrainState of RM params (and its shardings), created in place."""
  def init(rng, trunk):
    params = init_reward_model(cfg, rng, num_heads, trunk)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), extra={})

  abstract = jax.eval_shape(init, rng, trunk_params)
  rep = NamedSharding(mesh, PartitionSpec())
  p_sh = reward_model_shardings(cfg, mesh, num_heads, rules)
  params_struct = jax.tree.structure(abstract.params)

  def is_params(node):
    return jax.tree.structure(node) == params_struct

  # Optimizer moments are param-shaped: they follow the params' shardings.
  opt_sh = jax.tree.map(lambda node: p_sh if is_params(node) else rep, abstract.opt_state,
                        is_leaf=is_params)
  shardings = TrainState(step=rep, params=p_sh, opt_state=opt_sh, extra={})
  if trunk_params is not None:
    trunk_params = jax.device_put(trunk_params, p_sh["trunk"])
  state = jax.jit(init, out_shardings=shardings)(rng, trunk_params)
  return state, shardings


# ---------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------
def reward_scores(cfg: ModelConfig, rm_params, prompt_tokens_BP, prompt_mask_BP,
                  completion_BL, completion_mask_BL) -> jax.Array:
  """Rewards of every head, float32 [K, B].

  Read at the last real completion token, position P − 1 + |y| (the last
  prompt token when the completion is empty). Completions are left-aligned
  and right-padded, prompts left-padded.
  """
  return _hidden_and_scores(cfg, rm_params, prompt_tokens_BP, prompt_mask_BP, completion_BL,
                            completion_mask_BL)[1]


def _hidden_and_scores(cfg, rm_params, prompt_tokens_BP, prompt_mask_BP, completion_BL,
                       completion_mask_BL):
  """(final hidden states h_BTD, rewards_KB) of one trunk forward."""
  P = prompt_tokens_BP.shape[1]
  tokens = jnp.concatenate([prompt_tokens_BP, completion_BL], axis=1).astype(jnp.int32)
  segments = jnp.concatenate([(prompt_mask_BP != 0).astype(jnp.int32),
                              (completion_mask_BL != 0).astype(jnp.int32)], axis=1)
  h_BTD = decoder.hidden_states(cfg, rm_params["trunk"], tokens, segment_ids_BT=segments)
  length_B = jnp.sum(completion_mask_BL != 0, axis=1)
  last_B = P - 1 + length_B
  h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  # float32: rewards are compared by differences that bf16 would blur.
  scores_BK = jnp.einsum("BD,DK->BK", h_BD.astype(jnp.float32),
                         rm_params["head"].astype(jnp.float32))
  return h_BTD, scores_BK.T


def aggregate(scores_KB: jax.Array, aggregation: str = "mean", *, lam: float = 0.1):
  """One reward per row from K heads, by name (see `rm_losses.ENSEMBLE_AGGREGATIONS`)."""
  fn = rm_losses.get_ensemble_aggregation(aggregation)
  if aggregation == "uncertainty_weighted":
    return fn(scores_KB, lam=lam)
  return fn(scores_KB)


def reward_model_fn(cfg: ModelConfig, num_heads: int, aggregation: str = "mean", *,
                    lam: float = 0.1, with_members: bool = False):
  """An in-graph reward from a (trained) RM: fn(inputs, rm_params) -> (rewards_B, comps).

  rewards_B = aggregate(R_KB) by `aggregation`; comps = {"rm_mean": mean_k R,
  "rm_std": std_k R} (population std; 0 for one head) and, with
  `with_members`, "rm_members_BK" (every head's reward, for SEA-style pair
  selection in `jaxrl_llm.preference.online`). `rm_params` is an argument
  of the returned function so that the calling step receives it traced.
  """
  rm_losses.get_ensemble_aggregation(aggregation)  # validates the name early
  if num_heads < 1:
    raise ValueError(f"reward_model_fn: num_heads must be >= 1, got {num_heads}")

  def fn(inputs: RewardInputs, rm_params):
    K = rm_params["head"].shape[-1]
    if K != num_heads:
      raise ValueError(f"reward_model_fn was built for {num_heads} heads but rm_params has {K}")
    config_checks.require_positions(
        inputs.prompt_tokens_BP.shape[1] + inputs.completion_BL.shape[1],
        cfg.max_position_embeddings, "the reward model (reward.reward_model_path)")
    scores_KB = reward_scores(cfg, rm_params, inputs.prompt_tokens_BP, inputs.prompt_mask_BP,
                              inputs.completion_BL, inputs.completion_mask_BL)
    comps = {"rm_mean": jnp.mean(scores_KB, axis=0), "rm_std": jnp.std(scores_KB, axis=0)}
    if with_members:
      comps["rm_members_BK"] = scores_KB.T
    return aggregate(scores_KB, aggregation, lam=lam), comps

  return fn


@dataclasses.dataclass(frozen=True)
class RestoredRewardModel:
  """A trained reward model read back from a run's workdir (`restore_reward_model`)."""
  model: ModelConfig
  num_heads: int
  aggregation: str            # the run's reward_model.aggregation
  lam: float                  # ... and its uncertainty_weighted λ
  params: Any                 # {"trunk", "head"}, placed by `shardings`
  shardings: Any
  workdir: str
  step: int                   # the checkpoint step the params come from

  def reward_fn(self, *, with_members: bool = False) -> Callable:
    """The in-graph reward fn(inputs, rm_params) of `reward_model_fn` for this model."""
    return reward_model_fn(self.model, self.num_heads, self.aggregation, lam=self.lam,
                           with_members=with_members)


def restore_reward_model(workdir: str, *, mesh: Mesh, model_config_fn: Callable,
                         rules=sharding.DEFAULT_RULES,
                         tokenizer: Optional[str] = None, run_config=None
                         ) -> RestoredRewardModel:
  """Reads the reward model of a kind="reward_model" run from its workdir.

  The latest checkpoint's config snapshot gives the model section, the
  tokenizer and the heads (num_heads, aggregation, lam); the params are then
  restored onto `mesh` with the RM shardings (the head split like the
  embedding). `model_config_fn(model_spec) -> ModelConfig` turns the run's
  `config.ModelSpec` into a model config (the trainer's `model_config`).
  `tokenizer`, when given, must be the run's `data.tokenizer`: the RM reads
  the policy's token ids, so both must come from one tokenizer.
  `run_config`, when given, is the run's `ExperimentConfig`: the RM scores its
  rollouts, so its max_position_embeddings must cover their prompt +
  generation length (`config.sequence_budgets`); checked before the params
  are read.
  """
  from jaxrl_llm import config as config_lib
  from jaxrl_llm.checkpoint import finished_run

  where = f"reward model {workdir!r}"
  hint = ("point reward.reward_model_path at the workdir of a finished kind='reward_model' run, "
          "e.g. one of configs/reward_model_arithmetic.py")
  with finished_run(workdir, where=where, hint=hint) as (ckpt, step, snapshot):
    if snapshot.get("kind") != "reward_model":
      raise ValueError(f"{where} is a kind={snapshot.get('kind')!r} run, not a reward model; "
                       f"{hint}")
    spec = config_lib.from_dict(config_lib.ModelSpec, snapshot["model"],
                                f"{workdir}: config.model")
    rm = config_lib.from_dict(config_lib.RewardModelConfig, snapshot["reward_model"],
                              f"{workdir}: config.reward_model")
    rm_tokenizer = snapshot["data"]["tokenizer"]
    if tokenizer is not None and rm_tokenizer != tokenizer:
      raise ValueError(f"{where} was trained with data.tokenizer={rm_tokenizer!r} but this run "
                       f"uses {tokenizer!r}: the reward model reads the policy's token ids, so "
                       "both runs need the same tokenizer")
    model = model_config_fn(spec)
    if run_config is not None:
      config_checks.check_secondary_model_lengths(run_config, model.max_position_embeddings,
                                                  f"the {where}")
    shardings = reward_model_shardings(model, mesh, rm.num_heads, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            reward_model_shapes(model, rm.num_heads), shardings)
    params = ckpt.restore_params(abstract, step)
  return RestoredRewardModel(model, rm.num_heads, rm.aggregation, rm.lam, params, shardings,
                             workdir, step)


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RewardModelStep:
  """Bradley–Terry training of the RM on preference batches (one jit).

  Batch: the "preference" batches of `jaxrl_llm.data.pipeline` (prompt_tokens,
  prompt_mask [N, P]; chosen_/rejected_tokens and _mask [N, C]), optional
  `margin_key` [N] and pair_weight [N]. Chosen and rejected rows run in ONE
  forward of 2N rows. Metrics: "loss/total", "loss/bt", "rm/accuracy" (of the aggregated
  reward), "rm/head_accuracy" (mean over heads), "rm/margin",
  "rm/reward_chosen", "rm/reward_rejected", "rm/head_std" (mean std across
  heads of the chosen and rejected rewards).

  sft_coef > 0 adds a text-generation regulariser on the chosen responses,
  ℓ += sft_coef · (−Σ_t m·log π_trunk(y_w,t) / |y_w|), through the trunk's own
  LM head (Yang et al. 2024, "Regularizing Hidden States Enables Learning
  Generalizable Reward Model for LLMs"): the trunk keeps what it knows
  instead of drifting to fit the preference labels alone ("loss/sft").
  """
  model: ModelConfig
  tx: optax.GradientTransformation
  num_heads: int = 1
  aggregation: str = "mean"
  lam: float = 0.1                     # uncertainty_weighted λ
  margin_key: Optional[str] = "margin"  # batch key of the BT margin (absent: 0)
  sft_coef: float = 0.0                # weight of the chosen-response NLL regulariser
  logprob_chunk: int = 512
  microbatches: int = 1
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True

  def __post_init__(self):
    rm_losses.get_ensemble_aggregation(self.aggregation)
    if self.num_heads < 1:
      raise ValueError(f"RewardModelStep: num_heads must be >= 1, got {self.num_heads}")
    if self.microbatches < 1:
      raise ValueError(f"RewardModelStep: microbatches must be >= 1, got {self.microbatches}")
    if self.sft_coef < 0:
      raise ValueError(f"RewardModelStep: sft_coef must be >= 0, got {self.sft_coef}")

  def _pair_forward(self, params, batch):
    C = max(batch["chosen_tokens"].shape[1], batch["rejected_tokens"].shape[1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, C - x.shape[1])))
    N = batch["chosen_tokens"].shape[0]
    h_2NTD, scores_K2N = _hidden_and_scores(
        self.model, params, jnp.concatenate([batch["prompt_tokens"]] * 2),
        jnp.concatenate([batch["prompt_mask"]] * 2),
        jnp.concatenate([pad(batch["chosen_tokens"]), pad(batch["rejected_tokens"])]),
        jnp.concatenate([pad(batch["chosen_mask"]), pad(batch["rejected_mask"])]))
    return h_2NTD[:N], scores_K2N[:, :N], scores_K2N[:, N:]

  def pair_scores(self, params, batch):
    """(chosen_KN, rejected_KN) rewards from one forward of 2N rows."""
    return self._pair_forward(params, batch)[1:]

  def loss(self, params, mb):
    h_chosen, chosen_KN, rejected_KN = self._pair_forward(params, mb)
    K, N = chosen_KN.shape
    margin = mb.get(self.margin_key) if self.margin_key else None
    bt = functools.partial(rm_losses.bradley_terry, margin_B=margin)
    loss_KN, m = jax.vmap(bt)(chosen_KN, rejected_KN)
    w = jnp.asarray(mb.get("pair_weight", jnp.ones((N,))), jnp.float32)
    w = w * (jnp.sum(mb["chosen_mask"], 1) > 0) * (jnp.sum(mb["rejected_mask"], 1) > 0)
    agg_w = aggregate(chosen_KN, self.aggregation, lam=self.lam)
    agg_l = aggregate(rejected_KN, self.aggregation, lam=self.lam)
    bt_N = jnp.mean(loss_KN, axis=0)
    loss_N = bt_N
    sums = {"loss/bt": jnp.sum(w * bt_N)}
    if self.sft_coef:
      P, C = mb["prompt_tokens"].shape[1], mb["chosen_tokens"].shape[1]
      logp_NC = decoder.token_logprobs(self.model, params["trunk"], h_chosen[:, P - 1:P + C - 1],
                                       mb["chosen_tokens"].astype(jnp.int32),
                                       chunk_size=self.logprob_chunk)
      cm = mb["chosen_mask"].astype(jnp.float32)
      nll_N = -jnp.sum(logp_NC * cm, 1) / jnp.maximum(jnp.sum(cm, 1), 1.0)
      sums["loss/sft"] = jnp.sum(w * nll_N)
      loss_N = bt_N + self.sft_coef * nll_N
    sums.update({
        "loss/total": jnp.sum(w * loss_N),
        "rm/accuracy": jnp.sum(w * (agg_w > agg_l)),
        "rm/head_accuracy": jnp.sum(w * jnp.mean(m["accuracy_B"], axis=0)),
        "rm/margin": jnp.sum(w * (agg_w - agg_l)),
        "rm/reward_chosen": jnp.sum(w * agg_w),
        "rm/reward_rejected": jnp.sum(w * agg_l),
        "rm/head_std": jnp.sum(w * 0.5 * (jnp.std(chosen_KN, 0) + jnp.std(rejected_KN, 0))),
    })
    return jnp.sum(w * loss_N), (jnp.sum(w), sums)

  def __call__(self, state: TrainState, batch, rng=None):
    """One optimizer step of Bradley–Terry RM training."""
    del rng
    keys = ("prompt_tokens", "prompt_mask", "chosen_tokens", "chosen_mask", "rejected_tokens",
            "rejected_mask", "pair_weight") + ((self.margin_key,) if self.margin_key else ())
    rows = {k: batch[k] for k in keys if k in batch}
    with sharding.activation_rules(self.mesh, self.rules):
      grads, denom, sums = accumulate_gradients(self.loss, state.params, rows,
                                                self.microbatches)
      new_state, metrics = apply_update(state, self.tx, grads,
                                        skip_nonfinite=self.skip_nonfinite)
    metrics.update({k: v / jnp.maximum(denom, 1e-8) for k, v in sums.items()})
    metrics["rm/pairs"] = denom
    return new_state.replace(step=state.step + 1), metrics


def jit_reward_model_step(step: RewardModelStep, state_shardings, batch_sharding=None):
  """jax.jit with explicit shardings; the state (argument 0) is donated."""
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  return jax.jit(step.__call__, in_shardings=(state_shardings, batch_sharding, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))
