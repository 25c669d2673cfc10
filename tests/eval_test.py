"""Evaluation: pass@k / maj@k golden values, the Evaluator, launch/eval.py."""
import json
import math
import os

import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import eval as eval_lib
from jaxrl_llm import sharding, testing
from jaxrl_llm.data import tasks
from jaxrl_llm.tokenizers import load_tokenizer


def _brute_pass_at_k(n, c, k):
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_golden_values():
  assert eval_lib.pass_at_k(5, 2, 1) == pytest.approx(0.4)
  assert eval_lib.pass_at_k(5, 2, 2) == pytest.approx(0.7)   # 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert eval_lib.pass_at_k(4, 0, 4) == 0.0
  assert eval_lib.pass_at_k(4, 4, 1) == 1.0
  assert eval_lib.pass_at_k(10, 9, 2) == 1.0                 # n - c < k: always a success
  for n in (1, 3, 8, 16):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert eval_lib.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
  with pytest.raises(ValueError, match="1 <= k <= n"):
    eval_lib.pass_at_k(4, 1, 5)


def test_report_ks():
  assert eval_lib.report_ks(1) == [1]
  assert eval_lib.report_ks(8) == [1, 2, 4, 8]
  assert eval_lib.report_ks(6) == [1, 2, 4, 6]


def test_majority_vote():
  answers = ["3", "4", "4", None, "3", "3"]
  correct = [True, False, False, False, True, True]
  assert eval_lib.majority_correct(answers, correct, 1)           # "3"
  assert not eval_lib.majority_correct(answers, correct, 3)       # "4" twice
  assert eval_lib.majority_correct(answers, correct, 2)           # tie 3/4: first seen wins
  assert eval_lib.majority_correct(answers, correct, 6)           # "3" three times
  assert not eval_lib.majority_correct([None, None], [False, False], 2)


def test_eval_config_validation():
  with pytest.raises(ValueError, match="eval.temperature"):
    eval_lib.EvalConfig(temperature=0.0)
  with pytest.raises(ValueError, match="eval.repeats"):
    eval_lib.EvalConfig(repeats=0)
  with pytest.raises(ValueError, match="evaluate nothing"):
    eval_lib.EvalConfig(greedy=False, num_samples=0)


def test_is_correct_builtin_task_needs_eos():
  ex = tasks.generate("arithmetic", "test", 1, seed=0)[0]
  assert eval_lib.is_correct(ex, ex["answer"], True)
  assert not eval_lib.is_correct(ex, ex["answer"], False)
  assert eval_lib.answer_key(ex, f" {ex['answer']} ") == ex["answer"]


@pytest.fixture(scope="module")
def tiny_setup():
  tok = load_tokenizer("builtin")
  cfg = testing.tiny_config("llama", vocab_size=tok.vocab_size)
  params = testing.tiny_params(cfg)
  data = config_lib.from_configdict(
      config_lib.use_builtin_task(config_lib.default_configdict())).data
  examples = tasks.generate("arithmetic", "test", 6, seed=0, max_digits=1)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, -1, 1)))
  return tok, cfg, params, data, examples, mesh


def _evaluator(tiny_setup, tmp_path=None, **eval_kw):
  tok, cfg, _, data, examples, mesh = tiny_setup
  ecfg = eval_lib.EvalConfig(num_examples=6, max_new_tokens=4, **eval_kw)
  return eval_lib.Evaluator(ecfg, data, cfg, tok, mesh, examples=examples, temperature=1.0,
                            workdir=None if tmp_path is None else str(tmp_path),
                            say=lambda m: None)


def test_samples_do_not_depend_on_batch_size(tiny_setup, tmp_path):
  params = tiny_setup[2]
  small = _evaluator(tiny_setup, tmp_path / "a", batch_size=8, num_samples=4)(params, 3)
  large = _evaluator(tiny_setup, tmp_path / "b", batch_size=24, num_samples=4)(params, 3)
  assert small == large
  rows_a = [json.loads(l) for l in open(tmp_path / "a" / "eval" / "results_step00000003.jsonl")]
  rows_b = [json.loads(l) for l in open(tmp_path / "b" / "eval" / "results_step00000003.jsonl")]
  assert rows_a == rows_b
  assert len(rows_a) == 6 and len(rows_a[0]["samples"][0]) == 4
  for key in ("eval/accuracy", "eval/mean@4", "eval/pass@1", "eval/pass@2", "eval/pass@4",
              "eval/maj@4", "eval/sample_response_length"):
    assert key in small
  assert small["eval/pass@1"] == pytest.approx(small["eval/mean@4"])
  assert small["eval/pass@1"] <= small["eval/pass@2"] <= small["eval/pass@4"]


def test_sampled_rows_equal_independent_rows_of_the_plain_sampler(tiny_setup, tmp_path):
  """Shared prefill per problem and compaction change nothing: each stored sample is the
  plain sampler's completion of that problem's prompt with that row's own key."""
  import jax
  tok, cfg, params, data, examples, mesh = tiny_setup
  n = 4
  ev = _evaluator(tiny_setup, tmp_path, greedy=False, num_samples=n, temperature=2.0,
                  compaction_min_rows=2)
  ev(params, None)
  stored = [[s["text"] for s in json.loads(l)["samples"][0]]
            for l in open(tmp_path / "eval" / "results.jsonl")]
  P = ev.P
  problem = np.repeat(np.arange(len(ev.examples)), n)
  sample_id = np.tile(np.arange(n), len(ev.examples))
  tokens = np.full((len(problem), P), tok.pad_id, np.int32)
  mask = np.zeros((len(problem), P), np.int32)
  for r, i in enumerate(problem):
    ids = ev.prompt_ids[i]
    tokens[r, P - len(ids):], mask[r, P - len(ids):] = ids, 1
  keys = eval_lib._row_keys(0, jax.numpy.int32(0), problem, sample_id)
  out = eval_lib.sample(cfg, params, tokens, mask, keys, max_new_tokens=4, temperature=2.0,
                        stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
  texts = []
  for r in range(len(problem)):
    ids = [int(t) for t in out.tokens_BL[r, :int(out.lengths_B[r])]]
    if bool(out.finished_B[r]) and ids and ids[-1] == tok.eos_id:
      ids = ids[:-1]
    texts.append(tok.decode(ids))
  assert stored == [texts[i * n:(i + 1) * n] for i in range(len(ev.examples))]


def test_metrics_match_the_written_results(tiny_setup, tmp_path):
  """The aggregate metrics are recomputed from the per-problem JSONL."""
  params = tiny_setup[2]
  metrics = _evaluator(tiny_setup, tmp_path, num_samples=3, temperature=2.0)(params, None)
  rows = [json.loads(l) for l in open(tmp_path / "eval" / "results.jsonl")]
  greedy = np.mean([r["greedy"]["correct"] for r in rows])
  assert metrics["eval/accuracy"] == pytest.approx(greedy)
  counts = [sum(s["correct"] for s in r["samples"][0]) for r in rows]
  assert metrics["eval/mean@3"] == pytest.approx(np.mean(counts) / 3)
  assert metrics["eval/pass@3"] == pytest.approx(np.mean([c > 0 for c in counts]))
  lengths = [s["length"] for r in rows for s in r["samples"][0]]
  assert metrics["eval/sample_response_length"] == pytest.approx(np.mean(lengths))


def test_repeats_report_mean_and_std(tiny_setup):
  params = tiny_setup[2]
  m = _evaluator(tiny_setup, greedy=False, num_samples=2, repeats=3, temperature=3.0)(params)
  assert "eval/accuracy" not in m
  assert m["eval/mean@2_std"] >= 0.0 and "eval/pass@2_std" in m
  one = _evaluator(tiny_setup, greedy=False, num_samples=2, repeats=1, temperature=3.0)(params)
  assert "eval/mean@2_std" not in one


def test_float32_evaluation_of_bf16_model(tiny_setup):
  tok, cfg, params, data, examples, mesh = tiny_setup
  bf16 = cfg.replace(dtype="bfloat16")
  ecfg = eval_lib.EvalConfig(num_examples=6, max_new_tokens=4, float32=True)
  ev = eval_lib.Evaluator(ecfg, data, bf16, tok, mesh, examples=examples, say=lambda m: None)
  assert ev.model_cfg.dtype == "float32"
  ref = eval_lib.Evaluator(dataclasses_replace(ecfg, float32=False), data, cfg, tok, mesh,
                           examples=examples, say=lambda m: None)
  assert ev(params) == ref(params)   # float32 evaluation of a bf16 config = the f32 model


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def test_overlong_prompts_are_counted_and_reported(tiny_setup):
  tok, cfg, params, data, examples, mesh = tiny_setup
  import dataclasses
  long_ex = dict(examples[0], prompt="1+1+1+1+1+1+1+1+1+1+1+1+1+1=")
  said = []
  ev = eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=7, max_new_tokens=2),
                          dataclasses.replace(data, max_prompt_len=12), cfg, tok, mesh,
                          examples=[long_ex] + examples, say=said.append)
  assert ev.skipped == 1 and len(ev.examples) == 6
  assert any("1 of 7 held-out prompts" in s and "max_prompt_len=12" in s for s in said)
  assert ev(params)["eval/skipped_prompts"] == 1.0


def test_launch_eval_missing_checkpoint_names_the_fix(tmp_path):
  c = config_lib.use_builtin_task(config_lib.default_configdict(kind="sft"))
  c.model.builtin = "nano"
  cfg = config_lib.from_configdict(c)
  with pytest.raises(FileNotFoundError, match="--hf_path"):
    eval_lib.evaluate_run(cfg, os.fspath(tmp_path), say=lambda m: None)


def test_trainer_evaluator_scores_builtin_tasks_with_their_verifier(tmp_path):
  """load_split's records carry no task name; the trainer's evaluator adds it."""
  from jaxrl_llm import trainer
  for source in ("arithmetic", "countdown"):
    c = config_lib.use_builtin_task(config_lib.default_configdict(), source, num_train=20,
                                    num_test=6)
    c.model.builtin = "nano"
    c.data.max_prompt_len, c.data.max_answer_len = 32, 16
    if source == "countdown":
      c.data.task_options = ()
    cfg = config_lib.from_configdict(c)
    tok = load_tokenizer("builtin")
    ev = trainer.make_evaluator(cfg, trainer.model_config(cfg, tok), tok,
                                sharding.make_mesh(cfg.mesh), str(tmp_path / source))
    assert ev.examples and all(ex["task"] == source for ex in ev.examples)
    if source == "arithmetic":
      assert all(eval_lib.is_correct(ex, ex["answer"], True) for ex in ev.examples)
