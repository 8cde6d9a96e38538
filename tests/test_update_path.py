"""The training update path of a Switch model against the dense model it reduces to.

With one expert and capacity for the whole group, every token goes to that expert with gate 1,
so the Switch FFN is the dense FFN. From the same weights both models must then train the
same, step after step: gradients through routing and dispatch, the optimizer on batched
[E, d, f] expert weights (Adafactor factors them per expert) and the train step itself. The
forward-pass tests cannot see a bug there; this test can.
"""

import jax
import numpy as np
import pytest
from flax import traverse_util

from switchmoe import train
from tests.helpers import random_batch, tiny_config


def _setup(config):
  s = train.make_setup(config, jax.devices()[:1])
  with train.mesh_context(s):
    return s, jax.device_get(s.init(jax.random.key(1)))


@pytest.mark.parametrize('optimizer, dispatch', [
    pytest.param('adafactor', 'einsum', marks=pytest.mark.slow), ('adamw', 'gather'),
    ('adafactor', 'dropless')])
def test_one_expert_switch_trains_exactly_like_dense(optimizer, dispatch):
  configs = {}
  for name, moe in (('dense', {'every': 0}),
                    ('switch', {'every': 2, 'num_experts': 1, 'capacity_factor': 1.0,
                                'min_capacity': 1, 'dispatch': dispatch,
                                # Without aux losses the router gets no gradient at all;
                                # the z-loss would reach the residual stream through it.
                                'router_z_loss': 0.0, 'load_balance_loss': 0.0})):
    c = tiny_config(**moe)
    c.optim.name, c.optim.learning_rate = optimizer, 1e-2
    configs[name] = c
  dense, dense_state = _setup(configs['dense'])
  switch, switch_state = _setup(configs['switch'])

  # The Switch model starts from the dense weights, each FFN becoming expert 0 of its layer;
  # its single-logit router (softmax = 1 whatever the weights) keeps its own init.
  dense_params = traverse_util.flatten_dict(dense_state['params'])
  switch_params = {}
  for path, w in traverse_util.flatten_dict(switch_state['params']).items():
    if 'router' in path:
      switch_params[path] = w
    elif 'experts' in path:
      switch_params[path] = dense_params[tuple(p for p in path if p != 'experts')][None]
    else:
      switch_params[path] = dense_params[path]
  switch_state['params'] = traverse_util.unflatten_dict(switch_params)

  ces, grad_norms = {'dense': [], 'switch': []}, {'dense': [], 'switch': []}
  states = {'dense': dense_state, 'switch': switch_state}
  for step in range(5):
    batch = random_batch(configs['dense'], seed=step)
    for name, s in (('dense', dense), ('switch', switch)):
      with train.mesh_context(s):
        state, metrics = s.train_step(states[name], train.device_batch(s, batch))
      states[name] = jax.device_get(state)
      ces[name].append(float(metrics['ce']))
      grad_norms[name].append(float(metrics['grad_norm']))
      if name == 'switch':
        assert float(metrics['dropped_fraction']) == 0.0
  np.testing.assert_allclose(ces['switch'], ces['dense'], rtol=1e-6)
  np.testing.assert_allclose(grad_norms['switch'], grad_norms['dense'], rtol=1e-5)
  assert ces['dense'][-1] < ces['dense'][0]  # the steps did train

  start = traverse_util.flatten_dict(dense_state['params'])
  trained = {name: traverse_util.flatten_dict(states[name]['params']) for name in states}
  experts = 0
  for path, w in trained['dense'].items():
    in_experts = path not in trained['switch']
    w_switch = trained['switch'][(*path[:-1], 'experts', path[-1])][0] if in_experts else (
        trained['switch'][path])
    assert np.any(w != start[path]), path
    np.testing.assert_allclose(w_switch, w, rtol=1e-5, atol=1e-7, err_msg=str(path))
    experts += in_experts
  assert experts == 2 * 3  # wi, wi_gate and wo of one Switch layer per stack
