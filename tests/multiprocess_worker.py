"""The scale-out checks of tests/multiprocess_test.py, run in one or several processes.

  # one process, 8 CPU devices (or: import this file and call run(workdir))
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multiprocess_worker.py \\
      --workdir=/tmp/w1 --outdir=/tmp/o1
  # 2 processes x 4 CPU devices
  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 \\
      --script=tests/multiprocess_worker.py --workdir=/tmp/w2 --outdir=/tmp/o2

Not a test module (no `_test` in the name): pytest does not collect it.
`run(workdir)` does, on the same tiny model and data whatever the process count:

  DATA   3 batches from `DataIterator` (each process its own rows), their
         prompt ids on every process, and the global batch `shard_batch` makes
  RL     2 one-jit GRPO steps (mesh preset "fsdp_tensor": FSDP across processes,
         2-way tensor parallel inside each), with a KL reference
  CKPT   save (orbax, every process writes its shards), restore onto the same
         mesh and onto the "data" mesh, then a 3rd RL step from the restored state
  DPO    2 preference steps (mesh preset "data"), when jaxrl_llm.preference.step exists
  METRICS  MetricWriter into <workdir>/metrics_p<process> and <workdir>/metrics_shared

and returns numpy results (global values, identical on every process). With
--outdir every process pickles them to <outdir>/results_p<i>.pkl.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

if __name__ == "__main__":  # before jax is imported: one process on its own gets 8 devices
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrl_llm import optim, sharding, testing, tokenizers  # noqa: E402
from jaxrl_llm.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from jaxrl_llm.data import builders, tasks  # noqa: E402
from jaxrl_llm.data.pipeline import DataConfig, DataIterator  # noqa: E402
from jaxrl_llm.metrics import MetricWriter  # noqa: E402
from jaxrl_llm.rl import config as rl_config  # noqa: E402
from jaxrl_llm.rl import rl_step as rls  # noqa: E402
from jaxrl_llm.train_state import create_train_state, state_shardings  # noqa: E402

try:
  from jaxrl_llm.preference import step as pref_step_lib  # noqa: E402
except ImportError:  # the DPO step is not there yet
  pref_step_lib = None

TARGET = 7
BATCH = 8  # global prompts (RL) / pairs (DPO) per step
RL_STEPS = 2


def target_reward(inputs):
  """Fraction of completion tokens equal to TARGET: dense, so every step moves the params."""
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def _flat(tree, prefix):
  """{prefix/path: numpy array} of a pytree on the host."""
  leaves = jax.tree_util.tree_leaves_with_path(sharding.to_host(tree))
  return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _allgather_local(x):
  """[process_count, ...]: every process's local numpy value, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def _abstract(tree, shardings=None):
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def run(workdir: str) -> dict:
  out: dict = {"process_count": jax.process_count(), "device_count": jax.device_count()}
  tok = tokenizers.load_tokenizer("builtin")
  cfg = testing.tiny_config("qwen3", vocab_size=tok.vocab_size, hidden_size=32,
                            intermediate_size=64)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, grad_clip_norm=1.0,
                                              eps=1e-6))

  # DATA: each process reads its own rows of every global batch.
  data_cfg = DataConfig(source="arithmetic", batch_size=BATCH, max_prompt_len=12,
                        max_answer_len=6, seed=0)
  it = DataIterator(data_cfg, "train", mode="rl", tokenizer=tok,
                    examples=tasks.generate("arithmetic", "train", 64, 0))
  local = [next(it) for _ in range(RL_STEPS + 1)]
  out["data/local_prompt_ids"] = _allgather_local(np.stack([b["prompt_id"] for b in local]))
  out["data/iterator_state"] = dict(it.get_state())

  # RL: FSDP over both processes x 2-way tensor parallelism.
  mesh = sharding.make_mesh(sharding.mesh_preset("fsdp_tensor"))
  out["rl/mesh"] = dict(mesh.shape)
  rl = rl_config.from_preset("grpo", group_size=4, max_new_tokens=5, minibatches=2,
                             kl_coef=0.05)
  state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl))
  ref = jax.tree.map(jnp.copy, state.params)
  step = rls.RLStep(cfg, rl, tx, target_reward, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    mesh=mesh)
  fn = rls.jit_rl_step(step, sh, None, sh.params)
  batches = [sharding.shard_batch(b, mesh) for b in local]
  out.update(_flat(batches[0], "data/global_batch"))
  if jax.process_count() > 1:  # a mesh that does not split the batch across processes
    try:
      sharding.shard_batch(local[0], sharding.make_mesh(sharding.MeshConfig((1, 1, -1))))
      out["data/unsplit_mesh_error"] = None
    except ValueError as e:
      out["data/unsplit_mesh_error"] = str(e)
  rl_metrics = []
  for i in range(RL_STEPS):
    state, m = fn(state, batches[i], jax.random.key(1), ref)
    rl_metrics.append({k: float(v) for k, v in sharding.to_host(m).items()})
  out["rl/metrics"] = rl_metrics
  out.update(_flat(state.params, "rl/params"))
  out["rl/step"] = int(sharding.to_host(state.step))

  # CKPT: save, restore onto this mesh and onto another one, continue training.
  ckpt = Checkpointer(os.path.join(workdir, "run"), CheckpointConfig(save_interval_steps=1))
  ckpt.save(RL_STEPS, state, extra={"data": it.get_state()}, force=True)
  ckpt.wait()
  restored, extra = ckpt.restore(_abstract(state))
  out["ckpt/extra"] = extra
  out["ckpt/same_shardings"] = all(
      a.sharding == b.sharding
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  out.update(_flat(restored.params, "ckpt/restored"))
  data_mesh = sharding.make_mesh(sharding.mesh_preset("data"))
  on_data, _ = ckpt.restore(_abstract(state, state_shardings(state, cfg, data_mesh)))
  out["ckpt/data_mesh_axes"] = dict(on_data.params["embed"].sharding.mesh.shape)
  out.update(_flat(on_data.params, "ckpt/restored_data_mesh"))
  ckpt.close()
  state, m = fn(restored, batches[RL_STEPS], jax.random.key(1), ref)
  out["rl/metrics_after_restore"] = {k: float(v) for k, v in sharding.to_host(m).items()}
  out.update(_flat(state.params, "rl/params_after_restore"))

  # DPO: plain data parallelism, gradients all-reduced across processes.
  if pref_step_lib is not None:
    rng = np.random.default_rng(0)
    pairs = [{"prompt": e["prompt"], "chosen": e["answer"],
              "rejected": builders.wrong_answer(e["answer"], rng)}
             for e in tasks.generate("arithmetic", "train", 32, 1)]
    pit = DataIterator(DataConfig(source="preference_arithmetic", batch_size=BATCH,
                                  max_prompt_len=12, max_completion_len=6), "train",
                       mode="preference", tokenizer=tok, examples=pairs)
    pstate, psh = create_train_state(cfg, tx, jax.random.key(0), data_mesh)
    pref = pref_step_lib.PreferenceConfig(losses=(("dpo", 1.0),), beta=0.3)
    pstep = pref_step_lib.PreferenceStep(cfg, pref, tx, data_mesh)
    pfn = pref_step_lib.jit_preference_step(pstep, psh, psh.params)
    pref_ref = jax.tree.map(jnp.copy, pstate.params)
    dpo_metrics = []
    for _ in range(2):
      pstate, m = pfn(pstate, sharding.shard_batch(next(pit), data_mesh), jax.random.key(2),
                      pref_ref)
      dpo_metrics.append({k: float(v) for k, v in sharding.to_host(m).items()})
    out["dpo/metrics"] = dpo_metrics
    out.update(_flat(pstate.params, "dpo/params"))

  # METRICS: only process 0 writes, into its own and into a shared directory.
  for sub in (f"metrics_p{jax.process_index()}", "metrics_shared"):
    with MetricWriter(os.path.join(workdir, sub)) as writer:
      for i, m in enumerate(rl_metrics):
        writer.write(i + 1, m)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("metrics written")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--outdir", required=True)
  args = parser.parse_args(argv)
  sharding.maybe_initialize_distributed()
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  out = run(args.workdir)
  os.makedirs(args.outdir, exist_ok=True)
  with open(os.path.join(args.outdir, f"results_p{jax.process_index()}.pkl"), "wb") as f:
    pickle.dump(out, f)
  print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
