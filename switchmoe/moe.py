"""The Switch feed-forward layer: route tokens, run experts on fixed-size buffers, combine.

Shape suffixes: B batch, L length, D d_model, G groups, S tokens per group, E experts,
C capacity (slots per expert per group), K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from switchmoe import routing
from switchmoe.layers import FeedForward
from switchmoe.sharding import constrain


def combine_tensor(r: routing.Routing, num_experts: int, capacity: int) -> jax.Array:
  """combine_GxSxExC: gate of each token at its (expert, slot), zero elsewhere and if dropped."""
  expert_GxSxKxE = jax.nn.one_hot(r.expert_index_GxSxK, num_experts, dtype=jnp.float32)
  # Dropped choices have position >= capacity, which one_hot maps to an all-zero row.
  slot_GxSxKxC = jax.nn.one_hot(jnp.where(r.kept_GxSxK, r.position_GxSxK, capacity),
                                capacity, dtype=jnp.float32)
  return jnp.einsum('gske,gskc,gsk->gsec', expert_GxSxKxE, slot_GxSxKxC,
                    r.gate_GxSxK.astype(jnp.float32))


def routing_groups(num_tokens: int, group_size: int) -> tuple[int, int]:
  """(G, S): group size is capped at the token count and must divide it."""
  size = min(group_size, num_tokens)
  if num_tokens % size:
    raise ValueError(f'model.moe.group_size={group_size} does not divide the {num_tokens} '
                     'tokens of this batch (batch_size * length)')
  return num_tokens // size, size


class MoeLayer(nnx.Module):
  """Switch Transformer FFN layer (SW §2): a float32 router and E batched experts.

  Call: x_BxLxD -> (y_BxLxD, stats). Tokens past an expert's capacity get y = 0, so the
  surrounding residual connection carries them through unchanged. ``stats`` is a dict of the
  layer's weighted aux losses and router diagnostics (see `__call__`).
  """

  def __init__(self, dim: int, hidden: int, *, num_experts: int, group_size: int,
               capacity_factor: float, eval_capacity_factor: float, min_capacity: int,
               load_balance_loss: float, router_z_loss: float, jitter: float,
               activation: str, init_scale: float, expert_dropout: float, dtype,
               router_dtype=jnp.float32, rngs: nnx.Rngs):
    self.router = routing.Router(dim, num_experts, init_scale=init_scale, jitter=jitter,
                                 dtype=router_dtype, rngs=rngs)
    self.experts = FeedForward(dim, hidden, activation=activation, init_scale=init_scale,
                               dropout_rate=expert_dropout, dtype=dtype, rngs=rngs,
                               num_experts=num_experts)
    self.num_experts, self.group_size, self.min_capacity = num_experts, group_size, min_capacity
    self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
    self.load_balance_weight, self.z_loss_weight = load_balance_loss, router_z_loss
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns y_BxLxD and stats with float32 entries:

    load_balance: alpha * E * sum_i f_i P_i (already weighted by ``load_balance_loss``),
    z_loss: weighted router z-loss, dropped_fraction: share of tokens over capacity,
    expert_fraction_E: share of tokens whose top choice is each expert,
    confidence: mean top-1 router probability.
    """
    b, l, d = x_BxLxD.shape
    g, s = routing_groups(b * l, self.group_size)
    e = self.num_experts
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    capacity = routing.expert_capacity(s, e, cf, self.min_capacity)

    x_GxSxD = constrain(x_BxLxD.reshape(g, s, d), ('batch', None, 'embed'))
    logits_GxSxE, probs_GxSxE = self.router(x_GxSxD, deterministic=deterministic, rngs=rngs)
    r = routing.switch_top1(probs_GxSxE.astype(jnp.float32), capacity)
    combine_GxSxExC = combine_tensor(r, e, capacity).astype(self.dtype)
    dispatch_GxSxExC = (combine_GxSxExC > 0).astype(self.dtype)

    # The einsum moves tokens from group-sharded to expert-sharded layout (an all-to-all
    # when `expert` is a mesh axis).
    x_ExGxCxD = jnp.einsum('gsec,gsd->egcd', dispatch_GxSxExC, x_GxSxD)
    x_ExGxCxD = constrain(x_ExGxCxD, ('expert', 'batch', None, 'embed'))
    y_ExTxD = self.experts(x_ExGxCxD.reshape(e, g * capacity, d),
                           deterministic=deterministic, rngs=rngs)
    y_ExGxCxD = constrain(y_ExTxD.reshape(e, g, capacity, d), ('expert', 'batch', None, 'embed'))
    y_GxSxD = jnp.einsum('gsec,egcd->gsd', combine_GxSxExC, y_ExGxCxD)
    y_GxSxD = constrain(y_GxSxD, ('batch', None, 'embed'))

    top1_GxS = r.expert_index_GxSxK[..., 0]
    stats = {
        'load_balance': self.load_balance_weight * routing.load_balance_loss(
            probs_GxSxE.astype(jnp.float32), top1_GxS),
        'z_loss': self.z_loss_weight * routing.router_z_loss(logits_GxSxE.astype(jnp.float32)),
        'dropped_fraction': 1.0 - jnp.mean(r.kept_GxSxK[..., 0].astype(jnp.float32)),
        'expert_fraction_E': jnp.mean(jax.nn.one_hot(top1_GxS, e, dtype=jnp.float32),
                                      axis=(0, 1)),
        'confidence': jnp.mean(jnp.max(probs_GxSxE.astype(jnp.float32), axis=-1)),
    }
    return y_GxSxD.reshape(b, l, d), stats
