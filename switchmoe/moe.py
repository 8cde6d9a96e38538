"""The Switch / MoE feed-forward layer in four steps: route, dispatch, run the experts, combine.

`MoeLayer` routes each group of tokens with its `routing.Router` (a `routing.Routing`:
expert, slot and gate of each choice), builds the configured `switchmoe.dispatch` dispatcher
from it, runs its `layers.Experts` on what the dispatcher hands over, and lets the
dispatcher combine the results. Expert parallelism (config ``mesh.expert_parallel``):
``gspmd`` leaves the all-to-all to the compiler (the dispatch einsum / gather output is
constrained to an expert-sharded buffer), ``shard_map`` does it by hand
(`switchmoe.expert_parallel`): around the experts call for an expert buffer, around
dispatch, experts and combine for ``dropless``, whose rows per device depend on the routing.

All static choices arrive in one `MoeConfig`, built once from ``model.moe``; a call returns
y and one `MoeStats`.

Shape suffixes: B batch, L length, D d_model, G groups, S tokens per group, E experts,
C capacity, K choices per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, struct

from switchmoe import expert_parallel, routing, sharding
from switchmoe import dispatch as dispatch_lib
from switchmoe.dispatch import DISPATCHERS, run_bucketed
from switchmoe.layers import Experts, FeedForward
from switchmoe.sharding import constrain

AUX_LOSSES = ('load_balance', 'importance', 'z_loss')


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """The static choices of every Switch layer of one stack: the ``model.moe`` fields of the
  same names (their defaults and meanings are in `switchmoe.config`), the stack's
  `routing.RoutingOptions` and the expert-parallel mode. Built by `from_config`."""
  num_experts: int
  group_size: int
  capacity_factor: float
  eval_capacity_factor: float
  min_capacity: int
  expert_capacity: int
  load_balance_loss: float
  importance_loss: float
  router_z_loss: float
  jitter: float
  router_input_dropout: float
  expert_dropout: float
  router_dtype: str
  dispatch: str
  dropless_impl: str
  num_shared_experts: int
  bias_update_rate: float
  routing: routing.RoutingOptions
  expert_parallel: str          # config mesh.expert_parallel: 'gspmd' | 'shard_map'

  @classmethod
  def from_config(cls, moe: ml_collections.ConfigDict, *, causal: bool,
                  expert_parallel: str) -> MoeConfig:
    """From a validated ``model.moe`` section, for an encoder or (``causal``) decoder stack."""
    own = {f.name for f in dataclasses.fields(cls)} - {'routing', 'expert_parallel'}
    return cls(**{name: moe[name] for name in own},
               routing=routing.RoutingOptions.from_config(moe, causal=causal),
               expert_parallel=expert_parallel)

  def loss_weight(self, name: str) -> float:
    """The weight of aux loss ``name`` (one of AUX_LOSSES)."""
    return {'load_balance': self.load_balance_loss, 'importance': self.importance_loss,
            'z_loss': self.router_z_loss}[name]


@struct.dataclass
class MoeStats:
  """What a Switch layer's call reports besides y; everything averages over real tokens.

  losses: the weighted aux losses by name (AUX_LOSSES), float32 scalars: ``load_balance`` =
    alpha * E * sum_i f_i P_i, ``importance``, ``z_loss``.
  diagnostics: unweighted `router_stats`, and ``expert_bias_max`` (max |b|) with an expert
    bias.
  selected_fraction_E: with an expert bias, each expert's share of the router's choices
    before capacity, which the aux-loss-free bias update steps on (`MoeLayer.balance`);
    else None.
  """
  losses: dict[str, jax.Array]
  diagnostics: dict[str, jax.Array]
  selected_fraction_E: jax.Array | None = None

  def as_dict(self) -> dict[str, jax.Array]:
    """Everything in one flat dict, for logging."""
    out = {**self.losses, **self.diagnostics}
    if self.selected_fraction_E is not None:
      out['selected_fraction_E'] = self.selected_fraction_E
    return out


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
  """Sparse FFN layer (SW §2): a float32 router and E experts, configured by a `MoeConfig`.

  Call: x_BxLxD -> (y_BxLxD, `MoeStats`). Tokens routed nowhere get y = 0 (but for the shared
  experts' output, if any), so the surrounding residual connection carries them through.
  ``valid_BxL`` (bool, None: all True) is False on padding: it takes no capacity, counts in no
  aux loss or diagnostic, and gets y = 0, shared experts' output included.

  ``num_shared_experts`` > 0 (DeepSeekMoE) adds always-on experts that every token passes
  through: y = shared(x) + routed(x). They are one dense FFN of width num_shared_experts *
  hidden, the same function as that many separate FFNs of width ``hidden`` summed (their
  hidden units just concatenate; only the init differs, wo's fan-in being the full width),
  with dense-FFN logical axes ('embed', 'mlp').
  ``bias_update_rate`` > 0 gives the router an aux-loss-free balancing bias (`balance`).
  ``sow_routing`` (False unless set on a built layer): each call sows its `routing.Routing`
  as ``nnx.Intermediate`` ``routing``, for `nnx.capture` (`switchmoe.token_routing`). Off,
  a call adds no state, as the train step needs.
  """

  def __init__(self, dim: int, hidden: int, cfg: MoeConfig, *, activation: str,
               init_scale: float, dtype, rngs: nnx.Rngs):
    # Each exploration mode reads its own field; in any other mode that field does nothing.
    exploration = cfg.routing.exploration
    self.router = routing.Router(
        dim, cfg.num_experts, init_scale=init_scale,
        jitter=cfg.jitter if exploration == 'input_jitter' else 0.0,
        input_dropout=cfg.router_input_dropout if exploration == 'input_dropout' else 0.0,
        dtype=jnp.dtype(cfg.router_dtype), expert_bias=cfg.bias_update_rate > 0, rngs=rngs)
    self.experts = Experts(cfg.num_experts, dim, hidden, activation=activation,
                           init_scale=init_scale, dropout_rate=cfg.expert_dropout, dtype=dtype,
                           rngs=rngs)
    self.shared = (FeedForward(dim, cfg.num_shared_experts * hidden, activation=activation,
                               init_scale=init_scale, dropout_rate=cfg.expert_dropout,
                               dtype=dtype, rngs=rngs) if cfg.num_shared_experts else None)
    self.cfg, self.dtype = cfg, dtype
    self.sow_routing = False

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """Slots per expert per group of ``group_size`` tokens: ``expert_capacity`` if set, with
    ``dropless`` enough for every choice, else from the capacity factors."""
    c, o = self.cfg, self.cfg.routing
    if c.dispatch == 'dropless':
      return group_size * (o.num_selected if o.router == 'topk' else 1)
    if c.expert_capacity:
      return c.expert_capacity
    cf = c.eval_capacity_factor if deterministic else c.capacity_factor
    scale = o.num_selected if o.router == 'topk' and o.capacity_scales_with_k else 1
    return routing.expert_capacity(group_size * scale, c.num_experts, cf, c.min_capacity)

  def balance(self, selected_fraction_E: jax.Array, rate: float | jax.Array) -> None:
    """Moves the expert bias one aux-loss-free balancing step, from a training forward pass's
    `MoeStats.selected_fraction_E`."""
    bias = self.router.expert_bias
    bias[...] = routing.balance_bias(bias[...], selected_fraction_E, rate)

  def pure_experts(self, deterministic: bool) -> tuple[Callable, nnx.State]:
    """(``experts(params, x, key, group_sizes_E=None)``, params): the experts as a pure
    function, for the transforms that run them (shard_map, `dispatch.run_bucketed`); ``key``
    None means no expert dropout."""
    graphdef, params = nnx.split(self.experts)

    def experts(params, x, key, group_sizes_E=None):
      rngs = None if key is None else nnx.Rngs(dropout=key)
      return nnx.merge(graphdef, params)(x, deterministic=deterministic, rngs=rngs,
                                         group_sizes_E=group_sizes_E)
    return experts, params

  def run_sorted(self, deterministic: bool) -> tuple[Callable, nnx.State]:
    """(``run(params, x_NxD, group_sizes_E, key, rows=None)``, params): the experts on rows
    sorted by expert, as ragged_dot grouped matmuls or `dispatch.run_bucketed` (config
    ``dropless_impl``)."""
    experts, params = self.pure_experts(deterministic)
    if dispatch_lib.uses_buckets(self.cfg.dropless_impl):
      return (lambda params, x, sizes, key, rows=None:
              run_bucketed(experts, params, key, x, sizes, rows)), params
    return lambda params, x, sizes, key, rows=None: experts(params, x, key, sizes), params

  def expert_key(self, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array | None:
    """The one dropout key of the experts run under a transform (None: no expert dropout)."""
    return rngs.dropout() if self.cfg.expert_dropout > 0 and not deterministic else None

  def run_experts(self, x: jax.Array, group_sizes_E: jax.Array | None, *, deterministic: bool,
                  rngs: nnx.Rngs | None) -> jax.Array:
    """The experts on a dispatcher's output: an expert buffer, by hand over the ``expert``
    axis with ``shard_map`` (`expert_parallel.buffered`), or rows sorted by expert."""
    axis_size = sharding.mesh_axis_size('expert')
    by_hand = self.cfg.expert_parallel == 'shard_map' and group_sizes_E is None and axis_size > 1
    bucketed = group_sizes_E is not None and dispatch_lib.uses_buckets(self.cfg.dropless_impl)
    if not (by_hand or bucketed):
      return self.experts(x, deterministic=deterministic, rngs=rngs,
                          group_sizes_E=group_sizes_E)
    key = self.expert_key(deterministic, rngs)
    if by_hand:
      experts, params = self.pure_experts(deterministic)
      return expert_parallel.buffered(experts, params, x, axis_size, key)
    run, params = self.run_sorted(deterministic)
    return run(params, x, group_sizes_E, key)

  def route(self, x_GxSxD: jax.Array, capacity: int, *, deterministic: bool,
            rngs: nnx.Rngs | None, valid_GxS: jax.Array) -> tuple[routing.Routing, MoeStats]:
    """The router, the configured routing with ``capacity`` slots per expert, the auxiliary
    losses (weighted) and diagnostics: everything of the layer but moving tokens."""
    c = self.cfg
    logits, probs = self.router(x_GxSxD, deterministic=deterministic, rngs=rngs)
    logits_GxSxE, probs_GxSxE = logits.astype(jnp.float32), probs.astype(jnp.float32)
    bias = self.router.expert_bias
    bias_E = None if bias is None else bias[...]
    r = routing.route(logits_GxSxE, probs_GxSxE, capacity, c.routing,
                      deterministic=deterministic, rngs=rngs, bias_E=bias_E, valid_GxS=valid_GxS)
    if self.sow_routing:
      self.sow(nnx.Intermediate, 'routing', r)
    losses = {
        'load_balance': routing.load_balance_loss(probs_GxSxE, jnp.argmax(probs_GxSxE, -1),
                                                  valid_GxS),
        'importance': routing.importance_loss(probs_GxSxE, valid_GxS),
        'z_loss': routing.router_z_loss(logits_GxSxE, valid_GxS),
    }
    diagnostics = router_stats(logits_GxSxE, probs_GxSxE, r, valid_GxS)
    selected_fraction_E = None
    if bias_E is not None:
      selected_fraction_E = routing.masked_mean(
          jax.nn.one_hot(r.selected_GxSxK, c.num_experts), valid_GxS[..., None, None],
          axis=(0, 1, 2))
      diagnostics['expert_bias_max'] = jnp.max(jnp.abs(bias_E))
    return r, MoeStats(
        losses={name: c.loss_weight(name) * value for name, value in losses.items()},
        diagnostics=diagnostics, selected_fraction_E=selected_fraction_E)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None,
               valid_BxL: jax.Array | None = None, decoding: bool = False
               ) -> tuple[jax.Array, MoeStats]:
    """``decoding``: each token is its own routing group with at least one slot per expert,
    so a decoding step drops nothing; its outputs equal a full forward pass's wherever that
    pass (groups of many tokens, capacity from the config) drops nothing either."""
    c = self.cfg
    b, l, d = x_BxLxD.shape
    if decoding:
      g, s = b * l, 1
      capacity = max(1, self.capacity(1, deterministic))
    else:
      g, s = routing_groups(b, l, c.group_size)
      capacity = self.capacity(s, deterministic)
    valid_BxL = routing.real_tokens(valid_BxL, (b, l))
    valid_GxS = valid_BxL.reshape(g, s)
    x_GxSxD = constrain(x_BxLxD.reshape(g, s, d), ('batch', None, 'embed'))

    # 1. Route.
    r, stats = self.route(x_GxSxD, capacity, deterministic=deterministic, rngs=rngs,
                          valid_GxS=valid_GxS)
    # 2-4. Dispatch, run the experts, combine.
    axis_size = sharding.mesh_axis_size('expert')
    dispatch = dispatch_lib.resolve(c.dispatch, axis_size)
    if dispatch == 'dropless' and c.expert_parallel == 'shard_map' and axis_size > 1:
      run, params = self.run_sorted(deterministic)
      y_GxSxD = expert_parallel.dropless(
          run, params, self.expert_key(deterministic, rngs), x_GxSxD, r, c.num_experts,
          axis_size, expert_parallel.default_exchange())
    else:
      dispatcher = DISPATCHERS[dispatch](r, c.num_experts, capacity)
      y_expert = self.run_experts(dispatcher.dispatch(x_GxSxD), dispatcher.group_sizes_E,
                                  deterministic=deterministic, rngs=rngs)
      y_GxSxD = dispatcher.combine(y_expert)
    y_GxSxD = constrain(y_GxSxD.astype(self.dtype), ('batch', None, 'embed'))
    y_BxLxD = y_GxSxD.reshape(b, l, d)
    if self.shared is not None:
      shared_BxLxD = self.shared(x_BxLxD, deterministic=deterministic, rngs=rngs)
      y_BxLxD = y_BxLxD + jnp.where(valid_BxL[..., None], shared_BxLxD, 0)

    return y_BxLxD, stats
