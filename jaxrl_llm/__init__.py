"""jaxrl_llm: post-training language models with RL and preference optimization, in JAX."""
