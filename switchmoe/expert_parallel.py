"""Expert parallelism by hand: a Switch layer's experts split over the ``expert`` mesh axis,
reached with explicit collectives inside `jax.shard_map` (config
``mesh.expert_parallel='shard_map'``; ``gspmd`` leaves the same moves to the compiler).

- `buffered` (``einsum`` / ``gather`` dispatch): the expert buffer x_ExGxCxD has a fixed
  shape, so one `jax.lax.all_to_all` regroups it and a second brings the results back.
- `dropless`: each device sorts its own tokens' choices by expert; how many rows it sends to
  each device depends on the routing. The exchange is ``ragged`` (`jax.lax.ragged_all_to_all`,
  GPU / TPU: only the real rows travel) or ``padded`` (`jax.lax.all_to_all` of a worst-case
  block per pair of devices; runs everywhere, CPU included). Both leave the rows received
  from device s at rows s*M ... of one receive buffer (M: rows per device), so everything
  around the exchange is shared, and on CPU the padded twin runs that shared code.

Shape suffixes: G groups, S tokens per group, D d_model, E experts (L = E / n on each of the
n devices of the axis), C capacity, N = M rows sorted by expert on one device, R = n * M.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from switchmoe.dispatch import DroplessDispatcher, rows_bucket, take_rows
from switchmoe.routing import Routing

EXCHANGES = ('ragged', 'padded')


def default_exchange() -> str:
  """``ragged`` where XLA has a ragged all-to-all (GPU, TPU), ``padded`` on CPU."""
  return 'padded' if jax.default_backend() == 'cpu' else 'ragged'


def _device_key(key: jax.Array | None) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, jax.lax.axis_index('expert'))


def buffered(experts: Callable, params, x_ExGxCxD: jax.Array, axis_size: int,
             key: jax.Array | None) -> jax.Array:
  """``experts(params, x_ExGxCxD, key)`` on an expert buffer split over the ``expert`` axis.

  Buffers arrive with groups split over ``expert``; an all-to-all regroups them so each device
  holds all groups for its own experts, and a second one sends results back. With fewer
  experts than devices on the axis (E < n, n % E == 0), each expert is replicated n / E times
  and its capacity slots are split between the replicas. ``key`` (None: no expert dropout)
  seeds the dropout of each device's experts.
  """
  n = axis_size
  e, g, c, d = x_ExGxCxD.shape
  replicas = 1
  if e % n:
    if n % e or c % (n // e):
      raise ValueError(f'model.moe.num_experts={e} on an expert mesh axis of {n}: one must '
                       f'divide the other, and with fewer experts the capacity ({c}) must '
                       f'divide by {n}/{e}')
    replicas = n // e
    x_ExGxCxD = jnp.swapaxes(x_ExGxCxD.reshape(e, g, replicas, c // replicas, d), 1, 2
                             ).reshape(e * replicas, g, c // replicas, d)
    params = jax.tree.map(lambda w: jnp.repeat(w, replicas, axis=0), params)
  if g % n:
    raise ValueError(f'{g} routing groups cannot be split over the expert mesh axis of {n}: '
                     'lower model.moe.group_size or raise train.batch_size')

  def local(params, x_ExGxCxD, key):
    # [E, G/n, C, D] -> [E/n, G, C, D]: this device's experts, every device's groups.
    x = jax.lax.all_to_all(x_ExGxCxD, 'expert', 0, 1, tiled=True)
    y = experts(params, x, _device_key(key))
    return jax.lax.all_to_all(y, 'expert', 1, 0, tiled=True)

  y = jax.shard_map(local, in_specs=(P('expert'), P(None, 'expert'), P()),
                    out_specs=P(None, 'expert'), axis_names={'expert'})(params, x_ExGxCxD, key)
  if replicas > 1:
    y = jnp.swapaxes(y.reshape(e, replicas, g, c // replicas, d), 1, 2).reshape(e, g, c, d)
  return y


def _padded_layout(send_n: jax.Array, start_n: jax.Array, m: int):
  """(slot_N, row_R) of the padded exchange: sorted row i goes to slot dest*m + (i - start)
  of the send buffer; slot j*m + t holds row start_j + t, or m (nothing) past send_j."""
  n = send_n.shape[0]
  dest_N = rows_bucket((start_n + send_n)[None], m)[0]
  slot_N = dest_N * m + jnp.arange(m, dtype=jnp.int32) - start_n[dest_N]
  t_nxM = jnp.arange(m, dtype=jnp.int32)[None]
  row_R = jnp.where(t_nxM < send_n[:, None], start_n[:, None] + t_nxM, m).reshape(n * m)
  return slot_N, row_R


def _exchange(x_NxD, send_n, start_n, recv_n, exchange: str):
  """This device's rows sorted by expert -> the receive buffer x_RxD (from device s at rows
  s*M .. s*M + recv_n[s]; zeros elsewhere), and the function that brings y_RxD back."""
  m, d = x_NxD.shape
  n = send_n.shape[0]
  if exchange == 'ragged':
    me = jax.lax.axis_index('expert').astype(jnp.int32)
    # Where this device's block starts on each receiver, and each sender's block here.
    their_start_n = jax.lax.all_to_all(start_n, 'expert', 0, 0, tiled=True)
    x_RxD = jax.lax.ragged_all_to_all(
        x_NxD, jnp.zeros((n * m, d), x_NxD.dtype), start_n, send_n,
        jnp.full((n,), me * m, jnp.int32), recv_n, axis_name='expert')

    def back(y_RxD):
      return jax.lax.ragged_all_to_all(
          y_RxD, jnp.zeros((m, y_RxD.shape[-1]), y_RxD.dtype),
          jnp.arange(n, dtype=jnp.int32) * m, recv_n, their_start_n, send_n,
          axis_name='expert')
    return x_RxD, back
  slot_N, row_R = _padded_layout(send_n, start_n, m)
  send_RxD = take_rows(x_NxD[None], row_R[None], slot_N[None, :, None])[0]
  x_RxD = jax.lax.all_to_all(send_RxD.reshape(n, m, d), 'expert', 0, 0, tiled=True)

  def back(y_RxD):
    y = jax.lax.all_to_all(y_RxD.reshape(n, m, -1), 'expert', 0, 0, tiled=True)
    return take_rows(y.reshape(1, n * m, -1), slot_N[None], row_R[None, :, None])[0]
  return x_RxD.reshape(n * m, d), back


def dropless(run_sorted: Callable, params, key: jax.Array | None, x_GxSxD: jax.Array,
             r: Routing, num_experts: int, axis_size: int, exchange: str) -> jax.Array:
  """y_GxSxD of a dropless layer whose experts are split over the ``expert`` axis.

  ``run_sorted(params, x_RxD, group_sizes_L, key, rows)`` runs this device's L experts on
  rows sorted by expert (the first group_sizes_L[0] rows are its first expert's; rows past
  their sum are padding), ``rows`` being the mean row count to size buffers for. Groups (and
  their routing ``r``) are split over the axis like the batch; each device sorts its own
  choices by expert (`dispatch.DroplessDispatcher`), sends each device the rows of that
  device's experts, runs its experts on what it received and sends the results back.
  """
  n = axis_size
  g = x_GxSxD.shape[0]
  if num_experts % n:
    raise ValueError(f'model.moe.num_experts={num_experts} on an expert mesh axis of {n}: '
                     "dropless expert parallelism needs a whole number of experts per device")
  if g % n:
    raise ValueError(f'{g} routing groups cannot be split over the expert mesh axis of {n}: '
                     'lower model.moe.group_size or raise train.batch_size')
  if exchange not in EXCHANGES:
    raise ValueError(f'exchange={exchange!r}; allowed: {", ".join(EXCHANGES)}')
  experts_per_device = num_experts // n

  def local(params, x_GxSxD, r, key):
    dispatcher = DroplessDispatcher(r, num_experts)
    x_NxD = dispatcher.dispatch(x_GxSxD)
    m = x_NxD.shape[0]
    sizes_nxL = dispatcher.group_sizes_E.reshape(n, experts_per_device)
    send_n = jnp.sum(sizes_nxL, axis=1)
    start_n = jnp.cumsum(send_n) - send_n
    # Row s: how many rows device s sends for each of this device's experts.
    recv_nxL = jax.lax.all_to_all(sizes_nxL, 'expert', 0, 0, tiled=True)
    recv_n = jnp.sum(recv_nxL, axis=1)
    x_RxD, back = _exchange(x_NxD, send_n, start_n, recv_n, exchange)
    # Each sender's block is sorted by expert already; sort the blocks together, padding last.
    local_nxM = rows_bucket(jnp.cumsum(recv_nxL, axis=1), m)  # L: padding
    order_R = jnp.argsort(local_nxM.reshape(n * m), stable=True).astype(jnp.int32)
    rank_R = jnp.argsort(order_R).astype(jnp.int32)
    sorted_RxD = take_rows(x_RxD[None], order_R[None], rank_R[None, :, None])[0]
    y_sorted_RxD = run_sorted(params, sorted_RxD, jnp.sum(recv_nxL, axis=0), _device_key(key), m)
    y_RxD = take_rows(y_sorted_RxD[None], rank_R[None], order_R[None, :, None])[0]
    return dispatcher.combine(back(y_RxD))

  return jax.shard_map(local, in_specs=(P('expert'), P('expert'), P('expert'), P()),
                       out_specs=P('expert'), axis_names={'expert'})(params, x_GxSxD, r, key)
