"""Input pipelines: the embedded stdlib corpus as a TFDS dataset, read through grain into batches.

The default corpus is the source of the running interpreter's standard library, so it needs no
download. It is written once per data dir as array_record files and read with random access, which
is what lets grain shuffle globally and checkpoint an iterator as a small JSON dict.
"""

import copy
import fcntl
import functools
import hashlib
import os
import pathlib
import re
import sys
import sysconfig

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from grain.experimental import WindowShuffleIterDataset

from switchmoe import preprocessing
from switchmoe.tokenizer import ByteTokenizer, make_tokenizer

SOURCES = ('stdlib',)
ARCHS = ('encoder_decoder', 'decoder')

# Directories of the stdlib whose sources are not part of the corpus: third-party code and tests.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'})
_VALIDATION_PERCENT = 2
_MIN_PASSAGE_CHARS = 1024
_MAX_PASSAGE_CHARS = 4096

# Evaluation corruption is seeded independently of config.seed so runs with different training seeds
# are scored on identical batches.
_EVAL_SEED = 20240611
# Packed LM rows are reshuffled within windows of this many rows; without it the rows of a batch
# would mostly be consecutive pieces of one passage.
_PACKED_ROW_SHUFFLE_WINDOW = 1024
# Thread prefetching in the reading process; grain's default (16 threads, 500 elements) would
# compute hundreds of batches ahead of a short run.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


# ----------------------------------------------------------------------------- corpus


def stdlib_source_files(stdlib_dir: pathlib.Path) -> list[pathlib.Path]:
  """The corpus's ``.py`` files, relative to ``stdlib_dir``, in sorted (deterministic) order."""
  return sorted(
      path.relative_to(stdlib_dir)
      for path in stdlib_dir.rglob('*.py')
      if not _EXCLUDED_DIRS.intersection(path.relative_to(stdlib_dir).parts[:-1])
  )


def is_validation_file(relative_path: pathlib.Path) -> bool:
  """Stable ~2% split by hash of the relative path, so it does not depend on the file list."""
  digest = hashlib.sha256(relative_path.as_posix().encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % 100 < _VALIDATION_PERCENT


def _cut_at_lines(block: str, max_chars: int) -> list[str]:
  """Cuts a block into pieces of at most ``max_chars``, at line ends where possible."""
  if len(block) <= max_chars:
    return [block]
  pieces, current = [], ''
  for line in block.splitlines(keepends=True):
    for start in range(0, len(line), max_chars):
      chunk = line[start : start + max_chars]
      if len(current) + len(chunk) > max_chars:
        pieces.append(current)
        current = ''
      current += chunk
  pieces.append(current)
  return pieces


def split_passages(
    text: str, min_chars: int = _MIN_PASSAGE_CHARS, max_chars: int = _MAX_PASSAGE_CHARS
) -> list[str]:
  """Splits source text at blank lines into passages of at most ``max_chars`` characters.

  Consecutive blocks are joined until a passage reaches ``min_chars``. A passage ends shorter only
  when the next block would push it past ``max_chars``, or at the end of the text. Blocks longer
  than ``max_chars`` are cut at line ends (a single longer line at ``max_chars``).
  """
  pieces = [
      piece.strip('\n')
      for block in re.split(r'\n\s*\n', text)
      if block.strip()
      for piece in _cut_at_lines(block, max_chars)
  ]
  passages, current = [], ''
  for piece in pieces:
    if current and len(current) + 2 + len(piece) > max_chars:
      passages.append(current)
      current = ''
    current = f'{current}\n\n{piece}' if current else piece
    if len(current) >= min_chars:
      passages.append(current)
      current = ''
  if current:
    passages.append(current)
  return passages


def _python_config_name() -> str:
  return f'py{sys.version_info.major}_{sys.version_info.minor}'


class SwitchmoeStdlib(tfds.core.GeneratorBasedBuilder):
  """Passages of the running Python's standard-library sources (no tests, no site-packages).

  Each Python minor version has its own stdlib, hence its own config (e.g. ``py3_11``); only the
  running interpreter's config is defined because only its sources are on disk. The whole stdlib is
  used (no cap): ~730 files / 12 MB on 3.11, which builds in a couple of seconds.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Passages of 1-4 KB split at blank lines; 2% of files for validation.'}
  # Nothing is downloaded, so there is no checksums file next to the code to look up; TFDS's lookup
  # would import ``importlib_resources``, which TFDS does not install.
  code_path = None
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=_python_config_name(), description=f'Python {sys.version.split()[0]} stdlib.'
      )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    stdlib_dir = pathlib.Path(sysconfig.get_paths()['stdlib'])
    files = stdlib_source_files(stdlib_dir)
    validation = [f for f in files if is_validation_file(f)]
    train = [f for f in files if not is_validation_file(f)]
    return {
        'train': self._generate_examples(stdlib_dir, train),
        'validation': self._generate_examples(stdlib_dir, validation),
    }

  def _generate_examples(self, stdlib_dir: pathlib.Path, relative_paths: list[pathlib.Path]):
    for relative_path in relative_paths:
      # PEP 263 allows non-UTF-8 sources; lenient decoding keeps one from breaking the build.
      text = (stdlib_dir / relative_path).read_bytes().decode('utf-8', errors='replace')
      for i, passage in enumerate(split_passages(text)):
        yield f'{relative_path.as_posix()}:{i}', {'text': passage}


def resolve_data_dir(data_dir: str) -> str:
  """``config.data.data_dir``, or if empty $SWITCHMOE_DATA_DIR, or else ~/.cache/switchmoe/tfds."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get('SWITCHMOE_DATA_DIR') or os.path.expanduser('~/.cache/switchmoe/tfds')


def load_stdlib_corpus(data_dir: str) -> dict:
  """Builds the corpus in ``data_dir`` if missing and returns {'train', 'validation'} data sources.

  Each source supports len() and [i] -> {'text': bytes}. The build holds an exclusive file lock so
  concurrent callers on one machine build it once; TFDS writes into an ``incomplete.*`` directory
  and renames it when done, so an interrupted build leaves no partial dataset for later reads.
  """
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.switchmoe_stdlib.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    # Created under the lock: a builder made earlier would not see a dataset finished meanwhile.
    builder = SwitchmoeStdlib(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
  return builder.as_data_source()


# ----------------------------------------------------------------------------- pipelines


def _check_config(config) -> ByteTokenizer:
  """Validates the fields the pipelines read; returns the configured tokenizer."""
  if config.data.source not in SOURCES:
    raise ValueError(
        f'Unknown data.source {config.data.source!r}; allowed values: {", ".join(SOURCES)}.')
  tokenizer = make_tokenizer(config.data.tokenizer)
  if config.model.arch not in ARCHS:
    raise ValueError(
        f'Unknown model.arch {config.model.arch!r}; allowed values: {", ".join(ARCHS)}.')
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size}).'
    )
  return tokenizer


def _raw_tokens_length(config) -> int:
  """Raw tokens per encoder-decoder example so the corrupted inputs fill data.inputs_length."""
  tokens_length, targets_length = preprocessing.random_spans_helper(
      config.data.inputs_length, config.data.noise_density, config.data.mean_noise_span_length
  )
  if targets_length > config.data.targets_length:
    raise ValueError(
        f'data.targets_length={config.data.targets_length} cannot hold span-corruption targets for '
        f'data.inputs_length={config.data.inputs_length}; it needs at least {targets_length}.'
    )
  return tokens_length


def _span_corrupted_example(
    example,
    rng,
    *,
    tokenizer,
    tokens_length,
    inputs_length,
    targets_length,
    noise_density,
    mean_noise_span_length,
) -> dict:
  """{'text'} -> encoder_input_tokens [inputs_length] plus decoder_* arrays [targets_length].

  A passage longer than ``tokens_length`` tokens contributes a random window of that many.
  """
  tokens_N = tokenizer.encode(example['text'].decode('utf-8'))
  tokens_W = preprocessing.random_window(tokens_N, tokens_length, rng)
  inputs, targets = preprocessing.span_corruption(
      tokens_W, tokenizer, rng, noise_density, mean_noise_span_length
  )
  return {
      'encoder_input_tokens': preprocessing.pad_or_truncate(inputs, inputs_length),
      **preprocessing.decoder_features(targets, targets_length),
  }


def _document_tokens(example, *, tokenizer) -> np.ndarray:
  """{'text'} -> ids_N int32 with EOS appended, ready for packing."""
  tokens_N = tokenizer.encode(example['text'].decode('utf-8'))
  return np.append(tokens_N, np.int32(tokenizer.eos_id))


class _PackedRows(grain.IterDataset):
  """Concatenates the parent's 1-D token arrays into one stream and cuts it into rows of ``length``.

  Grain's ConcatThenSplitIterDataset does the same, but its state holds tuples that a JSON round
  trip turns into lists, after which its set_state silently resumes at the wrong place.
  """

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __iter__(self):
    return _PackedRowsIterator(self._parent.__iter__(), self._length)


class _PackedRowsIterator(grain.DatasetIterator):
  """Yields rows_length int32 arrays.

  Its state is the parent's state just before the current document plus how many of that document's
  tokens are already used, so a restore re-reads one document.
  """

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self._length = length
    self._document_state = self._parent.get_state()
    self._document_N = np.zeros(0, np.int32)
    self._position = 0

  def __next__(self) -> np.ndarray:
    pieces, missing = [], self._length
    while missing:
      if self._position == len(self._document_N):
        self._document_state = self._parent.get_state()
        self._document_N = next(self._parent)
        self._position = 0
      piece = self._document_N[self._position : self._position + missing]
      pieces.append(piece)
      self._position += len(piece)
      missing -= len(piece)
    return np.concatenate(pieces)

  def get_state(self) -> dict:
    return {'document_state': copy.deepcopy(self._document_state), 'position': self._position}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state['document_state'])
    self._document_state = copy.deepcopy(state['document_state'])
    # Position 0 means nothing of the document is used yet, so it is simply read again later.
    self._document_N = next(self._parent) if state['position'] else np.zeros(0, np.int32)
    self._position = state['position']


def _process_slice(source, process_index: int, process_count: int) -> grain.MapDataset:
  """Records process_index, process_index + process_count, ... of ``source``."""
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} is outside [0, process_count={process_count}).')
  return grain.MapDataset.source(source)[process_index::process_count]


def _encoder_decoder_batches(
    documents: grain.MapDataset, config, tokenizer, *, seed: int, batch_size: int
) -> grain.MapDataset:
  """Infinite dataset of span-corrupted batches; example i's noise depends on (seed, i) only."""
  corrupt = functools.partial(
      _span_corrupted_example,
      tokenizer=tokenizer,
      tokens_length=_raw_tokens_length(config),
      inputs_length=config.data.inputs_length,
      targets_length=config.data.targets_length,
      noise_density=config.data.noise_density,
      mean_noise_span_length=config.data.mean_noise_span_length,
  )
  return documents.repeat().random_map(corrupt, seed=seed).batch(batch_size, drop_remainder=True)


def _packed_lm_batches(
    documents: grain.IterDataset, config, tokenizer, *, seed: int, batch_size: int
) -> grain.IterDataset:
  """Packs tokenized documents (+EOS) into rows of data.targets_length and batches them."""
  length = config.data.targets_length
  rows = WindowShuffleIterDataset(
      _PackedRows(documents, length), window_size=_PACKED_ROW_SHUFFLE_WINDOW, seed=seed
  )
  rows = rows.map(functools.partial(preprocessing.decoder_features, length=length))
  return rows.batch(batch_size, drop_remainder=True)


def _derived_seeds(seed: int, process_index: int, count: int) -> list[int]:
  """Independent uint32 seeds per process, so processes do not share corruption noise."""
  return [int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(count)]


def _prefetch(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """Runs the pipeline up to ``dataset`` in ``num_workers`` processes (none if 0), same order."""
  if num_workers == 0:
    return dataset
  if not flags.FLAGS.is_parsed():
    # Grain's workers read absl flags; outside an absl app (tests, notebooks) they use the defaults.
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def make_train_iterator(config, *, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Infinite, shuffled, deterministic iterator over training batches for this process.

  ``batch_size`` is per process; process i reads only training passages i, i + process_count, ...
  Returns a grain DatasetIterator: ``get_state()`` gives a JSON-serialisable dict and
  ``set_state(s)`` resumes with exactly the batches that followed when ``s`` was taken. Batches are
  dicts of NumPy arrays (B = batch_size):
    encoder_decoder: encoder_input_tokens int32 [B, data.inputs_length], and
    decoder_input_tokens int32, decoder_target_tokens int32, decoder_loss_weights float32, each
    [B, data.targets_length].
    decoder: the three decoder_* arrays only, [B, data.targets_length], from packed text.
  With data.num_workers > 0 the per-document work runs in that many grain worker processes (close
  the iterator when done); batches equal those of num_workers = 0 but states are not
  interchangeable.
  """
  tokenizer = _check_config(config)
  shuffle_seed, example_seed = _derived_seeds(config.seed, process_index, 2)
  source = load_stdlib_corpus(resolve_data_dir(config.data.data_dir))['train']
  documents = _process_slice(source, process_index, process_count).shuffle(seed=shuffle_seed)

  if config.model.arch == 'encoder_decoder':
    batches = _encoder_decoder_batches(
        documents, config, tokenizer, seed=example_seed, batch_size=batch_size
    )
    return iter(_prefetch(batches.to_iter_dataset(_READ_OPTIONS), config.data.num_workers))
  tokenized = documents.repeat().map(functools.partial(_document_tokens, tokenizer=tokenizer))
  # Packing is stateful, so it runs after the worker fan-in: the result then does not depend on
  # the number of workers.
  tokenized = _prefetch(tokenized.to_iter_dataset(_READ_OPTIONS), config.data.num_workers)
  batches = _packed_lm_batches(
      tokenized, config, tokenizer, seed=example_seed, batch_size=batch_size)
  return iter(batches)


def make_eval_batches(
    config, *, batch_size: int, num_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict]:
  """The first ``num_batches`` validation batches for this process, identical on every call.

  Same keys, shapes and dtypes as ``make_train_iterator``. Passages are taken in stored order (not
  shuffled), with corruption seeded by a fixed constant rather than config.seed; if the process's
  validation slice runs out it is cycled.
  """
  tokenizer = _check_config(config)
  source = load_stdlib_corpus(resolve_data_dir(config.data.data_dir))['validation']
  documents = _process_slice(source, process_index, process_count)

  if config.model.arch == 'encoder_decoder':
    batches = _encoder_decoder_batches(
        documents, config, tokenizer, seed=_EVAL_SEED, batch_size=batch_size
    )
    return [batches[i] for i in range(num_batches)]
  tokenized = documents.repeat().map(functools.partial(_document_tokens, tokenizer=tokenizer))
  batch_iterator = iter(_packed_lm_batches(
      tokenized.to_iter_dataset(_READ_OPTIONS), config, tokenizer, seed=_EVAL_SEED,
      batch_size=batch_size))
  return [next(batch_iterator) for _ in range(num_batches)]
