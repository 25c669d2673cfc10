"""Tests of jaxrl_llm.data.builders and jaxrl_llm.data.pipeline."""

import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from jaxrl_llm import tokenizers
from jaxrl_llm.data import builders, pipeline, tasks
from jaxrl_llm.data.pipeline import DataConfig, DataIterator


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
  cfg = _config(data_dir, max_prompt_len=6)  # BOS + 5 characters ("12+3=") fit, "12+34=" does not
  it = DataIterator(cfg, process_index=0, process_count=1)
  examples = builders.load_split(cfg, "train")
  too_long = [i for i, e in enumerate(examples) if len(e["prompt"]) + 1 > 6]
  assert too_long and it.stats["skipped_overlong"] == len(too_long)
  assert it.stats["examples"] == 50 - len(too_long)
  assert not set(next(it)["prompt_id"].tolist()) & set(too_long)
  with pytest.raises(ValueError, match=rf"example {too_long[0]} of split 'train' .*prompt of "
                     r"\d+ tokens, more than max_prompt_len=6"):
    DataIterator(_config(data_dir, max_prompt_len=6, overlong="error"),
                 process_index=0, process_count=1)
  examples = [{"prompt": " ", "answer": "1"}] + [{"prompt": "1+0=", "answer": "1"}] * 8
  it = DataIterator(_config(data_dir), examples=examples, process_index=0, process_count=1)
  assert it.stats["skipped_empty"] == 1 and it.stats["skipped_overlong"] == 0
  with pytest.raises(ValueError, match="example 0 of split 'train' .*empty prompt"):
    DataIterator(_config(data_dir, overlong="error"), examples=examples,
                 process_index=0, process_count=1)
  sft = DataIterator(_config(data_dir, seq_len=12), mode="sft", process_index=0,
                     process_count=1)
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
