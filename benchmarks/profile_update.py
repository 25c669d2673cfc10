"""Where W1's update goes: the learn half of the GRPO step under the profiler.

W1's workload (`benchmarks/w1_grpo_step.py`, same flags) is cut where split
mode cuts it (`rl_step.make_split_step`): the rollout and the rewards run once,
untimed; then the learn half (reference log-probs, advantages, the loss and
its gradient over the micro-batches, clipping, AdamW) is timed alone and run
once under `jax.profiler.trace`, with XLA's command buffers (CUDA graphs)
switched off in this process (`--xla_gpu_enable_command_buffer=`): inside a
command buffer a kernel is named only by its buffer and cannot be attributed.
`learn_s` is timed the same way; W1's own record times the default. The
kernels are attributed to the part of the program that launched them
through the compiled HLO: each kernel's HLO
instruction (the trace's `hlo_op`, or the kernel's own name for XLA's fused
kernels) is looked up in `compiled.as_text()` for its opcode, custom-call
target and `op_name` (the JAX name stack). Parts:

  logprob_head  inside `decoder.token_logprobs`: the unembedding chunks, the
                float32 log-softmax and entropy, and their gradients
  attention     cuDNN fused attention calls (forward and backward)
  matmul        the other matmuls (cuBLAS calls and XLA's GEMM fusions)
  other         everything else (norms, rotary, residuals, casts, the
                optimizer, reductions of the loss)
  unattributed  kernels whose instruction is not in the HLO text

Reported: `learn_s` (median wall seconds of the learn half), `kernel_s` (summed
kernel time of the traced call), each part's seconds and share, and the top
kernels with their instruction, part and op_name. The update's matmul work
(policy forward + backward and reference forward, 2·N·tokens each pass) is
given as `update_pflop`, so the `matmul` part's achieved rate can be read
against the measured matmul ceiling of `floors.py`.

  python -m benchmarks.profile_update [--smoke] [W1's flags]
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks import common, trace, w1_grpo_step
from jaxrl_llm import sharding

PARTS = ("logprob_head", "attention", "matmul", "other", "unattributed")

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\((?=[%)\d])")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_GEMM_FUSION = re.compile(r'"kind":"__triton_gemm"|kind=kCustom.*gemm|__cublas|cublas', re.I)


def _key(name: str) -> str:
  """Instruction and kernel names compared with '.' and '-' as '_'."""
  return re.sub(r"[.\-]", "_", name)


def hlo_instructions(hlo_text: str) -> dict:
  """{normalised instruction name: (opcode, custom-call target, op_name, is_gemm)}."""
  out = {}
  for line in hlo_text.splitlines():
    m, op = _NAME.match(line), _OPCODE.search(line)
    if not m or not op:
      continue
    name, opcode = m.group(1), op.group(1)
    target = _TARGET.search(line)
    op_name = _OP_NAME.search(line)
    out[_key(name)] = (opcode, target.group(1) if target else "",
                       op_name.group(1) if op_name else "",
                       bool(_GEMM_FUSION.search(line)) or opcode == "dot")
  return out


def _result_type(rest: str) -> str:
  """The type an HLO instruction line starts with after "name = ": an array or a tuple."""
  if not rest.startswith("("):
    return rest.split(" ", 1)[0]
  depth = 0
  for i, c in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      return rest[:i + 1]
  return rest


def hlo_result_types(hlo_text: str) -> dict:
  """{normalised instruction name: result type without layouts}, e.g. "bf16[896,256]"."""
  out = {}
  for line in hlo_text.splitlines():
    m = _NAME.match(line)
    if m:
      result = _result_type(line[m.end():].lstrip())
      out[_key(m.group(1))] = re.sub(r"\{[^}]*\}|/\*[^*]*\*/|\s", "", result)
  return out


def instruction_of(kernel: str, hlo_op: str, instructions: dict) -> str | None:
  """The normalised name of the instruction a traced kernel ran: the trace's hlo_op, else
  the kernel's own name; None for a library kernel the trace did not name."""
  for name in (hlo_op, kernel):
    if name and _key(name) in instructions:
      return _key(name)
  return None


def part_of(kernel: str, info) -> str:
  """The part (see module docstring) of one kernel given its instruction's info."""
  lower = kernel.lower()
  if info is None:  # a library kernel whose instruction the trace did not name
    if any(k in lower for k in ("fmha", "sdpa", "cudnn", "flash")):
      return "attention"
    if any(k in lower for k in ("gemm", "xmma", "cutlass", "cublas", "nvjet")):
      return "matmul"
    return "unattributed"
  _, target, op_name, is_gemm = info
  if "token_logprobs" in op_name:
    return "logprob_head"
  if "fmha" in target.lower() or "cudnn" in target.lower() or "fmha" in lower:
    return "attention"
  if is_gemm or "gemm" in target.lower() or "matmul" in target.lower():
    return "matmul"
  return "other"


def attribute(kernels, instructions: dict, top: int = 30) -> dict:
  """Seconds per part, and the `top` kernels by time with their attribution."""
  per_part = collections.defaultdict(float)
  per_kernel = collections.defaultdict(lambda: [0, 0.0, "", "", ""])
  for name, hlo_op, us in kernels:
    key = instruction_of(name, hlo_op, instructions)
    info = instructions[key] if key else None
    part = part_of(name, info)
    per_part[part] += us / 1e6
    k = per_kernel[name]
    k[0] += 1
    k[1] += us / 1e6
    k[2], k[3], k[4] = part, hlo_op, info[2] if info else ""
  kernel_s = sum(per_part.values())
  ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
  return {"kernel_s": kernel_s, "kernels": len(kernels),
          "parts": {p: {"s": per_part.get(p, 0.0),
                        "share": per_part.get(p, 0.0) / kernel_s if kernel_s else None}
                    for p in PARTS},
          "top": [{"kernel": n[:120], "calls": c, "s": s, "part": part, "hlo_op": op,
                   "op_name": on[-160:]} for n, (c, s, part, op, on) in ranked]}


def main(argv=None) -> dict:
  """Profiles the learn half; returns the record's results (also written to --out)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_enable_command_buffer" not in flags:  # read when the backend starts, below
    os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_enable_command_buffer=").strip()
  p = common.base_parser(__doc__)
  w1_grpo_step.add_flags(p)
  p.add_argument("--top", type=int, default=30)
  args = p.parse_args(argv)
  w = w1_grpo_step.build(args)
  step, state, batch, ref_params = w["step"], w["state"], w["batch"], w["ref_params"]

  def rollout(params, batch, rng):
    with sharding.activation_rules(step.mesh, step.rules):
      ro = step.rollout(params, batch, rng, 0)
      rewards_B, comps, baseline_B = step.score(ro)
      return ro, rewards_B, comps, baseline_B

  def learn(state, ro, rewards_B, comps, rng, ref_params, baseline_B):
    with sharding.activation_rules(step.mesh, step.rules):
      return step.learn(state, ro, rewards_B, comps, rng, ref_params, baseline_B)

  ro, rewards_B, comps, baseline_B = common.block(
      jax.jit(rollout)(state.params, batch, jax.random.key(1)))
  learn_args = (state, ro, rewards_B, comps, jax.random.key(2), ref_params, baseline_B)
  t0 = time.perf_counter()
  compiled = jax.jit(learn).lower(*learn_args).compile()
  compile_s = time.perf_counter() - t0
  instructions = hlo_instructions(compiled.as_text())
  call = lambda: compiled(*learn_args)  # the state is not donated: every call is the same
  times = common.time_calls(call, warmup=args.warmup, repeats=args.repeats)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      common.block(call())
    kernels = trace.device_kernels(d)
  s = common.summarize(times)
  res = attribute(kernels, instructions, args.top)
  tokens = w["R"] * w["G"] * (w["P"] + w["L"])
  n_matmul = common.matmul_params(w["cfg"])
  res.update({"learn": s, "compile_s": compile_s,
              "busy_fraction": res["kernel_s"] / s["median_s"],
              "update_pflop": 4 * 2 * n_matmul * tokens / 1e15,
              "hlo_instructions": len(instructions)})
  config = {"size": w["size"], "prompts": w["R"], "group_size": w["G"],
            "prompt_len": w["P"], "new_tokens": w["L"], "microbatches": w["micro"],
            "remat": args.remat, "logprob_chunk": args.logprob_chunk,
            "attention_impl": args.attention_impl, "kl_coef": w["rl"].kl_coef,
            "mesh": list(w["mesh"].devices.shape), "xla_flags": os.environ["XLA_FLAGS"]}
  common.write_record(args, "profile_update", config, res)
  print(f"learn half: {s['median_s']:.3f} s (compile {compile_s:.0f} s), kernels "
        f"{res['kernel_s']:.3f} s in {res['kernels']} launches "
        f"(busy {res['busy_fraction']:.2f}); update {res['update_pflop']:.3f} PFLOP", flush=True)
  common.print_table("learn half by part", ["part", "s", "share"],
                     [[k, v["s"], v["share"]] for k, v in res["parts"].items()])
  common.print_table("top kernels", ["kernel", "calls", "s", "part"],
                     [[k["kernel"][:60], k["calls"], k["s"], k["part"]] for k in res["top"]])
  if not np.isfinite(res["kernel_s"]) or res["kernels"] == 0:
    raise RuntimeError("the trace held no kernels of the learn half")
  return res


if __name__ == "__main__":
  main()
