"""SPAM and Stable-SPAM: spike-aware Adam variants as optax transformations.

Both return the Adam *direction* (no learning rate, no weight decay);
`jaxrl_llm.optim.make_optimizer` chains them with decoupled weight decay and
the learning-rate schedule, exactly where `scale_by_adam` sits in AdamW.

Notation: ``g`` the incoming gradient of one parameter tensor, ``t`` the
0-based index of the current update, ``dT`` the momentum-reset interval,
``k = t mod dT`` the updates since the last reset (``k = t`` when ``dT = 0``).
A momentum reset zeroes Adam's moments ``m, v`` before the update of every
step with ``t > 0`` and ``k = 0``, i.e. after every ``dT`` updates.

SPAM (Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable
LLM Training", ICLR 2025, arXiv:2501.06842), per coordinate:

  spike-aware clipping (active once k >= clip_delay; v is the moment *before*
  this update, so a freshly reset v = 0 never clips):
    g <- sign(g) * sqrt(theta * v)        where g^2 > theta * v
  m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
  m_hat = m / (1 - b1^(t+1)),  v_hat = v / (1 - b2^(t+1))
  u = s_k * m_hat / (sqrt(v_hat) + eps)

  ``s_k`` is the cosine warm-up that follows each reset (none before the
  first reset): ``s_k = 1 - 0.99 * (1 + cos(pi * k / (N + 1))) / 2`` for
  ``k < N`` and 1 after, so the update restarts at 1% of its size and is back
  to full size after ``N`` steps. The bias correction counts all updates, as
  in the paper's reference code. Paper defaults: theta = 5000, dT = 500,
  N = 150; the reference code delays clipping 20 steps after each reset.
  (The paper's optional sparse momentum, a random subset of moments kept, is
  not implemented: momentum here is dense.)

Stable-SPAM (Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably
than 16-Bit Adam", 2025, arXiv:2502.17055), per parameter tensor, ``tau =
t + 1``:

  AdaClip (adaptive spike-aware clipping, threshold = EMA of the max entry):
    g_max = max_i |g_i|
    T <- g3 T + (1 - g3) g_max,   T_hat = T / (1 - g3^tau)
    g_i <- g_i / g_max * T_hat    where |g_i| > T_hat
  AdaGN (adaptive gradient-norm scaling, from the history of ||g||):
    n = ||g||_2
    mu <- g1 mu + (1 - g1) n,     nu <- g2 nu + (1 - g2) n^2
    g <- g / n * mu_hat / (sqrt(nu_hat) + eps)   (bias-corrected with tau)
  MoRet (momentum reset every dT updates), then Adam:
    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    u = (m / (1 - b1^j)) / (sqrt(v / (1 - b2^j)) + eps)

  where ``j = k + 1`` counts the updates since the last reset (the reference
  code restarts Adam's bias correction at a reset; Stable-SPAM has no
  post-reset warm-up). Paper defaults: g1 = 0.7, g2 = 0.9, g3 = 0.999,
  dT = 1000. The rescaled gradient has norm mu_hat / sqrt(nu_hat) <= 1 (a mean
  is at most the root mean square), so a spike of any size enters Adam with a
  bounded norm, and it lowers that ratio for the following steps.

The per-tensor statistics of Stable-SPAM (T, mu, nu) are stored as one
float32 vector over the parameter leaves (shape [num_leaves]), so the train
state's sharding rule (param-shaped subtrees follow the params, everything
else replicated) applies unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# The reference code's post-reset warm-up starts from 1 - 0.99 = 1% of the step.
_WARMUP_FLOOR = 0.99


class SpamState(NamedTuple):
  count: jax.Array  # int32 scalar: updates done so far (t of the next update)
  mu: Any           # first moment, like params
  nu: Any           # second moment, like params


class StableSpamState(NamedTuple):
  count: jax.Array       # int32 scalar: updates done so far
  mu: Any                # Adam first moment, like params
  nu: Any                # Adam second moment, like params
  max_ema_L: jax.Array   # AdaClip threshold EMA T per parameter leaf
  norm_mean_L: jax.Array  # AdaGN EMA of ||g|| per leaf
  norm_sq_L: jax.Array   # AdaGN EMA of ||g||^2 per leaf


def steps_since_reset(count: jax.Array, reset_interval: int) -> jax.Array:
  """k = t mod dT (t itself when the interval is 0, i.e. never reset)."""
  if reset_interval <= 0:
    return count
  return count % reset_interval


def is_reset_step(count: jax.Array, reset_interval: int) -> jax.Array:
  """True on the updates whose moments are zeroed first: t > 0 and t mod dT = 0."""
  if reset_interval <= 0:
    return jnp.zeros((), bool)
  return (count > 0) & (count % reset_interval == 0)


def reset_warmup_scale(count: jax.Array, reset_interval: int,
                       warmup_steps: int) -> jax.Array:
  """SPAM's post-reset cosine warm-up factor s_k (1 before the first reset)."""
  if reset_interval <= 0 or warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  k = steps_since_reset(count, reset_interval).astype(jnp.float32)
  ramp = 1.0 - _WARMUP_FLOOR * (1.0 + jnp.cos(jnp.pi * k / (warmup_steps + 1))) / 2.0
  after_first_reset = count >= reset_interval
  return jnp.where(after_first_reset & (k < warmup_steps), ramp, 1.0)


def spike_clip(g: jax.Array, nu: jax.Array, threshold: float) -> jax.Array:
  """SPAM clipping: entries with g^2 > theta * v become sign(g) * sqrt(theta * v)."""
  bound = jnp.sqrt(threshold * nu)
  return jnp.where(jnp.square(g) > threshold * nu, jnp.sign(g) * bound, g)


def _zeros_like(params):
  """Moments in the parameters' dtype (as optax's Adam); maths runs in float32."""
  return jax.tree.map(jnp.zeros_like, params)


def _cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def scale_by_spam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                  spike_threshold: float = 5000.0, reset_interval: int = 500,
                  reset_warmup_steps: int = 150,
                  clip_delay: int = 20) -> optax.GradientTransformation:
  """SPAM's Adam direction (see the module docstring for the formulas).

  Args:
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    spike_threshold: theta; 0 turns spike-aware clipping off.
    reset_interval: dT, updates between momentum resets; 0 never resets.
    reset_warmup_steps: N, length of the cosine warm-up after each reset.
    clip_delay: clipping starts once k >= clip_delay (>= 1: a zeroed second
      moment would otherwise clip every entry to 0).
  """
  if clip_delay < 1:
    raise ValueError(f"clip_delay={clip_delay} must be >= 1 (v is 0 right after a reset).")

  def init_fn(params):
    return SpamState(count=jnp.zeros((), jnp.int32), mu=_zeros_like(params),
                     nu=_zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    t = state.count
    reset = is_reset_step(t, reset_interval)
    keep = jnp.where(reset, 0.0, 1.0)
    mu = jax.tree.map(lambda m: m.astype(jnp.float32) * keep, state.mu)
    nu = jax.tree.map(lambda v: v.astype(jnp.float32) * keep, state.nu)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
    if spike_threshold > 0:
      clip_on = steps_since_reset(t, reset_interval) >= clip_delay
      grads = jax.tree.map(
          lambda g, v: jnp.where(clip_on, spike_clip(g, v, spike_threshold), g), grads, nu)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), nu, grads)
    step = (t + 1).astype(jnp.float32)
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    scale = reset_warmup_scale(t, reset_interval, reset_warmup_steps)
    out = jax.tree.map(
        lambda m, v, u: (scale * (m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(u.dtype),
        mu, nu, updates)
    return out, SpamState(count=t + 1, mu=_cast_like(mu, state.mu), nu=_cast_like(nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


def ada_clip(g: jax.Array, threshold_hat: jax.Array, g_max: jax.Array) -> jax.Array:
  """AdaClip: entries with |g| > T_hat are rescaled to g / g_max * T_hat."""
  safe_max = jnp.where(g_max > 0, g_max, 1.0)
  return jnp.where(jnp.abs(g) > threshold_hat, g / safe_max * threshold_hat, g)


def scale_by_stable_spam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                         gamma1: float = 0.7, gamma2: float = 0.9, gamma3: float = 0.999,
                         reset_interval: int = 1000) -> optax.GradientTransformation:
  """Stable-SPAM's Adam direction: AdaClip, AdaGN, momentum reset, Adam.

  Args:
    b1, b2, eps: Adam's moment decays and epsilon (eps also guards AdaGN).
    gamma1, gamma2: AdaGN decays of the EMAs of ||g|| and ||g||^2.
    gamma3: AdaClip decay of the EMA of max |g|.
    reset_interval: dT, updates between momentum resets; 0 never resets.
  """

  def init_fn(params):
    num_leaves = len(jax.tree.leaves(params))
    zeros_L = jnp.zeros((num_leaves,), jnp.float32)
    return StableSpamState(count=jnp.zeros((), jnp.int32), mu=_zeros_like(params),
                           nu=_zeros_like(params), max_ema_L=zeros_L,
                           norm_mean_L=zeros_L, norm_sq_L=zeros_L)

  def update_fn(updates, state, params=None):
    del params
    t = state.count
    tau = (t + 1).astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(updates)
    grads = [g.astype(jnp.float32) for g in leaves]

    # AdaClip
    g_max_L = jnp.stack([jnp.max(jnp.abs(g)) for g in grads])
    max_ema_L = gamma3 * state.max_ema_L + (1 - gamma3) * g_max_L
    threshold_hat_L = max_ema_L / (1 - gamma3**tau)
    grads = [ada_clip(g, threshold_hat_L[i], g_max_L[i]) for i, g in enumerate(grads)]

    # AdaGN
    norm_L = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(g))) for g in grads])
    norm_mean_L = gamma1 * state.norm_mean_L + (1 - gamma1) * norm_L
    norm_sq_L = gamma2 * state.norm_sq_L + (1 - gamma2) * jnp.square(norm_L)
    target_L = (norm_mean_L / (1 - gamma1**tau)) / (
        jnp.sqrt(norm_sq_L / (1 - gamma2**tau)) + eps)
    factor_L = jnp.where(norm_L > 0, target_L / jnp.where(norm_L > 0, norm_L, 1.0), 1.0)
    grads = jax.tree.unflatten(treedef, [g * factor_L[i] for i, g in enumerate(grads)])

    # MoRet + Adam
    keep = jnp.where(is_reset_step(t, reset_interval), 0.0, 1.0)
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) * keep + (1 - b1) * g,
                      state.mu, grads)
    nu = jax.tree.map(
        lambda v, g: b2 * v.astype(jnp.float32) * keep + (1 - b2) * jnp.square(g),
        state.nu, grads)
    j = (steps_since_reset(t, reset_interval) + 1).astype(jnp.float32)
    bc1 = 1 - b1**j
    bc2 = 1 - b2**j
    out = jax.tree.map(
        lambda m, v, u: ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(u.dtype),
        mu, nu, updates)
    return out, StableSpamState(count=t + 1, mu=_cast_like(mu, state.mu),
                                nu=_cast_like(nu, state.nu), max_ema_L=max_ema_L,
                                norm_mean_L=norm_mean_L, norm_sq_L=norm_sq_L)

  return optax.GradientTransformation(init_fn, update_fn)
