"""Plan a layout without the hardware: compile the train step ahead of time for a simulated
mesh of CPU devices and report per-device memory and the collectives it contains.

  python scripts/plan.py --config=configs/switch_base.py --devices=32 \
      --config.mesh.shape='(2,16)' --config.mesh.axes="('data','expert')"

Nothing is allocated: parameters, optimizer state and the batch are abstract.
"""

import os
import re
import sys


def _early_devices(argv: list[str]) -> int:
  """--devices must be known before JAX starts, so it is read ahead of absl."""
  for i, arg in enumerate(argv):
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
    if arg == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return 8


os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                           f'device_count={_early_devices(sys.argv)}')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from switchmoe import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
flags.DEFINE_integer('devices', 8, 'Number of simulated devices.')
flags.mark_flags_as_required(['config'])

COLLECTIVES = ('all-to-all', 'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute')


def per_device_bytes(tree) -> int:
  """Bytes of the largest shard of each leaf, summed: what one device holds."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shard)) * leaf.dtype.itemsize
  return total


def abstract_batch(config, batch_sharding) -> dict:
  """The global batch as ShapeDtypeStructs, in the layout of switchmoe.data."""
  b, lt = config.train.batch_size, config.data.targets_length
  shapes = {'decoder_input_tokens': ((b, lt), np.int32),
            'decoder_target_tokens': ((b, lt), np.int32),
            'decoder_loss_weights': ((b, lt), np.float32)}
  if config.model.arch == 'encoder_decoder':
    shapes['encoder_input_tokens'] = ((b, config.data.inputs_length), np.int32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for k, (shape, dtype) in shapes.items()}


def gib(n: float) -> str:
  return f'{n / 2**30:10.3f} GiB'


def main(argv):
  del argv
  config = _CONFIG.value
  s = train.make_setup(config)
  mesh = dict(s.mesh.shape)
  print(f'mesh {mesh} on {len(jax.devices())} simulated devices, '
        f'expert parallel: {config.mesh.expert_parallel}')
  state = s.abstract_state
  with train.mesh_context(s):
    compiled = s.train_step.lower(state, abstract_batch(config, s.batch_sharding)).compile()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
  rows = [('parameters (all devices)', f'{params / 1e9:10.3f} B'),
          ('params per device', gib(per_device_bytes(state['params']))),
          ('optimizer state per device', gib(per_device_bytes(state['opt_state'])))]
  memory = compiled.memory_analysis()
  if memory is not None:
    rows += [('activations / temporaries per device', gib(memory.temp_size_in_bytes)),
             ('step inputs per device', gib(memory.argument_size_in_bytes))]
  hlo = compiled.as_text()
  for op in COLLECTIVES:
    count = len(re.findall(rf' {op}(-start)?\(', hlo))
    rows.append((f'{op} ops in the step', f'{count:10d}'))
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f'{name:<{width}}  {value}')


if __name__ == '__main__':
  app.run(main)
