"""The asynchronous actor–learner step against the one-jit step on the same devices.

W1's workload (Qwen2.5-0.5B shape, 64 prompts (`--prompts`) × G = 8, prompt 256, exactly 512
new tokens, "grpo" preset, even-token reward, f32 master weights, bf16
compute) on N devices, two ways (`--mode`):

  sync    `rl_step.jit_rl_step` on all N devices (mesh `--mesh`, one entry
          may be -1): rollout and update one after the other.
  async   `actor_learner.ActorLearner`: the first `--actor_devices` a devices
          sample (ROLLOUT + REWARD), the other N − a learn (everything after
          the reward), each group with a mesh of shape `--mesh`; lag k =
          `--lag`. With k ≥ 1 the actor samples rollout s + k while the
          learner updates on rollout s.

Reported: seconds per learner step in steady state (median over the timed
steps, each timed from one step's end to the next's, after k + 2 warm-up
steps) and sequences/s. For async, also each side alone on its own devices
(the actor's rollout, the learner's update, each blocked), so that the
overlap can be read: with full overlap a step takes max(actor, learner).

  python -m benchmarks.async_step --mode async --actor_devices 2 --lag 1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m benchmarks.async_step --smoke --mode async --actor_devices 2 --lag 1
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.w1_grpo_step import even_token_reward
from jaxrl_llm import optim, sharding
from jaxrl_llm.rl import actor_learner
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state


class RandomPrompts:
  """An endless iterator of fixed random prompt batches with a position (`PromptPipeline`)."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    b = self.batches[self.i % len(self.batches)]
    self.i += 1
    return b

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = int(state["i"])


def _timed_steps(call, num_warmup: int, num_timed: int) -> list[float]:
  """Seconds between consecutive step ends, after `num_warmup` untimed steps."""
  for _ in range(num_warmup):
    common.block(call())
  times, last = [], time.perf_counter()
  for _ in range(num_timed):
    common.block(call())
    now = time.perf_counter()
    times.append(now - last)
    last = now
  return times


def main(argv=None) -> dict:
  p = common.base_parser(__doc__)
  p.add_argument("--mode", default="async", choices=("sync", "async"))
  p.add_argument("--mesh", default="1,-1,1",
                 help="data,fsdp,tensor of the mesh (sync: over all devices; async: "
                      "of each group); one entry may be -1")
  p.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
  p.add_argument("--actor_devices", type=int, default=1)
  p.add_argument("--lag", type=int, default=1)
  p.add_argument("--microbatches", type=int, default=16)
  p.add_argument("--prompts", type=int, default=0,
                 help="prompts per step (0: W1's 64; 8 with --smoke); must split over the "
                      "batch shards of each mesh, e.g. 96 for 2 actor + 6 learner devices")
  args = p.parse_args(argv)
  if args.smoke:
    size, R, G, P, L, micro = "smoke", 8, 4, 16, 8, 2
  else:
    size, R, G, P, L, micro = "0.5b", 64, 8, 256, 512, args.microbatches
  R = args.prompts or R
  devices = jax.devices()[:args.devices] if args.devices else jax.devices()
  n = len(devices)
  if args.mode == "async" and n < 2:
    raise SystemExit(f"--mode async needs at least 2 devices, found {n} (on CPU, set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting)")
  cfg = common.qwen25_config(size, param_dtype="float32", remat="dots_no_batch")
  rl = rl_config.from_preset("grpo", group_size=G, max_new_tokens=L, temperature=1.0,
                             microbatches=micro, logprob_chunk=128)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-6, grad_clip_norm=1.0))
  mesh_cfg = sharding.MeshConfig(tuple(int(x) for x in args.mesh.split(",")))
  rng = np.random.default_rng(0)
  batches = [{"prompt_tokens": common.random_tokens(rng, (R, P), cfg.vocab_size),
              "prompt_mask": np.ones((R, P), np.int32),
              "prompt_id": np.arange(R, dtype=np.int32) + i * R} for i in range(4)]
  res = {"mode": args.mode, "devices": n}

  if args.mode == "sync":
    mesh = sharding.make_mesh(mesh_cfg, devices)
    shards = sharding.batch_shards(mesh, mesh_cfg.rules)
    if R % shards:
      raise SystemExit(f"--prompts {R} does not split over the {shards} batch shards of the "
                       f"mesh {dict(mesh.shape)}: use a multiple of {shards}")
    state, sh = create_train_state(cfg, tx, jax.random.key(0), mesh,
                                   extra_fn=lambda: rls.init_rl_extra(rl))
    ref_params = jax.tree.map(jnp.copy, state.params)
    step = rls.RLStep(cfg, rl, tx, even_token_reward, eos_id=-1, pad_id=0, mesh=mesh)
    fn = rls.jit_rl_step(step, sh, None, sh.params)
    data = RandomPrompts([sharding.shard_batch(b, mesh) for b in batches])
    holder = {"state": state, "i": 0}

    def call():
      holder["i"] += 1
      holder["state"], m = fn(holder["state"], next(data), jax.random.key(holder["i"]),
                              ref_params)
      return holder["state"].step, m
    res["mesh"] = list(mesh.devices.shape)
    warmup = 2
  else:
    actor_devs, learner_devs = actor_learner.split_devices(args.actor_devices, devices)
    actor_mesh = sharding.make_mesh(mesh_cfg, actor_devs)
    learner_mesh = sharding.make_mesh(mesh_cfg, learner_devs)
    actor_learner.check_batch(R, actor_mesh, learner_mesh, mesh_cfg.rules)
    state, sh = create_train_state(cfg, tx, jax.random.key(0), learner_mesh,
                                   extra_fn=lambda: rls.init_rl_extra(rl))
    ref_params = jax.tree.map(jnp.copy, state.params)
    step = rls.RLStep(cfg, rl, tx, even_token_reward, eos_id=-1, pad_id=0, mesh=learner_mesh)
    warmup = args.lag + 2
    total = warmup + args.repeats + 1  # + the step whose metrics are kept
    pipeline = actor_learner.PromptPipeline(RandomPrompts(batches))
    al = actor_learner.ActorLearner(step, actor_mesh, learner_mesh, sh, pipeline, total,
                                    lag=args.lag, ref_params=ref_params)
    holder = {"state": state}
    key = jax.random.key(1)

    def call():
      batch = sharding.shard_batch(next(pipeline), actor_mesh, step.rules)
      holder["state"], m = al(holder["state"], batch, key)
      return holder["state"].step, m
    res.update(actor_devices=len(actor_devs), learner_devices=len(learner_devs),
               lag=args.lag, actor_mesh=list(actor_mesh.devices.shape),
               learner_mesh=list(learner_mesh.devices.shape))

  times = _timed_steps(call, warmup, args.repeats)
  _, m = call()
  res["step"] = common.summarize(times)
  res["sequences_per_s"] = R * G / res["step"]["median_s"]

  if args.mode == "async":
    # Each side alone, blocked, on its own devices: the overlap's two halves.
    params = jax.device_put(holder["state"].params, al.actor_params_sharding)
    b = sharding.shard_batch(batches[0], actor_mesh, step.rules)
    act = lambda: al._act(params, b, key, jnp.asarray(0, jnp.int32), None)  # noqa: E731
    rollout = common.block(act())
    res["actor_rollout"] = common.summarize(common.time_calls(act, warmup=0, repeats=3))
    rollout = al._to_learner(rollout)

    def learn():
      holder["state"], metrics = al._learn(holder["state"], rollout, key, ref_params)
      return holder["state"].step, metrics
    res["learner_update"] = common.summarize(common.time_calls(learn, warmup=1, repeats=3))
    res["ideal_overlapped_step_s"] = max(res["actor_rollout"]["median_s"],
                                         res["learner_update"]["median_s"])
    res["overlap_efficiency"] = res["ideal_overlapped_step_s"] / res["step"]["median_s"]
  m = jax.device_get(m)
  assert np.isfinite(float(m["loss/policy"])), m
  res["metrics_last"] = {k: float(v) for k, v in m.items()}
  res["peak_gib"] = common.peak_gib()
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "preset": "grpo", "microbatches": micro, "remat": "dots_no_batch",
            "param_dtype": "float32", "dtype": "bfloat16", "mesh_shape": list(mesh_cfg.shape),
            "reward": "fraction of even token ids", "stop_tokens": "none"}
  tag = (f"sync_{n}" if args.mode == "sync" else
         f"async_{res['actor_devices']}a{res['learner_devices']}l_k{args.lag}")
  args.tag = args.tag or tag
  common.write_record(args, "async_step", config, res)
  rows = [[tag, res["step"]["median_s"], res["sequences_per_s"],
           res.get("actor_rollout", {}).get("median_s", "-"),
           res.get("learner_update", {}).get("median_s", "-"), res["peak_gib"]]]
  common.print_table(f"async vs sync, W1 shapes ({size}), {n} devices",
                     ["run", "step s", "seq/s", "actor alone s", "learner alone s",
                      "peak GiB"], rows)
  return res


if __name__ == "__main__":
  main()
