"""Online alignment: sample, score, pair and update in ONE jitted step.

    step(state, batch, rng, ref_params, reward_params=None) -> (state, metrics)

  ROLLOUT  G responses per prompt from the current policy (`sampling.sample`,
           stopping at EOS)
  REWARD   an in-graph reward: a verifier fn(RewardInputs) -> (rewards_B,
           comps), or a reward model fn(RewardInputs, reward_params) ->
           (rewards_B, comps) (`reward_model.reward_model_fn`)
  SELECT   one pair per prompt, by name:
             best_worst  chosen = argmax_g r, rejected = argmin_g r
                         (online DPO: Guo et al. 2024, "Direct Language Model
                         Alignment from Online AI Feedback")
             sea         Thompson sampling over an RM ensemble (below)
             dice        the policy's own DPO implicit reward (below)
           A pair whose two scores tie carries no preference: it is masked
           out of the loss (pair_weight 0) and counted.
  UPDATE   the preference loss(es) of `PreferenceConfig` on the pairs
           (`PreferenceStep.update`: reference on the fly, exact sums)

SEA (Liu et al. 2024, "Sample-Efficient Alignment for LLMs"): the K heads of
an ensemble RM stand for samples of the reward posterior. Per prompt, one
member e ~ Uniform{1..E} is drawn and the first response is
argmax_g R_e(y_g) (Thompson sampling); the second maximises the ensemble's
disagreement among the remaining responses, either
  "difference": std_e(R_e(y_first) − R_e(y_g))   (about the preference), or
  "score":      std_e(R_e(y_g))                  (about the response).
The pair is ordered by the aggregated reward (rewards_B) and works with any
pairwise loss (DPO, IPO, SLiC/hinge). The reward fn must return the members,
e.g. `reward_model_fn(..., with_members=True)` ("rm_members_BK").

DICE (Chen et al. 2024, "Bootstrapping Language Models with DPO Implicit
Rewards"): responses are ranked by the length-regularised implicit reward of
the policy itself,
  s(y) = β·Σ_t m_t·(log π_θ(y_t) − log π_ref(y_t)) − α·|y|,  α = dice_length_penalty,
and the top response is paired with the bottom one. No external reward is
needed (a reward fn, if given, is only logged).

`iterative_dpo` is the host-loop variant (iterative / self-rewarding DPO):
each round samples with the current policy, judges the samples (a verifier, or
the policy itself as judge, `SelfJudge`), builds pairs, and trains a few
offline DPO steps on them against the round's reference.

Shape letters: R prompts, G samples per prompt, B = R·G rows, E ensemble
members, P prompt length, L max new tokens, S judge suffix length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.preference.step import (
    PreferenceConfig,
    PreferenceStep,
    completion_logprobs,
    jit_preference_step,
    precompute_reference_logps,
)
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.rewards.registry import LABEL_COMPONENTS
from jaxrl_llm.sampling import sample
from jaxrl_llm.train_state import TrainState

SELECTIONS = ("best_worst", "sea", "dice")
SEA_DISAGREEMENTS = ("difference", "score")
PROMPT_KEYS = ("prompt_tokens", "prompt_mask")
MEMBERS_KEY = "rm_members_BK"


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig:
  """Sampling, pair selection and the preference loss of online DPO."""
  num_samples: int = 4              # G responses per prompt (≥ 2)
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  selection: str = "best_worst"     # one of SELECTIONS
  sea_disagreement: str = "difference"  # one of SEA_DISAGREEMENTS
  dice_length_penalty: float = 0.0  # α of DICE's length-regularised implicit reward
  preference: PreferenceConfig = PreferenceConfig()

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"OnlineDPOConfig: {msg}")
    if isinstance(self.preference, Mapping):
      object.__setattr__(self, "preference", PreferenceConfig(**self.preference))
    if self.num_samples < 2:
      fail(f"num_samples must be >= 2 to form a pair, got {self.num_samples}")
    if self.max_new_tokens < 1:
      fail(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature > 0:
      fail(f"temperature must be > 0, got {self.temperature}")
    if self.selection not in SELECTIONS:
      fail(f"selection={self.selection!r}; choose one of {SELECTIONS}")
    if self.sea_disagreement not in SEA_DISAGREEMENTS:
      fail(f"sea_disagreement={self.sea_disagreement!r}; choose one of {SEA_DISAGREEMENTS}")
    if self.dice_length_penalty < 0:
      fail(f"dice_length_penalty must be >= 0, got {self.dice_length_penalty}")
    if self.preference.unpaired:
      fail("online DPO builds pairs; 'kto' is not a pairwise loss")
    if self.preference.reference == "precomputed":
      fail("online samples are new every step: use reference='on_the_fly' (or 'none' for "
           "reference-free losses)")
    if self.selection == "dice" and self.preference.reference == "none":
      fail("selection='dice' ranks by β·log(π_θ/π_ref): it needs reference='on_the_fly'")


# ---------------------------------------------------------------------------
# Pair selection (pure; one pair per prompt).
# ---------------------------------------------------------------------------
def _order(first_R, second_R, scores_RG):
  """(chosen, rejected, valid): the higher-scored of two indices first; ties invalid."""
  s1 = jnp.take_along_axis(scores_RG, first_R[:, None], axis=1)[:, 0]
  s2 = jnp.take_along_axis(scores_RG, second_R[:, None], axis=1)[:, 0]
  chosen = jnp.where(s1 >= s2, first_R, second_R)
  rejected = jnp.where(s1 >= s2, second_R, first_R)
  return chosen, rejected, s1 != s2


def select_best_worst(scores_RG: jax.Array):
  """chosen_R = argmax_g s, rejected_R = argmin_g s, valid_R = max > min.

  Ties pick the first index; a group whose scores are all equal gives an
  invalid pair (no preference to learn).
  """
  scores_RG = jnp.asarray(scores_RG, jnp.float32)
  best = jnp.argmax(scores_RG, axis=1)
  worst = jnp.argmin(scores_RG, axis=1)
  return best, worst, jnp.max(scores_RG, axis=1) > jnp.min(scores_RG, axis=1)


def select_sea(members_ERG: jax.Array, rewards_RG: jax.Array, rng: jax.Array, *,
               disagreement: str = "difference"):
  """SEA pair per prompt: Thompson-sampled first response, max-disagreement second.

  first_R = argmax_g R_e(y_g) with e ~ Uniform{0..E−1} drawn per prompt;
  second_R = argmax_{g ≠ first} std_e(R_e(y_first) − R_e(y_g)) ("difference")
  or std_e(R_e(y_g)) ("score"). The pair is ordered by `rewards_RG` (chosen =
  the higher); equal rewards make it invalid. Returns (chosen_R, rejected_R,
  valid_R).
  """
  if disagreement not in SEA_DISAGREEMENTS:
    raise ValueError(f"select_sea: disagreement={disagreement!r}; choose one of "
                     f"{SEA_DISAGREEMENTS}")
  members_ERG = jnp.asarray(members_ERG, jnp.float32)
  E, R, G = members_ERG.shape
  member_R = jax.random.randint(rng, (R,), 0, E)
  thompson_RG = members_ERG[member_R, jnp.arange(R)]
  first_R = jnp.argmax(thompson_RG, axis=1)
  if disagreement == "difference":
    first_ER1 = jnp.take_along_axis(members_ERG, first_R[None, :, None].repeat(E, 0), axis=2)
    spread_RG = jnp.std(first_ER1 - members_ERG, axis=0)
  else:
    spread_RG = jnp.std(members_ERG, axis=0)
  spread_RG = jnp.where(jax.nn.one_hot(first_R, G, dtype=bool), -jnp.inf, spread_RG)
  second_R = jnp.argmax(spread_RG, axis=1)
  return _order(first_R, second_R, jnp.asarray(rewards_RG, jnp.float32))


def dice_scores(logp_BL: jax.Array, ref_logp_BL: jax.Array, mask_BL: jax.Array, *,
                beta: float, length_penalty: float = 0.0) -> jax.Array:
  """DICE's length-regularised implicit reward β·Σ m·(log π_θ − log π_ref) − α·|y|, [B]."""
  mask = jnp.asarray(mask_BL, jnp.float32)
  diff = jnp.asarray(logp_BL, jnp.float32) - jnp.asarray(ref_logp_BL, jnp.float32)
  return beta * jnp.sum(diff * mask, axis=1) - length_penalty * jnp.sum(mask, axis=1)


def pairs_from_samples(prompt_tokens_RP, prompt_mask_RP, completion_BL, mask_BL, chosen_R,
                       rejected_R, valid_R) -> dict[str, jax.Array]:
  """A preference batch (see `preference.step`) from G samples per prompt and indices."""
  R = prompt_tokens_RP.shape[0]
  G = completion_BL.shape[0] // R
  row_w = jnp.arange(R) * G + chosen_R
  row_l = jnp.arange(R) * G + rejected_R
  return {"prompt_tokens": prompt_tokens_RP, "prompt_mask": prompt_mask_RP,
          "chosen_tokens": completion_BL[row_w], "chosen_mask": mask_BL[row_w],
          "rejected_tokens": completion_BL[row_l], "rejected_mask": mask_BL[row_l],
          "pair_weight": valid_R.astype(jnp.float32)}


def _repeat(tree, n):
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


def _pick(x_RG, idx_R):
  return jnp.take_along_axis(x_RG, idx_R[:, None], axis=1)[:, 0]


# ---------------------------------------------------------------------------
# The online step.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OnlineDPOStep:
  """Online DPO (best_worst / SEA / DICE selection), bound to a model and a reward.

  reward_fn: fn(RewardInputs) -> (rewards_B, comps) for a verifier, or
    fn(RewardInputs, reward_params) -> (rewards_B, comps) for a reward model
    (called with reward_params whenever they are passed). Optional for DICE.
  Batch: prompt_tokens, prompt_mask [R, P] and any per-prompt task arrays the
    reward reads (repeated G times into `RewardInputs.task`).
  """
  model: ModelConfig
  online: OnlineDPOConfig
  tx: optax.GradientTransformation
  reward_fn: Optional[Callable] = None
  eos_id: Optional[int] = None  # the stop token of sampling (required)
  pad_id: int = 0
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True

  def __post_init__(self):
    if self.eos_id is None:
      raise ValueError("OnlineDPOStep: eos_id is required (sampling stops at it)")
    if self.reward_fn is None and self.online.selection != "dice":
      raise ValueError(f"OnlineDPOStep: selection={self.online.selection!r} needs a reward_fn "
                       "(only 'dice' ranks by the policy itself)")

  @property
  def pref_step(self) -> PreferenceStep:
    return PreferenceStep(self.model, self.online.preference, self.tx, self.mesh, self.rules,
                          self.skip_nonfinite)

  # ---------------------------------------------------------------- ROLLOUT
  def rollout(self, params, batch, rng) -> dict[str, jax.Array]:
    on = self.online
    rows = _repeat(dict(batch), on.num_samples)
    out = sample(self.model, params, rows["prompt_tokens"], rows["prompt_mask"], rng,
                 max_new_tokens=on.max_new_tokens, temperature=on.temperature, top_k=on.top_k,
                 top_p=on.top_p, stop_tokens=(self.eos_id,), pad_id=self.pad_id)
    return dict(rows, completion=out.tokens_BL, completion_mask=out.mask_BL,
                finished=out.finished_B, lengths=out.lengths_B)

  # ----------------------------------------------------------------- REWARD
  def score(self, ro, reward_params=None):
    B = ro["completion"].shape[0]
    if self.reward_fn is None:
      return jnp.zeros((B,), jnp.float32), {}
    task = {k: v for k, v in ro.items() if k not in PROMPT_KEYS and k not in (
        "completion", "completion_mask", "finished", "lengths")}
    inputs = RewardInputs(ro["prompt_tokens"], ro["prompt_mask"], ro["completion"],
                          ro["completion_mask"], ro["finished"], task)
    if reward_params is None:
      rewards_B, comps = self.reward_fn(inputs)
    else:
      rewards_B, comps = self.reward_fn(inputs, reward_params)
    return jnp.asarray(rewards_B, jnp.float32), dict(comps)

  # ----------------------------------------------------------------- SELECT
  def select(self, params, ro, rewards_B, comps, rng, ref_params):
    """(chosen_R, rejected_R, valid_R, extra pair arrays, selection scores_B)."""
    on = self.online
    G = on.num_samples
    R = rewards_B.shape[0] // G
    extra = {}
    if on.selection == "best_worst":
      scores_B = rewards_B
      chosen, rejected, valid = select_best_worst(rewards_B.reshape(R, G))
    elif on.selection == "sea":
      if MEMBERS_KEY not in comps:
        raise ValueError(f"selection='sea' needs the ensemble members: the reward fn must "
                         f"return comps[{MEMBERS_KEY!r}] [B, E], e.g. "
                         "reward_model_fn(..., with_members=True)")
      members_ERG = comps[MEMBERS_KEY].T.reshape(-1, R, G)
      scores_B = rewards_B
      chosen, rejected, valid = select_sea(members_ERG, rewards_B.reshape(R, G), rng,
                                           disagreement=on.sea_disagreement)
    else:  # dice
      if ref_params is None:
        raise ValueError("selection='dice' needs ref_params (the implicit reward's π_ref)")
      chunk = on.preference.logprob_chunk
      logps = functools.partial(completion_logprobs, self.model, chunk_size=chunk)
      args = (ro["prompt_tokens"], ro["prompt_mask"], ro["completion"], ro["completion_mask"])
      logp_BL = jax.lax.stop_gradient(logps(params, *args))
      ref_BL = jax.lax.stop_gradient(logps(ref_params, *args))
      scores_B = dice_scores(logp_BL, ref_BL, ro["completion_mask"], beta=on.preference.beta,
                             length_penalty=on.dice_length_penalty)
      chosen, rejected, valid = select_best_worst(scores_B.reshape(R, G))
      # The pair's reference log-probs are already here: no second reference pass.
      idx_w = jnp.arange(R) * G + chosen
      idx_l = jnp.arange(R) * G + rejected
      extra = {"ref_chosen_logps": ref_BL[idx_w], "ref_rejected_logps": ref_BL[idx_l]}
    return chosen, rejected, valid, extra, scores_B

  def __call__(self, state: TrainState, batch, rng, ref_params=None, reward_params=None):
    """ROLLOUT → REWARD → SELECT → UPDATE, one graph."""
    on = self.online
    G = on.num_samples
    with sharding.activation_rules(self.mesh, self.rules):
      rng = jax.random.fold_in(rng, state.step)
      rollout_rng, select_rng = jax.random.split(rng)
      ro = self.rollout(state.params, batch, rollout_rng)
      rewards_B, comps = self.score(ro, reward_params)
      chosen, rejected, valid, extra, scores_B = self.select(
          state.params, ro, rewards_B, comps, select_rng, ref_params)
      pairs = pairs_from_samples(batch["prompt_tokens"], batch["prompt_mask"], ro["completion"],
                                 ro["completion_mask"], chosen, rejected, valid)
      pairs.update(extra)
      new_state, metrics = self.pref_step.update(state, pairs, ref_params)

    R = rewards_B.shape[0] // G
    valid_f = valid.astype(jnp.float32)
    rewards_RG = rewards_B.reshape(R, G)
    metrics.update({
        "reward/mean": jnp.mean(rewards_B),
        "reward/std": jnp.std(rewards_B),
        "online/valid_pair_frac": jnp.mean(valid_f),
        "online/tied_pairs": jnp.sum(1.0 - valid_f),
        "online/chosen_reward": jnp.mean(_pick(rewards_RG, chosen)),
        "online/rejected_reward": jnp.mean(_pick(rewards_RG, rejected)),
        "online/selection_score_gap": jnp.mean(
            _pick(scores_B.reshape(R, G), chosen) - _pick(scores_B.reshape(R, G), rejected)),
        "online/response_length": jnp.mean(ro["lengths"].astype(jnp.float32)),
        "online/truncation_rate": 1.0 - jnp.mean(ro["finished"].astype(jnp.float32)),
    })
    for name, value in comps.items():
      if name != MEMBERS_KEY and name not in LABEL_COMPONENTS:
        metrics[f"reward/{name}"] = jnp.mean(value)
    return new_state, metrics


def jit_online_dpo_step(step: OnlineDPOStep, state_shardings, ref_shardings=None,
                        reward_shardings=None, batch_sharding=None):
  """jax.jit with explicit shardings; the state is donated, ref / reward params not."""
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  return jax.jit(step.__call__,
                 in_shardings=(state_shardings, batch_sharding, rep, ref_shardings,
                               reward_shardings),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------
# Iterative / self-rewarding DPO (host loop over rounds).
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SelfJudge:
  """The policy as its own judge (LLM-as-a-judge with a yes-token score).

  The judge prompt of a sample is: the task prompt, the response (without its
  stop token), then `suffix_tokens` (e.g. the encoding of " Correct? "). The
  score is the policy's log-probability of `yes_id` as the next token:

    score(x, y) = log π_θ(yes | x, y, suffix).

  This follows Self-Rewarding Language Models (Yuan et al. 2024), where the
  policy judges its own samples to build the next round's pairs, with the
  judgement read as the probability of a "yes" token instead of a generated
  1–5 rubric score (a continuous score, one forward, no decoding).
  """
  suffix_tokens: tuple[int, ...]
  yes_id: int
  logprob_chunk: int = 512

  def __post_init__(self):
    object.__setattr__(self, "suffix_tokens", tuple(int(t) for t in self.suffix_tokens))
    if not self.suffix_tokens:
      raise ValueError("SelfJudge.suffix_tokens must hold at least one token")


def self_judge_scores(cfg: ModelConfig, params, inputs: RewardInputs, judge: SelfJudge,
                      eos_id: int) -> jax.Array:
  """log π(yes | prompt, response, suffix) per row, float32 [B].

  The row is [prompt (left-padded) | response (right-padded) | suffix]; the
  padding between the response and the suffix gets segment 0 (never
  attended) and the rotary positions count real tokens only, so the row reads
  as one contiguous sequence without moving any token. The last column
  predicts the judgement token.
  """
  B = inputs.completion_BL.shape[0]
  suffix_BS = jnp.broadcast_to(jnp.asarray(judge.suffix_tokens, jnp.int32),
                               (B, len(judge.suffix_tokens)))
  response_real = (inputs.completion_mask_BL != 0) & (inputs.completion_BL != eos_id)
  real_BT = jnp.concatenate([inputs.prompt_mask_BP != 0, response_real,
                             jnp.ones(suffix_BS.shape, bool)], axis=1)
  tokens_BT = jnp.concatenate([inputs.prompt_tokens_BP.astype(jnp.int32),
                               inputs.completion_BL.astype(jnp.int32), suffix_BS], axis=1)
  positions_BT = jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)
  h_BTD = decoder.hidden_states(cfg, params, tokens_BT, positions_BT=positions_BT,
                                segment_ids_BT=real_BT.astype(jnp.int32))
  yes_B1 = jnp.full((B, 1), judge.yes_id, jnp.int32)
  return decoder.token_logprobs(cfg, params, h_BTD[:, -1:], yes_B1,
                                chunk_size=judge.logprob_chunk)[:, 0]


def iterative_dpo(step: PreferenceStep, state: TrainState, prompt_batches: Iterable[Mapping],
                  rng: jax.Array, *, judge, eos_id: int, num_samples: int = 4,
                  max_new_tokens: int = 16, temperature: float = 1.0, pad_id: int = 0,
                  train_steps: int = 4, ref_params=None, state_shardings=None,
                  update_reference: bool = True):
  """Iterative DPO rounds: sample → judge → pairs → `train_steps` offline DPO steps.

  Args:
    step: the offline `PreferenceStep` trained on each round's pairs.
    state: the policy TrainState (donated through the jitted steps).
    prompt_batches: one prompt batch per round (prompt_tokens, prompt_mask
      [R, P] plus the task arrays a verifier judge reads); static shapes, so
      every round reuses the same compiled programs.
    judge: a verifier fn(RewardInputs) -> (rewards_B, comps), or a `SelfJudge`
      (self-rewarding: the current policy scores its own samples).
    update_reference: π_ref of round t is the policy at the start of round t
      (Yuan et al. 2024; Xu et al. 2023, "Some things are more CRINGE than
      others: iterative preference optimization with the pairwise cringe
      loss"); False keeps `ref_params` for every round.

  The round's reference log-probs are computed once per round
  (`precompute_reference_logps`) and reused by its `train_steps` updates.
  Returns (state, history): one dict of host metrics per round.
  """
  pref = step.pref
  if pref.unpaired:
    raise ValueError("iterative_dpo trains on pairs; 'kto' is not a pairwise loss")
  if num_samples < 2:
    raise ValueError(f"iterative_dpo: num_samples must be >= 2, got {num_samples}")
  if not update_reference and pref.needs_reference and ref_params is None:
    raise ValueError("iterative_dpo: update_reference=False needs ref_params")
  needs_ref = pref.needs_reference
  train_step = dataclasses.replace(
      step, pref=pref.replace(reference="precomputed") if needs_ref else pref)
  ref_sh = None if state_shardings is None else state_shardings.params
  train = jit_preference_step(train_step, state_shardings, None)
  precompute = jax.jit(functools.partial(precompute_reference_logps, step),
                       in_shardings=(ref_sh, None))
  cfg = step.model

  def generate_and_judge(params, batch, key):
    with sharding.activation_rules(step.mesh, step.rules):
      rows = _repeat(dict(batch), num_samples)
      out = sample(cfg, params, rows["prompt_tokens"], rows["prompt_mask"], key,
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   stop_tokens=(eos_id,), pad_id=pad_id)
      task = {k: v for k, v in rows.items() if k not in PROMPT_KEYS}
      inputs = RewardInputs(rows["prompt_tokens"], rows["prompt_mask"], out.tokens_BL,
                            out.mask_BL, out.finished_B, task)
      if isinstance(judge, SelfJudge):
        scores_B = self_judge_scores(cfg, params, inputs, judge, eos_id)
      else:
        scores_B = jnp.asarray(judge(inputs)[0], jnp.float32)
      R = batch["prompt_tokens"].shape[0]
      chosen, rejected, valid = select_best_worst(scores_B.reshape(R, num_samples))
      pairs = pairs_from_samples(batch["prompt_tokens"], batch["prompt_mask"], out.tokens_BL,
                                 out.mask_BL, chosen, rejected, valid)
      stats = {"judge/score_mean": jnp.mean(scores_B),
               "online/valid_pair_frac": jnp.mean(valid.astype(jnp.float32)),
               "online/response_length": jnp.mean(out.lengths_B.astype(jnp.float32))}
      return pairs, stats

  gen = jax.jit(generate_and_judge, in_shardings=(ref_sh, None, None))
  history = []
  for round_idx, batch in enumerate(prompt_batches):
    key = jax.random.fold_in(rng, round_idx)
    pairs, stats = gen(state.params, dict(batch), key)
    round_ref = ref_params
    if needs_ref:
      if update_reference:
        round_ref = jax.tree.map(jnp.copy, state.params)
      pairs = precompute(round_ref, pairs)
    metrics = {}
    for _ in range(train_steps):
      state, metrics = train(state, pairs, key, None)
    record = {k: float(v) for k, v in jax.device_get(stats).items()}
    record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
    record["round"] = round_idx
    history.append(record)
  return state, history


__all__ = [
    "OnlineDPOConfig", "OnlineDPOStep", "SelfJudge", "SELECTIONS", "dice_scores",
    "iterative_dpo", "jit_online_dpo_step", "pairs_from_samples", "select_best_worst",
    "select_sea", "self_judge_scores",
]
