import json
import pathlib
import re
import sysconfig

import grain
import ml_collections
import numpy as np
import pytest

from switchmoe import data
from switchmoe.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
DECODER_KEYS = {'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights'}
ENC_DEC_KEYS = DECODER_KEYS | {'encoder_input_tokens'}


def make_config(data_dir, arch='encoder_decoder', seed=0, **data_overrides):
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.model = ml_collections.ConfigDict({'arch': arch, 'vocab_size': 384})
  config.data = ml_collections.ConfigDict(
      {
          'source': 'stdlib',
          'data_dir': data_dir,
          'tokenizer': 'byte',
          'inputs_length': 128,
          'targets_length': 32 if arch == 'encoder_decoder' else 128,
          'noise_density': 0.15,
          'mean_noise_span_length': 3.0,
          'num_workers': 0,
      }
  )
  config.data.update(data_overrides)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def batches_differ(batches_a, batches_b):
  return any(not np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in a)


# ----------------------------------------------------------------------------- corpus


def test_split_passages_sizes_and_content():
  rng = np.random.default_rng(0)
  blocks = [
      '\n'.join('x' * int(n) for n in rng.integers(1, 300, size=rng.integers(1, 30)))
      for _ in range(60)
  ]
  blocks.append('y' * 10_000)  # one over-long line
  text = '\n\n  \n'.join(blocks)
  passages = data.split_passages(text, min_chars=1024, max_chars=4096)
  assert all(len(p) <= 4096 for p in passages)
  for passage, next_passage in zip(passages, passages[1:]):
    # A short passage is only cut because the next block did not fit.
    assert len(passage) >= 1024 or len(passage) + 2 + len(next_passage) > 4096
  # Only whitespace at the cuts may be lost.
  assert re.sub(r'\s', '', ''.join(passages)) == re.sub(r'\s', '', text)


def test_corpus_splits_follow_file_hash(corpus):
  stdlib_dir = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = data.stdlib_source_files(stdlib_dir)
  assert not any(part in ('test', 'tests', 'site-packages') for f in files for part in f.parts)
  validation_files = [f for f in files if data.is_validation_file(f)]
  assert 0 < len(validation_files) < 0.05 * len(files)

  def num_passages(paths):
    texts = [(stdlib_dir / p).read_bytes().decode('utf-8', 'replace') for p in paths]
    return sum(len(data.split_passages(text)) for text in texts)

  # Every passage of a validation file, and only those, is in the validation split.
  assert len(corpus['validation']) == num_passages(validation_files) > 0
  assert len(corpus['train']) + len(corpus['validation']) == num_passages(files)
  assert isinstance(corpus['train'][0]['text'], bytes)


def test_corpus_build_is_idempotent_and_complete(data_dir, corpus):
  again = data.load_stdlib_corpus(data_dir)
  assert {k: len(v) for k, v in again.items()} == {k: len(v) for k, v in corpus.items()}
  assert again['train'][5]['text'] == corpus['train'][5]['text']
  assert not list(pathlib.Path(data_dir).rglob('incomplete*'))


def test_resolve_data_dir(monkeypatch, tmp_path):
  assert data.resolve_data_dir(str(tmp_path)) == str(tmp_path)
  monkeypatch.setenv('SWITCHMOE_DATA_DIR', str(tmp_path / 'env'))
  assert data.resolve_data_dir('') == str(tmp_path / 'env')
  monkeypatch.delenv('SWITCHMOE_DATA_DIR')
  assert data.resolve_data_dir('') == str(pathlib.Path.home() / '.cache/switchmoe/tfds')


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_batch_keys_shapes_dtypes(data_dir, corpus, arch):
  config = make_config(data_dir, arch)
  train = take(data.make_train_iterator(config, batch_size=4), 2)
  evaluation = data.make_eval_batches(config, batch_size=4, num_batches=2)
  targets_length = config.data.targets_length
  for batch in train + evaluation:
    assert batch.keys() == (ENC_DEC_KEYS if arch == 'encoder_decoder' else DECODER_KEYS)
    for key in DECODER_KEYS:
      assert batch[key].shape == (4, targets_length)
    assert batch['decoder_input_tokens'].dtype == np.int32
    assert batch['decoder_target_tokens'].dtype == np.int32
    assert batch['decoder_loss_weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
    np.testing.assert_array_equal(
        batch['decoder_input_tokens'][:, 1:], batch['decoder_target_tokens'][:, :-1]
    )
    np.testing.assert_array_equal(
        batch['decoder_loss_weights'], batch['decoder_target_tokens'] != 0)
    for tokens in batch.values():
      assert tokens.min() >= 0 and tokens.max() < TOKENIZER.vocab_size
    if arch == 'encoder_decoder':
      assert batch['encoder_input_tokens'].shape == (4, config.data.inputs_length)
      assert batch['encoder_input_tokens'].dtype == np.int32
      # Every example has inputs and targets, each closed by EOS.
      assert np.all((batch['encoder_input_tokens'] == TOKENIZER.eos_id).sum(1) == 1)
      assert np.all((batch['decoder_target_tokens'] == TOKENIZER.eos_id).sum(1) == 1)
    else:
      assert batch['decoder_loss_weights'].all()  # packed rows have no padding


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_train_iterator_is_deterministic_per_seed(data_dir, corpus, arch):
  first = take(data.make_train_iterator(make_config(data_dir, arch, seed=1), batch_size=4), 3)
  second = take(data.make_train_iterator(make_config(data_dir, arch, seed=1), batch_size=4), 3)
  other_seed = take(data.make_train_iterator(make_config(data_dir, arch, seed=2), batch_size=4), 3)
  assert_batches_equal(first, second)
  assert batches_differ(first, other_seed)


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_train_iterator_checkpoint_restore(data_dir, corpus, arch):
  config = make_config(data_dir, arch)
  iterator = data.make_train_iterator(config, batch_size=4)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 4)

  restored = data.make_train_iterator(config, batch_size=4)
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), expected)


def test_decoder_checkpoint_across_row_shuffle_windows(data_dir, corpus):
  # 300 batches of 4 rows cross the first 1024-row shuffle window, whose restore re-packs from the
  # middle of a document.
  config = make_config(data_dir, 'decoder')
  iterator = data.make_train_iterator(config, batch_size=4)
  take(iterator, 300)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 3)
  restored = data.make_train_iterator(config, batch_size=4)
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected)


def test_packed_rows_concatenate_and_restore_anywhere():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 20, size=40)
  documents = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)]
  stream = np.concatenate(documents)
  packed = data._PackedRows(grain.MapDataset.source(documents).to_iter_dataset(), length=7)
  iterator = iter(packed)
  states, rows = [], []
  for _ in range(len(stream) // 7):
    states.append(json.loads(json.dumps(iterator.get_state())))
    rows.append(next(iterator))
  np.testing.assert_array_equal(np.concatenate(rows), stream[: len(rows) * 7])
  for i, state in enumerate(states):
    restored = iter(packed)
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored), rows[i])


def test_multiprocess_workers_give_the_same_batches(data_dir, corpus):
  # Worker processes take ~2 s each to start, so only the decoder path (nested state) is restored.
  for arch in ['encoder_decoder', 'decoder']:
    config = make_config(data_dir, arch)
    expected = take(data.make_train_iterator(config, batch_size=4), 5)
    config.data.num_workers = 2
    iterator = data.make_train_iterator(config, batch_size=4)
    try:
      assert_batches_equal(take(iterator, 2), expected[:2])
      state = json.loads(json.dumps(iterator.get_state()))
    finally:
      iterator.close()
  restored = data.make_train_iterator(config, batch_size=4)
  try:
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected[2:])
  finally:
    restored.close()


def test_process_slices_are_disjoint_and_cover():
  slices = [list(data._process_slice(list(range(103)), i, 4)) for i in range(4)]
  assert sorted(sum(slices, [])) == list(range(103))
  with pytest.raises(ValueError, match='process_index'):
    data._process_slice(list(range(10)), 4, 4)


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_processes_read_different_data(data_dir, corpus, arch):
  config = make_config(data_dir, arch)
  per_process = [
      take(data.make_train_iterator(config, batch_size=4, process_index=i, process_count=2), 2)
      for i in range(2)
  ]
  assert batches_differ(*per_process)


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_eval_batches_are_fixed_and_from_validation(data_dir, corpus, arch):
  config = make_config(data_dir, arch)
  batches = data.make_eval_batches(config, batch_size=4, num_batches=3)
  other_seed = data.make_eval_batches(
      make_config(data_dir, arch, seed=7), batch_size=4, num_batches=3)
  assert_batches_equal(batches, other_seed)  # independent of the training seed

  validation = corpus['validation']
  validation_text = b'\x00'.join(validation[i]['text'] for i in range(len(validation)))
  key = 'encoder_input_tokens' if arch == 'encoder_decoder' else 'decoder_target_tokens'
  first_sentinel = TOKENIZER.sentinel_id(TOKENIZER.num_sentinels - 1)
  for batch in batches:
    for row in batch[key]:
      # Pieces between special tokens (EOS, sentinels, padding) are verbatim validation text.
      pieces = np.split(row, np.flatnonzero((row < 3) | (row >= first_sentinel)))
      for piece in pieces:
        piece_bytes = bytes((piece[(piece >= 3) & (piece < first_sentinel)] - 3).tolist())
        assert piece_bytes in validation_text


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('source', 'c4', r'data\.source'),
        ('tokenizer', 'sentencepiece', r'data\.tokenizer'),
        ('targets_length', 8, r'data\.targets_length'),
    ],
)
def test_bad_config_raises(data_dir, corpus, field, value, message):
  config = make_config(data_dir, **{field: value})
  with pytest.raises(ValueError, match=message):
    data.make_train_iterator(config, batch_size=4)
  with pytest.raises(ValueError, match=message):
    data.make_eval_batches(config, batch_size=4, num_batches=1)


def test_bad_model_config_raises(data_dir, corpus):
  config = make_config(data_dir, arch='encoder_only')
  with pytest.raises(ValueError, match=r'model\.arch'):
    data.make_train_iterator(config, batch_size=4)
  config = make_config(data_dir)
  config.model.vocab_size = 300
  with pytest.raises(ValueError, match=r'model\.vocab_size'):
    data.make_train_iterator(config, batch_size=4)
