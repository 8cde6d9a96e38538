"""Command line: ``switchmoe-train --config=configs/switch_tiny.py --workdir=DIR
[--config.a.b=value ...]`` (also ``python scripts/train.py ...``).

Exit codes: 0 when done or stopped by SIGTERM / SIGINT after saving (run the same command to
resume); 1 on a non-finite loss with ``train.nonfinite=stop``; 2 on a bad config, flag or
workdir, reported in one line ``error: <field>=<value>: <why>; allowed: ...`` before anything
is compiled or written.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from switchmoe import config as config_lib
from switchmoe import distributed
from switchmoe import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: metrics, TensorBoard events and '
                               'checkpoints; re-running with the same folder resumes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'Multi-process runs: host:port of process 0. Leave empty on '
    'SLURM, Open MPI or a Cloud TPU pod, where JAX reads the cluster environment itself.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-process runs: this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def unknown_override(argv: list[str]) -> str | None:
  """The message for the first ``--config.a.b=v`` naming a field the config lacks."""
  reference = config_lib.default_config()
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)(?:=(.*))?$', arg)
    if not match:
      continue
    node, path = reference, match.group(1)
    for depth, key in enumerate(path.split('.')):
      if not hasattr(node, 'keys') or key not in node:
        known = node.keys() if hasattr(node, 'keys') else ()
        where = '.'.join(path.split('.')[:depth + 1])
        return config_lib.unknown_field_message(where, match.group(2), known)
      node = node[key]
  return None


def load_config(path: str, overrides: list[str]):
  """The config of a config file's ``get_config()`` with ``--config.*`` overrides, validated.

  For scripts that parse their own flags; ValueError names a missing file or a bad field.
  """
  if not os.path.isfile(path):
    raise ValueError(f'--config={path}: no such config file')
  spec = importlib.util.spec_from_file_location('switchmoe_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  apply_overrides(config, overrides)
  config_lib.validate(config)
  return config


def apply_overrides(config, args: list[str]) -> None:
  """``--config.a.b=value`` arguments (Python literals, else strings) for the scripts that
  take their config from a checkpoint; ValueError names an unknown field."""
  for arg in args:
    match = re.match(r'--config\.([\w.]+)=(.*)$', arg)
    if not match:
      raise ValueError(f'{arg}: expected --config.<field>=<value>')
    message = unknown_override([arg])
    if message:
      raise ValueError(message)
    *parents, leaf = match.group(1).split('.')
    node = functools.reduce(lambda c, key: c[key], parents, config)
    try:
      value = ast.literal_eval(match.group(2))
    except (ValueError, SyntaxError):
      value = match.group(2)
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'{match.group(1)}={value!r}: {e}') from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with errors (unknown field, unparsable value) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).replace('flag --config.', 'config.'))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
    fail(unknown_override(argv) or str(e))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # config, workdir and data errors: one line, no traceback
    fail(str(e))
  except train.NonFiniteError as e:
    fail(str(e), code=1)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
