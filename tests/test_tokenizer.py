import importlib.util
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from switchmoe import preprocessing
from switchmoe.tokenizer import ByteTokenizer, make_tokenizer, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  with pytest.raises(ValueError, match=r'data\.tokenizer.*byte.*SentencePiece'):
    make_tokenizer('sentencepiece')


# ----------------------------------------------------------------------------- SentencePiece

SPM_VOCAB = 400  # 3 special ids + 256 byte pieces + room for text pieces
NUM_TRAINING_LINES = 400


def training_texts() -> list[str]:
  """A few documents of English-like prose and Python-like code, the same on every call."""
  rng = random.Random(0)
  words = ('the quick brown fox jumps over lazy dog model expert router token capacity layer '
           'switch transformer training batch sparse dense mixture gate').split()
  lines = []
  for i in range(NUM_TRAINING_LINES):
    sentence = ' '.join(rng.choice(words) for _ in range(rng.randint(4, 12)))
    lines.append(f'def f{i}(x):\n    return x + {i}' if i % 4 == 0 else sentence.capitalize() + '.')
  return ['\n'.join(lines[i:i + 20]) for i in range(0, len(lines), 20)]


@pytest.fixture(scope='module')
def spm_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('spm') / 'tiny.model')
  train_sentencepiece(training_texts(), path, SPM_VOCAB)
  return path


@pytest.fixture(scope='module')
def spm(spm_path):
  return make_tokenizer(spm_path)


@pytest.fixture(scope='module')
def spm_t5(tmp_path_factory):
  """T5's normalization: NFKC, whitespace runs collapsed, a dummy space before the first word."""
  path = str(tmp_path_factory.mktemp('spm') / 't5_style.model')
  return train_sentencepiece(training_texts(), path, SPM_VOCAB, normalization='nmt_nfkc')


def test_sentencepiece_id_layout(spm):
  assert (spm.pad_id, spm.eos_id, spm.unk_id) == (0, 1, 2)
  assert spm.piece_size == SPM_VOCAB
  assert spm.vocab_size == SPM_VOCAB + 100
  assert spm.num_sentinels == 100
  sentinels = [spm.sentinel_id(i) for i in range(spm.num_sentinels)]
  assert sentinels == list(range(spm.vocab_size - 1, spm.piece_size - 1, -1))
  ids = spm.encode('The quick brown fox. 日本語 🙂')
  assert ids.min() > spm.unk_id and ids.max() < spm.piece_size  # byte fallback: no unk
  with pytest.raises(IndexError):
    spm.sentinel_id(100)


@pytest.mark.parametrize('text', [
    '',
    'The quick brown fox jumps over the lazy dog.',
    'héllo wörld — 日本語 🙂',  # characters the model never saw: byte fallback
    'def f(x):\n    return x  # two  spaces\n\ttab\r\n\x00',
])
def test_sentencepiece_round_trip(spm, text):
  ids = spm.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert spm.eos_id not in ids.tolist()
  assert spm.decode(ids) == text


@settings(max_examples=100, deadline=None, database=None)
@given(st.text().filter(lambda t: '\u2581' not in t))  # U+2581 is SentencePiece's space mark
def test_sentencepiece_round_trip_any_text(spm, text):
  assert spm.decode(spm.encode(text)) == text


def test_sentencepiece_decode_renders_sentinels(spm):
  ids = [spm.pad_id, *spm.encode('ab'), spm.sentinel_id(0), *spm.encode(' c'),
         spm.sentinel_id(42), spm.eos_id, spm.vocab_size, -1, spm.pad_id]
  assert spm.decode(np.array(ids)) == 'ab<extra_id_0> c<extra_id_42>\ufffd\ufffd'


def test_t5_normalization_keeps_the_space_after_a_sentinel(spm_t5):
  assert spm_t5.decode(spm_t5.encode('  The   quick fox ')) == 'The quick fox'
  ids = [*spm_t5.encode('The quick'), spm_t5.sentinel_id(0), *spm_t5.encode('fox')]
  # 'fox' encodes with its dummy-prefix space, which is text again after the sentinel.
  assert spm_t5.decode(ids) == 'The quick<extra_id_0> fox'


def test_sentencepiece_pickles_without_the_processor(spm, spm_path):
  texts = ['The quick brown fox.', 'héllo — 🙂', 'def f(x):\n    return x']
  before = [spm.encode(t) for t in texts]
  blob = pickle.dumps(spm)
  assert len(blob) < os.path.getsize(spm_path) + 1000  # the model bytes, not a processor
  restored = pickle.loads(blob)
  for text, ids in zip(texts, before):
    np.testing.assert_array_equal(restored.encode(text), ids)
  assert restored.vocab_size == spm.vocab_size
  assert restored.decode(before[1]) == texts[1]


def test_span_corruption_with_sentencepiece(spm):
  tokens = spm.encode(' '.join(training_texts()[:2]))[:200]
  inputs, targets = preprocessing.span_corruption(tokens, spm, np.random.default_rng(0))
  assert inputs[-1] == targets[-1] == spm.eos_id
  sentinel_mask = targets >= spm.piece_size
  assert sentinel_mask.any() and targets[0] == spm.sentinel_id(0)
  assert (targets[sentinel_mask] < spm.vocab_size).all()
  assert '<extra_id_0>' in spm.decode(inputs) and '<extra_id_0>' in spm.decode(targets)
  # Putting each span back in place of its sentinel restores the tokens.
  spans = np.split(targets[:-1], np.flatnonzero(sentinel_mask[:-1]))[1:]
  restored = []
  for token in inputs[:-1]:
    restored.extend(spans[spm.vocab_size - 1 - token][1:] if token >= spm.piece_size else [token])
  np.testing.assert_array_equal(restored, tokens)


def _one_line_error(name):
  with pytest.raises(ValueError) as info:
    make_tokenizer(name)
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'data.tokenizer={name!r}: ')
  return message


def test_make_tokenizer_file_errors(tmp_path):
  assert _one_line_error(str(tmp_path / 'missing.model')).endswith('no such file')
  assert 'cannot read' in _one_line_error(str(tmp_path))
  text_file = tmp_path / 'notes.txt'
  text_file.write_text('a text file, not a model\n' * 20)
  assert _one_line_error(str(text_file)).endswith('not a SentencePiece model')
  empty = tmp_path / 'empty.model'
  empty.write_bytes(b'')
  assert _one_line_error(str(empty)).endswith('not a SentencePiece model')
  assert 'copy the model' in _one_line_error('gs://t5-data/vocabs/cc_all.32000/sentencepiece.model')


def test_make_tokenizer_rejects_other_special_ids(tmp_path):
  path = tmp_path / 'default_ids.model'
  # SentencePiece's own defaults: unk 0, bos 1, eos 2, no pad.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(training_texts()), model_prefix=str(path.with_suffix('')),
      vocab_size=100, minloglevel=2)
  assert 'pad_id=-1, eos_id=2' in _one_line_error(str(path))


def test_train_sentencepiece_errors(tmp_path):
  path = str(tmp_path / 'x.model')
  with pytest.raises(ValueError, match=r'^vocab_size=100: must be at least 260'):
    train_sentencepiece(training_texts(), path, 100)
  with pytest.raises(ValueError, match=r'^SentencePiece training: Vocabulary size too high'):
    train_sentencepiece(training_texts(), path, 5000)
  with pytest.raises(ValueError, match=r'^no text to train on$'):
    train_sentencepiece(['', ' \n '], path, 1000)
  assert not os.path.exists(path)


@pytest.fixture(scope='module')
def script():
  """scripts/train_tokenizer.py as a module, for its in-process checks."""
  spec = importlib.util.spec_from_file_location(
      'train_tokenizer', os.path.join(REPO, 'scripts', 'train_tokenizer.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('args, message', [
    (['--output={tmp}/notes.txt/spm.model'], r'^error: --output=.*: .*notes\.txt is a file, not'),
    (['--output={tmp}/notes.txt/new/spm.model'], r'^error: --output=.*: .*notes\.txt is a file'),
    (['--output={tmp}'], r'^error: --output=.*: is a folder'),
    (['--output={tmp}/new/x.model', '--config.data.bogus=1'], r"^error: data\.bogus='1': unknown"),
])
def test_script_bad_input(script, tmp_path, capsys, args, message):
  (tmp_path / 'notes.txt').write_text('a file where a folder is expected\n')
  assert script.main([a.format(tmp=tmp_path) for a in args]) == 2
  err = capsys.readouterr().err
  assert re.match(message, err.strip()) and err.count('\n') == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']  # nothing written


def test_script_vocab_rounding(script):
  assert [script.model_vocab_size(v) for v in (359, 32100, 8100, 128)] == [384, 32128, 8192, 128]


def test_script_trains_on_the_stdlib_corpus(data_dir, corpus, tmp_path):
  output = tmp_path / 'spm' / 'stdlib.model'  # its folder is made
  done = subprocess.run(
      [sys.executable, 'scripts/train_tokenizer.py', '--config=configs/switch_tiny.py',
       f'--output={output}', '--vocab_size=1000', '--max_documents=60', '--max_chars=100000',
       f'--config.data.data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'characters in all' in done.stderr
  assert done.stdout.rstrip().endswith(
      f'--config.data.tokenizer={output} --config.model.vocab_size=1152')
  tokenizer = make_tokenizer(str(output))
  assert tokenizer.vocab_size == 1100
  text = 'def main(argv):\n    return 0\n'
  assert tokenizer.decode(tokenizer.encode(text)) == text
