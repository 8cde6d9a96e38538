"""Test setup: 8 simulated CPU devices and quick CPU compiles, set before JAX initialises
its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if os.environ['JAX_PLATFORMS'] == 'cpu':
  # The suite's tiny programs are compiled far more often than they run, and LLVM's
  # optimisation is most of each CPU compile: without it the compile-heavy modules take 0.75x
  # the time. XLA's HLO passes (fusion, SPMD partitioning, collectives) still run, so what
  # tests check of compiled programs holds. Through the environment, so that command-line runs
  # the tests start inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs at full optimisation.
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402  (after the flags above)

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # no error when xdist is not loaded (`-p no:xdist`)
def pytest_xdist_auto_num_workers(config):
  """Workers for ``-n auto`` (setup.cfg): one per core, at most one per 4 GiB of memory.
  Every worker compiles with XLA's threads on all cores, so more workers than cores only
  contend: on 2 cores, 3 workers ran the default suite in 1.27x the time of 2."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  memory_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  return max(1, min(cores or 1, int(memory_gib // 4)))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A private TFDS data_dir for the whole session (never the user's cache)."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def corpus(data_dir):
  """The embedded corpus, built once per session."""
  from switchmoe import sources
  return sources.load_stdlib_corpus(data_dir)
