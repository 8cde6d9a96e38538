"""Switch MoE layer against an independent NumPy float64 reference (SW §2), plus invariances.

The reference, `ref_switch_layer` in tests/moe_reference.py, is written from the Switch
Transformer definition as a per-token loop and calls no library code; that module's docstring
describes it (groups, capacity, drops, padding and the statistics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from switchmoe.moe import MoeLayer
from tests.helpers import call, moe_config, pad_row_0, random_x, weights
from tests.moe_reference import ref_ffn, ref_switch_layer

D, F = 4, 8           # d_model, d_ff
B, L = 2, 8           # 16 tokens per batch


# --------------------------------------------------------------------------------------------
# Helpers.


def make_layer(*, num_experts=4, group_size=8, capacity_factor=1.0, eval_capacity_factor=None,
               min_capacity=1, alpha=0.0, beta=0.0, gamma=0.0, jitter=0.0, activation='relu',
               seed=0, router_std=1.0, num_shared_experts=0, expert_bias=False,
               expert_capacity=0):
  """A float32 MoeLayer with NumPy-drawn weights (built abstractly: no init compilation).

  Router kernel ~ N(0, router_std^2); expert and shared-expert matrices ~ N(0, 1 / fan_in);
  the expert bias, if any, zeros. ``jitter`` > 0 comes with exploration='input_jitter', the
  one mode that reads it.
  """
  eval_cf = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
  cfg = moe_config(num_experts=num_experts, group_size=group_size,
                   capacity_factor=capacity_factor, eval_capacity_factor=eval_cf,
                   min_capacity=min_capacity, expert_capacity=expert_capacity,
                   load_balance_loss=alpha, router_z_loss=beta,
                   importance_loss=gamma, jitter=jitter, expert_dropout=0.0,
                   num_shared_experts=num_shared_experts,
                   bias_update_rate=1e-3 if expert_bias else 0.0,
                   exploration='input_jitter' if jitter else 'argmax')
  layer = nnx.eval_shape(lambda: MoeLayer(D, F, cfg, activation=activation, init_scale=1.0,
                                          dtype=jnp.float32, rngs=nnx.Rngs(0)))
  rs = np.random.RandomState(seed)
  for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    std = router_std if path[0] == 'router' else 1.0 / math.sqrt(var.shape[-2])
    var.set_value(jnp.asarray((std * rs.randn(*var.shape)).astype(np.float32)))
  if expert_bias:
    layer.router.expert_bias.set_value(jnp.zeros((num_experts,), jnp.float32))
  return layer


def assert_stats_close(stats, ref_stats, rtol=1e-5, atol=1e-6):
  assert set(ref_stats) <= set(stats)
  for k, v in ref_stats.items():
    np.testing.assert_allclose(np.asarray(stats[k]), v, rtol=rtol, atol=atol, err_msg=k)


# --------------------------------------------------------------------------------------------
# 1. Layer == reference over a grid of configurations.

_GRID = [
    # (num_experts, capacity_factor, group_size, activation, min_capacity, capacity by hand);
    # 16 tokens per batch.
    (1, 0.5, 8, 'relu', 1, 4),       # one expert: half of each group dropped
    (1, 1.0, 16, 'geglu', 1, 16),
    (2, 0.5, 4, 'relu', 1, 1),       # floor(4 * 0.5 / 2) = 1
    (2, 0.5, 4, 'geglu', 3, 3),      # min_capacity 3 > 1
    (2, 1.0, 16, 'relu', 3, 8),      # min_capacity has no effect
    (4, 0.5, 8, 'geglu', 1, 1),
    (4, 0.5, 8, 'relu', 3, 3),       # from min_capacity
    (4, 1.0, 4, 'relu', 1, 1),       # four groups
    (4, 1.0, 4, 'geglu', 3, 3),
    (4, 1.25, 8, 'relu', 1, 2),      # floor(2.5) = 2
    (4, 1.25, 8, 'geglu', 3, 3),
    (4, 2.0, 16, 'geglu', 1, 8),
    (4, 1.0, 32, 'relu', 1, 4),      # group_size capped at the 16 tokens
    (8, 1.0, 8, 'relu', 1, 1),
    (8, 1.0, 8, 'geglu', 3, 3),
    (8, 4.0, 32, 'relu', 1, 8),
]


def _grid_case(i):
  e, cf, gs, act, mc, _ = _GRID[i]
  layer = make_layer(num_experts=e, group_size=gs, capacity_factor=cf, min_capacity=mc,
                     alpha=0.01, beta=0.001, activation=act, seed=i)
  return layer, random_x(i + 1)


@pytest.mark.parametrize('case', range(len(_GRID)),
                         ids=['E{}-cf{}-S{}-{}-min{}'.format(*c[:5]) for c in _GRID])
def test_matches_reference(case):
  e, cf, gs, act, mc, capacity = _GRID[case]
  alpha, beta = 0.01, 0.001
  layer, x = _grid_case(case)
  y, stats = call(layer, jnp.asarray(x))
  assert y.shape == x.shape and y.dtype == jnp.float32
  y_ref, stats_ref, info = ref_switch_layer(
      x, weights(layer), group_size=gs, capacity_factor=cf, min_capacity=mc, activation=act,
      alpha=alpha, beta=beta)
  assert info['capacity'] == capacity
  assert info['margin'] > 1e-3, 'near-tie in routing: pick another seed'
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)
  assert_stats_close(stats, stats_ref)
  # Dropped tokens are exactly zero, kept ones are not.
  y = np.asarray(y)
  assert np.all(y[~info['kept']] == 0.0)
  assert np.all(np.any(y[info['kept']] != 0.0, axis=-1))


def test_reference_grid_covers_drops_and_min_capacity():
  """The grid above drops tokens in most cases and has capacity set by min_capacity."""
  dropping, raised = 0, 0
  for i, (e, cf, gs, act, mc, capacity) in enumerate(_GRID):
    layer, x = _grid_case(i)
    _, stats, _ = ref_switch_layer(x, weights(layer), group_size=gs, capacity_factor=cf,
                                   min_capacity=mc, activation=act)
    dropping += stats['dropped_fraction'] > 0
    raised += mc > math.floor(min(gs, B * L) * cf / e)
  assert dropping >= 8 and raised >= 4


def test_min_capacity_raises_capacity():
  """floor(8 * 0.5 / 4) = 1 slot, but min_capacity 3 gives 3: fewer drops, same kept outputs."""
  x = random_x(3)
  out = {}
  for mc in (1, 3):
    layer = make_layer(num_experts=4, group_size=8, capacity_factor=0.5, min_capacity=mc,
                       seed=7)
    y, stats = call(layer, jnp.asarray(x), True, None)
    _, _, info = ref_switch_layer(x, weights(layer), group_size=8, capacity_factor=0.5,
                                  min_capacity=mc, activation='relu')
    assert info['capacity'] == mc
    out[mc] = (np.asarray(y), float(stats['dropped_fraction']), info['kept'])
  (y1, d1, k1), (y3, d3, k3) = out[1], out[3]
  assert d3 < d1
  assert np.all(k3[k1])                     # everything kept at capacity 1 is kept at 3
  np.testing.assert_array_equal(y1[k1], y3[k1])


def test_group_size_must_divide_tokens():
  layer = make_layer(group_size=6)
  with pytest.raises(ValueError, match='group_size'):
    layer(jnp.asarray(random_x(0)), deterministic=True, rngs=None)


# --------------------------------------------------------------------------------------------
# 2. Every token picks the same expert.


def _one_expert_layer(expert, *, num_experts=4, group_size=8, capacity_factor=1.0,
                      eval_capacity_factor=None, min_capacity=1, expert_capacity=0):
  """Router sends every token with positive features to ``expert``; experts give nonzero y."""
  layer = make_layer(num_experts=num_experts, group_size=group_size,
                     capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                     min_capacity=min_capacity, expert_capacity=expert_capacity)
  kernel = np.zeros((D, num_experts), np.float32)
  kernel[:, expert] = 1.0
  layer.router.kernel[...] = jnp.asarray(kernel)
  # Positive expert weights: every kept token has a strictly positive output.
  layer.experts.wi[...] = jnp.asarray(np.abs(np.asarray(layer.experts.wi[...])) + 0.1)
  layer.experts.wo[...] = jnp.asarray(np.abs(np.asarray(layer.experts.wo[...])) + 0.1)
  return layer


def _positive_x(seed):
  return (np.abs(random_x(seed)) + 0.1).astype(np.float32)


@pytest.mark.parametrize('expert', [0, 2])
def test_all_tokens_same_expert_keeps_first_capacity(expert):
  e, gs = 4, 8
  layer = _one_expert_layer(expert, num_experts=e, group_size=gs, capacity_factor=1.0)
  capacity = 2                                   # floor(8 * 1.0 / 4)
  x = _positive_x(1)
  y, stats = call(layer, jnp.asarray(x), True, None)
  y = np.asarray(y).reshape(-1, gs, D)           # [G, S, D]
  assert np.all(y[:, :capacity] > 0.0)           # the first `capacity` of each group are kept
  assert np.all(y[:, capacity:] == 0.0)          # the rest are exactly zero
  y_ref, stats_ref, info = ref_switch_layer(x, weights(layer), group_size=gs,
                                            capacity_factor=1.0, min_capacity=1,
                                            activation='relu')
  assert info['capacity'] == capacity
  np.testing.assert_allclose(y, y_ref.reshape(-1, gs, D), rtol=1e-5, atol=1e-6)
  assert float(stats['dropped_fraction']) == pytest.approx(1.0 - capacity / gs)
  np.testing.assert_array_equal(np.asarray(stats['expert_fraction_E']), np.eye(e)[expert])
  assert_stats_close(stats, stats_ref)


# --------------------------------------------------------------------------------------------
# 3. Train vs eval capacity factor.


@pytest.mark.parametrize('train_cf,eval_cf', [(2.0, 0.5), (0.5, 1.5)])
def test_train_and_eval_capacity_factor(train_cf, eval_cf):
  e, gs = 4, 8
  layer = _one_expert_layer(1, num_experts=e, group_size=gs, capacity_factor=train_cf,
                            eval_capacity_factor=eval_cf)
  x = _positive_x(2)
  w = weights(layer)
  for deterministic, cf in ((True, eval_cf), (False, train_cf)):
    capacity = max(1, math.floor(gs * cf / e))
    y, stats = call(layer, jnp.asarray(x), deterministic, None)
    y = np.asarray(y).reshape(-1, gs, D)
    kept = np.any(y != 0.0, axis=-1)                           # [G, S]
    np.testing.assert_array_equal(kept.sum(axis=1), capacity)
    assert np.all(kept[:, :capacity])
    assert float(stats['dropped_fraction']) == pytest.approx(1.0 - capacity / gs)
    y_ref, _, _ = ref_switch_layer(x, w, group_size=gs, capacity_factor=cf, min_capacity=1,
                                   activation='relu')
    np.testing.assert_allclose(y, y_ref.reshape(-1, gs, D), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('expert_capacity', [1, 3])
def test_expert_capacity_is_fixed_in_training_and_evaluation(expert_capacity):
  """model.moe.expert_capacity (HF checkpoints' fixed capacity) overrides both factors and
  min_capacity; with group_size 0 every sequence is one group, as HF routes."""
  e, length = 4, L
  layer = _one_expert_layer(2, num_experts=e, group_size=0, capacity_factor=2.0,
                            eval_capacity_factor=0.5, min_capacity=2,
                            expert_capacity=expert_capacity)
  x = _positive_x(3)
  for deterministic in (True, False):
    assert layer.capacity(length, deterministic) == expert_capacity
    y, stats = call(layer, jnp.asarray(x), deterministic, None)
    kept = np.any(np.asarray(y) != 0.0, axis=-1)               # [B, L]: a group per row
    np.testing.assert_array_equal(kept[:, :expert_capacity], True)
    np.testing.assert_array_equal(kept[:, expert_capacity:], False)
    assert float(stats['dropped_fraction']) == pytest.approx(1.0 - expert_capacity / length)


# --------------------------------------------------------------------------------------------
# 4. Gradients.


def _loss_fn(graphdef, c):
  def loss(params, rest, x):
    layer = nnx.merge(graphdef, params, rest)
    y, stats = call(layer, x, True, None)
    return jnp.sum(y * c) + stats['load_balance'] + stats['z_loss']
  return loss


@pytest.mark.parametrize('activation', ['relu', 'geglu'])
@pytest.mark.parametrize('alpha,beta', [(0.0, 0.0), (0.1, 0.01)])
def test_gradients_nonzero_and_finite(activation, alpha, beta):
  """Router gets gradient through the gate alone (alpha = beta = 0) and with aux losses."""
  layer = make_layer(num_experts=4, group_size=8, capacity_factor=1.0, alpha=alpha, beta=beta,
                     activation=activation)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  c = jnp.asarray(np.random.RandomState(1).randn(B, L, D), jnp.float32)
  x = jnp.asarray(random_x(4))
  grads = jax.jit(jax.grad(_loss_fn(graphdef, c)))(params, rest, x)
  leaves = {'router': grads['router']['kernel'][...], 'wi': grads['experts']['wi'][...],
            'wo': grads['experts']['wo'][...]}
  if activation == 'geglu':
    leaves['wi_gate'] = grads['experts']['wi_gate'][...]
  for name, gvalue in leaves.items():
    gvalue = np.asarray(gvalue)
    assert np.all(np.isfinite(gvalue)), name
    assert np.any(gvalue != 0.0), name
  # Every expert that received a token gets gradient on wo.
  _, _, info = ref_switch_layer(np.asarray(x), weights(layer), group_size=8,
                                capacity_factor=1.0, min_capacity=1, activation=activation)
  used = np.unique(info['top'][info['kept']])
  wo_norm = np.abs(np.asarray(leaves['wo'])).sum(axis=(1, 2))
  assert np.all(wo_norm[used] > 0.0)
  unused = np.setdiff1d(np.arange(4), used)
  assert np.all(wo_norm[unused] == 0.0)


def test_gradients_match_finite_difference_of_reference():
  """jax.grad (float32) vs central differences of the float64 reference.

  Checked entrywise for the router kernel and the input x, along random directions for the
  expert weights. Routing decisions are locally constant, so the router's derivative flows
  through the gates p_i(x), the P_i term of the load-balance loss and the z-loss; x's also
  through the experts. Some tokens are dropped here (capacity 2 per 8-token group).
  """
  alpha, beta, gs, cf = 0.1, 0.01, 8, 1.0
  layer = make_layer(num_experts=4, group_size=gs, capacity_factor=cf, alpha=alpha, beta=beta,
                     activation='geglu', seed=3)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  c = np.random.RandomState(2).randn(B, L, D)
  x = random_x(6)
  g_params, g_x = jax.jit(jax.grad(_loss_fn(graphdef, jnp.asarray(c, jnp.float32)),
                                   argnums=(0, 2)))(params, rest, jnp.asarray(x))
  grads = {'router': g_params['router']['kernel'][...], 'wi': g_params['experts']['wi'][...],
           'wi_gate': g_params['experts']['wi_gate'][...], 'wo': g_params['experts']['wo'][...],
           'x': g_x}
  grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  base = {k: v.astype(np.float64) for k, v in weights(layer).items()}
  base['x'] = x.astype(np.float64)

  def ref_loss(values):
    w = dict(values)
    xx = w.pop('x')
    y, stats, info = ref_switch_layer(xx, w, group_size=gs, capacity_factor=cf,
                                      min_capacity=1, activation='geglu', alpha=alpha,
                                      beta=beta)
    return np.sum(y * c) + stats['load_balance'] + stats['z_loss'], info

  _, info = ref_loss(base)
  assert info['margin'] > 1e-3
  assert 0 < info['kept'].sum() < B * L
  eps = 1e-6

  def directional(name, direction):
    plus, minus = dict(base), dict(base)
    plus[name] = base[name] + eps * direction
    minus[name] = base[name] - eps * direction
    (lp, ip), (lm, im) = ref_loss(plus), ref_loss(minus)
    for other in (ip, im):          # routing unchanged by the perturbation
      np.testing.assert_array_equal(other['top'], info['top'])
      np.testing.assert_array_equal(other['kept'], info['kept'])
    return (lp - lm) / (2 * eps)

  for name in ('router', 'x'):
    fd = np.zeros_like(base[name])
    for idx in np.ndindex(*fd.shape):
      unit = np.zeros_like(fd)
      unit[idx] = 1.0
      fd[idx] = directional(name, unit)
    assert np.any(fd != 0.0)
    np.testing.assert_allclose(grads[name], fd, rtol=1e-3, atol=1e-5, err_msg=name)
  rs = np.random.RandomState(0)
  for name in ('wi', 'wi_gate', 'wo'):
    for _ in range(3):
      v = rs.randn(*base[name].shape)
      fd = directional(name, v)
      assert fd != 0.0
      assert np.sum(grads[name] * v) == pytest.approx(fd, rel=1e-3, abs=1e-5), name


# --------------------------------------------------------------------------------------------
# 5. Router jitter.


def test_jitter_is_off_in_eval_mode():
  x = jnp.asarray(random_x(9))
  plain = make_layer(num_experts=4, group_size=8, jitter=0.0, alpha=0.01, beta=0.001, seed=5)
  jittery = make_layer(num_experts=4, group_size=8, jitter=0.5, alpha=0.01, beta=0.001, seed=5)
  y0, s0 = call(plain, x, True, None)
  y1, s1 = call(jittery, x, True, nnx.Rngs(jitter=0))
  y2, s2 = call(jittery, x, True, None)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y0))
  for k in s0:
    np.testing.assert_array_equal(np.asarray(s1[k]), np.asarray(s0[k]))


def test_jitter_in_training_mode():
  jit_eps = 0.01
  x = random_x(10)
  plain = make_layer(num_experts=4, group_size=8, capacity_factor=4.0, jitter=0.0, seed=5,
                     activation='geglu')
  jittery = make_layer(num_experts=4, group_size=8, capacity_factor=4.0, jitter=jit_eps,
                       seed=5, activation='geglu')
  with pytest.raises(ValueError, match='jitter'):
    jittery(jnp.asarray(x), deterministic=False, rngs=None)

  y0, _ = call(plain, jnp.asarray(x), False, None)
  y1, _ = call(jittery, jnp.asarray(x), False, nnx.Rngs(jitter=0))
  y0, y1 = np.asarray(y0), np.asarray(y1)
  assert not np.array_equal(y1, y0)
  # Small multiplicative noise on the router input only: same routing here, gates move a bit.
  np.testing.assert_allclose(y1, y0, rtol=0.1, atol=0.05)

  # The noise multiplies the router input only; the experts still see the clean x. Redraw the
  # same noise from an identical stream and feed it to the reference.
  noise = np.asarray(jax.random.uniform(nnx.Rngs(jitter=0).jitter(), (2, 8, D), jnp.float32,
                                        1.0 - jit_eps, 1.0 + jit_eps))   # [G, S, D]
  assert np.all(np.abs(noise - 1.0) <= jit_eps)
  router_x = (x.reshape(2, 8, D) * noise).reshape(x.shape)
  y_ref, _, _ = ref_switch_layer(x, weights(jittery), group_size=8, capacity_factor=4.0,
                                 min_capacity=1, activation='geglu', router_x_BxLxD=router_x)
  np.testing.assert_allclose(y1, y_ref, rtol=1e-5, atol=1e-6)

  # Different streams give different noise.
  y2, _ = call(jittery, jnp.asarray(x), False, nnx.Rngs(jitter=1))
  assert not np.array_equal(np.asarray(y2), y1)


# --------------------------------------------------------------------------------------------
# 6. Shared experts and the aux-loss-free balancing bias.


def _with_routed_weights_of(layer, source):
  """``layer`` with ``source``'s router and routed experts."""
  for name in ('router', 'experts'):
    nnx.update(getattr(layer, name), nnx.state(getattr(source, name), nnx.Param))
  return layer


@pytest.mark.parametrize('activation', ['relu', 'geglu'])
def test_shared_experts_add_a_dense_ffn_to_the_routed_output(activation):
  """Same routed weights: with - without shared experts = the float64 shared FFN, on every
  token (capacity 1 of 8: dropped tokens get the shared output alone)."""
  plain = make_layer(capacity_factor=0.5, activation=activation, seed=12)
  shared = _with_routed_weights_of(
      make_layer(capacity_factor=0.5, activation=activation, seed=13, num_shared_experts=2),
      plain)
  assert shared.shared.wi.shape == (D, 2 * F)
  x = random_x(14)
  y_plain, stats_plain = call(plain, jnp.asarray(x))
  y_shared, stats_shared = call(shared, jnp.asarray(x))
  w = {k: None if v is None else np.asarray(v[...], np.float64)
       for k, v in (('wi', shared.shared.wi), ('wo', shared.shared.wo),
                    ('wi_gate', shared.shared.wi_gate))}
  ffn = np.stack([ref_ffn(t, w['wi'], w['wo'], w['wi_gate'], activation)
                  for t in x.reshape(-1, D).astype(np.float64)]).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(y_shared) - np.asarray(y_plain), ffn, rtol=1e-5,
                             atol=1e-5)
  assert float(stats_plain['dropped_fraction']) > 0
  for k in stats_plain:
    np.testing.assert_array_equal(np.asarray(stats_shared[k]), np.asarray(stats_plain[k]), k)


def test_shared_experts_get_gradients():
  layer = make_layer(activation='geglu', num_shared_experts=1)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  c = jnp.asarray(np.random.RandomState(1).randn(B, L, D), jnp.float32)
  grads = jax.jit(jax.grad(_loss_fn(graphdef, c)))(params, rest, jnp.asarray(random_x(4)))
  for name in ('wi', 'wi_gate', 'wo'):
    g = np.asarray(grads['shared'][name][...])
    assert np.all(np.isfinite(g)) and np.any(g != 0.0), name


def test_zero_expert_bias_changes_nothing():
  """A layer with a (zero) expert bias computes exactly what one without it does."""
  x = jnp.asarray(random_x(15))
  plain = make_layer(capacity_factor=0.5, alpha=0.01, beta=0.001, seed=16)
  biased = _with_routed_weights_of(
      make_layer(capacity_factor=0.5, alpha=0.01, beta=0.001, expert_bias=True), plain)
  for deterministic in (True, False):
    y0, s0 = call(plain, x, deterministic)
    y1, s1 = call(biased, x, deterministic)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    for k in s0:
      np.testing.assert_array_equal(np.asarray(s1[k]), np.asarray(s0[k]), k)
  np.testing.assert_allclose(np.sum(np.asarray(s1['selected_fraction_E'])), 1.0, rtol=1e-6)
  assert float(s1['expert_bias_max']) == 0.0
  assert 'selected_fraction_E' not in s0 and 'expert_bias_max' not in s0


# --------------------------------------------------------------------------------------------
# 7. Padding.


@pytest.mark.parametrize('group_size,pad_from,takes_slots', [
    (16, 3, True), (8, 0, False), (4, 2, False)],
    ids=['one-group-over-both-rows', 'a-group-of-padding', 'four-groups'])
def test_padding_takes_no_capacity_and_counts_in_no_statistic(group_size, pad_from,
                                                              takes_slots):
  """Real tokens route, and every aux loss and diagnostic is computed, as in the float64
  reference that skips padding; padding gets y = 0."""
  alpha, beta, gamma = 0.01, 0.001, 0.1
  layer = make_layer(group_size=group_size, capacity_factor=1.0, alpha=alpha, beta=beta,
                     gamma=gamma, seed=17)
  x, valid = pad_row_0(random_x(18), pad_from)
  y, stats = call(layer, jnp.asarray(x), True, None, jnp.asarray(valid))
  ref = lambda valid_BxL: ref_switch_layer(
      x, weights(layer), group_size=group_size, capacity_factor=1.0, min_capacity=1,
      activation='relu', alpha=alpha, beta=beta, gamma=gamma, valid_BxL=valid_BxL)
  y_ref, stats_ref, info = ref(valid)
  assert info['margin'] > 1e-3
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y)[~valid] == 0.0)
  assert_stats_close(stats, stats_ref)
  # Not vacuous: padding routed as text would fill slots of row 1's tokens in their group, or
  # (in its own groups, or after the real tokens) count in the load-balance loss.
  _, stats_text, info_text = ref(None)
  if takes_slots:
    assert np.any(info['kept'][valid] & ~info_text['kept'][valid])
  else:
    assert abs(stats_text['load_balance'] - stats_ref['load_balance']) > 1e-6
  # Whatever the padding holds, the real tokens' outputs and every stat stay the same.
  other = np.where(valid[..., None], x, random_x(19)).astype(np.float32)
  y_other, stats_other = call(layer, jnp.asarray(other), True, None, jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(y_other), np.asarray(y))
  for k in stats:
    np.testing.assert_array_equal(np.asarray(stats_other[k]), np.asarray(stats[k]), k)


def test_padding_gets_no_shared_output_and_no_share_of_selections():
  """Shared experts give padding nothing either, and the balancing bias's selections count
  real tokens only (a zero bias selects the top-1 expert: selected = expert_fraction)."""
  layer = make_layer(group_size=16, num_shared_experts=1, expert_bias=True, seed=20)
  x, valid = pad_row_0(random_x(21), 3)
  y, stats = call(layer, jnp.asarray(x), True, None, jnp.asarray(valid))
  y = np.asarray(y)
  assert np.all(y[~valid] == 0.0) and np.all(np.any(y[valid] != 0.0, axis=-1))
  _, stats_ref, _ = ref_switch_layer(x, weights(layer), group_size=16, capacity_factor=1.0,
                                     min_capacity=1, activation='relu', valid_BxL=valid)
  np.testing.assert_allclose(np.asarray(stats['selected_fraction_E']),
                             stats_ref['expert_fraction_E'], rtol=1e-6)
