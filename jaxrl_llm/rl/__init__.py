"""RL post-training: advantage estimators and policy losses, and their registries."""

from jaxrl_llm.rl import advantages, policy_losses
from jaxrl_llm.rl.advantages import (
    register_advantage_estimator,
    unregister_advantage_estimator,
)
from jaxrl_llm.rl.policy_losses import register_policy_loss, unregister_policy_loss

__all__ = [
    "advantages",
    "policy_losses",
    "register_advantage_estimator",
    "register_policy_loss",
    "unregister_advantage_estimator",
    "unregister_policy_loss",
]
