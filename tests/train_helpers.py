"""Shared pieces of the training, checkpoint and numerics tests: tiny run configs, metrics
readers, a persistent compilation cache and command-line runs."""

import importlib.util
import os
import subprocess
import sys
import threading
import time

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from switchmoe import metrics as metrics_lib
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, 'scripts/train.py']


_CACHE_DIRS = []  # one directory for the whole session, shared by the modules that use it


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for this module's tests, in a directory shared by all
  modules that use it: their many short runs compile the same programs, and a warm cache
  turns each ~20 s compile into a load. Command-line runs get it through the environment
  (`cli_env`). Off again after the module, so other tests run as they would alone."""
  if not _CACHE_DIRS:
    _CACHE_DIRS.append(str(tmp_path_factory.mktemp('jax_cache')))
  settings = {'jax_compilation_cache_dir': _CACHE_DIRS[0],
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield _CACHE_DIRS[0]
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def cli_env(cache_dir: str) -> dict:
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


def run_config(data_dir, num_steps, **train_fields):
  """tiny_config trained for ``num_steps``: logs every 5, evaluates and saves every 10."""
  c = tiny_config()
  c.data.data_dir = data_dir
  c.optim.learning_rate = 3e-3
  c.train.update({'num_steps': num_steps, 'log_every': 5, 'eval_every': 10, 'eval_batches': 2,
                  'checkpoint_every': 10, **train_fields})
  return c


# A config file for command-line runs with the model and optimizer of `run_config`, so that
# they share compiled programs with in-process runs through the compilation cache.
CLI_CONFIG = f"""
import sys
sys.path.insert(0, {REPO!r})
from tests.train_helpers import run_config
def get_config():
  return run_config('', 1)  # data_dir and num_steps come from the command line
"""


def cli_args(workdir, data_dir, num_steps, *extra):
  """Command line for a `run_config` run: logs every 5 steps, evaluates and saves every 10."""
  config_file = os.path.join(os.path.dirname(str(data_dir)), 'cli_config.py')
  if not os.path.exists(config_file):
    with open(config_file, 'w') as f:
      f.write(CLI_CONFIG)
  return CLI + [f'--config={config_file}', f'--workdir={workdir}',
                f'--config.train.num_steps={num_steps}', f'--config.data.data_dir={data_dir}',
                *extra]


def read_metrics(workdir):
  """{step: record} from metrics.jsonl; fails if a step appears twice."""
  records = metrics_lib.read_metrics(workdir)
  steps = [r['step'] for r in records]
  assert steps == sorted(set(steps)), steps
  return {r['step']: r for r in records}


def checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def assert_same_metrics(a: dict, b: dict, steps):
  """Bit-for-bit equal training, evaluation and MoE metrics (not timings) at ``steps``."""
  for step in steps:
    keys = {k for k in a[step] if not k.startswith('perf/')}
    assert keys == {k for k in b[step] if not k.startswith('perf/')}, step
    for key in sorted(keys):
      assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


def run_cli(args, cache_dir, timeout=300, **kwargs):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=cli_env(cache_dir), **kwargs)


class PatchedBatches:
  """Wraps a training iterator: ``edit(step, batch)`` may change batch ``step`` (1-based)."""

  def __init__(self, iterator, edit):
    self._iterator, self._edit, self._step = iterator, edit, 0

  def __next__(self):
    self._step += 1
    batch = dict(next(self._iterator))
    self._edit(self._step, batch)
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


def patch_batches(monkeypatch, edit):
  """Makes `train.train` read batches through `PatchedBatches`."""
  from switchmoe import train
  make = train.data_lib.make_train_iterator
  monkeypatch.setattr(train.data_lib, 'make_train_iterator',
                      lambda *args, **kwargs: PatchedBatches(make(*args, **kwargs), edit))


def load_script(name: str):
  """scripts/<name>.py as a module, to call its main() in this process."""
  spec = importlib.util.spec_from_file_location(f'scripts_{name}',
                                                os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Lines:
  """Collects a child process's stdout lines in a thread; `wait_for` polls them."""

  def __init__(self, process: subprocess.Popen):
    self.lines, self.process = [], process
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line)

  def wait_for(self, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in self.lines):
      assert self.process.poll() is None, ''.join(self.lines)[-3000:]
      assert time.monotonic() < deadline, f'no {text!r} in {"".join(self.lines)[-3000:]}'
      time.sleep(0.05)

  def text(self) -> str:
    self._thread.join(timeout=30)
    return ''.join(self.lines)


def start(args, cache_dir, env=None) -> tuple[subprocess.Popen, Lines]:
  """Starts a command-line run (``env``: its environment, default `cli_env`)."""
  process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env or cli_env(cache_dir))
  return process, Lines(process)
