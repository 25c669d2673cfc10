"""A matrix product for decode steps: few rows, a weight streamed once.

A decode step multiplies M = batch rows (one token each) by every weight
matrix of the model. At M = 64 a [K, N] bf16 weight needs 2·K·N bytes and
only 2·M·K·N FLOPs: 64 FLOP per byte, far under the ~295 FLOP/byte at which
an H100 turns compute-bound, so the product's floor is the weight's copy time.

`decode_matmul(x_MK, w_KN)` is a Pallas (Triton) kernel built for that case:

  y_MN = x_MK · w_KN,   computed as   y = Σ_s  x[:, K_s] · w[K_s, :]

The grid is (N / block_n, splits): program (n, s) streams the weight tile
w[K_s, n·block_n : (n+1)·block_n] in block_k-row chunks (a software-pipelined
loop, `num_stages` loads in flight) and accumulates in float32. Split-K
(`splits` > 1) gives the narrow-N, long-K products (the MLP's down
projection: N = d_model) enough programs to fill the chip; the `splits`
partial sums [splits, M, N] (float32, M·N·4·splits bytes, small next to the
weight) are added by XLA. M is padded to a power of two ≥ 16 for the
tensor-core dot.

`decode_matmul_ref` is the same product through `jnp.dot` (the reference
of `tests/decode_matmul_test.py`). `project` applies the kernel to one of the
model's projections (`ModelConfig.decode_matmul`), with a tile configuration
from `tile_config`, for products of at most `MAX_ROWS` rows; larger ones go to
XLA's GEMM. Above that the x tiles of the pipeline (num_stages · M · block_k ·
2 bytes, 557,056 bytes at M = 512 with 4 stages) outgrow the 227 KB of shared
memory of an H100, and at M = 512 the product has 512 FLOP per weight byte:
it is no longer a weight stream.

Timed on an H100 (BENCHMARKS.md, "The Pallas decode matmul and cascade
attention, timed"): alone, each product runs faster than XLA's GEMM of the
same shape (gate / up at M = 64: 8.6 against 11.7 µs). But in the model XLA
fuses q/k/v and gate/up into wider GEMMs, and the W3 step at batch 64 was 7.6 %
slower with this kernel. The model's default stays "xla".
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def decode_matmul_ref(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32).astype(x_MK.dtype)


MAX_ROWS = 128  # products with more rows (after padding) use XLA's GEMM in `project`


def _kernel(x_ref, w_ref, o_ref, *, block_n: int, block_k: int, steps: int):
  """o[s, :, n-tile] = Σ over this split's K chunks of x[:, chunk] · w[chunk, n-tile]."""
  n = pl.program_id(0)
  s = pl.program_id(1)
  cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
  M = x_ref.shape[0]

  def body(i, acc_MN):
    k0 = pl.multiple_of((s * steps + i) * block_k, block_k)
    x = x_ref[:, pl.ds(k0, block_k)]
    w = w_ref[pl.ds(k0, block_k), cols]
    return acc_MN + plgpu.dot(x, w)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((M, block_n), jnp.float32))
  o_ref[s, :, cols] = acc


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "interpret"))
def decode_matmul(x_MK: jax.Array, w_KN: jax.Array, *, block_n: int = 32, block_k: int = 128,
                  splits: int = 1, num_warps: int = 4, num_stages: int = 4,
                  interpret: bool = False) -> jax.Array:
  """x_MK · w_KN in x's dtype (float32 accumulation), for small M.

  Needs N % block_n == 0 and K % (block_k · splits) == 0; `interpret=True`
  runs the kernel through the Pallas interpreter (any backend, for tests).
  """
  M, K = x_MK.shape
  K2, N = w_KN.shape
  if K != K2:
    raise ValueError(f"decode_matmul: x is [{M}, {K}] but w is [{K2}, {N}]")
  if N % block_n or K % (block_k * splits):
    raise ValueError(f"decode_matmul: N={N} must be a multiple of block_n={block_n} and "
                     f"K={K} of block_k*splits={block_k * splits}")
  Mp = _pow2_at_least(M)
  x = jnp.pad(x_MK, ((0, Mp - M), (0, 0))) if Mp != M else x_MK
  steps = K // (block_k * splits)
  kernel = functools.partial(_kernel, block_n=block_n, block_k=block_k, steps=steps)
  partial_SMN = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits, Mp, N), jnp.float32),
      grid=(N // block_n, splits),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(x, w_KN)
  return partial_SMN.sum(axis=0)[:M].astype(x_MK.dtype)


def tile_config(K: int, N: int, num_sms: int = 132) -> dict:
  """A tile configuration for [M, K] x [K, N], M ≤ MAX_ROWS: block_k 128 (64 where K
  needs it), block_n 32 (16 where N needs it), and the fewest K splits that give
  at least one program per streaming multiprocessor (one full wave)."""
  block_k = next((b for b in (128, 64, 32, 16) if K % b == 0), None)
  block_n = next((b for b in (32, 16) if N % b == 0), None)
  if block_k is None or block_n is None:
    raise ValueError(f"decode_matmul: K={K} and N={N} must be multiples of 16")
  chunks = K // block_k
  splits = next((s for s in range(1, chunks + 1)
                 if chunks % s == 0 and (N // block_n) * s >= num_sms), chunks)
  return dict(block_n=block_n, block_k=block_k, splits=splits)


def project(eq: str, x: jax.Array, w: jax.Array, *, interpret: bool = False) -> jax.Array:
  """einsum(eq, x, w) for a projection whose x is [B, 1, *in] and w [*in, *out]
  (every x letter after B and T is contracted, and they lead w), as one
  decode_matmul of [B, prod(in)] x [prod(in), prod(out)]; with more than MAX_ROWS
  rows (after padding to a power of two) as XLA's `jnp.einsum`."""
  x_spec, w_spec = eq.split("->")[0].split(",")
  n_in = len(x_spec) - 2
  if x_spec[:2] != "BT" or w_spec[:n_in] != x_spec[2:] or x.shape[1] != 1:
    raise ValueError(f"decode_matmul.project: {eq} with x {x.shape} is not a decode projection")
  B = x.shape[0]
  if _pow2_at_least(B) > MAX_ROWS:
    return jnp.einsum(eq, x, w)
  K = math.prod(w.shape[:n_in])
  out_shape = w.shape[n_in:]
  w_KN = w.reshape(K, -1)
  y = decode_matmul(x.reshape(B, K), w_KN, interpret=interpret,
                    **tile_config(K, w_KN.shape[1]))
  return y.reshape(B, 1, *out_shape)
