"""Compile-only check of sharded training steps on N mock GPUs of one real GPU.

JAX's GPU client can pretend to be one process of an N-host job
(`jax_mock_gpu_topology="1xNx1"`: N hosts of one GPU each, collectives mocked).
Compiling for that topology runs XLA's SPMD partitioner, and with it the
custom partitioning rules of JAX's cuDNN fused attention, exactly as on N real
GPUs. Nothing runs: each case is `jit(...).lower(abstract inputs).compile()`.

Cases:
  op       `jax.nn.dot_product_attention(implementation="cudnn")`, forward and
           gradient, the query/key/value sharded over the batch or over the
           heads, with a mask or causal (the smallest shapes that isolate
           which sharding the partitioning rule refuses).
  w2       the W2 update (`sft_step`, 2 micro-batches, remat dots_no_batch) of
           the model size given, on the meshes given, with attention routed
           as the library runs it (`route=shard_map`: each device attends its
           own rows and heads, `decoder.attention`) or handed to XLA's
           partitioner (`route=partitioner`: the library's routing switched
           off in this process only, which is how it ran before).

Each case records `ok` or the error's last lines. One process per N (the
topology is fixed when the GPU client starts):

  python -m benchmarks.partition_check --mock_devices 8 --out rec/partition_8.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import traceback


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--mock_devices", type=int, default=8)
  p.add_argument("--sizes", default="smoke,1.5b", help="model sizes for the w2 cases")
  p.add_argument("--meshes", default="N,1,1;1,N,1;1,1,2;2,N/2,1",
                 help="data,fsdp,tensor per case; N = --mock_devices")
  p.add_argument("--impls", default="auto,xla")
  p.add_argument("--routes", default="shard_map,partitioner")
  p.add_argument("--skip_ops", action="store_true", help="only the w2 cases")
  p.add_argument("--rows", type=int, default=16, help="W2 batch rows")
  p.add_argument("--seq", type=int, default=2048, help="W2 tokens per row (1.5b)")
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def _axis(text: str, n: int) -> int:
  """A mesh axis size: an integer, "N", or "N/k"."""
  text = text.strip()
  if text.startswith("N"):
    return n // int(text[2:]) if text[1:2] == "/" else n
  return int(text)


def _tail(e: BaseException, lines: int = 40) -> str:
  text = "".join(traceback.format_exception(e)).strip().splitlines()
  return "\n".join(text[-lines:])


def _op_cases(n, jax, jnp, mesh_lib):
  """cuDNN attention alone, forward and gradient, with the query/key/value sharded
  over the batch or over the heads (the two axes its partitioning rule accepts)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = mesh_lib.Mesh(jax.devices()[:n], ("data",))
  B, T, N, K, H = 2 * n, 256, 2 * n, n, 128  # grouped-query, heads divisible by n
  specs = {"batch": P("data"), "heads": P(None, None, "data")}
  cases = []
  for shard, spec in specs.items():
    for with_mask in (False, True):
      for grad in (False, True):
        def loss(q, k, v, mask, with_mask=with_mask):
          o = jax.nn.dot_product_attention(
              q, k, v, mask=mask[:, None] if with_mask else None, implementation="cudnn",
              is_causal=not with_mask)
          return jnp.sum(o.astype(jnp.float32))
        fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else loss
        sh = NamedSharding(mesh, spec)
        qs = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=sh)
        kvs = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=sh)
        # The mask [B, T, T] follows the batch sharding, and is whole on every device
        # when the heads are sharded.
        msh = NamedSharding(mesh, P("data") if shard == "batch" else P())
        ms = jax.ShapeDtypeStruct((B, T, T), jnp.bool_, sharding=msh)
        name = f"op shard={shard} mask={with_mask} grad={grad}"
        cases.append((name, lambda fn=fn, qs=qs, kvs=kvs, ms=ms:
                      jax.jit(fn).lower(qs, kvs, kvs, ms).compile()))
  return cases


def _w2_case(size, mesh_shape, impl, route, rows, seq, jax, jnp):
  from unittest import mock

  from benchmarks import common
  from jaxrl_llm import optim, sharding
  from jaxrl_llm.models import decoder
  from jaxrl_llm.sft import sft_step
  from jaxrl_llm.train_state import TrainState, state_shardings

  def compile_():
    T = seq if size != "smoke" else 128
    cfg = common.qwen25_config(size, param_dtype="float32", remat="dots_no_batch",
                               attention_impl=impl)
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
    n = 1
    for s in mesh_shape:
      n *= s
    mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape), jax.devices()[:n])

    def init(rng):
      params = decoder.init_params(cfg, rng)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), extra={})
    key = jax.eval_shape(lambda: jax.random.key(0))
    abstract = jax.eval_shape(init, key)
    sh = state_shardings(abstract, cfg, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, sh)
    bsh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=bsh)
             for k in ("tokens", "segment_ids", "loss_mask")}
    step = jax.jit(functools.partial(sft_step, cfg=cfg, tx=tx, microbatches=2, mesh=mesh,
                                     logprob_chunk=128),
                   in_shardings=(sh, None, None), out_shardings=(sh, None), donate_argnums=(0,))
    if route == "partitioner":
      with mock.patch.object(sharding, "active_mesh_rules", lambda: None):
        step.lower(state, batch, key).compile()
    elif route == "shard_map":
      step.lower(state, batch, key).compile()
    else:
      raise ValueError(f"unknown --routes entry {route!r}: shard_map or partitioner")
  return compile_


def main(argv=None) -> dict:
  """Runs the cases; returns the record (also written to --out after each case)."""
  args = _parse(argv)
  n = args.mock_devices
  # XLA shares GEMM autotuning between the processes of a multi-host job through a
  # key-value store; the mocked processes never answer, and the compile waits forever
  # (openxla/xla#28959). XLA reads XLA_FLAGS when the client starts, below.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_shard_autotuning=false").strip()
  import jax
  # Before the GPU client starts: N hosts of one GPU each. Through the config, not the
  # environment: jax may already be imported, and it reads its environment only then.
  jax.config.update("jax_mock_gpu_topology", f"1x{n}x1")
  import jax.numpy as jnp
  from jax import sharding as mesh_lib
  info = {"mock_devices": n, "devices": len(jax.devices()),
          "local_devices": len(jax.local_devices()), "jax": jax.__version__,
          "device_kind": jax.devices()[0].device_kind, "cases": []}
  print(json.dumps({k: v for k, v in info.items() if k != "cases"}), flush=True)
  if info["devices"] != n:  # the cases would compile for fewer devices than asked
    raise SystemExit(f"partition_check: {info['devices']} devices, not --mock_devices {n}: "
                     "the mock topology did not take effect (or on CPU, set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n})")
  cases = [] if args.skip_ops else _op_cases(n, jax, jnp, mesh_lib)
  for size in filter(None, args.sizes.split(",")):  # --sizes "": the op cases only
    for m in filter(None, args.meshes.split(";")):
      shape = tuple(_axis(x, n) for x in m.split(","))
      if min(shape) < 1:
        continue
      for impl in args.impls.split(","):
        for route in args.routes.split(","):
          cases.append((f"w2 {size} mesh={shape} attention={impl} route={route}",
                        _w2_case(size, shape, impl, route, args.rows, args.seq, jax, jnp)))
  for name, fn in cases:
    print(f"compiling {name}", flush=True)  # a hang shows which case it is in
    t0 = time.time()
    try:
      fn()
      rec = {"case": name, "ok": True}
    except Exception as e:  # noqa: BLE001 - every failure is the measurement
      rec = {"case": name, "ok": False, "error": _tail(e)}
    rec["seconds"] = round(time.time() - t0, 1)
    info["cases"].append(rec)
    print(("ok   " if rec["ok"] else "FAIL ") + name + f" ({rec['seconds']} s)", flush=True)
    if not rec["ok"]:
      print("     " + rec["error"].replace("\n", "\n     "), flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
  return info


if __name__ == "__main__":
  main()
