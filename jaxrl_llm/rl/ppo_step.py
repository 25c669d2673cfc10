"""PPO with a learned critic, in ONE jitted step (rl.advantage = "gae").

    ppo_step(state, batch, rng, ref_params) -> (state, metrics)

  ROLLOUT    G completions per prompt (the RL step's rollout)
  REWARD     the RL step's in-graph reward (or host rewards in split mode)
  REF / OLD  the RL step's `prepare`: shaping, dynamic sampling, loss mask,
             reference / old log-probs, the per-token KL when kl_in_reward
  VALUES     V_t of every completion token from the critic (no gradient)
  GAE        token rewards r_t = −β·KL_t + R·[t = last] (`critic.token_rewards`);
             policy advantages with λ_actor, value targets R_t = A_t + V_t
             with λ_critic (`advantages.gae`); advantages optionally whitened
  UPDATE     lax.scan over epochs × minibatches: a critic step on the clipped
             value loss (its own AdamW and learning rate), then the policy step
             of the RL step (ppo_clip / clip-higher / dual-clip / TIS ...);
             during rl.critic.warmup_steps the policy step is skipped (lax.cond):
             the policy and its optimizer state stay as they are.

The critic lives in `TrainState.critic` = {"params", "opt_state"}
(`critic.add_critic`), sharded by the same logical axes as the policy and
checkpointed with it. `PPOStep` is an `RLStep`: `rl_step.jit_rl_step` and
`rl_step.make_split_step` take it as they are.

Metrics (besides the RL step's): critic/value_loss, critic/value_clip_frac,
critic/explained_variance (of the rollout's values), critic/value_mean,
critic/return_mean, critic/advantage_mean and critic/advantage_std (before
whitening), critic/grad_norm, critic/skipped_updates, ppo/policy_updated (0
during the critic warm-up, when the policy's loss metrics read 0).

Shape letters: B completions, L max new tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rl import advantages, length_buckets
from jaxrl_llm.rl import critic as critic_lib
from jaxrl_llm.rl.config import GAE
from jaxrl_llm.rl.rl_step import TRAIN_KEYS, RLStep
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update

CRITIC_KEYS = ("old_values", "returns")


@dataclasses.dataclass(frozen=True)
class PPOStep(RLStep):
  """The RL step with a learned critic: GAE advantages and a critic update.

  critic_tx: the critic's optimizer (`critic.critic_optimizer`).
  critic_model: the value model's config; None: the policy's (a value model
    copied from the policy, or a value head on the policy trunk).
  """
  critic_tx: Optional[optax.GradientTransformation] = None
  critic_model: Optional[ModelConfig] = None

  def __post_init__(self):
    if self.rl.advantage != GAE:
      raise ValueError(f"PPOStep needs rl.advantage='gae' (got {self.rl.advantage!r}); use "
                       "RLStep for the critic-free estimators")
    if self.critic_tx is None:
      raise ValueError("PPOStep needs critic_tx, the critic's optimizer: "
                       "critic.critic_optimizer(optim_cfg, rl.critic)")
    if self.rl.off_policy.vtrace:
      raise ValueError("rl.off_policy.correction='vtrace' corrects outcome advantages; with "
                       "advantage='gae' the critic's values already give the baseline: use "
                       "'tis' or 'mis', or an outcome estimator")

  @property
  def value_model(self) -> ModelConfig:
    return self.model if self.critic_model is None else self.critic_model

  # ------------------------------------------------------------------ VALUES
  def values(self, critic_params, policy_params, rows) -> jax.Array:
    """V_t [B, L] of the completion tokens (`critic.token_values`)."""
    return critic_lib.token_values(self.value_model, critic_params, policy_params, rows)

  def _batched_values(self, critic_params, policy_params, rows) -> jax.Array:
    """Values [B, L] without gradient, micro-batch by micro-batch, length-bucketed."""
    return self._batched_per_token(lambda p, r: self.values(p[0], p[1], r),
                                   (critic_params, policy_params), rows)

  # -------------------------------------------------------------------- GAE
  def advantages_and_returns(self, rows, values_BL, kl_BL):
    """(adv_BL, returns_BL, metrics): token-level GAE with decoupled λ (module docstring)."""
    rl, cc = self.rl, self.rl.critic
    mask_BL = rows["completion_mask"]
    rewards_BL = critic_lib.token_rewards(rows["rewards"], mask_BL, kl_BL,
                                          rl.kl_coef if rl.kl_in_reward else 0.0)
    adv_BL, returns_BL = advantages.gae(rewards_BL, values_BL, mask_BL, gamma=cc.gamma,
                                        lam=cc.lam)
    if cc.policy_lam != cc.lam:
      adv_BL, _ = advantages.gae(rewards_BL, values_BL, mask_BL, gamma=cc.gamma,
                                 lam=cc.policy_lam)
    if rl.lambda_pos != 1.0 or rl.lambda_neg != 1.0:
      scale_B = jnp.where(rows["correct"] > 0, rl.lambda_pos, rl.lambda_neg)
      adv_BL = adv_BL * scale_B[:, None]
    loss_mask = rows["loss_mask"]
    adv_mean, adv_var = critic_lib.masked_mean_var(adv_BL, loss_mask)
    value_mean, _ = critic_lib.masked_mean_var(values_BL, loss_mask)
    return_mean, _ = critic_lib.masked_mean_var(returns_BL, loss_mask)
    metrics = {
        "critic/explained_variance": critic_lib.explained_variance(values_BL, returns_BL,
                                                                   loss_mask),
        "critic/value_mean": value_mean,
        "critic/return_mean": return_mean,
        "critic/advantage_mean": adv_mean,
        "critic/advantage_std": jnp.sqrt(adv_var),
    }
    if cc.whiten_advantages:
      adv_BL = critic_lib.whiten(adv_BL, loss_mask)
    return adv_BL, returns_BL, metrics

  # ----------------------------------------------------------------- UPDATE
  def critic_loss(self, critic_params, mb, policy_params):
    """Per-micro-batch (Σ ℓ_t·m_t, (Σ m_t, metric sums)): token-mean clipped value loss."""
    values_BL = self.values(critic_params, policy_params, mb)
    loss_BL, clipped_BL = critic_lib.value_loss(values_BL, mb["old_values"], mb["returns"],
                                                self.rl.critic.value_clip)
    m = mb["loss_mask"].astype(jnp.float32)
    total = jnp.sum(loss_BL * m)
    return total, (jnp.sum(m), {"critic/value_loss": total,
                                "critic/value_clip_frac": jnp.sum(clipped_BL * m)})

  def _critic_minibatch_update(self, state: TrainState, mb):
    """One critic optimizer step on a minibatch; returns (state, metrics)."""
    critic = state.critic
    loss = length_buckets.bucketed(lambda p, micro: self.critic_loss(p, micro, state.params),
                                   self.length_widths, self.rl.max_new_tokens)
    grads, denom, sums = accumulate_gradients(loss, critic["params"], mb, self.rl.microbatches)
    inner = TrainState(step=state.step, params=critic["params"], opt_state=critic["opt_state"],
                       extra={})
    inner, upd = apply_update(inner, self.critic_tx, grads, skip_nonfinite=self.skip_nonfinite)
    metrics = {k: v / jnp.maximum(denom, 1.0) for k, v in sums.items()}
    metrics["critic/grad_norm"] = upd["grad/global_norm"]
    metrics["critic/skipped_updates"] = upd["train/skipped_updates"]
    return state.replace(critic={"params": inner.params, "opt_state": inner.opt_state}), metrics

  def _policy_minibatch_update(self, state: TrainState, mb, train_policy):
    """The RL step's policy update; skipped (state kept, metrics 0) while not train_policy."""
    if self.rl.critic.warmup_steps == 0:
      return self._minibatch_update(state, mb)
    shapes = jax.eval_shape(self._minibatch_update, state, mb)[1]
    skip = lambda s: (s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    return jax.lax.cond(train_policy, lambda s: self._minibatch_update(s, mb), skip, state)

  def learn(self, state: TrainState, ro, rewards_B, comps, rng, ref_params,
            baseline_B=None):
    """Everything after REWARD: REF/OLD, VALUES, GAE, critic and policy UPDATE, metrics."""
    if state.critic is None:
      raise ValueError("PPOStep needs a critic in the train state: critic.add_critic(state, ...)")
    rows, metrics, extra, _, kl_BL = self.prepare(state, ro, rewards_B, comps, ref_params,
                                                  baseline_B)
    B = rows["rewards"].shape[0]

    # VALUES and GAE
    values_BL = self._batched_values(state.critic["params"], state.params, rows)
    adv_BL, returns_BL, gae_metrics = self.advantages_and_returns(rows, values_BL, kl_BL)
    metrics.update(gae_metrics)
    rows.update(adv=adv_BL, returns=returns_BL, old_values=values_BL)

    # UPDATE: per minibatch a critic step, then a policy step (after the warm-up).
    train_rows = {k: rows[k] for k in TRAIN_KEYS + CRITIC_KEYS if k in rows}
    train_policy = state.step >= self.rl.critic.warmup_steps
    idx_UK = self.minibatch_indices(rng, B, rows["completion_mask"])

    def update(st, idx):
      mb = jax.tree.map(lambda x: x[idx], train_rows)
      st, critic_metrics = self._critic_minibatch_update(st, mb)
      st, policy_metrics = self._policy_minibatch_update(st, mb, train_policy)
      return st, {**policy_metrics, **critic_metrics}

    inner, upd_metrics = jax.lax.scan(update, state, idx_UK)
    metrics.update(jax.tree.map(jnp.mean, upd_metrics))
    metrics["ppo/policy_updated"] = train_policy.astype(jnp.float32)
    metrics = self.finish_metrics(metrics, ro, rows)
    return inner.replace(step=state.step + 1, extra=extra), metrics


def build_ppo_step(cfg, model_cfg: ModelConfig, tx: optax.GradientTransformation, reward_fn,
                   tokenizer, mesh, state: TrainState, shardings: TrainState,
                   say: Callable[[str], None] = print):
  """The trainer's PPO wiring: (state with its critic, shardings, PPOStep).

  `cfg` is the run's `ExperimentConfig` (rl.critic chooses the critic;
  optim gives the critic's AdamW settings at rl.critic.learning_rate).
  """
  rl, cc = cfg.rl, cfg.rl.critic
  policy_lora = getattr(model_cfg, "lora", None) is not None
  if policy_lora and cc.init == "hf":
    raise ValueError("rl.critic.init='hf' with model.lora: an HF value model next to a LoRA "
                     "policy is not supported; use rl.critic.init='policy' (a value model with "
                     "its own LoRA adapters on the policy's frozen base) or 'value_head'")
  critic_model, trunk = None, None
  if cc.init == "hf":
    spec = cfg.model
    critic_model, trunk = critic_lib.load_hf_value_model(
        cc.hf_path, dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat,
        attention_impl=spec.attention_impl, vocab_size=tokenizer.vocab_size, mesh=mesh,
        rules=cfg.mesh.rules, run_config=cfg)
  critic_tx = critic_lib.critic_optimizer(cfg.optim, cc)
  value_model = model_cfg if critic_model is None else critic_model
  state, shardings = critic_lib.add_critic(state, shardings, value_model, critic_tx, mesh,
                                           cfg.mesh.rules, value_head=cc.value_head,
                                           trunk_params=trunk)
  kind = {"policy": ("value model with its own LoRA adapters on the policy's frozen base"
                     if policy_lora else "value model copied from the policy"),
          "hf": f"value model from {cc.hf_path}",
          "value_head": "value head on the policy trunk"}[cc.init]
  say(f"critic: {kind}, lr {cc.learning_rate:g}, {cc.warmup_steps} warm-up step(s), "
      f"gamma {cc.gamma:g}, lambda {cc.lam:g} (actor {cc.policy_lam:g}), value clip "
      f"{cc.value_clip:g}")
  step = PPOStep(model_cfg, rl, tx, reward_fn, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                 mesh=mesh, rules=cfg.mesh.rules, skip_nonfinite=True, critic_tx=critic_tx,
                 critic_model=critic_model)
  return state, shardings, step
