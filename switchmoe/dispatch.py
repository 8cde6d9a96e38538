"""Dispatchers: move each group's tokens to their experts and the experts' outputs back.

A dispatcher is built from one `routing.Routing` and has two steps around the experts call:
``dispatch(x_GxSxD)`` gives the experts' input and ``combine(y)`` turns the experts' output
into y_GxSxD, each token's kept choices summed with their gates (0 for a token routed
nowhere). Config ``model.moe.dispatch`` picks one (``auto``: `resolve`):

- ``einsum``: one-hot dispatch and combine tensors [G, S, E, C] (GShard / Mesh TF); expert
  buffer x_ExGxCxD.
- ``gather``: the same buffer, filled and read back by index (slot-to-token), with no
  one-hot matmul.
- ``dropless``: no capacity. The (token, choice) pairs are sorted by expert into rows
  x_NxD, and ``group_sizes_E`` says how many rows each expert owns, for grouped matmuls;
  nothing is dropped.

Buffered dispatchers have ``group_sizes_E`` None. Nothing here owns parameters or runs the
experts (`switchmoe.moe.MoeLayer` does both).

Every move of rows is `take_rows`, a gather whose gradient is a gather too: each dispatcher
knows where every row went, so the backward pass never scatter-adds. Rows sorted by expert
run either as `jax.lax.ragged_dot` grouped matmuls or, through `run_bucketed`, as one padded
expert buffer plus overflow tiles for busier experts; ``model.moe.dropless_impl`` picks
(``auto``: ragged_dot on TPU only; XLA's CPU and GPU backends lower it to every expert's work
on every row, see `uses_buckets`).

Shape suffixes: G groups, S tokens per group, D d_model, E experts, C capacity, K choices
per token, N = G*S*K (token, choice) pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from switchmoe.routing import Routing
from switchmoe.sharding import constrain

# The expert buffer [E, G, C, D]: experts over the `expert` mesh axis, groups over the rest of
# the batch axes.
BUFFER_AXES = ('expert', 'batch', None, 'embed')


@jax.custom_vjp
def take_rows(x_GxNxD: jax.Array, index_GxM: jax.Array, inverse_GxNxK: jax.Array) -> jax.Array:
  """out_GxMxD[g, m] = x[g, index[g, m]], or 0 where index[g, m] = N (no row).

  ``inverse_GxNxK`` lists, for each input row, the (at most K) output rows that read it, M
  marking an unused entry; it must agree with ``index``. The gradient of x is then
  sum_k dout[g, inverse[g, n, k]]: a gather, where autodiff of a gather would scatter-add.
  """
  del inverse_GxNxK
  return jnp.take_along_axis(x_GxNxD, index_GxM[..., None], axis=1, mode='fill', fill_value=0)


def _take_rows_fwd(x_GxNxD, index_GxM, inverse_GxNxK):
  return take_rows(x_GxNxD, index_GxM, inverse_GxNxK), (index_GxM, inverse_GxNxK)


def _take_rows_bwd(residuals, dout_GxMxD):
  index_GxM, inverse_GxNxK = residuals
  g, n, k = inverse_GxNxK.shape
  dx = jnp.take_along_axis(dout_GxMxD, inverse_GxNxK.reshape(g, n * k, 1), axis=1, mode='fill',
                           fill_value=0)
  return dx.reshape(g, n, k, -1).sum(axis=2), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def combine_tensor(r: Routing, num_experts: int, capacity: int) -> jax.Array:
  """combine_GxSxExC: gate of each token at its (expert, slot), zero elsewhere and if dropped."""
  expert_GxSxKxE = jax.nn.one_hot(r.expert_index_GxSxK, num_experts, dtype=jnp.float32)
  # Dropped choices get position = capacity, which one_hot maps to an all-zero row.
  slot_GxSxKxC = jax.nn.one_hot(jnp.where(r.kept_GxSxK, r.position_GxSxK, capacity),
                                capacity, dtype=jnp.float32)
  return jnp.einsum('gske,gskc,gsk->gsec', expert_GxSxKxE, slot_GxSxKxC, r.gate_GxSxK)


def _weigh_choices(y_GxSxKxD: jax.Array, r: Routing) -> jax.Array:
  """y_GxSxD: each token's choices summed with their gates (0 where not kept)."""
  return jnp.einsum('gskd,gsk->gsd', y_GxSxKxD, r.gate_GxSxK.astype(y_GxSxKxD.dtype))


class EinsumDispatcher:
  """x_GxSxD -> x_ExGxCxD -> y_ExGxCxD -> y_GxSxD by one-hot einsums.

  With ``expert`` a mesh axis, dispatch moves tokens from group-sharded to expert-sharded
  layout (the compiler's all-to-all), and combine moves them back.
  """
  group_sizes_E = None

  def __init__(self, r: Routing, num_experts: int, capacity: int):
    self.combine_GxSxExC = combine_tensor(r, num_experts, capacity)

  def dispatch(self, x_GxSxD: jax.Array) -> jax.Array:
    dispatch_GxSxExC = (self.combine_GxSxExC > 0).astype(x_GxSxD.dtype)
    return constrain(jnp.einsum('gsec,gsd->egcd', dispatch_GxSxExC, x_GxSxD), BUFFER_AXES)

  def combine(self, y_ExGxCxD: jax.Array) -> jax.Array:
    y_ExGxCxD = constrain(y_ExGxCxD, BUFFER_AXES)
    return jnp.einsum('gsec,egcd->gsd', self.combine_GxSxExC.astype(y_ExGxCxD.dtype),
                      y_ExGxCxD)


class GatherDispatcher:
  """x_GxSxD -> x_ExGxCxD -> y_ExGxCxD -> y_GxSxD by row gathers over flat slot ids."""
  group_sizes_E = None

  def __init__(self, r: Routing, num_experts: int, capacity: int):
    g, s, k = r.expert_index_GxSxK.shape
    e = num_experts
    # Flat slot id expert * C + position; E * C marks "no slot" (dropped choices).
    self.slot_GxSxK = jnp.where(r.kept_GxSxK, r.expert_index_GxSxK * capacity + r.position_GxSxK,
                                e * capacity)
    choice_GxSK = jnp.broadcast_to(jnp.arange(s * k, dtype=jnp.int32), (g, s * k))
    # Which choice (token * K + k) fills each slot; S * K marks an empty slot, and so its
    # token, choice // K, is S: no token.
    self.choice_of_slot_GxEC = jnp.full((g, e * capacity), s * k, jnp.int32).at[
        jnp.arange(g)[:, None], self.slot_GxSxK.reshape(g, s * k)].set(choice_GxSK, mode='drop')
    self.routing, self.num_experts, self.capacity = r, e, capacity

  def dispatch(self, x_GxSxD: jax.Array) -> jax.Array:
    g, _, d = x_GxSxD.shape
    k = self.slot_GxSxK.shape[-1]
    x_GxECxD = take_rows(x_GxSxD, self.choice_of_slot_GxEC // k, self.slot_GxSxK)
    x_GxExCxD = x_GxECxD.reshape(g, self.num_experts, self.capacity, d)
    return constrain(jnp.transpose(x_GxExCxD, (1, 0, 2, 3)), BUFFER_AXES)

  def combine(self, y_ExGxCxD: jax.Array) -> jax.Array:
    y_ExGxCxD = constrain(y_ExGxCxD, BUFFER_AXES)
    e, g, c, d = y_ExGxCxD.shape
    y_GxECxD = jnp.transpose(y_ExGxCxD, (1, 0, 2, 3)).reshape(g, e * c, d)
    s, k = self.slot_GxSxK.shape[1:]
    y_GxSKxD = take_rows(y_GxECxD, self.slot_GxSxK.reshape(g, s * k),
                         self.choice_of_slot_GxEC[..., None])
    return _weigh_choices(y_GxSKxD.reshape(g, s, k, d), self.routing)


class DroplessDispatcher:
  """x_GxSxD -> rows x_NxD sorted by expert (``group_sizes_E`` each) -> y_NxD -> y_GxSxD.

  Every choice is served, so the routing's capacity must have been large enough to keep all
  of them (`switchmoe.moe.MoeLayer.capacity`).
  """

  def __init__(self, r: Routing, num_experts: int, capacity: int | None = None):
    del capacity  # unbounded by construction
    expert_N = r.expert_index_GxSxK.reshape(-1)
    # Row i of the sorted layout holds choice order_N[i]; choice j sits in row rank_N[j].
    self.order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
    self.rank_N = jnp.argsort(self.order_N).astype(jnp.int32)
    self.group_sizes_E = jnp.bincount(expert_N, length=num_experts).astype(jnp.int32)
    self.routing = r

  def dispatch(self, x_GxSxD: jax.Array) -> jax.Array:
    g, s, d = x_GxSxD.shape
    k = self.routing.expert_index_GxSxK.shape[-1]
    return take_rows(x_GxSxD.reshape(1, g * s, d), self.order_N[None] // k,
                     self.rank_N.reshape(1, g * s, k))[0]

  def combine(self, y_sorted_NxD: jax.Array) -> jax.Array:
    y_NxD = take_rows(y_sorted_NxD[None], self.rank_N[None], self.order_N[None, :, None])[0]
    g, s, k = self.routing.expert_index_GxSxK.shape
    return _weigh_choices(y_NxD.reshape(g, s, k, -1), self.routing)


# `run_bucketed`'s main buffer holds this multiple of the mean rows per expert; an expert's
# rows past it go to overflow tiles a quarter of its size, E / 8 tiles per pass
# (docs/performance.md: 1.0 measured faster than 1.125 and 1.25 once overflow got cheap).
BUFFER_FACTOR = 1.0


def buffer_sizes(num_rows: int, num_experts: int) -> tuple[int, int, int]:
  """(C, T, K) of `run_bucketed`: slots per expert of the main buffer (a multiple of 8, at
  most num_rows), rows per overflow tile (a multiple of 8) and tiles per overflow pass."""
  main = min(num_rows, 8 * math.ceil(BUFFER_FACTOR * num_rows / num_experts / 8))
  return main, 8 * math.ceil(main / 4 / 8), max(1, num_experts // 8)


def rows_bucket(ends_BxE: jax.Array, n: int) -> jax.Array:
  """bucket_BxN[b, i] = how many of ends_BxE[b] (sorted) are <= i: the bucket of row i when
  rows are cut at those ends, as ``jnp.searchsorted(ends, arange(n), side='right')``. Written
  as a histogram's running sum (O(n + E)) because jnp.searchsorted fails inside
  `jax.shard_map` (jax 0.10), where expert-parallel dropless runs this."""
  b = ends_BxE.shape[0]
  at = jnp.arange(b)[:, None] * (n + 1) + jnp.clip(ends_BxE, 0, n)
  hist = jnp.zeros(b * (n + 1), jnp.int32).at[at.reshape(-1)].add(1)
  return jnp.cumsum(hist.reshape(b, n + 1), axis=1)[:, :n]


def _gather_rows(x_NxD, slot_N, row_M):
  """x rows into M slots (row_M[m] = N: empty), with slot_N the inverse (M: in none)."""
  return take_rows(x_NxD[None], row_M[None], slot_N[None, :, None])[0]


def _scatter_rows(y_MxD, slot_N, row_M):
  """The inverse move of `_gather_rows`: slot rows back to the N rows (0 for rows in none)."""
  return take_rows(y_MxD[None], slot_N[None], row_M[None, :, None])[0]


def _bucket_maps(group_sizes_E: jax.Array, n: int, c: int, t: int, k: int):
  """Where each of n rows sorted by expert goes (all int32).

  main (slot_N, row_ExC): row i's slot in the [E, C] main buffer (E*C: none) and each slot's
  row (n: empty). tiles (slot_N, row_IxT, expert_I, num_tiles): the same for overflow tiles,
  [I, T] with I a multiple of K: each expert's rows at offsets >= C, T per tile, its tiles
  consecutive; expert_I is each tile's expert (E past the last tile).
  """
  e = group_sizes_E.shape[0]
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  expert_N = rows_bucket(ends_E[None], n)[0]  # E: padding past the experts' total
  real_N = expert_N < e
  expert_N = jnp.minimum(expert_N, e - 1)
  offset_N = jnp.arange(n, dtype=jnp.int32) - starts_E[expert_N]
  in_main_N = real_N & (offset_N < c)
  slot_C = jnp.arange(c, dtype=jnp.int32)
  main = (jnp.where(in_main_N, expert_N * c + offset_N, e * c),
          jnp.where(slot_C < group_sizes_E[:, None], starts_E[:, None] + slot_C, n))

  tiles_E = (jnp.maximum(group_sizes_E - c, 0) + t - 1) // t
  tile_ends_E = jnp.cumsum(tiles_E)
  tile_base_E = tile_ends_E - tiles_E
  # sum_e ceil(overflow_e / T) <= ceil((n - C) / T) + E, rounded up to whole passes.
  i = k * math.ceil((math.ceil(max(n - c, 0) / t) + e) / k)
  expert_I = rows_bucket(tile_ends_E[None], i)[0]
  owner_I = jnp.minimum(expert_I, e - 1)
  offset_IxT = (c + t * (jnp.arange(i, dtype=jnp.int32) - tile_base_E[owner_I]))[:, None] + (
      jnp.arange(t, dtype=jnp.int32))
  row_IxT = jnp.where((expert_I < e)[:, None] & (offset_IxT < group_sizes_E[owner_I][:, None]),
                      starts_E[owner_I][:, None] + offset_IxT, n)
  tile_slot_N = jnp.where(real_N & ~in_main_N,
                          t * tile_base_E[expert_N] + offset_N - c, i * t)
  return main, (tile_slot_N, row_IxT.reshape(-1), expert_I, tile_ends_E[-1])


def _tile_pass(experts, k: int, params, key, x_IxTxD, expert_I, p):
  """Overflow pass p: (run(weights, x_KxTxD), its weights, its tiles, their experts). Tiles
  p*K .. p*K + K - 1, each with its own expert's weights (E: padding, output unused)."""
  e = jax.tree.leaves(params)[0].shape[0]
  expert_K = jnp.minimum(jax.lax.dynamic_slice_in_dim(expert_I, p * k, k), e - 1)
  pass_key = None if key is None else jax.random.fold_in(key, p + 1)
  return (lambda weights, x_KxTxD: experts(weights, x_KxTxD, pass_key),
          jax.tree.map(lambda w: w[expert_K], params),
          jax.lax.dynamic_slice_in_dim(x_IxTxD, p * k, k), expert_K)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def run_bucketed(experts: Callable, params, key, x_NxD: jax.Array, group_sizes_E: jax.Array,
                 rows: int | None = None) -> jax.Array:
  """``experts(params, x_KxCxD, key) -> y_KxCxD`` applied to rows x_NxD sorted by expert.

  Rows past sum(group_sizes_E) are padding (y = 0). Buffers are sized for ``rows`` real rows
  (None: N), which a caller whose N is mostly padding sets to the expected count.

  Each expert's first C rows (`buffer_sizes`) go into one [E, C] expert buffer and come back
  in row order. An expert's rows past C fill overflow tiles of T rows, gathered once into
  one [I, T] array; passes of K tiles, each tile run with its own expert's weights, run as
  long as tiles remain (a loop of data-dependent length, none for balanced routing), so a
  busy expert costs its extra rows, not E times them. Each pass is recomputed in the
  backward pass, whose weight gradients accumulate onto the main buffer's. The result
  equals grouped matmuls over the rows; the padding is the extra work. Autodiff cannot
  reverse such a loop, hence the hand-written gradient. Choosing the main buffer among
  several sizes at run time (`jax.lax.switch`) was slower: under autodiff a switch copies
  its branch's activations out and fills those of every branch not taken with zeros.
  """
  return _run_bucketed_fwd(experts, params, key, x_NxD, group_sizes_E, rows)[0]


def _run_bucketed_fwd(experts, params, key, x_NxD, group_sizes_E, rows):
  n, d = x_NxD.shape
  e = group_sizes_E.shape[0]
  c, t, k = buffer_sizes(n if rows is None else rows, e)
  (main_slot_N, row_ExC), tiles = _bucket_maps(group_sizes_E, n, c, t, k)

  def main(params, x_NxD):
    x_ExCxD = _gather_rows(x_NxD, main_slot_N, row_ExC.reshape(-1)).reshape(e, c, d)
    return _scatter_rows(experts(params, x_ExCxD, key).reshape(e * c, -1), main_slot_N,
                         row_ExC.reshape(-1))

  y_NxD, main_vjp = jax.vjp(main, params, x_NxD)
  tile_slot_N, row_IT, expert_I, num_tiles = tiles
  num_passes = (num_tiles + k - 1) // k
  x_IxTxD = _gather_rows(x_NxD, tile_slot_N, row_IT).reshape(-1, t, d)

  def body(p, y_IxTxD):
    run, weights, x_KxTxD, _ = _tile_pass(experts, k, params, key, x_IxTxD, expert_I, p)
    return jax.lax.dynamic_update_slice_in_dim(y_IxTxD, run(weights, x_KxTxD), p * k, 0)

  y_IxTxD = jax.lax.fori_loop(0, num_passes, body, jnp.zeros_like(x_IxTxD))
  y_NxD = y_NxD + _scatter_rows(y_IxTxD.reshape(-1, d), tile_slot_N, row_IT)
  return y_NxD, (main_vjp, params, key, x_IxTxD, tiles, num_passes)


def _run_bucketed_bwd(experts, rows, residuals, dy_NxD):
  main_vjp, params, key, x_IxTxD, tiles, num_passes = residuals
  tile_slot_N, row_IT, expert_I, _ = tiles
  k = buffer_sizes(dy_NxD.shape[0] if rows is None else rows,
                   jax.tree.leaves(params)[0].shape[0])[2]
  dy_IxTxD = _gather_rows(dy_NxD, tile_slot_N, row_IT).reshape(x_IxTxD.shape)

  def body(p, grads):
    d_params, d_x_IxTxD = grads
    run, weights, x_KxTxD, expert_K = _tile_pass(experts, k, params, key, x_IxTxD, expert_I, p)
    _, vjp = jax.vjp(run, weights, x_KxTxD)
    d_weights, d_x_KxTxD = vjp(jax.lax.dynamic_slice_in_dim(dy_IxTxD, p * k, k))
    d_params = jax.tree.map(lambda g, dw: g.at[expert_K].add(dw), d_params, d_weights)
    return d_params, jax.lax.dynamic_update_slice_in_dim(d_x_IxTxD, d_x_KxTxD, p * k, 0)

  d_params, d_x_NxD = main_vjp(dy_NxD)
  d_params, d_x_IxTxD = jax.lax.fori_loop(0, num_passes, body,
                                          (d_params, jnp.zeros_like(x_IxTxD)))
  d_x_NxD = d_x_NxD + _scatter_rows(d_x_IxTxD.reshape(-1, x_IxTxD.shape[-1]), tile_slot_N,
                                    row_IT)
  return d_params, None, d_x_NxD, None


run_bucketed.defvjp(_run_bucketed_fwd, _run_bucketed_bwd)


DISPATCHERS = {'einsum': EinsumDispatcher, 'gather': GatherDispatcher,
               'dropless': DroplessDispatcher}
DISPATCHES = ('auto', *DISPATCHERS)
DROPLESS_IMPLS = ('auto', 'ragged_dot', 'bucketed')


def uses_buckets(dropless_impl: str) -> bool:
  """Whether config ``model.moe.dropless_impl`` runs rows sorted by expert through
  `run_bucketed` rather than ragged_dot: ``auto`` means everywhere but on TPU.

  XLA:CPU lowers ragged_dot to every expert's matmul over every row (E times the work,
  measured in docs/performance.md). Upstream XLA:GPU rewrites it to a dense dot of the same
  kind unless an experimental flag routes some of its matmuls to cuDNN (public reports
  cited in docs/performance.md; not measured here, no GPU so far). The device check times
  both implementations on a GPU.
  """
  return dropless_impl == 'bucketed' or (dropless_impl == 'auto'
                                         and jax.default_backend() != 'tpu')


def resolve(dispatch: str, expert_axis_size: int = 1) -> str:
  """Config ``model.moe.dispatch`` with ``auto`` made concrete for the default backend and the
  size of the mesh's ``expert`` axis.

  ``einsum`` on TPU (matmul units, slow gathers) and wherever the experts are split over an
  expert axis: there the partitioned ``gather`` step moves more bytes through collectives
  (1.28x on a (2, 4) data x expert mesh and 1.29x on (1, 8), switch_tiny, mostly extra
  all-reduce and all-gather; docs/performance.md). ``gather`` otherwise, which
  scripts/benchmark.py measured 1.3-1.7x faster than ``einsum`` on one CPU (on GPU it is
  chosen unmeasured).
  """
  if dispatch != 'auto':
    return dispatch
  return 'einsum' if jax.default_backend() == 'tpu' or expert_axis_size > 1 else 'gather'
