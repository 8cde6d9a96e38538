"""Input pipelines: documents from a TFDS source, through grain, into model batches.

Per example, in order: read (random access, shuffled, sliced per process) -> tokenize (in
``data.num_workers`` worker processes) -> pack the token stream into fixed-length rows, each piece
of a document its own segment -> objective (span corruption, prefix LM or causal LM) -> batch.
The ``supervised`` objective (a task's input -> target pairs, for fine-tuning) skips packing:
each example is one row, its input on the encoder side and its target on the decoder side.
Every step is deterministic given config.seed, and the iterator's state is a small JSON dict saved
in every training checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags
from grain.experimental import ThreadPrefetchIterDataset, WindowShuffleIterDataset

from switchmoe import preprocessing
from switchmoe import sources
from switchmoe.tokenizer import make_tokenizer

# Evaluation noise and shuffling are seeded independently of config.seed so runs with different
# training seeds are scored on identical batches.
_EVAL_SEED = 20240611
# Packed rows are reshuffled within windows of this many rows; without it the rows of a batch
# would mostly be consecutive pieces of one document.
_ROW_SHUFFLE_WINDOW = 1024
# Thread prefetching in the reading process; grain's default (16 threads, 500 elements) would
# compute hundreds of batches ahead of a short run.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
_PREFETCH_BATCHES = 4


# ----------------------------------------------------------------------------- pipelines


def _check_config(config):
  """Validates the fields the pipelines read; returns the configured tokenizer."""
  tokenizer = make_tokenizer(config.data.tokenizer)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size}).'
    )
  return tokenizer


def iter_texts(config, split: str | None = None) -> Iterator[str]:
  """The documents of ``split`` (default data.train_split) in stored order, as strings."""
  split = split or config.data.train_split
  source = sources.open_split(config, split)
  for i in range(len(source)):
    yield sources.document_text(source[i], config.data.text_field)


def row_length(config) -> int:
  """Raw tokens per packed row, before the objective turns a row into an example."""
  d = config.data
  if config.model.arch == 'decoder':
    return d.targets_length
  if d.objective == 'prefix_lm':
    # The prefix and its EOS must fit the encoder input.
    return d.inputs_length - 1
  tokens_length, targets_length = preprocessing.random_spans_helper(
      d.inputs_length, d.noise_density, d.mean_noise_span_length)
  if targets_length > d.targets_length:
    raise ValueError(
        f'data.targets_length={d.targets_length} cannot hold span-corruption targets for '
        f'data.inputs_length={d.inputs_length}; it needs at least {targets_length}.'
    )
  return tokens_length


def tokenize_document(example, *, tokenizer, text_field: str, append_eos: bool) -> np.ndarray:
  """One example -> ids_N int32 (+ EOS for the LM objectives, whose documents are segments)."""
  ids_N = tokenizer.encode(sources.document_text(example, text_field))
  return np.append(ids_N, np.int32(tokenizer.eos_id)) if append_eos else ids_N


def objective_features(row: dict, rng: np.random.Generator, *, config, tokenizer) -> dict:
  """A packed row {'tokens', 'segment_ids'} -> the model's features for ``data.objective``.

  Encoder-decoder rows are one stretch of the concatenated corpus, as in T5's span corruption
  (documents are joined without separators before corruption); decoder-only rows keep each
  document piece in its own segment.
  """
  d = config.data
  tokens_L = row['tokens']
  if config.model.arch == 'decoder':
    prefix_L = (preprocessing.random_prefix_lengths(row['segment_ids'], rng)
                if d.objective == 'prefix_lm' else None)
    return preprocessing.packed_decoder_features(tokens_L, row['segment_ids'], prefix_L)
  if d.objective == 'prefix_lm':
    inputs, targets = preprocessing.prefix_lm_split(
        tokens_L, rng, d.inputs_length, d.targets_length, tokenizer.eos_id)
  else:
    inputs, targets = preprocessing.span_corruption(
        tokens_L, tokenizer, rng, d.noise_density, d.mean_noise_span_length)
  return {
      'encoder_input_tokens': preprocessing.pad_or_truncate(inputs, d.inputs_length),
      **preprocessing.decoder_features(targets, d.targets_length),
  }


def supervised_features(example: dict, *, config, tokenizer) -> dict:
  """A task example -> encoder-decoder features: data.inputs_field and data.targets_field
  tokenized, each cut to leave room for EOS (as T5's fine-tuning does), closed with EOS and
  padded to data.inputs_length / targets_length."""
  d = config.data
  sides = {}
  for (setting, field), length in zip(sources.text_fields(config).items(),
                                      (d.inputs_length, d.targets_length)):
    ids_N = tokenizer.encode(sources.document_text(example, field, setting))
    sides[setting] = np.append(ids_N[:length - 1], np.int32(tokenizer.eos_id))
  return {'encoder_input_tokens': preprocessing.pad_or_truncate(sides['data.inputs_field'],
                                                                d.inputs_length),
          **preprocessing.decoder_features(sides['data.targets_field'], d.targets_length)}


class PackedRows(grain.IterDataset):
  """Concatenates the parent's 1-D token arrays into one stream and cuts it into rows of ``length``.

  Each row is {'tokens': int32 [length], 'segment_ids': int32 [length]}; the pieces of the
  documents in a row get segment ids 1, 2, ... in order. Grain's ConcatThenSplitIterDataset does
  the cutting too, but its state holds tuples that a JSON round trip turns into lists, after which
  its set_state silently resumes at the wrong place.
  """

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __iter__(self):
    return PackedRowsIterator(self._parent.__iter__(), self._length)


class PackedRowsIterator(grain.DatasetIterator):
  """Its state is the parent's state just before the current document plus how many of that
  document's tokens are already used, so a restore re-reads one document."""

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self._length = length
    self._document_state = self._parent.get_state()
    self._document_N = np.zeros(0, np.int32)
    self._position = 0

  def __next__(self) -> dict:
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
    segment_ids = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), [len(p) for p in pieces])
    return {'tokens': np.concatenate(pieces).astype(np.int32), 'segment_ids': segment_ids}

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


def _derived_seeds(seed: int, process_index: int, count: int) -> list[int]:
  """Independent uint32 seeds per process, so processes do not share shuffles or noise."""
  return [int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(count)]


def _prefetch(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """Runs the pipeline up to ``dataset`` in ``num_workers`` processes (none if 0), same order."""
  if num_workers == 0:
    return dataset
  if not flags.FLAGS.is_parsed():
    # Grain's workers read absl flags; outside an absl app (tests, notebooks) they use the defaults.
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _batches(documents: grain.MapDataset, config, tokenizer, *, row_seed: int,
             example_seed: int, batch_size: int, num_workers: int) -> grain.IterDataset:
  """Infinite batches from ``documents`` (already sliced and, for training, shuffled).

  Tokenizing runs in the workers; packing is stateful, so it runs after the fan-in and the
  batches do not depend on the number of workers.
  """
  if config.data.objective == 'supervised':
    examples = documents.repeat().map(
        functools.partial(supervised_features, config=config, tokenizer=tokenizer))
    examples = _prefetch(examples.to_iter_dataset(_READ_OPTIONS), num_workers)
    return examples.batch(batch_size, drop_remainder=True)
  tokenize = functools.partial(tokenize_document, tokenizer=tokenizer, text_field=config.data.text_field,
                               append_eos=config.model.arch == 'decoder')
  tokens = _prefetch(documents.repeat().map(tokenize).to_iter_dataset(_READ_OPTIONS), num_workers)
  rows = WindowShuffleIterDataset(PackedRows(tokens, row_length(config)),
                                  window_size=_ROW_SHUFFLE_WINDOW, seed=row_seed)
  examples = rows.random_map(
      functools.partial(objective_features, config=config, tokenizer=tokenizer), seed=example_seed)
  return examples.batch(batch_size, drop_remainder=True)


def make_train_iterator(config, *, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Infinite, shuffled, deterministic iterator over training batches for this process.

  ``batch_size`` is per process; process i reads only documents i, i + process_count, ... of
  data.train_split. Returns a grain DatasetIterator: ``get_state()`` gives a JSON-serialisable
  dict and ``set_state(s)`` resumes with exactly the batches that followed when ``s`` was taken.
  Batches are dicts of NumPy arrays (B = batch_size, Li = data.inputs_length,
  Lt = data.targets_length):
    encoder_decoder: encoder_input_tokens int32 [B, Li]; decoder_input_tokens,
      decoder_target_tokens int32 and decoder_loss_weights float32 [B, Lt].
    decoder: the three decoder_* arrays plus decoder_segment_ids and decoder_positions int32
      [B, Lt] from packed documents, and for prefix_lm decoder_causal_attention int32 [B, Lt].
  A background thread keeps up to 4 batches ready (close the iterator when done); with
  data.num_workers > 0 tokenizing runs in that many grain worker processes too. Batches equal
  those of num_workers = 0 but states are not interchangeable.
  """
  tokenizer = _check_config(config)
  shuffle_seed, row_seed, example_seed = _derived_seeds(config.seed, process_index, 3)
  source = sources.open_split(config, config.data.train_split)
  documents = _process_slice(source, process_index, process_count).shuffle(seed=shuffle_seed)
  batches = _batches(documents, config, tokenizer, row_seed=row_seed,
                     example_seed=example_seed, batch_size=batch_size,
                     num_workers=config.data.num_workers)
  # A thread prepares the next batches while the accelerator runs the current step; without it
  # the step waits whenever a row-shuffle window refills (every ~1024 rows).
  return iter(ThreadPrefetchIterDataset(batches, prefetch_buffer_size=_PREFETCH_BATCHES))


def make_eval_batches(
    config, *, batch_size: int, num_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict]:
  """The first ``num_batches`` batches of data.eval_split for this process, the same every call.

  Same keys, shapes and dtypes as ``make_train_iterator``. Documents are read in stored order, and
  row shuffling and noise are seeded by a fixed constant rather than config.seed; a process's
  slice that runs out is cycled.
  """
  tokenizer = _check_config(config)
  source = sources.open_split(config, config.data.eval_split)
  documents = _process_slice(source, process_index, process_count)
  batch_iterator = iter(_batches(documents, config, tokenizer, row_seed=_EVAL_SEED,
                                 example_seed=_EVAL_SEED + 1, batch_size=batch_size,
                                 num_workers=0))
  return [next(batch_iterator) for _ in range(num_batches)]
