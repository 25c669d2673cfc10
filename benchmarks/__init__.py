"""GPU benchmarks of jaxrl_llm and its peers (see BENCHMARKS.md)."""
