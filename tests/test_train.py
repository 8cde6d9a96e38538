"""End-to-end training: the loss falls, outputs and metrics are complete, a stopped and
resumed run repeats a straight run bit for bit, the CLI works, plots are drawn."""

import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import train
from tests.helpers import random_batch, tiny_config
from tests.train_helpers import (assert_same_metrics, checkpoint_steps, cli_args,
                                 compile_cache, load_script, patch_batches, read_metrics,
                                 run_cli, run_config)

plot = load_script('plot')


def test_training_lowers_loss_and_writes_outputs(data_dir, corpus, compile_cache, tmp_path,
                                                 capsys):
  workdir = str(tmp_path / 'run')
  records = train.train(run_config(data_dir, 40, profile_steps=2), workdir)
  first, last = records[0], records[-1]
  assert last['train/ce'] < first['train/ce'] - 0.5
  assert last['eval/ce'] < records[1]['eval/ce']
  assert last['eval/neg_log_perplexity'] == -last['eval/ce']
  for key in ('train/loss', 'train/ce', 'train/load_balance', 'train/z_loss',
              'train/dropped_fraction', 'train/accuracy', 'train/grad_norm',
              'train/param_norm', 'train/update_norm', 'train/learning_rate',
              'train/skipped_steps', 'perf/tokens_per_sec', 'perf/step_time',
              'perf/model_tflops_per_device', 'eval/ce', 'eval/accuracy',
              'moe/encoder/layer_0/expert_fraction_E', 'moe/decoder/layer_1/confidence'):
    assert key in last, key
  assert 'perf/mfu' not in last  # a CPU has no peak to compare with
  assert last['train/skipped_steps'] == 0
  np.testing.assert_allclose(
      last['train/loss'], last['train/ce'] + last['train/load_balance'] + last['train/z_loss'],
      rtol=1e-5)
  assert read_metrics(workdir)[40]['train/loss'] == last['train/loss']
  assert checkpoint_steps(workdir) == [20, 30, 40]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  assert glob.glob(os.path.join(workdir, 'profile', '**', '*.xplane.pb'), recursive=True)
  out = capsys.readouterr().out
  assert '[####################] step 40/40' in out and 'ETA 0:00:00' in out
  assert 'Profiled steps 2-3' in out

  png = str(tmp_path / 'curves.png')
  assert plot.main([workdir, workdir + '/', '--out', png]) == 0
  assert os.path.getsize(png) > 10_000


def test_expert_bias_moves_by_balancing_not_by_the_optimizer_and_is_checkpointed(
    compile_cache, tmp_path):
  rate = 0.01
  c = tiny_config('decoder', num_experts=4, bias_update_rate=rate)
  c.model.num_layers = 1
  s = train.make_setup(c, jax.devices()[:1])
  bias_of = lambda state: np.asarray(
      state['params']['decoder']['layers'][0]['ffn']['router']['expert_bias'])
  with train.mesh_context(s):
    state = s.init(jax.random.key(0))
    opt_names = [checkpoint_lib.path_name(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]]
    assert opt_names and not any('expert_bias' in name for name in opt_names)
    before = jax.device_get(state)
    batch = train.device_batch(s, random_batch(c))
    state, metrics = s.train_step(state, batch)
    after = jax.device_get(state)
    stats = jax.device_get(metrics['moe']['decoder/layer_0'])
    # Exactly one balancing step from zero: no gradient or optimizer update reaches the bias.
    selected = stats['selected_fraction_E']
    np.testing.assert_array_equal(bias_of(after),
                                  np.float32(rate) * np.sign(selected.mean() - selected))
    assert np.any(bias_of(after) != 0) and stats['expert_bias_max'] == 0
    router = lambda st: st['params']['decoder']['layers'][0]['ffn']['router']['kernel']
    assert np.any(router(after) != router(before))  # while the weights did train

    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
    checkpointer.save(1, state, {}, {})
    checkpointer.wait()
    restored, _ = checkpointer.restore(1, s.abstract_state)
    checkpointer.close()
    np.testing.assert_array_equal(bias_of(restored), bias_of(after))

    # A skipped (non-finite) step leaves the bias where it was, like the weights.
    experts = restored['params']['decoder']['layers'][0]['ffn']['experts']
    experts['wo'] = experts['wo'] * np.nan
    skipped, _ = s.train_step(restored, batch)
    assert int(skipped['skipped_steps']) == 1
    np.testing.assert_array_equal(bias_of(jax.device_get(skipped)), bias_of(after))


def stop_at(step):
  """A batch edit that sends this process SIGTERM while batch ``step`` is read."""
  def edit(current, batch):
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)
  return edit


def test_stopped_and_resumed_run_repeats_the_straight_run(data_dir, corpus, compile_cache,
                                                          tmp_path, monkeypatch, capsys):
  straight = str(tmp_path / 'straight')
  train.train(run_config(data_dir, 20), straight)

  resumed = str(tmp_path / 'resumed')
  with monkeypatch.context() as patch:
    patch_batches(patch, stop_at(13))  # preempted between checkpoints
    train.train(run_config(data_dir, 20), resumed)
  assert 'Stopped by SIGTERM after step 13' in capsys.readouterr().out
  assert checkpoint_steps(resumed) == [10, 13]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back

  train.train(run_config(data_dir, 20), resumed)  # same call: resumes at step 13
  assert 'Resumed from' in capsys.readouterr().out
  a, b = read_metrics(straight), read_metrics(resumed)
  assert sorted(b) == sorted(a) == [5, 10, 15, 20]
  assert_same_metrics(a, b, [5, 10, 15, 20])


def test_a_finished_run_ends_saying_where_its_outputs_are(data_dir, corpus, compile_cache,
                                                          tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # a relative workdir: the paths printed are absolute
  with monkeypatch.context() as patch:
    patch_batches(patch, stop_at(1))
    train.train(run_config(data_dir, 2), 'run')
  assert capsys.readouterr().out.splitlines()[-1].startswith('Stopped by SIGTERM after step 1;')
  train.train(run_config(data_dir, 2), 'run')
  assert capsys.readouterr().out.splitlines()[-1] == (
      f'Done: checkpoint {tmp_path}/run/checkpoints/2, metrics {tmp_path}/run/metrics.jsonl, '
      f'TensorBoard events {tmp_path}/run/events.out.tfevents.*')


def test_cli_trains_and_rejects_bad_config(data_dir, corpus, compile_cache, tmp_path):
  workdir = str(tmp_path / 'cli')
  done = run_cli(cli_args(workdir, data_dir, 2), compile_cache)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'step 2/2' in done.stdout
  assert checkpoint_steps(workdir) == [2]
  assert read_metrics(workdir)[2]['train/ce'] > 0

  bad = run_cli(cli_args(tmp_path / 'bad', data_dir, 2,
                         '--config.model.moe.capacity_factor=0'), compile_cache)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      'error: model.moe.capacity_factor=0.0: must be > 0')
  assert not os.path.exists(tmp_path / 'bad')


@pytest.mark.parametrize('override, message', [
    ('--config.train.num_stepz=3', "error: train.num_stepz='3': unknown field (did you mean "
                                   'num_steps?); allowed: batch_size, checkpoint_every'),
    ('--config.train.batch_size=eight', 'error: config.train.batch_size=eight: invalid '
                                        'literal for int()'),
])
def test_cli_rejects_unknown_fields_and_bad_values(data_dir, compile_cache, tmp_path,
                                                   override, message):
  bad = run_cli(cli_args(tmp_path / 'bad', data_dir, 2, override), compile_cache)
  assert bad.returncode == 2
  assert bad.stderr.strip().startswith(message), bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'bad')


@pytest.mark.parametrize('moe', [
    {'dispatch': 'gather'},
    {'dispatch': 'einsum'},
    {'dispatch': 'dropless', 'dropless_impl': 'bucketed'},  # a loop of data-dependent length
])
def test_steps_compile_once_and_never_reach_the_host(moe):
  """After the first step, new batches reuse the one compiled step (no recompilation), and
  a step moves nothing between host and device but the batch it is given (transfer guard) and
  calls back to no host code."""
  c = tiny_config(**moe)
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    state = s.init(jax.random.key(0))
    state, _ = s.train_step(state, train.device_batch(s, random_batch(c, 0)))
    batches = [train.device_batch(s, random_batch(c, seed)) for seed in (1, 2, 3)]
    with jax.transfer_guard('disallow'):
      for batch in batches:
        state, metrics = s.train_step(state, batch)
    hlo = s.train_step.lower(state, batches[0]).as_text()
  assert s.train_step._cache_size() == 1
  assert np.isfinite(float(metrics['loss']))
  assert 'callback' not in hlo.lower()


def test_new_weights_need_no_finite_check_of_their_own():
  """`train.apply_gradients` skips a step on its update's norm, not on its new weights (a
  pass over every parameter saved): each entry of a float32 update whose norm is finite is at
  most sqrt(float32 max), and adding that to any finite float32 weight, the largest included,
  cannot overflow. Weights are always float32, bfloat16 runs included."""
  c = tiny_config()
  c.model.dtype = 'bfloat16'
  s = train.make_setup(c, jax.devices()[:1])
  assert {x.dtype for x in jax.tree.leaves(s.abstract_state['params'])} == {np.dtype('float32')}
  big = jnp.finfo(jnp.float32).max
  finite_norm = lambda x: bool(jnp.isfinite(optax.tree.norm(x)))
  u = jnp.sqrt(big)  # the largest entry of an update with a finite norm, to the last ulp:
  while not finite_norm(u):
    u = jnp.nextafter(u, jnp.float32(0))
  while finite_norm(jnp.nextafter(u, big)):
    u = jnp.nextafter(u, big)
  assert 1.8e19 < u < 1.9e19
  assert jnp.isfinite(big + u) and jnp.isfinite(-big - u)
