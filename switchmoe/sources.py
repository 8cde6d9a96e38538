"""Text corpora as TFDS datasets in array_record form, opened for random access.

``config.data.source`` selects one of three kinds, all read the same way (``open_split``):
  'stdlib'  the embedded default: the running interpreter's standard-library sources, built on
            first use in the data dir (no download).
  'files'   local ``.txt`` / ``.jsonl`` files (optionally ``.gz``) matched by ``data.files``,
            checked and built into a versioned dataset with a validation split, by
            ``scripts/prepare_data.py`` or on first use.
  any other value is a registered TFDS name (``c4/en:3.0.1``, ``lm1b``, ``wiki40b/en``) that
            must already be prepared in the data dir; nothing is ever downloaded.

Random access is what lets grain shuffle globally and checkpoint an iterator as a small dict.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterator

import tensorflow_datasets as tfds
from absl import logging as absl_logging

BUILT_IN = ('stdlib', 'files')
FILE_SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz')

# Directories of the stdlib whose sources are not part of the corpus: third-party code and tests.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'})
_VALIDATION_PERCENT = 2
_MIN_PASSAGE_CHARS = 1024
_MAX_PASSAGE_CHARS = 4096


class DataError(ValueError):
  """A one-line message naming the bad config field, file or dataset."""


# ----------------------------------------------------------------------------- passages


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
  """Splits text at blank lines into passages of at most ``max_chars`` characters.

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


def _hash64(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')


# ----------------------------------------------------------------------------- stdlib


def stdlib_source_files(stdlib_dir: pathlib.Path) -> list[pathlib.Path]:
  """The corpus's ``.py`` files, relative to ``stdlib_dir``, in sorted (deterministic) order."""
  return sorted(
      path.relative_to(stdlib_dir)
      for path in stdlib_dir.rglob('*.py')
      if not _EXCLUDED_DIRS.intersection(path.relative_to(stdlib_dir).parts[:-1])
  )


def is_validation_file(relative_path: pathlib.Path) -> bool:
  """Stable ~2% split by hash of the relative path, so it does not depend on the file list."""
  return _hash64(relative_path.as_posix()) % 100 < _VALIDATION_PERCENT


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
    return {
        'train': self._generate_examples(
            stdlib_dir, [f for f in files if not is_validation_file(f)]),
        'validation': self._generate_examples(
            stdlib_dir, [f for f in files if is_validation_file(f)]),
    }

  def _generate_examples(self, stdlib_dir: pathlib.Path, relative_paths: list[pathlib.Path]):
    for relative_path in relative_paths:
      # PEP 263 allows non-UTF-8 sources; lenient decoding keeps one from breaking the build.
      text = (stdlib_dir / relative_path).read_bytes().decode('utf-8', errors='replace')
      for i, passage in enumerate(split_passages(text)):
        yield f'{relative_path.as_posix()}:{i}', {'text': passage}


# ----------------------------------------------------------------------------- local files


def match_files(patterns: str) -> list[pathlib.Path]:
  """Resolves ``data.files`` (comma-separated globs, ``**`` allowed) to sorted absolute paths.

  Each pattern must match at least one file, and every match must have a suffix in FILE_SUFFIXES.
  """
  if not patterns.strip():
    raise DataError("data.files='': data.source='files' needs comma-separated globs, "
                    "e.g. --config.data.files='corpus/*.txt,more/*.jsonl.gz'")
  paths = set()
  for pattern in (p.strip() for p in patterns.split(',') if p.strip()):
    matches = [pathlib.Path(m).resolve() for m in glob.glob(os.path.expanduser(pattern),
                                                             recursive=True)]
    matches = [m for m in matches if m.is_file()]
    if not matches:
      raise DataError(f'data.files: {pattern!r} matches no files')
    for path in matches:
      if not path.name.endswith(FILE_SUFFIXES):
        raise DataError(f'{path}: unsupported file type; allowed: {", ".join(FILE_SUFFIXES)}')
    paths.update(matches)
  return sorted(paths)


def _read_text(path: pathlib.Path) -> str:
  """The whole file as text; gzip by suffix. One-line DataError if empty, not gzip or not UTF-8."""
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(f'{path}: cannot read ({err})') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as err:
    line = raw.count(b'\n', 0, err.start) + 1
    raise DataError(f'{path}: invalid UTF-8 at byte {err.start} (line {line})') from None
  if not text.strip():
    raise DataError(f'{path}: empty file (no text)')
  return text


def file_records(path: pathlib.Path, fields: tuple[str, ...]) -> Iterator[dict[str, str]]:
  """The examples of one corpus file, in order, as {field: text} for each of ``fields``.

  ``.txt``: the file cut at blank lines into 1-4 KB passages (as the stdlib corpus), under
  the one field. ``.jsonl``: one JSON object per non-blank line, whose ``fields`` are strings.
  """
  text = _read_text(path)
  if '.jsonl' not in path.name:
    if len(fields) > 1:
      raise DataError(f'{path}: a .txt file has no fields {", ".join(map(repr, fields))}; '
                      "data.objective='supervised' reads .jsonl records")
    for passage in split_passages(text):
      yield {fields[0]: passage}
    return
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise DataError(f'{path} line {number}: not JSON ({err.msg})') from None
    for field in fields:
      if not isinstance(record, dict) or field not in record:
        has = ', '.join(record) if isinstance(record, dict) else type(record).__name__
        setting = 'data.text_field' if len(fields) == 1 else 'data.inputs_field / targets_field'
        raise DataError(f'{path} line {number}: no field {field!r} (has: {has}); set {setting}')
      if not isinstance(record[field], str):
        raise DataError(f'{path} line {number}: field {field!r} is '
                        f'{type(record[field]).__name__}, not a string')
    yield {field: record[field] for field in fields}


def text_fields(config) -> dict[str, str]:
  """The text features each example of ``config.data`` needs, by the setting that names them:
  data.inputs_field and data.targets_field for objective 'supervised', else data.text_field."""
  d = config.data
  if d.objective == 'supervised':
    return {'data.inputs_field': d.inputs_field, 'data.targets_field': d.targets_field}
  return {'data.text_field': d.text_field}


def _fingerprint(paths: list[pathlib.Path], text_field: str) -> str:
  """Changes when a file is added, removed, resized or touched, or the text field changes."""
  digest = hashlib.sha256(text_field.encode('utf-8'))
  for path in paths:
    stat = path.stat()
    digest.update(f'{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0'.encode('utf-8'))
  return digest.hexdigest()[:12]


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()
  text_field: str = 'text'  # the fields read from each record, comma-separated

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(self.text_field.split(','))


class SwitchmoeFiles(tfds.core.GeneratorBasedBuilder):
  """Documents of local text files; ~2% of them (at least one) form the validation split.

  The config name identifies the file set (``data.dataset_name`` or ``files_<fingerprint>``), so
  editing the corpus yields a new dataset next to the old one rather than a stale read.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': '.txt passages of 1-4 KB, .jsonl records; 2% of documents held out.'}
  code_path = None
  BUILDER_CONFIGS = []  # Made per corpus by `files_builder`.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.__doc__}\nFiles: {", ".join(self.builder_config.files)}',
        # Stored under the field name it was read from, so data.text_field reads it back.
        features=tfds.features.FeaturesDict(
            {field: tfds.features.Text() for field in self.builder_config.fields}),
    )

  _document_keys = None

  def check_files(self) -> list[str]:
    """Reads and checks every file (a DataError names a bad one); the keys of their documents.

    `prepare` calls it before writing anything; the build reuses its result.
    """
    if self._document_keys is None:
      paths = [pathlib.Path(p) for p in self.builder_config.files]
      keys = [f'{path}:{i}' for path in paths
              for i, _ in enumerate(file_records(path, self.builder_config.fields))]
      if len(keys) < 2:
        raise DataError(f'data.files: {len(keys)} document(s) in {len(paths)} file(s); at least '
                        '2 are needed for a train and a validation split')
      self._document_keys = keys
    return self._document_keys

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    paths = [pathlib.Path(p) for p in self.builder_config.files]
    keys = self.check_files()  # every document, to draw the validation split from
    num_validation = max(1, len(keys) * _VALIDATION_PERCENT // 100)
    validation = set(sorted(keys, key=_hash64)[:num_validation])
    return {'train': self._generate_examples(paths, validation, False),
            'validation': self._generate_examples(paths, validation, True)}

  def _generate_examples(self, paths, validation: set[str], is_validation: bool):
    for path in paths:
      for i, record in enumerate(file_records(path, self.builder_config.fields)):
        key = f'{path}:{i}'
        if (key in validation) == is_validation:
          yield key, record


def files_builder(files: str, text_field: str, dataset_name: str,
                  data_dir: str) -> SwitchmoeFiles:
  """The builder for ``data.files``, reading the fields ``text_field`` (comma-separated);
  ``dataset_name`` '' names it by the files' fingerprint."""
  paths = match_files(files)
  name = dataset_name or f'files_{_fingerprint(paths, text_field)}'
  config = TextFilesConfig(name=name, files=tuple(map(str, paths)), text_field=text_field)
  # TFDS warns about every config missing from BUILDER_CONFIGS, which here is all of them.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return SwitchmoeFiles(config=config, data_dir=data_dir, file_format='array_record')
  finally:
    absl_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- opening


def resolve_data_dir(data_dir: str) -> str:
  """``config.data.data_dir``, or if empty $SWITCHMOE_DATA_DIR, or else ~/.cache/switchmoe/tfds."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get('SWITCHMOE_DATA_DIR') or os.path.expanduser('~/.cache/switchmoe/tfds')


def prepare(make_builder, data_dir: str, check=None) -> tfds.core.DatasetBuilder:
  """Builds the dataset of ``make_builder()`` in ``data_dir`` unless it is there already.

  ``check(builder)`` runs first when the dataset is missing: bad input raises before anything,
  even ``data_dir``, is written. An exclusive file lock makes concurrent callers on one machine
  build it once; TFDS writes into an ``incomplete.*`` directory and renames it when done, so an
  interrupted build leaves nothing that a later read could mistake for a dataset.
  """
  builder = make_builder()
  if check is not None and not builder.data_path.exists():
    check(builder)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.switchmoe_build.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if builder.data_path.exists():
      # Made again under the lock: a builder made before the dataset was finished (by another
      # process meanwhile) would not see its splits.
      builder = make_builder()
    builder.download_and_prepare()
  return builder


def stdlib_builder(data_dir: str) -> SwitchmoeStdlib:
  """The embedded corpus, built in ``data_dir`` on first use (a few seconds)."""
  return prepare(lambda: SwitchmoeStdlib(data_dir=data_dir, file_format='array_record'),
                 data_dir)


def load_stdlib_corpus(data_dir: str) -> dict:
  """The embedded corpus as {'train', 'validation'} data sources."""
  return stdlib_builder(data_dir).as_data_source()


def _registered_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A prepared registered dataset; a one-line DataError saying how to prepare it otherwise."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError, AssertionError):
    builder = None
  folder = os.path.join(data_dir, name.replace(':', '/'))
  if builder is None or not builder.is_prepared():
    raise DataError(
        f'data.source={name!r}: no prepared TFDS dataset under data.data_dir={data_dir!r} '
        f'(looked in {folder}); prepare it where there is network access with '
        f'`tfds build {name} --data_dir={data_dir} --file_format=array_record` and copy it here')
  file_format = builder.info.file_format
  if file_format is None or file_format.value != 'array_record':
    raise DataError(
        f'data.source={name!r}: {builder.data_dir} is stored as '
        f'{file_format.value if file_format else "unknown"}, but random access needs '
        f'array_record; convert it with `tfds convert_format --dataset_version_dir='
        f'{builder.data_dir} --out_file_format=array_record`')
  return builder


def builder_for(config) -> tfds.core.DatasetBuilder:
  """The prepared dataset of ``config.data``, built first for 'stdlib' and 'files'."""
  d = config.data
  data_dir = resolve_data_dir(d.data_dir)
  if d.source == 'stdlib':
    return stdlib_builder(data_dir)
  if d.source == 'files':
    fields = ','.join(text_fields(config).values())
    return prepare(lambda: files_builder(d.files, fields, d.dataset_name, data_dir),
                   data_dir, check=SwitchmoeFiles.check_files)
  return _registered_builder(d.source, data_dir)


def dataset_identity(config) -> str:
  """What the run trains on, stored with its checkpoints: a resume on other data is refused.
  For ``'files'`` the files' fingerprint (names, sizes, mtimes), even under a fixed
  ``data.dataset_name``; otherwise the prepared dataset's ``name/config/version``."""
  d = config.data
  if d.source == 'files':
    return f'files:{_fingerprint(match_files(d.files), ",".join(text_fields(config).values()))}'
  return builder_for(config).info.full_name


def open_split(config, split: str):
  """Random-access source of ``split``: len() and [i] -> the example's features (text as bytes).

  Raises DataError naming the split field if the dataset has no such split.
  """
  builder = builder_for(config)
  splits = builder.info.splits
  if split not in splits:
    field = 'data.eval_split' if split == config.data.eval_split else 'data.train_split'
    raise DataError(f'{field}={split!r}: {builder.info.full_name} has splits '
                    f'{", ".join(sorted(splits))}')
  source = builder.as_data_source(split=split)
  if not len(source):
    raise DataError(f'data.source={config.data.source!r}: split {split!r} is empty')
  for setting, field in text_fields(config).items():  # Fails now, not in a worker later.
    document_text(source[0], field, setting)
  return source


def document_text(example: dict, text_field: str, setting: str = 'data.text_field') -> str:
  """The text feature of one example, decoded; a one-line DataError names a missing field
  by the config ``setting`` that chose it."""
  if text_field not in example:
    raise DataError(f'{setting}={text_field!r}: not a feature of the dataset; it has '
                    f'{", ".join(sorted(example))}')
  value = example[text_field]
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
