"""Optimizer and learning-rate schedule for policy, value and reward models.

The optimizer is optax's AdamW behind a global-norm gradient clip:

  chain(clip_by_global_norm(grad_clip_norm), adamw(schedule, mask=decay_mask))

``optimizer="spam"`` or ``"stable_spam"`` swaps Adam's direction for SPAM's
(spike-aware clipping, momentum reset, post-reset warm-up) or Stable-SPAM's
(AdaClip, AdaGN, momentum reset); decay and schedule stay as in AdamW:

  chain(clip_by_global_norm, scale_by_<spam|stable_spam>,
        add_decayed_weights(weight_decay, decay_mask), scale_by_learning_rate)

Formulas and sources are in `jaxrl_llm.optim_spam`.

Gradient accumulation is not part of the optimizer: the training steps
accumulate micro-batch sums themselves (see the loss docstrings) so the
aggregation stays exact.

Schedules (``s`` is the optimizer step, ``W`` warm-up steps, ``N`` total
steps, ``lr`` the peak learning rate, ``r`` = ``end_lr_ratio``):

  warm-up (all schedules)  lr(s) = lr * s / W                  for s < W
  constant                 lr(s) = lr                          for s >= W
  linear                   lr(s) = lr + (r*lr - lr) * (s - W) / (N - W)
  cosine                   lr(s) = r*lr + (lr - r*lr) * (1 + cos(pi * u)) / 2,
                           u = (s - W) / (N - W)

After ``N`` the linear and cosine schedules stay at ``r * lr``. The warm-up
starts at 0 (as in Loshchilov & Hutter, "SGDR", 2017 and most LM trainers), so
the update at step 0 of a warmed-up run is zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import optax

from jaxrl_llm import optim_spam

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "spam", "stable_spam")

# Substrings that, anywhere in a parameter's path, exclude it from weight
# decay. Decaying normalisation gains pulls them towards 0 (not towards their
# identity value 1) and decaying biases only removes capacity.
NO_DECAY_NAMES = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + schedule + gradient clipping settings.

  Attributes:
    learning_rate: peak learning rate reached after warm-up.
    schedule: one of ``SCHEDULES`` ("constant", "cosine", "linear").
    warmup_steps: linear warm-up length from 0 to ``learning_rate``.
    total_steps: optimizer steps of the run; the decaying schedules reach
      ``end_lr_ratio * learning_rate`` here. Required (> warmup_steps) for
      "cosine" and "linear"; unused by "constant".
    end_lr_ratio: final learning rate as a fraction of the peak, in [0, 1].
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam denominator epsilon.
    weight_decay: decoupled weight decay (AdamW), applied to the parameters
      selected by ``decay_mask``.
    grad_clip_norm: clip gradients to this global L2 norm; 0 or None turns
      clipping off.
    optimizer: one of ``OPTIMIZERS``: "adamw", "spam" (Huang et al., ICLR
      2025) or "stable_spam" (Huang et al., 2025); see `optim_spam`.
    momentum_reset_interval: SPAM / Stable-SPAM: zero Adam's moments after
      every this many updates (dT; papers: 500 for SPAM, 1000 for
      Stable-SPAM); 0 never resets. Unused by "adamw".
    spike_threshold: SPAM: clip entries with g^2 > spike_threshold * v to
      sign(g) * sqrt(spike_threshold * v) (theta; paper 5000); 0 turns it off.
    spike_clip_delay: SPAM: clipping starts this many updates after each reset
      (v is near 0 then; reference code 20). Must be >= 1.
    reset_warmup_steps: SPAM: cosine warm-up of the update after each reset
      (N; paper 150); 0 turns it off.
    norm_gamma1: Stable-SPAM AdaGN decay of the EMA of ||g|| (paper 0.7).
    norm_gamma2: Stable-SPAM AdaGN decay of the EMA of ||g||^2 (paper 0.9).
    clip_gamma3: Stable-SPAM AdaClip decay of the EMA of max |g| (paper 0.999).
  """

  learning_rate: float = 1e-6
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 0
  end_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip_norm: float | None = 1.0
  optimizer: str = "adamw"
  momentum_reset_interval: int = 500
  spike_threshold: float = 5000.0
  spike_clip_delay: int = 20
  reset_warmup_steps: int = 150
  norm_gamma1: float = 0.7
  norm_gamma2: float = 0.9
  clip_gamma3: float = 0.999

  def __post_init__(self):
    for name in ("learning_rate", "end_lr_ratio", "b1", "b2", "eps", "weight_decay",
                 "grad_clip_norm"):
      value = getattr(self, name)
      if value is None and name == "grad_clip_norm":
        continue
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value)):
        raise ValueError(
            f"OptimConfig.{name}={value!r} must be a finite number (a NaN or Inf "
            "hyper-parameter makes every update non-finite).")
    if self.schedule not in SCHEDULES:
      raise ValueError(
          f"OptimConfig.schedule={self.schedule!r} is not valid; choose one "
          f"of {SCHEDULES}.")
    if not self.learning_rate > 0:
      raise ValueError(
          f"OptimConfig.learning_rate={self.learning_rate!r} must be > 0.")
    if self.warmup_steps < 0:
      raise ValueError(
          f"OptimConfig.warmup_steps={self.warmup_steps!r} must be >= 0.")
    if self.total_steps < 0:
      raise ValueError(
          f"OptimConfig.total_steps={self.total_steps!r} must be >= 0.")
    if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
      raise ValueError(
          f"OptimConfig.total_steps={self.total_steps!r} must be greater than "
          f"warmup_steps={self.warmup_steps!r} for schedule="
          f"{self.schedule!r}.")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      raise ValueError(
          f"OptimConfig.end_lr_ratio={self.end_lr_ratio!r} must be in "
          "[0, 1].")
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"OptimConfig.{name}={value!r} must be in [0, 1).")
    if not self.eps > 0:
      raise ValueError(f"OptimConfig.eps={self.eps!r} must be > 0.")
    if self.weight_decay < 0:
      raise ValueError(
          f"OptimConfig.weight_decay={self.weight_decay!r} must be >= 0.")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"OptimConfig.optimizer={self.optimizer!r} is not valid; choose one of "
          f"{OPTIMIZERS}.")
    for name in ("momentum_reset_interval", "reset_warmup_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"OptimConfig.{name}={value!r} must be an int >= 0 (0 turns it off).")
    if (isinstance(self.spike_clip_delay, bool) or not isinstance(self.spike_clip_delay, int)
        or self.spike_clip_delay < 1):
      raise ValueError(
          f"OptimConfig.spike_clip_delay={self.spike_clip_delay!r} must be an int >= 1: "
          "right after a momentum reset v = 0 and clipping would zero every entry.")
    if not (math.isfinite(self.spike_threshold) and self.spike_threshold >= 0):
      raise ValueError(
          f"OptimConfig.spike_threshold={self.spike_threshold!r} must be >= 0 "
          "(0 turns spike-aware clipping off).")
    for name in ("norm_gamma1", "norm_gamma2", "clip_gamma3"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"OptimConfig.{name}={value!r} must be in [0, 1).")
    if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
      raise ValueError(
          f"OptimConfig.grad_clip_norm={self.grad_clip_norm!r} must be >= 0 "
          "(0 or None turns clipping off).")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Returns the learning rate as a function of the optimizer step.

  See the module docstring for the formulas. The returned function is pure
  and jit-friendly, so steps can also log ``schedule(opt_step)``.
  """
  peak = cfg.learning_rate
  end = cfg.end_lr_ratio * peak
  warmup = cfg.warmup_steps
  if cfg.schedule == "cosine":
    # optax's decay_steps counts the warm-up too.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=cfg.total_steps, end_value=end)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, cfg.total_steps - warmup)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _key_name(entry: Any) -> str:
  """The name of one path entry (dict key, attribute or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def decay_mask(params: Any,
               no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> Any:
  """Which parameters receive weight decay (True) and which do not (False).

  A parameter is excluded when any key on its path contains one of
  ``no_decay_names`` (case-insensitive; by default "norm" and "bias"), or
  when it has at most one dimension.

  The name is the rule that matters: the decoder stacks its layers, so a
  per-layer norm gain has shape [L, D] and a bias [L, F]; their rank alone
  does not reveal them. Models must therefore keep "norm" / "bias" in the
  names of such parameters (e.g. ``{"layers": {"attn_norm": ...}}``). The rank
  rule catches unstacked scalars and vectors with other names.

  Args:
    params: nested dicts (or any pytree) of arrays or ``jax.ShapeDtypeStruct``.
    no_decay_names: substrings that exclude a parameter.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  lowered = tuple(n.lower() for n in no_decay_names)

  def decide(path, leaf) -> bool:
    names = [_key_name(entry).lower() for entry in path]
    if any(bad in name for name in names for bad in lowered):
      return False
    return len(getattr(leaf, "shape", ())) > 1

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with the config's schedule, decay mask and global-norm clipping.

  Clipping runs first, on the raw gradients, so ``grad_clip_norm`` bounds the
  global norm of what Adam sees.
  """
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.optimizer == "adamw":
    parts.append(
        optax.adamw(
            learning_rate=make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
  if cfg.optimizer == "spam":
    parts.append(optim_spam.scale_by_spam(
        cfg.b1, cfg.b2, cfg.eps, spike_threshold=cfg.spike_threshold,
        reset_interval=cfg.momentum_reset_interval,
        reset_warmup_steps=cfg.reset_warmup_steps, clip_delay=cfg.spike_clip_delay))
  else:
    parts.append(optim_spam.scale_by_stable_spam(
        cfg.b1, cfg.b2, cfg.eps, gamma1=cfg.norm_gamma1, gamma2=cfg.norm_gamma2,
        gamma3=cfg.clip_gamma3, reset_interval=cfg.momentum_reset_interval))
  # AdamW's own order: direction, + decoupled decay, * -lr.
  parts.append(optax.add_decayed_weights(cfg.weight_decay, decay_mask))
  parts.append(optax.scale_by_learning_rate(make_schedule(cfg)))
  return optax.chain(*parts)
