"""One process of the 2-process conversion in test_convert.py: 4 CPU devices, an (1, 8)
data x expert mesh over both processes; prints the tensor names this process read.

Usage: python -m tests.convert_worker PORT PROCESS_ID HF_DIR OUT
"""

import json
import os
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)

from switchmoe import convert  # noqa: E402
from tests.train_helpers import load_script  # noqa: E402


def main(port: int, process_id: int, hf_dir: str, out: str) -> None:
  reads = []
  read = convert._Tensors.read
  convert._Tensors.read = lambda self, name: reads.append(name) or read(self, name)
  code = load_script('convert_hf').main([
      f'--hf_dir={hf_dir}', f'--out={out}', f'--coordinator_address=localhost:{port}',
      '--num_processes=2', f'--process_id={process_id}', '--config.mesh.shape=(1,8)'])
  print(json.dumps({'code': code, 'process': jax.process_index(), 'reads': reads}), flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
