"""Dispatchers: move each group's tokens to their experts and the experts' outputs back.

A dispatcher is built from one `routing.Routing` and has two steps around the experts call:
``dispatch(x_GxSxD)`` gives the experts' input and ``combine(y)`` turns the experts' output
into y_GxSxD, each token's kept choices summed with their gates (0 for a token routed
nowhere). Config ``model.moe.dispatch`` picks one:

- ``einsum``: one-hot dispatch and combine tensors [G, S, E, C] (GShard / Mesh TF); expert
  buffer x_ExGxCxD.
- ``gather``: the same buffer, filled and read back by index (slot-to-token), with no
  one-hot matmul.
- ``dropless``: no capacity. The (token, choice) pairs are sorted by expert into rows
  x_NxD, and ``group_sizes_E`` says how many rows each expert owns, for grouped matmuls
  (`jax.lax.ragged_dot`); nothing is dropped or padded.

Buffered dispatchers have ``group_sizes_E`` None. Nothing here owns parameters or runs the
experts (`switchmoe.moe.MoeLayer` does both).

Shape suffixes: G groups, S tokens per group, D d_model, E experts, C capacity, K choices
per token, N = G*S*K (token, choice) pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switchmoe.routing import Routing
from switchmoe.sharding import constrain

# The expert buffer [E, G, C, D]: experts over the `expert` mesh axis, groups over the rest of
# the batch axes.
BUFFER_AXES = ('expert', 'batch', None, 'embed')


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
  """x_GxSxD -> x_ExGxCxD -> y_ExGxCxD -> y_GxSxD by gathers over flat slot ids."""
  group_sizes_E = None

  def __init__(self, r: Routing, num_experts: int, capacity: int):
    g, s, k = r.expert_index_GxSxK.shape
    e = num_experts
    # Flat slot id expert * C + position; E * C marks "no slot" (dropped choices).
    self.slot_GxSxK = jnp.where(r.kept_GxSxK, r.expert_index_GxSxK * capacity + r.position_GxSxK,
                                e * capacity)
    token_GxSxK = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], (g, s, k))
    # Which token fills each slot; empty slots point at an appended zero row (index S).
    self.token_of_slot_GxEC = jnp.full((g, e * capacity), s, jnp.int32).at[
        jnp.arange(g)[:, None], self.slot_GxSxK.reshape(g, s * k)].set(
            token_GxSxK.reshape(g, s * k), mode='drop')
    self.routing, self.num_experts, self.capacity = r, e, capacity

  def dispatch(self, x_GxSxD: jax.Array) -> jax.Array:
    g, _, d = x_GxSxD.shape
    x_padded = jnp.concatenate([x_GxSxD, jnp.zeros((g, 1, d), x_GxSxD.dtype)], axis=1)
    x_GxECxD = jnp.take_along_axis(x_padded, self.token_of_slot_GxEC[..., None], axis=1)
    x_GxExCxD = x_GxECxD.reshape(g, self.num_experts, self.capacity, d)
    return constrain(jnp.transpose(x_GxExCxD, (1, 0, 2, 3)), BUFFER_AXES)

  def combine(self, y_ExGxCxD: jax.Array) -> jax.Array:
    y_ExGxCxD = constrain(y_ExGxCxD, BUFFER_AXES)
    e, g, c, d = y_ExGxCxD.shape
    y_GxECxD = jnp.transpose(y_ExGxCxD, (1, 0, 2, 3)).reshape(g, e * c, d)
    y_GxECxD = jnp.concatenate([y_GxECxD, jnp.zeros((g, 1, d), y_GxECxD.dtype)], axis=1)
    s, k = self.slot_GxSxK.shape[1:]
    y_GxSKxD = jnp.take_along_axis(y_GxECxD, self.slot_GxSxK.reshape(g, s * k, 1), axis=1)
    return _weigh_choices(y_GxSKxD.reshape(g, s, k, d), self.routing)


class DroplessDispatcher:
  """x_GxSxD -> rows x_NxD sorted by expert (``group_sizes_E`` each) -> y_NxD -> y_GxSxD.

  Every choice is served, so the routing's capacity must have been large enough to keep all
  of them (`switchmoe.moe.MoeLayer.capacity`).
  """

  def __init__(self, r: Routing, num_experts: int, capacity: int | None = None):
    del capacity  # unbounded by construction
    expert_N = r.expert_index_GxSxK.reshape(-1)
    self.order_N = jnp.argsort(expert_N, stable=True)
    self.group_sizes_E = jnp.bincount(expert_N, length=num_experts).astype(jnp.int32)
    self.routing = r

  def dispatch(self, x_GxSxD: jax.Array) -> jax.Array:
    g, s, d = x_GxSxD.shape
    k = self.routing.expert_index_GxSxK.shape[-1]
    return x_GxSxD.reshape(g * s, d)[self.order_N // k]

  def combine(self, y_sorted_NxD: jax.Array) -> jax.Array:
    y_NxD = jnp.zeros_like(y_sorted_NxD).at[self.order_N].set(y_sorted_NxD)
    g, s, k = self.routing.expert_index_GxSxK.shape
    return _weigh_choices(y_NxD.reshape(g, s, k, -1), self.routing)


DISPATCHERS = {'einsum': EinsumDispatcher, 'gather': GatherDispatcher,
               'dropless': DroplessDispatcher}
DISPATCHES = tuple(DISPATCHERS)
