"""DEPO in a training run: the step's per-group scores, offline curation, the sampler.

The formulas and their sources are in `jaxrl_llm.rl.depo`. Here:

  DEPOStep          the one-jit `RLStep` that also returns E(x) of every group
                    (`depo/explorability` is logged; the per-group array under
                    GROUP_KEY is taken out of the metrics by `wrap_step_fn`).
  curate            offline selection with the starting policy: pool, k-center
                    diversity on prompt embeddings, pass-rate band over k
                    rollouts; every drop is counted per criterion and printed,
                    and the result is written to <workdir>/depo_curation.json
                    (a resumed run reads it back instead of scoring again).
  setup             what `trainer.run_rl` calls: curation, a `DEPOSampler` in
                    place of the data iterator, and the wrapped step function.

Shape letters as in `jaxrl_llm.rl.rl_step` (R prompts, G group size, L
completion length, N prompts scored, K rollouts each, P prompt length, D
hidden size).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import fileio, sharding
from jaxrl_llm.models import decoder
from jaxrl_llm.rl import depo as depo_lib
from jaxrl_llm.rl import rl_step as rl_lib

GROUP_KEY = "depo_groups/explorability_R"  # a [R] array: taken out before logging
CURATION_FILE = "depo_curation.json"


# ---------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DEPOStep(rl_lib.RLStep):
  """`RLStep` whose metrics also hold E(x) per group: GROUP_KEY [R] and its mean."""

  def learn(self, state, ro, rewards_B, comps, rng, ref_params, baseline_B=None):
    new_state, metrics = super().learn(state, ro, rewards_B, comps, rng, ref_params, baseline_B)
    G = self.rl.group_size
    R = rewards_B.shape[0] // G
    L = ro["completion"].shape[1]
    entropy_RG = depo_lib.sequence_entropy_RG(ro["sampler_logp"].reshape(R, G, L),
                                              ro["completion_mask"].reshape(R, G, L))
    expl_R = depo_lib.explorability_R(rewards_B.reshape(R, G), entropy_RG,
                                      self.rl.depo.negative_entropy_cap)
    metrics = dict(metrics)
    metrics[GROUP_KEY] = expl_R
    metrics["depo/explorability"] = jnp.mean(expl_R)
    metrics["depo/entropy"] = jnp.mean(entropy_RG)
    return new_state, metrics


def depo_step(step: rl_lib.RLStep) -> DEPOStep:
  """The same step (every field) as a DEPOStep."""
  return DEPOStep(**{f.name: getattr(step, f.name) for f in dataclasses.fields(step)})


def wrap_step_fn(step_fn: Callable, sampler: depo_lib.DEPOSampler) -> Callable:
  """step_fn(state, batch, rng) -> (state, metrics) that feeds E(x) to the sampler and logs
  the sampler's counters; the per-group array never reaches the metric writer."""
  def run(state, batch, rng):
    state, metrics = step_fn(state, batch, rng)
    metrics = dict(metrics)
    sampler.observe(metrics.pop(GROUP_KEY))  # a device array: read at the next epoch start
    metrics.update(sampler.metrics())
    return state, metrics
  return run


# ---------------------------------------------------------------------------
# Offline scoring with the starting policy.
# ---------------------------------------------------------------------------
def _chunks(indices: np.ndarray, size: int):
  """Batches of `size` indices; the last is filled with its first index (rows dropped)."""
  for start in range(0, len(indices), size):
    chunk = indices[start:start + size]
    n = len(chunk)
    yield np.concatenate([chunk, np.full(size - n, chunk[0], chunk.dtype)]), n


def _local(batch: dict, size: int) -> dict:
  """This process's rows of a global batch (as `DataIterator` gives them)."""
  n = size // jax.process_count()
  start = jax.process_index() * n
  return {k: v[start:start + n] for k, v in batch.items()}


def prompt_embeddings_ND(step: rl_lib.RLStep, params, encoded, indices: np.ndarray,
                         batch_size: int) -> np.ndarray:
  """Mean-pooled, L2-normalised final hidden states of the prompts `indices` (into `encoded`)."""
  model = step.model

  @jax.jit
  def embed(params, batch):
    with sharding.activation_rules(step.mesh, step.rules):
      mask = batch["prompt_mask"]
      h = decoder.hidden_states(model, params, batch["prompt_tokens"],
                                segment_ids_BT=(mask > 0).astype(jnp.int32))
      return depo_lib.mean_pool_ND(h, mask)

  out = []
  for chunk, n in _chunks(np.asarray(indices, np.int64), batch_size):
    batch = sharding.shard_batch(_local(encoded.batch(chunk), batch_size), step.mesh,
                                 step.rules)
    out.append(np.asarray(sharding.to_host(embed(params, batch)))[:n])
  return np.concatenate(out, axis=0)


def pass_rates_N(step: rl_lib.RLStep, params, encoded, indices: np.ndarray, batch_size: int,
                 num_samples: int, rng) -> np.ndarray:
  """p_n over `num_samples` rollouts of the step's sampler and reward ("correct" when the
  reward has it, else reward > 0, as the RL step counts accuracy)."""
  rl = dataclasses.replace(step.rl, group_size=num_samples, depo=depo_lib.DEPOConfig())
  scorer = dataclasses.replace(step, rl=rl)
  if type(scorer) is not rl_lib.RLStep:
    scorer = rl_lib.RLStep(**{f.name: getattr(scorer, f.name)
                              for f in dataclasses.fields(rl_lib.RLStep)})

  @jax.jit
  def correct(params, batch, rng):
    with sharding.activation_rules(step.mesh, step.rules):
      ro = scorer.rollout(params, batch, rng, 0)
      rewards_B, comps, _ = scorer.score(ro)
      ok_B = comps.get("correct", (rewards_B > 0).astype(jnp.float32))
      return ok_B.reshape(-1, num_samples)

  out = []
  for b, (chunk, n) in enumerate(_chunks(np.asarray(indices, np.int64), batch_size)):
    batch = sharding.shard_batch(_local(encoded.batch(chunk), batch_size), step.mesh,
                                 step.rules)
    ok = np.asarray(sharding.to_host(correct(params, batch, jax.random.fold_in(rng, b))))
    out.append(depo_lib.pass_rates_N(ok[:n]))
  return np.concatenate(out, axis=0)


def curate(cfg, step: rl_lib.RLStep, params, encoded, *, say: Callable[[str], None] = print
           ) -> tuple[np.ndarray, dict[str, float]]:
  """DEPO's offline selection: (kept indices into `encoded`, counts per criterion).

  Order (the paper's: diversity before difficulty, so rollouts are spent only on
  the diverse subset): pool → k-center diversity → pass-rate band.
  """
  depo = cfg.rl.depo
  batch_size = cfg.data.batch_size
  idx = np.arange(len(encoded), dtype=np.int64)
  counts = {"usable": int(len(idx))}
  lines = [f"DEPO offline curation of {len(idx)} usable training prompts:"]
  if depo.pool_size and depo.pool_size < len(idx):
    rng = np.random.default_rng([cfg.seed, 20])
    idx = np.sort(rng.choice(idx, depo.pool_size, replace=False))
    counts["dropped_pool"] = counts["usable"] - len(idx)
    lines.append(f"  pool (rl.depo.pool_size={depo.pool_size}): kept {len(idx)}, dropped "
                 f"{counts['dropped_pool']} (not drawn)")
  if depo.diversity_size and depo.diversity_size < len(idx):
    emb = prompt_embeddings_ND(step, params, encoded, idx, batch_size)
    picks = depo_lib.k_center_N(emb, depo.diversity_size)
    counts["dropped_diversity"] = len(idx) - len(picks)
    idx = np.sort(idx[picks])
    lines.append(f"  diversity (k-center, rl.depo.diversity_size={depo.diversity_size}): kept "
                 f"{len(idx)}, dropped {counts['dropped_diversity']}")
  if depo.difficulty_samples:
    p = pass_rates_N(step, params, encoded, idx, batch_size, depo.difficulty_samples,
                     jax.random.fold_in(jax.random.key(cfg.seed), 21))
    keep = depo_lib.difficulty_band_N(p, depo.difficulty_low, depo.difficulty_high)
    counts["dropped_too_hard"] = int(np.sum(p < depo.difficulty_low))
    counts["dropped_too_easy"] = int(np.sum(p > depo.difficulty_high))
    counts["mean_pass_rate"] = round(float(np.mean(p)), 4) if len(p) else 0.0
    idx = idx[keep]
    lines.append(
        f"  difficulty ({depo.difficulty_samples} rollouts each, kept "
        f"{depo.difficulty_low} <= pass rate <= {depo.difficulty_high}; mean pass rate "
        f"{np.mean(p):.3f}): kept {len(idx)}, dropped {counts['dropped_too_hard']} too hard "
        f"(pass rate < {depo.difficulty_low}) and {counts['dropped_too_easy']} too easy "
        f"(pass rate > {depo.difficulty_high})")
  counts["kept"] = int(len(idx))
  lines.append(f"  kept {len(idx)} of {counts['usable']} prompts")
  say("\n".join(lines))
  if len(idx) < batch_size:
    raise ValueError(f"DEPO's offline curation kept {len(idx)} prompts, fewer than "
                     f"data.batch_size={batch_size} ({counts}): widen the difficulty band "
                     "(rl.depo.difficulty_low / difficulty_high), raise diversity_size or "
                     "pool_size, or lower data.batch_size")
  return idx, counts


def load_or_curate(cfg, workdir: str, step, params, encoded, *, say=print) -> np.ndarray:
  """The curated indices: from <workdir>/depo_curation.json when a run there wrote it
  (resume), else `curate` and write it."""
  path = fileio.join(workdir, CURATION_FILE)
  if fileio.exists(path):
    saved = json.loads(fileio.read_text(path))
    idx = np.asarray(saved["kept"], np.int64)
    ids = np.asarray(saved["prompt_ids"], np.int64)
    if len(idx) and (idx.max() >= len(encoded) or not np.array_equal(encoded.ids[idx], ids)):
      raise ValueError(f"{path} was written for other training data (its prompt ids do not "
                       "match this run's split): remove it, or use a new workdir")
    say(f"DEPO: {len(idx)} curated prompts read from {path} ({saved['counts']})")
    return idx
  idx, counts = curate(cfg, step, params, encoded, say=say)
  if jax.process_index() == 0:
    fileio.write_text(path, json.dumps({"kept": idx.tolist(),
                                        "prompt_ids": encoded.ids[idx].tolist(),
                                        "counts": counts}))
  return idx


def setup(cfg, workdir: str, step: rl_lib.RLStep, params, iterator, step_fn: Callable, *,
          say: Callable[[str], None] = print) -> tuple[Any, Callable]:
  """(sampler, step_fn) of an rl.depo run: the sampler replaces `iterator` in the loop.

  `step` must be the DEPOStep that `step_fn` runs (`depo_step`); `params` are
  the starting policy's (scored before the first update).
  """
  if not isinstance(step, DEPOStep):
    raise TypeError("rl.depo needs the DEPOStep (depo_run.depo_step(step)) in the jitted step")
  encoded = iterator.encoded
  if cfg.rl.depo.offline:
    pool = load_or_curate(cfg, workdir, step, params, encoded, say=say)
  else:
    pool = np.arange(len(encoded), dtype=np.int64)
  sampler = depo_lib.DEPOSampler(encoded, pool, cfg.data.batch_size, cfg.rl.depo,
                                 seed=cfg.data.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  return sampler, wrap_step_fn(step_fn, sampler)
