"""RL configuration and the algorithm presets (presets are only config bundles)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxrl_llm import config_checks
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.rl import advantages, policy_losses, registry
from jaxrl_llm.rl import anchor as anchor_lib
from jaxrl_llm.rl import depo as depo_lib
from jaxrl_llm.rl.anchor import AnchorConfig
from jaxrl_llm.rl.critic import CriticConfig
from jaxrl_llm.rl.depo import DEPOConfig
from jaxrl_llm.rl.off_policy import OffPolicyConfig

LENGTH_SHAPINGS = ("none", "dler", "hapo", "grpo_lambda")
# advantage="gae": PPO with a learned critic (rl.critic; `jaxrl_llm.rl.ppo_step`).
GAE = "gae"
MAX_LEN_SCHEDULES = ("none", "siri", "staged")

# Options RLConfig sets from its own fields: {option name: RLConfig field}.
ADVANTAGE_OPTION_FIELDS = {"eps": "adv_eps", "ddof": "adv_std_ddof"}
LOSS_OPTION_FIELDS = {"eps_low": "eps_low", "eps_high": "eps_high", "clip_c": "dual_clip_c"}
# Which of them each built-in estimator / loss receives.
_BUILTIN_ADVANTAGE_OPTIONS = {
    "grpo": ("eps", "ddof"), "copo": ("eps", "ddof"), "batch_std": ("eps",),
    "reinforce_pp_baseline": ("eps",), "reinforce_pp": ("eps",), "dr_grpo": (), "rloo": (),
    "remax": (),
}
_BUILTIN_LOSS_OPTIONS = {
    "ppo_clip": ("eps_low", "eps_high"), "gspo": ("eps_low", "eps_high"),
    "gspo_token": ("eps_low", "eps_high"), "dual_clip": ("eps_low", "eps_high", "clip_c"),
    "cispo": ("eps_high",),  # no lower clip on the weight
}
# Arguments the dispatchers pass themselves: never settable through *_kwargs.
_ADVANTAGE_RESERVED = ("name", "rewards_B", "group_size", "mask_BT", "valid_B", "kl_BT",
                       "kl_coef", "baseline_rewards_B", "answers_B")
_LOSS_RESERVED = ("name", "logp_BT", "old_logp_BT", "adv_BT", "mask_BT")


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
  # ROLLOUT ENGINE (jaxrl_llm.sampling)
  rollout_shared_prefix: bool = True     # prefill each prompt once for its G samples
  # ... and keep its K/V once per group, read once per group per decode step
  # (cascade attention, jaxrl_llm.models.shared_prefix). Single-turn rollouts.
  rollout_shared_prefix_attention: bool = False
  # Halve the decode batch whenever half its rows have finished, down to this
  # many rows (0: off). Below ~64 rows a decode step mostly reads the weights,
  # so smaller buckets gain little and each bucket is one more compiled loop.
  rollout_compaction_min_rows: int = 64
  # How each token is drawn: "gumbel" (jax.random.categorical, a Gumbel draw per
  # vocabulary entry) or "inverse_cdf" (one uniform per row; the same distribution).
  rollout_categorical: str = "gumbel"
  banned_tokens: tuple[int, ...] = ()    # token ids never sampled
  min_new_tokens: int = 0                # no EOS before this many completion tokens
  forced_prefix: tuple[int, ...] = ()    # every completion starts with these token ids
  # ADVANTAGE
  advantage: str = "grpo"             # see advantages.advantage_estimator_names()
  adv_eps: float = 1e-4
  adv_std_ddof: int = 1               # grpo's std: ddof=1 (sample std) by default
  lambda_pos: float = 1.0             # scale of advantages of successful samples
  lambda_neg: float = 1.0             # ... and of unsuccessful ones
  # Extra keyword options of the estimator, as (name, value) pairs (a dict is
  # accepted and converted), e.g. (("k", 5.0), ("b", 1.0)) for copo.
  advantage_kwargs: tuple[tuple[str, Any], ...] = ()
  # LOSS
  policy_loss: str = "ppo_clip"       # see policy_losses.policy_loss_names()
  eps_low: float = 0.2
  eps_high: float = 0.2               # > eps_low: DAPO clip-higher
  dual_clip_c: float = 3.0
  loss_kwargs: tuple[tuple[str, Any], ...] = ()  # extra options of the loss, as above
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
  # Soft overlong punishment over the last L_c tokens of the budget (DAPO). L_c is
  # `overlong_cache_len` tokens when > 0, else ⌊overlong_cache_fraction · max_new_tokens⌋
  # (the `overlong_cache_tokens` property; 0 turns the shaping off).
  overlong_cache_len: int = 0
  overlong_cache_fraction: float = 0.0
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
  # Length-bucketed update: rows ordered by length, each micro-batch cut to the smallest
  # of this many static widths holding its completions (jaxrl_llm.rl.length_buckets);
  # 1 (the default) turns it off. Same loss and gradients, fewer padded columns; on ragged
  # rollouts (W5) 4 buckets cut the update 7.1 -> 4.3 s but raised peak memory 37 -> 69 GiB
  # (BENCHMARKS.md), so it is opt-in until the memory cost is resolved.
  length_buckets: int = 1
  # The update's forward runs each group's prompt once (jaxrl_llm.models.shared_prompt): per
  # group P + G·L tokens instead of G·(P + L); the same log-probs and gradients. Needs whole
  # groups in every micro-batch: epochs x minibatches > 1 then shuffle whole groups (not
  # rows), and it refuses length buckets and multi-turn rollouts. On a mesh the
  # packed rows (one per group) split over the batch axes only where the groups of a
  # micro-batch divide them; otherwise they are computed whole on each of those devices.
  update_shared_prompt: bool = False
  # ASYNCHRONOUS ACTOR-LEARNER (jaxrl_llm.rl.actor_learner; needs trainer.actor_devices > 0)
  async_lag: int = 0                  # the actor samples with params this many updates old
  off_policy: OffPolicyConfig = OffPolicyConfig()  # tis | mis | vtrace | remix corrections
  # PPO WITH A LEARNED CRITIC: read when advantage="gae" (jaxrl_llm.rl.critic)
  critic: CriticConfig = CriticConfig()
  # MULTI-TURN ROLLOUTS with an environment (jaxrl_llm.rl.multiturn; enabled=True)
  multiturn: MultiTurnConfig = MultiTurnConfig()
  # ACNCHOR: the reference solution injected into all-fail groups (jaxrl_llm.rl.anchor)
  anchor: AnchorConfig = AnchorConfig()
  # DEPO: offline prompt curation, explorability filter with replay (jaxrl_llm.rl.depo)
  depo: DEPOConfig = DEPOConfig()

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"RLConfig.{field}={getattr(self, field)!r}: {msg}")
    # The options of registered estimators and losses are theirs to bound (an inf clip
    # bound may mean "no clip"); NaN is refused there too.
    config_checks.require_finite(self, "rl", allow_inf=("advantage_kwargs", "loss_kwargs"))
    check(self.group_size >= 1, "group_size", "must be >= 1")
    check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    check(self.temperature > 0, "temperature", "must be > 0")
    for name in ("banned_tokens", "forced_prefix"):
      object.__setattr__(self, name, _token_ids(name, getattr(self, name)))
    check(not self.rollout_shared_prefix_attention or self.rollout_shared_prefix,
          "rollout_shared_prefix_attention", "needs rollout_shared_prefix=True (the prompt "
          "prefilled once per group)")
    check(self.rollout_categorical in ("gumbel", "inverse_cdf"), "rollout_categorical",
          'must be "gumbel" or "inverse_cdf"')
    check(self.rollout_compaction_min_rows >= 0, "rollout_compaction_min_rows",
          "must be >= 0 (0 turns compaction off)")
    check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
          f"must be in [0, max_new_tokens={self.max_new_tokens}]")
    check(len(self.forced_prefix) <= self.max_new_tokens, "forced_prefix",
          f"is longer than max_new_tokens={self.max_new_tokens}")
    # The registries are read live, so registered estimators and losses validate.
    check(self.advantage in advantages.advantage_estimator_names() + (GAE,), "advantage",
          f"choose one of {advantages.advantage_estimator_names() + (GAE,)} (or register one "
          f"with advantages.register_advantage_estimator)")
    if isinstance(self.critic, Mapping):
      object.__setattr__(self, "critic", CriticConfig(**self.critic))
    if self.advantage != GAE:
      check(self.critic == CriticConfig(), "critic", "is only read by PPO with a learned critic: "
            "set advantage='gae' (the 'ppo' preset), or leave rl.critic at its defaults")
    if self.advantage == "rloo":
      check(self.group_size >= 2, "group_size", "rloo needs at least 2 completions per prompt")
    check(self.policy_loss in policy_losses.policy_loss_names(), "policy_loss",
          f"choose one of {policy_losses.policy_loss_names()} (or register one with "
          f"policy_losses.register_policy_loss)")
    object.__setattr__(self, "advantage_kwargs",
                       _normalize_kwargs("advantage_kwargs", self.advantage_kwargs))
    object.__setattr__(self, "loss_kwargs", _normalize_kwargs("loss_kwargs", self.loss_kwargs))
    if self.advantage == GAE:  # GAE's options are the rl.critic fields
      check(not self.advantage_kwargs, "advantage_kwargs", "advantage='gae' takes its options "
            "from rl.critic (gamma, lam, actor_lam, whiten_advantages); clear advantage_kwargs")
    else:
      _check_kwargs("advantage_kwargs", self.advantage_kwargs, self.advantage,
                    advantages.get_advantage_estimator(self.advantage), ADVANTAGE_OPTION_FIELDS,
                    _ADVANTAGE_RESERVED)
    _check_kwargs("loss_kwargs", self.loss_kwargs, self.policy_loss,
                  policy_losses.get_policy_loss(self.policy_loss), LOSS_OPTION_FIELDS,
                  _LOSS_RESERVED)
    check(self.aggregation in policy_losses.AGGREGATION_MODES, "aggregation",
          f"choose one of {policy_losses.AGGREGATION_MODES}")
    check(self.kl_estimator in policy_losses.KL_KINDS, "kl_estimator",
          f"choose one of {policy_losses.KL_KINDS}")
    check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
    if self.kl_in_reward:
      check(self.advantage in ("reinforce_pp", GAE), "kl_in_reward",
            "the KL-in-reward form needs advantage='reinforce_pp' or 'gae'; otherwise put it in "
            "the loss")
    check(self.epochs >= 1, "epochs", "must be >= 1")
    check(self.minibatches >= 1, "minibatches", "must be >= 1")
    check(self.microbatches >= 1, "microbatches", "must be >= 1")
    check(self.oversample >= 1, "oversample", "must be >= 1")
    if self.oversample > 1:
      check(self.dynamic_sampling, "oversample", "oversampling only makes sense with "
            "dynamic_sampling=True")
    check(self.overlong_cache_len >= 0 and self.overlong_cache_len < self.max_new_tokens,
          "overlong_cache_len", f"must be in [0, max_new_tokens={self.max_new_tokens})")
    check(0.0 <= self.overlong_cache_fraction < 1.0, "overlong_cache_fraction",
          "must be in [0, 1): the cache is that fraction of max_new_tokens")
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
    check(isinstance(self.length_buckets, int) and self.length_buckets >= 1, "length_buckets",
          "must be an int >= 1 (1 turns length bucketing off)")
    check(self.async_lag >= 0, "async_lag", "must be >= 0 (0: the actor uses the newest params)")
    if isinstance(self.off_policy, Mapping):
      object.__setattr__(self, "off_policy", OffPolicyConfig(**self.off_policy))
    if isinstance(self.multiturn, Mapping):
      object.__setattr__(self, "multiturn", MultiTurnConfig(**self.multiturn))
    if self.multiturn.enabled:
      check(self.advantage not in (GAE, "remax"), "advantage", "is not supported with "
            "rl.multiturn (no critic, no greedy baseline over trajectories): use grpo, "
            "dr_grpo, rloo or another critic-free estimator")
      check(self.max_len_schedule == "none", "max_len_schedule", "is not supported with "
            "rl.multiturn; the per-turn budget is rl.multiturn.turn_tokens")
      check(not self.rollout_shared_prefix_attention, "rollout_shared_prefix_attention",
            "is for single-turn rollouts; the multi-turn loop keeps a copy per row: set it "
            "to False with rl.multiturn.enabled")
    if self.update_shared_prompt:
      check(self.length_buckets == 1, "update_shared_prompt", "needs the rollout's group "
            "order, which length_buckets > 1 reorders by length: use one of the two")
      check(not self.multiturn.enabled, "update_shared_prompt", "is for single-turn "
            "rollouts: set it to False with rl.multiturn.enabled")
    if self.off_policy.correction in ("tis", "mis"):
      check(self.tis_cap == 0, "tis_cap", "is set together with rl.off_policy.correction="
            f"{self.off_policy.correction!r}: use one of them (rl.off_policy.is_cap is its C)")
    if isinstance(self.anchor, Mapping):
      object.__setattr__(self, "anchor", AnchorConfig(**self.anchor))
    anchor_lib.validate(self, check)
    if isinstance(self.depo, Mapping):
      object.__setattr__(self, "depo", DEPOConfig(**self.depo))
    depo_lib.validate(self, check)

  @property
  def needs_reference(self) -> bool:
    return self.kl_coef > 0

  @property
  def overlong_cache_tokens(self) -> int:
    """L_c of the soft overlong punishment, in tokens (0: no overlong shaping).

    L_c = overlong_cache_len if it is > 0 (an explicit length wins), else
    ⌊overlong_cache_fraction · max_new_tokens⌋. The fraction keeps DAPO's
    proportion at any budget: DAPO generates at most L_max = 20480 tokens of
    which the last L_c = 4096 are the soft punishment cache (16384 expected),
    L_c / L_max = 0.2 (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
    Learning System at Scale", section 5). Budgets under 1/fraction tokens
    (5 at 0.2) get L_c = 0. Always < max_new_tokens.
    """
    if self.overlong_cache_len > 0:
      return self.overlong_cache_len
    # The tolerance keeps exact products (0.2 · 20480) from flooring one token low.
    return int(self.overlong_cache_fraction * self.max_new_tokens + 1e-9)

  @property
  def updates_per_step(self) -> int:
    return self.epochs * self.minibatches

  def loss_options(self) -> dict[str, Any]:
    """Keyword options of the configured policy loss.

    A built-in loss gets the options it is known to take (ε_low / ε_high / c);
    a registered one gets those of eps_low, eps_high, clip_c that its
    signature names. ``loss_kwargs`` are added on top.
    """
    fn = policy_losses.get_policy_loss(self.policy_loss)
    return {**self._field_options(fn, self.policy_loss, policy_losses, _BUILTIN_LOSS_OPTIONS,
                                  LOSS_OPTION_FIELDS), **dict(self.loss_kwargs)}

  def advantage_options(self) -> dict[str, Any]:
    """Keyword options of the configured advantage estimator.

    A built-in estimator gets the options it is known to take (eps, ddof); a
    registered one gets those of eps, ddof that its signature names.
    ``advantage_kwargs`` are added on top.
    """
    fn = advantages.get_advantage_estimator(self.advantage)
    return {**self._field_options(fn, self.advantage, advantages, _BUILTIN_ADVANTAGE_OPTIONS,
                                  ADVANTAGE_OPTION_FIELDS), **dict(self.advantage_kwargs)}

  def _field_options(self, fn, name, module, builtin_options, option_fields) -> dict[str, Any]:
    if name in builtin_options and getattr(module, name, None) is fn:
      keys = builtin_options[name]
    else:  # registered (or a built-in name replaced by registration)
      named, _ = registry.keyword_parameters(fn)
      keys = tuple(k for k in option_fields if k in named)
    return {k: getattr(self, option_fields[k]) for k in keys}


def _freeze(value: Any) -> Any:
  """Lists (e.g. from a JSON config snapshot) become tuples, so configs stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _token_ids(field: str, value: Any) -> tuple[int, ...]:
  """A sequence of token ids (list or tuple, e.g. from a config file) -> tuple of ints >= 0."""
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
    raise ValueError(f"RLConfig.{field}={value!r}: must be a tuple of token ids (ints >= 0)")
  return tuple(int(t) for t in value)


def _normalize_kwargs(field: str, value: Any) -> tuple[tuple[str, Any], ...]:
  """A mapping or a sequence of (name, value) pairs -> a hashable tuple of pairs."""
  where = f"RLConfig.{field}={value!r}"
  if isinstance(value, Mapping):
    items = list(value.items())
  elif isinstance(value, (list, tuple)):
    items = list(value)
  else:
    raise ValueError(f"{where}: must be a tuple of (name, value) pairs (or a dict)")
  pairs = []
  for item in items:
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
            and item[0]):
      raise ValueError(f"{where}: every entry must be a (name, value) pair with a non-empty "
                       f"string name, got {item!r}")
    key, v = item[0], _freeze(item[1])
    try:
      hash(v)
    except TypeError:
      raise ValueError(f"{where}: the value of {key!r} is unhashable ({type(v).__name__}); "
                       f"configs are static under jit, use a tuple or a scalar") from None
    pairs.append((key, v))
  keys = [k for k, _ in pairs]
  duplicates = sorted({k for k in keys if keys.count(k) > 1})
  if duplicates:
    raise ValueError(f"{where}: duplicate name(s) {duplicates}")
  return tuple(pairs)


def _check_kwargs(field: str, pairs, name: str, fn: Callable[..., Any],
                  option_fields: Mapping[str, str], reserved: tuple[str, ...]) -> None:
  """Every key must be new to RLConfig and the dispatcher, and accepted by fn."""
  named, var_kw = registry.keyword_parameters(fn)
  for key, _ in pairs:
    where = f"RLConfig.{field}: {key!r}"
    if key in option_fields:
      raise ValueError(f"{where} collides with a built-in option; set it through "
                       f"RLConfig.{option_fields[key]} instead")
    if key in reserved:
      raise ValueError(f"{where} collides with an argument the RL step passes itself "
                       f"(reserved: {reserved})")
    if key not in named and not var_kw:
      raise ValueError(f"{where} is not a parameter of {name!r} "
                       f"({getattr(fn, '__name__', fn)!r} takes {sorted(named)})")


# DAPO's soft overlong punishment cache as a fraction of the generation budget:
# L_c / L_max = 4096 / 20480 (Yu et al. 2025, section 5; see `overlong_cache_tokens`).
DAPO_OVERLONG_CACHE_FRACTION = 4096 / 20480

# Presets: named bundles of RLConfig fields (formulas in docs/ALGORITHMS.md).
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath: group-normalised advantage, per-sequence mean, k3 KL in the loss.
    "grpo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="seq_mean_token_mean",
                 eps_low=0.2, eps_high=0.2, kl_coef=0.04, kl_estimator="k3"),
    # Dr. GRPO: no std division, constant normaliser, no KL.
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo_clip",
                    aggregation="seq_mean_token_sum_norm", kl_coef=0.0),
    # DAPO: clip-higher, token-mean, dynamic sampling, soft overlong punishment over
    # the last fifth of max_new_tokens, no KL.
    "dapo": dict(advantage="grpo", policy_loss="ppo_clip", aggregation="token_mean",
                 eps_low=0.2, eps_high=0.28, kl_coef=0.0, dynamic_sampling=True, oversample=2,
                 overlong_cache_fraction=DAPO_OVERLONG_CACHE_FRACTION),
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
    # PPO with a learned critic: token-level GAE with decoupled λ (VC-PPO / VAPO:
    # λ_critic = 1, λ_actor = 0.95), clipped value loss, whitened advantages, token-mean.
    "ppo": dict(advantage=GAE, policy_loss="ppo_clip", aggregation="token_mean",
                eps_low=0.2, eps_high=0.2, kl_coef=0.0,
                critic=CriticConfig(init="policy", gamma=1.0, lam=1.0, actor_lam=0.95,
                                    value_clip=0.2, whiten_advantages=True)),
}


def from_preset(name: str, **overrides) -> RLConfig:
  """An RLConfig from a preset name plus field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown RL preset {name!r}; choose one of {tuple(PRESETS)}")
  return RLConfig(**{**PRESETS[name], **overrides})
