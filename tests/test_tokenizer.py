import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchmoe.tokenizer import ByteTokenizer, make_tokenizer

TOKENIZER = ByteTokenizer()


def test_special_ids_and_vocab_layout():
  assert (TOKENIZER.pad_id, TOKENIZER.eos_id, TOKENIZER.vocab_size) == (0, 1, 359)
  assert TOKENIZER.num_sentinels == 100
  sentinels = [TOKENIZER.sentinel_id(i) for i in range(TOKENIZER.num_sentinels)]
  # T5 convention: sentinels are the top ids, <extra_id_0> the very highest.
  assert sentinels == list(range(TOKENIZER.vocab_size - 1, TOKENIZER.vocab_size - 101, -1))
  every_byte = bytes(range(256)).decode('latin-1')  # 256 chars whose UTF-8 uses all byte values
  byte_ids = set(TOKENIZER.encode(every_byte).tolist())
  assert max(byte_ids) < min(sentinels)
  assert min(byte_ids) > max(TOKENIZER.pad_id, TOKENIZER.eos_id)


@pytest.mark.parametrize('index', [-1, 100])
def test_sentinel_index_out_of_range(index):
  with pytest.raises(IndexError):
    TOKENIZER.sentinel_id(index)


@pytest.mark.parametrize(
    'text', ['', 'hello world', 'héllo wörld — 日本語 🙂', 'tab\tnew\nline\x00nul']
)
def test_round_trip_examples(text):
  ids = TOKENIZER.encode(text)
  assert ids.dtype == np.int32
  assert len(ids) == len(text.encode('utf-8'))  # one id per byte, no EOS
  assert TOKENIZER.decode(ids) == text


@settings(max_examples=200, deadline=None, database=None)
@given(st.text())
def test_round_trip_any_text(text):
  assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary())
def test_invalid_utf8_decodes_with_replacement(raw):
  ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int32) + 3
  assert TOKENIZER.decode(ids) == raw.decode('utf-8', errors='replace')


def test_decode_skips_pad_and_eos_and_renders_sentinels():
  ids = [
      TOKENIZER.pad_id,
      *TOKENIZER.encode('ab'),
      TOKENIZER.sentinel_id(0),
      *TOKENIZER.encode('é'),
      TOKENIZER.sentinel_id(42),
      TOKENIZER.eos_id,
      TOKENIZER.pad_id,
  ]
  assert TOKENIZER.decode(np.array(ids)) == 'ab<extra_id_0>é<extra_id_42>'


def test_sentinel_splits_a_multibyte_character():
  snowman = TOKENIZER.encode('☃')  # 3 UTF-8 bytes
  ids = [*snowman[:2], TOKENIZER.sentinel_id(1), snowman[2]]
  assert TOKENIZER.decode(ids) == '\ufffd<extra_id_1>\ufffd'


def test_make_tokenizer():
  assert make_tokenizer('byte').vocab_size == 359
  with pytest.raises(ValueError, match=r'data\.tokenizer.*byte'):
    make_tokenizer('sentencepiece')
