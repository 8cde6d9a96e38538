"""Shared pieces of the training, checkpoint and numerics tests: tiny run configs, metrics
readers, a persistent compilation cache and command-line runs."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from jax._src import compilation_cache

from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, 'scripts/train.py']


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """A session-wide persistent compilation cache: the many short runs here compile the same
  programs, and a warm cache turns each ~20 s compile into a load. Also passed to command-line
  runs through the environment (`cli_env`). Turned off again after the session."""
  directory = str(tmp_path_factory.mktemp('jax_cache'))
  settings = {'jax_compilation_cache_dir': directory,
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield directory
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
  c.train.update(num_steps=num_steps, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10, **train_fields)
  return c


def cli_args(workdir, data_dir, num_steps, *extra):
  """Command line for a 1-layer d_model 32 Switch model, saving every 10 steps."""
  return CLI + ['--config=configs/switch_tiny.py', f'--workdir={workdir}',
                '--config.model.d_model=32', '--config.model.num_layers=1',
                '--config.model.d_ff=64', '--config.model.moe.every=1',
                '--config.model.moe.group_size=64', '--config.data.inputs_length=32',
                '--config.data.targets_length=16', '--config.train.batch_size=8',
                '--config.train.log_every=5', '--config.train.eval_every=10',
                '--config.train.eval_batches=1', '--config.train.checkpoint_every=10',
                f'--config.train.num_steps={num_steps}', f'--config.data.data_dir={data_dir}',
                *extra]


def read_metrics(workdir):
  """{step: record} from metrics.jsonl; fails if a step appears twice."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
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
