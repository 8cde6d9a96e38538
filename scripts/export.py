"""Export a checkpoint's parameters for inference or fine-tuning.

  python scripts/export.py PATH OUT [--dtype=bfloat16]

PATH is a run folder (its latest checkpoint) or one ``checkpoints/<step>`` folder. OUT gets
``params/`` (an orbax PyTree of the parameters only, without optimizer state; floats cast to
``--dtype`` if given) and ``config.json``; it must not exist yet. Load it with
``switchmoe.checkpoint.load_params``, evaluate it with ``scripts/evaluate.py OUT``, or
fine-tune from it with ``--config.train.init_from=OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from switchmoe import checkpoint as checkpoint_lib
from switchmoe import config as config_lib
from switchmoe import train


def export(path: str, out: str, dtype: str | None) -> int:
  """Writes the export; returns the number of parameter arrays."""
  if os.path.exists(out):
    raise ValueError(f'{out}: exists; allowed: a new folder')
  config = checkpoint_lib.find_config(path)
  config_lib.validate(config)
  s = train.make_setup(config)
  with train.mesh_context(s):
    params, names = checkpoint_lib.load_params(path, s.abstract_state['params'])
    checkpoint_lib.save_params(out, params, json.loads(config.to_json()), dtype=dtype)
  return len(names)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('path')
  parser.add_argument('out')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None)
  args = parser.parse_args(argv)
  try:
    count = export(args.path, args.out, args.dtype)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Exported {count} parameter arrays to {os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
