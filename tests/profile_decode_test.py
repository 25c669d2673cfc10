"""benchmarks/profile_decode: a decode kernel is traced back to its optimized-HLO instruction."""

import json
import os
import sys

from benchmarks import profile_decode as pd
from benchmarks import profile_update

HLO = """\
%fused_concatenate (p0: bf16[896,128], p1: bf16[896,128]) -> bf16[896,256] {
  ROOT %concatenate.1 = bf16[896,256]{1,0} concatenate(%p0, %p1), dimensions={1}
}
  %input_concatenate_fusion.3 = bf16[896,256]{1,0} fusion(%wk, %wv), kind=kInput, \
calls=%fused_concatenate, metadata={op_name="jit(sample)/while/body/dot_general"}
  %tuple_result.2 = (f32[4]{0}, (s32[], /*index=1*/u8[2]{0})) fusion(%x), kind=kLoop, \
calls=%fc, metadata={op_name="jit(sample)/while/body/add"}
"""


def test_kernels_are_described_by_their_instruction():
  ins, types = profile_update.hlo_instructions(HLO), profile_update.hlo_result_types(HLO)
  assert types["input_concatenate_fusion_3"] == "bf16[896,256]"
  assert types["tuple_result_2"] == "(f32[4],(s32[],u8[2]))"
  got = pd.describe_kernel("input_concatenate_fusion_3", "", ins, types)
  assert got == {"instruction": "input_concatenate_fusion_3", "opcode": "fusion", "target": "",
                 "op_name": "jit(sample)/while/body/dot_general",
                 "result_type": "bf16[896,256]"}
  # A kernel named otherwise that the trace ties to the instruction (its hlo_op); a library
  # kernel with no instruction.
  assert pd.describe_kernel("input_concatenate_fusion_3_1", "input_concatenate_fusion.3", ins,
                            types)["result_type"] == "bf16[896,256]"
  assert pd.describe_kernel("sm90_xmma_gemm_bf16bf16_bf16f32", "", ins, types) == {}


def test_main_writes_the_record_and_the_hlo(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["profile_decode", "--smoke", "--batches", "4", "--steps",
                                    "4", "--dump_hlo", "1", "--out", str(tmp_path)])
  pd.main()
  record = json.load(open(tmp_path / "profile_decode.json"))
  (result,) = record["results"]
  assert result["batch"] == 4 and result["kernels_per_step"] > 0
  hlo = open(tmp_path / "profile_decode_b4.hlo.txt").read()
  assert "while" in hlo
  described = [k["hlo"] for k in result["top"] if k["hlo"]]
  assert described and all(d["opcode"] and d["result_type"] for d in described)
  assert os.path.getsize(tmp_path / "profile_decode_b4.hlo.txt") > 1000
