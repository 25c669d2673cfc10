"""RL configuration and the algorithm presets (presets are only config bundles)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxrl_llm.rl import advantages, policy_losses

LENGTH_SHAPINGS = ("none", "dler", "hapo", "grpo_lambda")
MAX_LEN_SCHEDULES = ("none", "siri", "staged")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Everything the one-jit RL step needs to know, validated.

  Formulas: the docstrings of `advantages`, `policy_losses` and
  `jaxrl_llm.rewards.shaping`.
  """
  # ROLLOUT
  group_size: int = 8                 # G completions per prompt
  max_new_tokens: int = 16            # L_max
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # ADVANTAGE
  advantage: str = "grpo"             # see advantages.ADVANTAGE_ESTIMATORS
  adv_eps: float = 1e-4
  adv_std_ddof: int = 1               # grpo's std: ddof=1 (sample std) by default
  lambda_pos: float = 1.0             # scale of advantages of successful samples
  lambda_neg: float = 1.0             # ... and of unsuccessful ones
  # LOSS
  policy_loss: str = "ppo_clip"       # see policy_losses.POLICY_LOSSES
  eps_low: float = 0.2
  eps_high: float = 0.2               # > eps_low: DAPO clip-higher
  dual_clip_c: float = 3.0
  aggregation: str = "token_mean"     # see policy_losses.AGGREGATION_MODES
  kl_coef: float = 0.0                # β; 0 skips the reference forward
  kl_estimator: str = "k3"
  kl_in_reward: bool = False          # fold −β·KL into token rewards (reinforce_pp)
  entropy_coef: float = 0.0
  tis_cap: float = 0.0                # > 0: truncated importance sampling vs the sampler
  # UPDATE
  epochs: int = 1
  minibatches: int = 1                # optimizer steps per epoch
  microbatches: int = 1               # gradient accumulation inside a minibatch
  # DAPO
  dynamic_sampling: bool = False      # keep groups with non-zero reward variance
  oversample: int = 1                 # sampled groups = oversample × kept groups
  overlong_cache_len: int = 0         # > 0: soft overlong punishment
  mask_truncated: bool = False        # drop truncated completions from the loss
  # SHAPING
  length_shaping: str = "none"        # none | dler | hapo | grpo_lambda
  dler_budget: int = 0                # DLER: longer than this gets reward 0
  hapo_weight: float = 0.5
  hapo_num_prompts: int = 0           # size of the per-prompt history table
  grpo_lambda_top_fraction: float = 0.5
  grpo_lambda_length_weight: float = 0.5
  max_len_schedule: str = "none"      # none | siri | staged
  schedule_short_len: int = 0         # SIRI compression length
  schedule_period: int = 0            # SIRI period (steps)
  schedule_compress_fraction: float = 0.5
  stage_steps: tuple[int, ...] = ()   # staged (CAMPO): step at which each stage starts
  stage_lengths: tuple[int, ...] = () # ... and its max length
  repetition_ngram: int = 3
  repetition_weight_start: float = 0.0  # CAMPO repetition penalty weight schedule
  repetition_weight_end: float = 0.0
  repetition_warmup_steps: int = 0
  # NUMERICS
  logprob_chunk: int = 512

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"RLConfig.{field}={getattr(self, field)!r}: {msg}")
    check(self.group_size >= 1, "group_size", "must be >= 1")
    check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    check(self.temperature > 0, "temperature", "must be > 0")
    check(self.advantage in advantages.ADVANTAGE_ESTIMATORS, "advantage",
          f"choose one of {advantages.ADVANTAGE_ESTIMATORS}")
    if self.advantage == "rloo":
      check(self.group_size >= 2, "group_size", "rloo needs at least 2 completions per prompt")
    check(self.policy_loss in policy_losses.POLICY_LOSSES, "policy_loss",
          f"choose one of {tuple(policy_losses.POLICY_LOSSES)}")
    check(self.aggregation in policy_losses.AGGREGATION_MODES, "aggregation",
          f"choose one of {policy_losses.AGGREGATION_MODES}")
    check(self.kl_estimator in policy_losses.KL_KINDS, "kl_estimator",
          f"choose one of {policy_losses.KL_KINDS}")
    check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
    if self.kl_in_reward:
      check(self.advantage == "reinforce_pp", "kl_in_reward",
            "the KL-in-reward form needs advantage='reinforce_pp'; otherwise put it in the loss")
    check(self.epochs >= 1, "epochs", "must be >= 1")
    check(self.minibatches >= 1, "minibatches", "must be >= 1")
    check(self.microbatches >= 1, "microbatches", "must be >= 1")
    check(self.oversample >= 1, "oversample", "must be >= 1")
    if self.oversample > 1:
      check(self.dynamic_sampling, "oversample", "oversampling only makes sense with "
            "dynamic_sampling=True")
    check(self.overlong_cache_len >= 0 and self.overlong_cache_len < self.max_new_tokens,
          "overlong_cache_len", f"must be in [0, max_new_tokens={self.max_new_tokens})")
    check(self.length_shaping in LENGTH_SHAPINGS, "length_shaping",
          f"choose one of {LENGTH_SHAPINGS}")
    if self.length_shaping == "dler":
      check(0 < self.dler_budget <= self.max_new_tokens, "dler_budget",
            "DLER needs 0 < dler_budget <= max_new_tokens")
    if self.length_shaping == "hapo":
      check(self.hapo_num_prompts > 0, "hapo_num_prompts",
            "HAPO needs the number of distinct prompt ids (size of its history table)")
    check(self.max_len_schedule in MAX_LEN_SCHEDULES, "max_len_schedule",
          f"choose one of {MAX_LEN_SCHEDULES}")
    if self.max_len_schedule == "siri":
      check(0 < self.schedule_short_len <= self.max_new_tokens, "schedule_short_len",
            "SIRI needs 0 < schedule_short_len <= max_new_tokens")
      check(self.schedule_period > 0, "schedule_period", "SIRI needs a period > 0")
    if self.max_len_schedule == "staged":
      check(len(self.stage_steps) == len(self.stage_lengths) > 0, "stage_steps",
            "staged schedule needs stage_steps and stage_lengths of equal, non-zero length")
      check(all(0 < n <= self.max_new_tokens for n in self.stage_lengths), "stage_lengths",
            "every stage length must be in (0, max_new_tokens]")
    check(self.tis_cap >= 0, "tis_cap", "must be >= 0 (0 disables TIS)")
    check(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")

  @property
  def needs_reference(self) -> bool:
    return self.kl_coef > 0

  @property
  def updates_per_step(self) -> int:
    return self.epochs * self.minibatches

  def loss_options(self) -> dict[str, Any]:
    """Keyword options of the configured policy loss."""
    if self.policy_loss in ("ppo_clip", "gspo", "gspo_token"):
      return dict(eps_low=self.eps_low, eps_high=self.eps_high)
    if self.policy_loss == "dual_clip":
      return dict(eps_low=self.eps_low, eps_high=self.eps_high, clip_c=self.dual_clip_c)
    return dict(eps_high=self.eps_high)  # cispo: no lower clip on the weight

  def advantage_options(self) -> dict[str, Any]:
    if self.advantage == "grpo":
      return dict(eps=self.adv_eps, ddof=self.adv_std_ddof)
    if self.advantage in ("batch_std", "reinforce_pp_baseline", "reinforce_pp"):
      return dict(eps=self.adv_eps)
    return {}


# Presets: named bundles of RLConfig fields (formulas in ALGORITHMS.md).
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath: group-normalised advantage, per-sequence mean, k3 KL in the loss.
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="seq_mean_token_mean",
                 eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3"),
    # Dr. GRPO: no std division, constant normaliser, no KL.
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo_clip",
                    aggregation="seq_mean_token_sum_norm", kl_coef=0.0),
    # DAPO: clip-higher, token-mean, dynamic sampling, overlong shaping, no KL.
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="token_mean",
                 eps_low=0.2, eps_high=0.28, kl_coef=0.0, dynamic_sampling=True, oversample=2),
    # GSPO: sequence-level importance ratio with a tight clip.
    "gspo": dict(advantage="grpo", policy_loss="gspo", aggregation="seq_mean_token_mean",
                 eps_low=3e-4, eps_high=4e-4, kl_coef=0.0),
    # CISPO (MiniMax-M1): clipped, stop-gradient importance weights.
    "cispo": dict(advantage="grpo", policy_loss="cispo", aggregation="token_mean",
                  eps_high=0.28, kl_coef=0.0),
    "rloo": dict(advantage="rloo", policy_loss="ppo_clip", aggregation="token_mean",
                 kl_coef=0.0),
    # REINFORCE++: batch whitening, KL folded into the token rewards.
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo_clip",
                         aggregation="token_mean", kl_coef=0.01, kl_in_reward=True),
}


def from_preset(name: str, **overrides) -> RLConfig:
  """An RLConfig from a preset name plus field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown RL preset {name!r}; choose one of {tuple(PRESETS)}")
  return RLConfig(**{**PRESETS[name], **overrides})
