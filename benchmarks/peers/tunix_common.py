"""Shared pieces of the tunix (JAX) peer runs: model, tokenizer, mesh.

The model is tunix's own Qwen2 implementation (`tunix.models.qwen2`) with
the Qwen2.5-0.5B shape and random initialisation (nothing downloaded),
f32 parameters and bf16 compute as in jaxrl_llm's benchmarks. The tokenizer
is a word-level stand-in with the methods tunix's TokenizerAdapter accepts
(encode, decode, bos_id, eos_id, pad_id): token i is the word "t<i>".
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

SPECIALS = 4  # ids 0..3: pad, bos, eos, unk
SMOKE = dict(num_layers=2, vocab_size=512, embed_dim=64, hidden_dim=128, num_heads=4,
             head_dim=16, num_kv_heads=2, norm_eps=1e-6, rope_theta=1_000_000,
             use_tied_embedding=True)


class WordTokenizer:
  """"t<i>" words <-> ids; no BOS/EOS added by encode."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str, **kwargs) -> list[int]:
    return [int(w[1:]) if w.startswith("t") and w[1:].isdigit() else 3 for w in text.split()]

  def decode(self, ids, **kwargs) -> str:
    return " ".join(f"t{int(i)}" for i in ids)

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return 2

  def pad_id(self) -> int:
    return 0


def model_config(size: str, remat: str = "none"):
  import jax.numpy as jnp
  from tunix.models.qwen2 import model as qwen2

  if size == "smoke":
    cfg = qwen2.ModelConfig(**SMOKE)
  else:
    cfg = qwen2.ModelConfig.qwen2p5_0p5b()
  remat_cfg = {"none": qwen2.RematConfig.NONE, "block": qwen2.RematConfig.BLOCK,
               "decoder": qwen2.RematConfig.DECODER}[remat]
  return dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                             remat_config=remat_cfg)


def make_mesh():
  import jax
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1], axis_types=auto)


@contextlib.contextmanager
def mesh_context(mesh):
  """`with mesh:` (what tunix reads through thread_resources), else jax.set_mesh."""
  import jax
  try:
    ctx = mesh.__enter__()
  except Exception:  # the legacy context manager is gone in this jax
    with jax.set_mesh(mesh):
      yield mesh
    return
  try:
    yield ctx
  finally:
    mesh.__exit__(None, None, None)


def make_model(cfg, mesh, seed: int = 0):
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2

  with mesh_context(mesh):
    return qwen2.Qwen2(cfg, rngs=nnx.Rngs(seed))


def random_text(rng: np.random.Generator, n: int, vocab_size: int) -> str:
  return " ".join(f"t{i}" for i in rng.integers(SPECIALS, vocab_size, size=n))


def versions() -> dict:
  import importlib.metadata as md

  import jax
  out = {"jax": jax.__version__, "device_kind": jax.devices()[0].device_kind}
  for pkg in ("google-tunix", "flax", "optax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "?"
  return out


def peak_gib():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30
