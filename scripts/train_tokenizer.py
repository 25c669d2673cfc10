r"""Trains the built-in SentencePiece tokenizer on the synthetic task corpus.

  python scripts/train_tokenizer.py            # writes jaxrl_llm/assets/arith_sp.model

The model is character-level (SentencePiece model_type "char") with digits
split, plus one user-defined piece "▁->▁" for the countdown separator " -> ":

  * one token per digit, so the tiny built-in model can learn column
    arithmetic;
  * no piece spans a prompt/answer boundary, so
    encode(prompt) + encode(answer) == encode(prompt + answer) for every task
    example, and the ids a verifier sees do not depend on how text was split;
  * lowercase letters are always in the vocabulary, so short words encode
    without <unk> in notebooks and tests.

Special ids: pad=0, bos=1, eos=2, unk=3. Text is kept byte-exact (identity
normalization, no dummy prefix, whitespace kept as is), so decode(encode(x))
== x for any text over the vocabulary. Training is single-threaded on a fixed
corpus, so the output is the same file on every run.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import string
import sys

import sentencepiece as spm

_REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_REPO))

from jaxrl_llm.data import tasks  # noqa: E402

DEFAULT_OUTPUT = _REPO / "jaxrl_llm" / "assets" / "arith_sp.model"
# ">" appears in the corpus only inside the " -> " piece; list it so that
# "->" in other text still encodes. (The space is always in the corpus, and
# SentencePiece refuses it here.)
REQUIRED_CHARS = string.ascii_lowercase + string.digits + "+-*()=:>"
USER_DEFINED_SYMBOLS = ("\u2581->\u2581",)  # " -> " with SentencePiece's space mark


def train(output: pathlib.Path, num_lines: int, seed: int,
          vocab_size: int) -> spm.SentencePieceProcessor:
  """Trains on `tasks.corpus(num_lines, seed)` and writes the model to `output`."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=tasks.corpus(num_lines, seed),
      model_writer=model,
      model_type="char",
      # An upper bound: a character model holds exactly the characters it
      # sees plus the special and user-defined pieces.
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      split_digits=True,
      character_coverage=1.0,
      required_chars=REQUIRED_CHARS,
      user_defined_symbols=list(USER_DEFINED_SYMBOLS),
      pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      normalization_rule_name="identity",
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_bytes(model.getvalue())
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def check(sp: spm.SentencePieceProcessor, num_lines: int, seed: int, max_vocab: int) -> None:
  """Raises if the model misses a character, does not round-trip, or is too big."""
  if sp.vocab_size() > max_vocab:
    raise ValueError(f"vocab size {sp.vocab_size()} exceeds --vocab_size={max_vocab}")
  texts = list(tasks.corpus(num_lines, seed + 1)) + [REQUIRED_CHARS + " 3 -> 4 "]
  for text in texts:
    ids = sp.encode(text)
    if sp.unk_id() in ids:
      raise ValueError(f"{text!r} encodes with <unk>: {sp.encode(text, out_type=str)}")
    if sp.decode(ids) != text:
      raise ValueError(f"{text!r} does not round-trip: got {sp.decode(ids)!r}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT,
                      help="where to write the .model file")
  parser.add_argument("--num_lines", type=int, default=20000,
                      help="corpus lines (half arithmetic, half countdown)")
  parser.add_argument("--seed", type=int, default=0, help="corpus seed")
  parser.add_argument("--vocab_size", type=int, default=64,
                      help="upper bound on the vocabulary size (must stay <= 128)")
  args = parser.parse_args(argv)
  if not 0 < args.vocab_size <= 128:
    parser.error(f"--vocab_size must be in [1, 128], got {args.vocab_size}")
  sp = train(args.output, args.num_lines, args.seed, args.vocab_size)
  check(sp, num_lines=2000, seed=args.seed, max_vocab=args.vocab_size)
  pieces = " ".join(sp.id_to_piece(i) for i in range(sp.vocab_size()))
  print(f"wrote {args.output} (vocab_size={sp.vocab_size()}): {pieces}")


if __name__ == "__main__":
  main()
