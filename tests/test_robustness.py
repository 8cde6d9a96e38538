"""What a cluster does to a run, by fault injection: a second launch on the same workdir,
damaged checkpoints, a start that fails, torn or stale metrics, a failing save, numerics that
overflow, a signal during start-up, bad paths and config files, a changed corpus. Each case
checks the exit code or error, its one line, and that nothing was lost."""

import json
import os
import shutil
import signal
import time

import pytest

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import metrics as metrics_lib
from switchmoe import train
from switchmoe import workdir as workdir_lib
from tests.train_helpers import (CLI, assert_same_metrics, checkpoint_steps, cli_args,
                                 compile_cache, load_script, read_metrics, run_cli, run_config,
                                 start)

assert compile_cache  # a fixture, used by name below


def one_line_error(stderr: str) -> str:
  """The single ``error:`` line of a failed command (and nothing else on stderr)."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------- the lock


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
  said = []
  with workdir_lib.Lock(str(tmp_path), announce=said.append):
    holder = json.loads((tmp_path / 'lock').read_text())
    assert holder['pid'] == os.getpid() and holder['host'] and holder['started']
    with pytest.raises(workdir_lib.LockHeld, match=rf'in use by pid {os.getpid()} on '):
      with workdir_lib.Lock(str(tmp_path)):
        pass
  assert (tmp_path / 'lock').read_text() == ''  # released: emptied, not deleted
  assert not said
  # What a SIGKILLed holder leaves: its line in the file, but no lock (the kernel dropped it).
  (tmp_path / 'lock').write_text('{"host": "node7", "pid": 4242, "started": "yesterday"}\n')
  with workdir_lib.Lock(str(tmp_path), announce=said.append):
    pass
  assert said == [f'Took over {tmp_path}/lock from pid 4242 on node7, started yesterday, which '
                  'is no longer running']


def test_a_second_launch_on_a_busy_workdir_exits_3_and_touches_nothing(data_dir,
                                                                       compile_cache, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lib.Lock(str(workdir)):
    done = run_cli(cli_args(str(workdir), data_dir, 10), compile_cache)
  assert done.returncode == 3, done.stderr[-3000:]
  assert f'--workdir={workdir}: in use by pid {os.getpid()}' in one_line_error(done.stderr)
  assert sorted(os.listdir(workdir)) == ['lock']


# ----------------------------------------------------------------------------- checkpoints


def damage(step_folder: str, how: str) -> None:
  """'truncate' every array file of the step, or 'empty' its folder."""
  for root, _, names in os.walk(step_folder):
    for name in names:
      path = os.path.join(root, name)
      if how == 'empty':
        os.remove(path)
      elif os.sep + 'd' + os.sep in path:  # the OCDBT data files holding the arrays
        os.truncate(path, 10)


def test_damaged_checkpoints_are_set_aside_and_the_newest_good_one_resumes(
    data_dir, corpus, compile_cache, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  straight = {r['step']: r for r in train.train(run_config(data_dir, 30), workdir)}
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert checkpoint_steps(workdir) == [10, 20, 30]
  damage(os.path.join(checkpoints, '30'), 'truncate')
  damage(os.path.join(checkpoints, '20'), 'empty')
  capsys.readouterr()

  resumed = {r['step']: r for r in train.train(run_config(data_dir, 30), workdir)}
  out = capsys.readouterr().out
  for step in (30, 20):
    assert (f'Checkpoint {checkpoints}/{step} does not restore (' in out
            and f'moved it to {checkpoints}/{step}.corrupt and resumed from step 10' in out)
  assert f'Resumed from {checkpoints}/10' in out
  assert sorted(os.listdir(checkpoints)) == ['10', '20', '20.corrupt', '30', '30.corrupt']
  assert_same_metrics(straight, resumed, [15, 20, 25, 30])  # exactly the lost steps, again
  assert sorted(read_metrics(workdir)) == [5, 10, 15, 20, 25, 30]

  # With no step left that restores: one line, exit 1, and nothing moved or deleted.
  for step in ('10', '20', '30'):
    damage(os.path.join(checkpoints, step), 'truncate')
  before = sorted(os.listdir(checkpoints))
  done = run_cli(cli_args(workdir, data_dir, 40), compile_cache)
  assert done.returncode == 1, done.stderr[-3000:]
  line = one_line_error(done.stderr)
  assert line.startswith(f'error: {checkpoints}: none of its 3 checkpoint(s) restores (step 30: ')
  assert 'nothing was moved or deleted' in line
  assert sorted(os.listdir(checkpoints)) == before
  log = line.rsplit('(traceback: ', 1)[1].rstrip(')')
  assert log.startswith(os.path.join(workdir, 'logs', 'error-'))
  assert 'Traceback' in open(log).read()


def test_a_failed_background_save_stops_the_run_at_the_next_step(data_dir, corpus, compile_cache,
                                                                 tmp_path, monkeypatch):
  """Like a full disk: the save of step 10 fails in orbax's writer thread."""
  real = checkpoint_lib.Checkpointer.save

  def unwritable_at_10(self, step, state, data_state, *args):
    return real(self, step, state, {'x': object()} if step == 10 else data_state, *args)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', unwritable_at_10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'^saving a checkpoint in .*/checkpoints failed: TypeError: Object of '
                           r'type object is not JSON serializable$'):
    train.train(run_config(data_dir, 30, log_every=1), workdir)
  assert max(read_metrics(workdir)) < 20  # reported by the steps after 10, not the next save
  assert checkpoint_steps(workdir) == []


# ----------------------------------------------------------------------------- failed starts


def test_a_start_refused_for_its_size_leaves_nothing_that_blocks_the_next(
    data_dir, corpus, compile_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  done = run_cli(cli_args(workdir, data_dir, 10, '--config.model.vocab_size=1000000000'),
                 compile_cache)
  assert done.returncode == 2, done.stderr[-3000:]
  line = one_line_error(done.stderr)
  assert ('error: model: parameters, gradients and optimizer state need ' in line
          and 'GiB per device, more than the ' in line and '(1000000000, 32)' in line)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  # The right command on the same workdir is not refused for what the failed one was.
  assert train.train(run_config(data_dir, 10), workdir)[-1]['step'] == 10


def test_sigterm_during_start_up_exits_0_with_a_line(data_dir, compile_cache, tmp_path):
  workdir = tmp_path / 'run'
  process, out = start(cli_args(str(workdir), data_dir, 10), compile_cache)
  lock, deadline = workdir / 'lock', time.monotonic() + 120
  while not (lock.exists() and lock.read_text().strip()):  # taken after the handlers are in
    assert time.monotonic() < deadline and process.poll() is None, out.text()
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  assert 'Stopped by SIGTERM during start-up, before the first step; nothing to save' in out.text()
  assert not os.path.exists(workdir / 'checkpoints') or not checkpoint_steps(str(workdir))


# ----------------------------------------------------------------------------- metrics


def test_metrics_start_over_with_the_run_and_survive_a_torn_line(data_dir, corpus, compile_cache,
                                                                tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  # An attempt killed before its first checkpoint logged steps 1-7, the last one torn.
  lines = [json.dumps({'step': s, 'train/loss': 9.0}) for s in range(1, 8)]
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 8, "train/lo')
  train.train(run_config(data_dir, 10), str(workdir))
  assert sorted(read_metrics(str(workdir))) == [5, 10]  # this run's steps only, once each
  assert read_metrics(str(workdir))[5]['train/loss'] != 9.0
  # A torn last line of the run's own: dropped with a warning, and the resume goes on.
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 12, "train/lo')
  capsys.readouterr()
  train.train(run_config(data_dir, 20), str(workdir))
  assert f'warning: {workdir}/metrics.jsonl line 3: dropped a torn last line' in (
      capsys.readouterr().err)
  assert sorted(read_metrics(str(workdir))) == [5, 10, 15, 20]


def test_the_resume_rewrite_of_metrics_is_all_or_nothing(tmp_path, monkeypatch):
  path = tmp_path / 'metrics.jsonl'
  text = ''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 20_001))
  path.write_text(text)

  def killed(*args):
    raise KeyboardInterrupt  # the moment before the rename, where a SIGKILL would land

  monkeypatch.setattr(metrics_lib.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    metrics_lib.MetricWriter(str(tmp_path), start=100)
  assert path.read_text() == text  # the old history, whole
  monkeypatch.undo()
  metrics_lib.MetricWriter(str(tmp_path), start=100).close()
  assert [r['step'] for r in metrics_lib.read_metrics(str(path))] == list(range(1, 101))


def test_a_damaged_metrics_line_is_named(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=rf'^{path} line 2: '):
    metrics_lib.read_metrics(str(path))


# ----------------------------------------------------------------------------- numerics


def test_an_overflowing_update_is_skipped_and_a_skip_streak_stops_the_run(
    data_dir, corpus, compile_cache, tmp_path):
  """With learning rate 1e30 the loss and gradients are finite but the update is not."""
  c = run_config(data_dir, 20, log_every=1, max_skipped_steps=3)
  c.optim.learning_rate = 1e30
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteError, match=r'^steps 1-3 were all skipped \(non-finite '
                     r'loss, gradients or update; train\.max_skipped_steps=3\); not saving'):
    train.train(c, workdir)
  records = read_metrics(workdir)
  assert records[1]['train/skipped_steps'] == 1 and records[1]['train/loss'] < 100
  assert checkpoint_steps(workdir) == []


def test_a_run_whose_every_step_is_skipped_saves_nothing(data_dir, corpus, compile_cache,
                                                         tmp_path):
  c = run_config(data_dir, 6, checkpoint_every=2)
  c.model.init_scale = 1e30
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteError, match=r'^all 6 steps of this run were skipped'):
    train.train(c, workdir)
  assert checkpoint_steps(workdir) == []


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('text, message', [
    (None, 'no such config file'),
    ('def get_config(:\n', 'line 1: SyntaxError: invalid syntax'),
    ('def get_config():\n  return {}[0]\n', 'line 2: KeyError: 0'),
], ids=['missing', 'syntax', 'raises'])
def test_a_config_file_that_does_not_load_is_one_line(text, message, tmp_path, compile_cache):
  path = tmp_path / 'config.py'
  if text is not None:
    path.write_text(text)
  done = run_cli(CLI + [f'--config={path}', f'--workdir={tmp_path}/run'], compile_cache)
  assert done.returncode == 2
  assert one_line_error(done.stderr) == f'error: --config={path}: {message}'
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('workdir, message', [
    ('', "--workdir='': needs a folder path"),
    ('{tmp}/file', '--workdir={tmp}/file: is a file, not a folder'),
    ('{tmp}/file/run', '--workdir={tmp}/file/run: cannot create it (Not a directory'),
])
def test_a_workdir_that_cannot_be_one_is_refused_in_one_line(workdir, message, data_dir,
                                                             tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='^' + message.format(tmp=tmp_path).replace('(', r'\(')):
    train.train(run_config(data_dir, 10), workdir.format(tmp=tmp_path))


def test_evaluate_and_export_of_a_damaged_checkpoint_are_one_line(data_dir, corpus,
                                                                  compile_cache, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  train.train(run_config(data_dir, 10), workdir)
  step = os.path.join(workdir, 'checkpoints', '10')
  damage(step, 'empty')
  evaluate, export = load_script('evaluate'), load_script('export')
  assert evaluate.main([workdir]) == 2
  assert capsys.readouterr().err.startswith(f'error: {step}/config/metadata: cannot read')
  assert export.main([step, str(tmp_path / 'out')]) == 2
  assert capsys.readouterr().err.startswith(f'error: {step}/config/metadata: cannot read')
  assert evaluate.main([workdir, '--batches=0']) == 2
  assert capsys.readouterr().err == 'error: --batches=0: must be >= 1\n'


@pytest.mark.slow  # two more runs; .ci/run runs it after the default suite
def test_a_changed_files_corpus_is_refused_on_resume(data_dir, compile_cache, tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  for i in range(3):
    (folder / f'{i}.txt').write_text('\n\n'.join(f'doc {i} {j} ' + 'word ' * 200
                                                 for j in range(40)))

  def config(steps):
    c = run_config(str(tmp_path / 'tfds'), steps)
    c.data.update(source='files', files=f'{folder}/*.txt')
    return c

  workdir = str(tmp_path / 'run')
  train.train(config(10), workdir)
  with open(folder / '1.txt', 'a') as f:
    f.write('\n\nan edit between restarts')
  with pytest.raises(ValueError, match=(
      rf'^data\.files: --workdir={workdir} holds a run \(checkpoint 10\) trained on files:\w+, '
      r'but this config reads files:\w+; allowed: the same data \(to resume that run\), or a new '
      rf'--workdir with --config\.train\.init_from={workdir} to go on')):
    train.train(config(20), workdir)
  assert checkpoint_steps(workdir) == [10]


@pytest.mark.slow  # two more runs; .ci/run runs it after the default suite
def test_a_checkpoint_older_than_a_state_counter_resumes_with_it_at_0(data_dir, corpus,
                                                                       compile_cache, tmp_path):
  """Checkpoints written before ``skipped_in_a_row`` existed still resume, exactly."""
  straight = {r['step']: r for r in train.train(run_config(data_dir, 20), str(tmp_path / 'a'))}
  workdir = str(tmp_path / 'b')
  train.train(run_config(data_dir, 10), workdir)
  s = train.make_setup(run_config(data_dir, 10))
  step_10 = os.path.join(workdir, 'checkpoints', '10')
  with open(os.path.join(step_10, 'config', 'metadata')) as f:
    config = json.load(f)
  with train.mesh_context(s):  # rewrite step 10 as an older version saved it
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    state, data_state = checkpointer.restore(10, s.abstract_state)
    checkpointer.close()
    shutil.rmtree(step_10)
    old = {k: v for k, v in state.items() if k != 'skipped_in_a_row'}
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=3)
    checkpointer.save(10, old, data_state, config)
    checkpointer.wait()
    restored, _ = checkpointer.restore(10, s.abstract_state)
    checkpointer.close()
  assert int(restored['skipped_in_a_row']) == 0
  resumed = {r['step']: r for r in train.train(run_config(data_dir, 20), workdir)}
  assert_same_metrics(straight, resumed, [15, 20])
