"""Byte-level tokenizer with T5-style sentinel ids.

Id layout (vocab_size = 359):
  0        pad
  1        eos
  2        unk (never produced by ``encode``; kept so the layout matches T5)
  3..258   the 256 UTF-8 byte values, shifted by 3
  259..358 100 sentinels, highest id first: sentinel_id(i) = vocab_size - 1 - i
"""

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
_BYTE_OFFSET = 3
_NUM_BYTES = 256
_NUM_SENTINELS = 100

TOKENIZER_NAMES = ('byte',)


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
    if not 0 <= i < _NUM_SENTINELS:
      raise IndexError(f'sentinel index {i} outside [0, {_NUM_SENTINELS})')
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


def make_tokenizer(name: str) -> ByteTokenizer:
  """Returns the tokenizer selected by ``config.data.tokenizer``."""
  if name == 'byte':
    return ByteTokenizer()
  raise ValueError(
      f'Unknown data.tokenizer {name!r}; allowed values: {", ".join(TOKENIZER_NAMES)}.')
