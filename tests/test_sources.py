"""Corpora: the embedded stdlib corpus, local files, registered TFDS datasets, and their errors."""

import gzip
import json
import pathlib
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from switchmoe import data, sources
from switchmoe.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- corpus


def test_split_passages_sizes_and_content():
  rng = np.random.default_rng(0)
  blocks = [
      '\n'.join('x' * int(n) for n in rng.integers(1, 300, size=rng.integers(1, 30)))
      for _ in range(60)
  ]
  blocks.append('y' * 10_000)  # one over-long line
  text = '\n\n  \n'.join(blocks)
  passages = sources.split_passages(text, min_chars=1024, max_chars=4096)
  assert all(len(p) <= 4096 for p in passages)
  for passage, next_passage in zip(passages, passages[1:]):
    # A short passage is only cut because the next block did not fit.
    assert len(passage) >= 1024 or len(passage) + 2 + len(next_passage) > 4096
  # Only whitespace at the cuts may be lost.
  assert re.sub(r'\s', '', ''.join(passages)) == re.sub(r'\s', '', text)


def test_corpus_splits_follow_file_hash(corpus):
  stdlib_dir = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = sources.stdlib_source_files(stdlib_dir)
  assert not any(part in ('test', 'tests', 'site-packages') for f in files for part in f.parts)
  validation_files = [f for f in files if sources.is_validation_file(f)]
  assert 0 < len(validation_files) < 0.05 * len(files)

  def num_passages(paths):
    texts = [(stdlib_dir / p).read_bytes().decode('utf-8', 'replace') for p in paths]
    return sum(len(sources.split_passages(text)) for text in texts)

  # Every passage of a validation file, and only those, is in the validation split.
  assert len(corpus['validation']) == num_passages(validation_files) > 0
  assert len(corpus['train']) + len(corpus['validation']) == num_passages(files)
  assert isinstance(corpus['train'][0]['text'], bytes)


def test_corpus_build_is_idempotent_and_complete(data_dir, corpus):
  again = sources.load_stdlib_corpus(data_dir)
  assert {k: len(v) for k, v in again.items()} == {k: len(v) for k, v in corpus.items()}
  assert again['train'][5]['text'] == corpus['train'][5]['text']
  assert not list(pathlib.Path(data_dir).rglob('incomplete*'))


def test_resolve_data_dir(monkeypatch, tmp_path):
  assert sources.resolve_data_dir(str(tmp_path)) == str(tmp_path)
  monkeypatch.setenv('SWITCHMOE_DATA_DIR', str(tmp_path / 'env'))
  assert sources.resolve_data_dir('') == str(tmp_path / 'env')
  monkeypatch.delenv('SWITCHMOE_DATA_DIR')
  assert sources.resolve_data_dir('') == str(pathlib.Path.home() / '.cache/switchmoe/tfds')




# ----------------------------------------------------------------------------- local files


def files_config(data_dir, files, **data_fields):
  config = default_config()
  config.data.update(source='files', files=files, data_dir=str(data_dir), **data_fields)
  return config


def all_texts(source):
  return [source[i]['text'].decode('utf-8') for i in range(len(source))]


def write_corpus(folder: pathlib.Path) -> list[str]:
  """A .txt, a .jsonl and a .jsonl.gz file; returns every document they hold."""
  folder.mkdir(parents=True, exist_ok=True)
  paragraphs = [f'paragraph {i} ' + 'word ' * 300 for i in range(6)]
  (folder / 'book.txt').write_text('\n\n'.join(paragraphs), encoding='utf-8')
  records = [{'text': f'record {i} ünïcödé 日本', 'id': i} for i in range(120)]
  (folder / 'a.jsonl').write_text('\n'.join(json.dumps(r) for r in records[:60]) + '\n\n',
                                  encoding='utf-8')
  (folder / 'b.jsonl.gz').write_bytes(
      gzip.compress('\n'.join(json.dumps(r) for r in records[60:]).encode('utf-8')))
  return sources.split_passages('\n\n'.join(paragraphs)) + [r['text'] for r in records]


def test_files_dataset_holds_every_document_once(tmp_path):
  documents = write_corpus(tmp_path / 'corpus')
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / '*'))
  train = sources.open_split(config, 'train')
  validation = sources.open_split(config, 'validation')
  assert sorted(all_texts(train) + all_texts(validation)) == sorted(documents)
  # 2% of 126 documents, at least one.
  assert len(validation) == max(1, len(documents) * 2 // 100)
  builder = sources.builder_for(config)
  assert builder.info.full_name.startswith('switchmoe_files/files_')
  assert builder.version == '1.0.0'


def test_files_dataset_is_named_by_its_files(tmp_path):
  write_corpus(tmp_path / 'corpus')
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / '*.jsonl'))
  first = sources.builder_for(config).info.full_name
  assert sources.builder_for(config).info.full_name == first  # reused, not rebuilt
  (tmp_path / 'corpus' / 'c.jsonl').write_text('{"text": "new"}\n{"text": "newer"}\n')
  assert sources.builder_for(config).info.full_name != first
  config.data.dataset_name = 'mine'
  assert sources.builder_for(config).info.full_name == 'switchmoe_files/mine/1.0.0'


def test_files_read_through_the_pipeline(tmp_path):
  write_corpus(tmp_path / 'corpus')
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / '*'), inputs_length=64,
                        targets_length=16)
  batch = next(data.make_train_iterator(config, batch_size=2))
  assert batch['encoder_input_tokens'].shape == (2, 64)
  assert data.make_eval_batches(config, batch_size=2, num_batches=1)[0]['encoder_input_tokens'].any()
  texts = list(data.iter_texts(config, 'validation'))
  assert texts == all_texts(sources.open_split(config, 'validation'))


BAD_FILES = [
    ('empty.txt', b'', r'empty\.txt: empty file'),
    ('blank.txt', b' \n\n \n', r'blank\.txt: empty file'),
    ('latin1.txt', 'ok\ncaf\xe9'.encode('latin-1'), r'latin1\.txt: invalid UTF-8 at byte 6 \(line 2\)'),
    ('nofield.jsonl', b'{"text": "a"}\n{"body": "b", "id": 2}\n',
     r"nofield\.jsonl line 2: no field 'text' \(has: body, id\); set data\.text_field"),
    ('notjson.jsonl', b'{"text": "a"}\nplain text\n', r'notjson\.jsonl line 2: not JSON'),
    ('number.jsonl', b'{"text": 3}\n', r"number\.jsonl line 1: field 'text' is int, not a string"),
    ('broken.txt.gz', b'\x1f\x8b\x08\x00garbage', r'broken\.txt\.gz: cannot read'),
    ('table.csv', b'a,b\n', r'table\.csv: unsupported file type; allowed: \.txt'),
    ('single.jsonl', b'{"text": "only one"}\n', r'1 document\(s\) in 1 file\(s\); at least 2'),
]


@pytest.mark.parametrize('name, content, message', BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_give_one_line_errors_and_write_nothing(tmp_path, capfd, name, content,
                                                          message):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / name).write_bytes(content)
  (tmp_path / 'tfds').mkdir()
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / name))
  with pytest.raises(sources.DataError, match=message) as info:
    sources.open_split(config, 'train')
  assert '\n' not in str(info.value)
  assert not list((tmp_path / 'tfds').iterdir())  # not even the build lock
  out, err = capfd.readouterr()
  assert (out, err) == ('', '')  # TFDS did not start ("Downloading and preparing ...")


@pytest.mark.parametrize('files, message', [
    ('', r"^data\.files='': data\.source='files' needs comma-separated globs"),
    ('{tmp}/nothing/*.txt', r"^data\.files: '.*nothing/\*\.txt' matches no files$"),
])
def test_bad_file_patterns(tmp_path, files, message):
  config = files_config(tmp_path / 'tfds', files.format(tmp=tmp_path))
  with pytest.raises(sources.DataError, match=message):
    sources.open_split(config, 'train')


def run_prepare(*args):
  return subprocess.run([sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), *args],
                        capture_output=True, text=True, timeout=300, check=False)


def test_prepare_data_script(tmp_path):
  documents = write_corpus(tmp_path / 'corpus')
  result = run_prepare(str(tmp_path / 'corpus' / '*'), '--dataset_name=mine',
                       f'--data_dir={tmp_path / "tfds"}')
  assert result.returncode == 0, result.stderr
  assert 'switchmoe_files/mine/1.0.0' in result.stdout
  assert f'{len(documents) - 2:,} documents' in result.stdout  # train: all but 2
  assert '--config.data.source=files' in result.stdout
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / '*'), dataset_name='mine')
  assert len(sources.open_split(config, 'train')) == len(documents) - 2

  (tmp_path / 'corpus' / 'empty.txt').write_text('')
  result = run_prepare(str(tmp_path / 'corpus' / '*.txt'), f'--data_dir={tmp_path / "new"}')
  assert result.returncode == 2
  assert re.fullmatch(r'error: .*/corpus/empty\.txt: empty file \(no text\)\n', result.stderr)
  assert result.stdout == ''
  assert not (tmp_path / 'new').exists()


# ----------------------------------------------------------------------------- registered TFDS


class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
  """A registered dataset with its own text field and a 'test' split, like lm1b."""

  VERSION = tfds.core.Version('2.0.0')
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(
            {'content': tfds.features.Text(), 'label': tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 40), 'test': self._generate_examples(40, 50)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {'content': f'sentence number {i}, ' * 20, 'label': i}


def test_registered_dataset_with_its_own_field_and_splits(tmp_path):
  TinyTextCorpus(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = default_config()
  config.data.update(source='tiny_text_corpus:2.0.0', data_dir=str(tmp_path),
                     text_field='content', eval_split='test')
  texts = list(data.iter_texts(config, 'test'))
  assert sorted(texts) == sorted(f'sentence number {i}, ' * 20 for i in range(40, 50))
  batches = data.make_eval_batches(config, batch_size=2, num_batches=1)
  assert batches[0]['encoder_input_tokens'].shape == (2, config.data.inputs_length)
  next(data.make_train_iterator(config, batch_size=2))


def test_registered_dataset_in_tfrecord_form_is_refused(tmp_path):
  # Writing tfrecord needs TensorFlow, so the dataset only claims to be stored that way.
  builder = TinyTextCorpus(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare()
  info_path = pathlib.Path(builder.data_dir) / 'dataset_info.json'
  info_path.write_text(info_path.read_text().replace('"array_record"', '"tfrecord"'))
  config = default_config()
  config.data.update(source='tiny_text_corpus', data_dir=str(tmp_path), text_field='content')
  with pytest.raises(sources.DataError, match=r'stored as tfrecord.*tfds convert_format'):
    sources.open_split(config, 'train')


@pytest.mark.parametrize('name', ['lm1b', 'c4/en:3.0.1', 'wiki40b/en', 'no_such_dataset'])
def test_missing_registered_dataset(tmp_path, name):
  config = default_config()
  config.data.update(source=name, data_dir=str(tmp_path))
  with pytest.raises(sources.DataError) as info:
    sources.open_split(config, 'train')
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f'data.source={name!r}: no prepared TFDS dataset')
  assert str(tmp_path / name.replace(':', '/')) in message
  assert f'tfds build {name} --data_dir={tmp_path} --file_format=array_record' in message


def test_files_with_another_text_field(tmp_path):
  (tmp_path / 'corpus').mkdir()
  lines = [json.dumps({'body': f'text {i}', 'text': 'not this'}) for i in range(5)]
  (tmp_path / 'corpus' / 'a.jsonl').write_text('\n'.join(lines))
  config = files_config(tmp_path / 'tfds', str(tmp_path / 'corpus' / '*'), text_field='body')
  texts = list(data.iter_texts(config, 'train')) + list(data.iter_texts(config, 'validation'))
  assert sorted(texts) == [f'text {i}' for i in range(5)]
