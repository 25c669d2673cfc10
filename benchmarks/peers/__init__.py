"""Peer systems on the same workloads: TRL (PyTorch) and tunix (JAX)."""
