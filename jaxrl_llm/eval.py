"""Held-out evaluation: greedy accuracy, pass@k, maj@k and mean@k over n samples.

One `Evaluator` serves the trainer's periodic evaluation and `launch/eval.py`,
so a number reported during training and one reported afterwards come from the
same code.

Per problem it decodes one greedy completion (`greedy=True`) and n =
`num_samples` completions at `temperature`, and decides whether each is
correct by the rule the run is rewarded by:
  - a run whose reward.components name a correctness component ("math",
    "countdown" or "correct"; the first one named, whatever its weight): that
    component gives full marks (1.0). It is computed by the RL reward's own
    code (`rewards.registry.host_scorer`) on the completion's tokens, so eval
    and reward agree by construction (`reward_correctness`);
  - otherwise (no reward, as in SFT or DPO runs, or a reward without a notion
    of correctness, e.g. only "reward_model" or "format": then said in the
    output and metric eval/scored_by_reward = 0) `is_correct`, the data's
    reference rule:
    - built-in tasks (arithmetic, countdown): the task's verifier on the
      completion ended by EOS (the in-graph `correct` reward);
    - the built-in preference task: does the completion follow its rule;
    - any other data (GSM8K, MATH, ...): `rewards.host.math_reward`, the
      scorer of the `math` reward component (truncated completions are
      scored too, as the reward scores them).
"answer_id" is a label (an id of the answer span, for advantage="copo"), not
a correctness rule, and never decides correctness.

Metrics, with c of the n samples of a problem correct (averaged over problems):
  eval/accuracy            greedy accuracy
  eval/mean@n              c / n (also reported as eval/sample_accuracy)
  eval/pass@k              1 − C(n − c, k) / C(n, k), the unbiased estimator of
                           Chen et al. 2021 ("Evaluating Large Language Models
                           Trained on Code"), for k = 1, 2, 4, ... ≤ n and k = n
  eval/maj@k               the most frequent answer among the first k samples
                           (ties: the answer seen first) is correct; answers are
                           compared after normalisation (`answer_key`)
  eval/response_length     mean completion tokens (greedy; sample_ for samples)
  eval/finished            fraction ended by EOS
  eval/scored_by_reward    1 when correctness is a configured reward component's,
                           0 when reward.components have no correctness component
                           (only reported when the evaluator is given the components)
With `repeats` = R > 1 the n samples are drawn R times with independent keys
and each sampled metric is reported as the mean over repeats with a `_std`
companion (the spread a reader needs to tell a gain from noise).

`float32=True` evaluates in float32 whatever the training dtype: bf16
inference measurably shifts reported reasoning accuracy.

Random draws: repeat r, problem i, sample j uses the key
fold_in(fold_in(fold_in(key(seed), r), i), j) through a per-row key, so the
samples do not depend on the batch size or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxrl_llm import sharding
from jaxrl_llm.data import tasks
from jaxrl_llm.sampling import sample


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (see the module docstring for the metrics)."""
  every_steps: int = 0          # trainer: evaluate every N steps (0: only at start and end)
  num_examples: int = 256       # held-out problems (test split); 0: no evaluation
  batch_size: int = 128         # completions decoded per call (rows = problems x samples)
  max_new_tokens: int = 16
  greedy: bool = True           # one greedy completion per problem
  num_samples: int = 1          # n sampled completions per problem (0: none)
  temperature: Optional[float] = None  # None: rl.temperature
  top_p: float = 1.0
  repeats: int = 1              # R independent sampled evaluations, reported as mean and std
  float32: bool = False         # evaluate in float32 whatever the training dtype
  write_results: bool = True    # per-problem JSONL in <workdir>/eval/
  seed: int = 0                 # sampling keys of the evaluation
  # Rollout engine (speed only; the samples are the same): a problem's n samples share one
  # prefill, and the decode batch halves whenever half of its rows have stopped, down to this
  # many rows (0: keep the full batch to the end). See sampling.sample.
  compaction_min_rows: int = 64

  def __post_init__(self):
    def need(ok, field, what):
      if not ok:
        raise ValueError(f"eval.{field}={getattr(self, field)!r}: must be {what}")
    for field in ("every_steps", "num_examples", "num_samples", "seed", "compaction_min_rows"):
      need(_is_int(getattr(self, field)) and getattr(self, field) >= 0, field, "an int >= 0")
    for field in ("batch_size", "max_new_tokens", "repeats"):
      need(_is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "an int >= 1")
    need(self.temperature is None or (isinstance(self.temperature, (int, float))
                                      and math.isfinite(self.temperature)
                                      and self.temperature > 0),
         "temperature", "None (use rl.temperature) or a finite float > 0")
    need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
    if self.num_examples and not self.greedy and self.num_samples == 0:
      raise ValueError("eval: greedy=False and num_samples=0 evaluate nothing; set "
                       "eval.num_samples >= 1, eval.greedy=True, or eval.num_examples=0")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k).

  Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) (Chen et al. 2021), stable for
  large n.
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def report_ks(n: int) -> list[int]:
  """The k of pass@k / maj@k reported for n samples: 1, 2, 4, ... < n, and n."""
  ks = [k for k in (2 ** i for i in range(31)) if k < n]
  return ks + [n] if n >= 1 else []


def majority_correct(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int) -> bool:
  """maj@k of one problem: is the most frequent answer among the first k correct?

  `answers[j]` is sample j's normalised answer (None: no answer found; never
  the majority). Ties go to the answer seen first.
  """
  votes = Counter(a for a in answers[:k] if a is not None)
  if not votes:
    return False
  top = max(votes.values())
  winner = next(a for a in answers[:k] if a is not None and votes[a] == top)
  return bool(correct[list(answers).index(winner)])


def is_correct(example: Mapping[str, Any], text: str, finished: bool, *,
               last_number_fallback: bool = False) -> bool:
  """Whether `text` (a decoded completion, EOS removed) answers `example`.

  The rule of the matching reward component: built-in tasks and the
  preference rule need the completion to end with EOS; file datasets use
  `rewards.host.math_reward` on the text as the `math` reward does (with the
  same `reward.math_last_number_fallback` option).
  """
  if example.get("task") in tasks.TASKS:
    return bool(finished) and tasks.is_correct(dict(example), text)
  if "chosen" in example:  # the synthetic preference task: does it follow the rule?
    from jaxrl_llm.data.builders import follows_arithmetic_rule
    return bool(finished) and follows_arithmetic_rule(example["prompt"], text)
  from jaxrl_llm.rewards import host
  return host.math_reward(text, example, last_number_fallback=last_number_fallback) == 1.0


def answer_key(example: Mapping[str, Any], text: str, *,
               last_number_fallback: bool = False) -> Optional[str]:
  """The answer a completion gives, normalised for majority voting (None: no answer)."""
  if example.get("task") in tasks.TASKS or "chosen" in example:
    return text.strip() or None
  from jaxrl_llm.rewards import answers, host
  found = answers.extract_completion_answer(text, last_number_fallback=last_number_fallback)
  return None if found is None else host.normalize_answer(found)


# Reward components whose full marks (1.0) mean "the completion is correct".
CORRECTNESS_COMPONENTS = ("math", "countdown", "correct")


def correctness_component(components: Sequence[tuple[str, float]]) -> Optional[str]:
  """The reward component that decides correctness in evaluation, or None.

  Rule: the first of `components` (config order, any weight: a weight-0
  component is still computed and reported) that is one of
  CORRECTNESS_COMPONENTS. "format", "reward_model" and the "answer_id" label
  have no notion of a correct answer: None when only they are named.
  """
  return next((name for name, _ in components if name in CORRECTNESS_COMPONENTS), None)


def reference_rule(example: Mapping[str, Any]) -> str:
  """Which rule `is_correct` applies to `example`, in words (for eval output)."""
  if example.get("task") in tasks.TASKS:
    return f"the {example['task']} task's verifier"
  if "chosen" in example:
    return "the synthetic preference rule"
  return "rewards.host.math_reward"


def _answer_arrays(tokenizer, examples: Sequence[Mapping[str, Any]]):
  """answer_tokens / answer_mask [N, A] of `examples`, as the "rl" data pipeline builds them.

  The final answer (`answers.gold_answer` of the "answer" field) and EOS,
  right-padded: what the in-graph `correct` reward compares completions with.
  """
  from jaxrl_llm.rewards import answers
  missing = [i for i, ex in enumerate(examples) if "answer" not in ex]
  if missing:
    raise ValueError(f"reward component 'correct' compares completions with the example's "
                     f"'answer' field, which held-out examples {missing[:5]} lack; map the "
                     "answer field with data.field_map")
  ids = tokenizer.encode_batch([answers.gold_answer(str(ex["answer"])) for ex in examples],
                               add_eos=True)
  width = max((len(row) for row in ids), default=1)
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for r, row in enumerate(ids):
    tokens[r, :len(row)], mask[r, :len(row)] = row, 1
  return tokens, mask


def reward_correctness(component: str, tokenizer, examples: Sequence[Mapping[str, Any]], *,
                       host_timeout_s: float = 5.0, last_number_fallback: bool = False):
  """`correct(problem_R, tokens_RL, mask_RL, finished_R) -> bool [R]` by one reward component.

  Row r is a sampled completion of `examples[problem_R[r]]`: its tokens (stop
  token included) and mask as the sampler returns them, and whether a stop
  token ended it. It is correct iff `component` (one of
  CORRECTNESS_COMPONENTS) scores it 1.0, computed by
  `registry.host_scorer`, the split-mode RL reward, on the rollout dict the
  RL step would build (answer arrays as the "rl" data pipeline encodes them),
  with the run's `host_timeout_s` and `math_last_number_fallback`.
  """
  from jaxrl_llm.rewards import registry
  if component not in CORRECTNESS_COMPONENTS:
    raise ValueError(f"reward component {component!r} has no notion of a correct answer; "
                     f"correctness follows one of {CORRECTNESS_COMPONENTS}")
  examples = [dict(ex) for ex in examples]
  score = registry.host_scorer(((component, 1.0),), tokenizer, examples,
                               host_timeout_s=host_timeout_s,
                               math_last_number_fallback=last_number_fallback)
  answers_NA = _answer_arrays(tokenizer, examples) if component == "correct" else None

  def correct(problem_R, tokens_RL, mask_RL, finished_R) -> np.ndarray:
    problem_R = np.asarray(problem_R, np.int32)
    if problem_R.size == 0:
      return np.zeros((0,), bool)
    ro = {"completion": np.asarray(tokens_RL, np.int32),
          "completion_mask": np.asarray(mask_RL, np.int32),
          "finished": np.asarray(finished_R, bool), "prompt_id": problem_R}
    if answers_NA is not None:
      ro["answer_tokens"], ro["answer_mask"] = (a[problem_R] for a in answers_NA)
    _, parts = score(ro)
    return np.asarray(parts[component]) == 1.0
  return correct


def run_reward_components(cfg) -> Optional[tuple[tuple[str, float], ...]]:
  """`cfg.reward.components` when they are the run's training signal, else None.

  They are for kind "rl", "online_dpo", "iterative_dpo" with
  iterative.judge="reward" and "distill" with distill.mode="on_policy", on
  prompt data; "sft", "dpo", "reward_model" (and preference data) are trained
  without them, and evaluation then uses the data's reference rule.
  """
  rewarded = (cfg.kind in ("rl", "online_dpo")
              or (cfg.kind == "iterative_dpo" and cfg.iterative.judge == "reward")
              or (cfg.kind == "distill" and cfg.distill.mode == "on_policy"))
  if not rewarded or cfg.data.kind != "prompt":
    return None
  return tuple(cfg.reward.components)


def _say_on_process_0(say: Callable[[str], None]) -> Callable[[str], None]:
  return lambda message: say(message) if jax.process_index() == 0 else None


def progress_line(label: str, done: int, total: int, batch: int, num_batches: int,
                  elapsed_s: float) -> str:
  """One progress line: completions done, batch, completions/s and ETA (from the rate so far)."""
  rate = done / elapsed_s if elapsed_s > 0 else float("inf")
  eta = (total - done) / rate if rate > 0 else float("inf")
  return (f"eval [{label}]: {done}/{total} completions (batch {batch}/{num_batches}), "
          f"{rate:.1f} completions/s, ETA {eta:.0f}s")


# ---------------------------------------------------------------------------
# The evaluator.
# ---------------------------------------------------------------------------
def _row_keys(seed: int, repeat: jax.Array, problem_B: jax.Array, sample_B: jax.Array):
  """One key per row, from (seed, repeat, problem, sample) only."""
  base = jax.random.fold_in(jax.random.key(seed), repeat)
  per_problem = jax.vmap(lambda i: jax.random.fold_in(base, i))(problem_B)
  return jax.vmap(jax.random.fold_in)(per_problem, sample_B)


def _sample_rows(model_cfg, params, tokens_BP, mask_BP, problem_B, sample_B, repeat, *, seed,
                 greedy, **kw):
  """`sample` with one key per row: rows are independent of their batch neighbours."""
  keys_B = _row_keys(seed, repeat, problem_B, sample_B)
  return sample(model_cfg, params, tokens_BP, mask_BP, keys_B, greedy=greedy, **kw)


class Evaluator:
  """Evaluates params on held-out problems; `__call__(params, step) -> metrics`.

  Args:
    eval_cfg: what to compute (`EvalConfig`).
    data_cfg: prompt formatting (template, chat template, BOS) and budgets
      (`max_prompt_len`): prompts are encoded by `data.pipeline.encode_prompts`,
      exactly as in training.
    model_cfg, tokenizer, mesh: the model, its tokenizer and the device mesh.
    examples: the held-out problems (example dicts; the first
      `eval_cfg.num_examples` are used).
    temperature: the sampling temperature when `eval_cfg.temperature` is None.
    last_number_fallback: `reward.math_last_number_fallback` of the run, so
      that evaluation scores answers as the reward does.
    reward_components: the run's `reward.components` when the run is
      rewarded by them (`run_reward_components`); None: no reward, the data's
      reference rule (`is_correct`). See the module docstring for the rule.
    host_timeout_s: the host reward components' per-call timeout.
    workdir: per-problem results go to `<workdir>/eval/` (any epath).
    say: where progress and notices go (process 0 only).
  """

  def __init__(self, eval_cfg: EvalConfig, data_cfg, model_cfg, tokenizer, mesh, *,
               examples: Sequence[Mapping[str, Any]], temperature: float = 1.0,
               last_number_fallback: bool = False,
               reward_components: Optional[Sequence[tuple[str, float]]] = None,
               host_timeout_s: float = 5.0, workdir: Optional[str] = None,
               say: Callable[[str], None] = print):
    from jaxrl_llm.data import pipeline
    say = _say_on_process_0(say)
    self.cfg, self.tokenizer, self.mesh, self.say = eval_cfg, tokenizer, mesh, say
    self.workdir = workdir
    self._check = functools.partial(is_correct, last_number_fallback=last_number_fallback)
    self._key = functools.partial(answer_key, last_number_fallback=last_number_fallback)
    self.temperature = float(eval_cfg.temperature if eval_cfg.temperature is not None
                             else temperature)
    examples = list(examples)[:eval_cfg.num_examples]
    P = data_cfg.max_prompt_len
    ids = pipeline.encode_prompts(data_cfg, tokenizer, [str(e["prompt"]) for e in examples])
    keep = [i for i, row in enumerate(ids) if 0 < len(row) <= P]
    self.skipped = len(examples) - len(keep)
    if self.skipped:
      longest = max(len(row) for row in ids)
      say(f"eval: {self.skipped} of {len(examples)} held-out prompts are empty or longer than "
          f"data.max_prompt_len={P} (longest {longest} tokens) and are not evaluated; raise "
          "data.max_prompt_len to include them")
    self.examples = [examples[i] for i in keep]
    self.prompt_ids = [ids[i] for i in keep]
    self._set_rule(reward_components, host_timeout_s=host_timeout_s,
                   last_number_fallback=last_number_fallback)
    self.P = P
    self.model_cfg = model_cfg.replace(dtype="float32") if eval_cfg.float32 else model_cfg
    common = dict(max_new_tokens=eval_cfg.max_new_tokens, stop_tokens=(tokenizer.eos_id,),
                  pad_id=tokenizer.pad_id, compaction_min_rows=eval_cfg.compaction_min_rows)
    self._greedy = jax.jit(functools.partial(_sample_rows, self.model_cfg, seed=eval_cfg.seed,
                                             greedy=True, **common))
    self._sampled = jax.jit(functools.partial(
        _sample_rows, self.model_cfg, seed=eval_cfg.seed, greedy=False,
        temperature=self.temperature, top_p=eval_cfg.top_p,
        group_size=max(eval_cfg.num_samples, 1), **common))

  # -- correctness -------------------------------------------------------
  def _set_rule(self, reward_components, *, host_timeout_s: float,
                last_number_fallback: bool) -> None:
    """Chooses the correctness rule (module docstring) and says which it is."""
    self.component = None           # the reward component deciding correctness, if any
    self.scored_by_reward = None    # None: no reward given; else whether one decides
    self._by_reward = None
    reference = reference_rule(self.examples[0]) if self.examples else "math_reward"
    self.rule = reference
    if reward_components is None or not self.examples:
      return
    self.component = correctness_component(reward_components)
    self.scored_by_reward = self.component is not None
    if self.component is None:
      self.say(f"eval: reward.components {tuple(reward_components)!r} name no correctness "
               f"component (one of {CORRECTNESS_COMPONENTS}), so accuracy, pass@k and maj@k "
               f"are scored by {reference}, not by the reward (metric "
               "eval/scored_by_reward = 0)")
      return
    self._by_reward = reward_correctness(self.component, self.tokenizer, self.examples,
                                         host_timeout_s=host_timeout_s,
                                         last_number_fallback=last_number_fallback)
    self.rule = f"reward component {self.component!r}"
    if self.component != "math":  # an exact answer span: votes on the span itself
      self._key = lambda example, text: text.strip() or None
    self.say(f"eval: correctness = full marks of the {self.rule}")

  def _correct(self, problem_R, rows, tokens_RL, mask_RL) -> list[bool]:
    """Whether each generated row is correct, by the evaluator's rule."""
    if self._by_reward is not None:
      return [bool(c) for c in self._by_reward(problem_R, tokens_RL, mask_RL,
                                               [fin for _, _, fin in rows])]
    return [self._check(self.examples[i], text, fin)
            for i, (text, _, fin) in zip(problem_R, rows)]

  # -- generation ----------------------------------------------------------
  def _generate(self, params, problem_R: np.ndarray, sample_R: np.ndarray, repeat: int,
                greedy: bool, label: str):
    """Rows (problem_R[r], sample_R[r]): ([(text, length, finished)], tokens_RL, mask_RL).

    tokens_RL / mask_RL are the sampler's completion tokens (stop token
    included, pad after) and mask, max_new_tokens wide. Sampled rows come in
    groups of `num_samples` consecutive rows of one problem, generated from
    one prompt row (its prefill shared by the group). With more than one
    batch, each batch prints a progress line (`progress_line`).
    """
    devices = jax.device_count()
    G = 1 if greedy else max(self.cfg.num_samples, 1)
    unit = G * devices  # a batch holds whole groups, its prompts split evenly over devices
    bs = -(-min(self.cfg.batch_size, max(len(problem_R), 1)) // unit) * unit
    gen = self._greedy if greedy else self._sampled
    out_rows: list[tuple[str, int, bool]] = []
    total, width = len(problem_R), self.cfg.max_new_tokens
    tokens_RL = np.full((total, width), self.tokenizer.pad_id, np.int32)
    mask_RL = np.zeros((total, width), np.int32)
    num_batches, started = -(-total // bs), time.perf_counter()
    for start in range(0, total, bs):
      rows = np.arange(start, min(start + bs, total))
      tokens = np.full((bs // G, self.P), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((bs // G, self.P), np.int32)
      mask[len(rows) // G:, -1] = 1  # padding groups: one dummy token, results ignored
      for j, r in enumerate(rows[::G]):
        ids = self.prompt_ids[problem_R[r]]
        tokens[j, self.P - len(ids):], mask[j, self.P - len(ids):] = ids, 1
      pad = bs - len(rows)
      host = {"t": tokens, "m": mask,
              "problem": np.pad(problem_R[rows], (0, pad)).astype(np.int32),
              "sample": np.pad(sample_R[rows], (0, pad)).astype(np.int32)}
      # Each process passes its own rows of the global batch (sharding.shard_batch).
      n, p = jax.process_count(), jax.process_index()
      local = {k: v[p * len(v) // n:(p + 1) * len(v) // n] for k, v in host.items()}
      dev = sharding.shard_batch(local, self.mesh)
      out = sharding.to_host(gen(params, dev["t"], dev["m"], dev["problem"], dev["sample"],
                                 np.int32(repeat)))
      for j in range(len(rows)):
        n = int(out.lengths_B[j])
        ids = [int(t) for t in out.tokens_BL[j, :n]]
        finished = bool(out.finished_B[j])
        w = min(width, out.tokens_BL.shape[1])
        tokens_RL[start + j, :w], mask_RL[start + j, :w] = out.tokens_BL[j, :w], out.mask_BL[j, :w]
        if finished and ids and ids[-1] == self.tokenizer.eos_id:
          ids = ids[:-1]
        out_rows.append((self.tokenizer.decode(ids), n, finished))
      if num_batches > 1:
        self.say(progress_line(label, len(out_rows), total, start // bs + 1, num_batches,
                               time.perf_counter() - started))
    return out_rows, tokens_RL, mask_RL

  # -- metrics -------------------------------------------------------------
  def __call__(self, params, step: Optional[int] = None) -> dict[str, float]:
    if not self.examples:
      return {}
    if self.cfg.float32:
      from jaxrl_llm.quantize import is_quantized  # a quantized base: its scales only
      params = jax.tree.map(lambda x: x.astype(jnp.float32), params, is_leaf=is_quantized)
    num = len(self.examples)
    records = [{"index": i, "prompt": str(ex["prompt"]),
                "reference": str(ex.get("answer", ex.get("chosen", "")))}
               for i, ex in enumerate(self.examples)]
    results: dict[str, float] = {"eval/num_examples": float(num)}
    if self.skipped:
      results["eval/skipped_prompts"] = float(self.skipped)
    if self.scored_by_reward is not None:
      results["eval/scored_by_reward"] = float(self.scored_by_reward)
    for rec in records:
      rec["rule"] = self.rule
    if self.cfg.greedy:
      problem_R = np.arange(num)
      rows, tokens_RL, mask_RL = self._generate(params, problem_R, np.zeros(num, np.int64), 0,
                                                True, "greedy")
      correct = self._correct(problem_R, rows, tokens_RL, mask_RL)
      for rec, (text, n, fin), ok in zip(records, rows, correct):
        rec["greedy"] = {"text": text, "length": n, "finished": fin, "correct": ok}
      results["eval/accuracy"] = float(np.mean(correct))
      results["eval/response_length"] = float(np.mean([r[1] for r in rows]))
      results["eval/finished"] = float(np.mean([r[2] for r in rows]))
    n = self.cfg.num_samples
    if n:
      per_repeat = [self._sampled_metrics(params, records, r) for r in range(self.cfg.repeats)]
      for key in per_repeat[0]:
        values = [m[key] for m in per_repeat]
        results[key] = float(np.mean(values))
        if self.cfg.repeats > 1:
          results[key + "_std"] = float(np.std(values, ddof=1))
    self._write(records, step)
    return results

  def _sampled_metrics(self, params, records, repeat: int) -> dict[str, float]:
    n, num = self.cfg.num_samples, len(self.examples)
    problem_R = np.repeat(np.arange(num), n)
    sample_R = np.tile(np.arange(n), num)
    rows, tokens_RL, mask_RL = self._generate(
        params, problem_R, sample_R, repeat, False,
        f"{n} samples" + (f", repeat {repeat + 1}" if self.cfg.repeats > 1 else ""))
    correct_R = self._correct(problem_R, rows, tokens_RL, mask_RL)
    ks = report_ks(n)
    sums = {f"eval/pass@{k}": 0.0 for k in ks}
    sums.update({f"eval/maj@{k}": 0.0 for k in ks})
    mean_acc, lengths, finished = 0.0, [], []
    for i, (rec, ex) in enumerate(zip(records, self.examples)):
      mine = rows[i * n:(i + 1) * n]
      correct = correct_R[i * n:(i + 1) * n]
      keys = [self._key(ex, text) for text, _, _ in mine]
      c = int(sum(correct))
      mean_acc += c / n
      for k in ks:
        sums[f"eval/pass@{k}"] += pass_at_k(n, c, k)
        sums[f"eval/maj@{k}"] += float(majority_correct(keys, correct, k))
      lengths += [length for _, length, _ in mine]
      finished += [fin for _, _, fin in mine]
      rec.setdefault("samples", []).append(
          [{"text": t, "length": length, "finished": f, "correct": ok, "answer": a}
           for (t, length, f), ok, a in zip(mine, correct, keys)])
    out = {key: value / num for key, value in sums.items()}
    out[f"eval/mean@{n}"] = out["eval/sample_accuracy"] = mean_acc / num
    out["eval/sample_response_length"] = float(np.mean(lengths))
    out["eval/sample_finished"] = float(np.mean(finished))
    return out

  def _write(self, records: list[dict], step: Optional[int]) -> None:
    if not (self.cfg.write_results and self.workdir) or jax.process_index() != 0:
      return
    directory = epath.Path(self.workdir) / "eval"
    directory.mkdir(parents=True, exist_ok=True)
    name = "results.jsonl" if step is None else f"results_step{step:08d}.jsonl"
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    self.results_path = str(directory / name)


def format_table(metrics: Mapping[str, float]) -> str:
  """The metrics as an aligned two-column table (std next to its mean)."""
  keys = [k for k in sorted(metrics) if not k.endswith("_std")]
  width = max(len(k) for k in keys) + 2 if keys else 10
  lines = []
  for key in keys:
    std = metrics.get(key + "_std")
    value = f"{metrics[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    lines.append(f"{key:<{width}}{value}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# A whole evaluation run (what launch/eval.py calls).
# ---------------------------------------------------------------------------
def make_run_evaluator(cfg, model_cfg, tokenizer, mesh, workdir: Optional[str], *,
                       say: Callable[[str], None] = print) -> Evaluator:
  """The held-out `Evaluator` of a run on its test split, scored as the run is rewarded.

  Built-in task examples get their task name (so that `is_correct` applies the
  task's verifier); correctness follows `run_reward_components(cfg)` (module
  docstring), with the run's `reward.math_last_number_fallback`.
  """
  from jaxrl_llm.data.builders import load_split
  examples = load_split(cfg.data, "test", workdir=workdir)
  n = min(len(examples), cfg.eval.num_examples)
  task = {"task": cfg.data.source} if cfg.data.source in tasks.TASKS else {}
  return Evaluator(cfg.eval, cfg.data, model_cfg, tokenizer, mesh,
                   examples=[dict(examples[i], **task) for i in range(n)],
                   temperature=cfg.rl.temperature,
                   last_number_fallback=cfg.reward.math_last_number_fallback,
                   reward_components=run_reward_components(cfg), workdir=workdir, say=say)


def evaluate_run(cfg, workdir: str, *, hf_path: str = "", step: Optional[int] = None,
                 say: Optional[Callable[[str], None]] = None) -> dict[str, float]:
  """Evaluates a checkpoint with the run's config; returns the metrics.

  The params come from `hf_path` (an HF checkpoint directory) when given,
  else from the checkpoint of `step` (default: the latest) in
  `<workdir>/checkpoints`, else from `cfg.model.path` when `model.source` is
  "hf". Per-problem results go to `<workdir>/eval/results.jsonl` (or
  `results_step<N>.jsonl` for a training checkpoint).
  """
  from jaxrl_llm import trainer
  from jaxrl_llm.checkpoint import CHECKPOINT_SUBDIR, Checkpointer
  from jaxrl_llm.models import decoder, hf
  from jaxrl_llm.tokenizers import load_tokenizer
  from jaxrl_llm.train_state import param_shardings

  say = say or trainer.say
  if cfg.eval.num_examples == 0:
    raise ValueError("eval.num_examples=0: nothing to evaluate; set --config.eval.num_examples")
  if cfg.data.kind not in ("prompt", "preference"):
    raise ValueError(f"data source {cfg.data.source!r} holds {cfg.data.kind!r} examples; "
                     "evaluation needs prompts with answers (a prompt or preference source)")
  mesh = sharding.make_mesh(cfg.mesh)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  if hf_path:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source="hf",
                                                             path=hf_path))
  model_cfg = trainer.model_config(cfg, tokenizer)
  shardings = param_shardings(model_cfg, mesh, cfg.mesh.rules)
  has_checkpoints = (epath.Path(workdir) / CHECKPOINT_SUBDIR).exists()
  ckpt = Checkpointer(workdir, create=False) if has_checkpoints and not hf_path else None
  saved = ckpt.all_steps() if ckpt is not None else []
  if saved:
    step = saved[-1] if step is None else step
    say(f"Evaluating step {step} of {ckpt.directory}")
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            decoder.param_shapes(model_cfg), shardings)
    params = ckpt.restore_params(abstract, step)
  elif cfg.model.source == "hf":
    if step is not None:
      raise ValueError(f"step={step} was asked for, but {workdir} has no checkpoints")
    say(f"Evaluating the HF checkpoint {cfg.model.path}")
    _, params = hf.load_hf(cfg.model.path, dtype=cfg.model.dtype,
                           param_dtype=cfg.model.param_dtype, shardings=shardings)
  else:
    raise FileNotFoundError(
        f"nothing to evaluate: no checkpoint in {workdir}/checkpoints and model.source is "
        f"{cfg.model.source!r}; pass the --workdir of a training run, or --hf_path")
  if ckpt is not None:
    ckpt.close()
  evaluator = make_run_evaluator(cfg, model_cfg, tokenizer, mesh, workdir, say=say)
  metrics = evaluator(params, step)
  say(format_table(metrics))
  if getattr(evaluator, "results_path", None):
    say(f"Per-problem results: {evaluator.results_path}")
  return metrics
