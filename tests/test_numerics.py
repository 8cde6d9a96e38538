"""Numerics guard (a NaN step is skipped and counted, or stops the run naming the step, and
nothing non-finite is saved), gradient clipping, and the FLOP count behind MFU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchmoe import flops, train
from switchmoe.model import LanguageModel
from switchmoe.optim import clip_by_global_norm
from tests.helpers import random_batch, tiny_config
from tests.train_helpers import checkpoint_steps, compile_cache, patch_batches, run_config


def nan_at(*steps):
  """A batch edit that makes the loss of batches ``steps`` NaN (through a loss weight)."""
  def edit(step, batch):
    if step in steps:
      weights = batch['decoder_loss_weights'].copy()
      weights[0, 0] = np.nan
      batch['decoder_loss_weights'] = weights
  return edit


def test_nonfinite_steps_are_skipped_and_counted(data_dir, corpus, compile_cache, tmp_path,
                                                 monkeypatch):
  patch_batches(monkeypatch, nan_at(3, 7))
  workdir = str(tmp_path / 'run')
  config = run_config(data_dir, 10, log_every=1, checkpoint_every=5, peak_flops=1e12)
  config.optim.grad_clip = 1.0
  records = {r['step']: r for r in train.train(config, workdir)}
  assert math.isnan(records[3]['train/loss']) and math.isnan(records[3]['train/grad_norm'])
  assert [records[s]['train/skipped_steps'] for s in range(1, 11)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
  # A skipped step leaves the parameters exactly as they were; others move them.
  assert records[3]['train/param_norm'] == records[2]['train/param_norm']
  assert records[7]['train/param_norm'] == records[6]['train/param_norm']
  assert records[4]['train/param_norm'] != records[3]['train/param_norm']
  assert all(math.isfinite(records[s]['train/param_norm']) for s in records)
  assert checkpoint_steps(workdir) == [5, 10]
  # MFU with an explicit peak: model FLOP/s per device over the peak.
  np.testing.assert_allclose(records[10]['perf/mfu'],
                             records[10]['perf/model_tflops_per_device'], rtol=1e-9)


def test_nonfinite_step_stops_the_run_before_saving(data_dir, corpus, compile_cache, tmp_path,
                                                    monkeypatch):
  patch_batches(monkeypatch, nan_at(7))
  workdir = str(tmp_path / 'run')
  config = run_config(data_dir, 20, nonfinite='stop', checkpoint_every=5)
  with pytest.raises(train.NonFiniteError, match='non-finite loss, gradients or update at step 7'):
    train.train(config, workdir)
  assert checkpoint_steps(workdir) == [5]  # detected at step 10, which was not saved


def test_clip_by_global_norm():
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}
  norm = jnp.float32(5.0)
  clipped = clip_by_global_norm(grads, norm, 1.0)
  np.testing.assert_allclose(float(jnp.sqrt(sum(jnp.sum(g * g) for g in
                                                jax.tree.leaves(clipped)))), 1.0, rtol=1e-6)
  assert clip_by_global_norm(grads, norm, 10.0)['a'][0] == 3.0  # below the limit: unchanged
  assert clip_by_global_norm(grads, norm, 0.0) is grads  # 0 = off


def xla_forward_flops(config) -> float:
  """XLA's own FLOP count of the model's forward pass on one batch."""
  graphdef, state = nnx.split(LanguageModel(config.model, rngs=nnx.Rngs(0)))
  forward = lambda state, batch: nnx.merge(graphdef, state)(batch, deterministic=True)[0]
  analysis = jax.jit(forward).lower(state, random_batch(config)).compile().cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)['flops']


@pytest.mark.parametrize('arch', ['encoder_decoder', 'decoder'])
def test_dense_flops_match_xla_cost_analysis(arch):
  c = tiny_config(arch, every=0)
  m = c.model
  m.d_model, m.d_ff, m.num_heads, m.d_kv = 256, 1024, 4, 64  # matmuls dominate
  c.train.batch_size = 4
  analytic = flops.train_step_flops(c) / 3
  assert analytic == pytest.approx(xla_forward_flops(c), rel=0.02)


def test_switch_flops_count_active_experts_only():
  dense, switch = tiny_config(every=0), tiny_config(every=1)
  m = switch.model
  d, e, tokens = m.d_model, m.moe.num_experts, switch.train.batch_size * (
      switch.data.inputs_length + switch.data.targets_length)
  layers = m.num_layers  # per stack; each Switch layer adds only its router to the dense cost
  assert flops.train_step_flops(switch) - flops.train_step_flops(dense) == pytest.approx(
      3 * 2 * d * e * tokens * layers)
  ffn = 2 * 3 * d * m.d_ff  # GEGLU: two input matmuls and one output matmul
  top2 = tiny_config(every=1, router='topk', num_selected=2)
  assert flops.train_step_flops(top2) - flops.train_step_flops(switch) == pytest.approx(
      3 * ffn * tokens * layers)
  assert flops.experts_per_token(tiny_config(router='experts_choose').model.moe) == 1.25
  shared = tiny_config(every=1, num_shared_experts=2)  # every token also runs 2 dense FFNs
  assert flops.train_step_flops(shared) - flops.train_step_flops(switch) == pytest.approx(
      3 * 2 * ffn * tokens * layers)


def test_shared_expert_flops_match_xla_cost_analysis():
  """What shared experts add, counted by XLA: the Switch layers' dispatch, which the analytic
  count leaves out, is the same with and without them and cancels."""
  def config(num_shared):
    c = tiny_config('decoder', every=1, num_experts=4, group_size=64,
                    num_shared_experts=num_shared)
    m = c.model
    m.d_model, m.d_ff, m.num_heads, m.d_kv = 256, 1024, 4, 64  # matmuls dominate
    c.train.batch_size = 4
    return c
  analytic = (flops.train_step_flops(config(2)) - flops.train_step_flops(config(0))) / 3
  xla = xla_forward_flops(config(2)) - xla_forward_flops(config(0))
  assert analytic == pytest.approx(xla, rel=0.02)


@pytest.mark.parametrize('kind, peak', [('NVIDIA H100 80GB HBM3', 989e12),
                                        ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989e12),
                                        ('NVIDIA A100-SXM4-40GB', 312e12), ('TPU v4', 275e12),
                                        ('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
                                        ('cpu', None)])
def test_peak_flops_table(kind, peak):
  assert flops.peak_flops(kind) == peak
