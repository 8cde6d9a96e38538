"""Logical-axis rules, mesh construction, and sharded runs equal to single-device runs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from switchmoe import sharding, train
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


def _loss_and_grads(c, devices, batch):
  s = train.make_setup(c, devices)
  with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
    state = s.init(jax.random.key(0))

    @jax.jit
    def f(params, batch):
      return jax.value_and_grad(lambda p: loss_and_metrics(
          nnx.merge(s.graphdef, p), batch, deterministic=False,
          rngs=nnx.Rngs(dropout=1, jitter=2))[0])(params)

    loss, grads = f(state['params'], train.device_batch(s, batch))
    for _ in range(2):
      state, _ = s.train_step(state, train.device_batch(s, batch))
  return s, jax.device_get(loss), jax.device_get(grads), state


@pytest.mark.parametrize('shape,axes', [((8,), ('data',)), ((2, 4), ('data', 'expert')),
                                        ((1, 8), ('data', 'expert'))])
def test_sharded_matches_single_device(shape, axes):
  c = tiny_config(jitter=0.01)
  c.model.dropout_rate = 0.1
  batch = random_batch(c)
  _, loss1, grads1, state1 = _loss_and_grads(c, jax.devices()[:1], batch)
  c.mesh.shape, c.mesh.axes = shape, axes
  s, loss8, grads8, state8 = _loss_and_grads(c, jax.devices()[:8], batch)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads8, grads1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               jax.device_get(state8['params']), jax.device_get(state1['params']))
  expert_size = dict(zip(axes, shape)).get('expert', 1)
  wi = state8['params']['encoder']['layers'][0]['ffn']['experts']['wi']
  assert wi.shape[0] == c.model.moe.num_experts
  assert wi.addressable_shards[0].data.shape[0] == c.model.moe.num_experts // expert_size


def test_batch_not_divisible_by_batch_devices_is_rejected():
  c = tiny_config()
  c.train.batch_size = 4
  c.mesh.shape, c.mesh.axes = (8,), ('data',)
  with pytest.raises(ValueError, match='train.batch_size=4'):
    train.make_setup(c)
