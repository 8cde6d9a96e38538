"""Expert parallelism by hand (`switchmoe.expert_parallel`): dropless rows exchanged over an
``expert`` mesh axis of simulated CPU devices equal a float64 NumPy layer and the single-device
dropless path, in value and gradient, for both exchanges. `jax.lax.ragged_all_to_all` has no
CPU implementation, so the ``ragged`` exchange runs here on `reference_ragged_all_to_all`, a
plain restatement of that primitive's documented semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchmoe import expert_parallel, sharding
from switchmoe.dispatch import DroplessDispatcher, run_bucketed
from switchmoe.routing import Routing

E, G, S, D, F = 8, 8, 16, 8, 16


def reference_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """What `jax.lax.ragged_all_to_all` does, from all-gathered operands: device s's rows
  input_offsets[me] .. + send_sizes[me] land at output_offsets[me] of this device's output
  (its own view of s's arguments, indexed by this device ``me``)."""
  del recv_sizes  # implied by the senders' send_sizes
  me = jax.lax.axis_index(axis_name)
  everyone = [jax.lax.all_gather(a, axis_name) for a in
              (operand, input_offsets, send_sizes, output_offsets)]
  t = jnp.arange(operand.shape[0])
  for s in range(everyone[0].shape[0]):
    rows, start, size, at = (a[s] for a in everyone)
    target = jnp.where(t < size[me], at[me] + t, output.shape[0])  # past the size: dropped
    output = output.at[target].set(rows[jnp.minimum(start[me] + t, rows.shape[0] - 1)],
                                   mode='drop')
  return output


def skewed_routing(k, seed):
  """Half the choices on expert 0 (so one device receives most rows), the rest uniform;
  some experts may get none."""
  rng = np.random.default_rng(seed)
  expert = np.where(rng.random((G, S, k)) < 0.5, 0, rng.integers(0, E, (G, S, k)))
  if k == 2:  # two distinct experts per token
    expert[..., 1] = np.where(expert[..., 1] == expert[..., 0], (expert[..., 0] + 1) % E,
                              expert[..., 1])
  gate = rng.uniform(0.2, 1.0, (G, S, k)).astype(np.float32)
  kept = np.ones((G, S, k), bool)
  arrays = (expert.astype(np.int32), gate, np.zeros((G, S, k), np.int32), kept,
            expert.astype(np.int32))
  return Routing(*map(jnp.asarray, arrays))


def masked_experts(params, x_NxD, group_sizes_E, key, rows=None):
  """Rows sorted by expert through each expert's FFN, by masks: another grouped FFN."""
  del key, rows
  ends = jnp.cumsum(group_sizes_E)
  expert_N = jnp.sum(jnp.arange(x_NxD.shape[0])[:, None] >= ends[None], axis=1)
  y = 0
  for e in range(group_sizes_E.shape[0]):
    h = jax.nn.relu(x_NxD @ params['wi'][e]) @ params['wo'][e]
    y = y + jnp.where((expert_N == e)[:, None], h, 0)
  return y


def bucketed_experts(params, x_NxD, group_sizes_E, key, rows=None):
  ffn = lambda p, x_ExCxD, key: jnp.einsum(
      'ecf,efd->ecd', jax.nn.relu(jnp.einsum('ecd,edf->ecf', x_ExCxD, p['wi'])), p['wo'])
  return run_bucketed(ffn, params, key, x_NxD, group_sizes_E, rows)


def numpy_layer(params, x_GxSxD, r):
  x = np.asarray(x_GxSxD, np.float64)
  wi, wo = (np.asarray(params[k], np.float64) for k in ('wi', 'wo'))
  y = np.zeros_like(x)
  for g, s, k in np.ndindex(*r.expert_index_GxSxK.shape):
    e = int(r.expert_index_GxSxK[g, s, k])
    y[g, s] += float(r.gate_GxSxK[g, s, k]) * (np.maximum(x[g, s] @ wi[e], 0) @ wo[e])
  return y


def single_device_layer(run_sorted, params, x_GxSxD, r):
  dispatcher = DroplessDispatcher(r, E)
  return dispatcher.combine(run_sorted(params, dispatcher.dispatch(x_GxSxD),
                                       dispatcher.group_sizes_E, None))


def inputs(seed):
  rng = np.random.default_rng(seed)
  params = {'wi': jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32),
            'wo': jnp.asarray(rng.normal(size=(E, F, D)) / np.sqrt(F), jnp.float32)}
  return params, jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)


# Each exchange with top-1 and top-2, on 4 and 8 devices of the expert axis, with an
# independent grouped FFN and with `run_bucketed` (buffers sized for the mean row count, so
# the busiest device takes overflow passes).
CASES = [(exchange, mesh, k, run) for exchange in expert_parallel.EXCHANGES
         for mesh, k, run in [((2, 4), 1, masked_experts), ((1, 8), 2, masked_experts),
                              ((2, 4), 2, bucketed_experts), ((1, 8), 1, bucketed_experts)]]


@pytest.mark.parametrize('exchange,mesh_shape,k,run_sorted', CASES,
                         ids=[f'{c[0]}-{c[1][1]}dev-top{c[2]}-{c[3].__name__}' for c in CASES])
def test_dropless_over_an_expert_axis_equals_numpy_and_one_device(
    exchange, mesh_shape, k, run_sorted, monkeypatch):
  monkeypatch.setattr(jax.lax, 'ragged_all_to_all', reference_ragged_all_to_all)
  params, x = inputs(seed=k)
  r = skewed_routing(k, seed=mesh_shape[0])
  mesh = sharding.make_mesh(mesh_shape, ('data', 'expert'))
  n = mesh_shape[1]
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(G, S, D)), jnp.float32)

  def loss(layer, params, x):
    return jnp.sum(layer(params, x) * cotangent)

  parallel = lambda params, x: expert_parallel.dropless(run_sorted, params, None, x, r, E, n,
                                                        exchange)
  with jax.set_mesh(mesh):
    y = jax.jit(parallel)(params, x)
    grads = jax.jit(jax.grad(lambda p, x: loss(parallel, p, x), argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(np.asarray(y, np.float64), numpy_layer(params, x, r),
                             rtol=1e-5, atol=1e-5)
  one = lambda params, x: single_device_layer(run_sorted, params, x, r)
  want = jax.grad(lambda p, x: loss(one, p, x), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               want)


def test_exchanges_send_each_row_to_its_experts_device():
  """The receive buffer itself: device j holds exactly the rows of experts 2j, 2j + 1, from
  each sender s at rows s*M .., and zeros elsewhere, for both exchanges."""
  mesh = sharding.make_mesh((4,), ('expert',))
  n, m = 4, 6
  rng = np.random.default_rng(0)
  sizes_nxE = rng.integers(0, 4, (n, 2 * n)).astype(np.int32)  # sender x global expert
  sizes_nxE[0] = [6, 0, 0, 0, 0, 0, 0, 0]  # sender 0: every row to device 0
  sizes_nxE[:, 3] = 0  # an expert nobody sends to
  sizes_nxE = np.minimum(sizes_nxE, m)
  for s in range(1, n):
    while sizes_nxE[s].sum() > m:
      sizes_nxE[s, np.argmax(sizes_nxE[s])] -= 1
  x = np.zeros((n, m, 1), np.float32)
  for s in range(n):  # row value: 100 * sender + 10 * expert + index
    x[s, :sizes_nxE[s].sum(), 0] = [100 * s + 10 * e + i for e in range(2 * n)
                                    for i in range(sizes_nxE[s, e])]

  def run(exchange, x_NxD, sizes_E):
    sizes_nxL = sizes_E.reshape(n, 2)
    send_n = sizes_nxL.sum(1)
    start_n = jnp.cumsum(send_n) - send_n
    recv_n = jax.lax.all_to_all(sizes_nxL, 'expert', 0, 0, tiled=True).sum(1)
    x_RxD, back = expert_parallel._exchange(x_NxD, send_n, start_n, recv_n, exchange)
    return x_RxD, back(x_RxD + 0.5)

  for exchange in expert_parallel.EXCHANGES:
    with pytest.MonkeyPatch.context() as patch, jax.set_mesh(mesh):
      patch.setattr(jax.lax, 'ragged_all_to_all', reference_ragged_all_to_all)
      got, back = jax.jit(jax.shard_map(
          lambda x, s: run(exchange, x[0], s[0]), in_specs=(jax.P('expert'), jax.P('expert')),
          out_specs=jax.P('expert'), axis_names={'expert'}))(
              jnp.asarray(x.reshape(n, m, 1)), jnp.asarray(sizes_nxE))
    got, back = np.asarray(got).reshape(n, n, m), np.asarray(back).reshape(n, m)
    for j, s in np.ndindex(n, n):
      want = [100 * s + 10 * e + i for e in (2 * j, 2 * j + 1) for i in range(sizes_nxE[s, e])]
      np.testing.assert_array_equal(got[j, s, :len(want)], want, err_msg=exchange)
      assert not got[j, s, len(want):].any(), exchange
    # The way back returns each row to its sender's row, every row of it.
    np.testing.assert_array_equal(back, np.where(x[..., 0] != 0, x[..., 0] + 0.5, 0.5 * (
        np.arange(m)[None] < sizes_nxE.sum(1)[:, None])), err_msg=exchange)


def test_experts_must_split_evenly_over_the_axis():
  params, x = inputs(seed=0)
  with pytest.raises(ValueError, match='num_experts=8 on an expert mesh axis of 3'):
    expert_parallel.dropless(masked_experts, params, None, x, skewed_routing(1, 0), E, 3,
                             'padded')
