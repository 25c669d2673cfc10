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


# ---------------------------------------------------------------------------
# Correctness follows the run's reward; agreement with the RL reward.
# ---------------------------------------------------------------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHAT_TOKENIZER = os.path.join(FIXTURES, "tiny_chat_tokenizer")


def _jsonl(name, split="test"):
  with open(os.path.join(FIXTURES, name, f"{split}.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _gsm8k_examples():
  return [{"prompt": r["question"], "answer": r["answer"]} for r in _jsonl("gsm8k")]


def _math_examples(answer_field="solution"):
  return [{"prompt": r["problem"], "answer": r[answer_field]} for r in _jsonl("math")]


def _completion_arrays(tok, texts, finished):
  """Sampler-style completions: text tokens, then EOS where finished; pad after; mask."""
  ids = [tok.encode(t) + ([tok.eos_id] if f else []) for t, f in zip(texts, finished)]
  width = max(len(row) for row in ids)
  tokens = np.full((len(ids), width), tok.pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for r, row in enumerate(ids):
    tokens[r, :len(row)], mask[r, :len(row)] = row, 1
  return tokens, mask


def _rl_reward(component, tok, examples, problem, tokens, mask, finished, data):
  """The one-jit RL step's reward: `build_reward_fn` on the pipeline's "rl" batch arrays."""
  from jaxrl_llm.data import pipeline
  from jaxrl_llm.rewards import registry
  from jaxrl_llm.rewards.base import RewardInputs
  batch = pipeline.make_batch(examples, data, "rl", tokenizer=tok)
  assert list(batch["prompt_id"]) == list(range(len(examples)))  # nothing dropped
  reward_fn = registry.build_reward_fn(((component, 1.0),), tok, examples=examples)
  task = {"prompt_id": np.asarray(problem, np.int32),
          "answer_tokens": batch["answer_tokens"][problem],
          "answer_mask": batch["answer_mask"][problem]}
  total, _ = reward_fn(RewardInputs(
      prompt_tokens_BP=batch["prompt_tokens"][problem],
      prompt_mask_BP=batch["prompt_mask"][problem],
      completion_BL=tokens, completion_mask_BL=mask, finished_B=np.asarray(finished), task=task))
  return np.asarray(total)


def _builtin_data(**kw):
  import dataclasses
  c = config_lib.use_builtin_task(config_lib.default_configdict())
  data = config_lib.from_configdict(c).data
  return dataclasses.replace(data, **kw)


def _component_case(component):
  """(examples, [(problem, text, finished)]) with correct and incorrect completions."""
  if component == "countdown":
    examples = tasks.generate("countdown", "test", 3, seed=0)
    rows = []
    for i, ex in enumerate(examples):
      rows += [(i, ex["answer"], True), (i, ex["answer"], False), (i, f"{ex['target']}+1", True),
               (i, "", True)]
    return examples, rows
  examples = _gsm8k_examples()[:4]
  from jaxrl_llm.rewards import answers
  rows = []
  for i, ex in enumerate(examples):
    gold = answers.gold_answer(ex["answer"])
    rows += [(i, gold, True), (i, gold, False), (i, ex["answer"], True),
             (i, f"The answer is {gold}.", True), (i, "The answer is 123456789.", True)]
  return examples, rows


@pytest.mark.parametrize("component", ["math", "countdown", "correct"])
def test_eval_correctness_equals_the_rl_reward_of_each_component(component):
  """For each correctness component, the evaluator's verdict on a completion is the
  RL reward's (full marks) on the same tokens: correct and wrong answers, truncated ones."""
  tok = load_tokenizer(CHAT_TOKENIZER)
  examples, rows = _component_case(component)
  data = _builtin_data(max_prompt_len=256, max_answer_len=64, add_bos=False)
  problem = np.asarray([p for p, _, _ in rows])
  finished = np.asarray([f for _, _, f in rows])
  tokens, mask = _completion_arrays(tok, [t for _, t, _ in rows], finished)
  verdicts = eval_lib.reward_correctness(component, tok, examples)(problem, tokens, mask,
                                                                   finished)
  reward = _rl_reward(component, tok, examples, problem, tokens, mask, finished, data)
  np.testing.assert_array_equal(verdicts, reward == 1.0)
  assert verdicts.any() and not verdicts.all()
  # The Evaluator built with the run's components scores by that component.
  cfg = testing.tiny_config("llama", vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, -1, 1)))
  said = []
  ev = eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=8), data, cfg, tok, mesh,
                          examples=examples, reward_components=(("format", 0.1), (component, 1.0),
                                                                ("answer_id", 0.0)),
                          say=said.append)
  assert ev.component == component and ev.scored_by_reward
  assert any(f"reward component {component!r}" in s for s in said)
  text_rows = [(t, len(t), bool(f)) for _, t, f in rows]
  assert ev._correct(problem, text_rows, tokens, mask) == list(verdicts)


def test_correctness_rule_differs_from_math_reward_where_the_reward_does():
  """A GSM8K run rewarded by exact match ('correct') is not evaluated by math_reward."""
  tok = load_tokenizer(CHAT_TOKENIZER)
  ex = _gsm8k_examples()[0]
  tokens, mask = _completion_arrays(tok, [ex["answer"]], [True])
  by_correct = eval_lib.reward_correctness("correct", tok, [ex])([0], tokens, mask, [True])
  assert not by_correct[0]                             # the rationale is no exact match ...
  assert eval_lib.is_correct(ex, ex["answer"], True)   # ... but math_reward's full marks


def test_correctness_component_choice():
  assert eval_lib.correctness_component((("format", 0.1), ("correct", 1.0))) == "correct"
  assert eval_lib.correctness_component((("math", 0.0), ("correct", 1.0))) == "math"
  assert eval_lib.correctness_component((("correct", 1.0), ("answer_id", 0.0))) == "correct"
  assert eval_lib.correctness_component((("reward_model", 1.0),)) is None
  assert eval_lib.correctness_component((("format", 1.0),)) is None
  with pytest.raises(ValueError, match="no notion of a correct answer"):
    eval_lib.reward_correctness("format", load_tokenizer("builtin"), [])


def test_reward_without_correctness_is_said_and_reported(tiny_setup):
  tok, cfg, params, data, examples, mesh = tiny_setup
  said = []
  ev = eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=6, max_new_tokens=2, num_samples=0),
                          data, cfg, tok, mesh, examples=examples,
                          reward_components=(("reward_model", 1.0),), say=said.append)
  assert ev.component is None and ev.rule == "the arithmetic task's verifier"
  notice = [s for s in said if "name no correctness component" in s]
  assert notice and "arithmetic task's verifier" in notice[0] and "not by the reward" in notice[0]
  assert ev(params)["eval/scored_by_reward"] == 0.0
  # Without reward components (an SFT run) no such metric: nothing to compare with.
  assert _evaluator(tiny_setup).scored_by_reward is None


def test_run_reward_components_only_for_rewarded_kinds():
  def cfg(kind):
    return config_lib.from_configdict(
        config_lib.use_builtin_task(config_lib.default_configdict(kind=kind)))
  assert eval_lib.run_reward_components(cfg("rl")) == (("correct", 1.0),)
  assert eval_lib.run_reward_components(cfg("sft")) is None


@pytest.mark.parametrize("answer_field", ["solution", "answer"])
def test_math_fixture_rl_math_reward_and_evaluator_agree(answer_field):
  """MATH format (\\boxed{} solutions, or bare LaTeX answers): on the same completions the
  RL `math` reward and the evaluator (reward rule, and the reference rule of a run without
  a reward) give the same verdicts, equivalent forms included."""
  tok = load_tokenizer(CHAT_TOKENIZER)
  examples = _math_examples(answer_field)
  raw = _jsonl("math")
  rows = []
  for i, r in enumerate(raw):
    rows += [(i, r["solution"], True), (i, f"So the answer is $\\boxed{{{r['answer']}}}$.", True),
             (i, f"\\boxed{{{r['answer']}}}", False), (i, "\\boxed{123456789}", True),
             (i, "I do not know.", True)]
  rows.append((0, "Hence $\\boxed{0.5}$.", True))  # \frac{1}{2} in another form
  data = _builtin_data(max_prompt_len=256, max_answer_len=64, add_bos=False)
  problem = np.asarray([p for p, _, _ in rows])
  finished = np.asarray([f for _, _, f in rows])
  tokens, mask = _completion_arrays(tok, [t for _, t, _ in rows], finished)
  reward = _rl_reward("math", tok, examples, problem, tokens, mask, finished, data) == 1.0
  by_reward = eval_lib.reward_correctness("math", tok, examples)(problem, tokens, mask, finished)
  by_reference = [eval_lib.is_correct(examples[p], t, f) for p, t, f in rows]
  np.testing.assert_array_equal(by_reward, reward)
  np.testing.assert_array_equal(by_reference, reward)
  assert reward[-1] and reward[:-1].reshape(-1, 5).tolist() == [
      [True, True, True, False, False]] * len(raw)


def test_chat_template_prompt_ids_equal_encode_prompts():
  """Under data.chat_template=True the evaluator's prompts are the training pipeline's."""
  import dataclasses

  from jaxrl_llm.data import pipeline
  tok = load_tokenizer(CHAT_TOKENIZER)
  examples = _gsm8k_examples()
  data = dataclasses.replace(_builtin_data(), tokenizer=CHAT_TOKENIZER,
                             chat_template=True, add_bos=False, max_prompt_len=512,
                             max_answer_len=64, system_prompt="Think step by step.",
                             prompt_template="Q: {prompt}\nA:")
  cfg = testing.tiny_config("llama", vocab_size=tok.vocab_size)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, -1, 1)))
  ev = eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=8), data, cfg, tok, mesh,
                          examples=examples, say=lambda m: None)
  expected = pipeline.encode_prompts(data, tok, [ex["prompt"] for ex in examples])
  assert ev.prompt_ids == expected and len(expected) == 8
  batch = pipeline.make_batch(examples, data, "rl", tokenizer=tok)  # what RL trains on
  rl_prompts = [list(t[m == 1]) for t, m in zip(batch["prompt_tokens"], batch["prompt_mask"])]
  assert rl_prompts == expected
  # The chat template is really applied: the rendered turns, not the bare template text.
  no_chat = dataclasses.replace(data, chat_template=False, system_prompt="")
  plain = pipeline.encode_prompts(no_chat, tok, [examples[0]["prompt"]])[0]
  assert expected[0] != plain
  assert tok.decode(expected[0]).count("Think step by step.") == 1
  im_start = tok.encode("<|im_start|>")
  assert expected[0][:len(im_start)] == im_start


def test_progress_lines_every_batch(tiny_setup, capsys):
  tok, cfg, params, data, _, mesh = tiny_setup
  examples = tasks.generate("arithmetic", "test", 20, seed=1, max_digits=1)
  # 8 CPU devices: batches of 8 rows, so 20 problems take 3 batches.
  ev = eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=20, max_new_tokens=2, batch_size=8,
                                              num_samples=0), data, cfg, tok, mesh,
                          examples=examples)  # say=print
  ev(params)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("eval [")]
  assert [l.split(":")[1].split()[0] for l in lines] == ["8/20", "16/20", "20/20"]
  assert [l.split("(batch ")[1].split(")")[0] for l in lines] == ["1/3", "2/3", "3/3"]
  assert all(l.startswith("eval [greedy]") and "completions/s" in l and "ETA" in l
             for l in lines)
  assert lines[-1].endswith("ETA 0s")


def test_no_progress_lines_for_one_batch(tiny_setup, capsys):
  tok, cfg, params, data, examples, mesh = tiny_setup
  eval_lib.Evaluator(eval_lib.EvalConfig(num_examples=6, max_new_tokens=2, batch_size=64,
                                         num_samples=0),
                     data, cfg, tok, mesh, examples=examples)(params)
  assert "eval [" not in capsys.readouterr().out


def test_progress_line_rate_and_eta():
  line = eval_lib.progress_line("greedy", 30, 120, 3, 12, 10.0)
  assert line == "eval [greedy]: 30/120 completions (batch 3/12), 3.0 completions/s, ETA 30s"


@pytest.fixture(scope="module")
def hf_instruct(tmp_path_factory):
  return testing.tiny_instruct_checkpoint(tmp_path_factory.mktemp("hf") / "tiny_instruct",
                                          CHAT_TOKENIZER)


def _hf_gsm8k_config(hf_dir, **model):
  c = config_lib.default_configdict(kind="rl")
  c.model.source, c.model.dtype = "hf", "float32"
  for key, value in model.items():
    c.model[key] = value
  c.data.source, c.data.path = "jsonl", os.path.join(FIXTURES, "gsm8k", "{split}.jsonl")
  c.data.field_map = (("prompt", "question"),)
  c.data.tokenizer, c.data.chat_template, c.data.add_bos = hf_dir, True, False
  c.data.max_prompt_len, c.data.max_answer_len = 128, 32  # chat prompts: 75-114 tokens
  c.reward.components = (("math", 1.0),)
  # Greedy only: sampled metrics are covered above, one pass keeps this fast.
  c.eval.num_examples, c.eval.max_new_tokens, c.eval.num_samples = 3, 4, 0
  c.eval.batch_size = 8
  return config_lib.from_configdict(c)


@pytest.mark.parametrize("how", ["hf_path", "model.path"])
def test_launch_eval_of_an_hf_directory(hf_instruct, tmp_path, how):
  """launch/eval.py's evaluate_run on an HF checkpoint (no training run): metrics, the
  per-problem results, correctness by the configured reward (math) on GSM8K."""
  from jaxrl_llm.rewards import host
  # With --hf_path the config's model.path is a placeholder (as in configs/grpo_gsm8k.py).
  path = hf_instruct if how == "model.path" else os.fspath(tmp_path / "no_such_checkpoint")
  cfg = _hf_gsm8k_config(hf_instruct, path=path)
  said = []
  metrics = eval_lib.evaluate_run(cfg, os.fspath(tmp_path), say=said.append,
                                  hf_path=hf_instruct if how == "hf_path" else "")
  assert any(f"Evaluating the HF checkpoint {hf_instruct}" in s for s in said)
  assert metrics["eval/num_examples"] == 3.0 and metrics["eval/scored_by_reward"] == 1.0
  assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and "eval/pass@1" not in metrics
  rows = [json.loads(l) for l in open(tmp_path / "eval" / "results.jsonl")]
  gold = _gsm8k_examples()
  assert [r["prompt"] for r in rows] == [ex["prompt"] for ex in gold[:3]]
  for row, ex in zip(rows, gold):
    assert row["rule"] == "reward component 'math'"
    greedy = row["greedy"]
    assert 1 <= greedy["length"] <= 4
    assert greedy["correct"] == (host.math_reward(greedy["text"], ex) == 1.0)
