"""scripts/plan.py compiles a step for a simulated mesh without allocating it."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_plan_reports_memory_and_all_to_all():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  done = subprocess.run(
      [sys.executable, 'scripts/plan.py', '--config=configs/switch_tiny.py', '--devices=8',
       '--config.mesh.shape=(2,4)', '--config.model.num_layers=1',
       '--config.model.moe.every=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  assert "mesh {'data': 2, 'expert': 4} on 8 simulated devices" in out
  assert int(re.search(r'all-to-all ops in the step\s+(\d+)', out).group(1)) > 0
  per_device = float(re.search(r'params per device\s+([\d.]+) GiB', out).group(1))
  assert 0 < per_device < 0.05
