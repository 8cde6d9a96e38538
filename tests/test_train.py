"""End-to-end training: the loss falls, resuming repeats a straight run, the CLI works."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from switchmoe import train
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(data_dir, num_steps, **train_fields):
  c = tiny_config()
  c.data.data_dir = data_dir
  c.optim.learning_rate = 3e-3
  c.train.update(num_steps=num_steps, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10, **train_fields)
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def test_training_lowers_loss_and_writes_outputs(data_dir, corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  records = train.train(run_config(data_dir, 40), workdir)
  first, last = records[0], records[-1]
  assert last['train/ce'] < first['train/ce'] - 0.5
  assert last['eval/ce'] < records[1]['eval/ce']
  for key in ('train/loss', 'train/ce', 'train/load_balance', 'train/z_loss',
              'train/dropped_fraction', 'perf/tokens_per_sec', 'perf/step_time', 'eval/ce',
              'eval/accuracy', 'moe/encoder/layer_0/expert_fraction_E'):
    assert key in last, key
  np.testing.assert_allclose(
      last['train/loss'], last['train/ce'] + last['train/load_balance'] + last['train/z_loss'],
      rtol=1e-5)
  assert read_metrics(workdir)[40]['train/loss'] == last['train/loss']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30', '40']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_resume_repeats_the_straight_run(data_dir, corpus, tmp_path):
  straight = str(tmp_path / 'straight')
  train.train(run_config(data_dir, 20), straight)
  resumed = str(tmp_path / 'resumed')
  train.train(run_config(data_dir, 10), resumed)
  train.train(run_config(data_dir, 20), resumed)  # same workdir: resumes at step 10
  a, b = read_metrics(straight), read_metrics(resumed)
  for step in (15, 20):
    for key in ('train/loss', 'train/ce', 'train/grad_norm', 'eval/ce'):
      if key in a[step]:
        np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-6, err_msg=key)


def test_cli_trains_and_rejects_bad_config(data_dir, corpus, tmp_path):
  workdir = str(tmp_path / 'cli')
  overrides = ['--config.model.d_model=32', '--config.model.num_layers=1',
               '--config.model.d_ff=64', '--config.train.num_steps=2',
               '--config.train.batch_size=8', f'--config.data.data_dir={data_dir}']
  cmd = [sys.executable, 'scripts/train.py', '--config=configs/switch_tiny.py',
         f'--workdir={workdir}']
  done = subprocess.run(cmd + overrides, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'step 2/2' in done.stdout
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))
  assert read_metrics(workdir)[2]['train/ce'] > 0

  bad = subprocess.run(cmd[:-1] + [f'--workdir={tmp_path / "bad"}',
                                   '--config.model.moe.capacity_factor=0'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      'error: model.moe.capacity_factor=0.0: must be > 0')
  assert not os.path.exists(tmp_path / 'bad')
