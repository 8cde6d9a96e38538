"""Command line: ``switchmoe-train --config=configs/switch_tiny.py --workdir=DIR
[--config.a.b=value ...]`` (also ``python scripts/train.py ...``)."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from switchmoe import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: metrics, TensorBoard events and '
                               'checkpoints; re-running with the same folder resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    train.train(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # config and data errors: one line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main)


if __name__ == '__main__':
  run()
