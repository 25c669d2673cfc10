"""RL post-training: advantage estimators and policy losses."""

from jaxrl_llm.rl import advantages, policy_losses

__all__ = ["advantages", "policy_losses"]
