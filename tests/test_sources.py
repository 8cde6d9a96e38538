"""Corpora: the embedded stdlib corpus, local files, registered TFDS datasets, and their errors."""

import pathlib
import re
import sysconfig

import numpy as np
import pytest

from switchmoe import sources


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


