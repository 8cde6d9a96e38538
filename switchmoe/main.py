"""Command line: ``switchmoe-train --config=configs/switch_tiny.py --workdir=DIR
[--config.a.b=value ...]`` (also ``python scripts/train.py ...``).

Exit codes, a contract for schedulers and scripts:

- 0: done, or stopped by SIGTERM / SIGINT after saving (run the same command to resume);
- 1: a runtime failure: I/O (disk full, a failed checkpoint save), out of memory, a
  non-finite stop, no checkpoint that restores; the traceback goes to ``WORKDIR/logs/``;
- 2: bad input: config file, field or flag, workdir path, data, a checkpoint named by the
  user; reported before anything is compiled or written;
- 3: the workdir is locked by another live run.

Every error is one line on stderr, ``error: <file or field>: <why>``; ``--verbose`` also
prints the traceback.
"""

from __future__ import annotations

import ast
import datetime
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from switchmoe import config as config_lib
from switchmoe import distributed
from switchmoe import train
from switchmoe.checkpoint import one_line
from switchmoe.workdir import LockHeld

EXIT_RUNTIME, EXIT_BAD_INPUT, EXIT_LOCKED = 1, 2, 3

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: metrics, TensorBoard events and '
                               'checkpoints; re-running with the same folder resumes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'Multi-process runs: host:port of process 0. Leave empty on '
    'SLURM, Open MPI or a Cloud TPU pod, where JAX reads the cluster environment itself.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-process runs: this process.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Print the traceback of an error too.')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message: str, code: int = EXIT_BAD_INPUT):
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
    try:
      value = ast.literal_eval(match.group(2))
    except (ValueError, SyntaxError):
      value = match.group(2)
    try:  # ml_collections walks the dotted path and keeps each field's type (int -> float)
      config.update_from_flattened_dict({match.group(1): value})
    except TypeError as e:
      raise ValueError(f'{match.group(1)}={value!r}: {e}') from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with errors (unknown field, unparsable value) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).replace('flag --config.', 'config.'))
  except Exception as e:  # noqa: BLE001 -- the config file itself raised while loading
    # ml_collections raises AttributeError / KeyError for an override of a missing field.
    message = unknown_override(argv) if isinstance(e, (AttributeError, KeyError)) else None
    if '--verbose' in argv:
      traceback.print_exception(e)
    fail(message or config_error(config_argument(argv), e))


def config_argument(argv: list[str]) -> str:
  """The path given as ``--config=PATH`` or ``--config PATH``."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''



def config_error(path: str, error: BaseException) -> str:
  """One line for a config file that does not load: missing, a syntax error, or raising."""
  while error.__cause__ is not None:  # ml_collections wraps the file's own error
    error = error.__cause__
  if isinstance(error, FileNotFoundError) or not os.path.isfile(path):
    return f'--config={path}: no such config file'
  if isinstance(error, SyntaxError):
    return f'--config={path}: line {error.lineno}: SyntaxError: {error.msg}'
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  where = f'line {lines[-1]}: ' if lines else ''
  return f'--config={path}: {where}{one_line(error)}'


def describe(error: BaseException) -> str:
  """The one line for a runtime failure."""
  if type(error).__module__.startswith('switchmoe.'):  # ours already read as one line
    return str(error)
  if isinstance(error, OSError) and error.strerror:
    return f'{error.filename or "I/O"}: {error.strerror}'
  text = str(error)
  if 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text:
    first = next((line for line in text.splitlines() if 'memory' in line.lower()), text)
    return f'out of memory: {first.strip()[:300]}'
  return one_line(error)


def save_traceback(workdir: str, error: BaseException) -> str | None:
  """Writes the traceback to ``WORKDIR/logs/`` and returns the file, or None if it cannot."""
  try:
    folder = os.path.join(os.path.abspath(workdir), 'logs')
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    import jax
    path = os.path.join(folder, f'error-{stamp}-process{jax.process_index()}.txt')
    with open(path, 'w') as f:
      f.write(''.join(traceback.format_exception(error)))
    return path
  except OSError:
    return None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if not _VERBOSE.value:
    # A failed background save is logged by orbax as pages of tracebacks; the run reports it
    # in one line itself (and writes the traceback to WORKDIR/logs/).
    logging.get_absl_logger().addFilter(
        lambda record: not (record.levelno >= std_logging.ERROR and 'orbax' in record.pathname))
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load gives a placeholder that raises on use
  except Exception as e:  # noqa: BLE001 -- whatever the config file raised
    if _VERBOSE.value:
      traceback.print_exception(e)
    fail(config_error(config_flags.get_config_filename(flags.FLAGS['config']), e))
  workdir = _WORKDIR.value
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train(config, workdir)
  except train.StoppedDuringStartup as e:
    print(f'Stopped by {e} during start-up, before the first step; nothing to save. Run the '
          'same command to start.', flush=True)
  except Exception as e:  # noqa: BLE001 -- every error ends as one line and an exit code
    if _VERBOSE.value:
      traceback.print_exception(e)
    if isinstance(e, LockHeld):
      fail(str(e), EXIT_LOCKED)
    if isinstance(e, ValueError):  # config, workdir and data errors
      fail(str(e))
    where = save_traceback(workdir, e)
    print(f'error: {describe(e)}' + (f' (traceback: {where})' if where else ''),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Everything the run opened is closed by now. Skipping the interpreter's teardown keeps
    # tensorstore reads that a failed restore left in flight from printing pages of "Event
    # loop is closed" into the one-line error.
    os._exit(EXIT_RUNTIME)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
