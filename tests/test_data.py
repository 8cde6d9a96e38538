import json

import grain
import numpy as np
import pytest

from switchmoe import data
from switchmoe.config import default_config
from switchmoe.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
TARGET_KEYS = {'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights'}
ENC_DEC_KEYS = TARGET_KEYS | {'encoder_input_tokens'}
DECODER_KEYS = TARGET_KEYS | {'decoder_segment_ids', 'decoder_positions'}


def make_config(data_dir, arch='encoder_decoder', seed=0, **data_overrides):
  config = default_config()
  config.seed = seed
  config.model.arch = arch
  config.data.update(
      data_dir=data_dir,
      objective='span_corruption' if arch == 'encoder_decoder' else 'causal_lm',
      inputs_length=128,
      targets_length=32 if arch == 'encoder_decoder' else 128,
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


def assert_resumes_exactly(config, iterator, num_batches):
  """A fresh iterator restored from ``iterator``'s (JSON round-tripped) state yields its next
  ``num_batches`` batches."""
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, num_batches)
  restored = data.make_train_iterator(config, batch_size=len(expected[0]['decoder_input_tokens']))
  restored.set_state(state)
  assert_batches_equal(take(restored, num_batches), expected)


def batches_differ(batches_a, batches_b):
  return any(not np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in a)


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_batch_keys_shapes_dtypes(data_dir, corpus, arch):
  config = make_config(data_dir, arch)
  train = take(data.make_train_iterator(config, batch_size=4), 2)
  evaluation = data.make_eval_batches(config, batch_size=4, num_batches=2)
  targets_length = config.data.targets_length
  for batch in train + evaluation:
    assert batch.keys() == (ENC_DEC_KEYS if arch == 'encoder_decoder' else DECODER_KEYS)
    for key in TARGET_KEYS:
      assert batch[key].shape == (4, targets_length)
    assert batch['decoder_input_tokens'].dtype == np.int32
    assert batch['decoder_target_tokens'].dtype == np.int32
    assert batch['decoder_loss_weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
    # Shifted right by one, except where a new segment starts (decoder-only packing).
    starts = batch.get('decoder_positions', np.ones_like(batch['decoder_input_tokens']))[:, 1:] == 0
    np.testing.assert_array_equal(
        batch['decoder_input_tokens'][:, 1:],
        np.where(starts, 0, batch['decoder_target_tokens'][:, :-1]))
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
      for key in ('decoder_segment_ids', 'decoder_positions'):
        assert batch[key].shape == (4, targets_length) and batch[key].dtype == np.int32


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
  assert_resumes_exactly(config, iterator, 4)


def test_decoder_checkpoint_across_row_shuffle_windows(data_dir, corpus):
  # 300 batches of 4 rows cross the first 1024-row shuffle window, whose restore re-packs from the
  # middle of a document.
  config = make_config(data_dir, 'decoder')
  iterator = data.make_train_iterator(config, batch_size=4)
  take(iterator, 300)
  assert_resumes_exactly(config, iterator, 3)


def test_packed_rows_concatenate_and_restore_anywhere():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 20, size=40)
  documents = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)]
  stream = np.concatenate(documents)
  document_of_token = np.repeat(np.arange(len(documents)), lengths)
  packed = data.PackedRows(grain.MapDataset.source(documents).to_iter_dataset(), length=7)
  iterator = iter(packed)
  states, rows = [], []
  for _ in range(len(stream) // 7):
    states.append(json.loads(json.dumps(iterator.get_state())))
    rows.append(next(iterator))
  np.testing.assert_array_equal(np.concatenate([r['tokens'] for r in rows]),
                                stream[: len(rows) * 7])
  for i, row in enumerate(rows):
    # Segments 1, 2, ... follow exactly the document pieces of the row.
    documents_in_row = document_of_token[7 * i : 7 * (i + 1)]
    expected = np.cumsum(np.concatenate([[1], documents_in_row[1:] != documents_in_row[:-1]]))
    np.testing.assert_array_equal(row['segment_ids'], expected)
  for i, state in enumerate(states):
    restored = iter(packed)
    restored.set_state(state)
    restored_row = next(restored)
    for key in ('tokens', 'segment_ids'):
      np.testing.assert_array_equal(restored_row[key], rows[i][key])


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
  texts = [validation[i]['text'] for i in range(len(validation))]
  # Encoder-decoder rows run on across documents (T5 joins them); decoder segments must not.
  joined = b''.join(texts * 2) if arch == 'encoder_decoder' else b'\x00'.join(texts)
  key = 'encoder_input_tokens' if arch == 'encoder_decoder' else 'decoder_target_tokens'
  first_sentinel = TOKENIZER.sentinel_id(TOKENIZER.num_sentinels - 1)
  for batch in batches:
    for i, row in enumerate(batch[key]):
      special = (row < 3) | (row >= first_sentinel)
      if 'decoder_positions' in batch:
        special |= batch['decoder_positions'][i] == 0
      # Pieces between special tokens (EOS, sentinels, padding, segment starts) are verbatim
      # validation text.
      for piece in np.split(row, np.flatnonzero(special)):
        piece_bytes = bytes((piece[(piece >= 3) & (piece < first_sentinel)] - 3).tolist())
        assert piece_bytes in joined


@pytest.mark.parametrize(
    'field, value, message, pipelines',
    [
        ('source', 'c4/en:3.0.1',
         r"^data\.source='c4/en:3\.0\.1': no prepared TFDS dataset .*tfds build", 'train eval'),
        ('tokenizer', 'sentencepiece', r'data\.tokenizer', 'train eval'),
        ('train_split', 'nope', r"^data\.train_split='nope': .* has splits train, validation$",
         'train'),
        ('eval_split', 'test', r"^data\.eval_split='test': .* has splits train, validation$",
         'eval'),
        ('text_field', 'body', r"^data\.text_field='body': not a feature .* it has text$",
         'train eval'),
        ('targets_length', 8, r'data\.targets_length', 'train eval'),
    ],
)
def test_bad_config_raises(data_dir, corpus, field, value, message, pipelines):
  config = make_config(data_dir, **{field: value})
  if 'train' in pipelines:
    with pytest.raises(ValueError, match=message):
      data.make_train_iterator(config, batch_size=4)
  if 'eval' in pipelines:
    with pytest.raises(ValueError, match=message):
      data.make_eval_batches(config, batch_size=4, num_batches=1)


def test_bad_model_config_raises(data_dir, corpus):
  # model.arch is checked once, by config.validate (test_config); the pipelines check what
  # only they can: the vocabulary against the tokenizer.
  config = make_config(data_dir)
  config.model.vocab_size = 300
  with pytest.raises(ValueError, match=r'model\.vocab_size'):
    data.make_train_iterator(config, batch_size=4)


def test_decoder_prefix_lm_batches(data_dir, corpus):
  config = make_config(data_dir, 'decoder', objective='prefix_lm')
  iterator = data.make_train_iterator(config, batch_size=4)
  for batch in take(iterator, 3):
    assert batch.keys() == DECODER_KEYS | {'decoder_causal_attention'}
    for row in range(4):
      segments = batch['decoder_segment_ids'][row]
      for segment in np.unique(segments):
        at = segments == segment
        weights = batch['decoder_loss_weights'][row][at]
        bidirectional = batch['decoder_causal_attention'][row][at]
        prefix = len(weights) - int(weights.sum())
        # The segment is a prefix (not predicted) then targets; the prefix plus one sees itself.
        np.testing.assert_array_equal(weights, np.arange(len(weights)) >= prefix)
        np.testing.assert_array_equal(bidirectional, np.arange(len(weights)) <= prefix)
        assert prefix >= 1 or len(weights) == 1
  assert_resumes_exactly(config, iterator, 2)


def test_encoder_decoder_prefix_lm_batches(data_dir, corpus):
  config = make_config(data_dir, objective='prefix_lm', targets_length=64)
  validation = corpus['validation']  # evaluation reads documents in stored order
  joined = b''.join(validation[i]['text'] for i in range(len(validation)))
  for batch in data.make_eval_batches(config, batch_size=4, num_batches=2):
    for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
      inputs, targets = inputs[inputs > 0], targets[targets > 0]
      assert inputs[-1] == TOKENIZER.eos_id and targets[-1] == TOKENIZER.eos_id
      # Prefix and continuation are one verbatim stretch of 127 bytes of the corpus.
      stretch = np.concatenate([inputs[:-1], targets[:-1]])
      assert len(stretch) == config.data.inputs_length - 1
      assert bytes((stretch - 3).tolist()) in joined


# ----------------------------------------------------------------------------- supervised


def write_task(folder, n=40):
  """A task's .jsonl: n input -> target records; every 7th input is too long for the encoder."""
  folder.mkdir(parents=True, exist_ok=True)
  records = [{'inputs': f'question {i}: ' + ('why ' * 30 if i % 7 == 0 else 'what is it?'),
              'targets': f'answer {i}', 'id': i} for i in range(n)]
  (folder / 'task.jsonl').write_text('\n'.join(json.dumps(r) for r in records), encoding='utf-8')
  return records


def supervised_config(tmp_path, **fields):
  fields = {'files': str(tmp_path / 'task' / '*.jsonl'), **fields}
  return make_config(str(tmp_path / 'tfds'), source='files', objective='supervised',
                     inputs_length=64, targets_length=16, **fields)


def side_text(ids):
  """The text of one side of an example: its real tokens before EOS, as bytes."""
  ids = ids[ids > 0]
  assert ids[-1] == TOKENIZER.eos_id
  return TOKENIZER.decode(ids[:-1])


def test_supervised_batches_pair_each_input_with_its_target(tmp_path):
  records = write_task(tmp_path / 'task')
  config = supervised_config(tmp_path)
  answer = {r['inputs'].encode()[:63].decode(): r['targets'] for r in records}
  iterator = data.make_train_iterator(config, batch_size=4)
  seen = set()
  for batch in take(iterator, 10):
    assert batch['encoder_input_tokens'].shape == (4, 64)
    for i in range(4):
      question, target = (side_text(batch['encoder_input_tokens'][i]),
                          side_text(batch['decoder_target_tokens'][i]))
      assert answer[question] == target  # the input cut to 63 tokens + EOS, its own target
      seen.add(question)
      length = len(target.encode()) + 1
      np.testing.assert_array_equal(batch['decoder_loss_weights'][i],
                                    np.arange(16) < length)
      np.testing.assert_array_equal(batch['decoder_input_tokens'][i][1:length],
                                    batch['decoder_target_tokens'][i][:length - 1])
      assert batch['decoder_input_tokens'][i][0] == 0
  assert len(seen) >= 30  # shuffled whole examples, not one repeated
  assert_resumes_exactly(config, iterator, 3)
  held_out = data.make_eval_batches(config, batch_size=2, num_batches=2)
  for batch in held_out:
    for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
      assert answer[side_text(inputs)] == side_text(targets)
  assert not {side_text(b) for batch in held_out for b in batch['encoder_input_tokens']} & seen


@pytest.mark.parametrize('content, message', [
    ('{"inputs": "a", "answer": "b"}\n{"inputs": "c", "answer": "d"}',
     r"task\.jsonl line 1: no field 'targets' \(has: inputs, answer\); set "
     r"data\.inputs_field / targets_field$"),
    ('{"inputs": "a", "targets": 3}', r"task\.jsonl line 1: field 'targets' is int, not a string$"),
])
def test_supervised_bad_task_file_raises_one_line(tmp_path, content, message):
  (tmp_path / 'task').mkdir()
  (tmp_path / 'task' / 'task.jsonl').write_text(content, encoding='utf-8')
  with pytest.raises(Exception, match=message) as error:
    data.make_train_iterator(supervised_config(tmp_path), batch_size=2)
  assert '\n' not in str(error.value)


def test_supervised_reads_jsonl_only(tmp_path):
  (tmp_path / 'task').mkdir()
  (tmp_path / 'task' / 'notes.txt').write_text('one\n\ntwo', encoding='utf-8')
  config = supervised_config(tmp_path, files=str(tmp_path / 'task' / '*.txt'))
  with pytest.raises(Exception, match=r"notes\.txt: a \.txt file has no fields 'inputs', "
                                      r"'targets'; data\.objective='supervised' reads \.jsonl"):
    data.make_train_iterator(config, batch_size=2)


def test_supervised_other_field_names(tmp_path):
  (tmp_path / 'task').mkdir()
  rows = [{'question': f'q{i}', 'answer': f'a{i}'} for i in range(60)]
  (tmp_path / 'task' / 'qa.jsonl').write_text('\n'.join(map(json.dumps, rows)), encoding='utf-8')
  config = supervised_config(tmp_path, inputs_field='question', targets_field='answer')
  batch = next(data.make_train_iterator(config, batch_size=4))
  for inputs, targets in zip(batch['encoder_input_tokens'], batch['decoder_target_tokens']):
    assert side_text(inputs)[1:] == side_text(targets)[1:]  # q17 -> a17
