"""Data: synthetic verifiable tasks (more sources to come)."""

from jaxrl_llm.data import tasks  # noqa: F401  (re-exported)
