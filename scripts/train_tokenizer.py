"""Train a SentencePiece tokenizer on the training split of the configured data source.

  python scripts/train_tokenizer.py --config=configs/switch_tiny.py --output=/path/spm.model
      [--vocab_size=32000] [--model_type=unigram|bpe] [--character_coverage=0.9995]
      [--normalization=identity|nmt_nfkc] [--max_documents=N] [--max_chars=N]
      [--input_sentence_size=N] [--config.data.source=files --config.data.files='corpus/*.txt']

Reads documents of ``data.train_split`` in stored order until either cap is reached and trains
on their non-blank lines. The model has T5's ids (pad 0, eos 1, unk 2, no bos) and byte
fallback; the tokenizer appends 100 sentinels, so the model needs ``vocab_size + 100`` ids. The
default ``identity`` normalization is lossless; ``nmt_nfkc`` is T5's. Progress goes to stderr;
the model path, its vocabulary size and the flags that select it go to stdout. Missing folders of
``--output`` are made. Exit code 2 with a one-line error for a bad flag, field, output path or a
vocabulary the text cannot fill.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator

from switchmoe import data as data_lib
from switchmoe import tokenizer as tokenizer_lib
from switchmoe.main import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
# Embedding tables are padded to a multiple of this (TPU-friendly, as T5's 32128).
VOCAB_MULTIPLE = 128
PROGRESS_EVERY = 1000


def progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def capped(texts: Iterable[str], max_documents: int, max_chars: int) -> Iterator[str]:
  """The documents of ``texts`` until ``max_documents`` or ``max_chars`` is reached."""
  documents = chars = 0
  for text in texts:
    if documents >= max_documents or chars >= max_chars:
      break
    documents += 1
    chars += len(text)
    if documents % PROGRESS_EVERY == 0:
      progress(f'read {documents:,} documents, {chars:,} characters')
    yield text
  progress(f'read {documents:,} documents, {chars:,} characters in all; training')


def model_vocab_size(tokenizer_vocab_size: int) -> int:
  """The smallest multiple of VOCAB_MULTIPLE that holds the tokenizer's ids."""
  return -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_output(output: str) -> None:
  """Refuses an --output that cannot become a file; its missing folders are made later."""
  if os.path.isdir(output):
    raise ValueError(f'--output={output}: is a folder; give the .model file to write')
  folder = os.path.dirname(os.path.abspath(output))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise ValueError(f'--output={output}: {folder} is a file, not a folder')


def positive_int(value: str) -> int:
  number = int(value)
  if number <= 0:
    raise argparse.ArgumentTypeError(f'{value}: must be > 0')
  return number


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=str(REPO / 'configs' / 'switch_tiny.py'))
  parser.add_argument('--output', required=True, help='the .model file to write')
  parser.add_argument('--vocab_size', type=positive_int, default=32000,
                      help='pieces, including 3 special ids and 256 byte pieces')
  parser.add_argument('--model_type', choices=('unigram', 'bpe'), default='unigram')
  parser.add_argument('--character_coverage', type=float, default=0.9995)
  parser.add_argument('--normalization', choices=tokenizer_lib.NORMALIZATIONS,
                      default='identity')
  parser.add_argument('--max_documents', type=positive_int, default=100_000)
  parser.add_argument('--max_chars', type=positive_int, default=5_000_000)
  parser.add_argument('--input_sentence_size', type=positive_int, default=1_000_000,
                      help='lines sampled at random for training')
  args, overrides = parser.parse_known_args(argv)
  try:
    check_output(args.output)
    config = load_config(args.config, overrides)
    # Made once the flags are known to be good, so that a bad one leaves no empty folder.
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    texts = data_lib.iter_texts(config, split=config.data.train_split)
    tokenizer = tokenizer_lib.train_sentencepiece(
        capped(texts, args.max_documents, args.max_chars), args.output, args.vocab_size,
        model_type=args.model_type, character_coverage=args.character_coverage,
        normalization=args.normalization, input_sentence_size=args.input_sentence_size)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  path = os.path.abspath(args.output)
  print(f'wrote {path}')
  print(f'vocab_size {tokenizer.vocab_size} ({tokenizer.piece_size} pieces + '
        f'{tokenizer.num_sentinels} sentinels)')
  print(f'use: --config.data.tokenizer={path} '
        f'--config.model.vocab_size={model_vocab_size(tokenizer.vocab_size)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
