"""Tests for jaxrl_llm.tokenizers."""

import importlib.util
import json
import pathlib
import string
import sys

import numpy as np
import pytest

from jaxrl_llm import tokenizers as tok_lib
from jaxrl_llm.data import tasks

_REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def builtin():
  return tok_lib.load_tokenizer("builtin")


def _task_examples():
  return (tasks.generate("arithmetic", "train", 200, 0, ops="+-*", allow_negative=True)
          + tasks.generate("arithmetic", "test", 50, 0)
          + tasks.generate("countdown", "train", 200, 0)
          + tasks.generate("countdown", "test", 50, 0))


# ---------------------------------------------------------------------------
# Built-in SentencePiece model
# ---------------------------------------------------------------------------


def test_builtin_special_ids_and_size(builtin):
  assert isinstance(builtin, tok_lib.SentencePieceTokenizer)
  assert isinstance(builtin, tok_lib.Tokenizer)
  assert (builtin.pad_id, builtin.bos_id, builtin.eos_id, builtin.unk_id) == (0, 1, 2, 3)
  assert [builtin.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
  assert builtin.vocab_size <= 128
  assert tok_lib.BUILTIN_TOKENIZER_PATH.is_file()
  assert tok_lib.BUILTIN_TOKENIZER_PATH.name == "arith_sp.model"


def test_builtin_round_trips_task_text_without_unk(builtin):
  texts = [e["prompt"] + e["answer"] for e in _task_examples()]
  texts += [string.ascii_lowercase, "0123456789+-*()=:> ", "  3 -> 4  ", "a->b"]
  for text in texts:
    ids = builtin.encode(text)
    assert builtin.unk_id not in ids, text
    assert builtin.decode(ids) == text


def test_builtin_prompt_answer_boundary_is_stable(builtin):
  for e in _task_examples():
    assert (builtin.encode(e["prompt"]) + builtin.encode(e["answer"])
            == builtin.encode(e["prompt"] + e["answer"])), e


def test_builtin_digits_are_single_tokens(builtin):
  digit_ids = [builtin.encode(d) for d in string.digits]
  assert all(len(ids) == 1 for ids in digit_ids)
  assert len({ids[0] for ids in digit_ids}) == 10
  assert builtin.encode("907") == digit_ids[9] + digit_ids[0] + digit_ids[7]


def test_builtin_fits_the_token_budget(builtin):
  for e in _task_examples():
    assert len(builtin.encode(e["prompt"], add_bos=True)) <= 17, e
    assert len(builtin.encode(e["answer"], add_eos=True)) <= 11, e
  assert len(builtin.encode("13 17 20 -> 100:")) == 13


def test_builtin_unknown_characters_map_to_unk(builtin):
  assert builtin.encode("A") == [builtin.unk_id]


def test_shipped_model_matches_the_training_script(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "train_tokenizer", _REPO / "scripts" / "train_tokenizer.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  output = tmp_path / "arith_sp.model"
  script.main(["--output", str(output)])
  assert output.read_bytes() == tok_lib.BUILTIN_TOKENIZER_PATH.read_bytes()


# ---------------------------------------------------------------------------
# Encode / decode semantics (shared by both backends)
# ---------------------------------------------------------------------------


def test_encode_adds_bos_and_eos_only_when_asked(builtin):
  ids = builtin.encode("1+2=")
  assert builtin.encode("1+2=", add_bos=True) == [builtin.bos_id] + ids
  assert builtin.encode("1+2=", add_eos=True) == ids + [builtin.eos_id]
  assert builtin.encode("") == []


def test_decode_drops_pad_bos_eos_everywhere(builtin):
  three = builtin.encode("3")
  ids = [builtin.pad_id, builtin.bos_id] + three + [builtin.eos_id] + three + [builtin.pad_id]
  assert builtin.decode(ids) == "33"
  assert builtin.decode(np.asarray(ids, np.int32)) == "33"
  assert builtin.decode([]) == ""


def test_decode_marks_out_of_range_ids(builtin):
  ids = builtin.encode("3") + [builtin.vocab_size + 5] + builtin.encode("57") + [-1]
  assert builtin.decode(ids) == "3\ufffd57\ufffd"


def test_batch_helpers(builtin):
  texts = ["1+2=", "10 20 30 -> 60:"]
  batch = builtin.encode_batch(texts, add_eos=True)
  assert batch == [builtin.encode(t, add_eos=True) for t in texts]
  padded = np.full((2, 20), builtin.pad_id, np.int32)
  for row, ids in enumerate(batch):
    padded[row, :len(ids)] = ids
  assert builtin.decode_batch(padded) == texts
  assert builtin.decode_batch(batch) == texts
  with pytest.raises(ValueError, match="list of strings"):
    builtin.encode_batch("1+2=")
  with pytest.raises(ValueError, match="decode_batch"):
    builtin.decode(padded)


# ---------------------------------------------------------------------------
# load_tokenizer and SentencePiece errors
# ---------------------------------------------------------------------------


def test_load_tokenizer_sentencepiece_paths(tmp_path):
  sp = tok_lib.load_tokenizer(tok_lib.BUILTIN_TOKENIZER_PATH)
  assert isinstance(sp, tok_lib.SentencePieceTokenizer)
  (tmp_path / "tokenizer.model").write_bytes(tok_lib.BUILTIN_TOKENIZER_PATH.read_bytes())
  from_dir = tok_lib.load_tokenizer(str(tmp_path))
  assert isinstance(from_dir, tok_lib.SentencePieceTokenizer)
  assert from_dir.encode("1+2=") == sp.encode("1+2=")


@pytest.mark.parametrize("make", [
    lambda d: d / "missing",
    lambda d: d,  # an empty directory
    lambda d: (d / "vocab.txt").write_text("x") and d / "vocab.txt",
])
def test_load_tokenizer_reports_what_it_looked_for(tmp_path, make):
  with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
    tok_lib.load_tokenizer(make(tmp_path))


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok_lib.SentencePieceTokenizer(tmp_path / "nope.model")
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    tok_lib.SentencePieceTokenizer(bad)
  with pytest.raises(ValueError, match="pad_id=999"):
    tok_lib.SentencePieceTokenizer(tok_lib.BUILTIN_TOKENIZER_PATH, pad_id=999)


# ---------------------------------------------------------------------------
# HF tokenizer.json
# ---------------------------------------------------------------------------

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
_WORDS = ["hello", "world", "what", "is", "1", "+", "2", "3", "="]
_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _save_hf(directory, config=None, special_map=None, post_processor_bos=False):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {t: i for i, t in enumerate(_SPECIALS + _WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(_SPECIALS)
  if post_processor_bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  if special_map is not None:
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
  return directory


_CONFIG = {
    "bos_token": "<s>",
    "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "chat_template": _TEMPLATE,
}


def test_hf_special_ids_and_round_trip(tmp_path):
  tok = tok_lib.load_tokenizer(_save_hf(tmp_path, _CONFIG, post_processor_bos=True))
  assert isinstance(tok, tok_lib.HFTokenizer) and isinstance(tok, tok_lib.Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == len(_SPECIALS) + len(_WORDS)
  ids = tok.encode("hello world")
  # The post-processor's automatic <s> is not applied; add_bos adds it.
  assert ids == [6, 7]
  assert tok.encode("hello world", add_bos=True, add_eos=True) == [1, 6, 7, 2]
  assert tok.decode([0, 1, 6, 7, 2, 0]) == "hello world"
  assert tok.decode([6, 4, 7]) == "hello <|user|> world"  # other specials stay
  assert tok.decode([6, 99]) == "hello\ufffd"
  assert tok.encode_batch(["hello", "world"]) == [[6], [7]]
  assert tok.decode_batch(np.array([[6, 2, 0], [7, 0, 0]])) == ["hello", "world"]


def test_hf_loads_from_the_json_file(tmp_path):
  directory = _save_hf(tmp_path, _CONFIG)
  tok = tok_lib.load_tokenizer(directory / "tokenizer.json")
  assert isinstance(tok, tok_lib.HFTokenizer) and tok.eos_id == 2


def test_hf_special_tokens_map_and_pad_fallback(tmp_path):
  from_map = tok_lib.HFTokenizer(_save_hf(
      tmp_path / "a", {"eos_token": "</s>"}, {"bos_token": "<s>", "pad_token": "<unk>"}))
  assert (from_map.bos_id, from_map.eos_id, from_map.pad_id) == (1, 2, 3)
  no_pad_no_bos = tok_lib.HFTokenizer(_save_hf(tmp_path / "b", {"eos_token": "</s>"}))
  assert no_pad_no_bos.bos_id is None and no_pad_no_bos.pad_id == no_pad_no_bos.eos_id == 2
  with pytest.raises(ValueError, match="no BOS"):
    no_pad_no_bos.encode("hello", add_bos=True)
  overridden = tok_lib.HFTokenizer(tmp_path / "b", pad_token="<pad>")
  assert overridden.pad_id == 0


def test_hf_special_token_errors(tmp_path):
  with pytest.raises(ValueError, match="no eos_token"):
    tok_lib.HFTokenizer(_save_hf(tmp_path / "a", {"bos_token": "<s>"}))
  with pytest.raises(ValueError, match="'<eos>' is not in the vocabulary"):
    tok_lib.HFTokenizer(_save_hf(tmp_path / "b", {"eos_token": "<eos>"}))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tok_lib.HFTokenizer(tmp_path / "empty_dir_that_does_not_exist")
  bad = tmp_path / "c" / "tokenizer.json"
  bad.parent.mkdir()
  bad.write_text("{}")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    tok_lib.HFTokenizer(bad)


def test_hf_apply_chat_template(tmp_path):
  tok = tok_lib.HFTokenizer(_save_hf(tmp_path, _CONFIG))
  messages = [{"role": "user", "content": "what is 1 + 2"}]
  prompt = tok.apply_chat_template(messages)
  assert prompt == "<s><|user|>what is 1 + 2</s><|assistant|>"
  assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
      "<s><|user|>what is 1 + 2</s>")
  # Special tokens written by the template encode to their own ids.
  assert tok.encode(prompt) == [1, 4, 8, 9, 10, 11, 12, 2, 5]
  with pytest.raises(ValueError, match="role"):
    tok.apply_chat_template(["hello"])


def test_hf_chat_template_sources(tmp_path):
  config = {k: v for k, v in _CONFIG.items() if k != "chat_template"}
  no_template = tok_lib.HFTokenizer(_save_hf(tmp_path / "a", config))
  assert no_template.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    no_template.apply_chat_template([{"role": "user", "content": "hello"}])

  named = dict(config, chat_template=[
      {"name": "tool_use", "template": "tools"},
      {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"}])
  assert tok_lib.HFTokenizer(_save_hf(tmp_path / "b", named)).apply_chat_template(
      [{"role": "user", "content": "hello"}]) == "hello"

  directory = _save_hf(tmp_path / "c", _CONFIG)
  (directory / "chat_template.jinja").write_text(
      "{{ messages | tojson }}{% if add_generation_prompt %}!{% endif %}")
  assert tok_lib.HFTokenizer(directory).apply_chat_template(
      [{"role": "user", "content": "hi"}]) == '[{"role": "user", "content": "hi"}]!'

  failing = dict(config, chat_template="{{ raise_exception('only user turns') }}")
  jinja2 = pytest.importorskip("jinja2")
  with pytest.raises(jinja2.exceptions.TemplateError, match="only user turns"):
    tok_lib.HFTokenizer(_save_hf(tmp_path / "d", failing)).apply_chat_template(
        [{"role": "user", "content": "hi"}])


def test_hf_missing_library_names_the_extra(tmp_path, monkeypatch):
  directory = _save_hf(tmp_path, _CONFIG)
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
  with pytest.raises(ImportError, match=r"pip install jaxrl_llm\[hf\]"):
    tok_lib.HFTokenizer(directory)


# ---------------------------------------------------------------------------
# The tiny chat tokenizer fixture (scripts/make_tiny_chat_tokenizer.py)
# ---------------------------------------------------------------------------

_CHAT_FIXTURE = _REPO / "tests" / "fixtures" / "tiny_chat_tokenizer"


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, _REPO / "scripts" / f"{name}.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  return script


@pytest.fixture(scope="module")
def chat_tok():
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  return tok_lib.load_tokenizer(_CHAT_FIXTURE)


def test_tiny_chat_fixture_special_tokens(chat_tok):
  assert isinstance(chat_tok, tok_lib.HFTokenizer)
  assert chat_tok.vocab_size < 512
  assert chat_tok.bos_id is None and chat_tok.bos_token is None
  assert (chat_tok.eos_token, chat_tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
  assert (chat_tok.pad_id, chat_tok.eos_id) == (0, 2)
  assert chat_tok.token_to_id("<|im_start|>") == 1
  assert chat_tok.encode("<|im_start|>user\n")[0] == 1


def test_tiny_chat_fixture_round_trips_math_text(chat_tok):
  texts = [string.printable, "caf\u00e9 costs \u20ac5 \u2014 \u03c0 \u2248 3.14"]
  for name in ("gsm8k", "math"):
    for line in (_REPO / "tests" / "fixtures" / name / "train.jsonl").read_text().splitlines():
      if line.strip():
        texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
  assert len(texts) > 10
  for text in texts:
    assert chat_tok.decode(chat_tok.encode(text)) == text, text


def test_tiny_chat_fixture_chat_template(chat_tok):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 2+2?"}]
  assert chat_tok.apply_chat_template(messages) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert chat_tok.apply_chat_template(messages[1:], add_generation_prompt=False) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "What is 2+2?<|im_end|>\n")
  reply = messages + [{"role": "assistant", "content": "4"}]
  assert chat_tok.apply_chat_template(reply, add_generation_prompt=False).endswith(
      "<|im_start|>assistant\n4<|im_end|>\n")


def test_tiny_chat_fixture_matches_transformers(chat_tok):
  transformers = pytest.importorskip("transformers")
  theirs = transformers.AutoTokenizer.from_pretrained(str(_CHAT_FIXTURE))
  for messages in ([{"role": "user", "content": "Natalia sold 48 clips. #### 48"}],
                   [{"role": "system", "content": "Think."},
                    {"role": "user", "content": "$\\boxed{2}$"}]):
    text = chat_tok.apply_chat_template(messages)
    assert theirs.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=True) == text
    assert theirs(text, add_special_tokens=False)["input_ids"] == chat_tok.encode(text)
  assert (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token) == (2, 0, None)


def test_tiny_chat_fixture_matches_the_script(tmp_path):
  pytest.importorskip("tokenizers")
  _load_script("make_tiny_chat_tokenizer").main(["--output", str(tmp_path)])
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_bytes() == (_CHAT_FIXTURE / name).read_bytes(), name
