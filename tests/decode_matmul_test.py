"""The Pallas decode matmul (jaxrl_llm/decode_matmul.py), through the Pallas
interpreter: the product against float64, its tile choices, and a model whose
decode steps use it sampling what XLA's products sample."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import decode_matmul as dm
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.sampling import sample
from jaxrl_llm.testing import tiny_config, tiny_params, toy_prompt_batch


@pytest.mark.parametrize("M,K,N,block_n,block_k,splits", [
    (64, 256, 96, 32, 64, 4),    # split-K: four partial sums
    (5, 128, 64, 16, 128, 1),    # M padded to 16
    (20, 384, 32, 32, 128, 3),   # M padded to 32, three splits
])
def test_product_matches_float64(M, K, N, block_n, block_k, splits):
  kx, kw = jax.random.split(jax.random.key(M * K + N))
  x = jax.random.normal(kx, (M, K), jnp.bfloat16)
  w = jax.random.normal(kw, (K, N), jnp.bfloat16)
  y = dm.decode_matmul(x, w, block_n=block_n, block_k=block_k, splits=splits, interpret=True)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert y.shape == (M, N) and y.dtype == jnp.bfloat16
  err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 5e-3  # bf16 rounding of the output; a missed K chunk would be ~0.3


def test_bad_shapes_name_the_constraint():
  x = jnp.ones((4, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_k"):
    dm.decode_matmul(x, jnp.ones((96, 64), jnp.bfloat16), block_k=64, interpret=True)
  with pytest.raises(ValueError, match=r"x is \[4, 96\] but w is \[64, 32\]"):
    dm.decode_matmul(x, jnp.ones((64, 32), jnp.bfloat16), interpret=True)


@pytest.mark.parametrize("K,N", [(896, 4864), (4864, 896), (896, 896), (896, 128), (32, 48)])
def test_tile_config_divides_the_product_and_fills_the_chip(K, N):
  c = dm.tile_config(K, N)
  chunks = K // c["block_k"]
  assert N % c["block_n"] == 0 and K % c["block_k"] == 0 and chunks % c["splits"] == 0
  programs = (N // c["block_n"]) * c["splits"]
  assert programs >= 132 or c["splits"] == chunks  # one full wave, or as split as it gets
  if c["splits"] > 1:  # and the fewest splits that fill it
    assert (N // c["block_n"]) * max(s for s in range(1, c["splits"]) if chunks % s == 0) < 132


@pytest.mark.parametrize("B,kernel", [(64, True), (128, True), (129, False), (512, False)])
def test_project_uses_the_kernel_up_to_max_rows(B, kernel):
  x = jnp.ones((B, 1, 64), jnp.bfloat16)
  w = jnp.ones((64, 4, 8), jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(lambda x, w: dm.project("BTD,DNH->BTNH", x, w, interpret=True))(x, w))
  assert ("pallas_call" in jaxpr) == kernel
  y = dm.project("BTD,DNH->BTNH", x, w, interpret=True)
  np.testing.assert_array_equal(np.asarray(y, np.float32), 64.0)
  assert y.shape == (B, 1, 4, 8)


def test_unknown_decode_matmul_is_refused():
  with pytest.raises(ValueError, match="decode_matmul='triton'; choose one of"):
    tiny_config(decode_matmul="triton")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_with_the_kernel_samples_what_xla_samples(family):
  cfg = tiny_config(family)
  assert isinstance(cfg, ModelConfig)
  params = tiny_params(cfg)
  batch = toy_prompt_batch(6, 8, cfg.vocab_size)
  prompt, mask = jnp.asarray(batch["prompt_tokens"]), jnp.asarray(batch["prompt_mask"])
  outs = [sample(c, params, prompt, mask, jax.random.key(3), max_new_tokens=6)
          for c in (cfg, dataclasses.replace(cfg, decode_matmul="pallas_interpret"))]
  np.testing.assert_array_equal(outs[0].tokens_BL, outs[1].tokens_BL)
  np.testing.assert_allclose(outs[0].logprobs_BL, outs[1].logprobs_BL, atol=1e-4)


def test_a_run_on_several_devices_refuses_the_one_device_kernel(monkeypatch):
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import trainer
  cfg = config_lib.from_configdict(config_lib.default_configdict())
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, decode_matmul="pallas"))
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  with pytest.raises(ValueError, match="decode_matmul='pallas' runs its kernel on one device, "
                     "but this run has 8"):
    trainer.model_config(cfg, tokenizer=None)
