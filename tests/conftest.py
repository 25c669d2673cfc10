"""Test setup: 8 fake CPU devices, float32 matmuls, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why this lives
in conftest.py (pytest imports it first).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
