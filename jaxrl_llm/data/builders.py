"""TFDS builders for every data source, written and read without TensorFlow.

Each builder writes ArrayRecord files into
`<data_dir>/<builder name>/<config name>/<version>/`, and `load_split` reads a
split back through `builder.as_data_source()`, TFDS's random-access reader,
which needs only the `array_record` package. TFRecord, TFDS's default file
format, needs TensorFlow to read, so every builder here defaults to
`file_format="array_record"`. Shuffling on write is disabled: record i of a
split is the i-th generated example (the i-th non-blank JSONL line, the i-th
Parquet row), which keeps `prompt_id`s meaningful.

Builders (none is registered in the TFDS catalog, so importing this module
changes no global state; build them by class):

  ArithmeticTask        jaxrl_arithmetic   prompt, answer
  CountdownTask         jaxrl_countdown    prompt, answer, numbers, target
  PreferenceArithmetic  jaxrl_preference_arithmetic   prompt, chosen, rejected
  LocalFile             jaxrl_local_file   JSONL / Parquet / Arrow, by `kind`:
                          "prompt"      prompt, answer
                          "preference"  prompt, chosen, rejected
                          "unpaired"    prompt, completion, label (bool)

Parquet sources ("parquet", "preference_parquet", "unpaired_parquet") read a
split from one file or from shards, read in sorted name order as one split
(`parquet_files`): a directory of .parquet files, a glob in the file name
("data/train-*.parquet"), or, under a directory `path`, the files
"<split>-*.parquet" (the Hugging Face Hub layout
"train-00000-of-00002.parquet", ...) or a "<split>/" directory.

Hugging Face `datasets` saved to disk (sources "hf_disk",
"preference_hf_disk", "unpaired_hf_disk") are read with pyarrow alone; the
`datasets` package is not needed, and nothing is downloaded. Accepted layouts:

  DatasetDict.save_to_disk(d)   d/dataset_dict.json ({"splits": [...]}) and one
                                directory per split (below)
  Dataset.save_to_disk(d)       d/data-00000-of-0000n.arrow ... (Arrow IPC
                                stream files), d/state.json, d/dataset_info.json;
                                the shards are read in state.json's
                                "_data_files" order (else sorted by name)
  a plain .arrow file           IPC stream, or IPC file format

`path` names the DatasetDict directory (split s is d/s), a pattern with
"{split}" (each split a saved Dataset directory or an .arrow file), a
directory holding "<split>.arrow" files or "<split>/" Dataset directories, or
one saved Dataset / one .arrow file, which is the "train" split.

The config name is derived from the config's content (sizes, seed and task
options; for local files a hash of the file bytes and the field map), so a new
option or an edited file builds a new copy instead of reusing a stale one,
and an unchanged one is read from disk without rebuilding.

Synthetic preference rule (`PreferenceArithmetic`): the prompt is an
arithmetic problem "a op b="; the chosen completion is its exact result, the
rejected one a wrong result: the result off by 1 to 3, or its digits shuffled.
`follows_arithmetic_rule(prompt, completion)` checks the rule and
`valid_preference_pair(example)` checks that chosen obeys it and rejected
breaks it.

TFDS catalog datasets (`load_split` with `source="tfds"`): the dataset must
already be prepared in `data_dir` in a random-access format, for instance
`tfds build <name> --file_format=array_record --data_dir=<dir>` or
`tfds.builder(name, data_dir=dir).download_and_prepare(file_format="array_record")`
(preparing some catalog datasets needs TensorFlow or network access, reading
them does not). Nothing is downloaded here. Name a dataset with configs as
"name/config" (optionally ":version").

Multi-host: every process calls `load_split`; builds are deterministic, but
two processes must not build the same config into one shared `data_dir` at
the same time. Prepare once beforehand (`prepare(spec)`) or give each host a
local `data_dir`.
"""

from __future__ import annotations

import abc
import collections.abc
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered as _tfds_registered

from jaxrl_llm.data import tasks

VERSION = "1.0.0"
KINDS = ("prompt", "preference", "unpaired")
# Our field names of each kind of example, in order.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "answer"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
FILE_FORMATS = ("jsonl", "parquet", "arrow")
# Keyword arguments of `tasks.generate` accepted next to a task's option fields.
GENERATE_KWARGS = ("test_fraction", "unique")

# Which builder and kind each `DataConfig.source` uses.
SOURCE_KIND: dict[str, str | None] = {
    "arithmetic": "prompt",
    "countdown": "prompt",
    "preference_arithmetic": "preference",
    "jsonl": "prompt",
    "parquet": "prompt",
    "preference_jsonl": "preference",
    "unpaired_jsonl": "unpaired",
    "preference_parquet": "preference",
    "unpaired_parquet": "unpaired",
    "hf_disk": "prompt",
    "preference_hf_disk": "preference",
    "unpaired_hf_disk": "unpaired",
    "tfds": None,  # given by the spec's `tfds_kind`
}
# The file format of each local-file source.
FILE_SOURCES: dict[str, str] = {
    "jsonl": "jsonl", "parquet": "parquet", "preference_jsonl": "jsonl",
    "unpaired_jsonl": "jsonl", "preference_parquet": "parquet", "unpaired_parquet": "parquet",
    "hf_disk": "arrow", "preference_hf_disk": "arrow", "unpaired_hf_disk": "arrow"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = "*?["
_SYNTHETIC_TASK = {"arithmetic": "arithmetic", "countdown": "countdown",
                   "preference_arithmetic": "arithmetic"}


def _digest(value: Any, size: int = 6) -> str:
  """A short stable hash of a JSON-serializable value."""
  text = json.dumps(value, sort_keys=True, default=str)
  return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def _file_digest(path: epath.Path) -> str:
  hasher = hashlib.blake2b(digest_size=8)
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      hasher.update(chunk)
  return hasher.hexdigest()


def _normalize_pairs(value: Any, field: str) -> tuple[tuple[str, Any], ...]:
  """A mapping or a sequence of (key, value) pairs as a tuple of pairs."""
  if value is None:
    return ()
  items = value.items() if isinstance(value, Mapping) else value
  pairs = []
  for item in items:
    if (isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2
        or not isinstance(item[0], str)):
      raise ValueError(f"{field} must be a mapping or a sequence of (key, value) pairs with "
                       f"string keys, got element {item!r}")
    pairs.append((item[0], item[1]))
  return tuple(pairs)


def validate_task_options(task: str, options: Any, field: str = "options") -> dict[str, Any]:
  """Checks options of a synthetic task; returns them as a dict.

  Valid keys: the fields of the task's options dataclass
  (`tasks.ArithmeticOptions`, `tasks.CountdownOptions`) and the `generate`
  arguments "test_fraction" and "unique".
  """
  spec = tasks.TASKS[task]
  pairs = dict(_normalize_pairs(options, field))
  valid = [f.name for f in dataclasses.fields(spec.options)]
  unknown = sorted(set(pairs) - set(valid) - set(GENERATE_KWARGS))
  if unknown:
    raise ValueError(f"{field} has unknown option(s) {unknown} for task {task!r}; valid "
                     f"options: {valid + list(GENERATE_KWARGS)}")
  try:
    spec.options(**{k: v for k, v in pairs.items() if k in valid})
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field} is invalid for task {task!r}: {e}") from e
  fraction = pairs.get("test_fraction", tasks.DEFAULT_TEST_FRACTION)
  if not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
    raise ValueError(f"{field}: test_fraction must be in (0, 1), got {fraction!r}")
  if type(pairs.get("unique", False)) is not bool:
    raise ValueError(f"{field}: unique must be a bool, got {pairs['unique']!r}")
  return pairs


# ---------------------------------------------------------------------------
# Synthetic preference rule
# ---------------------------------------------------------------------------

_ARITHMETIC_PROMPT = re.compile(r"^([0-9]+)([-+*])([0-9]+)=$")


def arithmetic_result(prompt: str) -> int:
  """The exact result of an arithmetic prompt "a op b=" (op one of + - *)."""
  match = _ARITHMETIC_PROMPT.match(prompt.strip())
  if match is None:
    raise ValueError(f"{prompt!r} is not an arithmetic prompt of the form 'a+b=', 'a-b=' or "
                     "'a*b=' with non-negative integer operands")
  a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
  return a + b if op == "+" else a - b if op == "-" else a * b


def follows_arithmetic_rule(prompt: str, completion: str) -> bool:
  """The rule of `PreferenceArithmetic`: the completion is the prompt's exact result.

  Same decision as `tasks.arithmetic_correct`: the completion without
  surrounding whitespace must equal the decimal result exactly.
  """
  return tasks.arithmetic_correct(str(arithmetic_result(prompt)), completion)


def valid_preference_pair(example: Mapping[str, Any]) -> bool:
  """True iff `example["chosen"]` obeys the arithmetic rule and `example["rejected"]` breaks it."""
  return (follows_arithmetic_rule(example["prompt"], example["chosen"])
          and not follows_arithmetic_rule(example["prompt"], example["rejected"]))


def wrong_answer(answer: str, rng: np.random.Generator, *, allow_negative: bool = False) -> str:
  """A plausible wrong result: `answer` off by 1 to 3, or with its digits shuffled.

  The shuffle is used half of the time when a different arrangement without a
  leading zero exists. The result is always a well-formed integer different
  from `answer`, and negative only if `answer` is or `allow_negative` is set.
  """
  value = int(answer)
  digits = str(abs(value))
  if len(set(digits)) > 1 and rng.random() < 0.5:
    for _ in range(32):
      shuffled = "".join(digits[i] for i in rng.permutation(len(digits)))
      if shuffled != digits and shuffled[0] != "0":
        return ("-" if value < 0 else "") + shuffled
  delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 else -1)
  if value >= 0 and value + delta < 0 and not allow_negative:
    delta = -delta
  return str(value + delta)


# ---------------------------------------------------------------------------
# Synthetic builders
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Config of a synthetic builder; `name` is derived from the other fields when empty.

  Attributes:
    num_train: examples in the "train" split.
    num_test: examples in the "test" split.
    seed: seed of `tasks.generate` (and of the wrong answers of preference pairs).
    options: (key, value) pairs of task options (see `validate_task_options`).
  """
  name: str = ""
  num_train: int = 10_000
  num_test: int = 500
  seed: int = 0
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    for field in ("num_train", "num_test", "seed"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"SyntheticConfig.{field} must be a non-negative int, got {value!r}")
    self.options = tuple(sorted(_normalize_pairs(self.options, "SyntheticConfig.options")))
    if not self.name:
      self.name = (f"train{self.num_train}_test{self.num_test}_seed{self.seed}_"
                   f"o{_digest(self.options)}")


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared code of the synthetic builders: splits "train" and "test" from `tasks.generate`."""

  VERSION = tfds.core.Version(VERSION)
  # TFDS looks for a checksums file (used only by downloads) next to a
  # builder's source; for a class in a package that lookup imports the
  # `importlib_resources` backport, which TFDS installs only on Python < 3.9.
  # No source path: no checksums file, nothing to download.
  code_path = None
  TASK = ""  # key of tasks.TASKS
  DESCRIPTION = ""

  def __init__(self, *, config: SyntheticConfig | None = None, **kwargs: Any):
    config = SyntheticConfig() if config is None else config
    if not isinstance(config, SyntheticConfig):
      raise TypeError(f"{type(self).__name__} needs a SyntheticConfig, got {config!r}")
    validate_task_options(self.TASK, config.options, "SyntheticConfig.options")
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  @abc.abstractmethod
  def _features(self) -> dict[str, Any]:
    """The TFDS features of one example of this task."""

  @abc.abstractmethod
  def _example(self, example: dict[str, Any], split: str, index: int) -> dict[str, Any]:
    """One generated task example as a record of `_features()`."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, disable_shuffling=True,
        features=tfds.features.FeaturesDict(self._features()))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
    del dl_manager  # nothing to download
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    examples = tasks.generate(self.TASK, split, num, config.seed, **dict(config.options))
    for index, example in enumerate(examples):
      yield index, self._example(example, split, index)


with _tfds_registered.skip_registration():

  class ArithmeticTask(_SyntheticBuilder):
    """The arithmetic task of `tasks` ("12+345=" -> "357"): prompt, answer."""

    name = "jaxrl_arithmetic"
    TASK = "arithmetic"
    DESCRIPTION = "Synthetic arithmetic problems (jaxrl_llm.data.tasks)."

    def _features(self):
      return {"prompt": tfds.features.Text(), "answer": tfds.features.Text()}

    def _example(self, example, split, index):
      return {"prompt": example["prompt"], "answer": example["answer"]}

  class CountdownTask(_SyntheticBuilder):
    """The countdown task of `tasks` ("3 5 7 -> 22:"): prompt, answer, numbers, target."""

    name = "jaxrl_countdown"
    TASK = "countdown"
    DESCRIPTION = "Synthetic countdown problems (jaxrl_llm.data.tasks)."

    def _features(self):
      return {"prompt": tfds.features.Text(), "answer": tfds.features.Text(),
              "numbers": tfds.features.Sequence(np.int64), "target": np.int64}

    def _example(self, example, split, index):
      return {"prompt": example["prompt"], "answer": example["answer"],
              "numbers": list(example["numbers"]), "target": example["target"]}

  class PreferenceArithmetic(_SyntheticBuilder):
    """Preference pairs over arithmetic prompts: chosen is the result, rejected a wrong one.

    See `follows_arithmetic_rule` and `wrong_answer`. The wrong answer of
    example i of a split comes from a generator seeded with (seed, split, i),
    so it does not depend on the size of the split.
    """

    name = "jaxrl_preference_arithmetic"
    TASK = "arithmetic"
    DESCRIPTION = "Synthetic preference pairs: correct vs wrong arithmetic results."

    def _features(self):
      return {"prompt": tfds.features.Text(), "chosen": tfds.features.Text(),
              "rejected": tfds.features.Text()}

    def _example(self, example, split, index):
      config = self.builder_config
      rng = np.random.default_rng([config.seed, tasks.SPLITS.index(split), index])
      allow_negative = bool(dict(config.options).get("allow_negative", False))
      return {"prompt": example["prompt"], "chosen": example["answer"],
              "rejected": wrong_answer(example["answer"], rng, allow_negative=allow_negative)}


# ---------------------------------------------------------------------------
# Local JSONL / Parquet files
# ---------------------------------------------------------------------------


def _lookup(record: Mapping[str, Any], key: str) -> tuple[bool, Any]:
  """`record[key]`, else a dotted path into nested dicts ("a.b" -> record["a"]["b"])."""
  if key in record:
    return True, record[key]
  value: Any = record
  for part in key.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return False, None
    value = value[part]
  return True, value


def _as_text(value: Any, where: str, field: str) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: field {field!r} is not valid UTF-8: {e}") from e
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)):
    return str(value)  # e.g. a numeric GSM8K-style answer
  raise ValueError(f"{where}: field {field!r} must be text (or a number), got "
                   f"{type(value).__name__} {value!r:.80}")


def _as_label(value: Any, where: str, field: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)) and value in (0, 1):
    return bool(value)
  raise ValueError(f"{where}: field {field!r} must be a bool (or 0/1), got "
                   f"{type(value).__name__} {value!r:.80}")


def map_fields(record: Mapping[str, Any], kind: str, field_map: Mapping[str, str],
               where: str) -> dict[str, Any]:
  """Our example of `kind` from a source record, through `field_map` (ours -> theirs).

  A field absent from `field_map` is read under its own name; "theirs" may
  be a dotted path into nested records. Text fields must be strings (numbers
  are converted); "label" must be a bool or 0/1.

  Raises:
    ValueError: naming `where`, the missing field and the fields found, or a
      field of the wrong type.
  """
  example = {}
  for ours in KIND_FIELDS[kind]:
    theirs = field_map.get(ours, ours)
    found, value = _lookup(record, theirs)
    if not found:
      mapped = f" (mapped to {ours!r})" if theirs != ours else ""
      raise ValueError(f"{where}: missing field {theirs!r}{mapped}; fields found: "
                       f"{sorted(record)}; set field_map to map {ours!r} to one of them")
    example[ours] = (_as_label if ours == "label" else _as_text)(value, where, theirs)
  return example


def _read_jsonl(path: epath.Path, kind: str,
                field_map: Mapping[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, example) of each non-blank line; errors name `path:line`."""
  with path.open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e})") from e
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from e
      if type(record) is not dict:  # json.loads gives exactly dict for an object
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
      yield lineno, map_fields(record, kind, field_map, where)


def parquet_files(path: str | os.PathLike[str]) -> list[epath.Path]:
  """The Parquet files of one split, in read order.

  One file; a directory: its .parquet / .pq files; or a glob in the file name
  (e.g. "data/train-*.parquet"). Shards are read in sorted name order, so
  "train-00000-of-00002.parquet" comes before "train-00001-of-00002.parquet".

  Raises:
    FileNotFoundError: nothing there, or no Parquet file in the directory or
      matching the glob (the message says what was found).
  """
  path = os.fspath(path)
  root = epath.Path(path)
  if any(c in root.name for c in _GLOB_CHARS):
    if any(c in os.fspath(root.parent) for c in _GLOB_CHARS):
      raise ValueError(f"Parquet path {path!r}: only the file name may hold a wildcard")
    files = sorted((f for f in root.parent.glob(root.name) if f.is_file()),
                   key=lambda f: f.name) if root.parent.is_dir() else []
    if not files:
      raise FileNotFoundError(f"no Parquet file matches {path!r}")
    return files
  if root.is_file():
    return [root]
  if root.is_dir():
    files = sorted((f for f in root.iterdir()
                    if f.suffix.lower() in _PARQUET_SUFFIXES and f.is_file()),
                   key=lambda f: f.name)
    if not files:
      raise FileNotFoundError(f"directory {path!r} holds no .parquet file (found "
                              f"{sorted(f.name for f in root.iterdir())[:20]})")
    return files
  raise FileNotFoundError(f"no Parquet file or directory at {path!r}")


def _read_parquet(path: epath.Path, kind: str,
                  field_map: Mapping[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(row index, example) of each row of a split's Parquet files, in order; errors name the row."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow") from e
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  index = 0
  for file in parquet_files(path):
    with file.open("rb") as f:
      try:  # a damaged file fails on open or on any batch: name it
        parquet = pq.ParquetFile(f)
        columns = _columns(parquet.schema_arrow.names, kind, field_map, str(file))
        for batch in parquet.iter_batches(columns=columns):
          for record in batch.to_pylist():
            yield index, map_fields(record, kind, field_map, f"{file} row {index}")
            index += 1
      except pa.ArrowException as e:
        raise ValueError(f"{file} is not a readable Parquet file ({e}): it is damaged or "
                         "incomplete (an interrupted download or copy?); write or copy it "
                         "again") from e


def _columns(names: Sequence[str], kind: str, field_map: Mapping[str, str],
             where: str) -> list[str]:
  """The top-level columns holding the (mapped) fields of `kind`; errors name `where`."""
  columns = []
  for ours in KIND_FIELDS[kind]:
    theirs = field_map.get(ours, ours)
    column = theirs if theirs in names else theirs.split(".")[0]
    if column not in names:
      mapped = f" (mapped to {ours!r})" if theirs != ours else ""
      raise ValueError(f"{where}: missing field {theirs!r}{mapped}; fields found: "
                       f"{sorted(names)}; set field_map to map {ours!r} to one of them")
    if column not in columns:
      columns.append(column)
  return columns


def arrow_files(path: str | os.PathLike[str]) -> list[epath.Path]:
  """The Arrow files of one split: a saved `datasets.Dataset` directory or one .arrow file.

  A directory's shards are listed in the order of its state.json
  ("_data_files", as `Dataset.save_to_disk` writes it), else sorted by name.

  Raises:
    FileNotFoundError: nothing there, a listed shard is missing, or the
      directory holds no .arrow file (the message says what was found).
  """
  root = epath.Path(path)
  if root.is_file():
    return [root]
  if not root.is_dir():
    raise FileNotFoundError(f"no Arrow file or saved dataset directory at {str(root)!r}")
  state_file = root / "state.json"
  if state_file.is_file():
    try:
      state = json.loads(state_file.read_text())
      names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{state_file}: not a `datasets` state.json with a '_data_files' list "
                       f"({e!r})") from e
    files = [root / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"{state_file} lists Arrow shards that do not exist: {missing}")
  else:
    files = sorted(f for f in root.iterdir() if f.name.endswith(".arrow") and f.is_file())
  if not files:
    found = sorted(f.name for f in root.iterdir())
    hint = ("; it is a saved DatasetDict: name the directory itself as path, or add the "
            "split's subdirectory" if "dataset_dict.json" in found else "")
    raise FileNotFoundError(f"{str(root)!r} holds no .arrow file (found {found}){hint}")
  return files


def _open_ipc(f: Any, file: epath.Path) -> Any:
  """A reader of an open Arrow IPC stream (as `datasets` writes) or IPC file."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  try:
    return pa.ipc.open_stream(f)
  except pa.ArrowInvalid:
    f.seek(0)
    try:
      return pa.ipc.open_file(f)
    except pa.ArrowInvalid as e:
      raise ValueError(f"{file}: neither an Arrow IPC stream nor an Arrow IPC file ({e})") from e


def _read_arrow(path: epath.Path, kind: str,
                field_map: Mapping[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
  """(row index, example) of each row of a split's Arrow files, in order; errors name the row."""
  try:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading Arrow files needs pyarrow: pip install pyarrow") from e
  index = 0
  for file in arrow_files(path):
    with file.open("rb") as f:
      reader = _open_ipc(f, file)
      columns = _columns(reader.schema.names, kind, field_map, str(file))
      batches = (reader if isinstance(reader, pa.ipc.RecordBatchStreamReader)
                 else (reader.get_batch(i) for i in range(reader.num_record_batches)))
      for batch in batches:
        for row, record in enumerate(batch.select(columns).to_pylist()):
          yield index + row, map_fields(record, kind, field_map, f"{file} row {index + row}")
        index += batch.num_rows


_READERS: dict[str, Callable[..., Iterator[tuple[int, dict[str, Any]]]]] = {
    "jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}


def _kind_features(kind: str) -> dict[str, Any]:
  return {field: (np.bool_ if field == "label" else tfds.features.Text())
          for field in KIND_FIELDS[kind]}


@dataclasses.dataclass(eq=False)
class LocalFileConfig(tfds.core.BuilderConfig):
  """Config of `LocalFile`; `name` is derived from the content when empty.

  Attributes:
    kind: "prompt", "preference" or "unpaired" (see the module docstring).
    files: (split, path) pairs, one file per split; for "arrow" a path may
      also be a saved `datasets.Dataset` directory (see `arrow_files`), for
      "parquet" a directory of shards or a glob (see `parquet_files`).
    format: "jsonl", "parquet" or "arrow"; empty: from each file's suffix.
    field_map: (ours, theirs) pairs; unmapped fields are read by their own name.
  """
  name: str = ""
  kind: str = "prompt"
  files: tuple[tuple[str, str], ...] = ()
  format: str = ""
  field_map: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"LocalFileConfig.kind must be one of {KINDS}, got {self.kind!r}")
    self.files = tuple((str(s), os.fspath(p)) for s, p in _normalize_pairs(
        self.files, "LocalFileConfig.files"))
    if not self.files:
      raise ValueError("LocalFileConfig.files must name at least one (split, path) pair")
    self.field_map = check_field_map(self.field_map, self.kind, "LocalFileConfig.field_map")
    if self.format and self.format not in FILE_FORMATS:
      raise ValueError(
          f"LocalFileConfig.format must be one of {FILE_FORMATS} or empty, got {self.format!r}")
    for split, path in self.files:
      file = epath.Path(path)
      fmt = self._file_format(path)
      if fmt == "parquet" and (file.is_dir() or any(c in file.name for c in _GLOB_CHARS)):
        parquet_files(path)  # shards: at least one must exist
      elif not (file.is_file() or (file.is_dir() and fmt == "arrow")):
        raise FileNotFoundError(f"LocalFileConfig.files: no file {path!r} for split {split!r}")
    if not self.name:
      content = [(split, epath.Path(path).name, self._content_digests(path))
                 for split, path in self.files]
      self.name = f"{self.kind}_{_digest([content, self.field_map, self.format], 8)}"

  def _content_digests(self, path: str) -> str | list[str]:
    """Hash of a split's bytes (of every shard, with their names, for sharded splits)."""
    fmt = self._file_format(path)
    if fmt == "arrow" and epath.Path(path).is_dir():
      return [_file_digest(f) for f in arrow_files(path)]
    if fmt == "parquet" and not epath.Path(path).is_file():
      return [(f.name, _file_digest(f)) for f in parquet_files(path)]
    return _file_digest(epath.Path(path))

  def _file_format(self, path: str) -> str:
    if self.format:
      return self.format
    file = epath.Path(path)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
      return "jsonl"
    if suffix in _PARQUET_SUFFIXES:
      return "parquet"
    if suffix == ".arrow" or file.is_dir():
      return "arrow"
    raise ValueError(f"cannot tell the format of {path!r} from its suffix; set format to one "
                     f"of {FILE_FORMATS}")


def check_field_map(field_map: Any, kind: str,
                    field: str = "field_map") -> tuple[tuple[str, str], ...]:
  """Validates (ours, theirs) pairs for examples of `kind`; returns them as a tuple."""
  pairs = _normalize_pairs(field_map, field)
  seen = set()
  for ours, theirs in pairs:
    if ours not in KIND_FIELDS[kind]:
      raise ValueError(f"{field} maps unknown field {ours!r}; fields of {kind!r} examples: "
                       f"{list(KIND_FIELDS[kind])}")
    if ours in seen:
      raise ValueError(f"{field} maps {ours!r} more than once")
    if not isinstance(theirs, str) or not theirs:
      raise ValueError(f"{field} must map {ours!r} to a non-empty field name, got {theirs!r}")
    seen.add(ours)
  return tuple((str(ours), str(theirs)) for ours, theirs in pairs)


with _tfds_registered.skip_registration():

  class LocalFile(tfds.core.GeneratorBasedBuilder):
    """Prompt, preference or unpaired examples from local JSONL, Parquet or Arrow files.

    One split per entry of `LocalFileConfig.files`. Blank JSONL lines are
    skipped; any other line must be a JSON object holding the mapped fields.
    Arrow splits may be saved `datasets.Dataset` directories.
    """

    name = "jaxrl_local_file"
    VERSION = tfds.core.Version(VERSION)
    code_path = None  # see _SyntheticBuilder.code_path

    def __init__(self, *, config: LocalFileConfig, **kwargs: Any):
      if not isinstance(config, LocalFileConfig):
        raise TypeError(f"LocalFile needs a LocalFileConfig, got {config!r}")
      kwargs.setdefault("file_format", "array_record")
      super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self, description="Examples read from local JSONL / Parquet / Arrow files.",
          disable_shuffling=True,
          features=tfds.features.FeaturesDict(_kind_features(self.builder_config.kind)))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
      del dl_manager  # the files are local
      return {split: self._generate_examples(path) for split, path in self.builder_config.files}

    def _generate_examples(self, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
      config = self.builder_config
      reader = _READERS[config._file_format(path)]  # pylint: disable=protected-access
      count = 0
      for item in reader(epath.Path(path), config.kind, dict(config.field_map)):
        count += 1
        yield item
      if not count:  # else TFDS fails with "No examples were yielded", naming no file
        raise ValueError(f"{path} holds no examples: fill it, or point data.path at the "
                         "right file")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
  """A TFDS-decoded value as plain Python (bytes -> str, arrays -> lists, numpy scalars)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    if value.dtype.kind in "SO":
      return [_to_python(v) for v in value.tolist()]
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _to_python(v) for k, v in value.items()}
  return value


class Examples(collections.abc.Sequence):
  """The examples of one split: random access, read-only, plain Python dicts.

  Wraps a TFDS data source; `examples[i]` decodes record i, `examples[a:b]`
  gives a list.
  """

  def __init__(self, source: Any, description: str,
               convert: Callable[[dict[str, Any], int], dict[str, Any]] | None = None):
    self._source = source
    self._description = description
    self._convert = convert

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, record: Any, index: int) -> dict[str, Any]:
    example = _to_python(record)
    return self._convert(example, index) if self._convert else example

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.read(range(*index.indices(len(self))))
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
      raise TypeError(f"Examples indices must be integers or slices, got {type(index).__name__}")
    n = len(self)
    i = int(index) + n if index < 0 else int(index)
    if not 0 <= i < n:
      raise IndexError(f"index {index} is out of range for {self._description} ({n} examples)")
    return self._decode(self._source[i], i)

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The examples at `indices`, read in one batch."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    records = self._source.__getitems__(indices)
    return [self._decode(record, i) for record, i in zip(records, indices)]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    chunk = 1024
    for start in range(0, len(self), chunk):
      yield from self.read(range(start, min(start + chunk, len(self))))

  def __repr__(self) -> str:
    return f"Examples({self._description}, {len(self)} examples)"


def resolve_data_dir(spec: Any, workdir: str | os.PathLike[str] | None = None) -> str | None:
  """Where `spec`'s dataset is built or read.

  `spec.data_dir` when set; otherwise `<workdir>/tensorflow_datasets` for
  datasets built here, and TFDS's default (`$TFDS_DATA_DIR`, else
  ~/tensorflow_datasets) when no workdir is given or for catalog datasets.

  With a remote workdir (gs://, ...) the datasets built here go to a local
  cache instead, `$JAXRL_LLM_DATA_CACHE` (default
  ~/.cache/jaxrl_llm/tensorflow_datasets) / <digest of the workdir>: their
  array_record files can only be written locally. The build is deterministic
  from the config, so every process builds its own identical copy (in its own
  `process_<i>` folder: processes of one host never race on a build).
  """
  if getattr(spec, "data_dir", None):
    return os.fspath(spec.data_dir)
  if spec.source != "tfds" and workdir is not None:
    if "://" in os.fspath(workdir):
      cache = os.environ.get("JAXRL_LLM_DATA_CACHE") or os.path.join(
          os.path.expanduser("~"), ".cache", "jaxrl_llm", "tensorflow_datasets")
      import jax  # pylint: disable=import-outside-toplevel
      return os.path.join(cache, _digest(os.fspath(workdir), 12),
                          f"process_{jax.process_index()}")
    return os.fspath(epath.Path(workdir) / "tensorflow_datasets")
  return None


def _is_saved_dataset(directory: epath.Path) -> bool:
  """Whether `directory` looks like one `datasets.Dataset.save_to_disk` output."""
  return ((directory / "state.json").is_file() or (directory / "dataset_info.json").is_file()
          or any(f.name.startswith("data-") and f.name.endswith(".arrow")
                 for f in directory.iterdir()))


def _arrow_split(path: str, split: str) -> str:
  """The saved Dataset directory or .arrow file of `split` (layouts: module docstring)."""
  if "{split}" in path:
    target = epath.Path(path.replace("{split}", split))
    if not (target.is_file() or target.is_dir()):
      raise FileNotFoundError(f"no saved dataset directory or .arrow file {str(target)!r} for "
                              f"split {split!r} (path {path!r})")
    return os.fspath(target)
  root = epath.Path(path)
  if root.is_dir():
    dict_file = root / "dataset_dict.json"
    if dict_file.is_file():
      try:
        splits = list(json.loads(dict_file.read_text())["splits"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{dict_file}: not a `datasets` dataset_dict.json with a 'splits' "
                         f"list ({e!r})") from e
      if split not in splits:
        raise ValueError(f"saved DatasetDict {path!r} has no split {split!r}; its splits: "
                         f"{splits}")
      return os.fspath(root / split)
    if _is_saved_dataset(root):
      if split != "train":
        raise ValueError(f"path {path!r} is one saved Dataset, which is the 'train' split; for "
                         f"split {split!r} save a DatasetDict there or use a path with "
                         "'{split}'")
      return os.fspath(root)
    for candidate in (root / f"{split}.arrow", root / split):
      if candidate.is_file() or candidate.is_dir():
        return os.fspath(candidate)
    raise FileNotFoundError(f"directory {path!r} is no saved DatasetDict (no dataset_dict.json) "
                            f"or Dataset and holds neither '{split}.arrow' nor '{split}/' for "
                            f"split {split!r}")
  if root.is_file():
    if split != "train":
      raise ValueError(f"path {path!r} is a single file, which is the 'train' split; for split "
                       f"{split!r} use a path with '{{split}}' or a directory holding "
                       f"'{split}.arrow'")
    return os.fspath(root)
  raise FileNotFoundError(f"path {path!r} does not exist")


def _parquet_split(path: str, split: str) -> str:
  """The Parquet file, shard directory or shard glob of `split` (layouts: module docstring)."""
  if "{split}" in path:
    target = path.replace("{split}", split)
    parquet_files(target)  # raises, naming the path, when nothing is there
    return target
  root = epath.Path(path)
  if any(c in root.name for c in _GLOB_CHARS) or root.is_file():
    if split != "train":
      raise ValueError(f"path {path!r} names one file or one glob, which is the 'train' split; "
                       f"for split {split!r} use a path with '{{split}}' or a directory holding "
                       f"'{split}.parquet', '{split}-*.parquet' shards or '{split}/'")
    parquet_files(path)
    return path
  if not root.is_dir():
    raise FileNotFoundError(f"path {path!r} does not exist")
  for suffix in _PARQUET_SUFFIXES:
    if (root / f"{split}{suffix}").is_file():
      return os.fspath(root / f"{split}{suffix}")
  shards = os.fspath(root / f"{split}-*.parquet")
  if any(root.glob(f"{split}-*.parquet")):
    return shards
  if (root / split).is_dir():
    return os.fspath(root / split)
  raise FileNotFoundError(f"directory {path!r} holds no Parquet data for split {split!r}; looked "
                          f"for '{split}.parquet', '{split}.pq', '{split}-*.parquet' shards and "
                          f"a '{split}/' directory of shards")


def _local_files(spec: Any, split: str) -> tuple[tuple[str, str], ...]:
  """The (split, file) pair of a local-file spec.

  `spec.path` may contain "{split}", name a directory holding
  "<split>.jsonl" / "<split>.parquet", or name one file, which is the "train"
  split. Arrow sources ("hf_disk", ...) also take saved `datasets`
  directories, Parquet sources sharded splits (see the module docstring).
  """
  path = spec.path
  if not path:
    raise ValueError(f"source {spec.source!r} needs path (a file, a directory, or a pattern "
                     "with '{split}')")
  fmt = FILE_SOURCES[spec.source]
  if fmt == "arrow":
    return ((split, _arrow_split(path, split)),)
  if fmt == "parquet":
    return ((split, _parquet_split(path, split)),)
  if "{split}" in path:
    file = epath.Path(path.replace("{split}", split))
    if not file.is_file():
      raise FileNotFoundError(f"no file {str(file)!r} for split {split!r} (path {path!r})")
    return ((split, os.fspath(file)),)
  root = epath.Path(path)
  if root.is_dir():
    suffixes = (".jsonl", ".json", ".ndjson")
    for suffix in suffixes:
      file = root / f"{split}{suffix}"
      if file.is_file():
        return ((split, os.fspath(file)),)
    raise FileNotFoundError(f"directory {path!r} holds no file for split {split!r}; looked for "
                            f"{[split + s for s in suffixes]}")
  if root.is_file():
    if split != "train":
      raise ValueError(f"path {path!r} is a single file, which is the 'train' split; for split "
                       f"{split!r} use a path with '{{split}}' or a directory holding "
                       f"'{split}.{fmt}'")
    return ((split, os.fspath(root)),)
  raise FileNotFoundError(f"path {path!r} does not exist")


def builder_for(spec: Any, split: str, *, workdir: str | os.PathLike[str] | None = None
                ) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `spec` (a `DataConfig` or any object with its fields).

  For local files the builder holds only `split`'s file. For "tfds" it is
  TFDS's builder of the prepared dataset (see the module docstring).
  """
  source = spec.source
  data_dir = resolve_data_dir(spec, workdir)
  if source in _SYNTHETIC_TASK:
    config = SyntheticConfig(num_train=spec.num_train, num_test=spec.num_test, seed=spec.seed,
                             options=getattr(spec, "task_options", ()))
    cls = {"arithmetic": ArithmeticTask, "countdown": CountdownTask,
           "preference_arithmetic": PreferenceArithmetic}[source]
    return cls(config=config, data_dir=data_dir)
  if source in FILE_SOURCES:
    config = LocalFileConfig(kind=SOURCE_KIND[source], files=_local_files(spec, split),
                             format=FILE_SOURCES[source], field_map=spec.field_map)
    return LocalFile(config=config, data_dir=data_dir)
  if source == "tfds":
    return _catalog_builder(spec.tfds_name, data_dir)
  raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCE_KIND)}")


def _catalog_builder(name: str | None, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if not name:
    raise ValueError("source 'tfds' needs tfds_name (e.g. 'my_dataset' or 'my_dataset/config')")
  hint = (f"prepare it first in a random-access format, e.g. `tfds build {name.split(':')[0]} "
          f"--file_format=array_record --data_dir={data_dir or '~/tensorflow_datasets'}`; "
          "a dataset with configs needs its config in the name ('name/config')")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except _tfds_registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f"TFDS dataset {name!r} is neither in the TFDS catalog nor prepared "
                            f"in data_dir {data_dir!r}; {hint}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r} "
                            f"(nothing is downloaded here); {hint}")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value not in ("array_record", "parquet"):
    raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir!r} is stored as "
                     f"{file_format.value}, which only TensorFlow can read; {hint}")
  return builder


def prepare(spec: Any, splits: Sequence[str] = ("train", "test"), *,
            workdir: str | os.PathLike[str] | None = None) -> None:
  """Builds `spec`'s dataset (each of `splits` for local files) unless already built."""
  for split in splits if spec.source in FILE_SOURCES else splits[:1]:
    builder = builder_for(spec, split, workdir=workdir)
    if spec.source != "tfds":
      builder.download_and_prepare()


def spec_kind(spec: Any) -> str:
  """The kind of examples ("prompt", "preference", "unpaired") `spec` reads."""
  kind = SOURCE_KIND.get(spec.source)
  return kind if kind is not None else getattr(spec, "tfds_kind", "prompt")


def load_split(spec: Any, split: str, *, workdir: str | os.PathLike[str] | None = None
               ) -> Examples:
  """Builds (once) and opens one split of `spec`'s dataset.

  Args:
    spec: a `pipeline.DataConfig`, or any object with its fields `source`,
      `path`, `field_map`, `tfds_name`, `tfds_kind`, `data_dir`, `num_train`,
      `num_test`, `seed`, `task_options`.
    split: "train" or "test" for synthetic sources; the split's name for local
      files (see `_local_files`) and catalog datasets.
    workdir: the default `data_dir` is `<workdir>/tensorflow_datasets`.

  Returns:
    A random-access sequence of example dicts with our field names:
    {"prompt", "answer"} (countdown adds "numbers" (list of int), "target"
    (int)), {"prompt", "chosen", "rejected"} or {"prompt", "completion",
    "label" (bool)}; text fields are `str`.
  """
  builder = builder_for(spec, split, workdir=workdir)
  description = f"{builder.name}/{builder.builder_config_name or ''} split {split!r}"
  if spec.source != "tfds":
    builder.download_and_prepare()
  splits = list(builder.info.splits)
  if split not in splits:
    raise ValueError(f"{description} does not exist; splits available: {sorted(splits)}")
  source = builder.as_data_source(split=split)
  if spec.source != "tfds":
    return Examples(source, description)

  kind = spec_kind(spec)
  field_map = dict(check_field_map(spec.field_map, kind))
  name = spec.tfds_name

  def convert(record: dict[str, Any], index: int) -> dict[str, Any]:
    return map_fields(record, kind, field_map, f"TFDS {name!r} split {split!r} example {index}")

  examples = Examples(source, f"TFDS {name!r} split {split!r}", convert)
  if len(examples):
    examples[0]  # pylint: disable=pointless-statement  (a missing field fails here, early)
  return examples
