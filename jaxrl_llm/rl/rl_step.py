"""The RL step: rollout, reward, reference, advantage and update in ONE jit.

    rl_step(state, batch, rng, ref_params) -> (state, metrics)

  ROLLOUT    G completions per prompt with the current policy (KV-cache sampler)
  REWARD     in-graph reward functions over token arrays (or a host callback)
  REF / OLD  reference log-probs; old log-probs when epochs × minibatches > 1
  ADVANTAGE  estimator by name, optional DAPO dynamic sampling (static shapes)
  UPDATE     lax.scan over epochs × minibatches (× micro-batches), optax update

Jit it once with `jit_rl_step`: state donated, reference params not. A split
mode (`make_split_step`) runs ROLLOUT in one jit, hands the completions to the
host for rewards that cannot run in the graph, and runs the rest in a second
jit; both modes share every stage function below.

Batch (one row per prompt; R prompts, G completions each, B = R·G rows):
  prompt_tokens [R, P] left-padded, prompt_mask [R, P], prompt_id [R] and any
  per-prompt task arrays (answer_tokens [R, A], answer_mask, target, ...).

Shape letters: R prompts, G group size, B = R·G completions, P prompt
length, L max new tokens, D hidden size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import lora, sampling, sharding
from jaxrl_llm.models import decoder, shared_prompt
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rewards import shaping
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.rewards.registry import LABEL_COMPONENTS
from jaxrl_llm.rl import advantages, anchor, length_buckets, off_policy, policy_losses
from jaxrl_llm.rl.config import RLConfig
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update

# (total_B, {component name: value_B}); "correct" marks success when present.
RewardFn = Callable[[RewardInputs], tuple[jax.Array, Mapping[str, jax.Array]]]
PROMPT_KEYS = ("prompt_tokens", "prompt_mask")
# The per-row arrays the policy update reads (those present).
TRAIN_KEYS = ("prompt_tokens", "prompt_mask", "completion", "completion_mask", "sampler_logp",
              "loss_mask", "adv", "ref_logp", "old_logp")


def _repeat(tree, group_size):
  return jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), tree)


def _masked_mean(x, m):
  m = m.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def init_rl_extra(rl: RLConfig) -> dict:
  """Per-run tables carried in `TrainState.extra` (HAPO's history)."""
  if rl.length_shaping == "hapo":
    return {"hapo_history": shaping.hapo_init_history(rl.hapo_num_prompts)}
  return {}


def dynamic_sampling_rows(zero_variance_R: jax.Array, keep: int, group_size: int):
  """DAPO dynamic sampling with static shapes: which rows to train on.

  Ranks the R sampled groups with mixed outcomes first (stable, so earlier
  groups win ties), keeps `keep` groups and returns their row indices
  idx_B [keep·G] and valid_B (False for kept groups whose rewards are all
  equal: they fill the static batch but are masked out of the loss).
  """
  order = jnp.argsort(zero_variance_R.astype(jnp.int32), stable=True)[:keep]
  idx_B = (order[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
  return idx_B, jnp.repeat(~zero_variance_R[order], group_size)


def group_minibatch_indices(rng, B: int, group_size: int, epochs: int,
                            minibatches: int) -> jax.Array:
  """Row indices [epochs × minibatches, B / minibatches] that shuffle whole groups.

  Each epoch permutes the B / G groups (no shuffle when there is one optimizer
  step); a group's G rows stay consecutive and in order, as
  `rl.update_shared_prompt` needs. G = 1 shuffles single rows.
  """
  G = group_size
  shuffle = epochs * minibatches > 1
  groups = [jax.random.permutation(jax.random.fold_in(rng, e), B // G) if shuffle
            else jnp.arange(B // G) for e in range(epochs)]
  rows = [(g[:, None] * G + jnp.arange(G)[None, :]).reshape(-1) for g in groups]
  return jnp.stack(rows).reshape(epochs * minibatches, B // minibatches)


@dataclasses.dataclass(frozen=True)
class RLStep:
  """The stages of the RL step, bound to a model, a config and a reward."""
  model: ModelConfig
  rl: RLConfig
  tx: optax.GradientTransformation
  reward_fn: Optional[RewardFn]
  eos_id: int
  pad_id: int = 0
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True
  # An extra `sampling.LogitsProcessor` for the rollout, applied after the
  # config's (banned_tokens, min_new_tokens, forced_prefix): e.g.
  # `sampling.force_lengths`. It indexes rows by `DecodeContext.row_B`: the
  # R·G completion rows, or the R prompt rows of remax's greedy baseline.
  logits_processor: Optional[Callable] = None

  # ------------------------------------------------------------------ ROLLOUT
  def max_len_now(self, step):
    """Effective completion budget at this step (SIRI / staged schedules)."""
    rl = self.rl
    if rl.max_len_schedule == "siri":
      return shaping.siri_max_length(step, short_len=rl.schedule_short_len,
                                     long_len=rl.max_new_tokens, period=rl.schedule_period,
                                     compress_fraction=rl.schedule_compress_fraction)
    if rl.max_len_schedule == "staged":
      return shaping.staged_max_length(step, stage_steps=rl.stage_steps,
                                       stage_lengths=rl.stage_lengths)
    return jnp.asarray(rl.max_new_tokens, jnp.int32)

  def rollout_processor(self) -> Optional[sampling.LogitsProcessor]:
    """The rollout's logits processor: the config's constraints, then `logits_processor`."""
    rl = self.rl
    return sampling.chain(
        sampling.ban_tokens(rl.banned_tokens) if rl.banned_tokens else None,
        sampling.min_new_tokens(rl.min_new_tokens, (self.eos_id,))
        if rl.min_new_tokens and self.eos_id >= 0 else None,
        sampling.force_prefix(rl.forced_prefix) if rl.forced_prefix else None,
        self.logits_processor)

  def rollout(self, params, batch: Mapping[str, jax.Array], rng, step) -> dict:
    """G completions per prompt; returns per-completion arrays (B rows).

    Each prompt is prefilled once for its G samples (`rollout_shared_prefix`;
    with `rollout_shared_prefix_attention` its K/V is also kept and read once
    per group),
    finished rows are compacted away (`rollout_compaction_min_rows`) and a
    length schedule's budget stops the decode at that step's budget: the
    completions are those of a plain sampler over the repeated prompts, cut
    at the budget.
    """
    rl = self.rl
    rows = _repeat(dict(batch), rl.group_size)
    if self.model.lora is not None and self.model.lora.merged_rollout:
      # LoRA: W + s·A·B formed once per rollout (compute dtype) instead of the low-rank path
      # at every decoded token (`lora.merge`).
      params = lora.merge(params, self.model.lora.scale, dtype=self.model.compute_dtype)
    params = decoder.decode_params(self.model, params)  # once for both samplers (remax)
    processor = self.rollout_processor()
    budget = None if rl.max_len_schedule == "none" else self.max_len_now(step)
    shared = rl.rollout_shared_prefix and rl.group_size > 1
    prompts = batch if shared else rows
    out = sampling.sample(
        self.model, params, prompts["prompt_tokens"], prompts["prompt_mask"], rng,
        max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
        top_p=rl.top_p, stop_tokens=(self.eos_id,), pad_id=self.pad_id,
        logits_processor=processor, group_size=rl.group_size if shared else 1,
        compaction_min_rows=rl.rollout_compaction_min_rows, max_len=budget,
        shared_prefix_attention=shared and rl.rollout_shared_prefix_attention,
        categorical=rl.rollout_categorical)
    ro = dict(rows, completion=out.tokens_BL, completion_mask=out.mask_BL,
              sampler_logp=out.logprobs_BL, finished=out.finished_B, lengths=out.lengths_B)
    if rl.advantage == "remax":
      greedy = sampling.sample(
          self.model, params, batch["prompt_tokens"], batch["prompt_mask"], rng,
          max_new_tokens=rl.max_new_tokens, greedy=True, stop_tokens=(self.eos_id,),
          pad_id=self.pad_id, logits_processor=processor,
          compaction_min_rows=rl.rollout_compaction_min_rows, max_len=budget)
      ro["baseline_completion"] = greedy.tokens_BL
      ro["baseline_mask"] = greedy.mask_BL
      ro["baseline_finished"] = greedy.finished_B
    return ro

  # ------------------------------------------------------------------- REWARD
  def reward_inputs(self, ro: Mapping[str, jax.Array], baseline: bool = False) -> RewardInputs:
    task = {k: v for k, v in ro.items() if k not in PROMPT_KEYS and not k.startswith(
        ("completion", "baseline", "sampler", "finished", "lengths"))}
    if baseline:
      return RewardInputs(ro["prompt_tokens"][::self.rl.group_size],
                          ro["prompt_mask"][::self.rl.group_size],
                          ro["baseline_completion"], ro["baseline_mask"],
                          ro["baseline_finished"],
                          jax.tree.map(lambda x: x[::self.rl.group_size], task))
    return RewardInputs(ro["prompt_tokens"], ro["prompt_mask"], ro["completion"],
                        ro["completion_mask"], ro["finished"], task)

  def score(self, ro, reward_params=None) -> tuple[jax.Array, dict, Optional[jax.Array]]:
    """In-graph rewards of the rollout: (rewards_B, components, baseline_B).

    With `reward_params` (e.g. a reward model's weights, passed traced into
    the step rather than baked in as constants) the reward function is called
    as reward_fn(inputs, reward_params).
    """
    call = (self.reward_fn if reward_params is None
            else lambda inputs: self.reward_fn(inputs, reward_params))
    rewards_B, comps = call(self.reward_inputs(ro))
    baseline_B = None
    if self.rl.advantage == "remax":
      baseline_R, _ = call(self.reward_inputs(ro, baseline=True))
      baseline_B = jnp.repeat(baseline_R, self.rl.group_size)
    return rewards_B, dict(comps), baseline_B

  def shape_rewards(self, state: TrainState, ro, rewards_B, comps):
    """Length / repetition shaping on top of the task reward; returns (rewards, extra)."""
    rl = self.rl
    G = rl.group_size
    lengths_B = ro["lengths"]
    correct_B = comps.get("correct", (rewards_B > 0).astype(jnp.float32))
    extra = dict(state.extra)
    if rl.overlong_cache_tokens > 0:
      pen_B = advantages.overlong_penalty(lengths_B, rl.max_new_tokens, rl.overlong_cache_tokens)
      comps["overlong"] = pen_B
      rewards_B = rewards_B + pen_B
    if rl.length_shaping == "dler":
      rewards_B = shaping.dler_truncation(rewards_B, lengths_B, rl.dler_budget)
    elif rl.length_shaping == "hapo":
      history = state.extra["hapo_history"]
      history_B = history[ro["prompt_id"]]
      len_reward_B = shaping.hapo_length_reward(lengths_B, correct_B, history_B,
                                                weight=rl.hapo_weight)
      comps["hapo_length"] = len_reward_B
      rewards_B = rewards_B + len_reward_B
      extra["hapo_history"] = shaping.hapo_update_history(
          history, ro["prompt_id"][::G], lengths_B, correct_B, G)
    elif rl.length_shaping == "grpo_lambda":
      shaped_B = shaping.grpo_lambda(correct_B, lengths_B, G,
                                     top_fraction=rl.grpo_lambda_top_fraction,
                                     length_weight=rl.grpo_lambda_length_weight,
                                     max_len=rl.max_new_tokens)
      rewards_B = rewards_B - correct_B + shaped_B
    if rl.repetition_weight_start or rl.repetition_weight_end:
      weight = shaping.repetition_penalty_weight(
          state.step, start=rl.repetition_weight_start, end=rl.repetition_weight_end,
          warmup_steps=rl.repetition_warmup_steps)
      rep_B = shaping.ngram_repetition_penalty(ro["completion"], ro["completion_mask"],
                                               n=rl.repetition_ngram)
      comps["repetition"] = rep_B
      rewards_B = rewards_B - weight * rep_B
    return rewards_B, correct_B, extra

  # ------------------------------------------------------------ LOG-PROBS
  def completion_logprobs(self, params, rows):
    """log π(completion_t | prompt, completion_<t) and entropies, [B, L] each."""
    if self.rl.update_shared_prompt:
      h_BLD = self._shared_prompt_hidden_states(params, rows)
    else:
      P = rows["prompt_tokens"].shape[1]
      L = rows["completion"].shape[1]
      tokens = jnp.concatenate([rows["prompt_tokens"], rows["completion"]], axis=1)
      segments = jnp.concatenate([rows["prompt_mask"].astype(jnp.int32),
                                  (rows["completion_mask"] > 0).astype(jnp.int32)], axis=1)
      h_BTD = decoder.hidden_states(self.model, params, tokens, segment_ids_BT=segments)
      h_BLD = h_BTD[:, P - 1:P + L - 1]  # position t predicts token t + 1
    return decoder.token_logprobs(self.model, params, h_BLD, rows["completion"],
                                  temperature=self.rl.temperature,
                                  chunk_size=self.rl.logprob_chunk, with_entropy=True)

  def _shared_prompt_hidden_states(self, params, rows):
    """`shared_prompt.completion_hidden_states` of rows in the rollout's group order
    (G consecutive rows of one prompt, rl.update_shared_prompt)."""
    G = self.rl.group_size
    B, L = rows["completion"].shape
    if B % G:
      raise ValueError(
          f"rl.update_shared_prompt: a micro-batch of {B} rows is not whole groups of "
          f"group_size={G}; choose rl.microbatches so that the rows per micro-batch "
          "(prompts x group_size / microbatches) are a multiple of group_size")
    R = B // G
    return shared_prompt.completion_hidden_states(
        self.model, params, rows["prompt_tokens"][::G], rows["prompt_mask"][::G],
        rows["completion"].reshape(R, G, L), (rows["completion_mask"] > 0).reshape(R, G, L))

  @property
  def length_widths(self) -> tuple[int, ...]:
    """Static completion widths of the length-bucketed update (`rl.length_buckets`)."""
    return length_buckets.bucket_widths(self.rl.max_new_tokens, self.rl.length_buckets)

  def _batched_logprobs(self, params, rows):
    """Log-probs [B, L] without gradient (`_batched_per_token`)."""
    return self._batched_per_token(lambda p, r: self.completion_logprobs(p, r)[0], params, rows)

  def _batched_per_token(self, fn, params, rows):
    """`fn(params, rows) -> [B, L]` without gradient, micro-batch by micro-batch (bounded
    memory); rows ordered by length and each chunk cut to its bucket width
    (`length_buckets`), the result returned in the rollout's row order."""
    n = self.rl.microbatches * self.rl.minibatches
    rows = {k: rows[k] for k in ("prompt_tokens", "prompt_mask", "completion",
                                 "completion_mask")}
    widths = self.length_widths
    order_B = None
    if len(widths) > 1 and n > 1:
      order_B = jnp.argsort(length_buckets.completion_lengths(rows["completion_mask"]),
                            stable=True)
      rows = jax.tree.map(lambda x: x[order_B], rows)
    fn = length_buckets.bucketed_per_token(fn, widths, self.rl.max_new_tokens)
    split = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), rows)
    out_BL = jax.lax.map(lambda r: fn(params, r), split)
    out_BL = out_BL.reshape((-1,) + out_BL.shape[2:])
    if order_B is not None:
      out_BL = jnp.zeros_like(out_BL).at[order_B].set(out_BL)  # back to the rollout's order
    return jax.lax.stop_gradient(out_BL)

  # ---------------------------------------------------------------- UPDATE
  def loss(self, params, mb):
    """Per-micro-batch (total, denom) and metric sums; loss = Σtotal / Σdenom."""
    rl = self.rl
    logp, ent = self.completion_logprobs(params, mb)
    mask = mb["loss_mask"]
    old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
    loss_BL, pm = policy_losses.policy_loss(rl.policy_loss, logp, old, mb["adv"], mask,
                                            **rl.loss_options())
    if rl.tis_cap > 0:
      loss_BL = loss_BL * policy_losses.tis_weights(old, mb["sampler_logp"], rl.tis_cap)
    off_sums = {}
    if rl.off_policy.correction != "none":  # stale rollouts (rl.actor_learner)
      loss_BL, pm, off_sums = off_policy.corrected_policy_loss(
          rl.off_policy, loss_BL, pm, logp, old, mb, mask, eps_low=rl.eps_low,
          eps_high=rl.eps_high)
    agg = lambda x: policy_losses.aggregate(x, mask, rl.aggregation, max_len=rl.max_new_tokens)
    total, denom = agg(loss_BL)
    sums = {"loss/policy": total}
    if "ref_logp" in mb:
      kl_BL = policy_losses.kl_penalty(logp, mb["ref_logp"], rl.kl_estimator)
      if rl.off_policy.correction == "remix":  # ReMix's KL-convex constraint
        kl_BL = off_policy.kl_convex(logp, mb["ref_logp"], old, kind=rl.kl_estimator,
                                     base_weight=rl.off_policy.remix_base_weight)
      kl_total, _ = agg(kl_BL)
      sums["loss/kl"] = kl_total
      if not rl.kl_in_reward:
        total = total + rl.kl_coef * kl_total
    ent_total, _ = agg(ent)
    sums["loss/entropy"] = ent_total
    if rl.entropy_coef:
      total = total - rl.entropy_coef * ent_total
    tokens = jnp.sum(mask)
    sums["rl/clip_frac_low"] = jnp.sum(pm.get("clip_low_BT", jnp.zeros_like(mask)) * mask)
    sums["rl/clip_frac_high"] = jnp.sum(pm.get("clip_high_BT", jnp.zeros_like(mask)) * mask)
    sums["rl/entropy"] = jnp.sum(ent * mask)
    sums["rl/kl_old"] = jnp.sum(policy_losses.kl_penalty(logp, old, "k3") * mask)
    sums.update(off_sums)
    sums["tokens"] = tokens
    return total, (denom, sums)

  def _minibatch_update(self, state: TrainState, mb):
    loss = length_buckets.bucketed(self.loss, self.length_widths, self.rl.max_new_tokens)
    grads, denom, sums = accumulate_gradients(loss, state.params, mb, self.rl.microbatches)
    state, metrics = apply_update(state, self.tx, grads, skip_nonfinite=self.skip_nonfinite)
    tokens = jnp.maximum(sums.pop("tokens"), 1.0)
    for k, v in sums.items():
      metrics[k] = v / (tokens if k.startswith("rl/") else jnp.maximum(denom, 1e-8))
    return state, metrics

  def prepare(self, state: TrainState, ro, rewards_B, comps, ref_params, baseline_B=None):
    """SHAPING, rollout metrics, DYNAMIC SAMPLING, the loss mask and REF / OLD.

    Returns (rows, metrics, extra, valid_B, kl_BL): the rows every estimator
    trains on (rewards, correct, loss_mask, ref_logp / old_logp when needed),
    the new `TrainState.extra`, the kept-row flags and the per-token KL of the
    behaviour policy to the reference when rl.kl_in_reward (else None).
    """
    rl = self.rl
    G = rl.group_size
    rewards_B, correct_B, extra = self.shape_rewards(state, ro, rewards_B, comps)
    R_all = rewards_B.shape[0] // G
    zero_var_R = advantages.group_stats(rewards_B, G).zero_variance_P
    metrics = {
        "reward/mean": jnp.mean(rewards_B),
        "reward/std": jnp.std(rewards_B),
        "rl/accuracy": jnp.mean(correct_B),
        "rl/response_length": jnp.mean(ro["lengths"]),
        "rl/response_length_correct": _masked_mean(ro["lengths"], correct_B > 0),
        "rl/response_length_incorrect": _masked_mean(ro["lengths"], correct_B <= 0),
        "rl/truncation_rate": 1.0 - jnp.mean(ro["finished"].astype(jnp.float32)),
        "rl/zero_adv_group_frac": jnp.mean(zero_var_R.astype(jnp.float32)),
    }
    for name, value in comps.items():
      if name not in LABEL_COMPONENTS:  # labels (answer ids) have no meaningful mean
        metrics[f"reward/{name}"] = jnp.mean(value)

    # DYNAMIC SAMPLING: keep R_all / oversample groups, mixed-outcome ones first.
    valid_B = jnp.ones_like(rewards_B, dtype=bool)
    rows = {k: v for k, v in ro.items() if not k.startswith("baseline")}
    rows.update(rewards=rewards_B, correct=correct_B)
    if "answer_id" in comps:  # per-row answer labels for estimators that take them (copo)
      rows["answer_id"] = comps["answer_id"]
    if baseline_B is not None:
      rows["baseline_reward"] = baseline_B
    if rl.dynamic_sampling:
      idx_B, valid_B = dynamic_sampling_rows(zero_var_R, R_all // rl.oversample, G)
      rows = jax.tree.map(lambda x: x[idx_B], rows)
      metrics["rl/dynamic_valid_frac"] = jnp.mean(valid_B.astype(jnp.float32))
    B = rows["rewards"].shape[0]
    if B % (rl.minibatches * rl.microbatches):
      raise ValueError(f"{B} completions per step are not divisible by minibatches × "
                       f"microbatches = {rl.minibatches} × {rl.microbatches}")

    loss_mask = rows["completion_mask"] * valid_B[:, None]
    if rl.mask_truncated:
      loss_mask = loss_mask * rows["finished"][:, None]
    rows["loss_mask"] = loss_mask

    # REF / OLD
    kl_BL = None
    if rl.needs_reference:
      # Under LoRA with no ref_params: the adapters' starting model, sharing the frozen base.
      ref = lora.reference_or(ref_params, state.params)
      rows["ref_logp"] = self._batched_logprobs(ref, rows)
    if rl.updates_per_step > 1 or rl.off_policy.needs_learner_logprobs:
      rows["old_logp"] = self._batched_logprobs(state.params, rows)
    if anchor.ANCHOR_KEY in rows:  # the injected rows' own importance weight (rl.anchor)
      rows = anchor.old_logprobs(self, state, rows)
    if rl.kl_in_reward:
      behaviour = rows.get("old_logp", rows["sampler_logp"])
      kl_BL = policy_losses.kl_penalty(behaviour, rows["ref_logp"], rl.kl_estimator)
    return rows, metrics, extra, valid_B, kl_BL

  def minibatch_indices(self, rng, B: int, completion_mask_BL=None) -> jax.Array:
    """Row indices [epochs × minibatches, B / minibatches] of the optimizer steps.

    With `completion_mask_BL`, length buckets and micro-batches on, each
    minibatch's rows are ordered by completion length, so consecutive
    micro-batches hold similar lengths (`length_buckets.sort_by_length`).
    """
    rl = self.rl
    # rl.update_shared_prompt packs each group: whole groups move together; else rows do.
    unit = rl.group_size if rl.update_shared_prompt else 1
    idx_UK = group_minibatch_indices(rng, B, unit, rl.epochs, rl.minibatches)
    if (completion_mask_BL is not None and len(self.length_widths) > 1
        and rl.microbatches > 1):
      idx_UK = length_buckets.sort_by_length(
          idx_UK, length_buckets.completion_lengths(completion_mask_BL))
    return idx_UK

  def finish_metrics(self, metrics, ro, rows) -> dict:
    """Step-level metrics after the update: completion tokens, approximate KL."""
    metrics["rl/completion_tokens"] = jnp.sum(ro["completion_mask"])
    if "ref_logp" in rows:
      metrics["rl/approx_kl"] = _masked_mean(
          policy_losses.kl_penalty(rows.get("old_logp", rows["sampler_logp"]),
                                   rows["ref_logp"], "k3"), rows["loss_mask"])
    return metrics

  def token_advantages(self, rows, adv_BL) -> tuple[jax.Array, dict]:
    """Stage after ADVANTAGE: per-token terms a subclass adds (on-policy distillation,
    `jaxrl_llm.distill.OnPolicyDistillStep`); returns (adv_BL, metrics). Here: unchanged."""
    del rows
    return adv_BL, {}

  def learn(self, state: TrainState, ro, rewards_B, comps, rng, ref_params,
            baseline_B=None):
    """Everything after REWARD: selection, REF/OLD, ADVANTAGE, UPDATE, metrics."""
    rl = self.rl
    G = rl.group_size
    rows, metrics, extra, valid_B, kl_BL = self.prepare(state, ro, rewards_B, comps,
                                                        ref_params, baseline_B)
    B = rows["rewards"].shape[0]
    loss_mask = rows["loss_mask"]

    # ADVANTAGE
    adv_BL = advantages.compute_advantages(
        rl.advantage, rows["rewards"], G, rows["completion_mask"], valid_B=valid_B,
        kl_BT=kl_BL, kl_coef=rl.kl_coef if rl.kl_in_reward else 0.0,
        baseline_rewards_B=rows.get("baseline_reward"), answers_B=rows.get("answer_id"),
        **rl.advantage_options())
    if rl.lambda_pos != 1.0 or rl.lambda_neg != 1.0:
      scale_B = jnp.where(rows["correct"] > 0, rl.lambda_pos, rl.lambda_neg)
      adv_BL = adv_BL * scale_B[:, None]
    if rl.off_policy.vtrace:  # V-trace: advantages corrected for the actor's lag
      adv_BL, vtrace_sums = off_policy.vtrace_advantages(
          adv_BL, rows["old_logp"], rows["sampler_logp"], loss_mask, rl.off_policy)
      tokens = jnp.maximum(jnp.sum(loss_mask), 1.0)
      metrics.update({k: v / tokens for k, v in vtrace_sums.items()})
    rows["adv"], stage_metrics = self.token_advantages(rows, adv_BL)
    metrics.update(stage_metrics)

    # UPDATE: epochs × minibatches optimizer steps over shuffled rows.
    train_rows = {k: rows[k] for k in TRAIN_KEYS if k in rows}
    idx_UK = self.minibatch_indices(rng, B, rows["completion_mask"])

    def update(st, idx):
      return self._minibatch_update(st, jax.tree.map(lambda x: x[idx], train_rows))

    inner, upd_metrics = jax.lax.scan(update, state, idx_UK)
    metrics.update(jax.tree.map(jnp.mean, upd_metrics))
    metrics = self.finish_metrics(metrics, ro, rows)
    new_state = inner.replace(step=state.step + 1, extra=extra)
    return new_state, metrics

  # ------------------------------------------------------------------ STEP
  def __call__(self, state: TrainState, batch, rng, ref_params=None, reward_params=None):
    """One full RL step (the one-jit mode): every stage in one graph."""
    if self.reward_fn is None:
      raise ValueError("the one-jit step needs an in-graph reward_fn; use make_split_step "
                       "for host rewards")
    with sharding.activation_rules(self.mesh, self.rules):
      rng = jax.random.fold_in(rng, state.step)
      rollout_rng, update_rng = jax.random.split(rng)
      ro = self.rollout(state.params, batch, rollout_rng, state.step)
      rewards_B, comps, baseline_B = self.score(ro, reward_params)
      if self.rl.anchor.enabled:  # ACNCHOR: y* into all-fail groups (jaxrl_llm.rl.anchor)
        ro, rewards_B, comps, baseline_B = anchor.inject_and_score(
            self, ro, rewards_B, comps, baseline_B, reward_params)
      return self.learn(state, ro, rewards_B, comps, update_rng, ref_params, baseline_B)


def jit_rl_step(step: RLStep, state_shardings, batch_sharding=None, ref_shardings=None,
                reward_shardings=None):
  """jax.jit with explicit shardings; the state (argument 0) is donated.

  Call as run(state, batch, rng, ref_params, reward_params): pass None for a
  reference or reward model the configuration does not use.
  """
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  jitted = jax.jit(step.__call__,
                   in_shardings=(state_shardings, batch_sharding, rep, ref_shardings,
                                 reward_shardings),
                   out_shardings=(state_shardings, rep),
                   donate_argnums=(0,))

  def run(state, batch, rng, ref_params=None, reward_params=None):
    return jitted(state, batch, rng, ref_params, reward_params)
  run.jitted = jitted  # e.g. run.jitted._cache_size(): compilations so far
  return run


def make_split_step(step: RLStep, state_shardings=None, host_reward: Optional[Callable] = None):
  """Split mode: (rollout jit) -> host rewards -> (learn jit).

  Returns `run(state, batch, rng, ref_params) -> (state, metrics)` where
  `host_reward(rollout_numpy) -> (rewards_B, {name: values_B})` runs in Python
  between the two compiled halves (for rewards that cannot be traced, or to
  inspect rollouts). Same stages, same numbers as the one-jit step.
  """
  def rollout(params, batch, rng, step_idx):
    with sharding.activation_rules(step.mesh, step.rules):
      return step.rollout(params, batch, rng, step_idx)

  def learn(state, ro, rewards_B, comps, rng, ref_params, baseline_B):
    with sharding.activation_rules(step.mesh, step.rules):
      return step.learn(state, ro, rewards_B, comps, rng, ref_params, baseline_B)

  if step.rl.anchor.enabled:
    raise ValueError("rl.anchor (ground-truth injection) runs in the one-jit step; set "
                     "trainer.split_mode=False or disable rl.anchor")
  rollout_jit = jax.jit(rollout)
  learn_jit = jax.jit(learn, donate_argnums=(0,))
  score_jit = jax.jit(step.score)  # built once: no retrace per step
  score = host_reward

  def run(state, batch, rng, ref_params=None):
    rng = jax.random.fold_in(rng, state.step)
    rollout_rng, update_rng = jax.random.split(rng)
    ro = rollout_jit(state.params, batch, rollout_rng, state.step)
    host_ro = sharding.to_host(ro)
    if score is not None:
      rewards_B, comps = score(host_ro)
      baseline_B = None
      if step.rl.advantage == "remax":
        base = dict(host_ro, completion=host_ro["baseline_completion"],
                    completion_mask=host_ro["baseline_mask"],
                    finished=host_ro["baseline_finished"])
        base = {k: (v[::step.rl.group_size] if k not in ("completion", "completion_mask",
                                                         "finished") else v)
                for k, v in base.items()}
        baseline_B = jnp.repeat(jnp.asarray(score(base)[0]), step.rl.group_size)
    else:
      rewards_B, comps, baseline_B = score_jit(ro)
    rewards_B = jnp.asarray(rewards_B, jnp.float32)
    comps = {k: jnp.asarray(v, jnp.float32) for k, v in comps.items()}
    return learn_jit(state, ro, rewards_B, comps, update_rng, ref_params, baseline_B)

  return run
