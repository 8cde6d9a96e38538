"""Build a corpus as a TFDS dataset once, before training reads it.

  python scripts/prepare_data.py 'corpus/*.txt,more/**/*.jsonl.gz' [--text_field=text]
      [--dataset_name=NAME] [--data_dir=DIR]
  python scripts/prepare_data.py --source=stdlib [--data_dir=DIR]
  python scripts/prepare_data.py --source=c4/en:3.0.1 --data_dir=DIR   # check a prepared one

Local files: ``.txt`` files are cut at blank lines into 1-4 KB passages; ``.jsonl`` files hold one
JSON object per line with the text under ``--text_field``; either may be gzipped. Every file is
checked (empty, invalid UTF-8, missing field) before anything is written, ~2% of the documents
(at least one) become the validation split, and the dataset is named by ``--dataset_name`` or a
fingerprint of the files, so a changed corpus is built anew. Training builds the same dataset on
first use; preparing it here first keeps the build out of the run and out of every process of a
multi-host job. Prints the splits and the ``--config.data.*`` flags that select the dataset.
Exit code 2 with a one-line error for bad input.
"""

from __future__ import annotations

import argparse
import sys
import time

from switchmoe import sources
from switchmoe.config import default_config


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('files', nargs='?', default='',
                      help='comma-separated globs of .txt/.jsonl(.gz) files')
  parser.add_argument('--source', default='',
                      help="'stdlib', 'files' (the default with FILES) or a TFDS name")
  parser.add_argument('--text_field', default='text')
  parser.add_argument('--dataset_name', default='')
  parser.add_argument('--data_dir', default='',
                      help='default: $SWITCHMOE_DATA_DIR or ~/.cache/switchmoe/tfds')
  args = parser.parse_args(argv)

  config = default_config()
  d = config.data
  d.source = args.source or ('files' if args.files else 'stdlib')
  d.files, d.text_field, d.dataset_name = args.files, args.text_field, args.dataset_name
  d.data_dir = sources.resolve_data_dir(args.data_dir)
  start = time.perf_counter()
  try:
    builder = sources.builder_for(config)
  except ValueError as err:
    print(f'error: {err}', file=sys.stderr)
    return 2
  print(f'{builder.info.full_name} in {builder.data_dir} '
        f'({time.perf_counter() - start:.1f} s)')
  for name, split in sorted(builder.info.splits.items()):
    print(f'  {name:<12} {split.num_examples:>10,} documents  {split.num_bytes / 2**20:9.1f} MiB')
  flags = [f'--config.data.source={d.source}', f'--config.data.data_dir={d.data_dir}']
  if d.source == 'files':
    flags += [f"--config.data.files='{d.files}'", f'--config.data.text_field={d.text_field}']
    if d.dataset_name:
      flags.append(f'--config.data.dataset_name={d.dataset_name}')
  print('train on it with: ' + ' '.join(flags))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
