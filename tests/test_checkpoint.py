"""Checkpoints: a SIGKILL mid-save and a SIGTERM mid-run both resume, retention keeps the
newest plus every keep_period-th, init_from loads all or part of another run's params,
export.py and evaluate.py read any checkpoint."""

import asyncio
import json
import os
import random
import signal
import sys
import traceback

import jax
import numpy as np
import pytest

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import train
from tests.train_helpers import (assert_same_metrics, checkpoint_steps, cli_args,
                                 compile_cache, load_script, read_metrics, run_cli, run_config,
                                 start)

# Runs the CLI with orbax's final rename of checkpoint step 20 stalled, as if the process
# were killed between writing the step's files and committing them.
STALLED_SAVE = '''
import asyncio, os, sys
from orbax.checkpoint.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def stalled(self):
  if self._final_path.name == '20':
    print('finalizing 20', flush=True)
    await asyncio.sleep(600)
  return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = stalled
sys.argv = sys.argv[1:]
from switchmoe.main import run
run()
'''


def test_kill_9_during_async_save_resumes_from_the_previous_checkpoint(
    data_dir, corpus, compile_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  launcher = tmp_path / 'stalled_save.py'
  launcher.write_text(STALLED_SAVE)
  args = cli_args(workdir, data_dir, 30)
  process, out = start([sys.executable, str(launcher)] + args[1:], compile_cache)
  out.wait_for('finalizing 20')
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert checkpoint_steps(workdir) == [10]
  assert [n for n in os.listdir(checkpoints) if n.startswith('20.orbax-checkpoint-tmp')]
  killed = read_metrics(workdir)  # what the killed run logged, past step 10 too
  assert 20 in killed

  done = run_cli(args, compile_cache)  # the same command
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert f'Resumed from {checkpoints}/10' in done.stdout
  assert sorted(os.listdir(checkpoints)) == ['10', '20', '30']  # the partial save is gone
  resumed = read_metrics(workdir)
  assert sorted(resumed) == [5, 10, 15, 20, 25, 30]
  assert_same_metrics(killed, resumed, sorted(set(killed) & set(resumed)))


def test_sigterm_saves_the_current_step_and_the_same_command_resumes(
    data_dir, corpus, compile_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  args = cli_args(workdir, data_dir, 150, '--config.train.checkpoint_every=1000',
                  '--config.train.eval_every=1000')
  process, out = start(args, compile_cache)
  out.wait_for('step 10/150')
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  text = out.text()
  stopped = [line for line in text.splitlines() if line.startswith('Stopped by SIGTERM')]
  assert stopped, text[-3000:]
  step = int(stopped[0].split('after step ')[1].split(';')[0])
  assert 10 <= step < 150 and step in checkpoint_steps(workdir)
  assert max(read_metrics(workdir)) <= step

  done = run_cli(args, compile_cache)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert f'checkpoints/{step}' in done.stdout.split('Resumed from')[1].splitlines()[0]
  assert sorted(read_metrics(workdir)) == list(range(5, 151, 5))


def test_retention_keeps_newest_and_every_keep_period(data_dir, corpus, compile_cache,
                                                     tmp_path):
  workdir = str(tmp_path / 'run')
  train.train(run_config(data_dir, 30, checkpoint_every=5, keep_checkpoints=2, keep_period=10,
                         log_every=10, eval_every=30), workdir)
  assert checkpoint_steps(workdir) == [10, 20, 25, 30]


@pytest.fixture(scope='module')
def source_run(data_dir, corpus, compile_cache, tmp_path_factory):
  """A 10-step run to fine-tune from, export and evaluate."""
  workdir = str(tmp_path_factory.mktemp('source') / 'run')
  records = train.train(run_config(data_dir, 10), workdir)
  return workdir, records[-1]


def params_of(s, path, select=lambda name: True):
  with train.mesh_context(s):
    params, names = checkpoint_lib.load_params(path, s.abstract_state['params'], select)
  return {checkpoint_lib.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}, names


def test_init_from_loads_non_expert_params_into_another_model(data_dir, source_run, tmp_path):
  source, _ = source_run
  config = run_config(data_dir, 10, init_from=source, init_from_params='non_expert')
  config.model.moe.num_experts = 4  # experts and routers change shape; the rest is shared
  s = train.make_setup(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'fine_tune'), keep=1)
  with train.mesh_context(s):
    state, start = train.restore_or_init(s, checkpointer, None, lead=False)
  checkpointer.close()
  assert start == 0
  loaded = {checkpoint_lib.path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  reference, _ = params_of(train.make_setup(run_config(data_dir, 10)), source,
                           train.param_filter('non_expert'))
  for name, value in loaded.items():
    if '/experts/' in name or '/router/' in name:
      assert value.shape[0 if '/experts/' in name else 1] == 4
    else:
      np.testing.assert_array_equal(value, reference[name], err_msg=name)

  config.train.init_from_params = 'all'
  with pytest.raises(ValueError, match=r'train.init_from: parameter .*experts/wi is \(8, '):
    with train.mesh_context(s):
      train.restore_or_init(s, checkpoint_lib.Checkpointer(str(tmp_path / 'b'), keep=1),
                            None, lead=False)


def test_export_and_evaluate_any_checkpoint(data_dir, source_run, tmp_path, capsys):
  source, last = source_run
  export, evaluate = load_script('export'), load_script('evaluate')
  out = str(tmp_path / 'export')
  assert export.main([source, out, '--dtype=bfloat16']) == 0
  assert sorted(os.listdir(out)) == ['config.json', 'params']
  assert export.main([source, out]) == 2  # never overwrites

  s = train.make_setup(run_config(data_dir, 10))
  exported, _ = params_of(s, out)
  original, _ = params_of(s, os.path.join(source, 'checkpoints', '10'))
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value.astype(jax.numpy.bfloat16)
                                  .astype(np.float32), err_msg=name)

  capsys.readouterr()
  assert evaluate.main([source, '--batches=2']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['step'] == 10 and result['split'] == 'validation'
  np.testing.assert_allclose(result['eval/ce'], last['eval/ce'], rtol=1e-6)
  assert evaluate.main([out, '--split=train', '--batches=1',
                        '--config.model.moe.eval_capacity_factor=1.0']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['step'] is None and result['split'] == 'train' and result['eval/ce'] > 0
  assert evaluate.main([str(tmp_path / 'nothing')]) == 2
  assert 'not a run folder' in capsys.readouterr().err


def test_init_from_a_run_without_expert_biases_starts_them_at_zero(data_dir, source_run,
                                                                  tmp_path):
  source, _ = source_run
  config = run_config(data_dir, 10, init_from=source)
  config.model.moe.bias_update_rate = 0.001
  s = train.make_setup(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'fine_tune'), keep=1)
  with train.mesh_context(s):
    state, _ = train.restore_or_init(s, checkpointer, None, lead=False)
  checkpointer.close()
  loaded = {checkpoint_lib.path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  reference, _ = params_of(train.make_setup(run_config(data_dir, 10)), source)
  biases = [name for name in loaded if name.endswith('/expert_bias')]
  assert biases and all(not loaded[name].any() for name in biases)
  for name, value in reference.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def closed_loop_traceback() -> str:
  """The traceback tensorstore's late callbacks print after a failed restore, made here."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:  # from asyncio's frames on: the callers are tensorstore's C++
    return ''.join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
  raise AssertionError('a closed loop accepted a callback')


def test_a_failed_restores_tracebacks_are_dropped_even_cut_and_mixed(capfd):
  noise = closed_loop_traceback()
  # How threads printing at once leave them on descriptor 2: whole, and in pieces (the name,
  # ': ' and the message written apart), one thread's pieces between another's.
  pieces = [piece for line in noise.splitlines(keepends=True)
            for piece in line.partition(': ') if piece]
  rng = random.Random(0)
  mixed = []
  for _ in range(20):
    cut = rng.randrange(len(pieces))
    mixed += pieces[cut:] + ['\n'] + pieces[:cut]
  capfd.readouterr()
  with checkpoint_lib._without_closed_loop_noise():
    os.write(2, noise.encode())
    os.write(2, b'RuntimeError\n')  # what once reached CI's stderr
    os.write(2, b'a warning that is not noise\n')
    for piece in mixed:
      os.write(2, piece.encode())
  assert capfd.readouterr().err == 'a warning that is not noise\n'
