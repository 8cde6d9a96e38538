"""The Switch / MoE feed-forward layer: route tokens, run the experts, combine.

Dispatches (config ``model.moe.dispatch``), all driven by the same `routing.Routing`:
- ``einsum``: one-hot dispatch and combine tensors [G, S, E, C] (GShard / Mesh TF).
- ``gather``: slot-to-token indices; tokens are gathered into the [E, G, C, D] expert buffer
  and results gathered back, with no one-hot matmul.
- ``dropless``: no capacity; (token, choice) pairs are sorted by expert and the experts run
  as grouped matmuls (`jax.lax.ragged_dot`), so nothing is dropped or padded.

Shape suffixes: B batch, L length, D d_model, G groups, S tokens per group, E experts,
C capacity, K choices per token, N = G*S*K (token, choice) pairs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from switchmoe import routing, sharding
from switchmoe.layers import FeedForward
from switchmoe.sharding import constrain

DISPATCHES = ('einsum', 'gather', 'dropless')
AUX_LOSSES = ('load_balance', 'importance', 'z_loss')

_BUFFER_AXES = ('expert', 'batch', None, 'embed')


def combine_tensor(r: routing.Routing, num_experts: int, capacity: int) -> jax.Array:
  """combine_GxSxExC: gate of each token at its (expert, slot), zero elsewhere and if dropped."""
  expert_GxSxKxE = jax.nn.one_hot(r.expert_index_GxSxK, num_experts, dtype=jnp.float32)
  # Dropped choices get position = capacity, which one_hot maps to an all-zero row.
  slot_GxSxKxC = jax.nn.one_hot(jnp.where(r.kept_GxSxK, r.position_GxSxK, capacity),
                                capacity, dtype=jnp.float32)
  return jnp.einsum('gske,gskc,gsk->gsec', expert_GxSxKxE, slot_GxSxKxC, r.gate_GxSxK)


def einsum_dispatch(x_GxSxD, r: routing.Routing, experts, num_experts: int, capacity: int):
  """experts: x_ExGxCxD -> y_ExGxCxD. Returns y_GxSxD."""
  e = num_experts
  combine_GxSxExC = combine_tensor(r, e, capacity).astype(x_GxSxD.dtype)
  dispatch_GxSxExC = (combine_GxSxExC > 0).astype(x_GxSxD.dtype)
  # The einsum moves tokens from group-sharded to expert-sharded layout: an all-to-all when
  # `expert` is a mesh axis.
  x_ExGxCxD = constrain(jnp.einsum('gsec,gsd->egcd', dispatch_GxSxExC, x_GxSxD), _BUFFER_AXES)
  y_ExGxCxD = constrain(experts(x_ExGxCxD), _BUFFER_AXES)
  return jnp.einsum('gsec,egcd->gsd', combine_GxSxExC, y_ExGxCxD)


def gather_dispatch(x_GxSxD, r: routing.Routing, experts, num_experts: int, capacity: int):
  """experts: x_ExGxCxD -> y_ExGxCxD. Returns y_GxSxD."""
  g, s, d = x_GxSxD.shape
  e, k = num_experts, r.expert_index_GxSxK.shape[-1]
  # Flat slot id expert * C + position; E * C marks "no slot" (dropped choices).
  slot_GxSxK = jnp.where(r.kept_GxSxK, r.expert_index_GxSxK * capacity + r.position_GxSxK,
                         e * capacity)
  token_GxSxK = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :, None], (g, s, k))
  # Which token fills each slot; empty slots point at an appended zero row (index S).
  token_of_slot_GxEC = jnp.full((g, e * capacity), s, jnp.int32).at[
      jnp.arange(g)[:, None], slot_GxSxK.reshape(g, s * k)].set(
          token_GxSxK.reshape(g, s * k), mode='drop')
  x_padded = jnp.concatenate([x_GxSxD, jnp.zeros((g, 1, d), x_GxSxD.dtype)], axis=1)
  x_GxECxD = jnp.take_along_axis(x_padded, token_of_slot_GxEC[..., None], axis=1)
  x_ExGxCxD = constrain(jnp.transpose(x_GxECxD.reshape(g, e, capacity, d), (1, 0, 2, 3)),
                        _BUFFER_AXES)
  y_ExGxCxD = constrain(experts(x_ExGxCxD), _BUFFER_AXES)
  y_GxECxD = jnp.transpose(y_ExGxCxD, (1, 0, 2, 3)).reshape(g, e * capacity, d)
  y_GxECxD = jnp.concatenate([y_GxECxD, jnp.zeros((g, 1, d), y_GxECxD.dtype)], axis=1)
  y_GxSKxD = jnp.take_along_axis(y_GxECxD, slot_GxSxK.reshape(g, s * k, 1), axis=1)
  y_GxSxKxD = y_GxSKxD.reshape(g, s, k, d)
  return jnp.einsum('gskd,gsk->gsd', y_GxSxKxD, r.gate_GxSxK.astype(y_GxSxKxD.dtype))


def dropless_dispatch(x_GxSxD, r: routing.Routing, experts_ragged, num_experts: int):
  """experts_ragged: (rows_NxD sorted by expert, group_sizes_E) -> y_NxD. Returns y_GxSxD."""
  g, s, d = x_GxSxD.shape
  e, k = num_experts, r.expert_index_GxSxK.shape[-1]
  expert_N = r.expert_index_GxSxK.reshape(-1)
  order_N = jnp.argsort(expert_N, stable=True)
  token_N = order_N // k
  y_sorted_NxD = experts_ragged(x_GxSxD.reshape(g * s, d)[token_N],
                                jnp.bincount(expert_N, length=e).astype(jnp.int32))
  y_NxD = jnp.zeros_like(y_sorted_NxD).at[order_N].set(y_sorted_NxD)
  y_GxSxKxD = y_NxD.reshape(g, s, k, d)
  return jnp.einsum('gskd,gsk->gsd', y_GxSxKxD, r.gate_GxSxK.astype(y_GxSxKxD.dtype))


def all_to_all_experts(run, experts: FeedForward, key: jax.Array | None,
                       x_ExGxCxD: jax.Array) -> jax.Array:
  """Expert parallelism by hand: ``run(experts, x, rngs)`` inside `jax.shard_map`, manual over
  the ``expert`` mesh axis (other axes stay automatic).

  Buffers arrive with groups split over ``expert``; an all-to-all regroups them so each device
  holds all groups for its own experts, and a second one sends results back. With fewer
  experts than devices on the axis (E < n, n % E == 0), each expert is replicated n / E times
  and its capacity slots are split between the replicas.
  """
  n = sharding.manual_expert_axis()
  e, g, c, d = x_ExGxCxD.shape
  graphdef, state = nnx.split(experts)
  replicas = 1
  if e % n:
    if n % e or c % (n // e):
      raise ValueError(f'model.moe.num_experts={e} on an expert mesh axis of {n}: one must '
                       f'divide the other, and with fewer experts the capacity ({c}) must '
                       f'divide by {n}/{e}')
    replicas = n // e
    x_ExGxCxD = jnp.swapaxes(x_ExGxCxD.reshape(e, g, replicas, c // replicas, d), 1, 2
                             ).reshape(e * replicas, g, c // replicas, d)
    state = jax.tree.map(lambda w: jnp.repeat(w, replicas, axis=0), state)
  if g % n:
    raise ValueError(f'{g} routing groups cannot be split over the expert mesh axis of {n}: '
                     'lower model.moe.group_size or raise train.batch_size')

  def local(state, x_ExGxCxD, key):
    # [E, G/n, C, D] -> [E/n, G, C, D]: this device's experts, every device's groups.
    x = jax.lax.all_to_all(x_ExGxCxD, 'expert', 0, 1, tiled=True)
    rngs = None
    if key is not None:
      rngs = nnx.Rngs(dropout=jax.random.fold_in(key, jax.lax.axis_index('expert')))
    y = run(nnx.merge(graphdef, state), x, rngs)
    return jax.lax.all_to_all(y, 'expert', 1, 0, tiled=True)

  y = jax.shard_map(local, in_specs=(P('expert'), P(None, 'expert'), P()),
                    out_specs=P(None, 'expert'), axis_names={'expert'})(state, x_ExGxCxD, key)
  if replicas > 1:
    y = jnp.swapaxes(y.reshape(e, replicas, g, c // replicas, d), 1, 2).reshape(e, g, c, d)
  return y


def routing_groups(batch: int, length: int, group_size: int) -> tuple[int, int]:
  """(G, S) for a batch of ``batch`` sequences of ``length`` tokens. ``group_size`` 0 routes
  each sequence as one group (as HF and many released checkpoints do); otherwise the group
  size is capped at the token count and must divide it."""
  num_tokens = batch * length
  size = length if group_size == 0 else min(group_size, num_tokens)
  if num_tokens % size:
    raise ValueError(f'model.moe.group_size={group_size} does not divide the {num_tokens} '
                     'tokens of this batch (batch_size * length)')
  return num_tokens // size, size


def router_stats(logits_GxSxE, probs_GxSxE, r: routing.Routing,
                 valid_GxS: jax.Array | None = None) -> dict[str, jax.Array]:
  """Unweighted diagnostics of one layer's routing over its real tokens (``valid_GxS``; None:
  all), all float32 scalars but expert_fraction_E."""
  num_experts = probs_GxSxE.shape[-1]
  valid_GxS = routing.real_tokens(valid_GxS, probs_GxSxE.shape)
  top1_GxS = jnp.argmax(probs_GxSxE, axis=-1)
  routed_GxS = jnp.sum(r.kept_GxSxK, axis=-1)
  # Padding is never kept, so the kept load is the real tokens' already.
  load_E = jnp.sum(jax.nn.one_hot(r.expert_index_GxSxK, num_experts) *
                   r.kept_GxSxK[..., None], axis=(0, 1, 2))
  mean = lambda a: routing.masked_mean(a.astype(jnp.float32), valid_GxS)
  return {
      'expert_fraction_E': routing.masked_mean(jax.nn.one_hot(top1_GxS, num_experts),
                                               valid_GxS[..., None], axis=(0, 1)),
      'dropped_fraction': mean(routed_GxS == 0),
      'routed_to_1': mean(routed_GxS == 1),
      'routed_to_2plus': mean(routed_GxS >= 2),
      'confidence': mean(jnp.max(probs_GxSxE, axis=-1)),
      'entropy': mean(-jnp.sum(probs_GxSxE * jax.nn.log_softmax(logits_GxSxE), axis=-1)),
      'load_cv': jnp.std(load_E) / jnp.maximum(jnp.mean(load_E), 1e-9),
  }


class MoeLayer(nnx.Module):
  """Sparse FFN layer (SW §2): a float32 router and E batched experts.

  Call: x_BxLxD -> (y_BxLxD, stats). Tokens routed nowhere get y = 0 (but for the shared
  experts' output, if any), so the surrounding residual connection carries them through.
  ``valid_BxL`` (bool, None: all True) is False on padding: it takes no capacity, counts in no
  aux loss or diagnostic, and gets y = 0, shared experts' output included.

  ``num_shared_experts`` > 0 (DeepSeekMoE) adds always-on experts that every token passes
  through: y = shared(x) + routed(x). They are one dense FFN of width num_shared_experts *
  hidden, the same function as that many separate FFNs of width ``hidden`` summed (their
  hidden units just concatenate; only the init differs, wo's fan-in being the full width),
  with dense-FFN logical axes ('embed', 'mlp').
  ``expert_bias`` gives the router an aux-loss-free balancing bias (`balance`).
  ``sow_routing`` (False unless set on a built layer): each call sows its `routing.Routing`
  as ``nnx.Intermediate`` ``routing``, for `nnx.capture` (`switchmoe.token_routing`). Off,
  a call adds no state, as the train step needs.
  """

  def __init__(self, dim: int, hidden: int, *, num_experts: int, group_size: int,
               capacity_factor: float, eval_capacity_factor: float, min_capacity: int,
               load_balance_loss: float, router_z_loss: float, jitter: float,
               activation: str, init_scale: float, expert_dropout: float, dtype,
               router_dtype=jnp.float32, importance_loss: float = 0.0,
               router_input_dropout: float = 0.0, dispatch: str = 'einsum',
               options: routing.RoutingOptions = routing.RoutingOptions(),
               num_shared_experts: int = 0, expert_bias: bool = False, rngs: nnx.Rngs):
    if dispatch not in DISPATCHES:
      raise ValueError(f'model.moe.dispatch={dispatch!r}: expected one of {DISPATCHES}')
    if dispatch == 'dropless' and options.router == 'experts_choose':
      raise ValueError('model.moe.dispatch="dropless" needs a tokens-choose router; '
                       'experts_choose is capacity-bound by definition')
    # Each exploration mode reads its own field; in any other mode that field does nothing.
    jitter = jitter if options.exploration == 'input_jitter' else 0.0
    input_dropout = router_input_dropout if options.exploration == 'input_dropout' else 0.0
    self.router = routing.Router(dim, num_experts, init_scale=init_scale, jitter=jitter,
                                 input_dropout=input_dropout, dtype=router_dtype,
                                 expert_bias=expert_bias, rngs=rngs)
    self.experts = FeedForward(dim, hidden, activation=activation, init_scale=init_scale,
                               dropout_rate=expert_dropout, dtype=dtype, rngs=rngs,
                               num_experts=num_experts)
    self.shared = (FeedForward(dim, num_shared_experts * hidden, activation=activation,
                               init_scale=init_scale, dropout_rate=expert_dropout, dtype=dtype,
                               rngs=rngs) if num_shared_experts else None)
    self.num_experts, self.group_size, self.min_capacity = num_experts, group_size, min_capacity
    self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
    self.weights = {'load_balance': load_balance_loss, 'importance': importance_loss,
                    'z_loss': router_z_loss}
    self.dispatch, self.options, self.dtype = dispatch, options, dtype
    self.sow_routing = False

  def capacity(self, group_size: int, deterministic: bool) -> int:
    o = self.options
    if self.dispatch == 'dropless':
      return group_size * (o.num_selected if o.router == 'topk' else 1)
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    scale = o.num_selected if o.router == 'topk' and o.capacity_scales_with_k else 1
    return routing.expert_capacity(group_size * scale, self.num_experts, cf, self.min_capacity)

  def balance(self, stats: dict[str, jax.Array], rate: float | jax.Array) -> None:
    """Moves the expert bias one aux-loss-free balancing step, from the selections in
    ``stats`` (this layer's, from a training forward pass)."""
    bias = self.router.expert_bias
    bias[...] = routing.balance_bias(bias[...], stats['selected_fraction_E'], rate)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None,
               valid_BxL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns y_BxLxD and stats: the weighted aux losses (``load_balance`` = alpha * E *
    sum_i f_i P_i, ``importance``, ``z_loss``) and `router_stats` diagnostics; with an expert
    bias also ``selected_fraction_E`` (share of the router's choices per expert, before
    capacity) and ``expert_bias_max`` (max |b|). All average over real tokens."""
    b, l, d = x_BxLxD.shape
    g, s = routing_groups(b, l, self.group_size)
    capacity = self.capacity(s, deterministic)
    valid_BxL = routing.real_tokens(valid_BxL, (b, l))
    valid_GxS = valid_BxL.reshape(g, s)
    x_GxSxD = constrain(x_BxLxD.reshape(g, s, d), ('batch', None, 'embed'))
    logits, probs = self.router(x_GxSxD, deterministic=deterministic, rngs=rngs)
    logits_GxSxE, probs_GxSxE = logits.astype(jnp.float32), probs.astype(jnp.float32)
    bias = self.router.expert_bias
    bias_E = None if bias is None else bias[...]
    r = routing.route(logits_GxSxE, probs_GxSxE, capacity, self.options,
                      deterministic=deterministic, rngs=rngs, bias_E=bias_E, valid_GxS=valid_GxS)
    if self.sow_routing:
      self.sow(nnx.Intermediate, 'routing', r)

    e = self.num_experts
    if self.dispatch == 'dropless':
      ragged = lambda x_NxD, sizes_E: self.experts(x_NxD, deterministic=deterministic,
                                                   rngs=rngs, group_sizes_E=sizes_E)
      y_GxSxD = dropless_dispatch(x_GxSxD, r, ragged, e)
    else:
      def buffered(experts, x_ExGxCxD, rngs):
        return experts(x_ExGxCxD.reshape(x_ExGxCxD.shape[0], -1, d),
                       deterministic=deterministic, rngs=rngs).reshape(x_ExGxCxD.shape)

      if sharding.manual_expert_axis():
        key = None
        if self.experts.dropout_rate > 0 and not deterministic:
          key = rngs.dropout()
        run = functools.partial(all_to_all_experts, buffered, self.experts, key)
      else:
        run = functools.partial(buffered, self.experts, rngs=rngs)
      dispatch = einsum_dispatch if self.dispatch == 'einsum' else gather_dispatch
      y_GxSxD = dispatch(x_GxSxD, r, run, e, capacity)
    y_GxSxD = constrain(y_GxSxD.astype(self.dtype), ('batch', None, 'embed'))
    y_BxLxD = y_GxSxD.reshape(b, l, d)
    if self.shared is not None:
      shared_BxLxD = self.shared(x_BxLxD, deterministic=deterministic, rngs=rngs)
      y_BxLxD = y_BxLxD + jnp.where(valid_BxL[..., None], shared_BxLxD, 0)

    losses = {
        'load_balance': routing.load_balance_loss(probs_GxSxE, jnp.argmax(probs_GxSxE, -1),
                                                  valid_GxS),
        'importance': routing.importance_loss(probs_GxSxE, valid_GxS),
        'z_loss': routing.router_z_loss(logits_GxSxE, valid_GxS),
    }
    stats = {name: self.weights[name] * value for name, value in losses.items()}
    stats.update(router_stats(logits_GxSxE, probs_GxSxE, r, valid_GxS))
    if bias_E is not None:
      stats['selected_fraction_E'] = routing.masked_mean(
          jax.nn.one_hot(r.selected_GxSxK, e), valid_GxS[..., None, None], axis=(0, 1, 2))
      stats['expert_bias_max'] = jnp.max(jnp.abs(bias_E))
    return y_BxLxD, stats

