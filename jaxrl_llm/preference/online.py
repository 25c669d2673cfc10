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
e.g. `reward_model_fn(..., with_members=True)` ("rm_members_BK"); from a config:
reward.components=(("reward_model", 1.0),) with reward.reward_model_path a
reward-model run of >= 2 heads.

DICE (Chen et al. 2024, "Bootstrapping Language Models with DPO Implicit
Rewards"): responses are ranked by the length-regularised implicit reward of
the policy itself,
  s(y) = β·Σ_t m_t·(log π_θ(y_t) − log π_ref(y_t)) − α·|y|,  α = dice_length_penalty,
and the top response is paired with the bottom one. No external reward is
needed (a reward fn, if given, is only logged). π_ref must differ from the
policy (the implicit reward is 0 for every response while they are equal):
the policy starts from a preference-trained model and π_ref is the model it
started from (config: trainer.init_from, online.reference_from).

Iterative / self-rewarding DPO (`IterativeDPO`, config `IterativeDPOConfig`,
trainer kind "iterative_dpo"; `iterative_dpo` is the same rounds as a host
loop): each round samples with the current policy, judges the samples (the
reward components: verifiers or a reward model; or the policy itself as
judge, `SelfJudge`), builds best-vs-worst pairs, and trains a few offline
preference steps on them against the round's reference.

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

from jaxrl_llm import lora, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.preference.step import (
    PreferenceConfig,
    PreferenceStep,
    completion_logprobs,
    jit_preference_step,
)
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.rewards.registry import LABEL_COMPONENTS
from jaxrl_llm.sampling import sample
from jaxrl_llm.train_state import TrainState

SELECTIONS = ("best_worst", "sea", "dice")
JUDGES = ("reward", "self")     # iterative DPO: the reward components, or the policy itself
ROUND_KEY = "iterative_round"  # TrainState.extra entry of the current iterative-DPO round
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
  # π_ref: "" is the starting policy; else the workdir of a run whose latest params are
  # π_ref (DICE: the policy starts from a DPO run, trainer.init_from, and π_ref is the
  # model that run started from, e.g. its "<workdir>/sft_warmstart").
  reference_from: str = ""
  preference: PreferenceConfig = PreferenceConfig()

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"OnlineDPOConfig: {msg}")
    if self.reference_from and isinstance(self.preference, PreferenceConfig) and (
        not self.preference.needs_reference):
      fail(f"reference_from={self.reference_from!r} but the loss {self.preference.losses} "
           f"with reference={self.preference.reference!r} reads no reference")
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
    # Each prompt prefilled once for its G samples: the same samples as the repeated rows.
    out = sample(self.model, params, batch["prompt_tokens"], batch["prompt_mask"], rng,
                 max_new_tokens=on.max_new_tokens, temperature=on.temperature, top_k=on.top_k,
                 top_p=on.top_p, stop_tokens=(self.eos_id,), pad_id=self.pad_id,
                 group_size=on.num_samples)
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
          state.params, ro, rewards_B, comps, select_rng,
          lora.reference_or(ref_params, state.params))  # LoRA: the adapters' starting model
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
# Iterative / self-rewarding DPO (rounds of sample → judge → train).
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


def self_judge_from_text(tokenizer, suffix: str, yes: str, *,
                         logprob_chunk: int = 512) -> SelfJudge:
  """A `SelfJudge` from text: `suffix` encoded as the judge question, `yes` as ONE token.

  Raises ValueError when `yes` is not exactly one token, or when either text
  holds characters the tokenizer maps to its unknown token (the judge would
  read a different question than the one written).
  """
  suffix_ids = tokenizer.encode(suffix)
  yes_ids = tokenizer.encode(yes)
  unk = getattr(tokenizer, "unk_id", None)
  for field, text, ids in (("judge_suffix", suffix, suffix_ids), ("judge_yes", yes, yes_ids)):
    if unk is not None and unk in ids:
      raise ValueError(f"iterative.{field}={text!r} has characters outside the tokenizer's "
                       f"vocabulary (encoded {ids}, unknown id {unk}); rephrase it with "
                       "characters the tokenizer knows")
  if not suffix_ids:
    raise ValueError(f"iterative.judge_suffix={suffix!r} encodes to no tokens")
  if len(yes_ids) != 1:
    raise ValueError(f"iterative.judge_yes={yes!r} encodes to {len(yes_ids)} tokens {yes_ids}; "
                     "the self-judge scores the log-prob of ONE token: choose a text that is a "
                     "single token of data.tokenizer")
  return SelfJudge(tuple(suffix_ids), yes_ids[0], logprob_chunk)


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


@dataclasses.dataclass(frozen=True)
class IterativeDPOConfig:
  """Rounds of sample → judge → pair → offline preference steps (kind "iterative_dpo").

  A round starts every `steps_per_round` optimizer steps, so a run of
  trainer.num_steps steps has ⌈num_steps / steps_per_round⌉ rounds (the last
  one shorter when steps_per_round does not divide num_steps). Each round
  draws one prompt batch, samples `num_samples` responses per prompt with the
  current policy, scores them with the judge, pairs the best with the worst
  response of each prompt (ties masked and counted) and trains on those pairs
  until the next round starts.
  """
  steps_per_round: int = 4          # preference steps on each round's pairs
  num_samples: int = 4              # responses per prompt (≥ 2)
  max_new_tokens: int = 16
  temperature: float = 1.0
  # "reward": the run's reward.components (verifiers, and/or "reward_model" for a
  # trained reward model); "self": the policy judges its own samples (`SelfJudge`).
  judge: str = "reward"
  judge_suffix: str = "\nIs the answer correct? "  # self-judge: text after the response
  judge_yes: str = "yes"            # self-judge: ONE token; its log-prob is the score
  # π_ref of round t is the policy at the start of round t; False: the starting policy.
  update_reference: bool = True
  preference: PreferenceConfig = PreferenceConfig()

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"IterativeDPOConfig: {msg}")
    if isinstance(self.preference, Mapping):
      object.__setattr__(self, "preference", PreferenceConfig(**self.preference))
    for name in ("steps_per_round", "max_new_tokens"):
      if getattr(self, name) < 1:
        fail(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_samples < 2:
      fail(f"num_samples must be >= 2 to form a pair, got {self.num_samples}")
    if not self.temperature > 0:
      fail(f"temperature must be > 0, got {self.temperature}")
    if self.judge not in JUDGES:
      fail(f"judge={self.judge!r}; choose one of {JUDGES}")
    if self.judge == "self" and not (self.judge_suffix and self.judge_yes):
      fail("judge='self' needs judge_suffix (the question after the response) and judge_yes "
           "(the one-token answer that scores it)")
    if self.preference.unpaired:
      fail("iterative DPO builds pairs; 'kto' is not a pairwise loss")
    if self.preference.reference == "precomputed":
      fail("each round computes its pairs' reference log-probs itself: use "
           "reference='on_the_fly' (or 'none' for reference-free losses)")


def _mean_components(comps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {f"reward/{k}": jnp.mean(v) for k, v in comps.items()
          if k != MEMBERS_KEY and k not in LABEL_COMPONENTS}


@dataclasses.dataclass(frozen=True)
class IterativeDPO:
  """Iterative / self-rewarding DPO as pure functions of the TrainState.

    round_pairs(params, batch, rng, ref_params, reward_params) -> (pairs, stats)
      ROLLOUT    num_samples responses per prompt from the current policy
      JUDGE      a reward fn(RewardInputs[, reward_params]) -> (scores_B, comps)
                 (verifiers or a reward model), or a `SelfJudge`: the current
                 policy scores its own samples
      SELECT     best vs worst per prompt (`select_best_worst`; ties masked)
      REFERENCE  log π_ref of the pairs, once per round: π_ref is the policy at
                 the start of the round (update_reference) or `ref_params`
    start_round(state, batch, rng, ...) -> state   the round's pairs and stats
                 stored in state.extra[ROUND_KEY] (so a resumed run continues
                 the round it was in, with the same pairs and reference)
    train(state, rng) -> (state, metrics)          one preference step on them

  Rounds follow Self-Rewarding Language Models (Yuan et al. 2024) and the
  iterative pairwise training of Xu et al. 2023 ("Some things are more CRINGE
  than others: iterative preference optimization with the pairwise cringe
  loss"): π_ref of round t is the policy at the start of round t.
  """
  model: ModelConfig
  config: IterativeDPOConfig
  tx: optax.GradientTransformation
  judge: Any                          # a reward fn, or a SelfJudge
  eos_id: Optional[int] = None        # the stop token of sampling (required)
  pad_id: int = 0
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True

  def __post_init__(self):
    if self.eos_id is None:
      raise ValueError("IterativeDPO: eos_id is required (sampling stops at it)")
    is_self = isinstance(self.judge, SelfJudge)
    if (self.config.judge == "self") != is_self:
      raise ValueError(f"IterativeDPO: config.judge={self.config.judge!r} but the judge is "
                       f"{type(self.judge).__name__}: pass a SelfJudge for 'self', a reward "
                       "fn for 'reward'")
    if not is_self and not callable(self.judge):
      raise ValueError(f"IterativeDPO: the judge must be a reward fn or a SelfJudge, got "
                       f"{self.judge!r}")

  @property
  def pref_step(self) -> PreferenceStep:
    """The preference step of the rounds (reference log-probs precomputed per round)."""
    pref = self.config.preference
    if pref.needs_reference:
      pref = pref.replace(reference="precomputed")
    return PreferenceStep(self.model, pref, self.tx, self.mesh, self.rules,
                          self.skip_nonfinite)

  def round_pairs(self, params, batch, rng, ref_params=None, reward_params=None):
    """ROLLOUT → JUDGE → SELECT → REFERENCE of one round: (pairs [R], stats)."""
    on = self.config
    G = on.num_samples
    with sharding.activation_rules(self.mesh, self.rules):
      rows = _repeat(dict(batch), G)
      out = sample(self.model, params, batch["prompt_tokens"], batch["prompt_mask"], rng,
                   max_new_tokens=on.max_new_tokens, temperature=on.temperature,
                   stop_tokens=(self.eos_id,), pad_id=self.pad_id, group_size=G)
      task = {k: v for k, v in rows.items() if k not in PROMPT_KEYS}
      inputs = RewardInputs(rows["prompt_tokens"], rows["prompt_mask"], out.tokens_BL,
                            out.mask_BL, out.finished_B, task)
      comps = {}
      if isinstance(self.judge, SelfJudge):
        scores_B = self_judge_scores(self.model, params, inputs, self.judge, self.eos_id)
      else:
        scores_B, comps = (self.judge(inputs) if reward_params is None
                           else self.judge(inputs, reward_params))
      scores_B = jax.lax.stop_gradient(jnp.asarray(scores_B, jnp.float32))
      R = batch["prompt_tokens"].shape[0]
      scores_RG = scores_B.reshape(R, G)
      chosen, rejected, valid = select_best_worst(scores_RG)
      pairs = pairs_from_samples(batch["prompt_tokens"], batch["prompt_mask"], out.tokens_BL,
                                 out.mask_BL, chosen, rejected, valid)
      if on.preference.needs_reference:
        ref = params if on.update_reference else lora.reference_or(ref_params, params)
        if ref is None:
          raise ValueError("iterative DPO with update_reference=False needs ref_params (the "
                           "fixed π_ref)")
        pairs = dict(pairs, **self.pref_step.reference_logps(ref, pairs))
    valid_f = valid.astype(jnp.float32)
    stats = {
        "judge/score_mean": jnp.mean(scores_B),
        "judge/score_std": jnp.std(scores_B),
        "judge/chosen_score": jnp.mean(_pick(scores_RG, chosen)),
        "judge/rejected_score": jnp.mean(_pick(scores_RG, rejected)),
        "online/valid_pair_frac": jnp.mean(valid_f),
        "online/tied_pairs": jnp.sum(1.0 - valid_f),
        "online/response_length": jnp.mean(out.lengths_B.astype(jnp.float32)),
        "online/truncation_rate": 1.0 - jnp.mean(out.finished_B.astype(jnp.float32)),
        **_mean_components(comps),
    }
    return pairs, stats

  def start_round(self, state: TrainState, batch, rng, ref_params=None, reward_params=None):
    """A new round from `batch` (prompts), stored in state.extra[ROUND_KEY]."""
    rng = jax.random.fold_in(rng, state.step)
    pairs, stats = self.round_pairs(state.params, batch, rng, ref_params, reward_params)
    return state.replace(extra=dict(state.extra, **{ROUND_KEY: {"pairs": pairs,
                                                                  "stats": stats}}))

  def train(self, state: TrainState, rng=None):
    """One preference step on the current round's pairs; reports the round's stats too."""
    del rng
    current = state.extra[ROUND_KEY]
    with sharding.activation_rules(self.mesh, self.rules):
      new_state, metrics = self.pref_step.update(state, current["pairs"])
    metrics.update(current["stats"])
    metrics["iterative/round"] = (state.step // self.config.steps_per_round).astype(jnp.float32)
    return new_state, metrics

  def with_round(self, state: TrainState, state_shardings, batch, ref_params=None,
                 reward_params=None):
    """(state, shardings) with an empty round in state.extra[ROUND_KEY] (replicated).

    Shapes come from `round_pairs` on `batch` (a prompt batch of the run's
    shape), so the state has its final structure before the first checkpoint
    restore and before the steps are jitted.
    """
    ref = ref_params if ref_params is not None else state.params
    pairs, stats = jax.eval_shape(self.round_pairs, state.params, dict(batch),
                                  jax.random.key(0), ref, reward_params)
    empty = {"pairs": pairs, "stats": stats}
    rep = (sharding.replicated(self.mesh) if self.mesh is not None
           else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    round_sh = jax.tree.map(lambda _: rep, empty)
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), empty),
                    out_shardings=round_sh)()
    state = state.replace(extra=dict(state.extra, **{ROUND_KEY: zeros}))
    shardings = state_shardings.replace(
        extra=dict(state_shardings.extra, **{ROUND_KEY: round_sh}))
    return state, shardings


def jit_iterative_dpo(step: IterativeDPO, state_shardings, ref_shardings=None,
                      reward_shardings=None, batch_sharding=None):
  """(start_round, train) jitted with explicit shardings; the state is donated.

  `state_shardings` must include the round buffers (`IterativeDPO.with_round`).
  Pass None shardings for a reference / reward model the run does not use.
  """
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  start = jax.jit(step.start_round,
                  in_shardings=(state_shardings, batch_sharding, rep, ref_shardings,
                                reward_shardings),
                  out_shardings=state_shardings, donate_argnums=(0,))
  train = jax.jit(step.train, in_shardings=(state_shardings, rep),
                  out_shardings=(state_shardings, rep), donate_argnums=(0,))
  return start, train


class RoundPrompts:
  """The prompt batches of an iterative-DPO run: one per round, nothing in between.

  Wraps a resumable training iterator for a loop that draws a batch at every
  optimizer step: the first step of each round (steps drawn so far a
  multiple of `steps_per_round`) gets the next prompt batch, the other steps
  an empty dict (they train on the round's pairs, kept in the TrainState).
  So every prompt batch starts exactly one round, and `get_state` /
  `set_state` (the inner iterator's state plus the steps drawn) resume
  exactly, mid-round included.
  """

  def __init__(self, iterator, steps_per_round: int):
    if steps_per_round < 1:
      raise ValueError(f"RoundPrompts: steps_per_round must be >= 1, got {steps_per_round}")
    self.iterator = iterator
    self.steps_per_round = steps_per_round
    self.steps = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.iterator) if self.steps % self.steps_per_round == 0 else {}
    self.steps += 1
    return batch

  def get_state(self) -> dict:
    return {"prompts": self.iterator.get_state(), "steps": self.steps}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or set(state) != {"prompts", "steps"}:
      raise ValueError(f"RoundPrompts state must be a dict with keys 'prompts' and 'steps' "
                       f"(from get_state()), got {state!r}")
    self.iterator.set_state(state["prompts"])
    self.steps = int(state["steps"])

  @property
  def stats(self):
    return self.iterator.stats


def iterative_dpo(step: PreferenceStep, state: TrainState, prompt_batches: Iterable[Mapping],
                  rng: jax.Array, *, judge, eos_id: int, num_samples: int = 4,
                  max_new_tokens: int = 16, temperature: float = 1.0, pad_id: int = 0,
                  train_steps: int = 4, ref_params=None, state_shardings=None,
                  update_reference: bool = True, reward_params=None):
  """Iterative DPO rounds as a host loop: sample → judge → pairs → `train_steps` steps.

  The same rounds as `IterativeDPO` (which the trainer's kind="iterative_dpo"
  runs), for a notebook or a script.

  Args:
    step: the offline `PreferenceStep` (model, loss, optimizer) of the rounds.
    state: the policy TrainState (donated through the jitted steps).
    prompt_batches: one prompt batch per round (prompt_tokens, prompt_mask
      [R, P] plus the task arrays a verifier judge reads); static shapes, so
      every round reuses the same compiled programs.
    judge: a reward fn(RewardInputs) -> (rewards_B, comps) (with
      `reward_params`: fn(RewardInputs, reward_params), e.g. a reward model),
      or a `SelfJudge` (self-rewarding: the current policy scores its own
      samples).
    update_reference: π_ref of round t is the policy at the start of round t
      (Yuan et al. 2024; Xu et al. 2023); False keeps `ref_params` for every
      round.

  The round's reference log-probs are computed once per round and reused by
  its `train_steps` updates. Returns (state, history): one dict of host
  metrics per round.
  """
  config = IterativeDPOConfig(
      steps_per_round=train_steps,
      num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
      judge="self" if isinstance(judge, SelfJudge) else "reward",
      update_reference=update_reference, preference=step.pref)
  rounds = IterativeDPO(step.model, config, step.tx, judge, eos_id, pad_id, step.mesh,
                        step.rules, step.skip_nonfinite)
  if not update_reference and config.preference.needs_reference and ref_params is None:
    raise ValueError("iterative_dpo: update_reference=False needs ref_params")
  params_sh = None if state_shardings is None else state_shardings.params
  gen = jax.jit(rounds.round_pairs,
                in_shardings=(params_sh, None, None,
                              params_sh if ref_params is not None else None, None))
  train = jit_preference_step(rounds.pref_step, state_shardings, None)
  history = []
  for round_idx, batch in enumerate(prompt_batches):
    key = jax.random.fold_in(rng, round_idx)
    pairs, stats = gen(state.params, dict(batch), key, ref_params, reward_params)
    metrics = {}
    for _ in range(train_steps):
      state, metrics = train(state, pairs, key, None)
    record = {k: float(v) for k, v in jax.device_get(stats).items()}
    record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
    record["round"] = round_idx
    history.append(record)
  return state, history


__all__ = [
    "IterativeDPO", "IterativeDPOConfig", "JUDGES", "OnlineDPOConfig", "OnlineDPOStep",
    "RoundPrompts", "SelfJudge", "SELECTIONS", "dice_scores", "iterative_dpo",
    "self_judge_from_text",
    "jit_iterative_dpo", "jit_online_dpo_step", "pairs_from_samples", "select_best_worst",
    "select_sea", "self_judge_scores",
]
