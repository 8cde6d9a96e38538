"""One process of the 2-process test in test_multiprocess.py: 4 CPU devices, 3 train steps,
then a checkpoint, then the first batch of the real input pipeline (corpus built by process 0).

Usage: python -m tests.multiprocess_worker PORT PROCESS_ID WORKDIR
"""

import contextlib
import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)

from switchmoe import distributed, train  # noqa: E402
from switchmoe.checkpoint import Checkpointer  # noqa: E402
from tests.helpers import random_batch  # noqa: E402
from tests.test_multiprocess import STEPS, config  # noqa: E402


def main(port: int, process_id: int, workdir: str) -> None:
  distributed.initialize(f'localhost:{port}', 2, process_id)
  c = config()
  s = train.make_setup(c)
  rows = c.train.batch_size // jax.process_count()
  losses = []
  with train.mesh_context(s):
    state = s.init(jax.random.key(c.seed))
    for step in range(STEPS):
      local = {k: v[process_id * rows:(process_id + 1) * rows]
               for k, v in random_batch(c, step).items()}
      state, metrics = s.train_step(state, train.device_batch(s, local))
      losses.append(float(metrics['loss']))
    # Every process takes part in the save; the test restores it in one 8-device process.
    checkpointer = Checkpointer(workdir, keep=1)
    checkpointer.save(STEPS, state, {}, {})
    checkpointer.wait()
    checkpointer.close()
  c.data.data_dir = os.path.join(workdir, 'tfds')
  with contextlib.ExitStack() as stack:
    data_iter, _ = train.open_data(c, stack)
    first_rows = next(data_iter)['encoder_input_tokens'][:, :8].tolist()
  print(json.dumps({'process': jax.process_index(), 'devices': jax.device_count(),
                    'losses': losses, 'first_rows': first_rows}), flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
