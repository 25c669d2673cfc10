"""Batches for RL, SFT and preference training: tokenize, pad, pack, shard, resume.

`DataIterator(config, split)` reads a split (`builders.load_split`), tokenizes
it once, drops (and counts and reports) unusable examples, and yields numpy
batches of static shapes, so the jitted step never recompiles.

Prompts. `encode_prompts(config, tokenizer, prompts)` is the one encoder of
prompt text, used by every mode here and by evaluation: the text is
`prompt_template.format(prompt=...)`; with `chat_template=True` it becomes the
user message (after a system message holding `system_prompt`, if set) of the
tokenizer's chat template, rendered with the assistant header appended
(add_generation_prompt); then BOS as `add_bos` says (with a chat template, BOS
is whatever the template renders and is never doubled; see
`encode_prompts`). `prompt_strings` gives the text before tokenization.

Rationale vs final answer. A prompt example's "answer" may hold a whole
worked solution (GSM8K: "...rationale...\\n#### 72"; MATH: "...
$\\boxed{72}$"). In "rl" mode the answer tokens feed only the in-graph
exact-match `correct` reward, so they encode the FINAL answer,
`rewards.answers.gold_answer(answer)` ("72"; plain answers such as the
synthetic tasks' are kept, stripped), and `max_answer_len` budgets that. In
"sft" mode the model is trained on the full text, rationale included. The
example dicts themselves keep the raw answer: host-side rewards call
`gold_answer` on it themselves.

Batch formats. N is this process's rows (`batch_size // process_count`); P,
A, C, T are `max_prompt_len`, `max_answer_len`, `max_completion_len`,
`seq_len`. Every array is int32 unless noted; masks are 0/1. Prompts are
encoded by `encode_prompts` and LEFT-padded with the tokenizer's pad id so
that generation starts at column P for every row. Completions are the text
followed by EOS, RIGHT-padded.

  mode "rl" (prompt sources)
    prompt_tokens [N, P]   prompt_mask [N, P]
    answer_tokens [N, A]   answer_mask [N, A]   (1 on the answer and its EOS)
    prompt_id     [N]      index of the example in its split (-1: padding row)
    numbers       [N, k]   target [N]           (countdown only)
  mode "sft" (prompt sources): rows of `seq_len` packed with whole examples
    tokens        [N, T]   prompt + answer + EOS of each packed example, then pad
    segment_ids   [N, T]   1, 2, ... per example in the row; 0 on padding
    positions     [N, T]   0, 1, ... restarting at every example; 0 on padding
    loss_mask     [N, T]   1 iff token t is an answer or EOS token: the model
                           predicts token t from position t-1, and prompt
                           tokens are not trained on
  mode "preference"
    prompt_tokens, prompt_mask [N, P]
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask [N, C]
    prompt_id [N]
  mode "unpaired"
    prompt_tokens, prompt_mask [N, P]
    completion_tokens, completion_mask [N, C]
    label [N] bool (True: desirable)
    prompt_id [N]

In "sft" mode `batch_size` counts packed rows, elsewhere examples. Packing is
next-fit in the epoch's order: an example goes into the current row if it
fits, else starts a new one; no example is split across rows.

Unusable examples: an empty (blank) prompt, or one that is too long: prompt
over P tokens, final answer + EOS over A ("rl"), prompt + answer + EOS over T
("sft"), a completion + EOS over C ("preference", "unpaired"). With
`overlong="skip"` they are dropped, never silently: `encode_split` counts
them per reason (`EncodedSplit.dropped`, `DataIterator.stats`) and logs one
line per split, which `DataIterator` also prints on process 0:

  split 'train' (rl): 7473 examples, 12 dropped (prompt over
  max_prompt_len=256: 10, answer over max_answer_len=32: 2, empty prompt: 0);
  longest in tokens: prompt 301, answer 40

and when more than `max_drop_fraction` of the split (default 0: any drop)
would be dropped it raises instead, naming the counts, the budgets, the
longest lengths and the fix (raise the budget, or max_drop_fraction). With
`overlong="error"` the first unusable example raises, naming it. The
built-in synthetic tasks drop nothing at their documented budgets.

Order, sharding and resumption. Epoch e visits the usable examples (SFT:
the rows packed from them) in the order of a numpy permutation seeded with
(seed, e), or in split order when `shuffle=False`. Global batch b of an epoch
is units [b*B, (b+1)*B) of that order; process i takes rows
[i*B/n, (i+1)*B/n) of it, so the processes together read each global batch
exactly once. Training iterators run forever and drop each epoch's last
partial batch; evaluation iterators (`num_epochs=1, drop_remainder=False`)
pad the last batch with rows whose prompt_id is -1 and whose masks are 0.
The state is (epoch, position of the next batch in the epoch's order):
`set_state(get_state())` on a new iterator continues exactly where the old
one stopped.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from jaxrl_llm import tokenizers as tokenizers_lib
from jaxrl_llm.data import builders
from jaxrl_llm.rewards import answers

SOURCES = tuple(builders.SOURCE_KIND)
MODES = ("rl", "sft", "preference", "unpaired")
OVERLONG = ("skip", "error")
MODE_KIND = {"rl": "prompt", "sft": "prompt", "preference": "preference",
             "unpaired": "unpaired"}
DEFAULT_MODE = {"prompt": "rl", "preference": "preference", "unpaired": "unpaired"}
# Completion fields of each mode; stored with EOS appended.
_COMPLETIONS = {"rl": ("answer",), "sft": ("answer",), "preference": ("chosen", "rejected"),
                "unpaired": ("completion",)}
_SYNTHETIC_SOURCES = ("arithmetic", "countdown", "preference_arithmetic")
_FILE_SOURCES = tuple(builders.FILE_SOURCES)
_ENCODE_CHUNK = 1024


def _fail(field: str, value: Any, expected: str) -> None:
  raise ValueError(f"DataConfig.{field} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where examples come from and how they become batches.

  `field_map` and `task_options` also accept a dict or a list of pairs and
  are stored as tuples of pairs (sorted, for `task_options`).
  """
  # One of SOURCES: "arithmetic" | "countdown" | "preference_arithmetic" (built
  # here), "jsonl" | "parquet" | "preference_jsonl" | "unpaired_jsonl" |
  # "preference_parquet" | "unpaired_parquet" (local
  # files), "hf_disk" | "preference_hf_disk" | "unpaired_hf_disk" (a HF
  # `datasets` save_to_disk directory or .arrow files, read with pyarrow),
  # "tfds" (a prepared TFDS dataset).
  source: str = "arithmetic"
  # Local files: a file (the "train" split), a directory holding
  # "<split>.jsonl" / "<split>.parquet", or a pattern containing "{split}";
  # Parquet splits may be sharded: a directory of shards, a glob in the file
  # name, or "<split>-*.parquet" shards in the directory (builders.parquet_files);
  # hf_disk: a DatasetDict directory (split s in <path>/s), a saved Dataset
  # (the "train" split), or a pattern containing "{split}".
  path: str | None = None
  # (ours, theirs) pairs for local files and TFDS, e.g.
  # (("prompt", "question"), ("answer", "answer")); "theirs" may be a dotted
  # path into nested records. Unmapped fields are read by their own name.
  field_map: tuple[tuple[str, str], ...] = ()
  tfds_name: str | None = None  # "name", "name/config" or "name/config:version"
  tfds_kind: str = "prompt"  # examples a TFDS dataset holds: prompt|preference|unpaired
  # Build/read directory; default <workdir>/tensorflow_datasets, else TFDS's
  # default (~/tensorflow_datasets); TFDS catalog datasets default to TFDS's.
  data_dir: str | None = None
  num_train: int = 10_000  # synthetic sources: examples in "train"
  num_test: int = 500  # synthetic sources: examples in "test"
  seed: int = 0  # synthetic generation and per-epoch shuffling
  # Synthetic sources: (key, value) pairs of tasks.ArithmeticOptions /
  # CountdownOptions fields, plus "test_fraction" and "unique".
  task_options: tuple[tuple[str, Any], ...] = ()
  batch_size: int = 32  # GLOBAL examples (SFT: packed rows) per step, all processes
  max_prompt_len: int = 32  # P: prompt tokens incl. BOS and template
  max_answer_len: int = 16  # A: RL final-answer tokens incl. EOS (module docstring)
  max_completion_len: int = 16  # C: preference / unpaired completion tokens incl. EOS
  seq_len: int = 128  # T: SFT packed row length
  overlong: str = "skip"  # "skip" (drop and count) | "error" for too-long/empty examples
  # overlong="skip": the largest fraction of a split that may be dropped; more
  # is refused with an error naming the counts, budgets and longest lengths.
  max_drop_fraction: float = 0.0
  shuffle: bool = True  # reshuffle every epoch
  tokenizer: str = "builtin"  # "builtin" or a path for tokenizers.load_tokenizer
  prompt_template: str = "{prompt}"  # format string; {prompt} is the example's prompt
  # Prepend BOS to prompts (the tokenizer must define one). With chat_template:
  # only if the tokenizer has a BOS and the rendered prompt does not start with it.
  add_bos: bool = True
  # Render every prompt with the tokenizer's chat template as a user message
  # (after prompt_template), ending with the assistant header. HF tokenizers only.
  chat_template: bool = False
  system_prompt: str = ""  # chat_template: a system message before it; "": none

  def __post_init__(self):
    if self.source not in SOURCES:
      _fail("source", self.source, f"one of {SOURCES}")
    if self.tfds_kind not in builders.KINDS:
      _fail("tfds_kind", self.tfds_kind, f"one of {builders.KINDS}")
    if self.source in _FILE_SOURCES and not self.path:
      _fail("path", self.path, f"a file, directory or '{{split}}' pattern for source "
            f"{self.source!r}")
    if self.source == "tfds" and not self.tfds_name:
      _fail("tfds_name", self.tfds_name, "a TFDS dataset name for source 'tfds'")
    field_map = builders.check_field_map(self.field_map, self.kind, "DataConfig.field_map")
    if field_map and self.source in _SYNTHETIC_SOURCES:
      _fail("field_map", self.field_map, f"empty for the synthetic source {self.source!r}")
    object.__setattr__(self, "field_map", field_map)
    if self.source in _SYNTHETIC_SOURCES:
      task = "countdown" if self.source == "countdown" else "arithmetic"
      options = builders.validate_task_options(task, self.task_options, "DataConfig.task_options")
      object.__setattr__(self, "task_options", tuple(sorted(options.items())))
    elif self.task_options:
      _fail("task_options", self.task_options, f"empty for source {self.source!r} (it applies "
            f"to {_SYNTHETIC_SOURCES} only)")
    for field in ("num_train", "num_test", "seed"):
      value = getattr(self, field)
      if not _is_int(value) or value < 0:
        _fail(field, value, "a non-negative int")
    for field in ("batch_size", "max_prompt_len", "max_answer_len", "max_completion_len",
                  "seq_len"):
      value = getattr(self, field)
      if not _is_int(value) or value < 1:
        _fail(field, value, "a positive int")
    if self.overlong not in OVERLONG:
      _fail("overlong", self.overlong, f"one of {OVERLONG}")
    fraction = self.max_drop_fraction
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number))
        or not 0.0 <= fraction <= 1.0):
      _fail("max_drop_fraction", fraction, "a number in [0, 1] (e.g. 0.01 accepts dropping "
            "up to 1% of a split)")
    object.__setattr__(self, "max_drop_fraction", float(fraction))
    for field in ("shuffle", "add_bos", "chat_template"):
      if not isinstance(getattr(self, field), bool):
        _fail(field, getattr(self, field), "a bool")
    if not isinstance(self.tokenizer, str) or not self.tokenizer:
      _fail("tokenizer", self.tokenizer, "'builtin' or a tokenizer path")
    if not isinstance(self.system_prompt, str):
      _fail("system_prompt", self.system_prompt, "a string")
    if self.system_prompt and not self.chat_template:
      _fail("system_prompt", self.system_prompt, "empty unless chat_template=True (a system "
            "message needs a chat template; without one, put instructions in prompt_template)")
    if self.chat_template and self.tokenizer == "builtin":
      _fail("chat_template", self.chat_template, "False with tokenizer='builtin' (the built-in "
            "SentencePiece tokenizer has no chat template); set tokenizer to a HF checkpoint "
            "directory with a chat template, or format prompts with prompt_template")
    try:
      names = [name for _, name, _, _ in string.Formatter().parse(self.prompt_template)
               if name is not None]
    except (ValueError, TypeError):
      names = None
    if names is None or set(names) != {"prompt"}:
      _fail("prompt_template", self.prompt_template,
            "a format string whose only field is {prompt} (write literal braces as {{ }})")

  @property
  def kind(self) -> str:
    """The kind of examples the source holds: "prompt", "preference" or "unpaired"."""
    return builders.SOURCE_KIND[self.source] or self.tfds_kind


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _check_chat_tokenizer(tokenizer: tokenizers_lib.Tokenizer) -> None:
  if (not callable(getattr(tokenizer, "apply_chat_template", None))
      or getattr(tokenizer, "chat_template", None) is None):
    raise ValueError(
        f"DataConfig.chat_template=True, but {tokenizer!r} has no chat template (the built-in "
        "SentencePiece tokenizer never has one); set DataConfig.tokenizer to a HF checkpoint "
        "directory whose tokenizer_config.json, chat_template.jinja or chat_template.json "
        "holds one, or set chat_template=False and format prompts with prompt_template")


def prompt_strings(config: DataConfig, tokenizer: tokenizers_lib.Tokenizer,
                   prompts: Sequence[str]) -> list[str]:
  """The text of each prompt as the model sees it (BOS excepted), e.g. for logging.

  `config.prompt_template.format(prompt=p)`; with `config.chat_template` that
  text is the content of a user message, after a system message holding
  `config.system_prompt` when it is non-empty, rendered by
  `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.
  """
  if isinstance(prompts, str):
    raise ValueError("prompts must be a list of strings, got one string")
  texts = [config.prompt_template.format(prompt=p) for p in prompts]
  if not config.chat_template:
    return texts
  _check_chat_tokenizer(tokenizer)
  system = ([{"role": "system", "content": config.system_prompt}]
            if config.system_prompt else [])
  return [tokenizer.apply_chat_template(system + [{"role": "user", "content": text}],
                                        add_generation_prompt=True) for text in texts]


def encode_prompts(config: DataConfig, tokenizer: tokenizers_lib.Tokenizer,
                   prompts: Sequence[str]) -> list[list[int]]:
  """Prompt ids of raw prompt strings: template, chat template, system prompt and BOS.

  The one place prompts are encoded, for every mode and for evaluation:
  `tokenizer.encode` of `prompt_strings(config, tokenizer, prompts)`, then BOS:

    chat_template=False  BOS prepended iff `add_bos` (the tokenizer must define one).
    chat_template=True   the rendered template decides: special tokens written
                         by it (e.g. a "{{ bos_token }}") encode as themselves.
                         `add_bos` prepends BOS only when the tokenizer defines
                         one and the rendered prompt does not already start with
                         it, so BOS is never doubled; a tokenizer without BOS
                         (Qwen) gets none.

  No length limit is applied; `encode_split` drops (and counts) overlong prompts.
  """
  texts = prompt_strings(config, tokenizer, prompts)
  if not config.chat_template:
    if config.add_bos and tokenizer.bos_id is None:
      raise ValueError(f"DataConfig.add_bos=True but {tokenizer!r} defines no BOS token; "
                       "set add_bos=False")
    return tokenizer.encode_batch(texts, add_bos=config.add_bos)
  ids = tokenizer.encode_batch(texts)
  bos = tokenizer.bos_id
  if config.add_bos and bos is not None:
    ids = [row if row[:1] == [bos] else [bos] + row for row in ids]
  return ids


@dataclasses.dataclass(frozen=True)
class Ragged:
  """Variable-length int32 sequences in one flat array.

  Item i is values[offsets[i]:offsets[i + 1]]; a flat array keeps a large
  tokenized split compact (Python lists of ints cost about 8x more).
  """
  values: np.ndarray  # [total] int32
  offsets: np.ndarray  # [M + 1] int64

  @classmethod
  def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return cls(values, offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.values[self.offsets[i]:self.offsets[i + 1]]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """The usable examples of a split, tokenized, and how to batch them.

  Attributes:
    mode: one of MODES.
    ids: [M] int32, the index in its split of each usable example.
    tokens: "prompt" (from `encode_prompts`) and the mode's completion fields
      ("answer": the final answer in "rl", the full text in "sft"; "chosen",
      "rejected"; "completion"), each with EOS appended.
    extras: per-example arrays: "numbers" [M, k] and "target" [M] for
      countdown ("rl" mode), "label" [M] bool ("unpaired").
    pad_id: the tokenizer's pad id.
    prompt_len, completion_len, seq_len: P, A or C, T of the batches.
    num_examples: examples in the split, usable or not.
    dropped: examples dropped per reason (see `drop_reasons`), each example
      counted once, under the first reason that applies.
    longest: the most tokens seen per field over the split's non-empty
      examples, dropped ones included ("prompt", completion fields with EOS,
      "sequence" = prompt + answer + EOS in "sft").
    budgets: the budget of each length reason, e.g. {"prompt": "max_prompt_len=256"}.
    split: the split's name, for messages (None: unnamed).
  """
  mode: str
  ids: np.ndarray
  tokens: dict[str, Ragged]
  extras: dict[str, np.ndarray]
  pad_id: int
  prompt_len: int
  completion_len: int
  seq_len: int
  num_examples: int = 0
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  longest: dict[str, int] = dataclasses.field(default_factory=dict)
  budgets: dict[str, str] = dataclasses.field(default_factory=dict)
  split: str | None = None

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def num_dropped(self) -> int:
    """Examples of the split dropped for any reason."""
    return sum(self.dropped.values())

  @property
  def skipped_overlong(self) -> int:
    """Examples dropped for length."""
    return sum(n for reason, n in self.dropped.items() if reason != "empty")

  @property
  def skipped_empty(self) -> int:
    """Examples dropped for an empty prompt."""
    return self.dropped.get("empty", 0)

  def drop_summary(self) -> str:
    """One line: examples, drops per reason with its budget, and the longest lengths.

    E.g. "split 'train' (rl): 7473 examples, 12 dropped (prompt over
    max_prompt_len=256: 10, answer over max_answer_len=32: 2, empty prompt: 0);
    longest in tokens: prompt 301, answer 40".
    """
    name = "data" if self.split is None else f"split {self.split!r}"
    reasons = ", ".join(
        f"{_REASON_TEXT[r]}{' over ' + self.budgets[r] if r in self.budgets else ''}: {n}"
        for r, n in self.dropped.items())
    longest = ", ".join(f"{field} {n}" for field, n in self.longest.items())
    return (f"{name} ({self.mode}): {self.num_examples} examples, {self.num_dropped} dropped "
            f"({reasons}); longest in tokens: {longest or 'none'}")

  def check_drop_fraction(self, max_drop_fraction: float) -> None:
    """Raises when more than `max_drop_fraction` of the split was dropped.

    The message names the counts, the budgets, the longest lengths and the fix.
    """
    if not self.num_examples or self.num_dropped <= max_drop_fraction * self.num_examples:
      return
    fixes = []
    for reason, n in self.dropped.items():
      if not n:
        continue
      if reason == "empty":
        fixes.append("remove or fill the empty prompts")
      else:
        budget = self.budgets[reason].split("=")[0]
        fixes.append(f"raise DataConfig.{budget} to at least {self.longest[reason]}")
    raise ValueError(
        f"{self.drop_summary()}. {self.num_dropped / self.num_examples:.2%} of the split would "
        f"be dropped, more than DataConfig.max_drop_fraction={max_drop_fraction}; "
        f"{' and '.join(fixes)}, or raise max_drop_fraction to accept the loss")

  def sft_lengths(self) -> np.ndarray:
    """[M] tokens of each example packed for SFT: prompt + answer + EOS."""
    return self.tokens["prompt"].lengths + self.tokens["answer"].lengths

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of examples `indices` (into this split's usable examples; -1: padding row).

    For "rl", "preference" and "unpaired"; see the module docstring.
    """
    if self.mode == "sft":
      raise ValueError("an 'sft' split is batched by packed rows: use sft_batch(pack(...))")
    indices = np.asarray(indices, np.int64).reshape(-1)
    batch = {}
    batch["prompt_tokens"], batch["prompt_mask"] = _pad(
        self.tokens["prompt"], indices, self.prompt_len, self.pad_id, left=True)
    names = {"rl": {"answer": "answer"}, "preference": {"chosen": "chosen", "rejected": "rejected"},
             "unpaired": {"completion": "completion"}}[self.mode]
    for field, name in names.items():
      batch[f"{name}_tokens"], batch[f"{name}_mask"] = _pad(
          self.tokens[field], indices, self.completion_len, self.pad_id, left=False)
    valid = indices >= 0
    safe = np.where(valid, indices, 0)
    batch["prompt_id"] = np.where(valid, self.ids[safe] if len(self) else 0, -1).astype(np.int32)
    for name, values in self.extras.items():
      fill = False if values.dtype == np.bool_ else 0
      shape = (len(indices),) + values.shape[1:]
      out = np.full(shape, fill, values.dtype)
      out[valid] = values[indices[valid]]
      batch[name] = out
    return batch

  def sft_batch(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Packed SFT rows; `rows[r]` lists the examples of row r (an empty list: padding row)."""
    if self.mode != "sft":
      raise ValueError(f"sft_batch needs an 'sft' split, this one is {self.mode!r}")
    n, t_max = len(rows), self.seq_len
    tokens = np.full((n, t_max), self.pad_id, np.int32)
    segment_ids = np.zeros((n, t_max), np.int32)
    positions = np.zeros((n, t_max), np.int32)
    loss_mask = np.zeros((n, t_max), np.int32)
    for r, row in enumerate(rows):
      t = 0
      for segment, i in enumerate(row, start=1):
        prompt, answer = self.tokens["prompt"][i], self.tokens["answer"][i]
        p, length = len(prompt), len(prompt) + len(answer)
        if t + length > t_max:
          raise ValueError(f"row {r} holds {t + length} tokens, more than seq_len={t_max}")
        tokens[r, t:t + p] = prompt
        tokens[r, t + p:t + length] = answer
        segment_ids[r, t:t + length] = segment
        positions[r, t:t + length] = np.arange(length)
        loss_mask[r, t + p:t + length] = 1
        t += length
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


def _pad(ragged: Ragged, indices: np.ndarray, length: int, pad_id: int,
         left: bool) -> tuple[np.ndarray, np.ndarray]:
  """[n, length] tokens and mask of `ragged[indices]`, left- or right-aligned; -1 rows stay pad."""
  tokens = np.full((len(indices), length), pad_id, np.int32)
  mask = np.zeros((len(indices), length), np.int32)
  for r, i in enumerate(indices):
    if i < 0:
      continue
    seq = ragged[i]
    if len(seq) > length:
      raise ValueError(f"example {i} has {len(seq)} tokens, more than the {length} of the batch")
    cols = slice(length - len(seq), length) if left else slice(0, len(seq))
    tokens[r, cols] = seq
    mask[r, cols] = 1
  return tokens, mask


def pack(lengths: Sequence[int] | np.ndarray, order: Sequence[int] | np.ndarray,
         seq_len: int) -> list[list[int]]:
  """Next-fit packing: the examples of `order`, in order, into rows of `seq_len` tokens.

  An example joins the current row when it fits in what is left, otherwise it
  starts a new row; no example is split. Returns the example indices of each
  row.
  """
  rows: list[list[int]] = []
  current: list[int] = []
  used = 0
  for i in order:
    n = int(lengths[i])
    if n > seq_len:
      raise ValueError(f"example {int(i)} has {n} tokens, more than seq_len={seq_len}")
    if used + n > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += n
  if current:
    rows.append(current)
  return rows


def _read_all(examples: Sequence[Mapping[str, Any]], start: int, stop: int) -> list:
  if isinstance(examples, builders.Examples):
    return examples.read(range(start, stop))
  return [examples[i] for i in range(start, stop)]


def drop_reasons(mode: str, config: DataConfig) -> dict[str, str | None]:
  """Why `encode_split` may drop an example of `mode`: reason -> its budget ("name=value").

  "prompt" (over max_prompt_len), a completion field ("answer" over
  max_answer_len in "rl"; "chosen", "rejected", "completion" over
  max_completion_len), "sequence" ("sft": prompt + answer + EOS over
  seq_len), and "empty" (a blank prompt; no budget).
  """
  completion = (f"max_answer_len={config.max_answer_len}" if mode == "rl"
                else f"max_completion_len={config.max_completion_len}")
  if mode == "sft":
    reasons: dict[str, str | None] = {"sequence": f"seq_len={config.seq_len}"}
  else:
    reasons = {"prompt": f"max_prompt_len={config.max_prompt_len}"}
    reasons.update({field: completion for field in _COMPLETIONS[mode]})
  reasons["empty"] = None
  return reasons


_REASON_TEXT = {"prompt": "prompt", "answer": "answer", "chosen": "chosen",
                "rejected": "rejected", "completion": "completion",
                "sequence": "prompt + answer + EOS", "empty": "empty prompt"}


def encode_split(examples: Sequence[Mapping[str, Any]], tokenizer: tokenizers_lib.Tokenizer,
                 config: DataConfig, mode: str | None = None, *,
                 split: str | None = None) -> EncodedSplit:
  """Tokenizes every example of a split, drops the unusable ones and reports the drops.

  Prompts go through `encode_prompts`; completions get EOS appended; in "rl"
  mode the answer is `rewards.answers.gold_answer(answer)` (see the module
  docstring). The drop counts are logged (absl, one line, a warning when
  anything was dropped) and kept on the result (`EncodedSplit.dropped`).

  Args:
    examples: example dicts with our field names (see `builders.load_split`).
    tokenizer: gives the ids and BOS/EOS/pad (and the chat template).
    config: lengths, template, BOS, `overlong` and `max_drop_fraction`.
    mode: one of MODES; default: "rl" for prompt data, else the data's kind.
    split: the split's name, for messages.

  Raises:
    ValueError: for an example missing a field; with `overlong="error"` for
      the first empty or too-long example, naming its index and prompt; with
      `overlong="skip"` when more than `config.max_drop_fraction` of the
      split is dropped (naming counts, budgets, longest lengths and the fix).
  """
  mode = DEFAULT_MODE[config.kind] if mode is None else mode
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if MODE_KIND[mode] != config.kind:
    raise ValueError(f"mode {mode!r} needs {MODE_KIND[mode]!r} examples, but source "
                     f"{config.source!r} holds {config.kind!r} examples; valid modes: "
                     f"{[m for m, k in MODE_KIND.items() if k == config.kind]}")
  completions = _COMPLETIONS[mode]
  required = ("prompt",) + completions + (("label",) if mode == "unpaired" else ())
  prompt_len = config.max_prompt_len
  completion_len = config.max_answer_len if mode == "rl" else config.max_completion_len
  limits = {"prompt": prompt_len, **{field: completion_len for field in completions}}
  reasons = drop_reasons(mode, config)

  where = "" if split is None else f" of split {split!r}"
  kept: list[int] = []
  token_lists: dict[str, list[list[int]]] = {f: [] for f in ("prompt",) + completions}
  numbers: list[list[int]] = []
  targets: list[int] = []
  labels: list[bool] = []
  dropped = dict.fromkeys(reasons, 0)
  longest: dict[str, int] = {}
  has_numbers = None

  def reject(reason: str, index: int, example: Mapping[str, Any], detail: str) -> None:
    if config.overlong == "error":
      raise ValueError(f"example {index}{where} (prompt "
                       f"{str(example['prompt'])[:80]!r}) {detail}; fix the data or set "
                       "DataConfig.overlong='skip' to drop such examples")
    dropped[reason] += 1

  for start in range(0, len(examples), _ENCODE_CHUNK):
    stop = min(start + _ENCODE_CHUNK, len(examples))
    chunk = _read_all(examples, start, stop)
    for offset, example in enumerate(chunk):
      missing = [f for f in required if f not in example]
      if missing:
        raise ValueError(f"example {start + offset}{where} lacks field(s) {missing} "
                         f"for mode {mode!r}; it has {sorted(example)}")
    encoded = {"prompt": encode_prompts(config, tokenizer, [e["prompt"] for e in chunk])}
    for field in completions:
      texts = [str(e[field]) for e in chunk]
      if mode == "rl":
        texts = [answers.gold_answer(t) for t in texts]
      encoded[field] = tokenizer.encode_batch(texts, add_eos=True)
    for offset, example in enumerate(chunk):
      index = start + offset
      if not str(example["prompt"]).strip():
        reject("empty", index, example, "has an empty prompt")
        continue
      lengths = {field: len(ids[offset]) for field, ids in encoded.items()}
      if mode == "sft":
        lengths = {"sequence": lengths["prompt"] + lengths["answer"]}
      for field, n in lengths.items():
        longest[field] = max(longest.get(field, 0), n)
      if mode == "sft":
        total = lengths["sequence"]
        too_long = ("sequence", f"has {total} tokens (prompt + answer + EOS), more than "
                    f"seq_len={config.seq_len}") if total > config.seq_len else None
      else:
        too_long = None
        for field, limit in limits.items():
          if lengths[field] > limit:
            with_eos = "" if field == "prompt" else " with EOS"
            too_long = (field, f"has a {field} of {lengths[field]} tokens{with_eos}, more "
                        f"than {reasons[field]}")
            break
      if too_long:
        reject(too_long[0], index, example, too_long[1])
        continue
      kept.append(index)
      for field, lists in token_lists.items():
        lists.append(encoded[field][offset])
      if mode == "rl":
        if has_numbers is None:
          has_numbers = "numbers" in example and "target" in example
        if has_numbers:
          numbers.append(list(example["numbers"]))
          targets.append(int(example["target"]))
      if mode == "unpaired":
        labels.append(bool(example["label"]))

  extras: dict[str, np.ndarray] = {}
  if has_numbers:
    k = max(len(n) for n in numbers)
    extras["numbers"] = np.full((len(numbers), k), -1, np.int32)
    for r, n in enumerate(numbers):
      extras["numbers"][r, :len(n)] = n
    extras["target"] = np.asarray(targets, np.int32)
  if mode == "unpaired":
    extras["label"] = np.asarray(labels, np.bool_)
  encoded_split = EncodedSplit(
      mode=mode, ids=np.asarray(kept, np.int32),
      tokens={f: Ragged.from_lists(v) for f, v in token_lists.items()}, extras=extras,
      pad_id=int(tokenizer.pad_id), prompt_len=prompt_len, completion_len=completion_len,
      seq_len=config.seq_len, num_examples=len(examples), dropped=dropped, longest=longest,
      budgets={r: b for r, b in reasons.items() if b is not None}, split=split)
  summary = encoded_split.drop_summary()
  (logging.warning if encoded_split.num_dropped else logging.info)(summary)
  encoded_split.check_drop_fraction(config.max_drop_fraction)
  return encoded_split


def make_batch(examples: Sequence[Mapping[str, Any]], config: DataConfig,
               mode: str | None = None, *,
               tokenizer: tokenizers_lib.Tokenizer | None = None) -> dict[str, np.ndarray]:
  """One batch of all usable `examples`, in order (SFT: packed in order).

  For notebooks and tests; `prompt_id` is the index in `examples`. Training
  uses `DataIterator`.
  """
  tokenizer = tokenizers_lib.load_tokenizer(config.tokenizer) if tokenizer is None else tokenizer
  encoded = encode_split(examples, tokenizer, config, mode)
  if encoded.mode == "sft":
    return encoded.sft_batch(pack(encoded.sft_lengths(), range(len(encoded)), config.seq_len))
  return encoded.batch(np.arange(len(encoded)))


# ---------------------------------------------------------------------------
# Iteration
# ---------------------------------------------------------------------------


class DataIterator:
  """Deterministic, sharded, resumable batches of one split (see the module docstring).

  Example:
    it = DataIterator(DataConfig(source="arithmetic", batch_size=64), "train")
    batch = next(it)                      # dict of numpy arrays
    state = it.get_state()                # {"epoch": 0, "position": 64}
    it2 = DataIterator(config, "train"); it2.set_state(state)   # continues
  """

  def __init__(self, config: DataConfig, split: str = "train", *, mode: str | None = None,
               tokenizer: tokenizers_lib.Tokenizer | None = None,
               examples: Sequence[Mapping[str, Any]] | None = None,
               num_epochs: int | None = None, drop_remainder: bool = True,
               shuffle: bool | None = None, process_index: int | None = None,
               process_count: int | None = None, workdir: str | None = None):
    """Reads and tokenizes the split.

    Args:
      config: the data config.
      split: the split to read.
      mode: one of MODES; default "rl" for prompt data, else the data's kind.
      tokenizer: default `load_tokenizer(config.tokenizer)`.
      examples: the split's examples; default `builders.load_split(config, split)`.
      num_epochs: stop after this many epochs; None (training): never stop.
      drop_remainder: drop each epoch's last partial batch; if False, pad it
        with padding rows (prompt_id -1, zero masks).
      shuffle: reshuffle per epoch; default `config.shuffle`.
      process_index, process_count: this process and how many share the
        global batch; default `jax.process_index()`, `jax.process_count()`.
      workdir: the default data_dir is `<workdir>/tensorflow_datasets`.
    """
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(process_count) or process_count < 1:
      raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if config.batch_size % process_count:
      raise ValueError(f"DataConfig.batch_size={config.batch_size} must be divisible by "
                       f"process_count={process_count}: every process takes an equal share")
    if num_epochs is not None and (not _is_int(num_epochs) or num_epochs < 1):
      raise ValueError(f"num_epochs must be a positive int or None, got {num_epochs!r}")
    self.config = config
    self.split = split
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.shuffle = config.shuffle if shuffle is None else shuffle
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = config.batch_size // self.process_count
    self.tokenizer = (tokenizers_lib.load_tokenizer(config.tokenizer)
                      if tokenizer is None else tokenizer)
    if examples is None:
      examples = builders.load_split(config, split, workdir=workdir)
    self.encoded = encode_split(examples, self.tokenizer, config, mode, split=split)
    if self.process_index == 0:
      print(self.encoded.drop_summary(), flush=True)
    self.mode = self.encoded.mode
    self._epoch = 0
    self._position = 0
    self._cached: tuple[int, Any] | None = None
    if num_epochs is None and self._num_batches(0) == 0:
      raise ValueError(self._too_small())

  def _too_small(self) -> str:
    unit = "packed rows" if self.mode == "sft" else "usable examples"
    return (f"split {self.split!r} gives {self._num_units(0)} {unit} (of {len(self.encoded)} "
            f"usable examples; {self.encoded.drop_summary()}), fewer than batch_size="
            f"{self.config.batch_size}: lower batch_size or add data")

  def _units(self, epoch: int) -> Any:
    """The epoch's order: example indices, or packed rows in "sft" mode."""
    if self._cached is not None and self._cached[0] == epoch:
      return self._cached[1]
    m = len(self.encoded)
    if self.shuffle:
      order = np.random.default_rng([self.config.seed, epoch]).permutation(m)
    else:
      order = np.arange(m)
    units = (pack(self.encoded.sft_lengths(), order, self.config.seq_len)
             if self.mode == "sft" else order)
    self._cached = (epoch, units)
    return units

  def _num_units(self, epoch: int) -> int:
    return len(self._units(epoch))

  def _num_batches(self, epoch: int) -> int:
    n, b = self._num_units(epoch), self.config.batch_size
    return n // b if self.drop_remainder else -(-n // b)

  def num_batches(self, epoch: int = 0) -> int:
    """Global batches in `epoch` (constant except in "sft" mode, where packing varies)."""
    return self._num_batches(epoch)

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self.num_epochs is not None and self._epoch >= self.num_epochs:
        raise StopIteration
      if self._position < self._num_batches(self._epoch) * self.config.batch_size:
        break
      if self._num_batches(self._epoch) == 0 and self.num_epochs is None:
        raise ValueError(self._too_small())
      self._epoch, self._position = self._epoch + 1, 0
    units = self._units(self._epoch)
    start = self._position + self.process_index * self.local_batch_size
    local = list(units[start:start + self.local_batch_size])
    local += [[] if self.mode == "sft" else -1] * (self.local_batch_size - len(local))
    batch = (self.encoded.sft_batch(local) if self.mode == "sft"
             else self.encoded.batch(np.asarray(local, np.int64)))
    self._position += self.config.batch_size
    if self._position >= self._num_batches(self._epoch) * self.config.batch_size:
      self._epoch, self._position = self._epoch + 1, 0
    return batch

  def get_state(self) -> dict[str, int]:
    """{"epoch", "position"}: JSON-serializable; `set_state` of it resumes exactly."""
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` of an iterator over the same data and config."""
    if not isinstance(state, Mapping) or set(state) != {"epoch", "position"}:
      raise ValueError(f"state must be a dict with keys 'epoch' and 'position' (from "
                       f"get_state()), got {state!r}")
    for key in ("epoch", "position"):
      if not _is_int(state[key]) or state[key] < 0:
        raise ValueError(f"state[{key!r}] must be a non-negative int, got {state[key]!r}")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])

  @property
  def stats(self) -> dict[str, int]:
    """Counts of the split, dropped once for all epochs, and of the iteration.

    split_examples (all), examples (usable), dropped (all reasons),
    dropped_<reason> per reason of `drop_reasons` (e.g. dropped_prompt,
    dropped_answer, dropped_empty), skipped_overlong (all length reasons),
    skipped_empty, epochs (completed).
    """
    encoded = self.encoded
    return {"split_examples": encoded.num_examples, "examples": len(encoded),
            "dropped": encoded.num_dropped,
            **{f"dropped_{reason}": n for reason, n in encoded.dropped.items()},
            "skipped_overlong": encoded.skipped_overlong,
            "skipped_empty": encoded.skipped_empty, "epochs": self._epoch}
