"""benchmarks/profile_update: kernels are attributed to the parts of the update."""

import functools
import os
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import profile_update as pu
from benchmarks import trace


def test_part_of_reads_scope_target_and_library_names():
  assert pu.part_of("fusion_3", ("fusion", "", "jit(f)/token_logprobs/reduce", False)) \
      == "logprob_head"
  assert pu.part_of("custom_call_1", ("custom-call", "__cudnn$fmhaSoftmax", "jit(f)/x", False)) \
      == "attention"
  assert pu.part_of("gemm_fusion_dot_2", ("fusion", "", "jit(f)/dot_general", True)) == "matmul"
  assert pu.part_of("loop_add_fusion", ("fusion", "", "jit(f)/add", False)) == "other"
  assert pu.part_of("sm90_xmma_gemm_bf16bf16", None) == "matmul"
  assert pu.part_of("cudnn_generated_fort_native_sdpa", None) == "attention"
  assert pu.part_of("some_kernel", None) == "unattributed"


def test_hlo_instructions_parses_opcode_target_and_op_name():
  text = ('  %custom-call.5 = (bf16[4,8]{1,0}, s8[16]{0}) custom-call(%a, %b), '
          'custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/dot_general"}\n'
          '  ROOT %fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fc, '
          'metadata={op_name="jit(f)/token_logprobs/reduce_max" source_file="x.py"}\n')
  ins = pu.hlo_instructions(text)
  assert ins["custom_call_5"] == ("custom-call", "__cublas$gemm", "jit(f)/dot_general", True)
  assert ins["fusion_2"] == ("fusion", "", "jit(f)/token_logprobs/reduce_max", False)


def test_attribute_finds_the_logprob_head_in_a_traced_cpu_program():
  @functools.partial(jax.named_call, name="token_logprobs")
  def head(h, w):
    return jax.nn.logsumexp(jnp.tanh(h @ w), axis=-1)

  def f(x, w1, w2):
    return head(jnp.sin(x @ w1), w2).sum()

  args = (jnp.ones((64, 128)), jnp.ones((128, 128)) / 128, jnp.ones((128, 512)) / 128)
  compiled = jax.jit(f).lower(*args).compile()
  ins = pu.hlo_instructions(compiled.as_text())
  assert any("token_logprobs" in v[2] for v in ins.values())
  compiled(*args).block_until_ready()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      compiled(*args).block_until_ready()
    kernels = trace.device_kernels(d)
  res = pu.attribute(kernels, ins, top=5)
  assert res["kernels"] == len(kernels) > 0
  assert res["parts"]["logprob_head"]["s"] > 0
  assert abs(sum(p["s"] for p in res["parts"].values()) - res["kernel_s"]) < 1e-9
  assert len(res["top"]) <= 5


def test_main_profiles_the_smoke_learn_half(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() appends a flag
  res = pu.main(["--smoke", "--out", str(tmp_path), "--repeats", "1", "--top", "4"])
  assert res["learn"]["median_s"] > 0 and res["kernels"] > 0 and len(res["top"]) == 4
  assert res["parts"]["logprob_head"]["s"] > 0  # the head's kernels are found by scope
  assert (tmp_path / "profile_update.json").exists()
