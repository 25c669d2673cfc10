"""The training forward of G completions of one prompt, with the prompt run once.

A GRPO group is G rows that repeat one prompt (a DPO pair: G = 2, chosen and
rejected). The per-row forward
(`decoder.hidden_states` on [prompt ; completion]) runs the prompt's P
tokens through every layer G times. Here each group is one packed row

    [prompt (P) ; completion 1 (L) ; ... ; completion G (L)]

so the projections, MLPs and norms see the prompt once: per group P + G·L
tokens instead of G·(P + L) (W1: 256 + 8 × 512 = 4,352 against 6,144, −29 %
of the layer FLOPs of every training and reference forward and backward).

Attention keeps each completion to its own prefix. Per layer:
  prompt queries      attend the prompt, causally        [R, P] x [R, P]
  completion queries  attend the group's prompt keys (copied to its G rows:
                      K/V only, a few bytes per token under GQA) and their
                      own completion, causally           [R·G, L] x [R·G, P + L]
The masks equal the per-row forward's on every real token (left-padded
prompt, completion padding after its end), so the hidden states of real
tokens, the log-probs and their gradients equal `decoder.hidden_states`'
(`tests/shared_prompt_test.py`); the prompt's gradient is the sum over its G
completions, which autodiff of the copy gives. (The method: Liu et al. 2025,
"Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward",
arXiv:2506.05433.)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from jaxrl_llm import sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.models.config import ModelConfig


def completion_hidden_states(cfg: ModelConfig, params, prompt_RP: jax.Array,
                             prompt_valid_RP: jax.Array, completion_RGL: jax.Array,
                             completion_valid_RGL: jax.Array, *,
                             lora_dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Hidden states h_BLD [R·G, L, D] that predict each completion token.

  Row r·G + g, position t is the state after the prompt and completion tokens
  < t of completion g of prompt r (t = 0: the prompt's last token), as
  `decoder.hidden_states(...)[:, P - 1:P + L - 1]` of the per-row layout.
  Prompts are left-padded (their last slot is a real token); completions are
  right-padded (`completion_valid_RGL`).
  """
  R, P = prompt_RP.shape
  _, G, L = completion_RGL.shape
  if completion_valid_RGL.shape != completion_RGL.shape or prompt_valid_RP.shape != (R, P):
    raise ValueError(f"shared_prompt: prompt {prompt_RP.shape} / mask {prompt_valid_RP.shape} "
                     f"and completions {completion_RGL.shape} / mask "
                     f"{completion_valid_RGL.shape} must be [R, P] and [R, G, L]")
  _warn_if_rows_do_not_split(R)
  pvalid_RP = prompt_valid_RP.astype(bool)
  cvalid_BL = completion_valid_RGL.astype(bool).reshape(R * G, L)
  tokens_RT = jnp.concatenate([prompt_RP, completion_RGL.reshape(R, G * L)], axis=1)

  prompt_pos_RP = decoder.positions_from_segments(pvalid_RP.astype(jnp.int32))
  prompt_len_R = jnp.sum(pvalid_RP, axis=1, dtype=jnp.int32)
  comp_pos_RGL = jnp.broadcast_to(prompt_len_R[:, None, None] + jnp.arange(L), (R, G, L))
  positions_RT = jnp.concatenate([prompt_pos_RP, comp_pos_RGL.reshape(R, G * L)], axis=1)

  causal_PP = jnp.tril(jnp.ones((P, P), bool))
  mask_RPP = causal_PP[None] & pvalid_RP[:, :, None] & pvalid_RP[:, None, :]
  causal_LL = jnp.tril(jnp.ones((L, L), bool))
  to_prompt_BLP = cvalid_BL[:, :, None] & jnp.repeat(pvalid_RP, G, axis=0)[:, None, :]
  to_self_BLL = causal_LL[None] & cvalid_BL[:, :, None] & cvalid_BL[:, None, :]
  mask_BLS = jnp.concatenate([to_prompt_BLP, to_self_BLL], axis=2)  # S = P + L keys

  def split(x_RTxH):
    """[R, P + G·L, heads, H] -> the prompt part [R, P, ...], the completions [R·G, L, ...]."""
    return x_RTxH[:, :P], x_RTxH[:, P:].reshape((R * G, L) + x_RTxH.shape[2:])

  def attend_fn(q, k, v):
    q_P, q_C = split(q)
    (k_P, k_C), (v_P, v_C) = split(k), split(v)
    out_P = decoder.attention(cfg, q_P, k_P, v_P, mask_RPP)
    k_S = jnp.concatenate([jnp.repeat(k_P, G, axis=0), k_C], axis=1)
    v_S = jnp.concatenate([jnp.repeat(v_P, G, axis=0), v_C], axis=1)
    out_C = decoder.attention(cfg, q_C, k_S, v_S, mask_BLS)
    return jnp.concatenate([out_P, out_C.reshape((R, G * L) + out_C.shape[2:])], axis=1), None

  h_RTD = decoder.layer_stack(cfg, params, tokens_RT, positions_RT, attend_fn,
                              lora_dropout_rng=lora_dropout_rng)
  D = h_RTD.shape[-1]
  last_prompt_RGD = jnp.broadcast_to(h_RTD[:, None, P - 1], (R, G, D))
  h_RGLD = h_RTD[:, P:].reshape(R, G, L, D)
  h_RGLD = jnp.concatenate([last_prompt_RGD[:, :, None], h_RGLD[:, :, :L - 1]], axis=2)
  return h_RGLD.reshape(R * G, L, D)


def _warn_if_rows_do_not_split(num_rows: int) -> None:
  """Under a mesh, R packed rows split over the batch axes only where R divides them."""
  active = sharding.active_mesh_rules()
  if active is None:
    return
  mesh, rules = active
  wanted = sharding.logical_to_spec(("act_batch",), rules, mesh)[0]
  if wanted is not None and sharding.logical_to_spec(("act_batch",), rules, mesh,
                                                      (num_rows,))[0] != wanted:
    logging.warning(
        "shared_prompt: %d groups per micro-batch do not split over the mesh's batch axes "
        "%s (%s): each of those devices computes all of them. Choose rl.microbatches so "
        "that the groups per micro-batch are a multiple of the batch shards.",
        num_rows, wanted, dict(mesh.shape))
