"""SEA as published: an epistemic reward model trained online inside online DPO.

Liu et al., "Sample-Efficient Alignment for LLMs" (2024, arXiv:2411.01493).
Alignment is a contextual dueling bandit: per prompt the agent shows two
responses to an oracle (here: the task's verifier) and learns from its
preference. SEA keeps a posterior over the reward with an epistemic reward
model (an ensemble), picks the pair by Thompson sampling from it, trains the
ensemble online on the oracle's labels, and trains the policy on a mix of
oracle-labelled and model-labelled pairs. One jitted step:

  ROLLOUT   G responses per prompt from the current policy
  FEATURES  φ(x, y) ∈ R^D: the final-norm hidden state at the last response
            token of the frozen feature model (the reference params π_ref,
            the starting policy; the stop-gradient policy when no reference
            is passed)
  POSTERIOR E members, R_e(x, y) = w_e · φ(x, y) (linear heads W [E, D])
  SELECT    e ~ Uniform{1..E} per prompt; y1 = argmax_g R_e(y_g) (Thompson
            sampling); y2 = argmax_{g≠y1} std_e(R_e(y1) − R_e(y_g)) (the
            largest epistemic disagreement about the preference), as
            `online.select_sea`
  ORACLE    the verifier's scores of y1 and y2 only: chosen = the higher,
            a tie carries no label (pair masked). 2 oracle queries / prompt.
  RM UPDATE the labelled feature differences d = φ(y_w) − φ(y_l) enter a ring
            buffer of the last N labels; each member takes K gradient steps on
              L_e = mean_n −log σ(w_e · d_n) + (λ/2)·‖w_e − w_e⁰‖²
            (Bradley–Terry; anchored ensembling, Pearce et al. 2020,
            "Uncertainty in Neural Networks: Approximately Bayesian
            Ensembling": each member is pulled to its own random draw w_e⁰,
            so the members agree where the data constrain them and disagree
            elsewhere, an approximate posterior sample each)
  POLICY    mixed preference learning: the oracle pairs, plus (γ > 0) one
            synthetic pair per prompt labelled by the updated ensemble mean
            (best vs worst of the G responses under mean_e R_e). The
            preference loss is the weighted mean
              (1 − γ)·mean(ℓ over oracle pairs) + γ·mean(ℓ over model pairs)
            (pair weights 1 − γ and γ), any pairwise loss of
            `online.preference` (DPO, IPO, hinge/SLiC, ...).

The ensemble and its buffer live in `TrainState.extra["sea"]` (checkpointed
with the run, replicated). Simplification against the paper: linear heads on
a frozen backbone stand for its epistemic network (an ensemble of MLP heads on
frozen features); the mixing of synthetic data is a per-step weighted loss.

Metrics: sea/rm_loss (BT part, buffer mean over members), sea/rm_accuracy
(buffer labels the ensemble mean orders correctly), sea/disagreement (mean
std_e of R_e over the responses), sea/buffer_fill, sea/oracle_queries (2 per
prompt), sea/model_pair_frac (valid synthetic pairs), plus online/* as in
`OnlineDPOStep`.

Shape letters: R prompts, G samples per prompt, B = R·G, E members, D hidden
size, N buffer slots, K ensemble steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm import lora, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.preference import online as online_lib
from jaxrl_llm.rewards.registry import LABEL_COMPONENTS
from jaxrl_llm.train_state import TrainState

EXTRA_KEY = "sea"


@dataclasses.dataclass(frozen=True)
class SEAConfig:
  """SEA with an online-trained epistemic reward model (`sea`, kind "online_dpo")."""
  enabled: bool = False
  num_members: int = 8          # E ensemble members
  prior_scale: float = 1.0      # std of each member's random draw w_e⁰ is prior_scale/√D
  anchor_coef: float = 0.01     # λ: pull of each member towards its own draw w_e⁰
  rm_learning_rate: float = 0.5  # gradient-descent step of the members
  rm_steps: int = 8             # K gradient steps per training step
  buffer_size: int = 512        # N labelled pairs kept for the ensemble
  mixed_ratio: float = 0.0      # γ: weight of the ensemble-labelled pairs in the policy loss

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"sea.{field}={getattr(self, field)!r}: {msg}")
    check(isinstance(self.num_members, int) and self.num_members >= 2, "num_members",
          "must be an int >= 2 (one member has no disagreement to explore with)")
    check(self.prior_scale > 0, "prior_scale", "must be > 0")
    check(self.anchor_coef >= 0, "anchor_coef", "must be >= 0")
    check(self.rm_learning_rate > 0, "rm_learning_rate", "must be > 0")
    check(isinstance(self.rm_steps, int) and self.rm_steps >= 1, "rm_steps",
          "must be an int >= 1")
    check(isinstance(self.buffer_size, int) and self.buffer_size >= 1, "buffer_size",
          "must be an int >= 1")
    check(0.0 <= self.mixed_ratio < 1.0, "mixed_ratio",
          "must be in [0, 1) (1 would drop the oracle's labels from the policy loss)")


def validate_experiment(cfg: Any) -> None:
  """ExperimentConfig checks of `sea` (called from its __post_init__)."""
  if not cfg.sea.enabled or cfg.kind == "sft":  # sft: an online run's warm-start stage
    return
  if cfg.kind != "online_dpo":
    raise ValueError(f"sea.enabled=True runs inside online DPO: set kind='online_dpo' "
                     f"(got {cfg.kind!r})")
  if cfg.online.selection != "best_worst":
    raise ValueError(f"sea.enabled=True selects pairs with its own online-trained ensemble; "
                     f"online.selection={cfg.online.selection!r} would be ignored: leave it "
                     "at 'best_worst'")
  if cfg.online.reference_from:
    raise ValueError("sea.enabled=True uses the starting policy as π_ref and feature model; "
                     "clear online.reference_from")
  if any(name == "reward_model" for name, _ in cfg.reward.components):
    raise ValueError("sea.enabled=True labels pairs with the verifier reward.components (the "
                     "oracle) and learns its own reward model: drop 'reward_model' from "
                     "reward.components")


def init_extra(sea: SEAConfig, hidden_size: int, rng: jax.Array) -> dict:
  """The ensemble (w_ED and its draws w0_ED) and an empty label buffer, for TrainState.extra."""
  w0 = sea.prior_scale / jnp.sqrt(hidden_size) * jax.random.normal(
      rng, (sea.num_members, hidden_size), jnp.float32)
  return {EXTRA_KEY: {
      "w_ED": w0, "w0_ED": w0,
      "diff_ND": jnp.zeros((sea.buffer_size, hidden_size), jnp.float32),
      "valid_N": jnp.zeros((sea.buffer_size,), jnp.float32),
      "next": jnp.zeros((), jnp.int32)}}


def features(model, params, prompt_tokens_BP, prompt_mask_BP, completion_BL,
             completion_mask_BL) -> jax.Array:
  """φ [B, D]: final-norm hidden state at the last response token (float32, no gradient)."""
  P = prompt_tokens_BP.shape[1]
  tokens = jnp.concatenate([prompt_tokens_BP, completion_BL], axis=1).astype(jnp.int32)
  segments = jnp.concatenate([(prompt_mask_BP != 0).astype(jnp.int32),
                              (completion_mask_BL != 0).astype(jnp.int32)], axis=1)
  h_BTD = decoder.hidden_states(model, params, tokens, segment_ids_BT=segments)
  last_B = P - 1 + jnp.sum(completion_mask_BL != 0, axis=1)
  h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  return jax.lax.stop_gradient(h_BD.astype(jnp.float32))


def member_rewards(w_ED: jax.Array, phi_BD: jax.Array) -> jax.Array:
  """R_e(x, y) = w_e · φ, [E, B]."""
  return jnp.einsum("ED,BD->EB", w_ED, phi_BD)


def push(buffer_ND, valid_N, next_idx, diff_RD, valid_R):
  """Writes the R new labels into the ring buffer at next_idx (wrapping); returns all three."""
  N = buffer_ND.shape[0]
  R = diff_RD.shape[0]
  slots_R = (next_idx + jnp.arange(R)) % N
  if R > N:  # more labels than slots: keep the last N
    diff_RD, valid_R, slots_R = diff_RD[-N:], valid_R[-N:], slots_R[-N:]
  return (buffer_ND.at[slots_R].set(diff_RD), valid_N.at[slots_R].set(valid_R),
          (next_idx + R) % N)


def ensemble_loss(w_ED, w0_ED, diff_ND, valid_N, anchor_coef):
  """Σ_e L_e: the members' anchored Bradley–Terry losses (see the module docstring)."""
  margin_EN = jnp.einsum("ED,ND->EN", w_ED, diff_ND)
  bt_E = jnp.sum(-jax.nn.log_sigmoid(margin_EN) * valid_N, axis=1) / jnp.maximum(
      jnp.sum(valid_N), 1.0)
  anchor_E = 0.5 * anchor_coef * jnp.sum(jnp.square(w_ED - w0_ED), axis=1)
  return jnp.sum(bt_E + anchor_E), bt_E


def train_ensemble(w_ED, w0_ED, diff_ND, valid_N, *, anchor_coef, learning_rate, steps):
  """K steps of gradient descent on every member at once; returns (w_ED, bt_E)."""
  grad_fn = jax.grad(lambda w: ensemble_loss(w, w0_ED, diff_ND, valid_N, anchor_coef)[0])

  def body(w, _):
    return w - learning_rate * grad_fn(w), None

  w_ED, _ = jax.lax.scan(body, w_ED, None, length=steps)
  return w_ED, ensemble_loss(w_ED, w0_ED, diff_ND, valid_N, anchor_coef)[1]


@dataclasses.dataclass(frozen=True)
class SEAStep:
  """The SEA step, around an `OnlineDPOStep` (its rollout, verifier score and loss)."""
  base: online_lib.OnlineDPOStep
  sea: SEAConfig

  def __call__(self, state: TrainState, batch, rng, ref_params=None, reward_params=None):
    base, sea = self.base, self.sea
    G = base.online.num_samples
    with sharding.activation_rules(base.mesh, base.rules):
      rng = jax.random.fold_in(rng, state.step)
      rollout_rng, select_rng = jax.random.split(rng)
      ro = base.rollout(state.params, batch, rollout_rng)
      oracle_B, comps = base.score(ro, reward_params)
      R = oracle_B.shape[0] // G

      # FEATURES / POSTERIOR
      feat_params = lora.reference_or(ref_params, state.params)
      phi_BD = features(base.model, feat_params, ro["prompt_tokens"], ro["prompt_mask"],
                        ro["completion"], ro["completion_mask"])
      rm = state.extra[EXTRA_KEY]
      members_EB = member_rewards(rm["w_ED"], phi_BD)

      # SELECT (Thompson sampling + max disagreement), labelled by the ORACLE
      chosen, rejected, valid = online_lib.select_sea(
          members_EB.reshape(-1, R, G), oracle_B.reshape(R, G), select_rng,
          disagreement="difference")

      # RM UPDATE on the buffer of oracle labels
      phi_RGD = phi_BD.reshape(R, G, -1)
      take = lambda idx: jnp.take_along_axis(phi_RGD, idx[:, None, None], axis=1)[:, 0]
      diff_RD = take(chosen) - take(rejected)
      buf, valid_N, nxt = push(rm["diff_ND"], rm["valid_N"], rm["next"], diff_RD,
                               valid.astype(jnp.float32))
      w_ED, bt_E = train_ensemble(rm["w_ED"], rm["w0_ED"], buf, valid_N,
                                  anchor_coef=sea.anchor_coef,
                                  learning_rate=sea.rm_learning_rate, steps=sea.rm_steps)

      # POLICY: oracle pairs (+ ensemble-labelled pairs, mixed preference learning)
      pairs = online_lib.pairs_from_samples(batch["prompt_tokens"], batch["prompt_mask"],
                                            ro["completion"], ro["completion_mask"], chosen,
                                            rejected, valid)
      model_valid = jnp.zeros((R,), bool)
      if sea.mixed_ratio > 0:
        mean_RG = jnp.mean(member_rewards(w_ED, phi_BD), axis=0).reshape(R, G)
        best, worst, model_valid = online_lib.select_best_worst(mean_RG)
        synth = online_lib.pairs_from_samples(batch["prompt_tokens"], batch["prompt_mask"],
                                              ro["completion"], ro["completion_mask"], best,
                                              worst, model_valid)
        pairs["pair_weight"] = (1.0 - sea.mixed_ratio) * pairs["pair_weight"]
        synth["pair_weight"] = sea.mixed_ratio * synth["pair_weight"]
        pairs = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), pairs, synth)
      new_state, metrics = base.pref_step.update(state, pairs, ref_params)

    extra = dict(new_state.extra)
    extra[EXTRA_KEY] = {"w_ED": w_ED, "w0_ED": rm["w0_ED"], "diff_ND": buf,
                        "valid_N": valid_N, "next": nxt}
    new_state = new_state.replace(extra=extra)

    mean_N = jnp.mean(jnp.einsum("ED,ND->EN", w_ED, buf), axis=0)
    n_valid = jnp.maximum(jnp.sum(valid_N), 1.0)
    oracle_RG = oracle_B.reshape(R, G)
    pick = online_lib._pick
    valid_f = valid.astype(jnp.float32)
    metrics.update({
        "reward/mean": jnp.mean(oracle_B),
        "reward/std": jnp.std(oracle_B),
        "online/valid_pair_frac": jnp.mean(valid_f),
        "online/tied_pairs": jnp.sum(1.0 - valid_f),
        "online/chosen_reward": jnp.mean(pick(oracle_RG, chosen)),
        "online/rejected_reward": jnp.mean(pick(oracle_RG, rejected)),
        "online/response_length": jnp.mean(ro["lengths"].astype(jnp.float32)),
        "sea/rm_loss": jnp.mean(bt_E),
        "sea/rm_accuracy": jnp.sum((mean_N > 0) * valid_N) / n_valid,
        "sea/disagreement": jnp.mean(jnp.std(members_EB, axis=0)),
        "sea/buffer_fill": jnp.mean(valid_N),
        "sea/oracle_queries": jnp.asarray(2.0 * R, jnp.float32),
        "sea/model_pair_frac": jnp.mean(model_valid.astype(jnp.float32)),
    })
    for name, value in comps.items():
      if name != online_lib.MEMBERS_KEY and name not in LABEL_COMPONENTS:
        metrics[f"reward/{name}"] = jnp.mean(value)
    return new_state, metrics


def jit_sea_step(step: SEAStep, state_shardings, ref_shardings=None, reward_shardings=None,
                 batch_sharding=None):
  """jax.jit with explicit shardings; the state is donated, ref / reward params not."""
  rep = None if step.base.mesh is None else sharding.replicated(step.base.mesh)
  return jax.jit(step.__call__,
                 in_shardings=(state_shardings, batch_sharding, rep, ref_shardings,
                               reward_shardings),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=(0,))

