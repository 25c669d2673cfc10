"""Cooper: the policy and its reward model optimised together, in one RL step.

Hong et al., "Cooper: Co-Optimizing Policy and Reward Models in Reinforcement
Learning for Large Language Models" (2025, arXiv:2508.05613). A fixed reward
model (RM) is hacked by the policy it scores (Gao et al. 2023, "Scaling Laws
for Reward Model Overoptimization"): the policy drifts to outputs the RM
over-rates. Cooper keeps training the RM during RL on pairs whose labels come
from a rule-based verifier, which is precise when it says "correct". One step:

  ROLLOUT   G completions per prompt from the current policy π_θ
  REWARD    the policy's reward r_i = reward.components (must include the
            reward model R_φ; verifier components may be mixed in by weight)
  VERIFY    v_i = the verifier `cooper.verifier` (default "correct", exact
            match); correct_i = v_i > 1/2
  POLICY    GRPO (any critic-free `rl.advantage`) on r_i: the RL step's
            `learn` stage, unchanged
  PAIRS     per group (prompt), positive y⁺ = the first correct completion
            (as the paper's code), negative y⁻ = a wrong completion of the same
            group (`cooper.negative`: "hardest", the wrong completion R_φ
            scores highest, or "first"); a group with no correct or no wrong
            completion gives no pair (counted as cooper/groups_without_pair)
  RM UPDATE after the policy update, `cooper.rm_steps` optimizer steps of
            R_φ on the step's N valid pairs with its own optimizer (AdamW at
            `cooper.rm_learning_rate`):
              L(φ) = (1/N) Σ_n (1/K) Σ_k −log σ(R_φ,k(x_n, y⁺_n) − R_φ,k(x_n, y⁻_n))
            (Bradley–Terry; K heads of an ensemble RM each get the pair). With
            no valid pair the RM state is left as it is (no momentum step).

From the paper (method section and its reference code): the two-stage step
(policy by GRPO on the RM's reward, then the RM), positives selected by the
rule-based verifier (one per prompt, the first with rule score 1), the loss
−log σ(s⁺ − s⁻) averaged over valid pairs, prompts without a positive masked
out. Our choices: the paper's negatives are written by an assistant LLM that
rewrites the positive into a wrong solution (checked wrong by the verifier);
this library has no assistant model, so the negatives are the policy's own
verifier-wrong rollouts of the same prompt ("hardest" targets exactly the
wrong answers the RM currently over-rates, i.e. the hack). The paper's RM is
reference-based (it reads the reference answer) and its policy reward is
σ(R_φ) (optionally thresholded at 1/2); here the RM is the library's scalar
head RM (`preference.reward_model`, no reference input) and the policy reward
is reward.components' weighted sum of the raw score as for a frozen RM.
A verifier false negative (a correct answer the rule rejects) becomes a
negative here, which the paper's generated negatives avoid.

Design: the RM state is its own `TrainState` (step, params, opt_state) kept in
the policy state's `extra["cooper"]`, so it is donated, sharded (its params as
the RM's trunk/head shardings) and checkpointed with the run, and a resumed
run continues the co-trained RM. The RM update is folded into the one-jit
step after `RLStep.learn`: it reuses the rollout and the RM scores already on
device, and needs no second compiled program or host round trip.

Metrics: cooper/rm_loss and cooper/rm_pair_acc (fraction of valid pairs with
R(y⁺) > R(y⁻), mean over heads) of the RM *before* its update (how often the
verifier caught the RM over-rating a wrong answer), cooper/rm_loss_after (after
the last RM step), cooper/pairs, cooper/groups_without_pair,
cooper/rm_grad_norm; reward/verified (mean verifier score); rl/accuracy uses
the verifier as "correct".

Shape letters: R prompts, G group size, B = R·G completions, N pairs (one slot
per prompt, N = R, masked by valid_R), K RM heads, P prompt length, L
completion length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import optim, sharding
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.preference import reward_model as rm_lib
from jaxrl_llm.rewards import registry
from jaxrl_llm.rl.rl_step import RLStep
from jaxrl_llm.train_state import TrainState, apply_update

EXTRA_KEY = "cooper"
NEGATIVES = ("hardest", "first")
# Components a verifier may be: rewards that are not the reward model and not labels.
VERIFIERS = tuple(c for c in registry.COMPONENTS
                  if c != registry.REWARD_MODEL and c not in registry.LABEL_COMPONENTS)


@dataclasses.dataclass(frozen=True)
class CooperConfig:
  """Cooper: co-train the RL reward model on verifier-labelled rollout pairs (`cooper`)."""
  enabled: bool = False
  verifier: str = "correct"        # the rule-based reward that marks positives (score > 1/2)
  negative: str = "hardest"        # hardest: wrong rollout with the top RM score; first
  rm_learning_rate: float = 1e-5   # the RM's own AdamW (constant schedule)
  rm_grad_clip_norm: float = 1.0   # global-norm clip of the RM gradient; 0 turns it off
  rm_steps: int = 1                # RM optimizer steps per RL step on that step's pairs

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"cooper.{field}={getattr(self, field)!r}: {msg}")
    check(self.verifier in VERIFIERS, "verifier",
          f"choose one of {VERIFIERS} (a rule-based reward; the reward model is what Cooper "
          "trains, not its judge)")
    check(self.negative in NEGATIVES, "negative", f"choose one of {NEGATIVES}")
    check(0 < self.rm_learning_rate < float("inf"), "rm_learning_rate",
          "must be a finite number > 0")
    check(self.rm_grad_clip_norm >= 0, "rm_grad_clip_norm", "must be >= 0 (0: no clipping)")
    check(isinstance(self.rm_steps, int) and self.rm_steps >= 1, "rm_steps",
          "must be an int >= 1")


def validate_experiment(cfg: Any) -> None:
  """ExperimentConfig checks of `cooper` (called from its __post_init__)."""
  if not cfg.cooper.enabled or cfg.kind == "sft":  # sft: an RL run's warm-start stage
    return
  if cfg.kind != "rl":
    raise ValueError(f"cooper.enabled=True co-trains the reward model of an RL run: set "
                     f"kind='rl' (got {cfg.kind!r})")
  if not any(name == registry.REWARD_MODEL for name, _ in cfg.reward.components):
    raise ValueError("cooper.enabled=True trains the reward model that rewards the policy, "
                     "but reward.components has none: add ('reward_model', 1.0) and set "
                     "reward.reward_model_path to a finished kind='reward_model' run (its "
                     "weights are the starting point)")
  rl = cfg.rl
  refused = [
      (cfg.trainer.actor_devices > 0, "trainer.actor_devices > 0 (the actor-learner run)",
       "trainer.actor_devices=0"),
      (rl.advantage == "gae", "rl.advantage='gae' (PPO's critic step)",
       "a critic-free rl.advantage such as 'grpo'"),
      (rl.multiturn.enabled, "rl.multiturn.enabled (multi-turn rollouts)",
       "rl.multiturn.enabled=False"),
      (rl.anchor.enabled, "rl.anchor.enabled (injected reference rows are not rollouts)",
       "rl.anchor.enabled=False"),
      (getattr(getattr(rl, "depo", None), "enabled", False),
       "rl.depo.enabled (DEPO's prompt filtering)", "rl.depo.enabled=False"),
  ]
  for bad, what, fix in refused:
    if bad:
      raise ValueError(f"cooper.enabled=True runs in the one-jit RL step and does not support "
                       f"{what}: set {fix}, or cooper.enabled=False")


# ---------------------------------------------------------------------------
# Pure functions: pair selection and the reward-model loss.
# ---------------------------------------------------------------------------
def select_pairs(correct_B: jax.Array, rm_reward_B: jax.Array, group_size: int,
                 negative: str = "hardest") -> tuple[jax.Array, jax.Array, jax.Array]:
  """One (positive, negative) pair per group: (pos_R, neg_R, valid_R), row indices into B.

  Rows r·G .. r·G + G − 1 are group r. Positive: the first row of the group
  with correct_B True. Negative: among the group's rows with correct_B
  False, the one with the highest `rm_reward_B` ("hardest", the earliest on
  ties) or the first ("first"). valid_R is False for a group with no correct
  or no wrong row; its indices then point at an arbitrary row of the group
  and must be masked.
  """
  if negative not in NEGATIVES:
    raise ValueError(f"select_pairs: negative={negative!r}; choose one of {NEGATIVES}")
  correct_RG = jnp.asarray(correct_B, bool).reshape(-1, group_size)
  wrong_RG = ~correct_RG
  pos_R = jnp.argmax(correct_RG, axis=1)
  if negative == "hardest":
    score_RG = jnp.asarray(rm_reward_B, jnp.float32).reshape(-1, group_size)
    neg_R = jnp.argmax(jnp.where(wrong_RG, score_RG, -jnp.inf), axis=1)
  else:
    neg_R = jnp.argmax(wrong_RG, axis=1)
  valid_R = jnp.any(correct_RG, axis=1) & jnp.any(wrong_RG, axis=1)
  base_R = jnp.arange(correct_RG.shape[0]) * group_size
  return base_R + pos_R, base_R + neg_R, valid_R


def pair_loss(reward_pos_KN: jax.Array, reward_neg_KN: jax.Array, valid_N: jax.Array
              ) -> tuple[jax.Array, dict]:
  """Cooper's RM loss over valid pairs, float32 scalar, and its metrics.

    L = Σ_n v_n · (1/K) Σ_k −log σ(s⁺_kn − s⁻_kn)  /  max(Σ_n v_n, 1)

  (0 when no pair is valid). Metrics: "pair_acc" = Σ_n v_n·1[mean_k s⁺ >
  mean_k s⁻] / max(Σ v, 1), "margin" = mean over valid pairs of
  mean_k (s⁺ − s⁻), "pairs" = Σ v.
  """
  pos = jnp.asarray(reward_pos_KN, jnp.float32)
  neg = jnp.asarray(reward_neg_KN, jnp.float32)
  if pos.ndim != 2 or pos.shape != neg.shape or valid_N.shape != pos.shape[1:]:
    raise ValueError(f"pair_loss: rewards must be [K, N] and valid [N]; got {pos.shape}, "
                     f"{neg.shape} and {valid_N.shape}")
  v = jnp.asarray(valid_N, jnp.float32)
  n = jnp.sum(v)
  denom = jnp.maximum(n, 1.0)
  loss_N = jnp.mean(-jax.nn.log_sigmoid(pos - neg), axis=0)
  diff_N = jnp.mean(pos - neg, axis=0)
  return jnp.sum(v * loss_N) / denom, {
      "pair_acc": jnp.sum(v * (diff_N > 0)) / denom,
      "margin": jnp.sum(v * diff_N) / denom,
      "pairs": n,
  }


# ---------------------------------------------------------------------------
# The reward model's own train state.
# ---------------------------------------------------------------------------
def rm_optimizer(cooper: CooperConfig) -> optax.GradientTransformation:
  """The RM's AdamW: constant `rm_learning_rate`, no weight decay, global-norm clip."""
  return optim.make_optimizer(optim.OptimConfig(
      learning_rate=cooper.rm_learning_rate, schedule="constant", warmup_steps=0,
      weight_decay=0.0, grad_clip_norm=cooper.rm_grad_clip_norm or None))


def add_reward_model_state(state: TrainState, shardings: TrainState, rm_params, rm_shardings,
                           tx: optax.GradientTransformation, mesh) -> tuple[TrainState,
                                                                            TrainState]:
  """(state, shardings) with the RM's TrainState in extra["cooper"], created in place.

  The RM params keep their shardings (trunk as a policy's, head by `embed`);
  Adam's moments follow them; the step counter is replicated.
  """
  rep = sharding.replicated(mesh)

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      extra={})

  abstract = jax.eval_shape(init, rm_params)
  params_struct = jax.tree.structure(abstract.params)

  def is_params(node):
    return jax.tree.structure(node) == params_struct

  opt_sh = jax.tree.map(lambda node: rm_shardings if is_params(node) else rep,
                        abstract.opt_state, is_leaf=is_params)
  rm_sh = TrainState(step=rep, params=rm_shardings, opt_state=opt_sh, extra={})
  rm_state = jax.jit(init, out_shardings=rm_sh)(rm_params)
  return (state.replace(extra={**state.extra, EXTRA_KEY: rm_state}),
          shardings.replace(extra={**shardings.extra, EXTRA_KEY: rm_sh}))


# ---------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CooperStep:
  """The RL step with the reward model trained after the policy (one jit).

  `base.reward_fn` is the policy reward fn(inputs, rm_params) (reward.components
  with the reward model); `verifier_fn(inputs) -> (scores_B, comps)` the rule
  that labels the pairs; `rm_model` the RM's ModelConfig, `rm_tx` its optimizer.
  """
  base: RLStep
  cooper: CooperConfig
  rm_model: ModelConfig
  rm_tx: optax.GradientTransformation
  verifier_fn: Callable

  def update_reward_model(self, rm_state: TrainState, ro, pos_R, neg_R, valid_R):
    """`cooper.rm_steps` RM optimizer steps on the pairs; (rm_state, metrics)."""
    idx = jnp.concatenate([pos_R, neg_R])
    rows = {k: ro[k][idx] for k in ("prompt_tokens", "prompt_mask", "completion",
                                    "completion_mask")}
    R = pos_R.shape[0]

    def loss_fn(params):
      scores_K2R = rm_lib.reward_scores(self.rm_model, params, rows["prompt_tokens"],
                                        rows["prompt_mask"], rows["completion"],
                                        rows["completion_mask"])
      return pair_loss(scores_K2R[:, :R], scores_K2R[:, R:], valid_R)

    has_pairs = jnp.any(valid_R)

    def one_step(st, _):
      (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
      new, upd = apply_update(st, self.rm_tx, grads, skip_nonfinite=True)
      new = new.replace(step=st.step + 1)
      # No pair: keep the RM as it is (Adam's momentum would still move it).
      new = jax.tree.map(lambda a, b: jnp.where(has_pairs, a, b), new, st)
      return new, dict(m, loss=loss, grad_norm=upd["grad/global_norm"])

    new_state, ms = jax.lax.scan(one_step, rm_state, None, length=self.cooper.rm_steps)
    after, _ = loss_fn(new_state.params)
    n = jnp.sum(valid_R.astype(jnp.float32))
    return new_state, {
        "cooper/rm_loss": ms["loss"][0],
        "cooper/rm_pair_acc": ms["pair_acc"][0],
        "cooper/rm_margin": ms["margin"][0],
        "cooper/rm_loss_after": after,
        "cooper/rm_grad_norm": ms["grad_norm"][0],
        "cooper/pairs": n,
        "cooper/groups_without_pair": R - n,
    }

  def __call__(self, state: TrainState, batch, rng, ref_params=None):
    base = self.base
    with sharding.activation_rules(base.mesh, base.rules):
      rng = jax.random.fold_in(rng, state.step)
      rollout_rng, update_rng = jax.random.split(rng)
      rm_state = state.extra[EXTRA_KEY]
      ro = base.rollout(state.params, batch, rollout_rng, state.step)
      rewards_B, comps, baseline_B = base.score(ro, rm_state.params)
      verified_B, _ = self.verifier_fn(base.reward_inputs(ro))
      verified_B = jnp.asarray(verified_B, jnp.float32)
      comps["verified"] = verified_B
      comps.setdefault("correct", verified_B)  # rl/accuracy: the verifier's, not RM > 0
      new_state, metrics = base.learn(state, ro, rewards_B, comps, update_rng, ref_params,
                                      baseline_B)
      pos_R, neg_R, valid_R = select_pairs(verified_B > 0.5, comps[registry.REWARD_MODEL],
                                           base.rl.group_size, self.cooper.negative)
      rm_state, rm_metrics = self.update_reward_model(rm_state, ro, pos_R, neg_R, valid_R)
      metrics.update(rm_metrics)
      return new_state.replace(extra={**new_state.extra, EXTRA_KEY: rm_state}), metrics


def jit_cooper_step(step: CooperStep, state_shardings, ref_shardings=None):
  """jax.jit with explicit shardings; the state (with the RM's) is donated.

  Call as run(state, batch, rng, ref_params) (None without a reference).
  """
  rep = None if step.base.mesh is None else sharding.replicated(step.base.mesh)
  return jax.jit(step.__call__, in_shardings=(state_shardings, None, rep, ref_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


def build_step(cfg: Any, model_cfg: ModelConfig, tx: optax.GradientTransformation, tokenizer,
               mesh, state: TrainState, shardings: TrainState, rm: rm_lib.RestoredRewardModel,
               examples: Optional[list] = None) -> tuple[CooperStep, TrainState, TrainState]:
  """The trainer's wiring: (CooperStep, state with the RM state, shardings).

  `cfg` is the run's ExperimentConfig, `rm` the reward model restored from
  reward.reward_model_path (its weights start the co-trained RM); `examples`
  the training split when a host component (reward or verifier) needs it.
  """
  fallback = cfg.reward.math_last_number_fallback
  reward_fn = registry.build_reward_fn(cfg.reward.components, tokenizer, examples=examples,
                                       reward_model=rm.reward_fn(),
                                       math_last_number_fallback=fallback)
  verifier_fn = registry.build_reward_fn(((cfg.cooper.verifier, 1.0),), tokenizer,
                                         examples=examples, math_last_number_fallback=fallback)
  base = RLStep(model_cfg, cfg.rl, tx, reward_fn, eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, mesh=mesh, rules=cfg.mesh.rules, skip_nonfinite=True)
  rm_tx = rm_optimizer(cfg.cooper)
  state, shardings = add_reward_model_state(state, shardings, rm.params, rm.shardings, rm_tx,
                                            mesh)
  step = CooperStep(base, cfg.cooper, rm.model, rm_tx, verifier_fn)
  return step, state, shardings
