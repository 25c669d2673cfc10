"""DEPO: offline prompt curation and online explorability filtering with replay.

Tang et al., "Towards High Data Efficiency in Reinforcement Learning with
Verifiable Reward" (ICLR 2026, arXiv:2509.01321). DEPO spends rollouts only
on prompts that can still teach the policy:

OFFLINE (once, before step 1, with the starting policy)
  The paper builds a sample graph over prompt representations, keeps a diverse
  and influential subset with a PageRank-weighted determinantal point process,
  then samples from it so that difficulty follows a normal distribution.
  Implemented here (our simplification; `jaxrl_llm.rl.depo_run` runs it):

    pool         a random subset of `pool_size` usable training prompts (0: all)
    diversity    greedy k-center (farthest-point) selection of `diversity_size`
                 prompts on e_n = mean-pooled final hidden state of prompt n
                 under the starting policy, L2-normalised:
                   c_1 = argmin_n ‖e_n − ē‖ (the most central prompt),
                   c_{j+1} = argmax_n min_{i<=j} ‖e_n − e_{c_i}‖
                 (a 2-approximation of the k-center cover; it keeps the
                 diversity term of the paper's DPP, not its PageRank influence
                 weight)
    difficulty   p_n = the fraction of k = `difficulty_samples` rollouts of the
                 starting policy that are correct; kept iff
                 difficulty_low <= p_n <= difficulty_high (the defaults 0.05
                 and 0.95 drop, for k < 20, the prompts whose group would have
                 zero reward variance at the start: p = 0 or 1; the paper's
                 normal-shaped difficulty sampling is replaced by this band)

  Every prompt dropped is counted under the criterion that dropped it.

ONLINE (host-side data selection around the one-jit RL step)
  Explorability of prompt x at one visit, as in the authors' public code
  (rollout pruning by entropy): with the group's G rewards r_i, μ and σ their
  mean and (population) standard deviation, Â_i = (r_i − μ)/(σ + ε) the GRPO
  advantage and H_i the mean token entropy of completion i,

    E(x) = Σ_{i: Â_i > 0} |Â_i|·H_i + Σ_{i: Â_i < 0, H_i <= c·H̄⁺} |Â_i|·H_i

  with H̄⁺ the mean entropy of the positive completions and c =
  `negative_entropy_cap` (0: no negative completion is left out; the paper's
  code drops high-entropy negatives this way). A group whose rewards are all
  equal has Â = 0 and E = 0: it carries no GRPO signal. Ours: H_i is estimated
  from the sampled tokens' own log-probabilities, H_i ≈ −(1/|o_i|) Σ_t log
  π(o_{i,t}) (its expectation is the mean token entropy), so the step needs no
  extra full-vocabulary pass; the rewards are the task rewards before length
  shaping.

  A prompt's score is the mean of its last `history` visit scores. Epoch 0
  visits every curated prompt. At the start of epoch e >= 1 the prompts never
  visited are kept, and the visited ones are ranked by (score desc, visits
  asc); the top ⌊ρ_e·n⌋ are kept with

    ρ_e = clip(keep_ratio_start − keep_ratio_decay·e, keep_ratio_min, 1)

  (the paper's code: the same schedule with floor 0.4). The rest are skipped
  for the epoch (`depo/skipped`).

  Replay (the mechanism is the paper's; the rule is ours, since the text
  available to us does not state one): a skipped prompt that has been
  visited fewer than `replay_visits` times is under-explored and enters a
  FIFO replay buffer (fewest visits first, then higher score); each batch
  fills up to ⌊replay_fraction·B⌋ of its B prompt slots from the head of the
  buffer and the rest from the epoch's order (`depo/replayed`,
  `depo/buffer_size`). A replayed prompt is scored again like any other.

Shape letters: N prompts, K difficulty samples, D hidden size, R prompts of a
step, G group size, L completion length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

EPS = 1e-6  # ε of the advantage normalisation in E(x)


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DEPOConfig:
  """DEPO data selection (`rl.depo`); see the module docstring for each formula."""
  enabled: bool = False
  # OFFLINE, once before step 1 with the starting policy (0 turns a criterion off)
  pool_size: int = 0               # random pool of this many usable prompts (0: all)
  diversity_size: int = 0          # k-center picks on prompt embeddings
  difficulty_samples: int = 0      # k rollouts per prompt for its pass rate p
  difficulty_low: float = 0.05     # keep difficulty_low <= p <= difficulty_high
  difficulty_high: float = 0.95
  # ONLINE explorability filter with replay (per epoch over the curated prompts)
  online: bool = True
  history: int = 4                 # visits averaged into a prompt's score
  keep_ratio_start: float = 1.0    # ρ_e = clip(start − decay·e, min, 1)
  keep_ratio_decay: float = 0.1
  keep_ratio_min: float = 0.4
  negative_entropy_cap: float = 0.0  # c; 0: keep every negative completion
  replay_visits: int = 2           # skipped prompts visited fewer times are replayed
  replay_fraction: float = 0.25    # at most this fraction of a batch's prompts

  def __post_init__(self):
    def fail(field, expected):
      raise ValueError(f"rl.depo.{field}={getattr(self, field)!r}: {expected}")

    for field in ("enabled", "online"):
      if not isinstance(getattr(self, field), bool):
        fail(field, "must be a bool")
    for field in ("pool_size", "diversity_size", "difficulty_samples"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(field, "must be an int >= 0 (0 turns this criterion off)")
    if self.difficulty_samples == 1:
      fail("difficulty_samples", "a pass rate needs >= 2 rollouts per prompt (0: off)")
    if not 0.0 <= self.difficulty_low <= self.difficulty_high <= 1.0:
      fail("difficulty_low", f"need 0 <= difficulty_low <= difficulty_high <= 1 (high is "
           f"{self.difficulty_high!r}); prompts with low <= pass rate <= high are kept")
    if self.pool_size and self.diversity_size and self.diversity_size > self.pool_size:
      fail("diversity_size", f"picks from the pool of pool_size={self.pool_size}: lower it or "
           "raise pool_size")
    if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
      fail("history", "must be an int >= 1 (visits averaged into a prompt's score)")
    if not 0.0 < self.keep_ratio_min <= 1.0:
      fail("keep_ratio_min", "must be in (0, 1]")
    if not 0.0 < self.keep_ratio_start <= 1.0:
      fail("keep_ratio_start", "must be in (0, 1]")
    if self.keep_ratio_decay < 0:
      fail("keep_ratio_decay", "must be >= 0")
    if self.negative_entropy_cap < 0:
      fail("negative_entropy_cap", "must be >= 0 (0: keep every negative completion)")
    if (isinstance(self.replay_visits, bool) or not isinstance(self.replay_visits, int)
        or self.replay_visits < 0):
      fail("replay_visits", "must be an int >= 0 (0: no replay)")
    if not 0.0 <= self.replay_fraction < 1.0:
      fail("replay_fraction", "must be in [0, 1): some slots of a batch stay for the epoch's "
           "own prompts")
    if self.enabled and not (self.online or self.offline):
      fail("online", "rl.depo.enabled with nothing to do: set online=True or an offline "
           "criterion (pool_size, diversity_size, difficulty_samples)")

  @property
  def offline(self) -> bool:
    """Whether any offline criterion is on."""
    return bool(self.pool_size or self.diversity_size or self.difficulty_samples)


def validate(rl: Any, check) -> None:
  """RLConfig settings DEPO cannot run with (called from RLConfig.__post_init__)."""
  if not rl.depo.enabled:
    return
  check(rl.group_size >= 2, "group_size", "rl.depo scores a group's reward spread: use "
        "groups of >= 2 samples")
  check(rl.advantage != "gae", "advantage", "rl.depo selects prompts for group advantage "
        "estimators (grpo, rloo, ...), not PPO's critic")
  check(not rl.multiturn.enabled, "multiturn", "rl.depo scores single-turn groups; disable "
        "multiturn")
  check(not rl.anchor.enabled, "anchor", "rl.depo and rl.anchor are not supported together "
        "(an injected reference row has no sampled log-probs to score); disable one")


def validate_experiment(cfg: Any) -> None:
  """ExperimentConfig settings DEPO cannot run with (called from its __post_init__)."""
  depo = cfg.rl.depo
  if not depo.enabled:
    return
  if cfg.kind not in ("rl", "sft"):  # "sft": an RL run's SFT warm-start stage keeps rl.*
    raise ValueError(f"rl.depo.enabled with kind={cfg.kind!r}: DEPO selects the prompts of "
                     "RL runs (kind='rl'); disable rl.depo")
  if cfg.kind == "sft":
    return
  if cfg.trainer.split_mode or cfg.trainer.actor_devices:
    raise ValueError("rl.depo needs the one-jit RL step: set trainer.split_mode=False and "
                     "trainer.actor_devices=0, or disable rl.depo")
  cooper = getattr(cfg, "cooper", None)
  if cooper is not None and cooper.enabled:
    raise ValueError("rl.depo and cooper.enabled are not supported together (the co-trained "
                     "reward model has its own step); disable one")
  if depo.difficulty_samples and cfg.reward.reward_model_path:
    raise ValueError("rl.depo.difficulty_samples scores pass rates with in-graph rewards, but "
                     "reward.reward_model_path is set: use a verifier reward or set "
                     "rl.depo.difficulty_samples=0")
  if depo.pool_size and depo.pool_size < cfg.data.batch_size:
    raise ValueError(f"rl.depo.pool_size={depo.pool_size} is smaller than data.batch_size="
                     f"{cfg.data.batch_size}: the curated prompts must fill a batch")
  if depo.diversity_size and depo.diversity_size < cfg.data.batch_size:
    raise ValueError(f"rl.depo.diversity_size={depo.diversity_size} is smaller than "
                     f"data.batch_size={cfg.data.batch_size}: the curated prompts must fill a "
                     "batch")


# ---------------------------------------------------------------------------
# Offline selection (pure).
# ---------------------------------------------------------------------------
def pass_rates_N(correct_NK: np.ndarray) -> np.ndarray:
  """p_n: the fraction of prompt n's K rollouts that are correct (correct > 0)."""
  return np.mean(np.asarray(correct_NK) > 0, axis=1)


def difficulty_band_N(pass_rate_N: np.ndarray, low: float, high: float) -> np.ndarray:
  """[N] bool: low <= p_n <= high."""
  p = np.asarray(pass_rate_N)
  return (p >= low) & (p <= high)


def mean_pool_ND(h_NTD, mask_NT):
  """Mean of the hidden states over each row's unmasked tokens, L2-normalised: [N, D]."""
  m = mask_NT.astype(h_NTD.dtype)[..., None]
  pooled = jnp.sum(h_NTD * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  pooled = pooled.astype(jnp.float32)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def k_center_N(emb_ND: np.ndarray, k: int) -> np.ndarray:
  """Greedy k-center picks (indices, in pick order): the most central point, then the
  farthest from those picked so far, k times; ties go to the lowest index."""
  x = np.asarray(emb_ND, np.float64)
  n = x.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"k-center needs 1 <= k <= {n} points, got k={k}")
  first = int(np.argmin(np.linalg.norm(x - x.mean(axis=0), axis=1)))
  picks = [first]
  dist_N = np.linalg.norm(x - x[first], axis=1)
  for _ in range(k - 1):
    nxt = int(np.argmax(dist_N))
    picks.append(nxt)
    dist_N = np.minimum(dist_N, np.linalg.norm(x - x[nxt], axis=1))
  return np.asarray(picks, np.int64)


# ---------------------------------------------------------------------------
# Online explorability (pure; jnp, so the step computes it in its graph).
# ---------------------------------------------------------------------------
def sequence_entropy_RG(sampler_logp_RGL, mask_RGL):
  """H_i ≈ −mean_t log π(o_{i,t}) over each completion's tokens: [R, G]."""
  m = (mask_RGL > 0).astype(jnp.float32)
  return -jnp.sum(sampler_logp_RGL * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def explorability_R(rewards_RG, entropy_RG, negative_entropy_cap: float = 0.0, eps: float = EPS):
  """E(x) per group (module docstring): Σ|Â_i|·H_i over the positives and the kept negatives."""
  r = jnp.asarray(rewards_RG, jnp.float32)
  h = jnp.asarray(entropy_RG, jnp.float32)
  adv_RG = (r - jnp.mean(r, axis=1, keepdims=True)) / (jnp.std(r, axis=1, keepdims=True) + eps)
  pos_RG = adv_RG > 0
  neg_RG = adv_RG < 0
  if negative_entropy_cap > 0:
    n_pos_R = jnp.sum(pos_RG, axis=1, keepdims=True)
    mean_pos_R = jnp.sum(h * pos_RG, axis=1, keepdims=True) / jnp.maximum(n_pos_R, 1)
    neg_RG = neg_RG & (h <= negative_entropy_cap * mean_pos_R)
  return jnp.sum(jnp.abs(adv_RG) * h * (pos_RG | neg_RG), axis=1)


def keep_ratio(epoch: int, start: float, decay: float, minimum: float) -> float:
  """ρ_e = clip(start − decay·e, minimum, 1)."""
  return float(min(1.0, max(minimum, start - decay * epoch)))


def rank_prompts(ids: Sequence[int], score: Mapping[int, float], visits: Mapping[int, int],
                 ratio: float) -> tuple[list[int], list[int]]:
  """(kept, skipped) of one epoch: unvisited ids are kept; visited ones are ranked by
  (score desc, visits asc, id asc) and the top ⌊ratio·n_visited⌋ kept, in rank order."""
  fresh = [i for i in ids if visits.get(i, 0) == 0]
  seen = sorted((i for i in ids if visits.get(i, 0) > 0),
                key=lambda i: (-score[i], visits[i], i))
  top = int(ratio * len(seen) + 1e-9)
  return fresh + seen[:top], seen[top:]


def replay_candidates(skipped: Sequence[int], score: Mapping[int, float],
                      visits: Mapping[int, int], replay_visits: int) -> list[int]:
  """Skipped ids visited fewer than `replay_visits` times, fewest visits first, then by
  higher score, then id."""
  under = [i for i in skipped if visits.get(i, 0) < replay_visits]
  return sorted(under, key=lambda i: (visits.get(i, 0), -score.get(i, 0.0), i))


# ---------------------------------------------------------------------------
# The host-side sampler.
# ---------------------------------------------------------------------------
class DEPOSampler:
  """Batches of curated prompts with the explorability filter and replay (module docstring).

  Replaces the trainer's `DataIterator` for `rl.depo` runs: `next()` gives this
  process's rows of a global batch of `batch_size` prompts (the split's
  `EncodedSplit.batch`); `observe(explorability_R)` records the step's scores
  for the batch just given (a device array is fine: it is read on the host
  only at the next epoch boundary or checkpoint, so the loop never waits on
  it); `get_state` / `set_state` round-trip through the checkpoint's JSON.

  Args:
    encoded: the training split (`DataIterator.encoded`), mode "rl".
    pool: indices into `encoded` of the curated prompts.
    batch_size: global prompts per step.
    config: the DEPO settings.
    seed: shuffles each epoch's order with (seed, epoch).
  """

  def __init__(self, encoded, pool: Sequence[int], batch_size: int, config: DEPOConfig,
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    self.encoded = encoded
    self.pool = [int(i) for i in pool]
    self.batch_size = int(batch_size)
    self.config = config
    self.seed = int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.batch_size // self.process_count
    self.replay_slots = int(config.replay_fraction * self.batch_size) if (
        config.online and config.replay_visits > 0) else 0
    if len(self.pool) < self.batch_size:
      raise ValueError(f"DEPO kept {len(self.pool)} prompts, fewer than data.batch_size="
                       f"{self.batch_size}: widen rl.depo's criteria (difficulty band, "
                       "diversity_size, pool_size) or lower data.batch_size")
    self.epoch = -1
    self.position = 0
    self.order: list[int] = []
    self.buffer: list[int] = []
    self.visits: dict[int, int] = {}
    self.history: dict[int, list[float]] = {}
    self.skipped = 0          # skipped at the start of the current epoch
    self.skipped_total = 0
    self.replayed = 0         # replayed in the latest batch
    self.replayed_total = 0
    self._last: list[int] = []
    self._pending: list[tuple[list[int], Any]] = []

  # ---------------------------------------------------------------- scores
  def score(self, i: int) -> float:
    h = self.history.get(i, [])
    return float(np.mean(h)) if h else 0.0

  def observe(self, explorability_R) -> None:
    """Records E(x) of the prompts of the latest batch (in batch order)."""
    if not self._last:
      raise ValueError("DEPOSampler.observe before any batch was drawn")
    self._pending.append((self._last, explorability_R))
    self._last = []

  def _resolve(self) -> None:
    for ids, values in self._pending:
      values = np.asarray(values, np.float64).reshape(-1)
      if values.shape[0] != len(ids):
        raise ValueError(f"DEPO got {values.shape[0]} explorability scores for a batch of "
                         f"{len(ids)} prompts")
      for i, v in zip(ids, values):
        self.visits[i] = self.visits.get(i, 0) + 1
        self.history[i] = (self.history.get(i, []) + [float(v)])[-self.config.history:]
    self._pending = []

  # ---------------------------------------------------------------- epochs
  def _new_epoch(self) -> None:
    self._resolve()
    self.epoch += 1
    self.position = 0
    c = self.config
    if self.epoch == 0 or not c.online:
      kept, skipped = list(self.pool), []
    else:
      ratio = keep_ratio(self.epoch, c.keep_ratio_start, c.keep_ratio_decay, c.keep_ratio_min)
      scores = {i: self.score(i) for i in self.pool}
      kept, skipped = rank_prompts(self.pool, scores, self.visits, ratio)
      need = self.batch_size - self.replay_slots  # an epoch gives at least one batch
      if len(kept) < need:
        kept, skipped = kept + skipped[:need - len(kept)], skipped[need - len(kept):]
      kept_set = set(kept)  # a prompt back in the epoch's order leaves the buffer
      self.buffer = [i for i in self.buffer if i not in kept_set]
      queued = set(self.buffer)
      self.buffer += [i for i in replay_candidates(skipped, scores, self.visits,
                                                   c.replay_visits) if i not in queued]
    rng = np.random.default_rng([self.seed, self.epoch])
    self.order = [kept[j] for j in rng.permutation(len(kept))]
    self.skipped = len(skipped)
    self.skipped_total += len(skipped)

  def next_indices(self) -> list[int]:
    """The global batch's indices into `encoded`: replayed prompts last."""
    replay = self.buffer[:self.replay_slots]
    fresh_n = self.batch_size - len(replay)
    if self.epoch < 0 or self.position + fresh_n > len(self.order):
      self._new_epoch()
      replay = self.buffer[:self.replay_slots]
      fresh_n = self.batch_size - len(replay)
    self.buffer = self.buffer[len(replay):]
    fresh = self.order[self.position:self.position + fresh_n]
    self.position += fresh_n
    self.replayed = len(replay)
    self.replayed_total += len(replay)
    self._last = fresh + replay
    return list(self._last)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    ids = self.next_indices()
    start = self.process_index * self.local_batch_size
    return self.encoded.batch(np.asarray(ids[start:start + self.local_batch_size], np.int64))

  def metrics(self) -> dict[str, float]:
    """Host counters of the latest batch, logged with the step's metrics."""
    return {"depo/skipped": float(self.skipped), "depo/skipped_total": float(self.skipped_total),
            "depo/replayed": float(self.replayed),
            "depo/replayed_total": float(self.replayed_total),
            "depo/buffer_size": float(len(self.buffer)),
            "depo/epoch_prompts": float(len(self.order)), "depo/epoch": float(self.epoch)}

  # ---------------------------------------------------------------- state
  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable; `set_state` of it continues exactly."""
    self._resolve()
    seen = sorted(self.visits)
    return {"depo": 1, "epoch": self.epoch, "position": self.position, "order": self.order,
            "buffer": self.buffer, "ids": seen, "visits": [self.visits[i] for i in seen],
            "history": [self.history.get(i, []) for i in seen],
            "counters": [self.skipped, self.skipped_total, self.replayed, self.replayed_total],
            "last": self._last}

  def set_state(self, state: Optional[Mapping[str, Any]]) -> None:
    if not isinstance(state, Mapping) or state.get("depo") != 1:
      raise ValueError("the checkpoint's data state was not written by an rl.depo run (got "
                       f"keys {sorted(state) if isinstance(state, Mapping) else state!r}); "
                       "resume it without rl.depo, or start this run in a new workdir")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self.order = [int(i) for i in state["order"]]
    self.buffer = [int(i) for i in state["buffer"]]
    self.visits = {int(i): int(n) for i, n in zip(state["ids"], state["visits"])}
    self.history = {int(i): [float(v) for v in h] for i, h in zip(state["ids"], state["history"])}
    (self.skipped, self.skipped_total, self.replayed,
     self.replayed_total) = (int(v) for v in state["counters"])
    self._last = [int(i) for i in state["last"]]
    self._pending = []
