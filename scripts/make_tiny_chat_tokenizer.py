r"""Writes tests/fixtures/tiny_chat_tokenizer/: a tiny chat tokenizer for tests.

  python scripts/make_tiny_chat_tokenizer.py      # rewrites the committed fixture

A byte-level BPE `tokenizer.json` (the layout of Qwen2 / GPT-2 tokenizers:
ByteLevel pre-tokenizer and decoder, no normalizer), so every string, ASCII
or not, encodes without an unknown token and decodes back byte for byte.
The vocabulary is the 3 special tokens, the 256 byte symbols and the merges
learned on a small fixed corpus of math word problems, up to VOCAB_SIZE ids:

  0 <|endoftext|>   the pad token
  1 <|im_start|>    opens a chat turn
  2 <|im_end|>      closes a chat turn; the EOS token

`tokenizer_config.json` has no BOS token (as Qwen2.5) and a Qwen2-style
ChatML template: every message renders as
"<|im_start|>{role}\n{content}<|im_end|>\n"; a conversation that does not
start with a system message gets DEFAULT_SYSTEM first; with
add_generation_prompt the text ends with "<|im_start|>assistant\n".

Training over a fixed corpus breaks ties by token id, so every run writes the
same bytes (tests/tokenizers_test.py checks this against the committed files).
"""

from __future__ import annotations

import argparse
import json
import pathlib

_REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = _REPO / "tests" / "fixtures" / "tiny_chat_tokenizer"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 400  # < 512: 3 specials + 256 bytes + 141 merges
DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message['role'] != 'system' %}\n"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
# Training text: short math word problems with worked answers, in the style of
# GSM8K ("#### N") and MATH ("\boxed{...}"), plus the chat roles.
CORPUS = (
    "You are a helpful assistant.",
    "system", "user", "assistant",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
    "clips altogether in April and May.\n#### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
    "babysitting. How much did she earn?",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
    "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the "
    "money she needs. Her parents decided to give her $15 for that purpose, and her "
    "grandparents twice as much as her parents. How much more money does Betty need to "
    "buy the wallet?",
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents "
    "gave her 15 * 2 = $<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = "
    "$<<100-50-30-15=5>>5 more.\n#### 5",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages "
    "does he write a year?",
    "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 "
    "pages every week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624",
    "What is the value of $\\sqrt{36 \\times \\sqrt{16}}$?",
    "Calculating from the inside out, $\\sqrt{36 \\times \\sqrt{16}} = \\sqrt{36 \\times 4} "
    "= \\sqrt{144} = \\boxed{12}$.",
    "If $x + 2y = 4$ and $x - y = 1$, what is the value of $x$?",
    "Subtracting the second equation from the first gives $3y = 3$, so $y = 1$ and "
    "$x = \\boxed{2}$.",
    "Solve the following problem step by step. Put the final answer after ####.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
)


def build(vocab_size: int = VOCAB_SIZE):
  """The trained `tokenizers.Tokenizer`."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(CORPUS), trainer=trainer)
  return tok


def tokenizer_config() -> dict:
  """tokenizer_config.json: special tokens and the chat template."""
  return {
      "added_tokens_decoder": {
          str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
          for i, token in enumerate(SPECIAL_TOKENS)},
      "bos_token": None,
      "chat_template": CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "model_max_length": 4096,
      "pad_token": "<|endoftext|>",
      "tokenizer_class": "PreTrainedTokenizerFast",
      "unk_token": None,
  }


def write(output: pathlib.Path, vocab_size: int = VOCAB_SIZE) -> None:
  """Writes tokenizer.json and tokenizer_config.json into `output`."""
  tok = build(vocab_size)
  ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
  if ids != list(range(len(SPECIAL_TOKENS))):
    raise ValueError(f"special tokens got ids {ids}, expected 0, 1, 2")
  if not tok.get_vocab_size() < 512:
    raise ValueError(f"vocab size {tok.get_vocab_size()} is not below 512")
  output.mkdir(parents=True, exist_ok=True)
  (output / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
  (output / "tokenizer_config.json").write_text(
      json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT,
                      help="directory to write tokenizer.json and tokenizer_config.json into")
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE,
                      help="vocabulary size, special tokens included (< 512)")
  args = parser.parse_args(argv)
  write(args.output, args.vocab_size)
  print(f"wrote {args.output}/tokenizer.json and tokenizer_config.json")


if __name__ == "__main__":
  main()
