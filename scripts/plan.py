"""Plan a layout without the hardware: compile the train step ahead of time for a simulated
mesh of CPU devices and report per-device memory and the collectives it contains.

  python scripts/plan.py --config=configs/switch_base.py --devices=32 \
      --config.mesh.shape='(2,16)' --config.mesh.axes="('data','expert')" --device_gib=80

Nothing is allocated: parameters, optimizer state and the batch are abstract. ``--device_gib``
is the memory of one device of the target (80 for an 80 GB GPU): the plan is refused before
compiling if the parameters, gradients and optimizer state alone exceed it, and after compiling
if the step's estimated peak does (exit code 2, one line, as switchmoe-train's own check).
Without it nothing is held to a limit: the simulated devices' share of this machine's memory
says nothing about the target. The peak is XLA:CPU's estimate of the compiled step (its inputs,
outputs and temporaries); an accelerator's compiler fuses and lays out differently, so treat
it as a plan, not a measurement.
"""

import argparse
import os
import re
import sys
import time


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, the ``--config.a.b=value`` overrides)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='a config file in configs/')
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  parser.add_argument('--device_gib', type=float, default=None,
                      help="memory of one target device in GiB (default: not checked)")
  return parser.parse_known_args(argv)


# The device count must be set before JAX starts, so the flags are read ahead of the imports.
ARGS, OVERRIDES = parse_args(sys.argv[1:])
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                           f'device_count={ARGS.devices}')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from switchmoe import train  # noqa: E402
from switchmoe.main import fail, load_config  # noqa: E402

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


def main() -> None:
  try:
    config = load_config(ARGS.config, OVERRIDES)
    if ARGS.device_gib is not None and not ARGS.device_gib > 0:
      raise ValueError(f'--device_gib={ARGS.device_gib}: must be a positive number of GiB')
    limit = None if ARGS.device_gib is None else int(ARGS.device_gib * 2**30)
    s = train.make_setup(config, device_bytes=limit)
  except ValueError as e:  # a bad field or an impossible layout
    fail(str(e))
  mesh = dict(s.mesh.shape)
  print(f'mesh {mesh} on {len(jax.devices())} simulated devices, '
        f'expert parallel: {config.mesh.expert_parallel}')
  state = s.abstract_state
  # Minutes for a large model on a few cores: say so while it runs.
  print(f'compiling the train step for {len(jax.devices())} devices ...', file=sys.stderr,
        flush=True)
  start = time.perf_counter()
  with train.mesh_context(s):
    compiled = s.train_step.lower(state, abstract_batch(config, s.batch_sharding)).compile()
  print(f'compiled in {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
  rows = [('parameters (all devices)', f'{params:10,}'),
          ('params per device', gib(per_device_bytes(state['params']))),
          ('optimizer state per device', gib(per_device_bytes(state['opt_state'])))]
  memory, peak = compiled.memory_analysis(), train.compiled_peak_bytes(compiled)
  if memory is not None:
    rows += [('activations / temporaries per device', gib(memory.temp_size_in_bytes)),
             ('step inputs per device', gib(memory.argument_size_in_bytes)),
             ('estimated peak per device', gib(peak))]
  hlo = compiled.as_text()
  for op in COLLECTIVES:
    count = len(re.findall(rf' {op}(-start)?\(', hlo))
    rows.append((f'{op} ops in the step', f'{count:10d}'))
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f'{name:<{width}}  {value}')
  if limit is not None and peak is not None:
    if peak > limit:
      fail(f'the compiled step\'s estimated peak, {peak / 2**30:,.2f} GiB per device, is more '
           f'than --device_gib={ARGS.device_gib:g}; allowed: a smaller train.batch_size, '
           'model.remat, or more devices on the mesh axes that shard the model')
    print(f'fits in --device_gib={ARGS.device_gib:g}: {peak / limit:.0%} of it')


if __name__ == '__main__':
  main()
