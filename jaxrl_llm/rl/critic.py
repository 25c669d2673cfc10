"""The learned critic of PPO: value model, token rewards, clipped value loss.

Two kinds of critic, chosen by `CriticConfig.init`:

  "policy" / "hf"  a separate value model: a decoder of the same families
                   (Llama / Qwen2 / Qwen3) with a scalar head,
                   params {"trunk": decoder params, "head": {"w": [D], "b": []}}.
                   "policy" copies the (SFT-warm-started) policy's weights,
                   "hf" loads a Hugging Face checkpoint (`CriticConfig.hf_path`).
                   Under LoRA (model.lora), "policy" is a value model with its
                   own adapters, params {"adapters": A/B leaves, "head": ...}:
                   the trunk is the policy's frozen base (shared, never copied,
                   read under stop_gradient) with the critic's adapters in place
                   of the policy's. They start as a copy of the policy's, so the
                   value model starts as the policy's trunk; the critic
                   optimizer trains the adapters and the head only.
  "value_head"     a scalar head on the policy's own trunk, params {"head": ...}.
                   The head reads stop_gradient(policy hidden states): the value
                   loss trains the head only, the trunk is trained by the policy
                   loss alone (one optimizer per loss, no loss-mixing weight).

Values. With prompt x and completion y (P prompt tokens, left-padded;
completion left-aligned), the state before token y_t is (x, y_<t), whose
final-norm hidden state sits at position P − 1 + t; its value is

  V_t = h_{P−1+t} · w + b      (float32; the head starts at zero: V ≡ 0).

Token rewards (`token_rewards`): the outcome reward R at the last completion
token, optionally a per-token KL penalty, r_t = −β·KL_t + R·[t = last]. The
advantages and the value targets come from `advantages.gae` over the
completion mask: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, and the
targets are the λ-returns R_t = A_t + V_t.

Clipped value loss (`value_loss`, PPO2), with V_old the values at the rollout:

  V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
  ℓ_t = ½ · max((V − R_t)², (V_clip − R_t)²)          (ε_v = 0: ½(V − R_t)²)

Explained variance (`explained_variance`): 1 − Var(R − V) / Var(R) over the
masked tokens (1: perfect, 0: no better than a constant, < 0: worse).

Shape letters: B rows, P prompt length, L completion length, T = P + L, D
hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxrl_llm import config_checks, lora, optim, sharding, tree_paths
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig

CRITIC_INITS = ("policy", "hf", "value_head")
HEAD_AXES = {"w": ("embed",), "b": ()}


@dataclasses.dataclass(frozen=True)
class CriticConfig:
  """The critic of PPO (`rl.advantage = "gae"`); formulas in the module docstring.

  Attributes:
    init: "policy" (a value model copied from the policy), "hf" (a value
      model loaded from `hf_path`) or "value_head" (a head on the policy trunk).
    hf_path: a local HF checkpoint directory (config.json + safetensors) for
      init="hf"; its vocabulary must cover the policy's tokenizer.
    learning_rate: the critic optimizer's peak learning rate (AdamW with the
      run's other `optim` settings: schedule, warm-up, clipping, decay).
    warmup_steps: RL steps at the start that update the critic only; the
      policy (and its optimizer state) stays as it is meanwhile.
    gamma: γ, the discount of the token rewards.
    lam: λ of the critic's GAE: the value targets R_t = A_t + V_t.
    actor_lam: λ of the policy's advantages when it differs from `lam`
      (decoupled GAE as VC-PPO / VAPO use: λ_critic = 1, λ_actor = 0.95);
      None takes `lam`.
    value_clip: ε_v of the clipped value loss; 0 turns clipping off.
    whiten_advantages: normalise the policy advantages to mean 0, std 1 over
      the trained tokens of the step.
  """
  init: str = "policy"
  hf_path: str = ""
  learning_rate: float = 1e-5
  warmup_steps: int = 0
  gamma: float = 1.0
  lam: float = 0.95
  actor_lam: Optional[float] = None
  value_clip: float = 0.2
  whiten_advantages: bool = True

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"rl.critic.{field}={getattr(self, field)!r}: {msg}")
    check(self.init in CRITIC_INITS, "init", f"choose one of {CRITIC_INITS}")
    if self.init == "hf":
      check(bool(self.hf_path), "hf_path", "init='hf' needs a local HF checkpoint directory "
            "(config.json + *.safetensors)")
      check("://" not in self.hf_path, "hf_path", "HF checkpoints are read from local disk; "
            "copy it first and pass the local directory")
    else:
      check(not self.hf_path, "hf_path", f"is only read with init='hf' (init={self.init!r}); "
            "clear it or set init='hf'")
    for name in ("learning_rate", "gamma", "lam", "value_clip"):
      value = getattr(self, name)
      check(isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value), name, "must be a finite number")
    check(self.learning_rate > 0, "learning_rate", "must be > 0")
    check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
          "must be an int >= 0 (critic-only RL steps at the start)")
    check(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
    check(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
    if self.actor_lam is not None:
      check(isinstance(self.actor_lam, (int, float)) and 0.0 <= self.actor_lam <= 1.0,
            "actor_lam", "must be in [0, 1], or None to use lam")
    check(self.value_clip >= 0, "value_clip", "must be >= 0 (0 turns value clipping off)")
    check(isinstance(self.whiten_advantages, bool), "whiten_advantages", "must be True or False")

  @property
  def value_head(self) -> bool:
    return self.init == "value_head"

  @property
  def policy_lam(self) -> float:
    return self.lam if self.actor_lam is None else self.actor_lam


# ---------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------
def init_head(cfg: ModelConfig) -> dict[str, jax.Array]:
  """A zero scalar head (every value starts at 0), float32."""
  return {"w": jnp.zeros((cfg.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def init_critic_params(cfg: ModelConfig, trunk_params=None, adapters=None) -> dict[str, Any]:
  """Critic params: {"trunk", "head"} of a value model, {"adapters", "head"} of a value
  model on the policy's frozen LoRA base, or {"head"} alone (a value head on the policy
  trunk)."""
  params = {"head": init_head(cfg)}
  if trunk_params is not None:
    params["trunk"] = trunk_params
  if adapters is not None:
    params["adapters"] = adapters
  return params


def critic_kind(critic_params) -> str:
  """"trunk" (a value model), "adapters" (LoRA value model) or "head" (value head)."""
  return next((k for k in ("trunk", "adapters") if k in critic_params), "head")


def _adapter_table(cfg: ModelConfig) -> dict[str, tuple]:
  """(shape, logical axes) of the trainable adapters A and B of `cfg.lora`."""
  if cfg.lora is None:
    raise ValueError("a critic with LoRA adapters needs a policy config with model.lora set")
  return {k: v for k, v in lora.adapter_table(decoder.param_table(cfg), cfg.lora).items()
          if k.endswith((lora.A_SUFFIX, lora.B_SUFFIX))}


def critic_logical_axes(cfg: ModelConfig, kind: str) -> dict[str, Any]:
  axes = {"head": dict(HEAD_AXES)}
  if kind == "trunk":
    axes["trunk"] = decoder.param_logical_axes(cfg)
  elif kind == "adapters":
    axes["adapters"] = tree_paths.unflatten({k: a for k, (_, a) in _adapter_table(cfg).items()})
  return axes


def critic_shapes(cfg: ModelConfig, kind: str) -> dict[str, Any]:
  shapes = {"head": jax.eval_shape(lambda: init_head(cfg))}
  if kind == "trunk":
    shapes["trunk"] = decoder.param_shapes(cfg)
  elif kind == "adapters":
    shapes["adapters"] = tree_paths.unflatten({k: jax.ShapeDtypeStruct(s, cfg.weights_dtype)
                                               for k, (s, _) in _adapter_table(cfg).items()})
  return shapes


def critic_shardings(cfg: ModelConfig, mesh: Mesh, kind: str,
                     rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
  """NamedShardings of the critic params: the trunk and adapters as the policy's, the head
  by `embed` (`kind`: see `critic_kind`)."""
  return sharding.tree_shardings(mesh, rules, critic_logical_axes(cfg, kind),
                                 critic_shapes(cfg, kind))


def critic_state_shardings(abstract_critic, cfg: ModelConfig, mesh: Mesh,
                           rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
  """Shardings of a critic state {"params", "opt_state"}: moments follow the params."""
  p_sh = critic_shardings(cfg, mesh, critic_kind(abstract_critic["params"]), rules)
  rep = sharding.replicated(mesh)
  params_struct = jax.tree.structure(abstract_critic["params"])

  def is_params(node):
    return jax.tree.structure(node) == params_struct

  opt_sh = jax.tree.map(lambda node: p_sh if is_params(node) else rep,
                        abstract_critic["opt_state"], is_leaf=is_params)
  return {"params": p_sh, "opt_state": opt_sh}


def critic_optimizer(optim_cfg: optim.OptimConfig, critic: CriticConfig
                     ) -> optax.GradientTransformation:
  """The critic's AdamW: the run's `optim` settings at the critic's learning rate."""
  return optim.make_optimizer(dataclasses.replace(optim_cfg, learning_rate=critic.learning_rate))


def add_critic(state, shardings, critic_model: ModelConfig, tx: optax.GradientTransformation,
               mesh: Mesh, rules=sharding.DEFAULT_RULES, *, value_head: bool = False,
               trunk_params=None):
  """(state, shardings) with a critic {"params", "opt_state"} in `TrainState.critic`.

  The value model's trunk is `trunk_params` (e.g. loaded from HF) or, when
  None, a copy of the policy's params (`state.params`); a LoRA policy (its
  params carry adapters) gets a value model of its own adapters on the shared
  frozen base instead, starting as a copy of the policy's adapters; with
  `value_head` the critic is a head only. Created in its shards by one jit.
  """
  own_adapters = not value_head and trunk_params is None and lora.has_adapters(state.params)

  def init(policy_params, trunk):
    if own_adapters:
      params = init_critic_params(
          critic_model, adapters=jax.tree.map(jnp.copy, lora.adapter_params(policy_params)))
    else:
      if not value_head:
        trunk = jax.tree.map(jnp.copy, policy_params) if trunk is None else trunk
      params = init_critic_params(critic_model, None if value_head else trunk)
    return {"params": params, "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init, state.params, trunk_params)
  critic_sh = critic_state_shardings(abstract, critic_model, mesh, rules)
  critic = jax.jit(init, out_shardings=critic_sh)(state.params, trunk_params)
  return state.replace(critic=critic), shardings.replace(critic=critic_sh)


# ---------------------------------------------------------------------------
# Values, rewards, losses.
# ---------------------------------------------------------------------------
def token_values(critic_model: ModelConfig, critic_params, policy_params, rows) -> jax.Array:
  """V_t of every completion position, float32 [B, L] (module docstring).

  `rows` holds prompt_tokens, prompt_mask [B, P] and completion,
  completion_mask [B, L]. A value head reads stop_gradient(policy trunk); a LoRA
  value model reads stop_gradient(policy's frozen base) with its own adapters.
  """
  trunk = critic_params.get("trunk")
  if trunk is None:
    trunk = jax.lax.stop_gradient(policy_params)
    if "adapters" in critic_params:
      trunk = lora.with_adapters(trunk, critic_params["adapters"])
  P = rows["prompt_tokens"].shape[1]
  L = rows["completion"].shape[1]
  config_checks.require_positions(P + L, critic_model.max_position_embeddings,
                                  "the critic (value model)")
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["completion"]], axis=1)
  segments = jnp.concatenate([(rows["prompt_mask"] != 0).astype(jnp.int32),
                              (rows["completion_mask"] != 0).astype(jnp.int32)], axis=1)
  h_BTD = decoder.hidden_states(critic_model, trunk, tokens.astype(jnp.int32),
                                segment_ids_BT=segments)
  h_BLD = h_BTD[:, P - 1:P + L - 1]
  head = critic_params["head"]
  return (jnp.einsum("BLD,D->BL", h_BLD.astype(jnp.float32), head["w"].astype(jnp.float32))
          + head["b"].astype(jnp.float32))


def last_token_onehot(mask_BL: jax.Array) -> jax.Array:
  """1.0 at the last unmasked position of each row (all 0 for a row with none)."""
  m_BL = (mask_BL != 0)
  L = m_BL.shape[1]
  pos_L = jnp.arange(L)
  last_B = jnp.max(jnp.where(m_BL, pos_L[None, :], -1), axis=1)
  return (pos_L[None, :] == last_B[:, None]).astype(jnp.float32)


def token_rewards(rewards_B: jax.Array, mask_BL: jax.Array, kl_BL: Optional[jax.Array] = None,
                  kl_coef: float = 0.0) -> jax.Array:
  """r_t = −β·KL_t + R·[t = last completion token], 0 where masked; float32 [B, L]."""
  m_BL = (mask_BL != 0).astype(jnp.float32)
  r_BL = jnp.asarray(rewards_B, jnp.float32)[:, None] * last_token_onehot(mask_BL)
  if kl_BL is not None and kl_coef:
    r_BL = r_BL - kl_coef * jnp.asarray(kl_BL, jnp.float32) * m_BL
  return r_BL * m_BL


def value_loss(values_BL: jax.Array, old_values_BL: jax.Array, returns_BL: jax.Array,
               clip: float) -> tuple[jax.Array, jax.Array]:
  """Per-token clipped value loss and where the clipped term is the larger one.

  Returns (loss_BL, clipped_BL) unmasked: ℓ_t = ½·max((V − R)², (V_clip − R)²)
  with V_clip = V_old + clip(V − V_old, −ε_v, ε_v); clipped_BL is 1.0 where
  the clip bounds the update: |V − V_old| > ε_v and (V_clip − R)² > (V − R)².
  (Inside the range V_clip equals V up to rounding, which must not count.)
  clip = 0: no clipping.
  """
  v = values_BL.astype(jnp.float32)
  ret = jax.lax.stop_gradient(returns_BL.astype(jnp.float32))
  err_BL = jnp.square(v - ret)
  if not clip:
    return 0.5 * err_BL, jnp.zeros_like(err_BL)
  old = jax.lax.stop_gradient(old_values_BL.astype(jnp.float32))
  v_clip = old + jnp.clip(v - old, -clip, clip)
  err_clip_BL = jnp.square(v_clip - ret)
  clipped_BL = (jnp.abs(v - old) > clip) & (err_clip_BL > err_BL)
  return 0.5 * jnp.maximum(err_BL, err_clip_BL), clipped_BL.astype(jnp.float32)


def masked_mean_var(x_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and (population) variance of x over the unmasked positions (0, 0 if none)."""
  m = (mask_BL != 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x_BL * m) / n
  return mean, jnp.sum(jnp.square(x_BL - mean) * m) / n


def explained_variance(values_BL: jax.Array, returns_BL: jax.Array,
                       mask_BL: jax.Array) -> jax.Array:
  """1 − Var(R − V) / Var(R) over the masked tokens; 0 when Var(R) = 0 (nothing to explain)."""
  _, var_ret = masked_mean_var(returns_BL, mask_BL)
  _, var_err = masked_mean_var(returns_BL - values_BL, mask_BL)
  return jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)


def whiten(x_BL: jax.Array, mask_BL: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x − mean) / (std + eps) over the unmasked positions; masked positions are 0."""
  mean, var = masked_mean_var(x_BL, mask_BL)
  return jnp.where(mask_BL != 0, (x_BL - mean) / (jnp.sqrt(var) + eps), 0.0)


def hf_value_model_config(path: str, *, dtype: str, param_dtype: str, remat: str,
                          attention_impl: str) -> ModelConfig:
  """The decoder config of a local HF checkpoint (its config.json) with the run's numerics.

  A damaged config.json raises a ValueError naming the file.
  """
  from pathlib import Path

  from jaxrl_llm.models import hf
  config_file = Path(path) / hf.CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"rl.critic.hf_path={path!r} has no config.json: point it at a "
                            "local HF checkpoint directory (config.json + *.safetensors)")
  return hf.config_from_hf(hf._read_json(config_file)).replace(
      dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)


def value_model_config(critic: CriticConfig, policy: ModelConfig) -> ModelConfig:
  """The config the critic runs: the HF value model's for init="hf", else the policy's
  (a copy of the policy, or the trunk a value head reads). Used by the memory planner."""
  if critic.init != "hf":
    return policy
  return hf_value_model_config(critic.hf_path, dtype=policy.dtype,
                               param_dtype=policy.param_dtype, remat=policy.remat,
                               attention_impl=policy.attention_impl)


def load_hf_value_model(path: str, *, dtype: str, param_dtype: str, remat: str,
                        attention_impl: str, vocab_size: int, mesh: Mesh,
                        rules=sharding.DEFAULT_RULES, run_config=None
                        ) -> tuple[ModelConfig, Any]:
  """(config, trunk params) of a value model read from a local HF checkpoint.

  The critic reads the policy's token ids, so its vocabulary must cover the
  policy tokenizer's `vocab_size`; it scores the run's rollouts, so with
  `run_config` (the run's `ExperimentConfig`) its max_position_embeddings
  must cover their prompt + generation length (`config.sequence_budgets`),
  checked before any weight is read. The params are placed in their shards.
  """
  from jaxrl_llm.models import hf
  from jaxrl_llm.train_state import param_shardings
  cfg = hf_value_model_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat,
                              attention_impl=attention_impl)
  if cfg.vocab_size < vocab_size:
    raise ValueError(f"rl.critic.hf_path={path!r} has a vocabulary of {cfg.vocab_size} tokens, "
                     f"fewer than the policy tokenizer's {vocab_size}: the critic reads the "
                     "policy's token ids, so it needs a checkpoint of the same tokenizer")
  if run_config is not None:
    config_checks.check_secondary_model_lengths(
        run_config, cfg.max_position_embeddings, f"the critic rl.critic.hf_path={path!r}")
  _, params = hf.load_hf(path, dtype=dtype, param_dtype=param_dtype,
                         shardings=param_shardings(cfg, mesh, rules))
  return cfg, params
