"""Routing primitives: hand-computed cases and property tests on small random shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from flax import nnx
from hypothesis import strategies as st

from switchmoe import routing
from tests.helpers import routing_options

# --------------------------------------------------------------------------------------------
# expert_capacity


@pytest.mark.parametrize('group_size,num_experts,capacity_factor,min_capacity,expected', [
    (8, 4, 1.0, 1, 2),
    (8, 4, 1.0, 4, 4),       # min_capacity wins
    (8, 4, 1.25, 1, 2),      # floor(2.5)
    (8, 4, 1.5, 1, 3),       # floor(3.0)
    (16, 4, 1.25, 1, 5),     # floor(5.0)
    (10, 4, 1.0, 1, 2),      # floor(2.5)
    (8, 4, 0.25, 0, 0),      # floor(0.5), no minimum
    (8, 4, 0.25, 1, 1),
    (3, 8, 1.0, 1, 1),       # floor(0.375) -> min 1
    (64, 8, 2.0, 4, 16),
    (5, 1, 1.0, 1, 5),
])
def test_expert_capacity(group_size, num_experts, capacity_factor, min_capacity, expected):
  got = routing.expert_capacity(group_size, num_experts, capacity_factor, min_capacity)
  assert got == expected and isinstance(got, int)


# --------------------------------------------------------------------------------------------
# assign_slots


def test_assign_slots_top1_two_groups():
  index = jnp.array([[1, 1, 0, 1], [0, 0, 0, 2]], jnp.int32)[..., None]     # [G=2, S=4, K=1]
  position, kept = routing.assign_slots(index, 3, 2)
  np.testing.assert_array_equal(np.asarray(position)[..., 0], [[0, 1, 0, 2], [0, 1, 2, 0]])
  np.testing.assert_array_equal(np.asarray(kept)[..., 0],
                                [[True, True, True, False], [True, True, False, True]])
  assert position.shape == kept.shape == index.shape


def test_assign_slots_top2_first_choices_take_priority():
  # G=1, S=4, K=2, E=3. First choices, in order: 0 0 1 0 -> slots 0 1 0 2.
  # Then second choices, in order: 1 2 0 1 -> expert 1 already holds token 2's first choice,
  # so token 0's second choice gets slot 1; expert 2 slot 0; expert 0 slot 3; expert 1 slot 2.
  index = jnp.array([[[0, 1], [0, 2], [1, 0], [0, 1]]], jnp.int32)
  position, kept = routing.assign_slots(index, 3, 2)
  np.testing.assert_array_equal(np.asarray(position)[0], [[0, 1], [1, 0], [0, 3], [2, 2]])
  np.testing.assert_array_equal(np.asarray(kept)[0],
                                [[True, True], [True, True], [True, False], [False, False]])
  # With capacity 1 a later token's first choice still beats an earlier token's second.
  _, kept1 = routing.assign_slots(index, 3, 1)
  np.testing.assert_array_equal(np.asarray(kept1)[0],
                                [[True, False], [False, True], [True, False], [False, False]])


def _slots_reference(index_GxSxK, capacity, valid_GxSxK=None):
  """Loop version: choice rank first, then sequence order, per group; invalid choices take
  no slot (position 0, not kept)."""
  g, s, k = index_GxSxK.shape
  valid = np.ones((g, s, k), bool) if valid_GxSxK is None else valid_GxSxK
  position = np.zeros((g, s, k), int)
  for gi in range(g):
    count = {}
    for ki in range(k):
      for si in range(s):
        if not valid[gi, si, ki]:
          continue
        ex = int(index_GxSxK[gi, si, ki])
        position[gi, si, ki] = count.get(ex, 0)
        count[ex] = count.get(ex, 0) + 1
  return position, valid & (position < capacity)


# Property tests run jitted, with shapes from small sets so that compilations get reused.
_assign_slots = jax.jit(routing.assign_slots, static_argnums=(1, 2))
_switch_top1 = jax.jit(routing.switch_top1, static_argnums=1)


@st.composite
def _index_arrays(draw):
  g = draw(st.sampled_from([1, 2]))
  s = draw(st.sampled_from([1, 5, 8]))
  k = draw(st.sampled_from([1, 2]))
  e = draw(st.sampled_from([1, 3, 4]))
  flat = draw(st.lists(st.integers(0, e - 1), min_size=g * s * k, max_size=g * s * k))
  capacity = draw(st.sampled_from([0, 1, 2, s * k]))
  return np.asarray(flat, np.int32).reshape(g, s, k), e, capacity


@settings(max_examples=30, deadline=None)
@given(_index_arrays())
def test_assign_slots_properties(args):
  index, e, capacity = args
  position, kept = _assign_slots(jnp.asarray(index), e, capacity)
  position, kept = np.asarray(position), np.asarray(kept)
  g, s, k = index.shape
  np.testing.assert_array_equal(kept, position < capacity)
  for gi in range(g):
    for ex in range(e):
      mask = index[gi] == ex
      # Capacity is never exceeded.
      assert np.sum(kept[gi][mask]) <= capacity
      assert np.sum(kept[gi][mask]) == min(capacity, np.sum(mask))
      # Positions within one expert are unique and contiguous from 0.
      np.testing.assert_array_equal(np.sort(position[gi][mask]), np.arange(np.sum(mask)))
  ref_position, ref_kept = _slots_reference(index, capacity)
  np.testing.assert_array_equal(position, ref_position)
  np.testing.assert_array_equal(kept, ref_kept)
  # Invalid choices take no slot, and the valid ones keep their order among themselves.
  valid = np.random.RandomState(int(index.sum()) + capacity).rand(*index.shape) < 0.6
  position, kept = _assign_slots(jnp.asarray(index), e, capacity, valid_GxSxK=jnp.asarray(valid))
  ref_position, ref_kept = _slots_reference(index, capacity, valid)
  np.testing.assert_array_equal(np.asarray(position), ref_position)
  np.testing.assert_array_equal(np.asarray(kept), ref_kept)


def test_assign_slots_keeps_groups_sharded():
  # Groups are independent: with them split over devices (GSPMD, as the layer runs on a
  # data axis), slot assignment must move nothing between devices.
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.sharding.NamedSharding(mesh, jax.P('data'))
  index = jax.device_put(jnp.zeros((8, 16, 2), jnp.int32), sharded)
  valid = jax.device_put(jnp.ones((8, 16, 2), bool), sharded)
  used = jax.device_put(jnp.zeros((8, 4), jnp.int32), sharded)
  fn = lambda i, v, u: routing.assign_slots(i, 4, 3, valid_GxSxK=v, used_GxE=u)
  hlo = jax.jit(fn).lower(index, valid, used).compile().as_text()
  for collective in ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute'):
    assert collective not in hlo, collective


def test_assign_slots_rejects_groups_too_large_to_rank():
  index = jnp.zeros((1, 2**16, 1), jnp.int32)
  with pytest.raises(ValueError, match='model.moe.group_size'):
    routing.assign_slots(index, 2**15, 4)


# --------------------------------------------------------------------------------------------
# Auxiliary losses


def test_load_balance_loss_uniform_is_one():
  probs = jnp.full((2, 8, 4), 0.25, jnp.float32)
  index = jnp.tile(jnp.arange(4, dtype=jnp.int32), (2, 2))           # [2, 8], balanced
  assert float(routing.load_balance_loss(probs, index)) == 1.0
  # Balanced assignment makes any probabilities give 1; uniform probs make any assignment 1.
  rand = jax.nn.softmax(jnp.asarray(np.random.RandomState(0).randn(2, 8, 4), jnp.float32))
  assert float(routing.load_balance_loss(rand, index)) == pytest.approx(1.0, abs=1e-6)
  skewed = jnp.zeros((2, 8), jnp.int32)
  assert float(routing.load_balance_loss(probs, skewed)) == pytest.approx(1.0, abs=1e-6)


def test_load_balance_loss_hand_computed():
  # E=2, S=4, G=2.
  # Group 0: every token picks expert 0 -> f = [1, 0]; P_0 = (0.9 + 0.7 + 0.6 + 0.8) / 4 = 0.75
  #          loss = 2 * 0.75 = 1.5.
  # Group 1: picks 0 1 1 1 -> f = [0.25, 0.75]; P = [0.5, 0.5] -> 2 * (0.125 + 0.375) = 1.0.
  probs = jnp.array([[[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]],
                     [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]], jnp.float32)
  index = jnp.array([[0, 0, 0, 0], [0, 1, 1, 1]], jnp.int32)
  assert float(routing.load_balance_loss(probs, index)) == pytest.approx(1.25, rel=1e-6)
  assert float(routing.load_balance_loss(probs[:1], index[:1])) == pytest.approx(1.5, rel=1e-6)
  # f carries no gradient: d/dP of E * sum f_i * mean(p_i) = E * f_i / (G * S).
  grad = jax.grad(routing.load_balance_loss)(probs, index)
  expected = 2 * np.array([[1.0, 0.0], [0.25, 0.75]])[:, None, :] / (2 * 4)
  np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(expected, (2, 4, 2)), rtol=1e-6)


@pytest.mark.parametrize('num_experts', [1, 2, 4, 8])
def test_router_z_loss_zero_logits(num_experts):
  z = routing.router_z_loss(jnp.zeros((2, 3, num_experts), jnp.float32))
  assert float(z) == pytest.approx(math.log(num_experts) ** 2, abs=1e-6)


def test_router_z_loss_hand_computed():
  # Token 0: logsumexp(0, log 3) = log 4; token 1: logsumexp(0, 0) = log 2.
  logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]], jnp.float32)
  expected = (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
  assert float(routing.router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)
  # Shifting logits by c changes logsumexp by c: large logits are penalised.
  shifted = routing.router_z_loss(logits + 10.0)
  assert float(shifted) == pytest.approx(((math.log(4.0) + 10) ** 2 +
                                          (math.log(2.0) + 10) ** 2) / 2, rel=1e-6)


def test_aux_losses_average_over_real_tokens_only():
  # E=2, S=4, G=2; valid tokens: 0 and 1 of group 0. Padding is confident for expert 0, and
  # group 1 is all padding.
  # Load balance: picks 0 1 -> f = [0.5, 0.5]; P = ([0.9, 0.1] + [0.3, 0.7]) / 2 = [0.6, 0.4];
  #   2 * (0.3 + 0.2) = 1.0, and group 1 adds no term. (With padding: 1.295 for group 0.)
  # Importance: mass [1.2, 0.8], mean 1, variance 0.04 -> 0.04.
  # z-loss: logsumexp of the real tokens log 4 and log 2.
  pad = [0.99, 0.01]
  probs = jnp.array([[[0.9, 0.1], [0.3, 0.7], pad, pad], [pad, pad, pad, pad]], jnp.float32)
  valid = jnp.array([[True, True, False, False], [False] * 4])
  index = jnp.argmax(probs, -1)
  assert float(routing.load_balance_loss(probs, index, valid)) == pytest.approx(1.0, rel=1e-6)
  assert float(routing.importance_loss(probs, valid)) == pytest.approx(0.04, rel=1e-5)
  logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0], [9.0, 0.0], [9.0, 0.0]],
                      [[9.0, 0.0]] * 4], jnp.float32)
  expected = (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
  assert float(routing.router_z_loss(logits, valid)) == pytest.approx(expected, rel=1e-6)
  # No gradient reaches padding's probabilities or logits.
  grad_p = jax.grad(routing.load_balance_loss)(probs, index, valid)
  grad_z = jax.grad(routing.router_z_loss)(logits, valid)
  assert np.all(np.asarray(grad_p)[~np.asarray(valid)] == 0)
  assert np.all(np.asarray(grad_z)[~np.asarray(valid)] == 0)


# --------------------------------------------------------------------------------------------
# switch_top1 and Router


@st.composite
def _probs(draw):
  g = draw(st.sampled_from([1, 2]))
  s = draw(st.sampled_from([1, 5, 8]))
  e = draw(st.sampled_from([1, 3, 4]))
  capacity = draw(st.sampled_from([0, 1, 2, s]))
  seed = draw(st.integers(0, 2 ** 31 - 1))
  logits = 2.0 * np.random.RandomState(seed).randn(g, s, e)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32), capacity


@settings(max_examples=30, deadline=None)
@given(_probs())
def test_switch_top1_properties(args):
  probs, capacity = args
  g, s, e = probs.shape
  r = _switch_top1(jnp.asarray(probs), capacity)
  index = np.asarray(r.expert_index_GxSxK)
  gate = np.asarray(r.gate_GxSxK)
  position = np.asarray(r.position_GxSxK)
  kept = np.asarray(r.kept_GxSxK)
  assert index.shape == gate.shape == position.shape == kept.shape == (g, s, 1)
  np.testing.assert_array_equal(index[..., 0], np.argmax(probs, axis=-1))
  top = np.max(probs, axis=-1)
  np.testing.assert_array_equal(gate[..., 0], np.where(kept[..., 0], top, 0.0))
  assert np.all(gate[kept] > 0.0)
  # First come, first served: the first `capacity` tokens of each expert in each group.
  ref_position, ref_kept = _slots_reference(index, capacity)
  np.testing.assert_array_equal(position, ref_position)
  np.testing.assert_array_equal(kept, ref_kept)
  for gi in range(g):
    counts = np.bincount(index[gi, :, 0][kept[gi, :, 0]], minlength=e)
    assert np.all(counts <= capacity)


def test_router_logits_and_probs():
  router = routing.Router(3, 4, init_scale=1.0, jitter=0.0, rngs=nnx.Rngs(0))
  kernel = np.random.RandomState(0).randn(3, 4).astype(np.float32)
  router.kernel[...] = jnp.asarray(kernel)
  x = np.random.RandomState(1).randn(2, 5, 3).astype(np.float32)
  logits, probs = router(jnp.asarray(x), deterministic=True, rngs=None)
  ref = x.astype(np.float64) @ kernel.astype(np.float64)
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-6)
  ref_p = np.exp(ref - ref.max(-1, keepdims=True))
  ref_p /= ref_p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(probs), ref_p, rtol=1e-5, atol=1e-7)
  assert logits.dtype == probs.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing


def test_balance_bias_step_hand_computed():
  # Loads 4, 2, 2, 0 (mean 2): the busy expert steps down, the idle one up, the rest stay.
  bias = jnp.array([0.5, 0.0, -0.25, 0.0], jnp.float32)
  new = routing.balance_bias(bias, jnp.array([4.0, 2.0, 2.0, 0.0]), 0.125)
  np.testing.assert_array_equal(np.asarray(new), [0.375, 0.0, -0.25, 0.125])
  # Only the sign of the imbalance counts: fractions give the same step as counts.
  np.testing.assert_array_equal(
      np.asarray(routing.balance_bias(bias, jnp.array([0.5, 0.25, 0.25, 0.0]), 0.125)),
      np.asarray(new))


def _imbalanced_probs(seed=0, g=4, s=64, e=4):
  """Router probabilities that favour expert 0 for nearly every token."""
  logits = np.random.RandomState(seed).randn(g, s, e)
  logits[..., 0] += 3.0
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _expected_gates(probs, r, renormalize):
  """Gates as the router gives them for r's selection: unbiased probabilities."""
  gate = jnp.take_along_axis(probs, r.expert_index_GxSxK, axis=-1)
  if renormalize:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  return jnp.where(r.kept_GxSxK, gate, 0.0)


@pytest.mark.parametrize('router', ['switch', 'topk'])
def test_bias_updates_balance_an_imbalanced_router_without_touching_gates(router):
  from switchmoe.moe import router_stats
  probs = _imbalanced_probs()
  logits = jnp.log(probs)
  g, s, e = probs.shape
  options = routing_options(router=router, num_selected=2)
  k = 2 if router == 'topk' else 1
  capacity = s * k  # nothing dropped: the kept load is the selected load

  def step(bias_E, _):
    r = routing.route(logits, probs, capacity, options, deterministic=True, rngs=None,
                      bias_E=bias_E)
    selected_E = jnp.mean(jax.nn.one_hot(r.selected_GxSxK, e), axis=(0, 1, 2))
    gate_error = jnp.max(jnp.abs(r.gate_GxSxK - _expected_gates(probs, r, router == 'topk')))
    cv = router_stats(logits, probs, r)['load_cv']
    return routing.balance_bias(bias_E, selected_E, 0.002), (cv, gate_error)

  bias, (cv, gate_error) = jax.jit(lambda b: jax.lax.scan(step, b, None, length=300))(
      jnp.zeros((e,), jnp.float32))
  cv, gate_error = np.asarray(cv), np.asarray(gate_error)
  assert cv[0] > (1.0 if k == 1 else 0.5)          # nearly everything on expert 0 at first
  assert cv[-50:].max() < 0.1 * cv[0]              # then balanced, and it stays balanced
  assert np.all(gate_error == 0.0)                 # gates never saw the bias
  bias = np.asarray(bias)
  assert bias[0] == bias.min() < 0                 # the favourite was made less attractive
  # Same routing without the bias: identical gates where a token kept its expert.
  r0 = routing.route(logits, probs, capacity, options, deterministic=True, rngs=None)
  r1 = routing.route(logits, probs, capacity, options, deterministic=True, rngs=None,
                     bias_E=jnp.asarray(bias))
  same = np.asarray(r0.expert_index_GxSxK == r1.expert_index_GxSxK).all(-1)
  assert 0 < same.mean() < 1
  np.testing.assert_array_equal(np.asarray(r0.gate_GxSxK)[same], np.asarray(r1.gate_GxSxK)[same])


@pytest.mark.parametrize('router, ntlb', [('switch', 0), ('switch', 1), ('topk', 0)])
def test_zero_bias_routes_exactly_as_no_bias(router, ntlb):
  probs = _imbalanced_probs(1)
  options = routing_options(router=router, ntlb_rounds=ntlb)
  route = lambda bias: routing.route(jnp.log(probs), probs, 16, options, deterministic=True,
                                     rngs=None, bias_E=bias)
  jax.tree.map(np.testing.assert_array_equal, route(None), route(jnp.zeros((4,), jnp.float32)))


def test_selected_is_the_choice_before_ntlb_rerouting():
  # Every token prefers expert 0; with capacity 2 NTLB moves the overflow elsewhere, but the
  # router's selection (what the bias balances) is still expert 0.
  probs = jnp.asarray(np.tile([0.7, 0.2, 0.1], (1, 6, 1)), jnp.float32)
  r = routing.switch_top1(probs, 2, ntlb_rounds=2)
  np.testing.assert_array_equal(np.asarray(r.selected_GxSxK)[0, :, 0], 0)
  np.testing.assert_array_equal(np.asarray(r.expert_index_GxSxK)[0, :, 0], [0, 0, 1, 1, 2, 2])
