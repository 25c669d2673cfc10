"""Preference optimisation: DPO-family losses and step, KTO, reward models, online alignment."""

from jaxrl_llm.preference import losses, online, reward_model, rm_losses, step
from jaxrl_llm.preference.online import OnlineDPOConfig, OnlineDPOStep, iterative_dpo
from jaxrl_llm.preference.reward_model import RewardModelStep, reward_model_fn
from jaxrl_llm.preference.step import PreferenceConfig, PreferenceStep, jit_preference_step

__all__ = [
    "losses", "online", "reward_model", "rm_losses", "step",
    "OnlineDPOConfig", "OnlineDPOStep", "iterative_dpo",
    "RewardModelStep", "reward_model_fn",
    "PreferenceConfig", "PreferenceStep", "jit_preference_step",
]
