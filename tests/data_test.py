"""Tests of jaxrl_llm.data.builders and jaxrl_llm.data.pipeline."""

import dataclasses
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from jaxrl_llm import tokenizers
from jaxrl_llm.data import builders, pipeline, tasks
from jaxrl_llm.data.pipeline import DataConfig, DataIterator
from jaxrl_llm.rewards import answers

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
CHAT_TOKENIZER = str(FIXTURES / "tiny_chat_tokenizer")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tok():
  return tokenizers.load_tokenizer("builtin")


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def _equal_batches(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def test_synthetic_builders_match_generator(data_dir):
  for source in ("arithmetic", "countdown"):
    cfg = DataConfig(source=source, data_dir=data_dir, num_train=40, num_test=12, seed=3)
    train, test = builders.load_split(cfg, "train"), builders.load_split(cfg, "test")
    assert (len(train), len(test)) == (40, 12)
    expected = tasks.generate(source, "train", 40, 3)
    for got, want in zip(train, expected):
      assert got["prompt"] == want["prompt"] and got["answer"] == want["answer"]
      if source == "countdown":
        assert got["numbers"] == want["numbers"] and got["target"] == want["target"]
        assert all(type(n) is int for n in got["numbers"])
        assert tasks.countdown_correct(got["numbers"], got["target"], got["answer"])
    assert isinstance(train[0]["prompt"], str)
    assert train[-1] == train[39] and train[2:4] == [train[2], train[3]]
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


def test_synthetic_config_names_follow_content(data_dir):
  a = builders.builder_for(DataConfig(data_dir=data_dir, seed=1), "train")
  b = builders.builder_for(DataConfig(data_dir=data_dir, seed=2), "train")
  c = builders.builder_for(DataConfig(data_dir=data_dir, seed=1, task_options={"ops": "+-*"}),
                           "train")
  assert len({a.builder_config_name, b.builder_config_name, c.builder_config_name}) == 3
  with pytest.raises(ValueError, match="unknown option"):
    DataConfig(task_options={"digits": 3})


def test_jsonl_field_map_and_split_paths(tmp_path, data_dir):
  for split in ("train", "test"):
    _write_jsonl(tmp_path / f"{split}.jsonl", [
        {"question": f"{split} q1", "answer": 72, "extra": [1]},
        {"question": f"{split} q2", "answer": "x #### 5"},
    ])
  (tmp_path / "train.jsonl").write_text(
      (tmp_path / "train.jsonl").read_text() + "\n  \n", encoding="utf-8")  # blank lines skipped
  field_map = {"prompt": "question"}
  for path in (str(tmp_path), str(tmp_path / "{split}.jsonl")):
    cfg = DataConfig(source="jsonl", path=path, field_map=field_map, data_dir=data_dir)
    assert cfg.field_map == (("prompt", "question"),)
    train = builders.load_split(cfg, "train")
    assert list(train) == [{"prompt": "train q1", "answer": "72"},
                           {"prompt": "train q2", "answer": "x #### 5"}]
    assert builders.load_split(cfg, "test")[1]["prompt"] == "test q2"
  single = DataConfig(source="jsonl", path=str(tmp_path / "test.jsonl"), field_map=field_map,
                      data_dir=data_dir)
  assert builders.load_split(single, "train")[0]["prompt"] == "test q1"
  with pytest.raises(ValueError, match="single file"):
    builders.load_split(single, "test")


def test_jsonl_edit_rebuilds(tmp_path, data_dir):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
  cfg = DataConfig(source="jsonl", path=str(path), data_dir=data_dir)
  assert builders.load_split(cfg, "train")[0]["prompt"] == "a"
  _write_jsonl(path, [{"prompt": "b", "answer": "1"}])
  assert builders.load_split(cfg, "train")[0]["prompt"] == "b"


def test_parquet_field_map(tmp_path, data_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"problem": ["1+1=", "2+2="], "solution": ["2", "4"], "level": [1, 2]})
  pq.write_table(table, tmp_path / "train.parquet")
  cfg = DataConfig(source="parquet", path=str(tmp_path), data_dir=data_dir,
                   field_map=(("prompt", "problem"), ("answer", "solution")))
  assert list(builders.load_split(cfg, "train")) == [
      {"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
  bad = DataConfig(source="parquet", path=str(tmp_path), data_dir=data_dir,
                   field_map=(("prompt", "question"),))
  with pytest.raises(ValueError, match=r"missing field 'question' \(mapped to 'prompt'\); "
                     r"fields found: \['level', 'problem', 'solution'\]"):
    builders.load_split(bad, "train")


def test_malformed_jsonl_line_reports_file_and_line(tmp_path, data_dir):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n'
                  '{"prompt": "c", "answer": \n', encoding="utf-8")
  cfg = DataConfig(source="jsonl", path=str(path), data_dir=data_dir)
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
    builders.load_split(cfg, "train")
  path.write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n', encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
    builders.load_split(cfg, "train")


def test_missing_field_names_field_and_fields_found(tmp_path, data_dir):
  path = _write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "1"},
                                             {"q": "q", "answer": "1"}])
  cfg = DataConfig(source="jsonl", path=str(path), data_dir=data_dir,
                   field_map={"prompt": "question"})
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'question' "
                                                 "(mapped to 'prompt'); fields found: "
                                                 "['answer', 'q']")):
    builders.load_split(cfg, "train")


def test_preference_and_unpaired_jsonl(tmp_path, data_dir):
  pairs = _write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
      {"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
  cfg = DataConfig(source="preference_jsonl", path=str(pairs), data_dir=data_dir)
  assert builders.load_split(cfg, "train")[1] == {"prompt": "2+2=", "chosen": "4",
                                                  "rejected": "5"}
  unpaired = _write_jsonl(tmp_path / "u.jsonl", [
      {"prompt": "1+1=", "completion": "2", "good": True},
      {"prompt": "2+2=", "completion": "5", "good": 0}])
  cfg = DataConfig(source="unpaired_jsonl", path=str(unpaired), data_dir=data_dir,
                   field_map={"label": "good"})
  assert [e["label"] for e in builders.load_split(cfg, "train")] == [True, False]
  _write_jsonl(unpaired, [{"prompt": "1+1=", "completion": "2", "good": "yes"}])
  with pytest.raises(ValueError, match=re.escape(f"{unpaired}:1: field 'good' must be a bool")):
    builders.load_split(cfg, "train")


with registered.skip_registration():

  class _QaDataset(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a prepared catalog dataset, with nested fields."""
    name = "jaxrl_test_qa"
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict({
                                       "question": tfds.features.Text(),
                                       "meta": {"final": tfds.features.Text()}}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"question": f"{i}+1=", "meta": {"final": str(i + 1)}}


def test_tfds_source_with_field_map(tmp_path):
  _QaDataset(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = DataConfig(source="tfds", tfds_name="jaxrl_test_qa", data_dir=str(tmp_path),
                   field_map={"prompt": "question", "answer": "meta.final"})
  examples = builders.load_split(cfg, "validation")
  assert list(examples) == [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
  bad = DataConfig(source="tfds", tfds_name="jaxrl_test_qa", data_dir=str(tmp_path),
                   field_map={"prompt": "q"})
  with pytest.raises(ValueError, match=r"missing field 'q'.*fields found: \['meta', 'question'\]"):
    builders.load_split(bad, "validation")
  missing = DataConfig(source="tfds", tfds_name="mnist", data_dir=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="not prepared.*array_record"):
    builders.load_split(missing, "train")


# ---------------------------------------------------------------------------
# Synthetic preference rule
# ---------------------------------------------------------------------------


def test_preference_rule_checker(data_dir):
  assert builders.follows_arithmetic_rule("12+345=", "357")
  assert builders.follows_arithmetic_rule("345-12=", " 333 ")
  assert not builders.follows_arithmetic_rule("12*34=", "409")
  assert not builders.follows_arithmetic_rule("12+345=", "0357")
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    builders.arithmetic_result("3 5 -> 8:")
  cfg = DataConfig(source="preference_arithmetic", data_dir=data_dir, num_train=200,
                   num_test=20, task_options={"ops": "+-*"})
  examples = builders.load_split(cfg, "train")
  assert len(examples) == 200 and all(builders.valid_preference_pair(e) for e in examples)
  assert not builders.valid_preference_pair({"prompt": "1+1=", "chosen": "3", "rejected": "2"})
  rng = np.random.default_rng(0)
  for answer in ("0", "7", "10", "111", "1203", "98765"):
    for _ in range(50):
      wrong = builders.wrong_answer(answer, rng)
      assert wrong != answer and re.fullmatch(r"0|[1-9][0-9]*", wrong), (answer, wrong)


# ---------------------------------------------------------------------------
# Padding, packing and batches
# ---------------------------------------------------------------------------


def test_rl_batch_left_and_right_padding(tok):
  cfg = DataConfig(max_prompt_len=8, max_answer_len=5)
  examples = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}]
  batch = pipeline.make_batch(examples, cfg, tokenizer=tok)
  assert {k: v.shape for k, v in batch.items()} == {
      "prompt_tokens": (2, 8), "prompt_mask": (2, 8), "answer_tokens": (2, 5),
      "answer_mask": (2, 5), "prompt_id": (2,)}
  assert all(v.dtype == np.int32 for v in batch.values())
  prompt = [tok.bos_id] + tok.encode("1+2=")
  np.testing.assert_array_equal(batch["prompt_tokens"][0], [tok.pad_id] * 3 + prompt)
  np.testing.assert_array_equal(batch["prompt_mask"][0], [0, 0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(batch["answer_tokens"][1],
                                tok.encode("30") + [tok.eos_id] + [tok.pad_id] * 2)
  np.testing.assert_array_equal(batch["answer_mask"][1], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["prompt_id"], [0, 1])
  templated = pipeline.make_batch(
      examples[:1], DataConfig(max_prompt_len=8, prompt_template="({prompt})", add_bos=False),
      tokenizer=tok)
  assert tok.decode(templated["prompt_tokens"][0]) == "(1+2=)"


def test_countdown_batch_has_numbers_and_target(data_dir):
  cfg = DataConfig(source="countdown", data_dir=data_dir, num_train=40, num_test=12, seed=3,
                   batch_size=4, shuffle=False)
  batch = next(DataIterator(cfg, "train", process_index=0, process_count=1))
  examples = builders.load_split(cfg, "train")
  assert batch["numbers"].shape == (4, 3) and batch["target"].shape == (4,)
  for row, i in enumerate(batch["prompt_id"]):
    assert batch["numbers"][row].tolist() == examples[int(i)]["numbers"]
    assert batch["target"][row] == examples[int(i)]["target"]


def test_preference_and_unpaired_batches(tok):
  cfg = DataConfig(source="preference_jsonl", path="unused", max_prompt_len=8,
                   max_completion_len=6)
  batch = pipeline.make_batch([{"prompt": "1+1=", "chosen": "2", "rejected": "11"}], cfg,
                              tokenizer=tok)
  assert {k: v.shape for k, v in batch.items()} == {
      "prompt_tokens": (1, 8), "prompt_mask": (1, 8), "chosen_tokens": (1, 6),
      "chosen_mask": (1, 6), "rejected_tokens": (1, 6), "rejected_mask": (1, 6),
      "prompt_id": (1,)}
  np.testing.assert_array_equal(batch["prompt_mask"][0], [0, 0, 0] + [1] * 5)
  np.testing.assert_array_equal(batch["rejected_mask"][0], [1, 1, 1, 0, 0, 0])
  cfg = DataConfig(source="unpaired_jsonl", path="unused", max_prompt_len=8,
                   max_completion_len=6)
  batch = pipeline.make_batch([{"prompt": "1+1=", "completion": "2", "label": True},
                               {"prompt": "1+2=", "completion": "4", "label": False}], cfg,
                              tokenizer=tok)
  assert batch["completion_tokens"].shape == (2, 6) and batch["label"].dtype == np.bool_
  np.testing.assert_array_equal(batch["label"], [True, False])
  with pytest.raises(ValueError, match="mode 'sft' needs 'prompt' examples"):
    pipeline.make_batch([], cfg, "sft", tokenizer=tok)


def test_pack_next_fit():
  assert pipeline.pack([5, 5, 5, 3, 10], range(5), 10) == [[0, 1], [2, 3], [4]]
  assert pipeline.pack([4, 7, 3], [2, 1, 0], 10) == [[2, 1], [0]]
  with pytest.raises(ValueError, match="more than seq_len=10"):
    pipeline.pack([11], [0], 10)


def test_sft_packing_segments_positions_loss_mask(tok):
  examples = tasks.generate("arithmetic", "train", 30, seed=0)
  cfg = DataConfig(seq_len=40)
  batch = pipeline.make_batch(examples, cfg, "sft", tokenizer=tok)
  assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
  seen = []
  for row in range(batch["tokens"].shape[0]):
    segments = batch["segment_ids"][row]
    assert segments.max() >= 1
    for s in range(1, segments.max() + 1):
      cols = np.flatnonzero(segments == s)
      assert np.all(np.diff(cols) == 1)  # contiguous, hence not split across rows
      tokens, loss = batch["tokens"][row, cols], batch["loss_mask"][row, cols]
      np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(len(cols)))
      assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
      example = examples[len(seen)]
      assert tok.decode(tokens[loss == 0]) == example["prompt"]
      assert tok.decode(tokens[loss == 1]) == example["answer"]
      assert loss[-1] == 1 and loss.sum() == len(tok.encode(example["answer"])) + 1
      seen.append(example)
    padding = segments == 0
    assert np.all(batch["tokens"][row, padding] == tok.pad_id)
    assert not batch["loss_mask"][row, padding].any() and not batch["positions"][row, padding].any()
  assert len(seen) == len(examples)


# ---------------------------------------------------------------------------
# Iteration
# ---------------------------------------------------------------------------


def _config(data_dir, **overrides):
  base = {"source": "arithmetic", "data_dir": data_dir, "num_train": 50, "num_test": 10,
          "seed": 0, "batch_size": 8, "max_prompt_len": 10, "max_answer_len": 6}
  return DataConfig(**{**base, **overrides})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_iterator_deterministic_and_reshuffles(data_dir):
  cfg = _config(data_dir)
  a = DataIterator(cfg)  # one process by default (jax.process_index / process_count)
  b = DataIterator(cfg, process_index=0, process_count=1)
  assert (a.process_index, a.process_count, a.local_batch_size) == (0, 1, 8)
  assert a.num_batches() == 6  # 50 // 8, the remainder is dropped
  batches_a, batches_b = _take(a, 12), _take(b, 12)
  for x, y in zip(batches_a, batches_b):
    _equal_batches(x, y)
  epoch0 = np.concatenate([x["prompt_id"] for x in batches_a[:6]])
  epoch1 = np.concatenate([x["prompt_id"] for x in batches_a[6:]])
  assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
  assert not np.array_equal(epoch0, epoch1)
  assert a.stats["epochs"] == 2 and a.get_state() == {"epoch": 2, "position": 0}
  other_seed = DataIterator(_config(data_dir, seed=1), process_index=0, process_count=1)
  assert not np.array_equal(next(other_seed)["prompt_id"], batches_a[0]["prompt_id"])


@pytest.mark.parametrize("mode", ["rl", "sft"])
def test_resume_continues_exactly(data_dir, mode):
  cfg = _config(data_dir, seq_len=24)
  uninterrupted = _take(DataIterator(cfg, mode=mode, process_index=0, process_count=1), 9)
  first = DataIterator(cfg, mode=mode, process_index=0, process_count=1)
  _take(first, 8)  # crosses into the second epoch
  state = json.loads(json.dumps(first.get_state()))
  resumed = DataIterator(cfg, mode=mode, process_index=0, process_count=1)
  resumed.set_state(state)
  _equal_batches(next(resumed), uninterrupted[8])
  with pytest.raises(ValueError, match="keys 'epoch' and 'position'"):
    resumed.set_state({"epoch": 0})


@pytest.mark.parametrize("mode", ["rl", "sft"])
def test_two_processes_cover_the_global_batch(data_dir, mode):
  cfg = _config(data_dir, seq_len=24)
  whole = DataIterator(cfg, mode=mode, process_index=0, process_count=1)
  parts = [DataIterator(cfg, mode=mode, process_index=i, process_count=2) for i in range(2)]
  assert parts[0].local_batch_size == 4
  for _ in range(7):
    global_batch = next(whole)
    local = [next(p) for p in parts]
    _equal_batches(global_batch, {k: np.concatenate([b[k] for b in local]) for k in local[0]})
    if mode == "rl":
      ids = [set(b["prompt_id"].tolist()) for b in local]
      assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 8
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    DataIterator(cfg, process_index=0, process_count=3)


def test_finite_eval_pads_last_batch(data_dir):
  cfg = _config(data_dir, batch_size=4)
  it = DataIterator(cfg, "test", num_epochs=1, drop_remainder=False, shuffle=False,
                    process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 3 and it.stats["epochs"] == 1
  ids = np.concatenate([b["prompt_id"] for b in batches])
  np.testing.assert_array_equal(ids, list(range(10)) + [-1, -1])
  assert not batches[-1]["prompt_mask"][2:].any() and not batches[-1]["answer_mask"][2:].any()


def test_overlong_skip_counts_and_error_names_example(data_dir):
  # BOS + 5 characters ("12+3=") fit, "12+34=" does not
  cfg = _config(data_dir, max_prompt_len=6, max_drop_fraction=1.0)
  it = DataIterator(cfg, process_index=0, process_count=1)
  examples = builders.load_split(cfg, "train")
  too_long = [i for i, e in enumerate(examples) if len(e["prompt"]) + 1 > 6]
  assert too_long and it.stats["skipped_overlong"] == len(too_long)
  assert it.stats["dropped_prompt"] == it.stats["dropped"] == len(too_long)
  assert it.stats["examples"] == 50 - len(too_long) and it.stats["split_examples"] == 50
  assert not set(next(it)["prompt_id"].tolist()) & set(too_long)
  with pytest.raises(ValueError, match=rf"example {too_long[0]} of split 'train' .*prompt of "
                     r"\d+ tokens, more than max_prompt_len=6"):
    DataIterator(_config(data_dir, max_prompt_len=6, overlong="error"),
                 process_index=0, process_count=1)
  examples = [{"prompt": " ", "answer": "1"}] + [{"prompt": "1+0=", "answer": "1"}] * 8
  it = DataIterator(_config(data_dir, max_drop_fraction=0.2), examples=examples,
                    process_index=0, process_count=1)
  assert it.stats["skipped_empty"] == 1 and it.stats["skipped_overlong"] == 0
  with pytest.raises(ValueError, match="example 0 of split 'train' .*empty prompt"):
    DataIterator(_config(data_dir, overlong="error"), examples=examples,
                 process_index=0, process_count=1)
  sft = DataIterator(_config(data_dir, seq_len=12, max_drop_fraction=1.0), mode="sft",
                     process_index=0, process_count=1)
  assert sft.stats["skipped_overlong"] > 0 and next(sft)["tokens"].shape == (8, 12)


def test_too_few_examples_for_a_batch(data_dir):
  with pytest.raises(ValueError, match="fewer than batch_size=64"):
    DataIterator(_config(data_dir, batch_size=64), process_index=0, process_count=1)


def test_data_config_validation():
  with pytest.raises(ValueError, match=r"DataConfig.source must be one of .*'arithmetic'"):
    DataConfig(source="csv")
  with pytest.raises(ValueError, match="DataConfig.overlong must be one of"):
    DataConfig(overlong="truncate")
  with pytest.raises(ValueError, match="DataConfig.path"):
    DataConfig(source="jsonl")
  with pytest.raises(ValueError, match="DataConfig.tfds_name"):
    DataConfig(source="tfds")
  with pytest.raises(ValueError, match="unknown field 'question'"):
    DataConfig(source="jsonl", path="x.jsonl", field_map={"question": "prompt"})
  with pytest.raises(ValueError, match="DataConfig.prompt_template"):
    DataConfig(prompt_template="Q: {question}")
  with pytest.raises(ValueError, match="DataConfig.batch_size must be a positive int"):
    DataConfig(batch_size=0)
  with pytest.raises(ValueError, match="DataConfig.task_options must be empty"):
    DataConfig(source="jsonl", path="x.jsonl", task_options={"ops": "+"})
  cfg = DataConfig(task_options=[["ops", "+-*"], ["max_digits", 2]])
  assert cfg.task_options == (("max_digits", 2), ("ops", "+-*"))
  assert DataConfig(source="tfds", tfds_name="x", tfds_kind="preference").kind == "preference"


def test_synthetic_tasks_drop_nothing_at_their_budgets(data_dir):
  for source in ("arithmetic", "countdown"):
    cfg = DataConfig(source=source, data_dir=data_dir, num_train=200, num_test=20, seed=3)
    assert cfg.max_drop_fraction == 0.0
    it = DataIterator(cfg, process_index=0, process_count=1)
    assert it.stats["dropped"] == 0 and it.stats["examples"] == 200


# ---------------------------------------------------------------------------
# Drop reports and max_drop_fraction
# ---------------------------------------------------------------------------


def _mixed_examples():
  """10 examples: 2 prompts over 8 tokens (BOS + 9, BOS + 12), 1 answer over 4, 1 empty."""
  ok = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
  return ok + [{"prompt": "123+4567=", "answer": "4690"},
               {"prompt": "123456+7890=", "answer": "131346"},
               {"prompt": "1+2=", "answer": "12345"},
               {"prompt": "  ", "answer": "1"}]


def test_drop_report_counts_reasons_logs_and_prints(data_dir, capsys, caplog):
  cfg = _config(data_dir, max_prompt_len=8, max_answer_len=4, batch_size=2,
                max_drop_fraction=0.4)
  with caplog.at_level("INFO"):
    it = DataIterator(cfg, examples=_mixed_examples(), process_index=0, process_count=1)
  assert {k: it.stats[k] for k in ("split_examples", "examples", "dropped", "dropped_prompt",
                                   "dropped_answer", "dropped_empty", "skipped_overlong",
                                   "skipped_empty")} == {
      "split_examples": 10, "examples": 6, "dropped": 4, "dropped_prompt": 2,
      "dropped_answer": 1, "dropped_empty": 1, "skipped_overlong": 3, "skipped_empty": 1}
  assert it.encoded.longest == {"prompt": 13, "answer": 7}
  line = ("split 'train' (rl): 10 examples, 4 dropped (prompt over max_prompt_len=8: 2, "
          "answer over max_answer_len=4: 1, empty prompt: 1); longest in tokens: prompt 13, "
          "answer 7")
  assert it.encoded.drop_summary() == line
  assert line in capsys.readouterr().out
  assert line in caplog.text
  assert set(np.concatenate([next(it)["prompt_id"] for _ in range(3)]).tolist()) == set(range(6))
  quiet = DataIterator(cfg, examples=_mixed_examples(), process_index=1, process_count=2)
  assert quiet.stats["dropped"] == 4 and "examples" not in capsys.readouterr().out


def test_max_drop_fraction_refuses_with_counts_budgets_and_fix(data_dir):
  examples = _mixed_examples()
  for fraction in (0.0, 0.3):  # 4 of 10 dropped: more than either
    cfg = _config(data_dir, max_prompt_len=8, max_answer_len=4, batch_size=2,
                  max_drop_fraction=fraction)
    with pytest.raises(ValueError) as e:
      DataIterator(cfg, examples=examples, process_index=0, process_count=1)
    message = str(e.value)
    for part in ("10 examples, 4 dropped", "prompt over max_prompt_len=8: 2",
                 "answer over max_answer_len=4: 1", "empty prompt: 1",
                 "longest in tokens: prompt 13, answer 7", "40.00% of the split",
                 f"max_drop_fraction={fraction}", "raise DataConfig.max_prompt_len to at least 13",
                 "raise DataConfig.max_answer_len to at least 7", "remove or fill the empty",
                 "or raise max_drop_fraction"):
      assert part in message, (part, message)
  with pytest.raises(ValueError, match="max_drop_fraction=0.0"):  # make_batch checks it too
    pipeline.make_batch(examples, _config(data_dir, max_prompt_len=8, max_answer_len=4),
                        tokenizer=tokenizers.load_tokenizer("builtin"))
  sft = _config(data_dir, seq_len=10, max_drop_fraction=0.1)
  with pytest.raises(ValueError, match=r"prompt \+ answer \+ EOS over seq_len=10: 3.*"
                     r"raise DataConfig.seq_len to at least 20"):
    DataIterator(sft, mode="sft", examples=examples, process_index=0, process_count=1)
  pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "2222222"}] * 3
  pref = DataConfig(source="preference_jsonl", path="unused", max_completion_len=4,
                    max_drop_fraction=0.5)
  with pytest.raises(ValueError, match="rejected over max_completion_len=4: 3"):
    pipeline.make_batch(pairs, pref, tokenizer=tokenizers.load_tokenizer("builtin"))
  with pytest.raises(ValueError, match="DataConfig.max_drop_fraction must be a number in"):
    DataConfig(max_drop_fraction=1.5)


# ---------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tok():
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  return tokenizers.load_tokenizer(CHAT_TOKENIZER)


def _chat_config(**overrides):
  base = {"source": "jsonl", "path": "unused", "tokenizer": CHAT_TOKENIZER, "chat_template": True,
          "system_prompt": "Answer with a number.", "prompt_template": "Q: {prompt}",
          "add_bos": False, "max_prompt_len": 64, "max_answer_len": 8, "seq_len": 96}
  return DataConfig(**{**base, **overrides})


def _rendered_ids(tok, prompt, system="Answer with a number."):
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": f"Q: {prompt}"}]
  return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def _unpadded(tokens, mask):
  return tokens[mask.astype(bool)].tolist()


def _sft_segments(batch):
  """(prompt ids, trained ids) of every packed example of an SFT batch, in order."""
  segments = []
  for r in range(batch["tokens"].shape[0]):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      cols = batch["segment_ids"][r] == s
      loss = batch["loss_mask"][r] == 1
      segments.append((batch["tokens"][r, cols & ~loss].tolist(),
                       batch["tokens"][r, cols & loss].tolist()))
  return segments


def test_chat_template_in_rl_sft_and_preference_modes(chat_tok):
  examples = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "What is 10 * 4?", "answer": "40"}]
  cfg = _chat_config()
  texts = pipeline.prompt_strings(cfg, chat_tok, [e["prompt"] for e in examples])
  assert texts[0] == ("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n"
                      "Q: 1+2=<|im_end|>\n<|im_start|>assistant\n")
  ids = pipeline.encode_prompts(cfg, chat_tok, [e["prompt"] for e in examples])
  assert ids == [_rendered_ids(chat_tok, e["prompt"]) for e in examples]
  assert ids[0][0] == chat_tok.token_to_id("<|im_start|>")

  rl = pipeline.make_batch(examples, cfg, "rl", tokenizer=chat_tok)
  for row, e in enumerate(examples):
    assert _unpadded(rl["prompt_tokens"][row], rl["prompt_mask"][row]) == ids[row]
    assert _unpadded(rl["answer_tokens"][row], rl["answer_mask"][row]) == (
        chat_tok.encode(e["answer"]) + [chat_tok.eos_id])

  sft = pipeline.make_batch(examples, cfg, "sft", tokenizer=chat_tok)
  segments = _sft_segments(sft)
  assert [prompt for prompt, _ in segments] == ids
  assert [answer for _, answer in segments] == [  # the assistant turn ends with <|im_end|>
      chat_tok.encode(e["answer"]) + chat_tok.encode("<|im_end|>") for e in examples]

  pairs = [{"prompt": e["prompt"], "chosen": e["answer"], "rejected": "7"} for e in examples]
  pref = pipeline.make_batch(pairs, _chat_config(source="preference_jsonl"),
                             tokenizer=chat_tok)
  for row in range(2):
    assert _unpadded(pref["prompt_tokens"][row], pref["prompt_mask"][row]) == ids[row]
  unpaired = [{"prompt": "1+2=", "completion": "3", "label": True}]
  batch = pipeline.make_batch(unpaired, _chat_config(source="unpaired_jsonl"), tokenizer=chat_tok)
  assert _unpadded(batch["prompt_tokens"][0], batch["prompt_mask"][0]) == ids[0]

  # No system_prompt: the template's own default system message, nothing added by us.
  default = pipeline.encode_prompts(_chat_config(system_prompt=""), chat_tok, ["1+2="])[0]
  assert default == _rendered_ids(chat_tok, "1+2=", system=None)
  assert "You are a helpful assistant." in chat_tok.decode(default)


def test_chat_template_bos_is_never_doubled(chat_tok, tmp_path):
  with_bos = tmp_path / "with_bos"
  shutil.copytree(CHAT_TOKENIZER, with_bos)
  config = json.loads((with_bos / "tokenizer_config.json").read_text())
  config["bos_token"] = "<|endoftext|>"
  (with_bos / "tokenizer_config.json").write_text(json.dumps(config))
  tok = tokenizers.load_tokenizer(str(with_bos))
  bos = tok.bos_id
  plain = pipeline.encode_prompts(_chat_config(add_bos=False), tok, ["1+2="])[0]
  assert plain[0] != bos
  assert pipeline.encode_prompts(_chat_config(add_bos=True), tok, ["1+2="])[0] == [bos] + plain
  config["chat_template"] = "{{ bos_token }}" + config["chat_template"]
  (with_bos / "tokenizer_config.json").write_text(json.dumps(config))
  tok = tokenizers.load_tokenizer(str(with_bos))
  for add_bos in (False, True):  # the template writes BOS; add_bos does not add a second
    assert pipeline.encode_prompts(_chat_config(add_bos=add_bos), tok, ["1+2="])[0] == (
        [bos] + plain)
  # chat_tok has no BOS: add_bos=True adds none, and is no error with a chat template.
  assert pipeline.encode_prompts(_chat_config(add_bos=True), chat_tok, ["1+2="]) == (
      pipeline.encode_prompts(_chat_config(add_bos=False), chat_tok, ["1+2="]))
  with pytest.raises(ValueError, match="defines no BOS token; set add_bos=False"):
    pipeline.encode_prompts(_chat_config(chat_template=False, system_prompt="", add_bos=True),
                            chat_tok, ["1+2="])


def test_chat_template_errors(chat_tok, tmp_path, tok):
  with pytest.raises(ValueError, match=r"DataConfig.chat_template must be False with "
                     r"tokenizer='builtin'.*HF checkpoint directory"):
    DataConfig(chat_template=True)
  with pytest.raises(ValueError, match="DataConfig.system_prompt must be empty unless "
                     "chat_template=True"):
    DataConfig(system_prompt="Be brief.")
  cfg = _chat_config()
  with pytest.raises(ValueError, match=r"chat_template=True, but SentencePieceTokenizer.* has no "
                     "chat template.*set DataConfig.tokenizer to a HF checkpoint directory"):
    pipeline.encode_prompts(cfg, tok, ["1+2="])
  no_template = tmp_path / "no_template"
  shutil.copytree(CHAT_TOKENIZER, no_template)
  config = json.loads((no_template / "tokenizer_config.json").read_text())
  del config["chat_template"]
  (no_template / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="has no chat template.*or set chat_template=False"):
    pipeline.make_batch([{"prompt": "1+2=", "answer": "3"}], cfg,
                        tokenizer=tokenizers.load_tokenizer(str(no_template)))


# ---------------------------------------------------------------------------
# Rationale vs final answer (GSM8K)
# ---------------------------------------------------------------------------


def _gsm8k_config(data_dir, **overrides):
  base = {"source": "jsonl", "path": str(FIXTURES / "gsm8k" / "{split}.jsonl"),
          "field_map": {"prompt": "question"}, "data_dir": data_dir,
          "tokenizer": CHAT_TOKENIZER, "chat_template": True, "add_bos": False,
          "max_prompt_len": 160, "max_answer_len": 8, "seq_len": 512, "batch_size": 4,
          "shuffle": False}
  return DataConfig(**{**base, **overrides})


def test_gsm8k_rl_encodes_final_answer_sft_keeps_rationale(data_dir, chat_tok):
  cfg = _gsm8k_config(data_dir)
  examples = builders.load_split(cfg, "train")
  assert len(examples) == 8 and "####" in examples[0]["answer"]
  # The rationales are far over max_answer_len: encoding them would drop every row.
  assert min(len(chat_tok.encode(e["answer"])) for e in examples) > cfg.max_answer_len

  rl = DataIterator(cfg, "train", mode="rl", tokenizer=chat_tok, num_epochs=1,
                    process_index=0, process_count=1)
  assert rl.stats["dropped"] == 0 and rl.stats["examples"] == 8
  rows = 0
  for batch in rl:
    for row, i in enumerate(batch["prompt_id"]):
      gold = answers.gold_answer(examples[int(i)]["answer"])
      answer = _unpadded(batch["answer_tokens"][row], batch["answer_mask"][row])
      assert answer == chat_tok.encode(gold) + [chat_tok.eos_id]
      assert chat_tok.decode(answer) == gold and "####" not in gold
      rows += 1
  assert rows == 8
  assert examples[0]["answer"].endswith("#### 15")  # the example keeps the raw rationale
  assert {answers.gold_answer(e["answer"]) for e in examples} >= {"15", "1284", "-5", "8.75"}

  sft = DataIterator(cfg, "train", mode="sft", tokenizer=chat_tok, num_epochs=1,
                     drop_remainder=False, process_index=0, process_count=1)
  assert sft.stats["dropped"] == 0
  trained = [chat_tok.decode(answer) for batch in sft for _, answer in _sft_segments(batch)]
  assert sorted(trained) == sorted(e["answer"] for e in examples)  # full rationale text


# ---------------------------------------------------------------------------
# HF `datasets` saved to disk
# ---------------------------------------------------------------------------


def _write_arrow(path, table, stream=True):
  import pyarrow as pa
  with pa.OSFile(str(path), "wb") as sink:
    open_writer = pa.ipc.new_stream if stream else pa.ipc.new_file
    with open_writer(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=2)


def _save_dataset(directory, rows, num_shards):
  """The layout of `datasets.Dataset.save_to_disk`: stream-format shards, state.json, info."""
  import pyarrow as pa
  directory.mkdir(parents=True)
  names = [f"data-{k:05d}-of-{num_shards:05d}.arrow" for k in range(num_shards)]
  bounds = np.linspace(0, len(rows), num_shards + 1).astype(int)
  for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
    _write_arrow(directory / name, pa.Table.from_pylist(rows[lo:hi]))
  (directory / "state.json").write_text(json.dumps({
      "_data_files": [{"filename": n} for n in names], "_fingerprint": "0",
      "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
      "_output_all_columns": False, "_split": None}))
  (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "features": {}}))


def _qa_rows(split, n):
  return [{"question": f"{split} {i}+1=", "answer": f"so #### {i + 1}",
           "meta": {"level": i % 3}} for i in range(n)]


def test_hf_disk_dataset_dict_round_trip(tmp_path, data_dir):
  root = tmp_path / "gsm"
  _save_dataset(root / "train", _qa_rows("train", 7), num_shards=3)
  _save_dataset(root / "test", _qa_rows("test", 3), num_shards=1)
  (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
  field_map = {"prompt": "question"}
  for path in (str(root), str(root / "{split}")):
    cfg = DataConfig(source="hf_disk", path=path, field_map=field_map, data_dir=data_dir)
    for split, n in (("train", 7), ("test", 3)):
      got = list(builders.load_split(cfg, split))
      assert got == [{"prompt": r["question"], "answer": r["answer"]} for r in _qa_rows(split, n)]
  cfg = DataConfig(source="hf_disk", path=str(root), data_dir=data_dir,
                   field_map={"prompt": "question", "answer": "meta.level"}, batch_size=2,
                   max_answer_len=4, shuffle=False)
  batch = next(DataIterator(cfg, "test", process_index=0, process_count=1))
  assert tokenizers.load_tokenizer("builtin").decode_batch(batch["answer_tokens"]) == ["0", "1"]
  with pytest.raises(ValueError, match=r"no split 'validation'; its splits: \['train', 'test'\]"):
    builders.load_split(cfg, "validation")
  with pytest.raises(ValueError, match=r"missing field 'q'.*fields found: \['answer', 'meta', "
                     r"'question'\]"):
    builders.load_split(DataConfig(source="hf_disk", path=str(root), data_dir=data_dir,
                                   field_map={"prompt": "q"}), "train")

  # A single saved Dataset is the "train" split; an edited shard is rebuilt.
  single = DataConfig(source="hf_disk", path=str(root / "test"), data_dir=data_dir,
                      field_map=field_map)
  assert len(builders.load_split(single, "train")) == 3
  with pytest.raises(ValueError, match="one saved Dataset, which is the 'train' split"):
    builders.load_split(single, "test")
  shutil.rmtree(root / "test")
  _save_dataset(root / "test", _qa_rows("new", 2), num_shards=1)
  assert builders.load_split(single, "train")[1]["prompt"] == "new 1+1="


def test_hf_disk_plain_arrow_files_and_preference(tmp_path, data_dir):
  import pyarrow as pa
  pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(5)]
  _write_arrow(tmp_path / "train.arrow", pa.Table.from_pylist(pairs), stream=False)  # IPC file
  _write_arrow(tmp_path / "test.arrow", pa.Table.from_pylist(pairs[:2]))  # IPC stream
  cfg = DataConfig(source="preference_hf_disk", path=str(tmp_path), data_dir=data_dir)
  assert list(builders.load_split(cfg, "train")) == pairs
  assert list(builders.load_split(cfg, "test")) == pairs[:2]
  one_file = DataConfig(source="preference_hf_disk", path=str(tmp_path / "test.arrow"),
                        data_dir=data_dir)
  assert list(builders.load_split(one_file, "train")) == pairs[:2]
  with pytest.raises(FileNotFoundError, match="neither 'valid.arrow' nor 'valid/'"):
    builders.load_split(cfg, "valid")
  (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
  bad = DataConfig(source="hf_disk", path=str(tmp_path / "bad.arrow"), data_dir=data_dir)
  with pytest.raises(ValueError, match="neither an Arrow IPC stream nor an Arrow IPC file"):
    builders.load_split(bad, "train")


def test_hf_disk_reads_real_save_to_disk(tmp_path, data_dir):
  datasets = pytest.importorskip("datasets")
  import pyarrow as pa

  def dataset(rows, fingerprint):
    # An explicit fingerprint: some datasets / pyarrow pairs fail to hash a table.
    table = datasets.table.InMemoryTable(pa.Table.from_pylist(rows))
    return datasets.Dataset(table, fingerprint=fingerprint)

  rows = _qa_rows("train", 6)
  saved = datasets.DatasetDict({"train": dataset(rows, "train"),
                                "test": dataset(_qa_rows("test", 2), "test")})
  saved.save_to_disk(str(tmp_path / "d"), num_shards={"train": 2, "test": 1})
  cfg = DataConfig(source="hf_disk", path=str(tmp_path / "d"), data_dir=data_dir,
                   field_map={"prompt": "question"})
  assert [e["prompt"] for e in builders.load_split(cfg, "train")] == [r["question"] for r in rows]
  assert len(builders.load_split(cfg, "test")) == 2


def _write_parquet(path, columns):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(columns), path)
  return path


def _shards(directory, split, rows_per_shard):
  """Hub-layout shards "<split>-0000i-of-0000n.parquet", written in reverse order."""
  n = len(rows_per_shard)
  for i in reversed(range(n)):
    prompts = rows_per_shard[i]
    _write_parquet(directory / f"{split}-{i:05d}-of-{n:05d}.parquet",
                   {"prompt": prompts, "answer": [p[::-1] for p in prompts]})


def test_sharded_parquet_split_reads_shards_in_sorted_order(tmp_path, data_dir):
  data = tmp_path / "data"
  _shards(data, "train", [["a", "b"], ["c"], ["d", "e"]])
  _shards(data, "test", [["x"], ["y"]])
  want = {"train": ["a", "b", "c", "d", "e"], "test": ["x", "y"]}
  # The directory holding "<split>-*.parquet" shards (the Hugging Face Hub layout).
  cfg = DataConfig(source="parquet", path=str(data), data_dir=data_dir)
  for split, prompts in want.items():
    examples = builders.load_split(cfg, split)
    assert [e["prompt"] for e in examples] == prompts
    assert [e["answer"] for e in examples] == [p[::-1] for p in prompts]
  # A glob with "{split}", and one directory of shards per split.
  cfg = DataConfig(source="parquet", path=str(data / "{split}-*.parquet"), data_dir=data_dir)
  assert [e["prompt"] for e in builders.load_split(cfg, "test")] == ["x", "y"]
  per_split = tmp_path / "per_split"
  _shards(per_split / "train", "part", [["p"], ["q"], ["r"]])
  cfg = DataConfig(source="parquet", path=str(per_split), data_dir=data_dir)
  assert [e["prompt"] for e in builders.load_split(cfg, "train")] == ["p", "q", "r"]
  cfg = DataConfig(source="parquet", path=str(per_split / "{split}"), data_dir=data_dir)
  assert [e["prompt"] for e in builders.load_split(cfg, "train")] == ["p", "q", "r"]


def test_sharded_parquet_edit_rebuilds_and_errors_name_the_path(tmp_path, data_dir):
  data = tmp_path / "data"
  _shards(data, "train", [["a"], ["b"]])
  cfg = DataConfig(source="parquet", path=str(data / "train-*.parquet"), data_dir=data_dir)
  assert [e["prompt"] for e in builders.load_split(cfg, "train")] == ["a", "b"]
  _shards(data, "train", [["a"], ["z"]])  # an edited shard builds a new copy
  assert [e["prompt"] for e in builders.load_split(cfg, "train")] == ["a", "z"]
  with pytest.raises(ValueError, match="'train' split"):
    builders.load_split(cfg, "test")  # a glob without "{split}" is the train split
  missing = DataConfig(source="parquet", path=str(data / "{split}-*.parquet"), data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match=re.escape(f"no Parquet file matches "
                                                        f"'{data / 'test-*.parquet'}'")):
    builders.load_split(missing, "test")
  with pytest.raises(FileNotFoundError, match=r"'test-\*\.parquet' shards"):
    builders.load_split(DataConfig(source="parquet", path=str(data), data_dir=data_dir), "test")
  (data / "train-00001-of-00002.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="train-00001-of-00002.parquet is not a readable Parquet"):
    builders.load_split(cfg, "train")


def test_preference_and_unpaired_parquet(tmp_path, data_dir):
  """The Parquet twins of preference_jsonl / unpaired_jsonl, sharded splits included."""
  pairs = tmp_path / "pairs"
  _write_parquet(pairs / "train-00000-of-00002.parquet",
                 {"prompt": ["1+1="], "chosen": ["2"], "rejected": ["3"]})
  _write_parquet(pairs / "train-00001-of-00002.parquet",
                 {"prompt": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
  cfg = DataConfig(source="preference_parquet", path=str(pairs), data_dir=data_dir)
  assert cfg.kind == "preference"
  assert list(builders.load_split(cfg, "train")) == [
      {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
      {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
  unpaired = _write_parquet(tmp_path / "u" / "train.parquet", {
      "prompt": ["1+1=", "2+2="], "completion": ["2", "5"], "good": [True, False]})
  cfg = DataConfig(source="unpaired_parquet", path=str(unpaired.parent), data_dir=data_dir,
                   field_map={"label": "good"})
  assert cfg.kind == "unpaired"
  assert [(e["completion"], e["label"]) for e in builders.load_split(cfg, "train")] == [
      ("2", True), ("5", False)]
  small = dataclasses.replace(cfg, tokenizer="builtin", max_prompt_len=8, max_completion_len=4)
  batch = pipeline.make_batch(list(builders.load_split(cfg, "train")), small)
  assert batch["label"].tolist() == [True, False]
  _write_parquet(unpaired, {"prompt": ["1+1="], "completion": ["2"], "good": ["yes"]})
  with pytest.raises(ValueError, match=r"train.parquet row 0: field 'good' must be a bool"):
    builders.load_split(cfg, "train")
