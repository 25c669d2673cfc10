"""Supervised fine-tuning: masked NLL on completion tokens of packed rows.

Batch (packed, see `jaxrl_llm.data.pipeline`): tokens [B, T], segment_ids
[B, T] (0 = padding), positions [B, T], loss_mask [B, T] (1 where token t is a
completion token; it is predicted from position t - 1).

  NLL = − Σ_{b,t} m_{b,t} log π(x_{b,t} | x_{b,<t}) / Σ m     (token mean)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm import sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.train_state import TrainState, accumulate_gradients, apply_update


def sft_loss(cfg: ModelConfig, params, batch, *, logprob_chunk: int = 512):
  """(Σ masked NLL, (Σ mask, metric sums)) of one (micro-)batch.

  A batch entry "lora_dropout_key" (per-row keys [B], added by `sft_step` when
  cfg.lora.dropout > 0) turns on the adapters' input dropout; the micro-batch
  uses its first row's key.
  """
  tokens, segments = batch["tokens"], batch["segment_ids"]
  keys = batch.get("lora_dropout_key")
  h = decoder.hidden_states(cfg, params, tokens, positions_BT=batch.get("positions"),
                            segment_ids_BT=segments,
                            lora_dropout_rng=None if keys is None else keys[0])
  logp_BT = decoder.token_logprobs(cfg, params, h[:, :-1], tokens[:, 1:],
                                   chunk_size=logprob_chunk)
  mask_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
  nll = -jnp.sum(logp_BT * mask_BT)
  denom = jnp.sum(mask_BT)
  return nll, (denom, {"loss/nll": nll, "train/tokens": denom})


def sft_step(state: TrainState, batch, rng, *, cfg: ModelConfig,
             tx: optax.GradientTransformation, microbatches: int = 1, mesh=None,
             rules=sharding.DEFAULT_RULES, skip_nonfinite: bool = True,
             logprob_chunk: int = 512) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of SFT (bind the keyword arguments with functools.partial).

  Deterministic unless cfg.lora.dropout > 0: then each step draws its adapter
  dropout masks from fold_in(rng, step).
  """
  if cfg.lora is not None and cfg.lora.dropout > 0:
    step_rng = jax.random.fold_in(rng, state.step)
    rows = batch["tokens"].shape[0]
    batch = dict(batch, lora_dropout_key=jax.random.split(step_rng, rows))
  with sharding.activation_rules(mesh, rules):
    loss_fn = functools.partial(sft_loss, cfg, logprob_chunk=logprob_chunk)
    grads, denom, sums = accumulate_gradients(loss_fn, state.params, batch, microbatches)
    new_state, metrics = apply_update(state, tx, grads, skip_nonfinite=skip_nonfinite)
  metrics["loss/nll"] = sums["loss/nll"] / jnp.maximum(denom, 1.0)
  metrics["train/tokens"] = sums["train/tokens"]
  return new_state.replace(step=state.step + 1), metrics
