"""Two local processes x 4 CPU devices (gloo) train like one process with 8 devices, their
checkpoint restores in one process on another mesh, and preempting one of them stops both at
one saved step."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from switchmoe import train
from switchmoe.checkpoint import Checkpointer
from tests.helpers import random_batch, tiny_config
from tests.train_helpers import (checkpoint_steps, cli_args, cli_env, compile_cache, read_metrics,
                                 start)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def config():
  c = tiny_config(group_size=16)
  c.model.num_layers = 1
  c.mesh.shape, c.mesh.axes = (2, 4), ('data', 'expert')
  return c


def test_two_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  workers = [subprocess.Popen([sys.executable, '-m', 'tests.multiprocess_worker', str(port),
                               str(i), str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for w, (out, err) in zip(workers, outputs):
    assert w.returncode == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert [r['devices'] for r in results] == [8, 8]
  # Each process reads its own slice of the corpus that process 0 built in the shared data_dir.
  assert results[0]['first_rows'] != results[1]['first_rows']
  assert len(list((tmp_path / 'tfds' / 'switchmoe_stdlib').glob('*/*/dataset_info.json'))) == 1

  c = config()
  s = train.make_setup(c, jax.devices()[:8])
  expected = []
  with train.mesh_context(s):
    state = s.init(jax.random.key(c.seed))
    for step in range(STEPS):
      state, metrics = s.train_step(state, train.device_batch(s, random_batch(c, step)))
      expected.append(float(metrics['loss']))
  for r in results:
    np.testing.assert_allclose(r['losses'], expected, rtol=1e-5)

  # The 2-process (data=2, expert=4) checkpoint, restored by 1 process on an expert=8 mesh.
  c.mesh.shape, c.mesh.axes = (8,), ('expert',)
  other = train.make_setup(c, jax.devices()[:8])
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  with train.mesh_context(other):
    restored, _ = checkpointer.restore(STEPS, other.abstract_state)
  checkpointer.close()
  wi = restored['params']['encoder']['layers'][0]['ffn']['experts']['wi']
  assert wi.sharding.spec[0] == 'expert'
  # gloo sums in another order than one process does: equal up to float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               jax.device_get(restored), jax.device_get(state))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_saved_step(data_dir, corpus, compile_cache,
                                                             tmp_path):
  """Preempting one host of a multi-host job: every process stops after the same step, that
  step is saved once, and the same two commands resume it to the end."""
  workdir = str(tmp_path / 'run')
  env = {k: v for k, v in cli_env(compile_cache).items()
         if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env['JAX_NUM_CPU_DEVICES'] = '2'

  def launch(num_steps):
    port = portpicker.pick_unused_port()
    return [start(cli_args(workdir, data_dir, num_steps, f'--coordinator_address=localhost:{port}',
                           '--num_processes=2', f'--process_id={i}',
                           '--config.train.checkpoint_every=1000',
                           '--config.train.eval_every=1000'), compile_cache, env)
            for i in range(2)]

  (lead, lead_out), (other, other_out) = launch(150)
  lead_out.wait_for('step 10/150')
  other.send_signal(signal.SIGTERM)
  assert other.wait(timeout=180) == 0, other_out.text()[-3000:]
  assert lead.wait(timeout=180) == 0, lead_out.text()[-3000:]
  stopped = [line for line in lead_out.text().splitlines()
             if line.startswith('Stopped by another process after step ')]
  assert stopped, lead_out.text()[-3000:]
  step = int(stopped[0].split('after step ')[1].split(';')[0])
  assert 10 <= step < 150 and step % 5 == 0  # processes agree at log steps
  assert checkpoint_steps(workdir) == [step]

  resumed = launch(step + 10)
  for process, out in resumed:
    assert process.wait(timeout=300) == 0, out.text()[-3000:]
  assert f'checkpoints/{step}' in resumed[0][1].text().split('Resumed from')[1].splitlines()[0]
  assert sorted(read_metrics(workdir)) == list(range(5, step + 11, 5))
