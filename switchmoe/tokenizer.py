"""Tokenizers with T5-style sentinel ids: UTF-8 bytes, or a SentencePiece model.

``config.data.tokenizer`` is ``'byte'`` or the path of a SentencePiece ``.model`` file. Both keep
T5's layout: 0 pad, 1 eos, 2 unk, and 100 sentinels at the top of the vocabulary, highest id
first: sentinel_id(i) = vocab_size - 1 - i renders as ``<extra_id_i>``.

Byte ids (vocab_size = 359):
  0        pad
  1        eos
  2        unk (never produced by ``encode``; kept so the layout matches T5)
  3..258   the 256 UTF-8 byte values, shifted by 3
  259..358 100 sentinels

SentencePiece ids (vocab_size = P + 100, as seqio's ``SentencePieceVocabulary(extra_ids=100)``):
  0..P-1   the model's P pieces; its pad, eos and unk must be 0, 1 and 2 (T5's models are)
  P..P+99  100 sentinels
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import sentencepiece

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
_BYTE_OFFSET = 3
_NUM_BYTES = 256
_NUM_SENTINELS = 100

NORMALIZATIONS = ('identity', 'nmt_nfkc')
_ALLOWED = "'byte' or a path to a SentencePiece .model file"


class Tokenizer(Protocol):
  """What the pipeline uses of a tokenizer."""

  @property
  def pad_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def unk_id(self) -> int: ...

  @property
  def num_sentinels(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  def sentinel_id(self, i: int) -> int: ...

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


def _check_sentinel_index(i: int) -> None:
  if not 0 <= i < _NUM_SENTINELS:
    raise IndexError(f'sentinel index {i} outside [0, {_NUM_SENTINELS})')


class ByteTokenizer:
  """Maps text to UTF-8 bytes (+3) and back; reserves 100 sentinel ids at the top."""

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def num_sentinels(self) -> int:
    return _NUM_SENTINELS

  @property
  def vocab_size(self) -> int:
    return _BYTE_OFFSET + _NUM_BYTES + _NUM_SENTINELS

  def sentinel_id(self, i: int) -> int:
    """Id of the i-th sentinel (<extra_id_i>), counting down from the top of the vocabulary."""
    _check_sentinel_index(i)
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> np.ndarray:
    """Returns ids_N int32 for the N UTF-8 bytes of ``text``; no EOS is appended."""
    bytes_N = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
    return bytes_N.astype(np.int32) + _BYTE_OFFSET

  def decode(self, ids) -> str:
    """Inverse of ``encode`` for any 1-D id sequence.

    Pad and EOS are dropped, sentinels render as ``<extra_id_i>``, unk and out-of-range ids as
    U+FFFD, and byte runs that are not valid UTF-8 decode with errors='replace'.
    """
    first_sentinel = self.vocab_size - _NUM_SENTINELS
    pieces = []
    byte_run = bytearray()
    for token in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if token in (PAD_ID, EOS_ID):
        continue
      if _BYTE_OFFSET <= token < first_sentinel:
        byte_run.append(token - _BYTE_OFFSET)
        continue
      # A non-byte token ends the current byte run, so decode that run on its own.
      pieces.append(byte_run.decode('utf-8', errors='replace'))
      byte_run.clear()
      if first_sentinel <= token < self.vocab_size:
        pieces.append(f'<extra_id_{self.vocab_size - 1 - token}>')
      else:
        pieces.append('\ufffd')
    pieces.append(byte_run.decode('utf-8', errors='replace'))
    return ''.join(pieces)


class SentencePieceTokenizer:
  """A SentencePiece model with 100 sentinel ids appended above its pieces.

  Pickles as the serialized model (grain sends the tokenizer to its worker processes); each
  process loads the SentencePieceProcessor on first use.
  """

  def __init__(self, model_proto: bytes):
    """Loads a serialized SentencePiece ModelProto.

    Raises:
      ValueError: ``model_proto`` is not a SentencePiece model, or its pad and eos ids are not
        0 and 1.
    """
    self._model_proto = model_proto
    self._processor = None
    processor = self._sp
    self._piece_size = processor.piece_size()
    self._pad_id, self._eos_id = processor.pad_id(), processor.eos_id()
    self._unk_id = processor.unk_id()
    if (self._pad_id, self._eos_id) != (PAD_ID, EOS_ID):
      raise ValueError(
          f'the model has pad_id={self._pad_id}, eos_id={self._eos_id}, but padding and the '
          f'pipeline need pad_id={PAD_ID}, eos_id={EOS_ID}; train one with '
          'scripts/train_tokenizer.py')

  @property
  def _sp(self) -> sentencepiece.SentencePieceProcessor:
    if self._processor is None:
      processor = sentencepiece.SentencePieceProcessor()
      try:
        processor.LoadFromSerializedProto(self._model_proto)
      except RuntimeError:
        raise ValueError('not a SentencePiece model') from None
      self._processor = processor
    return self._processor

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != '_processor'}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _processor=None)

  @property
  def piece_size(self) -> int:
    """Number of SentencePiece pieces: ids below it are pieces, ids from it up sentinels."""
    return self._piece_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def unk_id(self) -> int:
    return self._unk_id

  @property
  def num_sentinels(self) -> int:
    return _NUM_SENTINELS

  @property
  def vocab_size(self) -> int:
    return self._piece_size + _NUM_SENTINELS

  def sentinel_id(self, i: int) -> int:
    """Id of the i-th sentinel (<extra_id_i>), counting down from the top of the vocabulary."""
    _check_sentinel_index(i)
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> np.ndarray:
    """Returns ids_N int32 for the N pieces of ``text``; no EOS is appended."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    """Text of any 1-D id sequence.

    Pad and EOS are dropped, sentinels render as ``<extra_id_i>``, ids outside the vocabulary as
    U+FFFD, and the pieces between them decode with SentencePiece.
    """
    texts = []
    run = []
    for token in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if token in (self._pad_id, self._eos_id):
        continue
      if 0 <= token < self._piece_size:
        run.append(token)
        continue
      texts.append(self._decode_run(run, at_start=not texts))
      run = []
      if self._piece_size <= token < self.vocab_size:
        texts.append(f'<extra_id_{self.vocab_size - 1 - token}>')
      else:
        texts.append('\ufffd')
    texts.append(self._decode_run(run, at_start=not texts))
    return ''.join(texts)

  def _decode_run(self, run: list[int], at_start: bool) -> str:
    text = self._sp.decode(run)
    # SentencePiece drops the word-start space of a text's first piece, its dummy prefix (T5's
    # models add one); after a sentinel that space belongs to the text.
    if (not at_start and run and self._sp.id_to_piece(run[0]).startswith('\u2581')
        and not text.startswith(' ')):
      text = ' ' + text
    return text


def _looks_like_path(name: str) -> bool:
  return '/' in name or name.endswith('.model') or os.path.exists(name)


def make_tokenizer(name: str) -> Tokenizer:
  """Returns the tokenizer selected by ``config.data.tokenizer``.

  Raises:
    ValueError: one line naming ``data.tokenizer``: an unknown name, a missing or unreadable
      file, or a file that is not a usable SentencePiece model.
  """
  if name == 'byte':
    return ByteTokenizer()
  if not _looks_like_path(name):
    raise ValueError(f'data.tokenizer={name!r}: not an option; allowed: {_ALLOWED}')
  if '://' in name:
    raise ValueError(f'data.tokenizer={name!r}: remote paths are not read; copy the model to a '
                     'local file')
  try:
    with open(os.path.expanduser(name), 'rb') as f:
      model_proto = f.read()
  except FileNotFoundError:
    raise ValueError(f'data.tokenizer={name!r}: no such file') from None
  except OSError as e:
    raise ValueError(f'data.tokenizer={name!r}: cannot read it ({e.strerror})') from None
  try:
    return SentencePieceTokenizer(model_proto)
  except ValueError as e:
    raise ValueError(f'data.tokenizer={name!r}: {e}') from None


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
  # SentencePiece trains on sentences of at most max_sentence_length bytes, so documents go in
  # line by line; line breaks are then encoded through byte fallback.
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    *,
    model_type: str = 'unigram',
    character_coverage: float = 0.9995,
    normalization: str = 'identity',
    input_sentence_size: int = 1_000_000,
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on the lines of ``texts`` and writes it to ``model_path``.

  The model has T5's special ids (pad 0, eos 1, unk 2, no bos) and byte fallback, so any text
  encodes without unk.

  Args:
    texts: documents; each non-blank line is one training sentence.
    model_path: where the ``.model`` file is written.
    vocab_size: number of pieces, the 3 special ids and 256 byte pieces included; the
      tokenizer's vocabulary adds 100 sentinels to it.
    model_type: 'unigram' (T5's) or 'bpe'.
    character_coverage: fraction of characters covered by single-character pieces; the rarest
      characters are left to byte fallback.
    normalization: 'identity' keeps the text as is, so decode(encode(text)) == text for any
      text without U+2581 (SentencePiece's space mark); 'nmt_nfkc' is T5's: NFKC, whitespace
      runs collapsed, and a space before the first word.
    input_sentence_size: at most this many lines, sampled at random, are trained on.

  Returns:
    The trained model as a tokenizer.

  Raises:
    ValueError: one line, for a vocabulary too small for the byte pieces or too large for the
      text, an unknown option, or no text.
  """
  minimum = _BYTE_OFFSET + _NUM_BYTES + 1
  if vocab_size < minimum:
    raise ValueError(f'vocab_size={vocab_size}: must be at least {minimum} (3 special ids and '
                     '256 byte pieces leave no room for text pieces below that)')
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r}: not an option; allowed: '
                     f'{", ".join(map(repr, NORMALIZATIONS))}')
  lines = _training_lines(texts)
  first = next(lines, None)
  if first is None:
    raise ValueError('no text to train on')
  lossless = normalization == 'identity'
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=True,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=not lossless,
        add_dummy_prefix=not lossless,
        # Indentation (source code) becomes pieces of its own rather than one id per space.
        allow_whitespace_only_pieces=lossless,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count(),
        minloglevel=1,
    )
  except RuntimeError as e:
    # 'INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high (...). ...'
    raise ValueError(f"SentencePiece training: {str(e).rsplit('] ', 1)[-1].strip()}") from None
  with open(model_path, 'wb') as f:
    f.write(model.getvalue())
  return SentencePieceTokenizer(model.getvalue())
