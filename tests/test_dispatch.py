"""Routers and dispatches against independent NumPy per-token references, plus properties.

The references (tests/moe_reference.py, whose docstring defines them) call no library code.
Each routes one group of S tokens at a time: tokens choose (top-k, with or without
batch-prioritized routing), no-token-left-behind, experts choose, and padding (each group's
real tokens route alone); the MoE output reference `ref_moe` is a per-expert loop,
y[token] = sum over kept choices of gate * FFN_expert(x[token]).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from switchmoe import dispatch as dispatch_lib
from switchmoe import routing, sharding
from switchmoe.moe import MoeLayer
from tests.helpers import call, moe_config, pad_row_0, random_x, routing_options, weights
from tests.moe_reference import (min_gap, ref_experts_choose, ref_moe, ref_ntlb, ref_route,
                                 ref_route_real, ref_tokens_choose)

D, F = 4, 8           # d_model, d_ff
B, L = 2, 8           # 16 tokens per batch
ALL_STREAMS = lambda seed=0: nnx.Rngs(**{n: seed + i for i, n in enumerate(routing.RNG_STREAMS)})


# --------------------------------------------------------------------------------------------
# Helpers.


def random_probs(seed, shape, scale=2.0):
  logits = (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def assert_routing_equal(r, ref, *, compare_dropped_expert=True, rtol=1e-6):
  expert, gate, position, kept = ref
  r_kept = np.asarray(r.kept_GxSxK)
  np.testing.assert_array_equal(r_kept, kept, err_msg='kept')
  r_expert = np.asarray(r.expert_index_GxSxK)
  if compare_dropped_expert:
    np.testing.assert_array_equal(r_expert, expert, err_msg='expert')
  else:
    np.testing.assert_array_equal(r_expert[kept], expert[kept], err_msg='expert')
  np.testing.assert_array_equal(np.asarray(r.position_GxSxK)[kept], position[kept],
                                err_msg='position')
  np.testing.assert_allclose(np.asarray(r.gate_GxSxK), gate, rtol=rtol, atol=1e-7,
                             err_msg='gate')
  assert np.all(np.asarray(r.gate_GxSxK)[~kept] == 0.0)


def options(router, **kw):
  return routing_options(router=router, **kw)


def make_layer(*, router='switch', k=2, num_experts=4, group_size=8, capacity_factor=1.0,
               min_capacity=1, dispatch='einsum', alpha=0.0, beta=0.0, jitter=0.0,
               input_dropout=0.0, seed=0, router_std=1.0, expert_parallel='gspmd',
               activation='relu', **opts):
  """A float32 MoeLayer with NumPy-drawn weights (built abstractly, no init compile); GEGLU's
  wi_gate is drawn after the others, so a relu layer's weights do not depend on it."""
  cfg = moe_config(router=router, num_selected=k, num_experts=num_experts,
                   group_size=group_size, capacity_factor=capacity_factor,
                   eval_capacity_factor=capacity_factor, min_capacity=min_capacity,
                   load_balance_loss=alpha, router_z_loss=beta, jitter=jitter,
                   expert_dropout=0.0, router_input_dropout=input_dropout, dispatch=dispatch,
                   expert_parallel=expert_parallel, **opts)
  layer = nnx.eval_shape(lambda: MoeLayer(D, F, cfg, activation=activation, init_scale=1.0,
                                          dtype=jnp.float32, rngs=nnx.Rngs(0)))
  rs = np.random.RandomState(seed)
  w = {'router': router_std * rs.randn(D, num_experts),
       'wi': rs.randn(num_experts, D, F) / math.sqrt(D),
       'wo': rs.randn(num_experts, F, D) / math.sqrt(F)}
  if activation == 'geglu':
    w['wi_gate'] = rs.randn(num_experts, D, F) / math.sqrt(D)
  set_weights(layer, w)
  return layer


def set_weights(layer, w):
  """Sets the router and routed-expert weights (``w`` as `tests.helpers.weights` gives)."""
  layer.router.kernel.set_value(jnp.asarray(w['router'], jnp.float32))
  layer.experts.wi.set_value(jnp.asarray(w['wi'], jnp.float32))
  layer.experts.wo.set_value(jnp.asarray(w['wo'], jnp.float32))
  if w.get('wi_gate') is not None:
    layer.experts.wi_gate.set_value(jnp.asarray(w['wi_gate'], jnp.float32))


# --------------------------------------------------------------------------------------------
# 1. Routers == per-token references.

_ROUTER_SHAPES = [(2, 8, 3), (1, 16, 8)]


def _route(probs, capacity, o):
  return routing.route(jnp.log(probs), probs, capacity, o, deterministic=True, rngs=None)


@pytest.mark.parametrize('shape', _ROUTER_SHAPES, ids=str)
def test_topk_matches_reference(shape):
  """Every combination of k, renormalization, BPR and capacity (scaled by k or not)."""
  g, s, e = shape
  for k in (1, 2, 3):
    probs = random_probs(k + s, shape)
    assert min_gap(probs, True) > 1e-4
    for renormalize, scales_with_k, prioritized, cf in itertools.product(
        (False, True), (False, True), (False, True), (0.5, 1.0, 2.0)):
      capacity = max(1, math.floor(s * (k if scales_with_k else 1) * cf / e))
      o = options('topk', num_selected=k, renormalize_gates=renormalize,
                  capacity_scales_with_k=scales_with_k, batch_prioritized=prioritized)
      r = _route(jnp.asarray(probs), capacity, o)
      ref = ref_tokens_choose(probs, capacity, k, renormalize=renormalize,
                              prioritized=prioritized)
      assert_routing_equal(r, ref)
      # k = 1 without renormalization is Switch routing.
      if k == 1 and not renormalize:
        o1 = options('switch', batch_prioritized=prioritized)
        assert_routing_equal(_route(jnp.asarray(probs), capacity, o1), ref)


@pytest.mark.parametrize('router,k,scales_with_k,cf,expected', [
    ('topk', 2, False, 1.0, 2), ('topk', 2, True, 1.0, 4), ('topk', 3, True, 1.25, 7),
    ('switch', 2, True, 1.0, 2), ('experts_choose', 2, True, 0.5, 1),
    ('topk', 2, True, 0.1, 1)])
def test_layer_capacity_scales_with_k(router, k, scales_with_k, cf, expected):
  """MoeLayer capacity: max(min_capacity, floor(S * (k if scaled) * cf / E)); topk only."""
  layer = make_layer(router=router, k=k, capacity_factor=cf,
                     capacity_scales_with_k=scales_with_k)
  assert layer.capacity(8, deterministic=True) == expected


def test_reference_cases_drop_and_prioritize_differently():
  """The routing cases above drop tokens, and BPR keeps different tokens than sequence order."""
  probs = random_probs(3, (2, 8, 4))
  plain = ref_tokens_choose(probs, 1, 2)[3]
  bpr = ref_tokens_choose(probs, 1, 2, prioritized=True)[3]
  assert 0 < plain.sum() < plain.size and not np.array_equal(plain, bpr)
  # BPR: the most confident token of each group always gets its first choice.
  top = probs.max(-1).argmax(-1)
  assert np.all(bpr[np.arange(2), top, 0])


@pytest.mark.parametrize('shape', _ROUTER_SHAPES, ids=str)
def test_ntlb_matches_reference(shape):
  g, s, e = shape
  for rounds, prioritized in itertools.product((0, 1, 2, 7), (False, True)):
    probs = random_probs(7 + rounds, shape, scale=3.0)
    assert min_gap(probs, prioritized) > 1e-4
    for capacity in (1, 2, max(1, s // e)):
      o = options('switch', ntlb_rounds=rounds, batch_prioritized=prioritized)
      r = _route(jnp.asarray(probs), capacity, o)
      ref = ref_ntlb(probs, capacity, rounds, prioritized=prioritized)
      assert_routing_equal(r, ref, compare_dropped_expert=False)
      # Tokens dropped after all rounds still name their top choice.
      dropped = ~ref[3]
      np.testing.assert_array_equal(np.asarray(r.expert_index_GxSxK)[dropped],
                                    probs.argmax(-1)[..., None][dropped])


def test_ntlb_reroutes_tokens():
  """With rounds, fewer tokens are dropped, and at E-1 rounds none while room is left."""
  probs = random_probs(0, (2, 8, 4), scale=3.0)
  dropped = [(~ref_ntlb(probs, 2, r)[3]).sum() for r in range(4)]
  assert dropped[0] > dropped[1] >= dropped[2] >= dropped[3] == 0      # 4 * 2 slots = 8 tokens
  r = _route(jnp.asarray(probs), 2, options('switch', ntlb_rounds=3))
  assert np.all(np.asarray(r.kept_GxSxK))


@pytest.mark.parametrize('shape', _ROUTER_SHAPES, ids=str)
def test_experts_choose_matches_reference(shape):
  for capacity in (1, 2, 3, 100):
    probs = random_probs(11 + capacity, shape)
    assert min_gap(probs) > 1e-4
    r = _route(jnp.asarray(probs), capacity, options('experts_choose'))
    assert np.asarray(r.kept_GxSxK).shape == shape
    assert_routing_equal(r, ref_experts_choose(probs, capacity))


# --------------------------------------------------------------------------------------------
# 2. Dispatch outputs == the per-expert reference, and equal to each other.


def _experts(wi, wo):
  """Two-layer relu experts on a dispatcher's output (buffer, or rows with group sizes)."""
  def fn(x, group_sizes_E=None):
    if group_sizes_E is not None:
      h = jax.nn.relu(jax.lax.ragged_dot(x, wi, group_sizes_E))
      return jax.lax.ragged_dot(h, wo, group_sizes_E)
    h = jax.nn.relu(jnp.einsum('egcd,edf->egcf', x, wi))
    return jnp.einsum('egcf,efd->egcd', h, wo)
  return fn


def _run(kind, r, x_GxSxD, experts, num_experts, capacity):
  """dispatch -> experts -> combine with dispatcher ``kind``."""
  dispatcher = dispatch_lib.DISPATCHERS[kind](r, num_experts, capacity)
  return dispatcher.combine(experts(dispatcher.dispatch(x_GxSxD), dispatcher.group_sizes_E))


@functools.partial(jax.jit, static_argnames=('capacity', 'big_capacity', 'o'))
def _all_dispatches(x_GxSxD, wr, wi, wo, capacity, big_capacity, o):
  e = wr.shape[1]
  logits = x_GxSxD @ wr
  probs = jax.nn.softmax(logits, -1)
  r = routing.route(logits, probs, capacity, o, deterministic=True, rngs=None)
  experts = _experts(wi, wo)
  out = {kind: _run(kind, r, x_GxSxD, experts, e, capacity) for kind in ('einsum', 'gather')}
  if o.router != 'experts_choose':
    r_big = routing.route(logits, probs, big_capacity, o, deterministic=True, rngs=None)
    out['einsum_big'] = _run('einsum', r_big, x_GxSxD, experts, e, big_capacity)
    out['dropless'] = _run('dropless', r_big, x_GxSxD, experts, e, big_capacity)
  return out


# Latin square: each router sees every E and every capacity factor, and every (E, cf) pair
# appears once; group sizes 4, 8 and 16 (one, two or four groups of the 16 tokens).
_DISPATCH_GRID = [(router, e, (0.5, 1.0, 2.0)[(i + j) % 3], (4, 8, 16)[(i + 2 * j) % 3])
                  for i, router in enumerate(('switch', 'topk', 'experts_choose'))
                  for j, e in enumerate((2, 4, 8))]


def _dispatch_case(router, e, cf, s, *, same_expert=None, seed=0):
  rs = np.random.RandomState(seed)
  w = {'router': 1.5 * rs.randn(D, e), 'wi': rs.randn(e, D, F) / 2, 'wo': rs.randn(e, F, D) / 3}
  x = rs.randn(B, L, D)
  if same_expert is not None:                   # every token's top (and 2nd) choice is fixed
    x = np.abs(x) + 0.1
    w['router'] = np.zeros((D, e))
    w['router'][:, same_expert] = 2.0
    w['router'][:, (same_expert + 1) % e] = 1.0
  w = {k: v.astype(np.float32) for k, v in w.items()}
  x = x.astype(np.float32)
  k = 2 if router == 'topk' else 1
  capacity = max(1, math.floor(s * cf / e))
  return w, x, k, capacity


def _check_dispatches(router, e, cf, s, same_expert=None, seed=0):
  w, x, k, capacity = _dispatch_case(router, e, cf, s, same_expert=same_expert, seed=seed)
  o = options(router, num_selected=k)
  g = B * L // s
  out = _all_dispatches(jnp.asarray(x.reshape(g, s, D)), *(jnp.asarray(w[n]) for n in
                                                          ('router', 'wi', 'wo')),
                        capacity, s * k, o)
  out = {n: np.asarray(v).reshape(B, L, D) for n, v in out.items()}
  y_ref, probs, ref_r = ref_moe(x, w, group_size=s, capacity=capacity, router=router, k=k)
  if same_expert is None:
    assert min_gap(probs) > 1e-4, 'near-tie: pick another seed'
  np.testing.assert_allclose(out['einsum'], y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['gather'], y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['gather'], out['einsum'], rtol=1e-5, atol=1e-6)
  if router != 'experts_choose':
    y_big, _, big_r = ref_moe(x, w, group_size=s, capacity=s * k, router=router, k=k)
    assert np.all(big_r[3])                                  # nothing dropped
    for name in ('einsum_big', 'dropless'):
      np.testing.assert_allclose(out[name], y_big, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out['dropless'], out['einsum_big'], rtol=1e-5, atol=1e-6)
  return ref_r


@pytest.mark.parametrize('router,e,cf,s', _DISPATCH_GRID,
                         ids=['{}-E{}-cf{}-S{}'.format(*c) for c in _DISPATCH_GRID])
def test_dispatches_match_reference(router, e, cf, s):
  _check_dispatches(router, e, cf, s, seed=e * 10 + int(4 * cf))


def test_dispatch_grid_drops_tokens():
  """The grid covers real drops (capacity bites) for every router."""
  for router in ('switch', 'topk', 'experts_choose'):
    drops = 0
    for r_, e, cf, s in _DISPATCH_GRID:
      if r_ == router:
        w, x, k, capacity = _dispatch_case(r_, e, cf, s, seed=e * 10 + int(4 * cf))
        kept = ref_moe(x, w, group_size=s, capacity=capacity, router=r_, k=k)[2][3]
        drops += (kept.sum(-1) == 0).any()
    assert drops >= 1, router


@pytest.mark.parametrize('router,expert,cf', [('switch', 3, 0.5), ('topk', 0, 1.0),
                                              ('experts_choose', 3, 0.5)])
def test_dispatches_when_every_token_picks_one_expert(router, expert, cf):
  ref_r = _check_dispatches(router, 4, cf, 8, same_expert=expert)
  if router != 'experts_choose':
    kept = ref_r[3]
    capacity = max(1, math.floor(8 * cf / 4))
    # Only the first `capacity` tokens of each group keep their first choice.
    np.testing.assert_array_equal(kept[:, :, 0].sum(-1), capacity)
    assert np.all(kept[:, :capacity, 0])


def _grad_fn(layer, c):
  """x -> ((grads wrt params, grads wrt x), (y, stats)), one compilation."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def grads(params, x):
    def loss(params, x):
      y, stats = nnx.merge(graphdef, params, rest)(x, deterministic=True, rngs=None)
      return (jnp.sum(y * c) + stats.losses['load_balance'] + stats.losses['z_loss'],
              (y, stats.as_dict()))
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return lambda x: grads(params, x)


def _flat_grads(g):
  g_params, g_x = g
  return {'router': np.asarray(g_params['router']['kernel'][...]),
          'wi': np.asarray(g_params['experts']['wi'][...]),
          'wo': np.asarray(g_params['experts']['wo'][...]), 'x': np.asarray(g_x)}


@pytest.mark.parametrize('router,cf', [('switch', 0.5), ('experts_choose', 1.0)])
def test_gradients_einsum_equal_gather(router, cf):
  """Capacity bites here (tokens dropped); both dispatches give the same gradients."""
  x = jnp.asarray(random_x(5))
  c = jnp.asarray(random_x(6))
  grads, dropped = {}, None
  for dispatch in ('einsum', 'gather'):
    layer = make_layer(router=router, capacity_factor=cf, dispatch=dispatch, alpha=0.1,
                       beta=0.01, seed=4)
    g, (_, stats) = _grad_fn(layer, c)(x)
    dropped = float(stats['dropped_fraction'])
    grads[dispatch] = _flat_grads(g)
  assert dropped > 0.0
  for name, ge in grads['einsum'].items():
    assert np.all(np.isfinite(ge)) and np.any(ge != 0.0), name
    np.testing.assert_allclose(grads['gather'][name], ge, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('router', ['switch', 'topk'])
def test_gradients_dropless_equal_einsum_without_drops(router):
  """min_capacity = S * k: the capacity-bound dispatches drop nothing either."""
  x = jnp.asarray(random_x(7))
  c = jnp.asarray(random_x(8))
  k = 2 if router == 'topk' else 1
  dispatches = ('einsum', 'dropless', 'gather') if router == 'topk' else ('einsum', 'dropless')
  grads, outs = {}, {}
  for dispatch in dispatches:
    layer = make_layer(router=router, dispatch=dispatch, min_capacity=8 * k, alpha=0.1,
                       beta=0.01, seed=9)
    g, (y, stats) = _grad_fn(layer, c)(x)
    assert float(stats['dropped_fraction']) == 0.0
    outs[dispatch] = np.asarray(y)
    grads[dispatch] = _flat_grads(g)
  for dispatch in dispatches[1:]:
    np.testing.assert_allclose(outs[dispatch], outs['einsum'], rtol=1e-5, atol=1e-6)
    for name, ge in grads['einsum'].items():
      assert np.any(ge != 0.0), name
      np.testing.assert_allclose(grads[dispatch][name], ge, rtol=1e-5, atol=1e-6,
                                 err_msg=f'{dispatch} {name}')


# --------------------------------------------------------------------------------------------
# 2b. The row gather and the bucketed twin of ragged_dot.


def _partial_injection(rng, n, m, k):
  """(index_M, inverse_NxK) of a random map from m output rows to n input rows that uses
  each input row at most k times; about a fifth of the outputs read no row (index n)."""
  uses = np.repeat(np.arange(n), k)
  rng.shuffle(uses)
  index = np.full(m, n)
  filled = rng.choice(m, size=min(m, int(0.8 * m), len(uses)), replace=False)
  index[filled] = uses[:len(filled)]
  inverse = np.full((n, k), m)
  count = np.zeros(n, int)
  for out_row, row in enumerate(index):
    if row < n:
      inverse[row, count[row]] = out_row
      count[row] += 1
  return index.astype(np.int32), inverse.astype(np.int32)


@pytest.mark.parametrize('n, m, k', [(6, 10, 1), (8, 12, 2), (5, 3, 1)])
def test_take_rows_value_and_gradient_equal_a_plain_gather(n, m, k):
  """take_rows' custom gradient (a gather by the inverse) equals autodiff of the plain gather
  (a scatter-add), per group, with empty outputs and unused inputs."""
  rng = np.random.default_rng(n * m * k)
  pairs = [_partial_injection(rng, n, m, k) for _ in range(2)]
  index = jnp.asarray(np.stack([p[0] for p in pairs]))
  inverse = jnp.asarray(np.stack([p[1] for p in pairs]))
  x = jnp.asarray(rng.normal(size=(2, n, 3)).astype(np.float32))
  ct = jnp.asarray(rng.normal(size=(2, m, 3)).astype(np.float32))
  plain = lambda x: jnp.take_along_axis(jnp.concatenate([x, jnp.zeros((2, 1, 3))], 1),
                                        index[..., None], axis=1)
  fast = lambda x: dispatch_lib.take_rows(x, index, inverse)
  np.testing.assert_array_equal(fast(x), plain(x))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * ct))(x)
  np.testing.assert_allclose(grad(fast), grad(plain), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(jax.jit(fast)(x), plain(x))


def _grouped_reference(x, w, sizes):
  """float64 per-expert loop: rows of expert e times its weights."""
  out, start = [], 0
  for e, size in enumerate(sizes):
    out.append(x[start:start + size].astype(np.float64) @ w[e].astype(np.float64))
    start += size
  return np.concatenate(out)


# Within the main buffer, a little past it (one overflow tile), every row on one expert (many
# passes), empty experts, N not a multiple of E, and 16 experts (two tiles per pass, of one
# expert or of two).
_SIZES = {'balanced': [13, 12, 12, 11], 'one_pass': [18, 10, 12, 8],
          'one_expert': [0, 48, 0, 0], 'empty': [30, 0, 18, 0], 'uneven': [13, 3, 9, 5],
          'many': [40, 0, 3, 25, 9, 9, 1, 0, 30, 2, 5, 5, 12, 0, 7, 20]}


@pytest.mark.parametrize('case', list(_SIZES))
def test_run_bucketed_equals_ragged_dot(case):
  sizes = _SIZES[case]
  n, d, f, e = sum(sizes), 3, 5, len(sizes)
  rng = np.random.default_rng(len(case))
  x = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  wi = jnp.asarray(rng.normal(size=(e, d, f)).astype(np.float32))
  wo = jnp.asarray(rng.normal(size=(e, f, d)).astype(np.float32))
  ct = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  group_sizes = jnp.asarray(sizes, jnp.int32)
  c, t, k = dispatch_lib.buffer_sizes(n, e)
  tiles = sum(math.ceil(max(0, size - c) / t) for size in sizes)
  passes = math.ceil(tiles / k)
  assert passes == {'one_pass': 1, 'one_expert': 4, 'empty': 3, 'uneven': 2, 'many': 4}.get(case, 0)

  def ragged(x, wi, wo):
    h = jax.nn.relu(jax.lax.ragged_dot(x, wi, group_sizes))
    return jax.lax.ragged_dot(h, wo, group_sizes)

  def bucketed(x, wi, wo):
    experts = lambda w, x_ExCxD, key: jnp.einsum(
        'ecf,efd->ecd', jax.nn.relu(jnp.einsum('ecd,edf->ecf', x_ExCxD, w['wi'])), w['wo'])
    return dispatch_lib.run_bucketed(experts, {'wi': wi, 'wo': wo}, None, x, group_sizes)

  h_ref = np.maximum(_grouped_reference(np.asarray(x), np.asarray(wi), sizes), 0)
  y_ref = _grouped_reference(h_ref, np.asarray(wo), sizes)
  y = jax.jit(bucketed)(x, wi, wo)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2)))
  for name, gb, gr in zip(('x', 'wi', 'wo'), loss(bucketed)(x, wi, wo), loss(ragged)(x, wi, wo)):
    np.testing.assert_allclose(gb, gr, rtol=1e-5, atol=1e-5, err_msg=name)


def test_run_bucketed_gradient_with_expert_dropout_matches_finite_differences():
  """The hand-written gradient reruns each overflow pass with that pass's own dropout mask:
  a directional derivative of a smooth (tanh) dropout FFN through main buffer and tiles
  equals central differences of its value."""
  sizes = _SIZES['many']
  n, d, f, e = sum(sizes), 3, 5, len(sizes)
  rng = np.random.default_rng(7)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  x, ct, v_x = normal(n, d), normal(n, d), normal(n, d)
  w = {'wi': normal(e, d, f), 'wo': normal(e, f, d)}
  v_w = {'wi': normal(e, d, f), 'wo': normal(e, f, d)}
  group_sizes, key = jnp.asarray(sizes, jnp.int32), jax.random.key(3)

  def experts(w, x_KxCxD, key):
    h = jnp.tanh(jnp.einsum('kcd,kdf->kcf', x_KxCxD, w['wi']))
    h = h * jax.random.bernoulli(key, 0.5, h.shape) / 0.5
    return jnp.einsum('kcf,kfd->kcd', h, w['wo'])

  loss = jax.jit(lambda w, x: jnp.sum(
      dispatch_lib.run_bucketed(experts, w, key, x, group_sizes) * ct))
  g_w, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
  along = float(jnp.sum(g_x * v_x) + sum(jnp.sum(g_w[k] * v_w[k]) for k in w))
  eps = 1e-3
  shifted = lambda sign: loss(jax.tree.map(lambda a, b: a + sign * eps * b, w, v_w),
                              x + sign * eps * v_x)
  numeric = float(shifted(1) - shifted(-1)) / (2 * eps)
  np.testing.assert_allclose(along, numeric, rtol=1e-2)


def test_auto_dispatch_follows_backend_and_expert_axis():
  assert jax.default_backend() == 'cpu'
  assert dispatch_lib.resolve('auto') == 'gather'
  assert dispatch_lib.resolve('auto', expert_axis_size=4) == 'einsum'
  for name in ('einsum', 'gather', 'dropless'):
    assert dispatch_lib.resolve(name, expert_axis_size=4) == name


@pytest.mark.parametrize('backend, bucketed', [('cpu', True), ('gpu', True), ('tpu', False)])
def test_auto_dropless_impl_is_ragged_dot_on_tpu_only(monkeypatch, backend, bucketed):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert dispatch_lib.uses_buckets('auto') == bucketed
  assert dispatch_lib.uses_buckets('bucketed') and not dispatch_lib.uses_buckets('ragged_dot')


def test_buffer_sizes():
  assert dispatch_lib.buffer_sizes(4096, 32) == (128, 32, 4)
  assert dispatch_lib.buffer_sizes(48, 4) == (16, 8, 1)
  assert dispatch_lib.buffer_sizes(12, 1) == (12, 8, 1)         # capped at every row
  assert all(c % 8 == 0 for c in dispatch_lib.buffer_sizes(1000, 7)[:2])


@pytest.mark.parametrize('router', ['switch', 'topk'])
def test_dropless_impls_agree_in_the_layer(router):
  """model.moe.dropless_impl: ragged_dot and bucketed give one layer the same outputs, aux
  losses and gradients (with a skewed router, so the fallback passes run too)."""
  x, c = jnp.asarray(random_x(3)), jnp.asarray(random_x(4))
  out = {}
  for impl in ('ragged_dot', 'bucketed'):
    layer = make_layer(router=router, dispatch='dropless', alpha=0.1, beta=0.01, seed=5,
                       dropless_impl=impl)
    kernel = layer.router.kernel
    kernel[...] = kernel[...].at[:, 0].add(3.0)  # most tokens to expert 0
    g, (y, stats) = _grad_fn(layer, c)(x)
    out[impl] = np.asarray(y), _flat_grads(g), stats
  (y_r, g_r, s_r), (y_b, g_b, s_b) = out['ragged_dot'], out['bucketed']
  np.testing.assert_allclose(y_b, y_r, rtol=1e-5, atol=1e-6)
  for name in g_r:
    np.testing.assert_allclose(g_b[name], g_r[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for name in ('load_balance', 'z_loss'):
    np.testing.assert_allclose(s_b[name], s_r[name], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 3. Properties on small random shapes.

_ROUTER_KINDS = ('switch', 'switch_ntlb', 'switch_bpr', 'topk', 'topk_bpr', 'experts_choose')


@st.composite
def routing_cases(draw):
  kind = draw(st.sampled_from(_ROUTER_KINDS))
  g, s = 2, 8
  e = draw(st.sampled_from([3, 4]))
  k = draw(st.integers(1, e)) if kind.startswith('topk') else 1
  capacity = draw(st.sampled_from([0, 1, 2, 3, 8]))
  seed = draw(st.integers(0, 2 ** 31 - 1))
  return kind, (g, s, e), k, capacity, seed


def _kind_options(kind, k):
  if kind == 'switch_ntlb':
    return options('switch', ntlb_rounds=2), dict(router='switch', ntlb=2)
  if kind.endswith('_bpr'):
    base = kind[:-4]
    return (options(base, num_selected=k, batch_prioritized=True),
            dict(router=base, k=k, prioritized=True))
  return options(kind, num_selected=k), dict(router=kind, k=k)


def _route_and_combine(probs, capacity, o):
  r = _route(probs, capacity, o)
  return r, dispatch_lib.combine_tensor(r, probs.shape[-1], capacity)


@settings(max_examples=25, deadline=None)
@given(routing_cases())
def test_routing_properties(case):
  kind, shape, k, capacity, seed = case
  g, s, e = shape
  probs = random_probs(seed % 100000, shape)
  o, ref_kw = _kind_options(kind, k)
  r, combine = _route_and_combine(jnp.asarray(probs), capacity, o)
  expert, gate = np.asarray(r.expert_index_GxSxK), np.asarray(r.gate_GxSxK)
  position, kept = np.asarray(r.position_GxSxK), np.asarray(r.kept_GxSxK)
  combine = np.asarray(combine)
  assert combine.shape == (g, s, e, capacity)
  expected = np.zeros((g, s, e, capacity))
  for gi in range(g):
    for j in range(e):
      mine = kept[gi] & (expert[gi] == j)
      assert mine.sum() <= capacity                                      # capacity respected
      slots = position[gi][mine]
      assert len(np.unique(slots)) == len(slots)                         # unique positions
      assert np.all((0 <= slots) & (slots < capacity))
  for gi, t, kk in zip(*np.nonzero(kept)):
    expected[gi, t, expert[gi, t, kk], position[gi, t, kk]] += gate[gi, t, kk]
  np.testing.assert_array_equal(combine, expected)                        # gates, zero elsewhere
  assert np.all(gate[kept] > 0) and np.all(gate[~kept] == 0)
  # Each token picks distinct experts.
  assert all(len(set(row)) == len(row) for row in expert.reshape(-1, expert.shape[-1]))
  if min_gap(probs, True) > 1e-6:
    assert_routing_equal(r, ref_route(probs, capacity, **ref_kw),
                         compare_dropped_expert=kind != 'switch_ntlb')


def _padded_logits(seed, shape):
  """(logits, valid): random router logits; padding (about a third of the tokens, the first
  three of group 0 among them) all prefers expert 0, and most confidently, so that routed as
  text it would take expert 0's first slots, under BPR too."""
  g, s, e = shape
  rs = np.random.RandomState(seed)
  logits = 2.0 * rs.randn(g, s, e)
  valid = rs.rand(g, s) > 0.35
  valid[0, :3] = False
  logits[~valid] = [6.0] + [0.0] * (e - 1)
  return logits.astype(np.float32), valid


@pytest.mark.parametrize('kind', _ROUTER_KINDS + ('topk_random', 'switch_bias', 'topk_bias'))
def test_padding_routes_nowhere_and_takes_no_capacity(kind):
  """Every router: padding gets no slot (experts_choose: no expert picks it) and gate 0, and
  the real tokens route as if alone (per-token reference), whatever the padding holds."""
  shape, capacity = (2, 8, 4), 2
  logits, valid = _padded_logits(5, shape)
  k = 2 if kind.startswith('topk') else 1
  bias, ref_kw = None, None           # no reference for random or biased choices
  if kind == 'topk_random':
    o = options('topk', second_policy='random', second_threshold=0.5)
  elif kind.endswith('_bias'):
    o = options(kind[:-5], num_selected=k)
    bias = jnp.asarray([0.1, 0.0, -0.1, 0.05], jnp.float32)
  else:
    o, ref_kw = _kind_options(kind, k)

  def route(logits):
    logits = jnp.asarray(logits)
    rngs = ALL_STREAMS() if kind == 'topk_random' else None
    return routing.route(logits, jax.nn.softmax(logits, -1), capacity, o,
                         deterministic=rngs is None, rngs=rngs, bias_E=bias,
                         valid_GxS=jnp.asarray(valid))

  r = route(logits)
  kept = np.asarray(r.kept_GxSxK)
  assert not kept[~valid].any() and np.all(np.asarray(r.gate_GxSxK)[~valid] == 0)
  other = np.where(valid[..., None], logits, 3.0 * np.random.RandomState(6).randn(*shape))
  r_other = route(other.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(r_other.kept_GxSxK), kept)
  np.testing.assert_array_equal(np.asarray(r_other.gate_GxSxK), np.asarray(r.gate_GxSxK))
  for name in ('expert_index_GxSxK', 'position_GxSxK'):
    np.testing.assert_array_equal(np.asarray(getattr(r_other, name))[kept],
                                  np.asarray(getattr(r, name))[kept], name)
  if ref_kw is not None:
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
    assert min_gap(probs[valid][None], True) > 1e-4
    ref = ref_route_real(probs, capacity, valid, **ref_kw)
    assert_routing_equal(r, ref, compare_dropped_expert=False)
    # Not vacuous: routed as text, padding takes slots that real tokens get here.
    assert np.any(ref[3][valid] & ~ref_route(probs, capacity, **ref_kw)[3][valid])


_LAYER_KINDS = [('switch', 'einsum'), ('switch', 'gather'), ('switch', 'dropless'),
                ('topk', 'einsum'), ('topk', 'gather'), ('topk', 'dropless'),
                ('experts_choose', 'einsum'), ('experts_choose', 'gather')]


@functools.lru_cache(maxsize=None)
def _cached_layer(router, dispatch, cf, seed=1):
  return make_layer(router=router, dispatch=dispatch, capacity_factor=cf, seed=seed,
                    min_capacity=0, alpha=0.5)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(_LAYER_KINDS), st.integers(0, 10 ** 6))
def test_dropped_tokens_give_zero_output(kind, seed):
  router, dispatch = kind
  layer = _cached_layer(router, dispatch, 0.5)
  x = random_x(seed)
  y, stats = call(layer, jnp.asarray(x))
  s = 8
  capacity = layer.capacity(s, True)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(x.reshape(-1, s, D)) @ layer.router.kernel[...]))
  kept = np.asarray(_route(jnp.asarray(probs), capacity, layer.cfg.routing).kept_GxSxK)
  routed_to = kept.sum(-1).reshape(B, L)
  y = np.asarray(y)
  assert np.all(y[routed_to == 0] == 0.0)
  assert float(stats['dropped_fraction']) == pytest.approx(np.mean(routed_to == 0))
  if dispatch == 'dropless':
    assert np.all(routed_to >= 1)


@pytest.mark.parametrize('router,dispatch', _LAYER_KINDS)
def test_padding_gets_zero_output_and_takes_no_capacity(router, dispatch):
  """One group over both rows, row 0 padded after 3 tokens: every dispatch gives the real
  tokens the per-expert reference's output for them routed alone, and padding 0."""
  layer = make_layer(router=router, dispatch=dispatch, group_size=16, seed=2)
  x, valid = pad_row_0(random_x(3), 3)
  y, stats = call(layer, jnp.asarray(x), True, None, jnp.asarray(valid))
  y_ref, probs, ref_r = ref_moe(x, weights(layer), group_size=16,
                                capacity=layer.capacity(16, True), valid_BxL=valid,
                                router=router)
  assert min_gap(probs.reshape(B, L, -1)[valid][None]) > 1e-4
  y = np.asarray(y)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert np.all(y[~valid] == 0.0)
  routed_to = ref_r[3].sum(-1).reshape(B, L)
  assert float(stats['dropped_fraction']) == pytest.approx(np.mean(routed_to[valid] == 0))
  if dispatch != 'dropless':  # not vacuous: padding routed as text takes real tokens' slots
    y_text = ref_moe(x, weights(layer), group_size=16, capacity=layer.capacity(16, True),
                     router=router)[0]
    assert not np.allclose(y_text[valid], y_ref[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('router,dispatch', _LAYER_KINDS)
def test_group_size_0_routes_each_sequence_as_one_group(router, dispatch):
  """As HF routes: every row is its own group, with its own capacity."""
  layer = make_layer(router=router, dispatch=dispatch, group_size=0, seed=6)
  x = random_x(6)
  y, _ = call(layer, jnp.asarray(x))
  per_row = [ref_moe(x[i:i + 1], weights(layer), group_size=L,
                     capacity=layer.capacity(L, True), router=router) for i in range(B)]
  assert min(min_gap(probs) for _, probs, _ in per_row) > 1e-4
  y_ref = np.concatenate([y_row for y_row, _, _ in per_row])
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
  if dispatch != 'dropless':  # not vacuous: one group over both rows routes otherwise
    y_one = ref_moe(x, weights(layer), group_size=B * L, capacity=layer.capacity(B * L, True),
                    router=router)[0]
    assert not np.allclose(y_one, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices (simulated on CPU)')
@pytest.mark.parametrize('dispatch', ['einsum', 'gather'])
def test_padding_gets_zero_output_expert_parallel(dispatch):
  """The shard_map path only sees expert buffers, which padding never enters."""
  layer = make_layer(dispatch=dispatch, group_size=4, seed=4,   # 4 groups, one per device
                     expert_parallel='shard_map')
  x, valid = pad_row_0(random_x(5), 3)
  with jax.set_mesh(sharding.make_mesh((2, 4), ('data', 'expert'))), sharding.use_rules(
      sharding.DEFAULT_RULES):
    assert sharding.mesh_axis_size('expert') == 4
    y, _ = call(layer, jnp.asarray(x), True, None, jnp.asarray(valid))
  y_ref = ref_moe(x, weights(layer), group_size=4, capacity=layer.capacity(4, True),
                  valid_BxL=valid, router='switch')[0]
  y = np.asarray(y)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert np.all(y[~valid] == 0.0)


def _check_uniform_load_balance(router, e, seed, alpha=0.25):
  layer = make_layer(router=router, num_experts=e, alpha=alpha)
  layer.router.kernel.set_value(jnp.zeros((D, e), jnp.float32))
  _, stats = call(layer, jnp.asarray(random_x(seed)))
  assert float(stats['load_balance']) == np.float32(alpha)
  assert float(stats['confidence']) == pytest.approx(1.0 / e)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(['switch', 'topk', 'experts_choose']), st.integers(0, 10 ** 6))
def test_load_balance_is_alpha_under_uniform_routing(router, seed):
  """Zero router kernel: all probabilities 1/E, so E * sum_i f_i P_i = sum_i f_i = 1."""
  _check_uniform_load_balance(router, 4, seed)


@pytest.mark.parametrize('e', [2, 8])
def test_load_balance_is_alpha_under_uniform_routing_other_e(e):
  _check_uniform_load_balance('switch', e, e)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.1, 5.0), st.permutations(range(8)), st.permutations(range(8)))
def test_load_balance_is_alpha_under_balanced_assignment(scale, order0, order1):
  """Each token's input is scale * one-hot(expert), 2 tokens per expert and group: f_i = 1/4
  and, by symmetry, P_i = 1/4, so E * sum_i f_i P_i = 1."""
  e, alpha = 4, 0.25
  layer = make_layer(num_experts=e, alpha=alpha)
  layer.router.kernel.set_value(jnp.eye(D, e, dtype=jnp.float32))
  onehot = np.eye(e)[np.arange(8) % e]
  x = scale * np.stack([onehot[np.asarray(order0)], onehot[np.asarray(order1)]])
  _, stats = call(layer, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(stats['expert_fraction_E']), 1.0 / e)
  assert float(stats['load_balance']) == pytest.approx(alpha, rel=1e-6)


# (router, dispatch, activation, drops). Without drops min_capacity = S * k = 16 (experts_choose:
# every expert takes every token); with drops capacity 1 of an 8-token group (cf 0.5).
_PERMUTATION_KINDS = [('switch', 'einsum', 'relu', False), ('switch', 'dropless', 'relu', False),
                      ('topk', 'gather', 'relu', False), ('topk', 'dropless', 'relu', False),
                      ('experts_choose', 'einsum', 'relu', False),
                      ('switch', 'einsum', 'geglu', False), ('switch', 'einsum', 'geglu', True)]


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(_PERMUTATION_KINDS), st.permutations(range(4)),
       st.integers(0, 10 ** 6))
@example(('switch', 'einsum', 'geglu', False), [2, 0, 3, 1], 11)
@example(('switch', 'einsum', 'geglu', True), [2, 0, 3, 1], 11)
def test_expert_permutation(kind, perm, seed):
  """Relabelling experts (router columns, wi, wi_gate, wo) permutes expert_fraction and
  changes nothing else, to float32 round-off, for every router, dispatch and activation.

  With drops, which tokens are dropped depends only on each expert's own queue, so the output
  is still unchanged.
  """
  router, dispatch, activation, drops = kind
  perm = np.asarray(perm)
  capacity = dict(capacity_factor=0.5) if drops else dict(min_capacity=16)
  layer = make_layer(router=router, dispatch=dispatch, activation=activation, alpha=0.1,
                     beta=0.01, seed=seed, **capacity)
  x = jnp.asarray(random_x(seed + 1))
  y, stats = call(layer, x)
  if drops:
    assert float(stats['dropped_fraction']) > 0.0
  else:
    assert float(stats['dropped_fraction']) == 0.0
  w = weights(layer)
  set_weights(layer, {'router': w['router'][:, perm], 'wi': w['wi'][perm], 'wo': w['wo'][perm],
                      'wi_gate': None if w['wi_gate'] is None else w['wi_gate'][perm]})
  y_p, stats_p = call(layer, x)
  np.testing.assert_allclose(np.asarray(y_p), np.asarray(y), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(stats_p['expert_fraction_E']),
                                np.asarray(stats['expert_fraction_E'])[perm])
  for name in ('load_balance', 'z_loss', 'dropped_fraction', 'routed_to_1', 'confidence',
               'load_cv'):
    np.testing.assert_allclose(np.asarray(stats_p[name]), np.asarray(stats[name]), rtol=1e-6,
                               err_msg=name)


# --------------------------------------------------------------------------------------------
# 4. Exploration and randomness.


def _route_rng(logits, capacity, o, deterministic, seed):
  rngs = nnx.Rngs(**{n: jax.random.fold_in(jax.random.key(seed), i)
                     for i, n in enumerate(routing.RNG_STREAMS)})
  return routing.route(logits, jax.nn.softmax(logits, -1), capacity, o,
                       deterministic=deterministic, rngs=rngs)


def test_sample_softmax_routing_samples_in_training_only():
  g, s, e = 4, 1024, 4
  logits = jnp.asarray(0.7 * np.random.RandomState(0).randn(g, s, e), jnp.float32)
  o = options('switch', exploration='sample_softmax')
  argmax = np.asarray(jnp.argmax(logits, -1))
  ev = np.asarray(_route_rng(logits, s, o, True, 0).expert_index_GxSxK[..., 0])
  np.testing.assert_array_equal(ev, argmax)
  tr = _route_rng(logits, s, o, False, 0)
  chosen = np.asarray(tr.expert_index_GxSxK[..., 0])
  assert np.mean(chosen != argmax) > 0.2
  # Sampled from the softmax: empirical frequency of each expert per group matches probs.
  p = np.asarray(jax.nn.softmax(logits, -1))
  freq = np.stack([np.mean(chosen == j, axis=1) for j in range(e)], -1)
  np.testing.assert_allclose(freq, p.mean(1), atol=0.06)
  # Gate is the probability of the sampled expert.
  np.testing.assert_allclose(np.asarray(tr.gate_GxSxK[..., 0]),
                             np.take_along_axis(p, chosen[..., None], -1)[..., 0], rtol=1e-6)
  # A different seed samples differently.
  other = np.asarray(_route_rng(logits, s, o, False, 1).expert_index_GxSxK[..., 0])
  assert not np.array_equal(other, chosen)


@pytest.mark.parametrize('exploration,kw', [('sample_softmax', {}),
                                            ('input_dropout', {'input_dropout': 0.5}),
                                            ('input_jitter', {'jitter': 0.5})])
def test_exploration_layer_train_vs_eval(exploration, kw):
  x = jnp.asarray(random_x(12))
  common = dict(num_experts=4, capacity_factor=4.0, seed=3, router_std=0.5)
  plain = make_layer(**common, **kw)
  explore = make_layer(**common, exploration=exploration, **kw)
  y_eval, _ = call(plain, x, True, None)
  np.testing.assert_array_equal(np.asarray(call(explore, x, True, None)[0]), np.asarray(y_eval))
  np.testing.assert_array_equal(np.asarray(call(explore, x, True, ALL_STREAMS())[0]),
                                np.asarray(y_eval))
  # argmax layers ignore router_input_dropout and jitter in training: each field acts only
  # in its own exploration mode.
  np.testing.assert_array_equal(np.asarray(call(plain, x, False, ALL_STREAMS())[0]),
                                np.asarray(y_eval))
  y_train = np.asarray(call(explore, x, False, ALL_STREAMS())[0])
  assert not np.array_equal(y_train, np.asarray(y_eval))
  assert not np.array_equal(y_train, np.asarray(call(explore, x, False, ALL_STREAMS(7))[0]))
  # In training the chosen expert moves for some tokens, not just the gate.
  if exploration != 'sample_softmax':
    xs = x.reshape(2, 8, D)
    logits_eval, _ = explore.router(xs, deterministic=True, rngs=None)
    logits_train, _ = explore.router(xs, deterministic=False, rngs=ALL_STREAMS())
    assert np.any(np.argmax(logits_eval, -1) != np.argmax(logits_train, -1))


@pytest.mark.parametrize('renormalize', [True, False])
def test_random_second_policy(renormalize):
  g, s, e, thr = 4, 1024, 4, 0.3
  logits = jnp.asarray(1.0 * np.random.RandomState(1).randn(g, s, e), jnp.float32)
  o = options('topk', num_selected=2, second_policy='random', second_threshold=thr,
              renormalize_gates=renormalize)
  p = np.sort(np.asarray(jax.nn.softmax(logits, -1)), -1)[..., ::-1]
  g2 = p[..., 1] / (p[..., 0] + p[..., 1]) if renormalize else p[..., 1]
  keep_p = np.minimum(1.0, g2 / thr)
  assert 0.2 < keep_p.mean() < 0.9
  ev = _route_rng(logits, 2 * s, o, True, 0)
  assert np.all(np.asarray(ev.kept_GxSxK))                           # eval: policy 'all'
  tr = _route_rng(logits, 2 * s, o, False, 0)
  kept = np.asarray(tr.kept_GxSxK)
  assert np.all(kept[..., 0])
  n = keep_p.size
  tol = 4 * math.sqrt(np.sum(keep_p * (1 - keep_p))) / n
  assert abs(kept[..., 1].mean() - keep_p.mean()) < tol
  # Choices with min(1, g2 / thr) = 1 are always kept.
  assert np.all(kept[..., 1][keep_p >= 1.0])
  # Dropped second choices have gate 0; kept ones keep their gate.
  gate2 = np.asarray(tr.gate_GxSxK)[..., 1]
  assert np.all(gate2[~kept[..., 1]] == 0)
  np.testing.assert_allclose(gate2[kept[..., 1]], g2[kept[..., 1]], rtol=1e-5)


def test_missing_stream_raises():
  logits = jnp.asarray(np.random.RandomState(0).randn(1, 8, 4), jnp.float32)
  probs = jax.nn.softmax(logits, -1)
  for o in (options('switch', exploration='sample_softmax'),
            options('topk', second_policy='random')):
    with pytest.raises(ValueError):
      routing.route(logits, probs, 4, o, deterministic=False, rngs=None)
    routing.route(logits, probs, 4, o, deterministic=True, rngs=None)      # eval needs none
  x = jnp.asarray(random_x(0))
  for kw in ({'exploration': 'sample_softmax'},
             {'exploration': 'input_dropout', 'input_dropout': 0.3},
             {'exploration': 'input_jitter', 'jitter': 0.1},
             {'router': 'topk', 'second_policy': 'random'}):
    layer = make_layer(**kw)
    with pytest.raises(ValueError):
      layer(x, deterministic=False, rngs=None)


def test_missing_named_stream_raises_value_error():
  """Rngs that lack the one stream a policy needs: a ValueError naming the stream."""
  logits = jnp.asarray(np.random.RandomState(0).randn(1, 8, 4), jnp.float32)
  probs = jax.nn.softmax(logits, -1)
  without = lambda name: nnx.Rngs(**{n: 0 for n in routing.RNG_STREAMS if n != name})
  for o, stream in ((options('switch', exploration='sample_softmax'), 'router_sample'),
                    (options('topk', second_policy='random'), 'second_expert')):
    with pytest.raises(ValueError, match=stream):
      routing.route(logits, probs, 4, o, deterministic=False, rngs=without(stream))


# --------------------------------------------------------------------------------------------
# 5. experts_choose diagnostics.


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([0.25, 0.5, 1.0, 2.0]), st.integers(0, 10 ** 6))
def test_experts_choose_diagnostics(cf, seed):
  e = 4
  layer = make_layer(router='experts_choose', num_experts=e, capacity_factor=cf, seed=seed % 7)
  x = random_x(seed)
  y, stats = call(layer, jnp.asarray(x))
  capacity = layer.capacity(8, True)
  _, probs, ref_r = ref_moe(x, weights(layer), group_size=8, capacity=capacity,
                            router='experts_choose')
  assume(min_gap(probs) >= 1e-4)  # near-ties: float32 and float64 may pick differently
  counts = ref_r[3].sum(-1)
  r0, r1, r2 = (float(stats[n]) for n in ('dropped_fraction', 'routed_to_1', 'routed_to_2plus'))
  assert r0 + r1 + r2 == pytest.approx(1.0)
  assert r0 == pytest.approx(np.mean(counts == 0))
  assert r1 == pytest.approx(np.mean(counts == 1))
  assert r2 == pytest.approx(np.mean(counts >= 2))
  assert np.all(np.asarray(y).reshape(-1, D)[counts.reshape(-1) == 0] == 0.0)


# --------------------------------------------------------------------------------------------
# 6. The training loop passes every routing stream.


def _one_step(c, baseline_config=None):
  """One train_step from a fresh init; returns its loss, and optionally the loss of the same
  step (same params, batch and streams) for the model of ``baseline_config``."""
  from switchmoe import sharding, train
  from switchmoe.model import LanguageModel, loss_and_metrics
  from tests.helpers import random_batch
  s = train.make_setup(c, jax.devices()[:1])
  with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
    state = s.init(jax.random.key(0))
    batch = train.device_batch(s, random_batch(c))
    baseline = None
    if baseline_config is not None:
      graphdef = nnx.graphdef(nnx.eval_shape(
          lambda: LanguageModel(baseline_config.model, rngs=nnx.Rngs(0))))

      @jax.jit
      def base_loss(params, batch):
        rngs = nnx.Rngs(**{n: i for i, n in enumerate(('dropout',) + routing.RNG_STREAMS)})
        return loss_and_metrics(nnx.merge(graphdef, params), batch, deterministic=False,
                                rngs=rngs)[0]
      baseline = float(base_loss(state['params'], batch))
    _, metrics = s.train_step(state, batch)
  loss = float(metrics['loss'])
  assert np.isfinite(loss)
  return loss, baseline


def _train_config(**moe_kw):
  from tests.helpers import tiny_config
  c = tiny_config('decoder', **moe_kw)
  c.model.num_layers = 1           # one (Switch) layer keeps compilation short
  c.model.init_scale = 1.0         # router logits large enough for 1% jitter to show in the loss
  return c


def test_train_step_with_sample_softmax():
  loss, _ = _one_step(_train_config(exploration='sample_softmax'))
  assert loss > 0


def test_train_step_applies_jitter():
  """jitter=0.01 changes the step's loss compared with jitter=0.0 at the same params."""
  loss, without = _one_step(_train_config(exploration='input_jitter', jitter=0.01),
                            _train_config())
  assert loss != without
  assert abs(loss - without) < 0.05 * abs(without)
