"""The offline preference step: DPO family (pairs) and KTO (unpaired), one jit.

    step(state, batch, rng, ref_params) -> (state, metrics)

  REFERENCE  log π_ref of every completion token: on the fly from `ref_params`
             (no gradient) or read from the batch (`precompute_reference_logps`
             once, stored with the data); skipped for reference-free losses
  FORWARD    chosen and rejected rows concatenated into ONE forward of 2N rows;
             per-token log-probs of the completion tokens, chunked float32
  LOSS       `losses.combined_loss` (Σ_name w_name·ℓ_name per pair) or
             `losses.kto`; weighted sums + denominators, so micro-batches
             (`accumulate_gradients`) and devices give the full-batch gradient
  UPDATE     optax update, skipped when the gradient is not finite

Batches (see `jaxrl_llm.data.pipeline`, modes "preference" and "unpaired"):
  paired    prompt_tokens, prompt_mask [N, P] (left-padded);
            chosen_tokens, chosen_mask, rejected_tokens, rejected_mask [N, C]
            (right-padded, EOS included); optional pair_weight [N] (0 masks a
            pair out of the loss, e.g. a tied online pair) and, when
            precomputed, ref_chosen_logps, ref_rejected_logps [N, C].
  unpaired  prompt_tokens, prompt_mask [N, P]; completion_tokens,
            completion_mask [N, C]; label [N] (True: desirable); optional
            pair_weight [N]; precomputed: ref_completion_logps [N, C] and
            ref_kl_logps [N, C] (the reference on KTO's mismatched rows).
A row whose completion mask is all zero (a padding row of an evaluation
batch) carries weight 0.

Loss = Σ_n w_n·ℓ_n / Σ_n w_n (a mean over the valid pairs of the whole batch).

Shape letters: N pairs (or unpaired examples), P prompt length, C completion
length, D hidden size.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import lora, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models import shared_prompt as shared_prompt_lib
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.preference import losses
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update

REFERENCE_MODES = ("on_the_fly", "precomputed", "none")
REFERENCE_FREE = ("simpo", "orpo")  # pairwise losses that never read π_ref
KTO_KL_ESTIMATES = ("mismatched", "batch")
# Options of the pairwise losses; None keeps each loss's own default.
PAIR_OPTIONS = ("eps", "gamma", "alpha", "eta", "lam", "delta")
REF_KEYS_PAIRED = ("ref_chosen_logps", "ref_rejected_logps")
REF_KEYS_UNPAIRED = ("ref_completion_logps", "ref_kl_logps")
_PAIR_METRICS = ("accuracy", "margin", "reward_chosen", "reward_rejected", "logps_chosen",
                 "logps_rejected")


def _keyword_options(fn) -> set[str]:
  return {p.name for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """Which preference loss(es), their options, and where π_ref comes from.

  `losses` holds (name, weight) pairs: pairwise losses from
  `losses.PAIR_LOSSES` combined as Σ w·ℓ (e.g. (("dpo", 1.0), ("hinge", 0.5))),
  or exactly (("kto", w),) for unpaired batches. Each pairwise option
  (eps, gamma, alpha, eta, lam, delta) reaches every selected loss that takes
  it; None keeps that loss's default, and setting an option that no selected
  loss takes is an error.
  """
  losses: tuple[tuple[str, float], ...] = (("dpo", 1.0),)
  beta: float = 0.1                 # β of every loss (SimPO wants ≈ 2)
  eps: Optional[float] = None       # robust / conservative label noise ε
  gamma: Optional[float] = None     # simpo target margin γ; d2po decay γ
  alpha: Optional[float] = None     # ld_dpo length desensitisation α
  eta: Optional[float] = None       # rpo NLL weight η
  lam: Optional[float] = None       # orpo odds-ratio weight λ
  delta: Optional[float] = None     # bco_pair reward shift δ (None: batch mean)
  lambda_d: float = 1.0             # kto weight of desirable examples
  lambda_u: float = 1.0             # kto weight of undesirable examples
  kto_kl: str = "mismatched"        # kto reference point: see KTO_KL_ESTIMATES
  reference: str = "on_the_fly"     # one of REFERENCE_MODES
  logprob_chunk: int = 512          # time chunk of the float32 log-softmax
  microbatches: int = 1             # exact gradient accumulation
  # The pair's forward runs its prompt once for both completions (one packed row per pair,
  # `jaxrl_llm.models.shared_prompt`): P + 2C tokens instead of 2(P + C), same log-probs.
  shared_prompt: bool = False
  # Pre-DPO (`jaxrl_llm.preference.pre_dpo`): π_ref is a guiding reference instead of the
  # starting policy: the params of a finished run's workdir (reference_from), or a first
  # round of `guiding_steps` steps with `guiding_losses` (() = losses) run first in
  # <workdir>/guiding_reference from the same starting params.
  reference_from: str = ""
  guiding_steps: int = 0
  guiding_losses: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"PreferenceConfig: {msg}")
    pairs = tuple((str(n), float(w)) for n, w in self.losses)
    object.__setattr__(self, "losses", pairs)
    names = [n for n, _ in pairs]
    if not names:
      fail(f"losses is empty; name at least one of {sorted(losses.PAIR_LOSSES)} or 'kto'")
    if len(set(names)) != len(names):
      fail(f"losses names a loss twice: {names}")
    for name in names:
      if name != "kto" and name not in losses.PAIR_LOSSES:
        fail(f"unknown loss {name!r}; choose from {sorted(losses.PAIR_LOSSES)} or 'kto'")
    if "kto" in names and len(names) > 1:
      fail(f"'kto' trains on unpaired batches and cannot be combined with {names}")
    if not self.beta > 0:
      fail(f"beta must be > 0, got {self.beta}")
    if self.reference not in REFERENCE_MODES:
      fail(f"reference={self.reference!r}; choose one of {REFERENCE_MODES}")
    needs_ref = [n for n in names if n not in REFERENCE_FREE]
    if self.reference == "none" and needs_ref:
      fail(f"reference='none' but {needs_ref} need reference log-probs; only "
           f"{REFERENCE_FREE} are reference-free")
    if self.kto_kl not in KTO_KL_ESTIMATES:
      fail(f"kto_kl={self.kto_kl!r}; choose one of {KTO_KL_ESTIMATES}")
    if self.logprob_chunk < 1:
      fail(f"logprob_chunk must be >= 1, got {self.logprob_chunk}")
    if self.microbatches < 1:
      fail(f"microbatches must be >= 1, got {self.microbatches}")
    pair_names = [n for n in names if n != "kto"]
    accepted = set().union(*[_keyword_options(losses.PAIR_LOSSES[n]) for n in pair_names])
    for opt in PAIR_OPTIONS:
      if getattr(self, opt) is not None and opt not in accepted:
        fail(f"{opt}={getattr(self, opt)} is taken by none of the selected losses {names}")
    if "kto" not in names and (self.lambda_d != 1.0 or self.lambda_u != 1.0):
      fail("lambda_d / lambda_u apply to 'kto' only")
    if self.reference_from or self.guiding_steps or self.guiding_losses:
      from jaxrl_llm.preference import pre_dpo
      pre_dpo.validate(self, fail)
    if "bco_pair" in names and self.delta is None and self.microbatches > 1:
      fail("bco_pair with delta=None uses each micro-batch's own mean reward as the shift, "
           "which is not exact under micro-batching; pass delta (a running mean) or use "
           "microbatches=1")

  @property
  def unpaired(self) -> bool:
    return self.losses[0][0] == "kto"

  @property
  def needs_reference(self) -> bool:
    return self.reference != "none" and any(n not in REFERENCE_FREE for n, _ in self.losses)

  def loss_options(self) -> dict[str, Any]:
    """Keyword options for `losses.combined_loss` (beta and the options that are set)."""
    opts = {"beta": self.beta}
    opts.update({k: getattr(self, k) for k in PAIR_OPTIONS if getattr(self, k) is not None})
    return opts

  def replace(self, **changes) -> "PreferenceConfig":
    return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# Log-probs of completions after prompts.
# ---------------------------------------------------------------------------
def completion_logprobs(cfg: ModelConfig, params, prompt_tokens_NP, prompt_mask_NP,
                        completion_NC, completion_mask_NC, *, chunk_size: int = 512):
  """log π(y_t | x, y_<t) of every completion position, float32 [N, C].

  The row is prompt (left-padded) then completion (right-padded); segment
  ids 0 on padding keep it out of attention and restart the rotary
  positions at the first real prompt token. Position P−1+t predicts y_t.
  Padding positions hold junk: multiply by the completion mask.
  """
  P, C = prompt_tokens_NP.shape[1], completion_NC.shape[1]
  tokens = jnp.concatenate([prompt_tokens_NP, completion_NC], axis=1).astype(jnp.int32)
  segments = jnp.concatenate([(prompt_mask_NP != 0).astype(jnp.int32),
                              (completion_mask_NC != 0).astype(jnp.int32)], axis=1)
  h_NTD = decoder.hidden_states(cfg, params, tokens, segment_ids_BT=segments)
  return decoder.token_logprobs(cfg, params, h_NTD[:, P - 1:P + C - 1],
                                completion_NC.astype(jnp.int32), chunk_size=chunk_size)


def _pad_to(x, length):
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def pair_logprobs(cfg: ModelConfig, params, batch: Mapping[str, jax.Array], *,
                  chunk_size: int = 512, shared_prompt: bool = False):
  """(chosen_NC, rejected_NC) per-token log-probs from ONE forward of 2N rows.

  Chosen and rejected completions share the prompt; their rows are stacked
  (chosen first) so the model runs once on a batch of 2N. Completions of
  different lengths are padded to the longer C. With `shared_prompt` the
  forward is N packed rows [prompt ; chosen ; rejected] that run the prompt
  once (`shared_prompt.completion_hidden_states`); the log-probs are the same.
  """
  C = max(batch["chosen_tokens"].shape[1], batch["rejected_tokens"].shape[1])
  N = batch["chosen_tokens"].shape[0]
  pad = lambda key: _pad_to(batch[key], C)
  if shared_prompt:  # pair n is rows 2n (chosen) and 2n + 1 (rejected)
    comp_N2C = jnp.stack([pad("chosen_tokens"), pad("rejected_tokens")], 1).astype(jnp.int32)
    mask_N2C = jnp.stack([pad("chosen_mask"), pad("rejected_mask")], axis=1) != 0
    h_BCD = shared_prompt_lib.completion_hidden_states(
        cfg, params, batch["prompt_tokens"].astype(jnp.int32), batch["prompt_mask"] != 0,
        comp_N2C, mask_N2C)
    logp_N2C = decoder.token_logprobs(cfg, params, h_BCD, comp_N2C.reshape(2 * N, C),
                                      chunk_size=chunk_size).reshape(N, 2, C)
    chosen_NC, rejected_NC = logp_N2C[:, 0], logp_N2C[:, 1]
  else:  # chosen rows first, then rejected
    prompt = jnp.concatenate([batch["prompt_tokens"]] * 2, axis=0)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, axis=0)
    comp = jnp.concatenate([pad("chosen_tokens"), pad("rejected_tokens")], axis=0)
    comp_mask = jnp.concatenate([pad("chosen_mask"), pad("rejected_mask")], axis=0)
    logp_2NC = completion_logprobs(cfg, params, prompt, prompt_mask, comp, comp_mask,
                                   chunk_size=chunk_size)
    chosen_NC, rejected_NC = logp_2NC[:N], logp_2NC[N:]
  return (chosen_NC[:, :batch["chosen_tokens"].shape[1]],
          rejected_NC[:, :batch["rejected_tokens"].shape[1]])


def _mismatched(batch):
  """KTO's KL rows: prompt n with the completion of row n+1 (cyclically)."""
  return {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"],
          "completion_tokens": jnp.roll(batch["completion_tokens"], -1, axis=0),
          "completion_mask": jnp.roll(batch["completion_mask"], -1, axis=0)}


def _weights(batch) -> jax.Array:
  """w_N: pair_weight (default 1), zero for rows without completion tokens."""
  if "completion_mask" in batch:
    keys = ("completion_mask",)
  else:
    keys = ("chosen_mask", "rejected_mask")
  n = batch[keys[0]].shape[0]
  w = jnp.asarray(batch.get("pair_weight", jnp.ones((n,))), jnp.float32)
  for k in keys:
    w = w * (jnp.sum(batch[k], axis=1) > 0)
  return w


# ---------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PreferenceStep:
  """The preference step, bound to a model, a `PreferenceConfig` and an optimizer."""
  model: ModelConfig
  pref: PreferenceConfig
  tx: optax.GradientTransformation
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True

  # --------------------------------------------------------------- REFERENCE
  def _no_grad_map(self, fn, rows):
    """fn over micro-batches of `rows` (bounded memory), concatenated, no gradient."""
    n = self.pref.microbatches
    split = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), rows)
    out = jax.lax.map(fn, split)
    return jax.tree.map(lambda x: jax.lax.stop_gradient(x.reshape((-1,) + x.shape[2:])), out)

  def _unpaired_logps(self, params, rows):
    return completion_logprobs(self.model, params, rows["prompt_tokens"], rows["prompt_mask"],
                               rows["completion_tokens"], rows["completion_mask"],
                               chunk_size=self.pref.logprob_chunk)

  def reference_logps(self, ref_params, batch) -> dict[str, jax.Array]:
    """The reference arrays of a batch (REF_KEYS_PAIRED or REF_KEYS_UNPAIRED)."""
    chunk = self.pref.logprob_chunk
    if not self.pref.unpaired:
      keys = ("prompt_tokens", "prompt_mask", "chosen_tokens", "chosen_mask",
              "rejected_tokens", "rejected_mask")
      fn = lambda r: pair_logprobs(self.model, ref_params, r, chunk_size=chunk,
                                   shared_prompt=self.pref.shared_prompt)
      chosen, rejected = self._no_grad_map(fn, {k: batch[k] for k in keys})
      return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    keys = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask")
    rows = {k: batch[k] for k in keys}
    fn = lambda r: self._unpaired_logps(ref_params, r)
    out = {"ref_completion_logps": self._no_grad_map(fn, rows)}
    if self.pref.kto_kl == "mismatched":
      out["ref_kl_logps"] = self._no_grad_map(fn, _mismatched(rows))
    return out

  def with_reference(self, batch, ref_params) -> dict[str, jax.Array]:
    """The batch with its reference arrays: read, computed on the fly, or not needed."""
    batch = dict(batch)
    if not self.pref.needs_reference:
      return batch
    keys = REF_KEYS_UNPAIRED if self.pref.unpaired else REF_KEYS_PAIRED
    if self.pref.unpaired and self.pref.kto_kl == "batch":
      keys = keys[:1]
    missing = [k for k in keys if k not in batch]
    if not missing:
      return batch
    if self.pref.reference == "precomputed" or ref_params is None:
      raise ValueError(
          f"the preference step needs reference log-probs {missing}: with reference="
          f"{self.pref.reference!r} add them with precompute_reference_logps(...) or pass "
          "ref_params with reference='on_the_fly'")
    batch.update(self.reference_logps(ref_params, batch))
    return batch

  # -------------------------------------------------------------------- LOSS
  def pair_loss(self, params, mb):
    """(Σ w·ℓ, (Σ w, metric sums)) of one micro-batch of pairs."""
    pref = self.pref
    chosen, rejected = pair_logprobs(self.model, params, mb, chunk_size=pref.logprob_chunk,
                                     shared_prompt=pref.shared_prompt)
    pair = losses.PairLogps(chosen, rejected, mb.get("ref_chosen_logps"),
                            mb.get("ref_rejected_logps"),
                            mb["chosen_mask"].astype(jnp.float32),
                            mb["rejected_mask"].astype(jnp.float32))
    loss_N, m = losses.combined_loss(pair, dict(pref.losses), **pref.loss_options())
    w = _weights(mb)
    sums = {f"loss/{name}": jnp.sum(w * m[f"{name}/loss_B"]) for name, _ in pref.losses}
    first = pref.losses[0][0]
    for k in _PAIR_METRICS:
      sums[f"pref/{k}"] = jnp.sum(w * m[f"{first}/{k}_B"])
    # DPO's per-pair gradient weight σ(−β·h): how the reference re-weights the data (Pre-DPO).
    weight_N = jax.nn.sigmoid(-m[f"{first}/margin_B"])
    sums["pref/dpo_weight"] = jnp.sum(w * weight_N)
    sums["pref/dpo_weight_sq"] = jnp.sum(w * jnp.square(weight_N))
    return jnp.sum(w * loss_N), (jnp.sum(w), sums)

  def kto_loss(self, params, mb, kl_ref):
    """KTO's (Σ w·ℓ, (Σ w, metric sums)) with the batch-level reference point z."""
    pref = self.pref
    logp = self._unpaired_logps(params, mb)
    mask = mb["completion_mask"].astype(jnp.float32)
    label = mb["label"].astype(bool)
    loss_N, m = losses.kto(logp, mb["ref_completion_logps"], mask, label, beta=pref.beta,
                           lambda_d=pref.lambda_d, lambda_u=pref.lambda_u, kl_ref=kl_ref)
    w = _weights(mb)
    weight = pref.losses[0][1]
    d = w * label
    u = w * ~label
    sums = {"loss/kto": jnp.sum(w * loss_N), "pref/accuracy": jnp.sum(w * m["accuracy_B"]),
            "pref/reward_desirable": jnp.sum(d * m["reward_B"]), "pref/desirable": jnp.sum(d),
            "pref/reward_undesirable": jnp.sum(u * m["reward_B"]),
            "pref/undesirable": jnp.sum(u)}
    return weight * jnp.sum(w * loss_N), (jnp.sum(w), sums)

  def kto_reference_point(self, params, batch) -> jax.Array:
    """KL̂ for KTO's z over the WHOLE batch (so micro-batching stays exact).

    "mismatched" (the KTO paper): mean over rows of
    Σ_t m·(log π_θ − log π_ref)(y_{n+1,t} | x_n), prompt n paired with the
    completion of row n+1; "batch": the mean of c over the batch's own rows.
    No gradient flows through it (z is a stop-gradient constant).
    """
    if self.pref.kto_kl == "mismatched":
      rows, ref = _mismatched(batch), batch["ref_kl_logps"]
    else:
      rows, ref = batch, batch["ref_completion_logps"]
    logp = self._no_grad_map(functools.partial(self._unpaired_logps, params),
                             {k: rows[k] for k in ("prompt_tokens", "prompt_mask",
                                                   "completion_tokens", "completion_mask")})
    mask = rows["completion_mask"].astype(jnp.float32)
    c_N = jnp.sum((logp - ref) * mask, axis=1)
    valid = (jnp.sum(mask, axis=1) > 0) & (jnp.sum(batch["completion_mask"], axis=1) > 0)
    return jnp.sum(c_N * valid) / jnp.maximum(jnp.sum(valid), 1)

  # ------------------------------------------------------------------ UPDATE
  def update(self, state: TrainState, batch, ref_params=None):
    """REFERENCE → FORWARD/LOSS → UPDATE (call inside `activation_rules`)."""
    pref = self.pref
    # Under LoRA with no ref_params: the adapters' starting model, sharing the frozen base.
    batch = self.with_reference(batch, lora.reference_or(ref_params, state.params))
    if pref.unpaired:
      keys = ("prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "label",
              "pair_weight", "ref_completion_logps")
      kl_ref = self.kto_reference_point(state.params, batch)
      loss_fn = functools.partial(self.kto_loss, kl_ref=kl_ref)
    else:
      keys = ("prompt_tokens", "prompt_mask", "chosen_tokens", "chosen_mask",
              "rejected_tokens", "rejected_mask", "pair_weight") + REF_KEYS_PAIRED
      loss_fn = self.pair_loss
    rows = {k: batch[k] for k in keys if k in batch}
    grads, denom, sums = accumulate_gradients(loss_fn, state.params, rows, pref.microbatches)
    new_state, metrics = apply_update(state, self.tx, grads, skip_nonfinite=self.skip_nonfinite)
    safe = jnp.maximum(denom, 1e-8)
    if pref.unpaired:
      metrics["loss/total"] = pref.losses[0][1] * sums["loss/kto"] / safe
      metrics["loss/kto"] = sums["loss/kto"] / safe
      metrics["pref/accuracy"] = sums["pref/accuracy"] / safe
      for side in ("desirable", "undesirable"):
        metrics[f"pref/reward_{side}"] = (sums[f"pref/reward_{side}"]
                                          / jnp.maximum(sums[f"pref/{side}"], 1.0))
      metrics["pref/kl_ref"] = jnp.maximum(kl_ref, 0.0)
    else:
      metrics["loss/total"] = sum(w * sums[f"loss/{n}"] for n, w in pref.losses) / safe
      metrics.update({k: v / safe for k, v in sums.items()})
      metrics["pref/dpo_weight_std"] = jnp.sqrt(jnp.maximum(
          metrics.pop("pref/dpo_weight_sq") - jnp.square(metrics["pref/dpo_weight"]), 0.0))
    metrics["pref/pairs"] = denom
    return new_state.replace(step=state.step + 1), metrics

  def __call__(self, state: TrainState, batch, rng=None, ref_params=None):
    """One preference optimizer step (deterministic; rng kept for the common signature)."""
    del rng
    with sharding.activation_rules(self.mesh, self.rules):
      return self.update(state, batch, ref_params)


def jit_preference_step(step: PreferenceStep, state_shardings, ref_shardings=None,
                        batch_sharding=None):
  """jax.jit with explicit shardings; the state (argument 0) is donated, ref params not."""
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  return jax.jit(step.__call__,
                 in_shardings=(state_shardings, batch_sharding, rep, ref_shardings),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=(0,))


def precompute_reference_logps(step: PreferenceStep, ref_params, batch) -> dict:
  """The batch plus its reference arrays, to store with the data.

  Adds ref_chosen_logps / ref_rejected_logps [N, C] (paired) or
  ref_completion_logps and, for kto_kl="mismatched", ref_kl_logps [N, C]
  (unpaired), computed exactly as the on-the-fly path computes them. Pure:
  jit it, e.g. `jax.jit(functools.partial(precompute_reference_logps, step))`.
  """
  with sharding.activation_rules(step.mesh, step.rules):
    return dict(batch, **step.reference_logps(ref_params, batch))
