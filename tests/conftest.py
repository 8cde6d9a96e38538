"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402  (after the flags above)

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A private TFDS data_dir for the whole session (never the user's cache)."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def corpus(data_dir):
  """The embedded corpus, built once per session."""
  from switchmoe import sources
  return sources.load_stdlib_corpus(data_dir)
