"""Logical-axis rules, mesh construction, and sharded runs equal to single-device runs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from switchmoe import sharding, train
from switchmoe.checkpoint import Checkpointer
from switchmoe.model import LanguageModel, loss_and_metrics
from tests.helpers import random_batch, tiny_config

AXES = ('data', 'fsdp', 'expert', 'model')


def test_rules_skip_mesh_axes_already_used():
  assert sharding.logical_to_spec(('batch', 'length', 'embed'), AXES) == P(
      ('data', 'fsdp', 'expert'), None, None)
  assert sharding.logical_to_spec(('expert', 'embed', 'mlp'), AXES) == P('expert', 'fsdp',
                                                                          'model')
  # Inside the expert buffer `expert` is taken first, so `batch` keeps only data and fsdp.
  assert sharding.logical_to_spec(('expert', 'batch', None, 'embed'), AXES) == P(
      'expert', ('data', 'fsdp'), None, None)


def test_rules_ignore_axes_missing_from_mesh_and_accept_overrides():
  assert sharding.logical_to_spec(('batch', 'embed'), ('data', 'expert')) == P(
      ('data', 'expert'), None)
  rules = sharding.merge_rules([('embed', 'model'), ('batch', None)])
  assert sharding.logical_to_spec(('batch', 'embed'), AXES, rules) == P(None, 'model')
  with pytest.raises(KeyError, match='nonexistent'):
    sharding.logical_to_spec(('nonexistent',), AXES)
  with pytest.raises(ValueError, match='mesh.rules'):
    sharding.merge_rules([('embed',)])


def test_make_mesh_fills_and_rejects():
  mesh = sharding.make_mesh((-1, 2), ('data', 'expert'))
  assert dict(mesh.shape) == {'data': 4, 'expert': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  for shape, axes, message in [((16,), ('data',), 'needs 16 devices'),
                               ((-1, 3), ('data', 'expert'), 'do not divide'),
                               ((2, 2), ('data', 'bogus'), 'mesh.axes'),
                               ((-1, -1), ('data', 'expert'), 'at most one -1'),
                               ((2,), ('data', 'expert'), 'differ in length')]:
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(shape, axes)


def test_every_parameter_has_logical_axes():
  model = nnx.eval_shape(lambda: LanguageModel(tiny_config().model, rngs=nnx.Rngs(0)))
  _, abstract = nnx.split(model)
  mesh = sharding.make_mesh((2, 4), ('data', 'expert'))
  shardings = sharding.state_shardings(abstract, mesh)  # raises if any parameter lacks axes
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(abstract))
  experts = shardings['decoder']['layers'][0]['ffn']['experts']
  assert experts['wi'].spec == P('expert', None, None)


def assert_same_run(sharded, single):
  """(loss, grads, state after 2 steps) of two runs agree. Float32 sums in another order:
  allow 1e-3 of each tensor's scale; a wrong layout is off by O(1)."""
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                  atol=1e-3 * np.abs(b).max() + 1e-7)
  (loss8, grads8, state8), (loss1, grads1, state1) = sharded, single
  close(loss8, loss1)
  jax.tree.map(close, grads8, grads1)
  jax.tree.map(close, jax.device_get(state8['params']), jax.device_get(state1['params']))


def test_dropless_sharded_matches_single_device(single_device_dropless):
  """Dropless with experts over a (2, 4) data x expert mesh, exchanged by hand
  (`expert_parallel.dropless`, the padded all-to-all on CPU), equals one device."""
  loss1, grads1, state1 = single_device_dropless
  c = layout_config(dispatch='dropless')
  c.mesh.shape, c.mesh.axes, c.mesh.expert_parallel = (2, 4), ('data', 'expert'), 'shard_map'
  _, loss8, grads8, state8, hlo = _loss_and_grads(c, jax.devices()[:8], random_batch(c))
  assert_same_run((loss8, grads8, state8), (loss1, grads1, state1))
  assert 'all-to-all' in hlo


@pytest.fixture(scope='module')
def single_device_dropless():
  c = layout_config(dispatch='dropless')
  return _loss_and_grads(c, jax.devices()[:1], random_batch(c))[1:4]


def _loss_and_grads(c, devices, batch):
  s = train.make_setup(c, devices)
  with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
    state = s.init(jax.random.key(0))

    @jax.jit
    def f(params, batch):
      return jax.value_and_grad(lambda p: loss_and_metrics(
          nnx.merge(s.graphdef, p), batch, deterministic=False,
          rngs=nnx.Rngs(dropout=1, jitter=2))[0])(params)

    batch = train.device_batch(s, batch)
    loss, grads = f(state['params'], batch)
    step = s.train_step.lower(state, batch).compile()
    for _ in range(2):
      state, _ = step(state, batch)
  return s, jax.device_get(loss), jax.device_get(grads), state, step.as_text()


def layout_config(num_experts=8, **moe):
  # 16-token groups: 8 decoder groups, enough to split over an 8-way expert axis.
  c = tiny_config(exploration='input_jitter', jitter=0.01, num_experts=num_experts,
                  group_size=16, capacity_factor=1.0, **moe)
  c.model.dropout_rate, c.model.num_layers = 0.1, 1
  return c


@pytest.fixture(scope='module')
def single_device():
  """Reference results per expert count: one device, no mesh axes beyond size 1."""
  cache = {}

  def get(num_experts):
    if num_experts not in cache:
      c = layout_config(num_experts)
      cache[num_experts] = _loss_and_grads(c, jax.devices()[:1], random_batch(c))[1:4]
    return cache[num_experts]

  return get


LAYOUTS = [((8,), ('data',)), ((2, 4), ('data', 'expert')), ((8,), ('expert',)),
           ((2, 2, 2), ('data', 'expert', 'model')), ((4, 2), ('fsdp', 'expert'))]


# The default run covers each mechanism once (GSPMD over data x expert; the all-to-all by
# hand, here with a model axis too); the rest of the matrix is marked slow (run by .ci/run,
# or with `pytest -m slow`).
FAST = {(LAYOUTS[1], 8, 'gspmd'), (LAYOUTS[3], 8, 'shard_map')}
CASES = [(layout, e, impl) for layout, e in [(l, 8) for l in LAYOUTS] +
         [(((8,), ('expert',)), 4), (((2, 4), ('data', 'expert')), 16)]
         for impl in ('gspmd', 'shard_map') if impl == 'gspmd' or 'expert' in layout[1]]


# `auto` dispatch is `einsum` once experts span an expert axis; `gather` is checked there too.
@pytest.mark.parametrize('layout,num_experts,expert_parallel,dispatch', [
    *(pytest.param(*case, 'auto', marks=() if case in FAST else pytest.mark.slow)
      for case in CASES),
    *(pytest.param(LAYOUTS[1], 8, impl, 'gather', marks=pytest.mark.slow)
      for impl in ('gspmd', 'shard_map'))])
def test_sharded_matches_single_device(single_device, layout, num_experts, expert_parallel,
                                       dispatch):
  shape, axes = layout
  loss1, grads1, state1 = single_device(num_experts)
  c = layout_config(num_experts)
  c.mesh.shape, c.mesh.axes, c.mesh.expert_parallel = shape, axes, expert_parallel
  c.model.moe.dispatch = dispatch
  s, loss8, grads8, state8, hlo = _loss_and_grads(c, jax.devices()[:8], random_batch(c))
  assert_same_run((loss8, grads8, state8), (loss1, grads1, state1))
  n_expert = dict(zip(axes, shape)).get('expert', 1)
  wi = state8['params']['encoder']['layers'][0]['ffn']['experts']['wi']
  assert wi.shape[0] == num_experts
  # Each device holds 1/n of the experts; with fewer experts than devices they are replicated.
  expected = num_experts // n_expert if num_experts >= n_expert else num_experts
  assert {shard.data.shape[0] for shard in wi.addressable_shards} == {expected}
  if n_expert > 1 and (expert_parallel == 'shard_map' or num_experts >= n_expert):
    assert 'all-to-all' in hlo


def test_batch_not_divisible_by_batch_devices_is_rejected():
  c = tiny_config()
  c.train.batch_size = 4
  c.mesh.shape, c.mesh.axes = (8,), ('data',)
  with pytest.raises(ValueError, match='train.batch_size=4'):
    train.make_setup(c)


def test_checkpoint_restores_on_another_mesh(tmp_path):
  """Saved with experts over 4 devices, restored with 8 experts per device-pair and with all
  experts on one device: the values are the same, the layout is the new mesh's."""
  c = layout_config()
  c.mesh.shape, c.mesh.axes = (2, 4), ('data', 'expert')
  saved = train.make_setup(c, jax.devices()[:8])
  with train.mesh_context(saved):
    state = saved.init(jax.random.key(0))
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(1, state, {}, {})
  checkpointer.wait()
  for shape, axes, devices in [((1, 8), ('data', 'expert'), 8), ((2, 2), ('fsdp', 'expert'), 4),
                               ((1,), ('data',), 1)]:
    c.mesh.shape, c.mesh.axes = shape, axes
    other = train.make_setup(c, jax.devices()[:devices])
    with train.mesh_context(other):
      restored, _ = checkpointer.restore(1, other.abstract_state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
                 jax.device_get(state))
    wi = restored['params']['decoder']['layers'][0]['ffn']['experts']['wi']
    n_expert = dict(zip(axes, shape))['expert'] if 'expert' in axes else 1
    assert {s.data.shape[0] for s in wi.addressable_shards} == {8 // n_expert}
  checkpointer.close()
