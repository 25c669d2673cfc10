"""Distillation: logit KD, GKD and on-policy distillation with the teacher in the step.

The teacher is one more set of params passed into the jitted step, like the RL
reference: never donated, never differentiated, sharded by the same logical
rules over its own model config (a teacher larger than the student is the
normal case). Student and teacher must share the tokenizer; their logits are
compared over the vocabulary entries both models have (HF checkpoints pad the
embedding to different sizes; the entries past the tokenizer's are never
real tokens).

Divergences per token, summed over the vocabulary, with p_S = softmax(s / τ),
p_T = softmax(t / τ) (τ the temperature):

  forward KL    KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)          (supervised KD)
  top-k KD      the teacher renormalised over its k largest logits:
                Σ_{v ∈ top-k} p_T^k (log p_T^k − log p_S),  p_S over the full vocabulary
  GKD           generalized JSD, M = β p_T + (1 − β) p_S (a log-sum-exp in log space):
                JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M);
                β = 0 is KL(p_T ‖ p_S) and β = 1 is KL(p_S ‖ p_T) (the endpoints
                of the GKD paper's reference implementation; JSD_β / β → KL(p_T ‖ p_S)
                as β → 0 and JSD_β / (1 − β) → KL(p_S ‖ p_T) as β → 1)
  on-policy     the student's own samples y ~ π_S, scored per token by the
                reverse KL's single-sample estimate: advantage
                A_t = coef · (log π_T(y_t | y_<t) − log π_S(y_t | y_<t))
                (+ outcome_coef · the estimator's outcome advantage: GRPO + distillation)

Modes (`DistillConfig.mode`):
  kd         packed SFT rows of the dataset; loss = token mean of the forward KL
             (or top-k KD) at every completion token.
  gkd        prompt rows: a fraction λ (`lmbda`) of each batch is completed by the
             student's samples (at τ), the rest by the dataset's answer; loss =
             token mean of JSD_β over the completion tokens; one jit.
  on_policy  the one-jit RL step (`rl_step.RLStep`): the teacher's log-probs of
             the rollout are one more forward; the dense advantage above is
             added by the step's `token_advantages` stage.

kd / gkd logits are formed `distill.logit_chunk` positions at a time and, with
`distill.vocab_chunk` > 0, `vocab_chunk` vocabulary columns at a time
(`vocab_chunked_divergence`); every chunking gives the same loss.

Shape letters: B rows, T positions, V vocabulary, D hidden, K top-k, P prompt
length, L completion length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import config_checks, sampling, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.rl import rl_step as rl_lib
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update

MODES = ("kd", "gkd", "on_policy")
TEACHER_SOURCES = ("builtin", "hf", "workdir")


# ---------------------------------------------------------------------------
# Divergences over logits (pure functions; float32 inside).
# ---------------------------------------------------------------------------
def _log_probs(logits_BTV: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)


def _kl(logp_BTV: jax.Array, logq_BTV: jax.Array) -> jax.Array:
  """KL(p ‖ q) = Σ_v p (log p − log q) per position; 0·log 0 counts as 0."""
  p = jnp.exp(logp_BTV)
  return jnp.sum(jnp.where(p > 0, p * (logp_BTV - logq_BTV), 0.0), axis=-1)


def _jsd_terms(log_s_BTV: jax.Array, log_t_BTV: jax.Array, beta: float) -> jax.Array:
  """The per-entry terms of JSD_β (their sum over v is `generalized_jsd`).

  Elementwise in (log p_S, log p_T), which is what lets the vocabulary be
  split into chunks: each chunk's terms need only the two log-normalisers.
  """
  p_s, p_t = jnp.exp(log_s_BTV), jnp.exp(log_t_BTV)
  if beta == 0.0:
    return jnp.where(p_t > 0, p_t * (log_t_BTV - log_s_BTV), 0.0)
  if beta == 1.0:
    return jnp.where(p_s > 0, p_s * (log_s_BTV - log_t_BTV), 0.0)
  log_m = jnp.logaddexp(log_t_BTV + math.log(beta), log_s_BTV + math.log1p(-beta))
  return (beta * jnp.where(p_t > 0, p_t * (log_t_BTV - log_m), 0.0)
          + (1.0 - beta) * jnp.where(p_s > 0, p_s * (log_s_BTV - log_m), 0.0))


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


def generalized_jsd(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, *,
                    beta: float, temperature: float = 1.0) -> jax.Array:
  """The generalized Jensen–Shannon divergence of GKD, per token: jsd_BT.

  JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M) with M = β p_T + (1 − β) p_S,
  log M formed by a log-sum-exp of the two log-probabilities (stable where
  either is tiny). β = 0 returns KL(p_T ‖ p_S) (forward KL, the supervised KD
  direction), β = 1 returns KL(p_S ‖ p_T) (reverse KL, mode seeking), as in
  the GKD paper's reference implementation. `beta` is a Python float in
  [0, 1] (a config value: the endpoints are chosen at trace time).
  """
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
  _check_temperature(temperature)
  if student_logits_BTV.shape != teacher_logits_BTV.shape:
    raise ValueError(f"student logits {student_logits_BTV.shape} and teacher logits "
                     f"{teacher_logits_BTV.shape} differ in shape")
  log_s = _log_probs(student_logits_BTV, temperature)
  log_t = _log_probs(teacher_logits_BTV, temperature)
  return jnp.sum(_jsd_terms(log_s, log_t, beta), axis=-1)


def forward_kl(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, *,
               temperature: float = 1.0) -> jax.Array:
  """Supervised KD per token: KL(p_T ‖ p_S) at temperature τ (= generalized_jsd, β = 0)."""
  return generalized_jsd(student_logits_BTV, teacher_logits_BTV, beta=0.0,
                         temperature=temperature)


def teacher_top_k(teacher_logits_BTV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The teacher's k largest logits and their token ids: (values_BTK, ids_BTK).

  What a run stores (or keeps in memory) instead of [B, T, V] teacher logits.
  """
  if k < 1:
    raise ValueError(f"top-k teacher logits need k >= 1, got {k}")
  k = min(k, teacher_logits_BTV.shape[-1])
  return jax.lax.top_k(teacher_logits_BTV.astype(jnp.float32), k)


def top_k_kd(student_logits_BTV: jax.Array, teacher_values_BTK: jax.Array,
             teacher_ids_BTK: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """KD on the teacher's top-k logits, per token: kl_BT.

  p_T^k = softmax(values / τ) over the k kept tokens (the teacher renormalised
  over them); the student's log-probabilities log p_S = log_softmax(s / τ) are
  over its full vocabulary and read at the k ids:
    Σ_{j<k} p_T^k_j (log p_T^k_j − log p_S[ids_j]).
  With k = V this is `forward_kl`.
  """
  _check_temperature(temperature)
  log_s = _log_probs(student_logits_BTV, temperature)
  log_t = jax.nn.log_softmax(teacher_values_BTK.astype(jnp.float32) / temperature, axis=-1)
  log_s_k = jnp.take_along_axis(log_s, teacher_ids_BTK, axis=-1)
  return _kl(log_t, log_s_k)


def kd_divergence(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, *,
                  temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """Supervised KD per token: forward KL, or top-k KD when `top_k` > 0."""
  if top_k > 0:
    values, ids = teacher_top_k(teacher_logits_BTV, top_k)
    return top_k_kd(student_logits_BTV, values, ids, temperature=temperature)
  return forward_kl(student_logits_BTV, teacher_logits_BTV, temperature=temperature)


# ---------------------------------------------------------------------------
# The divergence over sequences: chunked over positions and over the vocabulary.
# ---------------------------------------------------------------------------
_MASKED = -1e30  # logit of the padding columns of the last vocabulary chunk (exp -> 0)


def shared_vocab(student: ModelConfig, teacher: ModelConfig) -> int:
  """Logit columns both models have (the tokenizer's ids lie below it)."""
  return min(student.vocab_size, teacher.vocab_size)


def _unembed_VD(cfg: ModelConfig, params) -> jax.Array:
  """The output projection as [V, D] rows (tied embedding or lm_head transposed)."""
  return params["embed"] if cfg.tie_embeddings else params["lm_head"].T


def vocab_chunked_divergence(h_student_BTD: jax.Array, w_student_VD: jax.Array,
                             h_teacher_BTD: jax.Array, w_teacher_VD: jax.Array, *,
                             beta: float, temperature: float = 1.0, top_k: int = 0,
                             vocab_chunk: int, vocab_size: Optional[int] = None,
                             student_dtype=jnp.float32, teacher_dtype=jnp.float32
                             ) -> jax.Array:
  """JSD_β (or top-k KD) per position from hidden states, `vocab_chunk` columns at a time.

  Logits are h · W[v0:v0 + C]ᵀ / τ for one chunk of C vocabulary rows, so no
  [B, T, V] tensor exists. Two passes over the chunks (a scan each, bodies
  recomputed in the backward pass):
    1. the log-normalisers lse_S = log Σ_v exp(s_v / τ), lse_T likewise (a
       running log-add-exp), and for top-k the teacher's running k largest;
    2. Σ over chunks of the elementwise terms of JSD_β at log p = logits / τ − lse
       (`_jsd_terms`), or, for top-k, the student's logits at the k ids.
  Equal to `generalized_jsd` (`top_k_kd`) of the full logits up to float
  rounding. `vocab_size` (default the rows of W) is the number of columns
  compared; the last chunk's padding columns are masked out. The matmuls run
  in each model's compute dtype (`student_dtype`, `teacher_dtype`), the rest
  in float32.
  """
  if vocab_chunk < 1:
    raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
  _check_temperature(temperature)
  V = vocab_size or min(w_student_VD.shape[0], w_teacher_VD.shape[0])
  C = min(vocab_chunk, V)
  n = -(-V // C)
  pad = n * C - V

  def rows(w, dtype):
    w = w[:V].astype(dtype)
    return jnp.pad(w, ((0, pad), (0, 0))).reshape(n, C, w.shape[-1])

  w_s, w_t = rows(w_student_VD, student_dtype), rows(w_teacher_VD, teacher_dtype)
  hs, ht = h_student_BTD.astype(student_dtype), h_teacher_BTD.astype(teacher_dtype)
  valid_nC = (jnp.arange(n * C) < V).reshape(n, C)
  lead = h_student_BTD.shape[:-1]

  def logits(h, w, valid):
    z = jnp.einsum("...D,CD->...C", h, w).astype(jnp.float32) / temperature
    return jnp.where(valid, z, _MASKED)

  def pass1(carry, xs):
    lse_s, lse_t, top_vals, top_ids = carry
    ws, wt, valid, start = xs
    s, t = logits(hs, ws, valid), jax.lax.stop_gradient(logits(ht, wt, valid))
    lse_s = jnp.logaddexp(lse_s, jax.nn.logsumexp(s, axis=-1))
    lse_t = jnp.logaddexp(lse_t, jax.nn.logsumexp(t, axis=-1))
    if top_k:
      vals = jnp.concatenate([top_vals, t], axis=-1)
      ids = jnp.concatenate([top_ids, start + jnp.broadcast_to(jnp.arange(C), t.shape)], -1)
      top_vals, j = jax.lax.top_k(vals, top_vals.shape[-1])
      top_ids = jnp.take_along_axis(ids, j, axis=-1)
    return (lse_s, lse_t, top_vals, top_ids), None

  k = min(top_k, V)
  init = (jnp.full(lead, -jnp.inf), jnp.full(lead, -jnp.inf),
          jnp.full(lead + (k,), -jnp.inf), jnp.zeros(lead + (k,), jnp.int32))
  starts = jnp.arange(n, dtype=jnp.int32) * C
  (lse_s, lse_t, top_vals, top_ids), _ = jax.lax.scan(
      jax.checkpoint(pass1), init, (w_s, w_t, valid_nC, starts))
  lse_t = jax.lax.stop_gradient(lse_t)

  if top_k:
    def gather(acc, xs):  # the student's tempered logits at the teacher's top-k ids
      ws, valid, start = xs
      s = logits(hs, ws, valid)
      local = top_ids - start
      inside = (local >= 0) & (local < C)
      got = jnp.take_along_axis(s, jnp.clip(local, 0, C - 1), axis=-1)
      return acc + jnp.where(inside, got, 0.0), None

    s_k, _ = jax.lax.scan(jax.checkpoint(gather), jnp.zeros(lead + (k,)),
                          (w_s, valid_nC, starts))
    log_t_k = jax.nn.log_softmax(jax.lax.stop_gradient(top_vals), axis=-1)
    return _kl(log_t_k, s_k - lse_s[..., None])

  def pass2(acc, xs):
    ws, wt, valid = xs
    log_s = logits(hs, ws, valid) - lse_s[..., None]
    log_t = jax.lax.stop_gradient(logits(ht, wt, valid)) - lse_t[..., None]
    terms = jnp.where(valid, _jsd_terms(log_s, log_t, float(beta)), 0.0)
    return acc + jnp.sum(terms, axis=-1), None

  total, _ = jax.lax.scan(jax.checkpoint(pass2), jnp.zeros(lead), (w_s, w_t, valid_nC))
  return total


def sequence_divergence(student: ModelConfig, student_params, h_student_BTD: jax.Array,
                        teacher: ModelConfig, teacher_params, h_teacher_BTD: jax.Array, *,
                        beta: float, temperature: float = 1.0, top_k: int = 0,
                        chunk_size: int = 128, vocab_chunk: int = 0) -> jax.Array:
  """JSD_β (β = 0: forward KL; top_k > 0: top-k KD) per position from hidden states: [B, T].

  Positions are taken `chunk_size` at a time, each chunk's logits recomputed
  in the backward pass (`jax.checkpoint`), over the vocabulary both models
  share. vocab_chunk = 0 forms a chunk's full [B, c, V] logits and applies
  `generalized_jsd` / `top_k_kd`; vocab_chunk > 0 also splits the vocabulary
  (`vocab_chunked_divergence`: [B, c, vocab_chunk] at a time). Every chunking
  gives the same result up to float rounding.
  """
  if h_student_BTD.shape[:2] != h_teacher_BTD.shape[:2]:
    raise ValueError(f"student hidden states {h_student_BTD.shape} and teacher hidden states "
                     f"{h_teacher_BTD.shape} cover different positions")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if vocab_chunk < 0:
    raise ValueError(f"vocab_chunk must be >= 0 (0: the whole vocabulary), got {vocab_chunk}")
  if top_k and beta != 0.0:
    raise ValueError(f"top-k KD is a forward KL (beta=0); got beta={beta}")
  B, T = h_student_BTD.shape[:2]
  V = shared_vocab(student, teacher)
  c = min(chunk_size, T)
  pad = (-T) % c
  n = (T + pad) // c

  def chunks(h):
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    return h.reshape(B, n, c, h.shape[-1]).swapaxes(0, 1)

  def one_chunk(_, xs):
    hs, ht = xs
    if vocab_chunk:
      return None, vocab_chunked_divergence(
          hs, _unembed_VD(student, student_params), jax.lax.stop_gradient(ht),
          jax.lax.stop_gradient(_unembed_VD(teacher, teacher_params)), beta=beta,
          temperature=temperature, top_k=top_k, vocab_chunk=vocab_chunk, vocab_size=V,
          student_dtype=student.compute_dtype, teacher_dtype=teacher.compute_dtype)
    s = decoder.unembed(student, student_params, hs)[..., :V].astype(jnp.float32)
    t = jax.lax.stop_gradient(
        decoder.unembed(teacher, teacher_params, ht)[..., :V].astype(jnp.float32))
    if top_k:
      return None, kd_divergence(s, t, temperature=temperature, top_k=top_k)
    return None, generalized_jsd(s, t, beta=beta, temperature=temperature)

  _, d_nBc = jax.lax.scan(jax.checkpoint(one_chunk), None,
                          (chunks(h_student_BTD), chunks(h_teacher_BTD)))
  return d_nBc.swapaxes(0, 1).reshape(B, n * c)[:, :T]


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Distillation (kind "distill"): the mode, the teacher and the loss settings."""
  mode: str = "on_policy"       # kd | gkd | on_policy (module docstring)
  # The teacher: "builtin" (config.BUILTIN_MODELS[teacher_builtin], initialised from
  # `seed`, so train it with teacher_sft_steps), "hf" (a checkpoint directory at
  # teacher_path) or "workdir" (a finished run's workdir at teacher_path: its stored
  # config gives the model, its latest checkpoint the weights).
  teacher_source: str = "builtin"
  teacher_builtin: str = "small"
  teacher_path: str = ""
  teacher_dtype: str = "float32"  # compute and storage dtype of the teacher
  # > 0: train the builtin / hf teacher first by SFT on this run's task for this many
  # steps, in <workdir>/teacher (resumed, or reused once finished), then distill from it.
  teacher_sft_steps: int = 0
  teacher_sft_learning_rate: float = 3e-3
  teacher_sft_batch_size: int = 64
  temperature: float = 1.0      # τ of the divergences (gkd also samples at τ)
  beta: float = 0.5             # gkd: JSD interpolation (0 forward KL, 1 reverse KL)
  lmbda: float = 0.5            # gkd: fraction of each batch completed by student samples
  max_new_tokens: int = 16      # gkd: length of the student's samples
  top_k: int = 0                # kd: keep the teacher's top-k logits only (0: all)
  coef: float = 1.0             # on_policy: weight of the teacher's dense advantage
  outcome_coef: float = 0.0     # on_policy: weight of the outcome advantage (GRPO + distill)
  logit_chunk: int = 128        # kd / gkd: positions per chunk of the logit divergence
  vocab_chunk: int = 0          # kd / gkd: vocabulary columns per chunk (0: all at once)

  def __post_init__(self):
    config_checks.require_finite(self, "distill")
    if self.mode not in MODES:
      raise ValueError(f"distill.mode={self.mode!r}; choose one of {MODES}")
    if self.teacher_source not in TEACHER_SOURCES:
      raise ValueError(f"distill.teacher_source={self.teacher_source!r}; choose one of "
                       f"{TEACHER_SOURCES}")
    from jaxrl_llm.config import BUILTIN_MODELS
    from jaxrl_llm.models.config import DTYPES, dtype_name
    object.__setattr__(self, "teacher_dtype", dtype_name(self.teacher_dtype))
    if self.teacher_dtype not in DTYPES:
      raise ValueError(f"distill.teacher_dtype={self.teacher_dtype!r}; choose one of "
                       f"{tuple(DTYPES)}")
    if self.teacher_source == "builtin" and self.teacher_builtin not in BUILTIN_MODELS:
      raise ValueError(f"distill.teacher_builtin={self.teacher_builtin!r}; choose one of "
                       f"{tuple(BUILTIN_MODELS)}")
    if self.teacher_source in ("hf", "workdir") and not self.teacher_path:
      raise ValueError(f"distill.teacher_path is required when distill.teacher_source="
                       f"{self.teacher_source!r} (" + (
                           "an HF checkpoint directory" if self.teacher_source == "hf"
                           else "the workdir of a finished run") + ")")
    if self.teacher_source == "builtin" and self.teacher_path:
      raise ValueError(f"distill.teacher_path={self.teacher_path!r} is set but "
                       "distill.teacher_source='builtin': set teacher_source to 'hf' or "
                       "'workdir', or clear teacher_path")
    if self.teacher_sft_steps < 0:
      raise ValueError(f"distill.teacher_sft_steps must be >= 0, got {self.teacher_sft_steps}")
    if self.teacher_sft_steps and self.teacher_source == "workdir":
      raise ValueError("distill.teacher_sft_steps trains a builtin or hf teacher; a 'workdir' "
                       "teacher is already trained: set teacher_sft_steps=0")
    if not 0 < self.teacher_sft_learning_rate < math.inf:
      raise ValueError("distill.teacher_sft_learning_rate must be a finite number > 0, got "
                       f"{self.teacher_sft_learning_rate}")
    if self.teacher_sft_batch_size < 1:
      raise ValueError(f"distill.teacher_sft_batch_size must be >= 1, got "
                       f"{self.teacher_sft_batch_size}")
    if not 0 < self.temperature < math.inf:
      raise ValueError(f"distill.temperature must be a finite number > 0, got "
                       f"{self.temperature}")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"distill.beta must be in [0, 1] (0 forward KL, 1 reverse KL), got "
                       f"{self.beta}")
    if not 0.0 <= self.lmbda <= 1.0:
      raise ValueError(f"distill.lmbda (fraction of on-policy rows) must be in [0, 1], got "
                       f"{self.lmbda}")
    if self.max_new_tokens < 1:
      raise ValueError(f"distill.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.top_k < 0:
      raise ValueError(f"distill.top_k must be >= 0 (0 keeps every teacher logit), got "
                       f"{self.top_k}")
    if self.top_k and self.mode != "kd":
      raise ValueError(f"distill.top_k={self.top_k} applies to mode 'kd' only (mode is "
                       f"{self.mode!r}): set distill.top_k=0")
    if not self.coef >= 0 or not self.outcome_coef >= 0:
      raise ValueError(f"distill.coef={self.coef} and distill.outcome_coef={self.outcome_coef} "
                       "must be >= 0")
    if self.mode == "on_policy" and self.coef == 0 and self.outcome_coef == 0:
      raise ValueError("distill.coef and distill.outcome_coef are both 0: nothing to learn; set "
                       "coef > 0 (distillation) and/or outcome_coef > 0 (outcome reward)")
    if self.logit_chunk < 1:
      raise ValueError(f"distill.logit_chunk must be >= 1, got {self.logit_chunk}")
    if self.vocab_chunk < 0:
      raise ValueError(f"distill.vocab_chunk must be >= 0 (0: the whole vocabulary at once), "
                       f"got {self.vocab_chunk}")

  @property
  def loss_beta(self) -> float:
    """β of the kd / gkd loss: kd is the forward KL (β = 0), gkd uses distill.beta."""
    return 0.0 if self.mode == "kd" else float(self.beta)

  @property
  def data_mode(self) -> str:
    """The data pipeline mode of the mode: packed SFT rows (kd) or prompt rows."""
    return "sft" if self.mode == "kd" else "rl"

  def num_on_policy(self, rows: int) -> int:
    """gkd: rows of a batch of `rows` completed by the student (round(λ·rows))."""
    return int(round(self.lmbda * rows))


# ---------------------------------------------------------------------------
# KD and GKD: one jitted step with the teacher's forward.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillStep:
  """The kd / gkd training step: (state, batch, rng, teacher_params) -> (state, metrics).

  kd batches are packed SFT rows (tokens, segment_ids, positions, loss_mask);
  gkd batches are prompt rows (prompt_tokens, prompt_mask, answer_tokens,
  answer_mask): the first round(λ·R) rows are completed by the student's
  samples (no gradient through the sampling), the others by the answers.
  """
  model: ModelConfig
  teacher: ModelConfig
  distill: DistillConfig
  tx: optax.GradientTransformation
  eos_id: int
  pad_id: int = 0
  microbatches: int = 1
  mesh: Any = None
  rules: tuple = sharding.DEFAULT_RULES
  skip_nonfinite: bool = True

  def token_divergence(self, params, teacher_params, tokens_BT, segments_BT, positions_BT):
    """Divergence at every position t (predicting token t + 1): [B, T − 1]."""
    require_teacher_positions(self.teacher, tokens_BT.shape[1])
    h_s = decoder.hidden_states(self.model, params, tokens_BT, positions_BT=positions_BT,
                                segment_ids_BT=segments_BT)
    h_t = jax.lax.stop_gradient(decoder.hidden_states(
        self.teacher, teacher_params, tokens_BT, positions_BT=positions_BT,
        segment_ids_BT=segments_BT))
    d = self.distill
    return sequence_divergence(self.model, params, h_s[:, :-1], self.teacher, teacher_params,
                               h_t[:, :-1], beta=d.loss_beta, temperature=d.temperature,
                               top_k=d.top_k, chunk_size=d.logit_chunk,
                               vocab_chunk=d.vocab_chunk)

  def loss(self, params, mb, teacher_params):
    """(Σ masked divergence, (Σ mask, metric sums)) of one micro-batch."""
    d_BT = self.token_divergence(params, teacher_params, mb["tokens"], mb["segment_ids"],
                                 mb.get("positions"))
    mask_BT = mb["loss_mask"][:, 1:].astype(jnp.float32)
    total = jnp.sum(d_BT * mask_BT)
    sums = {"distill/divergence": total, "train/tokens": jnp.sum(mask_BT)}
    if "on_policy" in mb:
      on_BT = mask_BT * mb["on_policy"][:, None]
      sums["distill/divergence_on_policy"] = jnp.sum(d_BT * on_BT)
      sums["distill/on_policy_tokens"] = jnp.sum(on_BT)
    return total, (jnp.sum(mask_BT), sums)

  def gkd_rows(self, params, batch, rng):
    """Prompt + completion rows of a gkd batch, in the packed-row layout of `loss`.

    Completions of the first n = round(λ·R) rows are sampled from the student
    at temperature τ (up to distill.max_new_tokens, ending at EOS); the other
    rows take the dataset answer. Both are right-padded to one length L.
    """
    d = self.distill
    prompts, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    R = prompts.shape[0]
    n = d.num_on_policy(R)
    answers, answer_mask = batch["answer_tokens"], batch["answer_mask"]
    L = max(answers.shape[1], d.max_new_tokens) if n < R else d.max_new_tokens
    pad = lambda x, value: jnp.pad(x, ((0, 0), (0, L - x.shape[1])), constant_values=value)
    completion, completion_mask = pad(answers, self.pad_id), pad(answer_mask, 0)
    if n:
      out = sampling.sample(
          self.model, decoder.decode_params(self.model, jax.lax.stop_gradient(params)),
          prompts[:n], prompt_mask[:n], rng, max_new_tokens=d.max_new_tokens,
          temperature=d.temperature, stop_tokens=(self.eos_id,), pad_id=self.pad_id)
      completion = completion.at[:n].set(pad(out.tokens_BL, self.pad_id))
      completion_mask = completion_mask.at[:n].set(pad(out.mask_BL.astype(answer_mask.dtype), 0))
    completion_mask = (completion_mask > 0).astype(jnp.int32)
    tokens = jnp.concatenate([prompts, completion], axis=1)
    segments = jnp.concatenate([(prompt_mask > 0).astype(jnp.int32), completion_mask], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask, jnp.int32), completion_mask],
                                axis=1)
    on_policy = (jnp.arange(R) < n).astype(jnp.float32)
    return {"tokens": tokens, "segment_ids": segments,
            "positions": decoder.positions_from_segments(segments),
            "loss_mask": loss_mask, "on_policy": on_policy}

  def __call__(self, state: TrainState, batch, rng, teacher_params):
    with sharding.activation_rules(self.mesh, self.rules):
      rng = jax.random.fold_in(rng, state.step)
      rows = self.gkd_rows(state.params, batch, rng) if self.distill.mode == "gkd" else batch
      rows = {k: rows[k] for k in ("tokens", "segment_ids", "positions", "loss_mask",
                                   "on_policy") if k in rows}
      loss_fn = functools.partial(self.loss, teacher_params=teacher_params)
      grads, denom, sums = accumulate_gradients(loss_fn, state.params, rows, self.microbatches)
      new_state, metrics = apply_update(state, self.tx, grads,
                                        skip_nonfinite=self.skip_nonfinite)
    metrics["distill/divergence"] = sums["distill/divergence"] / jnp.maximum(denom, 1.0)
    metrics["train/tokens"] = sums["train/tokens"]
    if "distill/on_policy_tokens" in sums:
      on = sums["distill/on_policy_tokens"]
      metrics["distill/divergence_on_policy"] = (sums["distill/divergence_on_policy"]
                                                 / jnp.maximum(on, 1.0))
      metrics["distill/on_policy_tokens"] = on
    return new_state.replace(step=state.step + 1), metrics


def jit_distill_step(step: DistillStep, state_shardings, teacher_shardings):
  """jax.jit of a kd / gkd step: state donated, teacher params not.

  Call as run(state, batch, rng, teacher_params).
  """
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  jitted = jax.jit(step.__call__, in_shardings=(state_shardings, None, rep, teacher_shardings),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))

  def run(state, batch, rng, teacher_params):
    return jitted(state, batch, rng, teacher_params)
  run.jitted = jitted
  return run


# ---------------------------------------------------------------------------
# On-policy distillation: the RL step with the teacher's dense advantage.
# ---------------------------------------------------------------------------
def dense_distill_advantage(student_logp_BL: jax.Array, teacher_logp_BL: jax.Array,
                            mask_BL: jax.Array, *, coef: float = 1.0) -> jax.Array:
  """A_t = coef · (log π_T(y_t) − log π_S(y_t)) on completion tokens, 0 elsewhere.

  Per token, the negative of the single-sample estimate of the reverse KL
  KL(π_S ‖ π_T) at the student's own sample: raising it moves the student
  toward what the teacher would say, where the student actually goes.
  """
  diff = jax.lax.stop_gradient(teacher_logp_BL - student_logp_BL)
  return coef * diff * (mask_BL > 0)


@dataclasses.dataclass(frozen=True)
class OnPolicyDistillStep(rl_lib.RLStep):
  """`RLStep` whose advantages carry the teacher's per-token reverse-KL term.

    adv_BL = outcome_coef · (the estimator's advantage) + coef · (log π_T − log π_S)

  log π_S is the behaviour log-prob of the sampled token (the recomputed old
  log-prob when epochs × minibatches > 1, else the sampler's), log π_T the
  teacher's at the rollout temperature. Call as
  step(state, batch, rng, ref_params, reward_params, teacher_params).
  """
  teacher: Optional[ModelConfig] = None
  distill: Optional[DistillConfig] = None
  teacher_params: Any = None  # bound inside the trace by __call__

  def __post_init__(self):
    if self.teacher is None or self.distill is None:
      raise ValueError("OnPolicyDistillStep needs the teacher's ModelConfig (teacher=) and a "
                       "DistillConfig (distill=)")

  def token_advantages(self, rows, adv_BL):
    d = self.distill
    require_teacher_positions(
        self.teacher, rows["prompt_tokens"].shape[1] + rows["completion"].shape[1])
    teacher_view = dataclasses.replace(self, model=self.teacher)
    teacher_logp = teacher_view._batched_logprobs(self.teacher_params, rows)
    student_logp = rows.get("old_logp", rows["sampler_logp"])
    mask = rows["loss_mask"]
    dense = dense_distill_advantage(student_logp, teacher_logp, mask, coef=d.coef)
    m = mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(m), 1.0)
    metrics = {"distill/reverse_kl": jnp.sum((student_logp - teacher_logp) * m) / denom,
               "distill/teacher_logp": jnp.sum(teacher_logp * m) / denom}
    return d.outcome_coef * adv_BL + dense, metrics

  def __call__(self, state: TrainState, batch, rng, ref_params=None, reward_params=None,
               teacher_params=None):
    if teacher_params is None:
      raise ValueError("on-policy distillation needs teacher_params")
    bound = dataclasses.replace(self, teacher_params=teacher_params)
    return rl_lib.RLStep.__call__(bound, state, batch, rng, ref_params, reward_params)


def jit_on_policy_step(step: OnPolicyDistillStep, state_shardings, ref_shardings=None,
                       reward_shardings=None, teacher_shardings=None):
  """jax.jit of the on-policy distillation step: state donated, the others not.

  Call as run(state, batch, rng, ref_params, reward_params, teacher_params).
  """
  rep = None if step.mesh is None else sharding.replicated(step.mesh)
  jitted = jax.jit(step.__call__,
                   in_shardings=(state_shardings, None, rep, ref_shardings, reward_shardings,
                                 teacher_shardings),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))

  def run(state, batch, rng, ref_params=None, reward_params=None, teacher_params=None):
    return jitted(state, batch, rng, ref_params, reward_params, teacher_params)
  run.jitted = jitted
  return run


# ---------------------------------------------------------------------------
# The teacher: model config and params on the run's mesh.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher ready for the step: its model config, params and their shardings."""
  model: ModelConfig
  params: Any
  shardings: Any
  description: str


def _check_same_tokenizer(tokenizer, other, where: str) -> None:
  """Refuses a teacher whose tokenizer maps text to other ids than the student's."""
  probe = "Distillation 12+34=46, teacher and student! ü"
  mine = (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id, tokenizer.encode(probe))
  theirs = (other.vocab_size, other.eos_id, other.pad_id, other.encode(probe))
  if mine != theirs:
    raise ValueError(f"{where} has another tokenizer than data.tokenizer (vocab / eos / pad / "
                     f"ids: {theirs[:3]} vs {mine[:3]}): distillation compares the two models' "
                     "next-token distributions id by id, so both need one tokenizer; pick a "
                     "teacher of the student's family")


def require_teacher_positions(teacher: ModelConfig, length: int) -> None:
  """Refuses (at trace time) teacher sequences of `length` tokens beyond the teacher's
  max_position_embeddings."""
  config_checks.require_positions(
      length, teacher.max_position_embeddings, "the distillation teacher",
      "shorten the run's sequences (data.seq_len for kd, data.max_prompt_len + the "
      "generation length for gkd / on_policy), or distill from a teacher with a longer "
      "context")


def _check_teacher_lengths(run_config, model: ModelConfig, where: str) -> None:
  """With the run's config, refuses a teacher shorter than the sequences it scores."""
  if run_config is not None:
    config_checks.check_secondary_model_lengths(
        run_config, model.max_position_embeddings, f"the distillation {where}")


def _check_vocab(model: ModelConfig, tokenizer, where: str) -> None:
  if model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"{where} has {model.vocab_size} logits, fewer than the tokenizer's "
                     f"{tokenizer.vocab_size} ids: it was not trained with data.tokenizer; "
                     "distill from a teacher that shares the student's tokenizer")


def load_teacher(d: DistillConfig, *, mesh, rules, tokenizer, tokenizer_name: str,
                 model_config_fn: Callable, seed: int = 0, path: str = "",
                 say: Callable[[str], None] = print, run_config=None) -> Teacher:
  """The teacher of `d` on `mesh`, sharded by `rules` over its own model config.

  `path` overrides `d.teacher_path` as a "workdir" teacher (the trainer's
  teacher SFT stage). `model_config_fn(model_spec) -> ModelConfig` turns a
  `config.ModelSpec` into a model config (the trainer's `model_config`).
  `run_config`, the run's `ExperimentConfig`: the teacher scores the run's
  training sequences (`config.sequence_budgets`), so its max_position_embeddings
  must cover them; checked before any weight is read.
  Raises ValueError when the teacher does not share the student's tokenizer, or
  is too short for the run's sequences.
  """
  from jaxrl_llm import config as config_lib
  from jaxrl_llm.checkpoint import finished_run
  from jaxrl_llm.train_state import param_shardings

  source = "workdir" if path else d.teacher_source
  path = path or d.teacher_path
  if source == "workdir":
    where = f"teacher workdir {path!r}"
    hint = "set distill.teacher_path to the workdir of a finished run (e.g. kind='sft')"
    with finished_run(path, where=where, hint=hint) as (ckpt, step, snapshot):
      if snapshot.get("kind") == "reward_model":
        raise ValueError(f"{where} is a reward model (a scalar head, no next-token "
                         f"distribution); {hint}")
      spec = config_lib.from_dict(config_lib.ModelSpec, snapshot["model"],
                                  f"{path}: config.model")
      if snapshot["data"]["tokenizer"] != tokenizer_name:
        raise ValueError(f"{where} was trained with data.tokenizer="
                         f"{snapshot['data']['tokenizer']!r} but this run uses "
                         f"{tokenizer_name!r}: teacher and student need one tokenizer")
      model = model_config_fn(spec)
      _check_vocab(model, tokenizer, where)
      _check_teacher_lengths(run_config, model, where)
      shardings = param_shardings(model, mesh, rules)
      abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              decoder.param_shapes(model), shardings)
      params = ckpt.restore_params(abstract, step)
    desc = f"step {step} of {path} ({spec.builtin if spec.source == 'builtin' else spec.path})"
    return Teacher(model, params, shardings, desc)

  if source == "hf":
    from jaxrl_llm import fileio
    from jaxrl_llm.models import hf
    from jaxrl_llm.tokenizers import load_tokenizer
    spec = config_lib.ModelSpec(source="hf", path=path, dtype=d.teacher_dtype,
                                param_dtype=d.teacher_dtype)
    model = model_config_fn(spec)
    where = f"teacher {path!r}"
    _check_vocab(model, tokenizer, where)
    _check_teacher_lengths(run_config, model, where)
    if any(fileio.exists(fileio.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
      _check_same_tokenizer(tokenizer, load_tokenizer(path), where)
    shardings = param_shardings(model, mesh, rules)
    _, params = hf.load_hf(path, dtype=d.teacher_dtype, param_dtype=d.teacher_dtype,
                           shardings=shardings)
    return Teacher(model, params, shardings, f"HF checkpoint {path}")

  spec = config_lib.ModelSpec(source="builtin", builtin=d.teacher_builtin, dtype=d.teacher_dtype,
                              param_dtype=d.teacher_dtype)
  model = model_config_fn(spec)
  _check_teacher_lengths(run_config, model,
                         f"teacher distill.teacher_builtin={d.teacher_builtin!r}")
  shardings = param_shardings(model, mesh, rules)
  params = jax.jit(lambda key: decoder.init_params(model, key), out_shardings=shardings)(
      jax.random.fold_in(jax.random.key(seed), 7919))
  say(f"WARNING: the teacher is the builtin {d.teacher_builtin!r} model at its random "
      "initialisation (distill.teacher_sft_steps=0): set distill.teacher_sft_steps > 0 to train "
      "it first, or distill.teacher_source='workdir' / 'hf' for a trained one")
  return Teacher(model, params, shardings, f"builtin {d.teacher_builtin!r}, untrained")
