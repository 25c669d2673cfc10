"""Tokenizers: SentencePiece (the default) and HF `tokenizer.json`.

Both backends follow one `Tokenizer` protocol:

  encode(text, *, add_bos=False, add_eos=False) -> list[int]
  decode(ids) -> str
  encode_batch(texts, ...) / decode_batch(ids_batch)
  bos_id, eos_id, pad_id, vocab_size

`decode` never truncates: it drops every pad, BOS and EOS id wherever it
occurs and decodes the rest, so callers cut a completion at its first EOS
themselves (the sampler knows the lengths). An id outside [0, vocab_size),
which a model whose embedding table is padded past the tokenizer can sample,
decodes to U+FFFD; dropping it instead could turn "3?57" into a correct "357".

`load_tokenizer("builtin")` gives the character-level SentencePiece model that
ships with the package (trained by scripts/train_tokenizer.py on the synthetic
tasks of `jaxrl_llm.data.tasks`): pad=0, bos=1, eos=2, unk=3, one token per
digit, and encode(prompt) + encode(answer) == encode(prompt + answer).
"""

from __future__ import annotations

import abc
import datetime
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

BUILTIN_TOKENIZER_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "arith_sp.model"
_REPLACEMENT = "\ufffd"
_HF_INSTALL_HINT = "pip install jaxrl_llm[hf]"


@runtime_checkable
class Tokenizer(Protocol):
  """What the library needs from a tokenizer.

  `bos_id` is None when the tokenizer defines no BOS token (Qwen2 for one);
  `eos_id` and `pad_id` are always real ids.
  """

  @property
  def bos_id(self) -> int | None: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]: ...

  def decode_batch(self, ids_batch: Iterable[Sequence[int]] | np.ndarray) -> list[str]: ...


def _as_id_list(ids: Sequence[int] | np.ndarray) -> list[int]:
  array = np.asarray(ids)
  if array.size == 0:
    return []
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(
        f"decode expects a 1-D sequence of integer ids, got shape {array.shape} and dtype "
        f"{array.dtype}; use decode_batch for 2-D arrays")
  return array.tolist()


class _TokenizerBase(abc.ABC):
  """Shared BOS/EOS handling, id filtering and batching of both backends."""

  _bos_id: int | None
  _eos_id: int
  _pad_id: int

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids."""

  @abc.abstractmethod
  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    """Backend encoding of texts, without BOS/EOS handling."""

  @abc.abstractmethod
  def _decode_raw(self, ids: list[int]) -> str:
    """Backend decoding of ids (special ids already removed)."""

  def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos:
      if self._bos_id is None:
        raise ValueError(f"{self!r} defines no BOS token; call encode with add_bos=False")
      ids = [self._bos_id] + ids
    if add_eos:
      ids = ids + [self._eos_id]
    return ids

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with BOS prepended and EOS appended."""
    return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    """`encode` over a list of strings (ragged: no padding)."""
    if isinstance(texts, str):
      raise ValueError("encode_batch expects a list of strings, got one string; use encode")
    return [self._wrap(ids, add_bos, add_eos) for ids in self._encode_raw(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` without pad, BOS and EOS; out-of-range ids become U+FFFD."""
    dropped = {self._eos_id, self._pad_id}
    if self._bos_id is not None:
      dropped.add(self._bos_id)
    kept = [i for i in _as_id_list(ids) if i not in dropped]
    vocab_size = self.vocab_size
    if all(0 <= i < vocab_size for i in kept):
      return self._decode_raw(kept)
    pieces: list[str] = []
    run: list[int] = []
    for i in kept:
      if 0 <= i < vocab_size:
        run.append(i)
        continue
      if run:
        pieces.append(self._decode_raw(run))
        run = []
      pieces.append(_REPLACEMENT)
    if run:
      pieces.append(self._decode_raw(run))
    return "".join(pieces)

  def decode_batch(self, ids_batch: Iterable[Sequence[int]] | np.ndarray) -> list[str]:
    """`decode` of each row of a 2-D array or of each list in a list."""
    return [self.decode(ids) for ids in ids_batch]


def _special_id(ids: dict[str, int], role: str, fallback: int | None) -> int | None:
  return ids[role] if ids.get(role, -1) >= 0 else fallback


class SentencePieceTokenizer(_TokenizerBase):
  """A SentencePiece `.model` file.

  BOS, EOS and pad come from the model (`bos_id=-1` means none). A model with
  no pad piece (Llama's, for one) pads with EOS, unless `pad_id` is given;
  `decode` drops both either way.
  """

  def __init__(self, model_path: str | os.PathLike[str], *, pad_id: int | None = None):
    path = pathlib.Path(model_path)
    if not path.is_file():
      raise FileNotFoundError(
          f"SentencePiece model {str(path)!r} does not exist; pass the path of a .model file "
          "(or use load_tokenizer('builtin') for the shipped one)")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{str(path)!r} is not a valid SentencePiece model: {e}") from e
    self._path = path
    ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
    if ids["eos"] < 0:
      raise ValueError(
          f"SentencePiece model {str(path)!r} defines no EOS piece; retrain it with eos_id set")
    self._bos_id = _special_id(ids, "bos", None)
    self._eos_id = ids["eos"]
    self._pad_id = pad_id if pad_id is not None else _special_id(ids, "pad", self._eos_id)
    if not 0 <= self._pad_id < self.vocab_size:
      raise ValueError(f"pad_id={self._pad_id} is outside the vocabulary [0, {self.vocab_size})")

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({str(self._path)!r})"

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def unk_id(self) -> int:
    """Id of the unknown piece (characters outside the vocabulary map to it)."""
    return self._sp.unk_id()

  def id_to_piece(self, i: int) -> str:
    """The vocabulary piece of id `i` ("▁" marks a space)."""
    return self._sp.id_to_piece(int(i))

  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, out_type=int)

  def _decode_raw(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


def _token_content(value: Any) -> str | None:
  """A special token from a HF config: a string, or a serialized AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    with path.open(encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
  return data


def _pick_template(value: Any, source: pathlib.Path) -> str | None:
  """A chat template from a config value: a string, or named templates."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if "default" in named:
      return named["default"]
    raise ValueError(
        f"{str(source)!r} has named chat templates {sorted(map(str, named))} but none called "
        "'default'")
  raise ValueError(f"chat_template in {str(source)!r} must be a string or a list, "
                   f"got {type(value).__name__}")


class HFTokenizer(_TokenizerBase):
  """A HF `tokenizer.json`, through the `tokenizers` library (extra: [hf]).

  `path` is a checkpoint directory holding tokenizer.json, or the file itself.
  Special tokens come from the arguments, else tokenizer_config.json, else
  special_tokens_map.json in the same directory. Without a pad token the
  tokenizer pads with EOS. The chat template is read from chat_template.jinja,
  chat_template.json or tokenizer_config.json, first found wins.

  `encode` does not run the tokenizer's post-processor (which may add BOS on
  its own); BOS and EOS are added only when asked for, as with SentencePiece.
  Special tokens written in the text (say "<|im_start|>") encode as themselves.
  """

  def __init__(self, path: str | os.PathLike[str], *, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"HFTokenizer needs the `tokenizers` package: {_HF_INSTALL_HINT}") from e
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(
          f"no tokenizer.json at {str(file)!r}; pass a HF checkpoint directory holding "
          "tokenizer.json, or the tokenizer.json file itself")
    directory = file.parent
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception
      raise ValueError(f"{str(file)!r} is not a valid tokenizer.json: {e}") from e
    self._path = file
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")

    def token(role: str, override: str | None) -> str | None:
      if override is not None:
        return override
      key = f"{role}_token"
      return _token_content(config.get(key)) or _token_content(special_map.get(key))

    self.bos_token = token("bos", bos_token)
    self.eos_token = token("eos", eos_token)
    self.pad_token = token("pad", pad_token)
    self.unk_token = token("unk", None)
    if self.eos_token is None:
      raise ValueError(
          f"found no eos_token in tokenizer_config.json or special_tokens_map.json next to "
          f"{str(file)!r}; pass eos_token=... (e.g. HFTokenizer(path, eos_token='</s>'))")
    self._bos_id = None if self.bos_token is None else self._token_id(self.bos_token, "bos")
    self._eos_id = self._token_id(self.eos_token, "eos")
    if self.pad_token is None:
      self.pad_token = self.eos_token
    self._pad_id = self._token_id(self.pad_token, "pad")

    self.chat_template: str | None = None
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
      self.chat_template = template_file.read_text(encoding="utf-8")
    else:
      template_json = directory / "chat_template.json"
      self.chat_template = _pick_template(_read_json(template_json).get("chat_template"),
                                          template_json)
      if self.chat_template is None:
        self.chat_template = _pick_template(config.get("chat_template"),
                                            directory / "tokenizer_config.json")
    self._compiled_template = None

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self._path)!r})"

  def _token_id(self, content: str, role: str) -> int:
    i = self._tok.token_to_id(content)
    if i is None:
      raise ValueError(
          f"{role} token {content!r} is not in the vocabulary of {str(self._path)!r}; "
          f"pass {role}_token=... with a token it has")
    return i

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary token (None when absent)."""
    return self._tok.token_to_id(token)

  def _encode_raw(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def _decode_raw(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)

  def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                          add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Renders `messages` with the checkpoint's Jinja chat template.

    Args:
      messages: [{"role": "user", "content": "..."}, ...].
      add_generation_prompt: end with the header of an assistant turn, so
        that the model's continuation is the reply.
      **kwargs: further template variables (e.g. `tools`).

    Returns:
      The prompt text; `encode` it (special tokens in it map to their ids).
    """
    if self.chat_template is None:
      raise ValueError(
          f"{self!r} has no chat template: none of chat_template.jinja, chat_template.json "
          "or a 'chat_template' entry in tokenizer_config.json exists next to it; add one or "
          "format prompts yourself")
    if isinstance(messages, (str, dict)) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages):
      raise ValueError("messages must be a list of dicts with 'role' and 'content' keys, "
                       f"got {messages!r}")
    if self._compiled_template is None:
      self._compiled_template = _compile_template(self.chat_template)
    variables = {
        "bos_token": self.bos_token or "",
        "eos_token": self.eos_token,
        "pad_token": self.pad_token,
        "unk_token": self.unk_token or "",
        **kwargs,
    }
    return self._compiled_template.render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)


def _compile_template(source: str):
  """Compiles a chat template in a sandbox, with the helpers HF templates use."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"apply_chat_template needs the `jinja2` package: {_HF_INSTALL_HINT}") from e

  def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
             separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)

  # Templates are data from a checkpoint: render them sandboxed.
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"the chat template does not parse: {e}") from e


def load_tokenizer(path_or_name: str | os.PathLike[str]) -> SentencePieceTokenizer | HFTokenizer:
  """Loads a tokenizer by name or path.

  Args:
    path_or_name: "builtin" (the shipped SentencePiece model); a SentencePiece
      `.model` file; a `tokenizer.json` file; or a directory holding
      tokenizer.json (HF, preferred) or tokenizer.model (SentencePiece).

  Raises:
    FileNotFoundError: when nothing loadable is there; the message lists what
      was looked for.
  """
  if isinstance(path_or_name, str) and path_or_name == "builtin":
    return SentencePieceTokenizer(BUILTIN_TOKENIZER_PATH)
  path = pathlib.Path(path_or_name)
  if path.is_file():
    if path.suffix == ".model":
      return SentencePieceTokenizer(path)
    if path.suffix == ".json":
      return HFTokenizer(path)
  elif path.is_dir():
    if (path / "tokenizer.json").is_file():
      return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
      return SentencePieceTokenizer(path / "tokenizer.model")
  raise FileNotFoundError(
      f"no tokenizer at {str(path_or_name)!r}: expected 'builtin', a SentencePiece .model "
      "file, a tokenizer.json file, or a directory containing tokenizer.json or "
      "tokenizer.model")
