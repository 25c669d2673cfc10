"""Preference optimisation: DPO-family losses, KTO, reward-model losses."""

from jaxrl_llm.preference import losses, rm_losses

__all__ = ["losses", "rm_losses"]
