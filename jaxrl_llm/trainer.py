"""Training runs: build everything from an `ExperimentConfig`, then loop.

`run(cfg, workdir)` is what `launch/train.py` calls and what a notebook can
call. A run resumes from `<workdir>/checkpoints` when a checkpoint is there,
saves at intervals and on SIGTERM, writes metrics to JSONL + TensorBoard, and
returns the final evaluation metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrl_llm import config as config_lib
from jaxrl_llm import eval as eval_lib
from jaxrl_llm import fileio, lora, memory, optim, sharding
from jaxrl_llm.checkpoint import Checkpointer, NonFiniteStateError, PreemptionGuard
from jaxrl_llm.data.builders import load_split
from jaxrl_llm.data.pipeline import DataIterator
from jaxrl_llm.metrics import (
  AsyncMetrics,
  MetricWriter,
  NonFiniteError,
  NonFiniteGuard,
  Progress,
  read_metrics,
)
from jaxrl_llm.models import decoder
from jaxrl_llm.rewards import registry
from jaxrl_llm.rl import rl_step as rl_lib
from jaxrl_llm.sft import sft_step
from jaxrl_llm.tokenizers import load_tokenizer
from jaxrl_llm.train_state import create_train_state

HOST_COMPONENTS = ("countdown", "math")
_GUARD: Optional[PreemptionGuard] = None  # installed by the outermost `run`


class Preempted(Exception):
  """Raised at a safe point after SIGTERM, once the checkpoint is saved."""


def _say(msg: str) -> None:
  """Progress messages a user should see (process 0 only)."""
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)


say = _say  # public: progress messages of a run (process 0 prints)


# ---------------------------------------------------------------------------
# Model, params and evaluation.
# ---------------------------------------------------------------------------
def model_config(cfg: config_lib.ExperimentConfig, tokenizer):
  spec = cfg.model
  if spec.decode_matmul != "xla" and jax.device_count() > 1:
    raise ValueError(f"model.decode_matmul={spec.decode_matmul!r} runs its kernel on one "
                     f"device, but this run has {jax.device_count()}: set "
                     "model.decode_matmul='xla' for a sharded model")
  if spec.source == "builtin":
    return config_lib.builtin_model_config(spec, tokenizer.vocab_size)
  from jaxrl_llm.models import hf
  hf_config = json.loads(fileio.read_text(fileio.join(spec.path, "config.json")))
  model_cfg = hf.config_from_hf(hf_config)
  model_cfg = model_cfg.replace(dtype=spec.dtype, param_dtype=spec.param_dtype,
                                remat=spec.remat, attention_impl=spec.attention_impl,
                                decode_matmul=spec.decode_matmul, lora=spec.lora,
                                float32_logprob_head=spec.float32_logprob_head)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > model vocab "
                     f"{model_cfg.vocab_size}: data.tokenizer does not belong to {spec.path}")
  return model_cfg


def _abstract_params(model_cfg, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      decoder.param_shapes(model_cfg), shardings)


def initial_params(cfg: config_lib.ExperimentConfig, workdir: str, model_cfg, param_shardings):
  """The starting weights (also the RL reference): init_from, SFT warm-start, HF, or None.

  Under LoRA (model.lora.rank > 0) the base is read as below and adapters are
  added (`lora.add_adapters`); a checkpoint that holds adapters of the same
  settings gives them too (see `lora.initial_params_with_adapters`).
  """
  if model_cfg.lora is not None:
    return lora.initial_params_with_adapters(
        cfg, workdir, model_cfg, param_shardings, initial_params,
        rng=jax.random.fold_in(jax.random.key(cfg.seed), 1))
  if cfg.trainer.init_from:
    _say(f"Initialising params from {cfg.trainer.init_from}")
    return Checkpointer(cfg.trainer.init_from, create=False).restore_params(
        _abstract_params(model_cfg, param_shardings))
  ws = cfg.trainer.sft_warmstart
  if cfg.kind != "sft" and ws.num_steps > 0:
    sft_dir = fileio.join(workdir, "sft_warmstart")
    _say(f"Stage 1: SFT warm-start for {ws.num_steps} steps in {sft_dir}")
    run(sft_warmstart_config(cfg), sft_dir)
    _say("Stage 2: " + cfg.kind.upper())
    return Checkpointer(sft_dir, create=False).restore_params(
        _abstract_params(model_cfg, param_shardings))
  if cfg.model.source == "hf":
    from jaxrl_llm.models import hf
    _, params = hf.load_hf(cfg.model.path, dtype=cfg.model.dtype,
                           param_dtype=cfg.model.param_dtype, shardings=param_shardings)
    return params
  return None


def sft_warmstart_config(cfg: config_lib.ExperimentConfig) -> config_lib.ExperimentConfig:
  ws = cfg.trainer.sft_warmstart
  model = cfg.model
  if model.lora.enabled and model.lora.full_sft_warmstart:  # all weights; adapters come after
    model = dataclasses.replace(model, lora=lora.LoraConfig())
  elif model.lora.adapter_only_checkpoints:  # the next stage starts from its full params
    # (on a float base: full checkpoints hold no quantized base; the next stage quantizes it)
    model = dataclasses.replace(model, lora=model.lora.replace(adapter_only_checkpoints=False,
                                                               quantize_base="none"))
  return dataclasses.replace(
      cfg, kind="sft", model=model,
      optim=optim.OptimConfig(learning_rate=ws.learning_rate, schedule="cosine",
                              warmup_steps=min(100, ws.num_steps // 4),
                              total_steps=ws.num_steps, end_lr_ratio=0.1, weight_decay=0.0),
      # Preference tasks warm-start on the underlying task's problems.
      data=dataclasses.replace(
          cfg.data, batch_size=ws.batch_size,
          source="arithmetic" if cfg.data.source == "preference_arithmetic" else cfg.data.source),
      eval=dataclasses.replace(cfg.eval, every_steps=0),
      trainer=dataclasses.replace(cfg.trainer, num_steps=ws.num_steps, init_from="",
                                  sft_warmstart=config_lib.SFTWarmstart(), actor_devices=0),
      checkpoint=dataclasses.replace(cfg.checkpoint,
                                     save_interval_steps=max(ws.num_steps // 2, 1)))


def make_evaluator(cfg: config_lib.ExperimentConfig, model_cfg, tokenizer, mesh, workdir):
  """The held-out evaluator of a run (`jaxrl_llm.eval.make_run_evaluator`): the same one
  `launch/eval.py` builds, scored as the run is rewarded."""
  return eval_lib.make_run_evaluator(cfg, model_cfg, tokenizer, mesh, workdir, say=_say)


def summary_table(before: dict, after: dict, steps: int, kind: str) -> str:
  """A before/after table of the held-out metrics."""
  head = f"after {steps} {kind}"
  w = max(len(head), 10) + 2
  rows = [f"{'held-out metric':<28}{'before':>10}{head:>{w}}"]
  for key in sorted(after):
    if key in before and key != "eval/num_examples":
      rows.append(f"{key:<28}{before[key]:>10.3f}{after[key]:>{w}.3f}")
  rule = "-" * len(rows[0])
  return "\n".join([rule, rows[0], rule, *rows[1:], rule])


# ---------------------------------------------------------------------------
# The loop shared by every kind of run.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  cfg: config_lib.ExperimentConfig
  workdir: str
  mesh: Any
  model_cfg: Any
  tokenizer: Any
  tx: Any
  state: Any
  state_shardings: Any
  iterator: DataIterator
  step_fn: Callable       # (state, batch, rng) -> (state, metrics)
  tokens_key: str         # the metric that counts a step's tokens
  evaluate: Optional[Callable] = None


def _logged_final_evaluation(workdir: str, step: int, start_file: str) -> Optional[dict]:
  """The final evaluation row of `step` in the run's metrics, if it was flushed.

  An evaluation row has exactly the keys of the step-0 evaluation
  (`eval_start.json`); without that file nothing is recognised and the
  evaluation is run again.
  """
  if not fileio.exists(start_file):
    return None
  keys = set(json.loads(fileio.read_text(start_file)))
  for row in reversed(read_metrics(workdir)):
    if row.get("step") == step and set(row) - {"step"} == keys:
      return {k: row[k] for k in keys}
  return None


def _loop(r: Run) -> dict[str, float]:
  """Train to cfg.trainer.num_steps, resuming from the workdir's latest checkpoint.

  Reliability: a checkpoint is written only after the metrics up to its step
  are flushed (periodic, preemption, non-finite stop and final saves alike);
  a resumed run first removes the metric rows of the steps after its
  checkpoint, which it runs again; a state with NaN/Inf values is never
  saved (`Checkpointer.save`), so the newest checkpoint is always finite.
  """
  cfg = r.cfg
  num_steps = cfg.trainer.num_steps
  ckpt = Checkpointer(r.workdir, cfg.checkpoint)
  if cfg.model.lora.enabled and cfg.model.lora.adapter_only_checkpoints:
    ckpt = lora.AdapterOnlyCheckpointer(ckpt, r.state)  # the frozen base: from the model source

  def check_resume():
    """Refuses a checkpoint saved under another kind, model, tokenizer or algorithm."""
    latest = ckpt.latest_step()
    saved = None if latest is None else ckpt.restore_extra(latest).get("config")
    conflicts = [] if saved is None else config_lib.resume_conflicts(saved, cfg)
    if not conflicts:
      return
    listed = "\n  ".join(conflicts)
    if cfg.trainer.allow_config_change:
      _say(f"Resuming step {latest} of {ckpt.directory} under a changed config "
           f"(trainer.allow_config_change=True):\n  {listed}")
      return
    raise ValueError(
        f"The checkpoint of step {latest} in {ckpt.directory} was saved by a different run:"
        f"\n  {listed}\nTo start a new stage from its weights, give this run a new --workdir "
        f"and set trainer.init_from={r.workdir!r}; to resume it under this config anyway, set "
        "trainer.allow_config_change=True.")

  try:
    check_resume()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), r.state)
    restored = ckpt.restore(abstract)
  except BaseException:
    ckpt.close()
    raise
  state = r.state
  if restored is not None:
    state, extra = restored
    r.iterator.set_state(extra["data"])
    _say(f"Resuming from step {int(state.step)} (checkpoint in {ckpt.directory})")
  step = int(state.step)
  writer = MetricWriter(r.workdir, cfg.metrics, run_config=config_lib.to_dict(cfg))
  # Rows of steps this run logs (again): after the checkpoint, or all of a fresh start's.
  dropped = writer.discard_after(step if restored is not None else -1)
  if dropped:
    _say(f"metrics: removed {dropped} rows of steps after {step} logged by the interrupted "
         "run; those steps run again")
  rng = jax.random.key(cfg.seed)
  final: dict[str, float] = {}
  start_file = fileio.join(r.workdir, "eval_start.json")
  final_file = fileio.join(r.workdir, "eval_final.json")  # written once the final row is flushed

  def final_evaluation():
    result = r.evaluate(state.params, step)
    writer.write(step, result)
    writer.flush()
    if jax.process_index() == 0:
      fileio.write_text(final_file, json.dumps(result))
    _say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    if fileio.exists(start_file):
      _say(summary_table(json.loads(fileio.read_text(start_file)), result, num_steps, cfg.kind))
    return result

  if step >= num_steps:
    _say(f"Run already complete ({step}/{num_steps} steps) in {r.workdir}")
    try:
      if r.evaluate is not None and step == num_steps:
        if fileio.exists(final_file):
          final = json.loads(fileio.read_text(final_file))
        elif (logged := _logged_final_evaluation(r.workdir, step, start_file)) is not None:
          # stopped after flushing the final row, before writing its marker
          if jax.process_index() == 0:
            fileio.write_text(final_file, json.dumps(logged))
          final = logged
        else:  # stopped after the last checkpoint, before its evaluation was written
          _say(f"final evaluation of step {step} is missing (the run stopped during it); "
               "running it now")
          final = final_evaluation()
    finally:
      writer.close()
      ckpt.close()
    return final

  if step == 0 and r.evaluate is not None:
    first = r.evaluate(state.params, 0)
    writer.write(0, first)
    if jax.process_index() == 0:
      fileio.write_text(start_file, json.dumps(first))
    _say("step 0: " + ", ".join(f"{k}={v:.4g}" for k, v in first.items()))
  progress = Progress(num_steps, show=("loss/nll", "loss/policy", "loss/total", "reward/mean",
                                       "rl/accuracy", "pref/accuracy", "rm/accuracy"),
                      log_fn=_say) if cfg.trainer.progress else None
  guard = NonFiniteGuard(cfg.trainer.nan_policy)
  pending = AsyncMetrics()
  preempt = _GUARD or PreemptionGuard()
  extra_fn = lambda: {"data": r.iterator.get_state(), "config": config_lib.to_dict(cfg)}

  def handle(item):
    prev_step, host = item
    host["time/step_seconds"] = time.perf_counter() - handle.last_time
    handle.last_time = time.perf_counter()
    finite = all(np.isfinite(v) for v in host.values())
    if prev_step % cfg.trainer.log_every == 0 or prev_step == num_steps or not finite:
      writer.write(prev_step, host)  # non-finite rows always: they say where it went wrong
    try:
      guard.check(host, step=prev_step)
    except NonFiniteError:
      writer.flush()
      try:
        ckpt.save(int(state.step), state, extra=extra_fn(), force=True)
        ckpt.wait()
      except NonFiniteStateError:
        pass  # the state diverged too: the newest checkpoint stays the last finite one
      latest = ckpt.latest_step()
      _say(f"Stopped on non-finite metrics at step {prev_step}; " + (
          f"the last good state is step {latest} in {ckpt.directory}" if latest is not None
          else "no finite state was saved"))
      raise
    if progress is not None:
      progress.update(prev_step, tokens=host.get(r.tokens_key, 0.0), metrics=host)
  handle.last_time = time.perf_counter()

  def save(at_step: int) -> None:
    """The metrics up to `at_step` reach the workdir, then its checkpoint is written."""
    item = pending.flush()
    if item is not None:
      handle(item)
    writer.flush()
    try:
      ckpt.save(at_step, state, extra=extra_fn(), force=True)
    except NonFiniteStateError as e:
      raise NonFiniteStateError(
          f"{e} Training diverged before step {at_step} (see the non-finite metrics in "
          f"{r.workdir}): lower optim.learning_rate or keep optim.grad_clip_norm on, then "
          "rerun; the run resumes from that checkpoint.") from e

  try:
    while step < num_steps:
      batch = sharding.shard_batch(next(r.iterator), r.mesh)
      state, metrics = r.step_fn(state, batch, rng)
      step += 1
      item = pending.push(step, metrics)
      if item is not None:
        handle(item)
      evaluate_now = (r.evaluate is not None and cfg.eval.every_steps
                      and step % cfg.eval.every_steps == 0 and step < num_steps)
      if evaluate_now:
        ev = r.evaluate(state.params, step)
        writer.write(step, ev)
        _say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
      if ckpt.should_save(step):
        save(step)
      if preempt.should_stop(step):
        save(step)
        ckpt.wait()
        _say(f"Preempted: saved step {step} to {ckpt.directory}; rerun with the same "
             "--workdir to resume")
        raise Preempted(step)
    item = pending.flush()
    if item is not None:
      handle(item)
    if progress is not None:
      progress.close()
    save(step)
    if r.evaluate is not None:
      ckpt.wait()  # the final checkpoint is complete before its evaluation is recorded
      final = final_evaluation()
  finally:
    writer.close()
    ckpt.wait()
    ckpt.close()
  return final


# ---------------------------------------------------------------------------
# Kinds of runs.
# ---------------------------------------------------------------------------
def _common(cfg: config_lib.ExperimentConfig, workdir: str, mode: str, extra_fn=dict,
            teacher=None, devices=None):
  mesh = sharding.make_mesh(cfg.mesh, devices)  # devices: the learner's in an actor-learner run
  _say(f"jaxrl_llm {cfg.kind}: {jax.device_count()} devices "
       f"({jax.devices()[0].platform}), {jax.process_count()} process(es), mesh "
       f"{dict(mesh.shape)}, workdir {workdir}")
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  model_cfg = model_config(cfg, tokenizer)
  plan = memory.plan_for_experiment(cfg, model_cfg, mesh.size, teacher=teacher)
  _say(plan.table())
  device_bytes = memory.device_memory_bytes()
  if device_bytes:
    memory.check_fits(plan, device_bytes)  # refuse a plan that cannot fit, with the numbers
  from jaxrl_llm.train_state import param_shardings
  p_sh = param_shardings(model_cfg, mesh, cfg.mesh.rules)
  params = initial_params(cfg, workdir, model_cfg, p_sh)
  tx = optim.make_optimizer(cfg.optim)
  if model_cfg.lora is not None:
    tx = lora.freeze_base(tx)  # optimizer state and updates for the adapters only
  state, shardings = create_train_state(model_cfg, tx, jax.random.key(cfg.seed), mesh,
                                        cfg.mesh.rules, params=params, extra_fn=extra_fn)
  _say(f"model: {model_cfg.family}, {model_cfg.num_params() / 1e6:.2f}M params, "
       f"{model_cfg.num_layers} layers, d={model_cfg.hidden_size}")
  iterator = DataIterator(cfg.data, "train", mode=mode, tokenizer=tokenizer, workdir=workdir)
  evaluate = None
  if cfg.eval.num_examples > 0 and cfg.data.kind in ("prompt", "preference"):
    evaluate = make_evaluator(cfg, model_cfg, tokenizer, mesh, workdir)
  return mesh, tokenizer, model_cfg, tx, state, shardings, iterator, evaluate


def run_sft(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(cfg, workdir, "sft")
  step = functools.partial(sft_step, cfg=model_cfg, tx=tx, microbatches=cfg.trainer.microbatches,
                           mesh=mesh, rules=cfg.mesh.rules)
  step_fn = jax.jit(step, in_shardings=(sh, None, None), out_shardings=(sh, None),
                    donate_argnums=(0,))
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it, step_fn,
                   "train/tokens", evaluate))


def run_rl(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  if cfg.trainer.actor_devices:  # asynchronous actor-learner on two device groups
    from jaxrl_llm.rl import actor_learner
    return actor_learner.run_rl_async(cfg, workdir)
  rl = cfg.rl
  if rl.length_shaping == "hapo" and rl.hapo_num_prompts < cfg.data.num_train:
    raise ValueError(f"rl.hapo_num_prompts={rl.hapo_num_prompts} must cover every training "
                     f"prompt id (data.num_train={cfg.data.num_train})")
  if cfg.cooper.enabled:  # the reward model trained in the step (jaxrl_llm.rl.cooper)
    return _run_cooper(cfg, workdir)
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(
      cfg, workdir, "rl", extra_fn=lambda: rl_lib.init_rl_extra(rl))
  names = [n for n, _ in cfg.reward.components]
  host_needed = any(n in HOST_COMPONENTS for n in names)
  examples = list(load_split(cfg.data, "train", workdir=workdir)) if (
      host_needed or cfg.trainer.split_mode) else None
  rm = restore_reward_model(cfg, tok, mesh)  # None unless reward.components use one
  reward_fn = registry.build_reward_fn(
      cfg.reward.components, tok, examples=examples,
      reward_model=None if rm is None else rm.reward_fn(),
      math_last_number_fallback=cfg.reward.math_last_number_fallback)
  if rl.advantage == "gae":  # PPO: the critic joins the state (jaxrl_llm.rl.ppo_step)
    from jaxrl_llm.rl import ppo_step as ppo_lib
    state, sh, step = ppo_lib.build_ppo_step(cfg, model_cfg, tx, reward_fn, tok, mesh, state,
                                             sh, say=_say)
  elif rl.multiturn.enabled:  # turns with an environment between them (jaxrl_llm.rl.multiturn)
    from jaxrl_llm.rl import multiturn as multiturn_lib
    step = multiturn_lib.build_step(cfg, model_cfg, tx, reward_fn, tok, mesh,
                                    examples=examples)  # host envs reset from their row
  else:
    step = rl_lib.RLStep(model_cfg, rl, tx, reward_fn, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         mesh=mesh, rules=cfg.mesh.rules,
                         skip_nonfinite=True)
    if rl.depo.enabled:  # DEPO: the step also scores each group (jaxrl_llm.rl.depo_run)
      from jaxrl_llm.rl import depo_run
      step = depo_run.depo_step(step)
  ref_params = None
  if rl.needs_reference and model_cfg.lora is None:  # LoRA: the step reads the frozen base
    # The reference is the starting policy: copy it before the state is donated.
    ref_params = jax.tree.map(jnp.copy, state.params)
  if cfg.trainer.split_mode:  # rewards on the host between the rollout and the update
    scorer = registry.host_scorer(
        cfg.reward.components, tok, examples,
        math_last_number_fallback=cfg.reward.math_last_number_fallback,
        reward_model=None if rm is None else rm.reward_fn(),
        reward_params=None if rm is None else rm.params)
    if rl.multiturn.enabled:
      split = multiturn_lib.make_multiturn_split_step(
          step, host_reward=multiturn_lib.final_turn_host_reward(scorer))
    else:
      split = rl_lib.make_split_step(step, host_reward=scorer)
    step_fn = lambda s, b, r: split(s, b, r, ref_params)
  else:
    rm_params, rm_sh = (None, None) if rm is None else (rm.params, rm.shardings)
    jitted = rl_lib.jit_rl_step(step, sh, None, sh.params if ref_params is not None else None,
                                rm_sh)
    step_fn = lambda s, b, r: jitted(s, b, r, ref_params, rm_params)
  if rl.depo.enabled:  # DEPO: curated prompts, explorability filter with replay
    it, step_fn = depo_run.setup(cfg, workdir, step, state.params, it, step_fn, say=_say)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it, step_fn,
                   "rl/completion_tokens", evaluate))


def run_dpo(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Offline preference optimisation (paired losses, or KTO on unpaired data)."""
  from jaxrl_llm.preference import step as pref_lib
  pref = dataclasses.replace(cfg.preference, microbatches=cfg.trainer.microbatches)
  mode = "unpaired" if pref.unpaired else "preference"
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(cfg, workdir, mode)
  step = pref_lib.PreferenceStep(model_cfg, pref, tx, mesh=mesh, rules=cfg.mesh.rules)
  ref_params = (jax.tree.map(jnp.copy, state.params)  # LoRA: the step reads the frozen base
                if pref.needs_reference and model_cfg.lora is None else None)
  if pref.reference_from or pref.guiding_steps:  # Pre-DPO: a guiding reference
    ref_params = _guiding_reference(cfg, workdir, model_cfg, sh.params)
  jitted = pref_lib.jit_preference_step(step, sh, sh.params if ref_params is not None else None)
  step_fn = lambda s, b, r: jitted(s, b, r, ref_params)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it, step_fn,
                   "pref/pairs", evaluate))


def _guiding_reference(cfg, workdir, model_cfg, param_shardings):
  """Pre-DPO's π_ref: a finished run's params, or a first round trained here first."""
  from jaxrl_llm.preference import pre_dpo
  pref = cfg.preference
  if model_cfg.lora is not None:
    raise ValueError("preference.reference_from / guiding_steps with model.lora: a guiding "
                     "reference is supported for full fine-tuning only; set model.lora.rank=0")
  source = pref.reference_from
  if pref.guiding_steps:
    source = fileio.join(workdir, pre_dpo.GUIDING_DIR)
    _say(f"Pre-DPO round 1: guiding reference, {pref.guiding_steps} steps in {source}")
    run(pre_dpo.guiding_round_config(cfg, workdir), source)
    _say("Pre-DPO round 2: the starting policy against the guiding reference")
  _say(f"Reference params from {source}")
  try:
    return Checkpointer(source, create=False).restore_params(
        _abstract_params(model_cfg, param_shardings))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"preference.reference_from={source!r}: {e}") from e


def run_online_dpo(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Online DPO / SEA / DICE: sample, score with the reward components, pair, update."""
  from jaxrl_llm.preference import online as online_lib
  online = cfg.online
  if cfg.sea.enabled:  # SEA with an ensemble trained online (jaxrl_llm.preference.sea)
    return _run_sea(cfg, workdir)
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(cfg, workdir, "rl")
  rm = restore_reward_model(cfg, tok, mesh)  # None unless reward.components use one
  if online.selection == "sea" and rm.num_heads < 2:
    raise ValueError(f"online.selection='sea' needs an ensemble to disagree, but the reward "
                     f"model at {rm.workdir!r} has 1 head: train it with "
                     "reward_model.num_heads >= 2")
  reward_fn = registry.build_reward_fn(
      cfg.reward.components, tok, examples=_host_examples(cfg, workdir),
      reward_model=None if rm is None else rm.reward_fn(with_members=online.selection == "sea"),
      math_last_number_fallback=cfg.reward.math_last_number_fallback)
  step = online_lib.OnlineDPOStep(model_cfg, online, tx, reward_fn, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id, mesh=mesh, rules=cfg.mesh.rules)
  ref_params = None
  if online.preference.needs_reference and online.reference_from:
    _say(f"Reference params from {online.reference_from}")
    try:
      ref_params = Checkpointer(online.reference_from, create=False).restore_params(
          _abstract_params(model_cfg, sh.params))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"online.reference_from={online.reference_from!r}: {e}") from e
  elif online.preference.needs_reference and model_cfg.lora is None:  # LoRA: the frozen base
    ref_params = jax.tree.map(jnp.copy, state.params)
  rm_params, rm_sh = (None, None) if rm is None else (rm.params, rm.shardings)
  jitted = online_lib.jit_online_dpo_step(step, sh,
                                          sh.params if ref_params is not None else None, rm_sh)
  step_fn = lambda s, b, r: jitted(s, b, r, ref_params, rm_params)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it, step_fn,
                   "pref/pairs", evaluate))


def _run_sea(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """SEA as published: verifier-labelled pairs, an ensemble RM trained in the step."""
  from jaxrl_llm.preference import online as online_lib
  from jaxrl_llm.preference import sea as sea_lib
  D = model_config(cfg, load_tokenizer(cfg.data.tokenizer)).hidden_size
  extra_fn = lambda: sea_lib.init_extra(cfg.sea, D, jax.random.fold_in(jax.random.key(cfg.seed),
                                                                       7))
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(cfg, workdir, "rl", extra_fn)
  reward_fn = registry.build_reward_fn(
      cfg.reward.components, tok, examples=_host_examples(cfg, workdir),
      math_last_number_fallback=cfg.reward.math_last_number_fallback)
  base = online_lib.OnlineDPOStep(model_cfg, cfg.online, tx, reward_fn, eos_id=tok.eos_id,
                                  pad_id=tok.pad_id, mesh=mesh, rules=cfg.mesh.rules)
  ref_params = None
  if cfg.online.preference.needs_reference and model_cfg.lora is None:  # also the features
    ref_params = jax.tree.map(jnp.copy, state.params)
  jitted = sea_lib.jit_sea_step(sea_lib.SEAStep(base, cfg.sea), sh,
                                sh.params if ref_params is not None else None)
  step_fn = lambda s, b, r: jitted(s, b, r, ref_params, None)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it, step_fn,
                   "pref/pairs", evaluate))


def _run_cooper(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Cooper: GRPO on a reward model that is trained on verifier-labelled rollout pairs."""
  from jaxrl_llm.rl import cooper as cooper_lib
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(
      cfg, workdir, "rl", extra_fn=lambda: rl_lib.init_rl_extra(cfg.rl))
  rm = restore_reward_model(cfg, tok, mesh)
  host = _uses_host_rewards(cfg) or cfg.cooper.verifier in registry.HOST_COMPONENTS
  examples = list(load_split(cfg.data, "train", workdir=workdir)) if host else None
  step, state, sh = cooper_lib.build_step(cfg, model_cfg, tx, tok, mesh, state, sh, rm, examples)
  _say(f"cooper: verifier {cfg.cooper.verifier!r}, {cfg.cooper.negative} negatives, reward "
       f"model lr {cfg.cooper.rm_learning_rate:g} x {cfg.cooper.rm_steps} step(s)")
  ref_params = None
  if cfg.rl.needs_reference and model_cfg.lora is None:  # LoRA: the step reads the base
    ref_params = jax.tree.map(jnp.copy, state.params)
  jitted = cooper_lib.jit_cooper_step(step, sh, sh.params if ref_params is not None else None)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it,
                   lambda s, b, r: jitted(s, b, r, ref_params), "rl/completion_tokens",
                   evaluate))


def run_reward_model(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Bradley–Terry reward model training; evaluates pair accuracy on the test split."""
  from jaxrl_llm.preference import reward_model as rm_lib
  rm = cfg.reward_model
  mesh = sharding.make_mesh(cfg.mesh)
  tok = load_tokenizer(cfg.data.tokenizer)
  model_cfg = model_config(cfg, tok)
  from jaxrl_llm.train_state import param_shardings
  trunk = initial_params(cfg, workdir, model_cfg, param_shardings(model_cfg, mesh,
                                                                  cfg.mesh.rules))
  tx = optim.make_optimizer(cfg.optim)
  if model_cfg.lora is not None:
    tx = lora.freeze_base(tx)  # adapters and the head train; the trunk's base is frozen
  state, sh = rm_lib.create_reward_model_state(model_cfg, tx, jax.random.key(cfg.seed), mesh,
                                               cfg.mesh.rules, num_heads=rm.num_heads,
                                               trunk_params=trunk)
  step = rm_lib.RewardModelStep(model_cfg, tx, num_heads=rm.num_heads,
                                aggregation=rm.aggregation, lam=rm.lam, sft_coef=rm.sft_coef,
                                microbatches=cfg.trainer.microbatches, mesh=mesh,
                                rules=cfg.mesh.rules)
  jitted = rm_lib.jit_reward_model_step(step, sh)
  it = DataIterator(cfg.data, "train", mode="preference", tokenizer=tok, workdir=workdir)
  # Every held-out pair is scored: the batch is a multiple of the device count and the
  # last one is padded with rows (prompt_id -1) that are left out of the metrics.
  devices = jax.device_count()
  eval_batch = -(-min(cfg.eval.batch_size, cfg.eval.num_examples or 1) // devices) * devices
  test_cfg = dataclasses.replace(cfg.data, batch_size=eval_batch)
  test_examples = list(load_split(cfg.data, "test", workdir=workdir))[:cfg.eval.num_examples]
  score = jax.jit(lambda params, b: tuple(
      rm_lib.aggregate(x, rm.aggregation, lam=rm.lam) for x in step.pair_scores(params, b)))

  def evaluate(params, step=None):
    del step
    chosen, rejected = [], []
    for b in DataIterator(test_cfg, "test", mode="preference", tokenizer=tok,
                          examples=test_examples, num_epochs=1, drop_remainder=False,
                          shuffle=False):
      global_b = sharding.shard_batch(b, mesh)
      c, r, ids = sharding.to_host((*score(params, global_b), global_b["prompt_id"]))
      chosen.append(np.asarray(c)[ids >= 0])
      rejected.append(np.asarray(r)[ids >= 0])
    if not chosen:
      return {}
    c, r = np.concatenate(chosen), np.concatenate(rejected)
    return {"eval/pair_accuracy": float(np.mean(c > r)), "eval/margin": float(np.mean(c - r))}

  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it,
                   lambda s, b, r: jitted(s, b, r), "rm/pairs", evaluate))


def restore_reward_model(cfg: config_lib.ExperimentConfig, tokenizer, mesh):
  """The trained reward model at reward.reward_model_path, on `mesh` (None if unused)."""
  if not cfg.reward.reward_model_path:
    return None
  from jaxrl_llm.preference import reward_model as rm_lib
  rm = rm_lib.restore_reward_model(
      cfg.reward.reward_model_path, mesh=mesh, rules=cfg.mesh.rules,
      tokenizer=cfg.data.tokenizer,
      model_config_fn=lambda spec: model_config(dataclasses.replace(cfg, model=spec), tokenizer),
      run_config=cfg)
  if cfg.reward.reward_model_aggregation:
    rm = dataclasses.replace(rm, aggregation=cfg.reward.reward_model_aggregation)
  _say(f"reward model: {rm.num_heads} head(s) ({rm.aggregation}), "
       f"{rm.model.num_params() / 1e6:.2f}M params, step {rm.step} of {rm.workdir}")
  return rm


def _uses_host_rewards(cfg: config_lib.ExperimentConfig) -> bool:
  return any(name in registry.HOST_COMPONENTS for name, _ in cfg.reward.components)


def _host_examples(cfg: config_lib.ExperimentConfig, workdir: str):
  """The training split when a host reward component needs it (looked up by prompt_id)."""
  if _uses_host_rewards(cfg):
    return list(load_split(cfg.data, "train", workdir=workdir))
  return None


def run_iterative_dpo(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Iterative / self-rewarding DPO: rounds of sample → judge → pair → preference steps."""
  from jaxrl_llm.preference import online as online_lib
  it_cfg = cfg.iterative
  it_cfg = dataclasses.replace(it_cfg, preference=dataclasses.replace(
      it_cfg.preference, microbatches=cfg.trainer.microbatches))
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(cfg, workdir, "rl")
  rm = None
  if it_cfg.judge == "self":
    judge = online_lib.self_judge_from_text(tok, it_cfg.judge_suffix, it_cfg.judge_yes)
  else:
    rm = restore_reward_model(cfg, tok, mesh)
    judge = registry.build_reward_fn(
        cfg.reward.components, tok, examples=_host_examples(cfg, workdir),
        reward_model=None if rm is None else rm.reward_fn(),
        math_last_number_fallback=cfg.reward.math_last_number_fallback)
  step = online_lib.IterativeDPO(model_cfg, it_cfg, tx, judge, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, mesh=mesh, rules=cfg.mesh.rules)
  ref_params = None
  if (it_cfg.preference.needs_reference and not it_cfg.update_reference
      and model_cfg.lora is None):  # LoRA: the steps read the frozen base
    ref_params = jax.tree.map(jnp.copy, state.params)  # the starting policy, before donation
  rm_params, rm_sh = (None, None) if rm is None else (rm.params, rm.shardings)
  position = it.get_state()
  example_batch = sharding.shard_batch(next(it), mesh)  # shapes of the round buffers
  it.set_state(position)
  state, sh = step.with_round(state, sh, example_batch, ref_params, rm_params)
  start, train = online_lib.jit_iterative_dpo(
      step, sh, sh.params if ref_params is not None else None, rm_sh)

  def step_fn(s, batch, rng):  # a prompt batch opens a round; {} continues it
    if batch:
      s = start(s, batch, rng, ref_params, rm_params)
    return train(s, rng)

  prompts = online_lib.RoundPrompts(it, it_cfg.steps_per_round)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, prompts, step_fn,
                   "pref/pairs", evaluate))


def teacher_sft_config(cfg: config_lib.ExperimentConfig) -> config_lib.ExperimentConfig:
  """The SFT stage that trains a distillation run's builtin / HF teacher on its task."""
  d = cfg.distill
  spec = config_lib.ModelSpec(source=d.teacher_source, builtin=d.teacher_builtin,
                              path=d.teacher_path, dtype=d.teacher_dtype,
                              param_dtype=d.teacher_dtype)
  ws = config_lib.SFTWarmstart(num_steps=d.teacher_sft_steps,
                               learning_rate=d.teacher_sft_learning_rate,
                               batch_size=d.teacher_sft_batch_size)
  staged = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, sft_warmstart=ws))
  return dataclasses.replace(sft_warmstart_config(staged), model=spec)


def run_distill(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Distillation (`jaxrl_llm.distill`): the teacher's params enter the jitted step.

  With distill.teacher_sft_steps > 0 the teacher is first trained by SFT in
  <workdir>/teacher (reused once finished); the student then starts as any run
  does (trainer.init_from, its SFT warm-start, HF weights or a fresh init).
  """
  from jaxrl_llm import distill as distill_lib
  d = cfg.distill
  teacher_dir = ""
  if d.teacher_sft_steps > 0:
    teacher_dir = fileio.join(workdir, "teacher")
    _say(f"Teacher: SFT for {d.teacher_sft_steps} steps in {teacher_dir}")
    run(teacher_sft_config(cfg), teacher_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  tok = load_tokenizer(cfg.data.tokenizer)
  teacher = distill_lib.load_teacher(
      d, mesh=mesh, rules=cfg.mesh.rules, tokenizer=tok, tokenizer_name=cfg.data.tokenizer,
      model_config_fn=lambda spec: model_config(dataclasses.replace(cfg, model=spec), tok),
      seed=cfg.seed, path=teacher_dir, say=_say, run_config=cfg)
  _say(f"teacher: {teacher.model.family}, {teacher.model.num_params() / 1e6:.2f}M params, "
       f"{teacher.description}; distill.mode={d.mode!r}")
  extra_fn = (lambda: rl_lib.init_rl_extra(cfg.rl)) if d.mode == "on_policy" else dict
  mesh, tok, model_cfg, tx, state, sh, it, evaluate = _common(
      cfg, workdir, d.data_mode, extra_fn=extra_fn, teacher=teacher.model)
  if d.mode != "on_policy":
    step = distill_lib.DistillStep(model_cfg, teacher.model, d, tx, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id, microbatches=cfg.trainer.microbatches,
                                   mesh=mesh, rules=cfg.mesh.rules)
    jitted = distill_lib.jit_distill_step(step, sh, teacher.shardings)
    return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it,
                     lambda s, b, r: jitted(s, b, r, teacher.params), "train/tokens",
                     evaluate))
  rm = restore_reward_model(cfg, tok, mesh)  # None unless reward.components use one
  reward_fn = registry.build_reward_fn(
      cfg.reward.components, tok, examples=_host_examples(cfg, workdir),
      reward_model=None if rm is None else rm.reward_fn(),
      math_last_number_fallback=cfg.reward.math_last_number_fallback)
  step = distill_lib.OnPolicyDistillStep(model_cfg, cfg.rl, tx, reward_fn, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id, mesh=mesh, rules=cfg.mesh.rules,
                                         teacher=teacher.model, distill=d)
  ref_params = None
  if cfg.rl.needs_reference and model_cfg.lora is None:  # LoRA: the step reads the base
    ref_params = jax.tree.map(jnp.copy, state.params)  # the starting policy, before donation
  rm_params, rm_sh = (None, None) if rm is None else (rm.params, rm.shardings)
  jitted = distill_lib.jit_on_policy_step(
      step, sh, sh.params if ref_params is not None else None, rm_sh, teacher.shardings)
  return _loop(Run(cfg, workdir, mesh, model_cfg, tok, tx, state, sh, it,
                   lambda s, b, r: jitted(s, b, r, ref_params, rm_params, teacher.params),
                   "rl/completion_tokens", evaluate))


RUNNERS: dict[str, Callable[[config_lib.ExperimentConfig, str], dict]] = {
    "sft": run_sft,
    "rl": run_rl,
    "dpo": run_dpo,
    "online_dpo": run_online_dpo,
    "reward_model": run_reward_model,
    "iterative_dpo": run_iterative_dpo,
    "distill": run_distill,
}


def run(cfg: config_lib.ExperimentConfig, workdir: str) -> dict[str, float]:
  """Run (or resume) the experiment in `workdir`; returns final eval metrics."""
  global _GUARD
  if cfg.kind not in RUNNERS:
    raise ValueError(f"kind={cfg.kind!r} has no runner; choose one of {tuple(RUNNERS)}")
  fileio.makedirs(workdir)  # any path kind; names a missing package (gcsfs, ...)
  # Checked before any data is built or model compiled (an actor-learner run checks its two
  # meshes in actor_learner.run_rl_async).
  mesh = sharding.make_mesh(cfg.mesh) if not cfg.trainer.actor_devices else None
  shards = sharding.batch_shards(mesh, cfg.mesh.rules) if mesh is not None else 1
  if cfg.data.batch_size % shards:
    raise ValueError(
        f"data.batch_size={cfg.data.batch_size} does not split over the {shards} batch shards "
        f"of the mesh {dict(mesh.shape)}: set data.batch_size to a multiple of {shards}, or "
        "change mesh.shape")
  hf_config_file = fileio.join(cfg.model.path, "config.json") if cfg.model.path else ""
  if cfg.model.source == "hf" and fileio.exists(hf_config_file):
    # Built-in models are checked when the config is built; HF ones once config.json is read.
    from jaxrl_llm.models import hf
    try:
      hf_config = json.loads(fileio.read_text(hf_config_file))
    except json.JSONDecodeError as e:
      raise ValueError(f"{hf_config_file} is not valid JSON ({e}): the checkpoint at "
                       "model.path is damaged or incomplete; download or copy it again") from e
    max_positions = hf.config_from_hf(hf_config).max_position_embeddings
    config_lib.check_sequence_lengths(cfg, max_positions, f"model.path={cfg.model.path!r}")
  if _GUARD is not None:  # a nested stage (e.g. the SFT warm-start) of an outer run
    return RUNNERS[cfg.kind](cfg, workdir)
  # SIGTERM from here on is handled at the next safe point: save, then exit cleanly.
  _GUARD = PreemptionGuard()
  _GUARD.install()
  try:
    return RUNNERS[cfg.kind](cfg, workdir)
  except Preempted:
    return {}
  finally:
    _GUARD.uninstall()
    _GUARD = None
