"""The asynchronous actor–learner (rl.actor_learner) on 8 fake CPU devices (conftest).

  schedule      the pipelined run equals a plain sequential loop in which rollout s
                is sampled with the params after v(s) = max(s − k, s₀) updates
  k = 0         equals the synchronous one-jit step (`jit_rl_step`) on the same mesh
  k = 1         two runs with the same seed give identical metrics and params
  placement     rollouts are sampled on the actor devices, the state stays on the learner's
  prompts       a run killed with a rollout in flight and resumed from its checkpoint
                consumes the same prompt ids, step by step, as an uninterrupted run
  multi-turn    an in-graph environment: k = 0 equals the synchronous multi-turn step;
                a host environment is refused
  host rewards  scored on the host between actor and learner: k = 1 is reproducible and
                equals the in-graph version of the same reward
"""
import dataclasses
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import multiturn_test as mtt
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, testing, trainer
from jaxrl_llm.envs.config import MultiTurnConfig
from jaxrl_llm.rl import actor_learner as al
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import multiturn as mt
from jaxrl_llm.rl import rl_step as rls
from jaxrl_llm.train_state import create_train_state

VOCAB, EOS, TARGET = 16, 2, 7
CFG = testing.tiny_config("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)
MESH = sharding.MeshConfig((1, -1, 1))
R, P, STEPS, SEED = 4, 5, 4, 3


def target_reward(inputs):
  m = inputs.completion_mask_BL
  frac = jnp.sum((inputs.completion_BL == TARGET) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(jnp.float32)}


def host_target_reward(ro):
  """`target_reward` on the host, in numpy, over a fetched rollout dict."""
  m = np.asarray(ro["completion_mask"], np.float32)
  frac = np.sum((ro["completion"] == TARGET) * m, 1) / np.maximum(np.sum(m, 1), 1)
  return frac, {"correct": (frac > 0.5).astype(np.float32)}


class Batches:
  """A deterministic prompt iterator with the DataIterator state protocol."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    rng = np.random.RandomState(self.position)
    toks = rng.randint(3, VOCAB, size=(R, P)).astype(np.int32)
    ids = np.arange(self.position * R, (self.position + 1) * R, dtype=np.int32)
    self.position += 1
    return dict(prompt_tokens=toks, prompt_mask=np.ones_like(toks), prompt_id=ids)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def rl(**kw):
  return rl_config.from_preset("grpo", group_size=4, max_new_tokens=5, kl_coef=0.05, **kw)


def build(rl_cfg, devices):
  """The step on a mesh over `devices`: multi-turn (`multiturn_test.ScriptEnv`, an in-graph
  environment) when rl_cfg.multiturn.enabled."""
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-2, grad_clip_norm=1.0))
  mesh = sharding.make_mesh(MESH, devices)
  state, sh = create_train_state(CFG, tx, jax.random.key(0), mesh,
                                 extra_fn=lambda: rls.init_rl_extra(rl_cfg))
  make = (functools.partial(mt.MultiTurnRLStep, env=mtt.ScriptEnv())
          if rl_cfg.multiturn.enabled else rls.RLStep)
  return make(CFG, rl_cfg, tx, target_reward, eos_id=EOS, mesh=mesh), state, sh, mesh


_COMPILED = {}  # rl config -> an ActorLearner whose compiled stages later runs reuse


def actor_learner(rl_cfg, lag, num_steps=STEPS, host_reward=None):
  actor_devs, learner_devs = al.split_devices(4)
  step, state, sh, learner_mesh = build(rl_cfg, learner_devs)
  actor_mesh = sharding.make_mesh(MESH, actor_devs)
  ref = jax.tree.map(jnp.copy, state.params)
  pipeline = al.PromptPipeline(Batches())
  run = al.ActorLearner(step, actor_mesh, learner_mesh, sh, pipeline, num_steps, lag=lag,
                        ref_params=ref, host_reward=host_reward)
  # The stages do not depend on the lag (nor the actor's on which host scorer runs after
  # it): compile them once per config (fast tests).
  run._act = _COMPILED.setdefault((rl_cfg, host_reward is not None), run)._act
  run._learn = _COMPILED.setdefault(rl_cfg, run)._learn
  return run, state, pipeline, actor_mesh


def run_async(rl_cfg, lag, num_steps=STEPS, host_reward=None):
  run, state, pipeline, actor_mesh = actor_learner(rl_cfg, lag, num_steps, host_reward)
  rng = jax.random.key(SEED)
  out = []
  for _ in range(num_steps):
    batch = sharding.shard_batch(next(pipeline), actor_mesh)
    state, metrics = run(state, batch, rng)
    out.append(jax.device_get(metrics))
  return jax.device_get(state.params), out


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_split_devices_is_disjoint_and_names_the_field():
  actor, learner = al.split_devices(3)
  assert len(actor) == 3 and len(learner) == 5 and not set(actor) & set(learner)
  for bad in (0, 8):
    with pytest.raises(ValueError, match="trainer.actor_devices"):
      al.split_devices(bad)


def test_prompt_pipeline_state_is_the_learner_position():
  pipe = al.PromptPipeline(Batches())
  first = next(pipe)
  assert pipe.get_state() == {"position": 1}
  ahead = pipe.peek(1)                       # two batches read ahead for rollouts in flight
  assert pipe.in_flight == 2 and pipe.get_state() == {"position": 1}
  assert next(pipe)["prompt_id"][0] == 4 and pipe.get_state() == {"position": 2}
  np.testing.assert_array_equal(next(pipe)["prompt_id"], ahead["prompt_id"])
  assert first["prompt_id"][0] == 0 and pipe.in_flight == 0
  pipe.peek(0)
  pipe.set_state({"position": 1})            # a resume drops what was read ahead
  assert pipe.in_flight == 0 and next(pipe)["prompt_id"][0] == 4


@pytest.mark.parametrize("lag", [1, 2])
def test_pipelined_run_equals_sequential_loop_with_lag(lag):
  """Rollout s uses θ_{max(s−k, 0)}; pipelining changes nothing but when work is dispatched."""
  rl_cfg = rl()
  params, metrics = run_async(rl_cfg, lag)
  # The plain loop: keep every params version, sample rollout s with θ_{v(s)}, then update.
  run, state, pipeline, actor_mesh = actor_learner(rl_cfg, lag)
  rng = jax.random.key(SEED)
  versions = [jax.device_put(state.params, run.actor_params_sharding)]
  for s in range(STEPS):
    batch = sharding.shard_batch(next(pipeline), actor_mesh)
    v = max(s - lag, 0)
    assert run.version(s) == v
    ro = run._to_learner(run._act(versions[v], batch, rng, jnp.asarray(s, jnp.int32), None))
    state, m = run._learn(state, ro, rng, run.ref_params)
    m = dict(jax.device_get(m), **{"async/staleness": np.float32(s - v)})
    m["async/in_flight"] = metrics[s]["async/in_flight"]
    assert_same(metrics[s], m)
    versions.append(jax.device_put(state.params, run.actor_params_sharding))
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))
  assert [m["async/staleness"] for m in metrics] == [min(s, lag) for s in range(STEPS)]
  assert metrics[0]["async/in_flight"] == lag  # rollouts 1..k sampled with θ_0 during warm-up


def test_lag_zero_equals_the_synchronous_one_jit_step():
  rl_cfg = rl()
  params, metrics = run_async(rl_cfg, 0)
  _, learner_devs = al.split_devices(4)
  step, state, sh, mesh = build(rl_cfg, learner_devs)
  ref = jax.tree.map(jnp.copy, state.params)
  fn = rls.jit_rl_step(step, sh, None, sh.params)
  it = Batches()
  for s in range(STEPS):
    state, m = fn(state, sharding.shard_batch(next(it), mesh), jax.random.key(SEED), ref)
    m = jax.device_get(m)
    got = {k: v for k, v in metrics[s].items() if not k.startswith("async/")}
    assert_same(got, m)  # bit for bit: the same stages and draws on meshes of one shape
    assert metrics[s]["async/staleness"] == 0
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))


def test_lag_one_is_reproducible_and_runs_on_both_device_groups():
  rl_cfg = rl(off_policy={"correction": "tis"})
  p1, m1 = run_async(rl_cfg, 1)
  p2, m2 = run_async(rl_cfg, 1)
  for a, b in zip(m1, m2):
    assert_same(a, b)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert 0 < m1[-1]["rl/is_weight"] and "rl/is_clip_frac" in m1[-1]
  # Placement: rollouts in flight live on the actor devices, the state on the learner's.
  run, state, pipeline, actor_mesh = actor_learner(rl_cfg, 1)
  state, _ = run(state, sharding.shard_batch(next(pipeline), actor_mesh), jax.random.key(0))
  actor_devs, learner_devs = map(set, al.split_devices(4))
  (_, pending), = run._pending.values()
  assert all(x.sharding.device_set <= actor_devs for x in jax.tree.leaves(pending))
  assert all(x.sharding.device_set <= learner_devs for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("correction,key", [("vtrace", "rl/vtrace_rho_clip_frac"),
                                             ("remix", "rl/is_weight")])
def test_corrections_run_in_the_learner_and_match_on_policy_data(correction, key):
  """Step 0's rollout is on-policy (θ_0): V-trace and ReMix give the uncorrected loss back."""
  _, plain = run_async(rl(), 1, num_steps=2)
  _, corrected = run_async(rl(off_policy={"correction": correction}), 1, num_steps=2)
  np.testing.assert_array_equal(corrected[0]["reward/mean"], plain[0]["reward/mean"])
  np.testing.assert_allclose(corrected[0]["loss/policy"], plain[0]["loss/policy"], rtol=1e-4,
                             atol=1e-6)
  assert key in corrected[1] and corrected[1]["async/staleness"] == 1
  assert all(np.isfinite(v) for v in corrected[1].values())


def test_remix_reincarnation_drops_the_lag_and_resets_the_reference():
  rl_cfg = rl(off_policy={"correction": "remix", "remix_reincarnate_step": 2})
  actor_devs, learner_devs = al.split_devices(4)
  step, state, sh, learner_mesh = build(rl_cfg, learner_devs)
  state, sh = al.with_reference_in_state(state, sh)  # the reference lives in the state
  actor_mesh = sharding.make_mesh(MESH, actor_devs)
  pipeline = al.PromptPipeline(Batches())
  run = al.ActorLearner(step, actor_mesh, learner_mesh, sh, pipeline, STEPS, lag=1,
                        reincarnate_step=2)
  thetas, staleness = [], []
  for s in range(STEPS):
    thetas.append(jax.device_get(state.params))
    state, m = run(state, sharding.shard_batch(next(pipeline), actor_mesh), jax.random.key(SEED))
    staleness.append(float(m["async/staleness"]))
    # θ_0 is the reference until the reincarnation step, where θ_2 replaces it.
    want = thetas[0] if s < 2 else thetas[2]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra[al.REFERENCE_KEY]),
                 want)
    assert np.isfinite(m["loss/kl"]) and "rl/is_weight" in m
  assert staleness == [0.0, 1.0, 0.0, 0.0]  # lag 1, then on-policy from step 2


# ---------------------------------------------------------------------------
# Multi-turn rollouts and host-scored rewards.
# ---------------------------------------------------------------------------
def test_multiturn_lag_zero_equals_the_synchronous_multiturn_step():
  """The actor runs the multi-turn rollout (in-graph env), the learner its update."""
  rl_cfg = rl(multiturn=MultiTurnConfig(enabled=True, max_turns=2, turn_tokens=3))
  steps = 2
  params, metrics = run_async(rl_cfg, 0, num_steps=steps)
  _, learner_devs = al.split_devices(4)
  step, state, sh, mesh = build(rl_cfg, learner_devs)
  assert isinstance(step, mt.MultiTurnRLStep)
  fn = rls.jit_rl_step(step, sh, None, sh.params)
  ref = jax.tree.map(jnp.copy, state.params)
  it = Batches()
  for s in range(steps):
    state, m = fn(state, sharding.shard_batch(next(it), mesh), jax.random.key(SEED), ref)
    m = jax.device_get(m)
    assert_same({k: v for k, v in metrics[s].items() if not k.startswith("async/")}, m)
    assert m["multiturn/obs_tokens"] > 0 and m["multiturn/turns"] > 1  # observations appended
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))


def test_host_reward_lag_one_is_reproducible_and_equals_the_in_graph_reward():
  """Scored on the host between actor and learner (a background thread): the same
  rewards, metrics and params as the in-graph reward, and the same in two runs."""
  rl_cfg = rl()
  p_dev, m_dev = run_async(rl_cfg, 1, num_steps=2)
  p1, m1 = run_async(rl_cfg, 1, num_steps=2, host_reward=host_target_reward)
  p2, m2 = run_async(rl_cfg, 1, num_steps=2, host_reward=host_target_reward)
  for a, b in zip(m1, m2, strict=True):
    assert_same(a, b)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  for a, b in zip(m1, m_dev, strict=True):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["reward/mean"], b["reward/mean"])
    np.testing.assert_array_equal(a["reward/correct"], b["reward/correct"])
    for k in a:  # the same rewards into the same learner jit; the actor's jit differs
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert m1[-1]["async/staleness"] == 1 and m1[0]["reward/mean"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p_dev)


def test_host_reward_errors_reach_the_learner_step():
  def broken(ro):
    raise RuntimeError("verifier crashed")
  run, state, pipeline, actor_mesh = actor_learner(rl(), 1, num_steps=2, host_reward=broken)
  with pytest.raises(RuntimeError, match="verifier crashed"):
    run(state, sharding.shard_batch(next(pipeline), actor_mesh), jax.random.key(SEED))
  with pytest.raises(ValueError, match="remax"):
    actor_learner(rl_config.from_preset("remax", group_size=4, max_new_tokens=5), 1,
                  host_reward=host_target_reward)


# ---------------------------------------------------------------------------
# Through the trainer: config routing, checkpoints, kill + resume.
# ---------------------------------------------------------------------------
def async_cfg(num_steps, lag=1, **rl_kw):
  c = config_lib.default_configdict(kind="rl", rl_preset="grpo")
  config_lib.use_builtin_task(c, "arithmetic", max_digits=1, batch_size=8, num_train=400,
                              num_test=16)
  c.model.builtin = "nano"
  c.rl.group_size, c.rl.max_new_tokens, c.rl.kl_coef = 2, 4, 0.0
  c.rl.async_lag = lag
  c.rl.off_policy.correction = "mis"
  for k, v in rl_kw.items():
    setattr(c.rl, k, v)
  c.reward.components = (("correct", 1.0), ("format", 0.5))
  c.eval.num_examples = 0
  c.checkpoint.save_interval_steps = 2
  c.checkpoint.async_save = False
  c.trainer.actor_devices = 4
  c.trainer.num_steps = num_steps
  c.trainer.log_every = 1
  c.trainer.progress = False
  return config_lib.from_configdict(c)


ROOT = pathlib.Path(__file__).resolve().parents[1]
_KILLED_ASYNC_RUN = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from actor_learner_test import async_cfg
from jaxrl_llm import trainer
from jaxrl_llm.rl import actor_learner as al
log = open(sys.argv[2], "a")
def hook(self, step, ids):
  if step == 3:
    assert self._pending, "the kill must happen with a rollout in flight"
    os.kill(os.getpid(), signal.SIGKILL)
  log.write(json.dumps([step, ids.tolist()]) + "\\n")
  log.flush()
al.ActorLearner.consume_hook = hook
trainer.run(async_cfg(int(sys.argv[4])), sys.argv[3])
"""


def record_prompts(monkeypatch):
  """Records (step, prompt ids) as the learner consumes them."""
  seen = []

  def hook(self, step, ids):
    seen.append((step, ids.tolist()))
  monkeypatch.setattr(al.ActorLearner, "consume_hook", hook)
  return seen


def test_kill_with_rollout_in_flight_then_resume_neither_loses_nor_repeats(tmp_path,
                                                                          monkeypatch):
  n = 6
  straight = record_prompts(monkeypatch)
  trainer.run(async_cfg(n), str(tmp_path / "straight"))
  assert [s for s, _ in straight] == list(range(n))
  rows = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
  by_step = {r["step"]: r for r in rows if "async/staleness" in r}
  assert [by_step[s]["async/staleness"] for s in range(1, n + 1)] == [0] + [1] * (n - 1)
  assert all("rl/is_clip_frac" in by_step[s] for s in by_step)  # rl.off_policy (mis) metrics
  # Killed (SIGKILL) while consuming step 3 (checkpoint at step 2, rollouts 3 and 4 in
  # flight) ...
  workdir, log = str(tmp_path / "killed"), tmp_path / "consumed.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _KILLED_ASYNC_RUN, str(ROOT / "tests"),
                         str(log), workdir, str(n)], env=env, capture_output=True,
                        timeout=600, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
  first = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
  assert [s for s, _ in first] == [0, 1, 2]
  # ... then resumed from the checkpoint of step 2: steps 2..5 are run again.
  second = record_prompts(monkeypatch)
  trainer.run(async_cfg(n), workdir)
  assert [s for s, _ in second] == [2, 3, 4, 5]
  consumed = dict(first)
  consumed.update(second)  # step 2 ran twice (after the checkpoint): its prompts once
  assert consumed == dict(straight)
  ids = [i for s in range(n) for i in consumed[s]]
  assert len(ids) == len(set(ids))  # one epoch here: no prompt twice


def test_config_refuses_bad_combinations():
  cfg = async_cfg(2)
  with pytest.raises(ValueError, match="trainer.actor_devices"):
    dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, split_mode=True))
  with pytest.raises(ValueError, match="rl.async_lag"):
    dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, actor_devices=0))
  # A host environment runs between compiled turns (split mode): not in the actor's jit.
  tool = dataclasses.replace(cfg, rl=dataclasses.replace(
      cfg.rl, multiturn=MultiTurnConfig(enabled=True, env="tool", env_options={"obs_len": 8})))
  with pytest.raises(ValueError, match=r"rl.multiturn.env='tool'.*trainer.actor_devices=0"):
    al.check_async_config(tool)
  al.check_async_config(dataclasses.replace(cfg, rl=dataclasses.replace(
      cfg.rl, multiturn=MultiTurnConfig(enabled=True, env="calculator"))))  # in-graph: runs


def test_async_run_scores_host_components_on_the_host(tmp_path):
  """reward.components with a host component ("math") go through run_rl_async."""
  cfg = async_cfg(2)
  cfg = dataclasses.replace(cfg, reward=dataclasses.replace(
      cfg.reward, components=(("math", 1.0), ("format", 0.5))))
  trainer.run(cfg, str(tmp_path))
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  scored = [r for r in rows if "reward/math" in r]
  assert len(scored) == 2 and all(np.isfinite(r["loss/policy"]) for r in scored)
  assert all(0.0 <= r["reward/math"] <= 1.0 for r in scored)
