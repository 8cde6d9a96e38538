"""Orbax checkpoints: a run's ``workdir/checkpoints/<step>/`` and params-only exports.

Each step folder holds four items: ``state`` (params, optimizer state, step and non-finite
counters, restored directly into the run's shardings), ``data`` (the grain iterator state,
JSON), ``config`` (JSON) and ``run`` (JSON: what else identifies the run, e.g. the dataset). Saves are asynchronous: the arrays are copied off the devices,
then written by a background thread into ``<step>.orbax-checkpoint-tmp-*`` which is renamed
to ``<step>`` only once complete. A process killed mid-save leaves that temporary folder
behind, never a half-written ``<step>``; the next run deletes it and resumes from the
previous step. A step that does not restore (a truncated or deleted file) is moved aside to
``<step>.corrupt`` once an older step has restored, so one bad save never blocks a run.

An export (`save_params`) is ``params/`` (an orbax PyTree) plus ``config.json``, for
inference and fine-tuning; `load_params` reads params from either kind of folder.
"""

from __future__ import annotations

import asyncio.base_events
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from switchmoe.config import default_config, unknown_field_message


# Train-state counters newer than some checkpoints; a checkpoint without one restores it as 0.
ADDED_COUNTERS = ('skipped_in_a_row',)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of a workdir's checkpoints restores."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message`` (at most ``limit`` characters of it: tensorstore
  appends its whole spec), for errors reported in one line."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  if len(text) > limit:
    text = text[:limit].rstrip() + ' ...'
  return f'{type(error).__name__}: {text}'.rstrip(': ')


def _free_name(path: str) -> str:
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}.{n}'
  return candidate


# Pieces of those tracebacks. Several threads print at once and each writes a traceback in
# pieces (the exception's name, ': ', its message), so a line may hold pieces of several
# tracebacks, or be cut short (a lone 'RuntimeError' line once got through and failed CI).
_CLOSED_LOOP_NOISE = ('Traceback (most recent call last)', 'base_events.py', '_check_closed',
                      'Event loop is closed')
_CLOSED_LOOP_LINES = (f'File "{asyncio.base_events.__file__}", line', 'in call_soon_threadsafe',
                      'self._check_closed()', "raise RuntimeError('Event loop is closed')",
                      'RuntimeError: Event loop is closed')


def _closed_loop_noise(line: str) -> bool:
  """Whether ``line`` is empty, holds a piece of a closed-loop traceback, or is a cut piece
  of one of its lines."""
  text = line.strip()
  return (not text or any(piece in line for piece in _CLOSED_LOOP_NOISE)
          or any(text in full for full in _CLOSED_LOOP_LINES))


def _unretrieved_task_noise(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith('Task exception was never retrieved')


@contextlib.contextmanager
def _without_closed_loop_noise():
  """When a restore fails, tensorstore finishes the reads still in flight and calls back into
  the asyncio loop orbax has already closed; each callback prints a 'RuntimeError: Event loop
  is closed' traceback straight to file descriptor 2, hundreds per damaged checkpoint. This
  captures descriptor 2 meanwhile and passes on every other line."""
  # The same failure also leaves asyncio tasks whose exception nobody retrieves; asyncio logs
  # each (with its traceback) when the task is collected, which may be much later.
  logging.getLogger('asyncio').addFilter(_unretrieved_task_noise)
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      lines = capture.read().decode('utf-8', 'replace').splitlines(keepends=True)
      sys.stderr.write(''.join(line for line in lines if not _closed_loop_noise(line)))
      sys.stderr.flush()


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, keep_period: int = 0):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None, create=True,
            cleanup_tmp_directories=True),
        item_names=('state', 'data', 'config', 'run'))
    self._pending = False  # a save was started and not yet joined

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict,
           run: dict | None = None) -> None:
    """Starts an asynchronous save; `wait` or the next save joins it."""
    self._pending = True
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config), run=ocp.args.JsonSave(run or {})))

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """Returns (state placed like ``abstract_state``'s shardings, data iterator state).

    Counters in `ADDED_COUNTERS` that a checkpoint predates start at 0."""
    folder = os.path.join(self.directory, str(step), 'state')
    with ocp.PyTreeCheckpointer() as reader, _quiet_absl():
      metadata = reader.metadata(folder).item_metadata
    if metadata is None:
      raise ValueError(f'{folder}: no readable array metadata')
    stored = metadata.tree
    missing = [k for k in abstract_state if k not in stored]
    if any(k not in ADDED_COUNTERS for k in missing):
      raise ValueError(f'{self.directory}/{step}/state lacks {", ".join(missing)}')
    target = {k: v for k, v in abstract_state.items() if k not in missing}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    if not isinstance(restored.data, dict):
      raise ValueError(f'{self.directory}/{step}/data holds no iterator state')
    state = dict(restored.state)
    for k in missing:
      state[k] = jax.device_put(jnp.zeros(abstract_state[k].shape, abstract_state[k].dtype),
                                abstract_state[k].sharding)
    return state, restored.data

  def restore_newest(self, abstract_state: Any, *, lead: bool = True
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest step that restores, or None if there are no
    checkpoints. Newer steps that fail are moved aside to ``<step>.corrupt`` (never deleted),
    each announced in one line; if none restores, `CheckpointError` and nothing is moved.
    Only the ``lead`` process moves and announces.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      with _without_closed_loop_noise():
        try:
          state, data_state = self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged step
          error = e
          time.sleep(2)  # the reads still in flight end (and print) while captured
        else:
          error = None
      if error is not None:
        failed.append((step, error))
        continue
      for bad, error in failed if lead else ():
        aside = _free_name(os.path.join(self.directory, f'{bad}.corrupt'))
        os.rename(os.path.join(self.directory, str(bad)), aside)
        print(f'Checkpoint {self.directory}/{bad} does not restore ({one_line(error)}); '
              f'moved it to {aside} and resumed from step {step}', flush=True)
      if failed:
        self._manager.reload()
      return step, state, data_state
    if failed:
      step, error = failed[0]
      raise CheckpointError(
          f'{self.directory}: none of its {len(steps)} checkpoint(s) restores (step {step}: '
          f'{one_line(error)}); nothing was moved or deleted: move the damaged steps away '
          'to start over, or use another --workdir')
    return None

  def check_for_errors(self) -> None:
    """Raises `CheckpointError` if the last asynchronous save has finished and failed (e.g.
    disk full); cheap, and never waits for a save still running."""
    if self._pending and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Joins the running save; raises `CheckpointError` if it failed."""
    self._pending = False
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- orbax re-raises whatever the writer raised
      raise CheckpointError(f'saving a checkpoint in {self.directory} failed: '
                            f'{one_line(e)}') from e

  def close(self) -> None:
    try:
      with _without_closed_loop_noise():  # a failed restore's reads may end only now
        self._manager.close()
    except Exception:  # noqa: BLE001 -- a failed save is reported by `wait`, not here
      pass


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying ``shardings``: the restore target, allocating nothing."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------- params only


def save_params(directory: str, params: Any, config: dict, *, dtype=None) -> None:
  """Writes an export: ``directory/params`` (floats cast to ``dtype`` if given) and
  ``directory/config.json``. Refuses to overwrite an existing export."""
  directory = os.path.abspath(directory)
  if dtype is not None:
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, 'params'), args=ocp.args.PyTreeSave(params))
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def _step_folder(checkpoints: str) -> str:
  steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
  if not steps:
    raise ValueError(f'{checkpoints}: holds no finished checkpoint')
  return os.path.join(checkpoints, str(max(steps)))


def find_params(path: str) -> tuple[str, tuple[str, ...]]:
  """(orbax PyTree folder, key prefix of the params inside it) for a run folder (its latest
  step), a ``checkpoints`` folder, one step folder, or an export. ValueError if none."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = _step_folder(os.path.join(path, 'checkpoints'))
  elif os.path.basename(path) == 'checkpoints':
    path = _step_folder(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return os.path.join(path, 'state'), ('params',)
  if os.path.isdir(os.path.join(path, 'params')):
    return os.path.join(path, 'params'), ()
  raise ValueError(f'{path}: not a run folder, checkpoint step or export (no checkpoints/, '
                   'state/ or params/ inside)')


def find_config(path: str) -> ml_collections.ConfigDict:
  """The config a run folder, checkpoint step or export was trained with, on top of
  `default_config()` (JSON turned its tuples into lists; this turns them back)."""
  folder, prefix = find_params(path)
  if prefix:  # a step folder: <step>/config is the run's config at that step
    source = os.path.join(os.path.dirname(folder), 'config', 'metadata')
  else:
    source = os.path.join(os.path.dirname(folder), 'config.json')
  try:
    with open(source) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{source}: cannot read the stored config ({one_line(e)})') from None
  config = default_config()
  _update(config, stored, '')
  return config


def _update(config: ml_collections.ConfigDict, stored: dict, prefix: str) -> None:
  for key, value in stored.items():
    if key not in config:
      raise ValueError(unknown_field_message(prefix + key, value, config.keys()))
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value, f'{prefix}{key}.')
    elif isinstance(config[key], tuple):
      config[key] = _tuples(value)
    else:
      config[key] = value


def _tuples(value):
  return tuple(map(_tuples, value)) if isinstance(value, list) else value


def path_name(path) -> str:
  """'encoder/layers/0/ffn/experts/wi' for a jax key path."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def load_params(path: str, target: Any, select: Callable[[str], bool] = lambda name: True,
                optional: Callable[[str], bool] = lambda name: False) -> tuple[Any, list[str]]:
  """Params from ``path`` (see `find_params`) for the leaves of ``target`` (ShapeDtypeStructs
  with shardings, or arrays) whose path ``select`` accepts; the others keep ``target``'s value,
  as do selected leaves that ``optional`` accepts and the checkpoint lacks.

  Returns (the merged tree, the names loaded). Raises ValueError naming a selected parameter
  that the checkpoint lacks or holds with another shape. Stored dtypes (e.g. a bfloat16
  export) are cast to the target's.
  """
  folder, prefix = find_params(path)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer, _quiet_absl():
      stored = checkpointer.metadata(folder).item_metadata.tree
    for key in prefix:
      stored = stored[key]
  except Exception as e:  # noqa: BLE001 -- a damaged or foreign folder, in whatever way
    raise ValueError(f'{folder}: cannot read the checkpoint ({one_line(e)})') from None
  stored = {path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  wanted = {path_name(p): x for p, x in leaves if select(path_name(p))
            and (path_name(p) in stored or not optional(path_name(p)))}
  for name, x in wanted.items():
    if name not in stored:
      raise ValueError(f'train.init_from: {folder} has no parameter {name}')
    if tuple(stored[name].shape) != tuple(x.shape):
      raise ValueError(f'train.init_from: parameter {name} is {tuple(stored[name].shape)} in '
                       f'{folder}, {tuple(x.shape)} in this model')
  subset = traverse_util.unflatten_dict(wanted, sep='/')
  for key in reversed(prefix):
    subset = {key: subset}
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), subset)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer, _quiet_absl():
      restored = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
          item=subset, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise ValueError(f'{folder}: cannot read the checkpoint ({one_line(e)})') from None
  for key in prefix:
    restored = restored[key]
  loaded = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  merged = [loaded.get(path_name(p), x) for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, merged), sorted(loaded)


@contextlib.contextmanager
def _quiet_absl():
  """Orbax warns that an item folder (``<step>/state``) lacks the metadata file that only the
  step folder has; reading one item alone is what we mean to do."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
