"""scripts/benchmark_data.py times the pipeline and its stages and reports both."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_reports_rates_and_stages(data_dir):
  done = subprocess.run(
      [sys.executable, 'scripts/benchmark_data.py', '--config=configs/switch_tiny.py',
       '--batch_size=4', '--batches=3', '--workers=0', '--json',
       f'--config.data.data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  table, last_line = done.stdout.rstrip().rsplit('\n', 1)
  result = json.loads(last_line)
  [run] = result['pipeline']
  assert run['workers'] == 0
  assert min(run['batches_per_s'], run['examples_per_s'], run['tokens_per_s']) > 0
  assert abs(sum(result['stages']['percent'].values()) - 100) < 1e-6
  assert result['stages']['documents_per_batch'] > 0
  for stage in ('read', 'tokenize', 'pack', 'objective', 'batch'):
    assert f'\n{stage} ' in table
