"""scripts/plan.py compiles a step for a simulated mesh without allocating it."""

import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from switchmoe.main import load_config
from switchmoe.model import LanguageModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plan(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, 'scripts/plan.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_plan_reports_memory_and_all_to_all():
  overrides = ['--config.mesh.shape=(2,4)', '--config.model.num_layers=1',
               '--config.model.moe.every=1']
  done = run_plan('--config=configs/switch_tiny.py', '--devices=8', '--device_gib=80',
                  *overrides)
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  peak = float(re.search(r'estimated peak per device\s+([\d.]+) GiB', out).group(1))
  assert out.endswith(f'fits in --device_gib=80: {peak / 80:.0%} of it\n')
  assert "mesh {'data': 2, 'expert': 4} on 8 simulated devices" in out
  assert int(re.search(r'all-to-all ops in the step\s+(\d+)', out).group(1)) > 0
  per_device = float(re.search(r'params per device\s+([\d.]+) GiB', out).group(1))
  assert 0 < per_device < 0.05
  config = load_config(os.path.join(REPO, 'configs', 'switch_tiny.py'), overrides)
  model = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))))
  assert re.search(rf'parameters \(all devices\) +{count:,}\n', out)  # a count, not a size


@pytest.mark.slow
def test_plan_refuses_a_step_whose_compiled_peak_exceeds_the_device(tmp_path):
  """Parameters, gradients and optimizer state fit, the step's activations do not: refused
  after compiling, with the estimate in the line."""
  args = ['--config=configs/switch_tiny.py', '--devices=1', '--config.model.num_layers=1',
          '--config.model.moe.every=1', '--config.train.batch_size=64']
  done = run_plan(*args, '--device_gib=80')
  assert done.returncode == 0, done.stderr[-2000:]
  gib = {name: float(re.search(rf'{name} per device\s+([\d.]+) GiB', done.stdout).group(1))
         for name in ('params', 'optimizer state', 'estimated peak')}
  # Between the state's need (parameters and their gradients, the optimizer state) and the peak.
  limit = (2 * gib['params'] + gib['optimizer state'] + gib['estimated peak']) / 2
  assert 2 * gib['params'] + gib['optimizer state'] < limit < gib['estimated peak']
  done = run_plan(*args, f'--device_gib={limit}')
  assert done.returncode == 2
  progress, line = done.stderr.splitlines()[:-1], done.stderr.splitlines()[-1]
  assert [p.split()[0] for p in progress] == ['compiling', 'compiled']
  assert line.startswith("error: the compiled step's estimated peak, ")
  assert f'GiB per device, is more than --device_gib={limit:g}; allowed: ' in line


@pytest.mark.parametrize('args, message', [
    (['--device_gib=0.001'], 'error: model: parameters, gradients and optimizer state need '),
    (['--device_gib=-1'], 'error: --device_gib=-1.0: must be a positive number of GiB'),
    (['--config.mesh.shape=(3,3)'], 'error: mesh.shape (3, 3) needs 9 devices, only 8 are '
                                    'available'),
    (['--config.mesh.shape=(2,4)', '--config.model.moe.num_experts=3'],
     'error: model.moe.num_experts=3 and the expert mesh axis (4) must divide one another'),
    (['--config.mesh.shap=(2,4)'], "error: mesh.shap='(2,4)': unknown field (did you mean shape?)"),
    (['--config.mesh.shape=(1,8)', '--config.model.moe.num_experts=4',
      '--config.model.moe.dispatch=dropless', '--config.mesh.expert_parallel=shard_map'],
     "error: model.moe.num_experts=4 on an expert mesh axis of 8: dropless with "
     "mesh.expert_parallel='shard_map' needs a whole number of experts per device"),
])
def test_plan_rejects_a_bad_layout_in_one_line(args, message):
  done = run_plan('--config=configs/switch_tiny.py', '--devices=8', *args, timeout=120)
  assert done.returncode == 2
  assert done.stderr.startswith(message) and done.stderr.count('\n') == 1, done.stderr
  assert done.stdout == ''
