"""Sparse upcycling (train.init_from_params='upcycle'): a Switch model starts from a dense
model, every expert a copy of its layer's dense FFN, routers fresh; at step 0 a Switch layer
gives each token its gate times the dense FFN's output, and every other weight is the dense
model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import config as config_lib
from switchmoe import train
from tests.helpers import tiny_config
from tests.train_helpers import compile_cache, run_config  # noqa: F401  (a fixture)


def _flat(params):
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


@pytest.fixture(scope='module')
def dense_export(tmp_path_factory):
  """(export folder, the dense model): a dense tiny model, freshly initialised, exported."""
  c = tiny_config(every=0)
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    params = jax.device_get(s.init(jax.random.key(7))['params'])
  folder = str(tmp_path_factory.mktemp('dense') / 'export')
  checkpoint_lib.save_params(folder, params, c.to_dict())
  return folder, nnx.merge(s.graphdef, params)


def switch_config(folder):
  c = tiny_config(every=2, eval_capacity_factor=8.0)   # 8 experts: no token is ever dropped
  c.train.init_from, c.train.init_from_params = folder, 'upcycle'
  return c


def test_upcycled_parameters(dense_export):
  folder, dense_model = dense_export
  dense = _flat(nnx.to_pure_dict(nnx.state(dense_model)))
  c = switch_config(folder)
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    fresh = s.init(jax.random.key(0))['params']
    upcycled, names = train.upcycle(s, fresh, folder)
  fresh, upcycled = _flat(fresh), _flat(upcycled)
  assert any('/experts/' in n for n in upcycled)
  for name, w in upcycled.items():
    if '/experts/' in name:
      dense_name = name.replace('/experts/', '/')
      for e in range(c.model.moe.num_experts):
        np.testing.assert_array_equal(w[e], dense[dense_name], err_msg=name)
    elif '/router/' in name:
      np.testing.assert_array_equal(w, fresh[name], err_msg=name)   # fresh, not loaded
    else:
      np.testing.assert_array_equal(w, dense[name], err_msg=name)
  assert sorted(names) == sorted(n for n in upcycled if '/router/' not in n)


def test_a_switch_layer_at_step_0_is_its_gate_times_the_dense_ffn(dense_export):
  folder, dense_model = dense_export
  c = switch_config(folder)
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    upcycled, _ = train.upcycle(s, s.init(jax.random.key(0))['params'], folder)
  model = nnx.merge(s.graphdef, jax.device_get(upcycled))
  x = jnp.asarray(np.random.RandomState(0).randn(4, 16, c.model.d_model), jnp.float32)
  for stack in ('encoder', 'decoder'):
    moe = getattr(model, stack).layers[1].ffn
    ffn = getattr(dense_model, stack).layers[1].ffn
    y, stats = moe(x, deterministic=True, rngs=None)
    assert float(stats.diagnostics['dropped_fraction']) == 0.0
    gate = jnp.max(jax.nn.softmax(jnp.einsum('bld,de->ble', x, moe.router.kernel[...])), -1)
    np.testing.assert_allclose(np.asarray(y), np.asarray(gate[..., None] * ffn(
        x, deterministic=True, rngs=None)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a real run of each: the upcycling itself is tested above
def test_training_from_a_dense_run(data_dir, corpus, compile_cache, tmp_path, capsys):
  dense = run_config(data_dir, 2)
  dense.model.moe.every = 0
  train.train(dense, str(tmp_path / 'dense'))
  c = run_config(data_dir, 2, init_from=str(tmp_path / 'dense'), init_from_params='upcycle')
  c.model.moe.every = 2
  records = train.train(c, str(tmp_path / 'switch'))
  assert records[-1]['step'] == 2 and np.isfinite(records[-1]['train/loss'])
  assert 'Upcycled ' in capsys.readouterr().out


def test_upcycle_needs_a_switch_model_and_a_dense_one():
  c = tiny_config(every=0)
  c.train.init_from, c.train.init_from_params = '/some/run', 'upcycle'
  with pytest.raises(ValueError, match=r"^train\.init_from_params='upcycle': .*model\.moe\.every"):
    config_lib.validate(c)
