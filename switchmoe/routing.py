"""Routers: which expert slot each token goes to, and the router's auxiliary losses.

Routing works on groups: tokens are split into G groups of S tokens, and capacity is counted
per group (SW §2.2, as in Mesh TensorFlow and flaxformer). Nothing here moves token
activations; `switchmoe.moe` turns a `Routing` into expert inputs and outputs.

Shape suffixes: G groups, S tokens per group, D d_model, E experts, K choices per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from switchmoe.layers import init_param


@struct.dataclass
class Routing:
  """Each token's K expert choices and where they land.

  expert_index_GxSxK: int32 expert id of each choice.
  gate_GxSxK: combine weight of each choice (router probability), zero where dropped.
  position_GxSxK: int32 slot inside the chosen expert's buffer of ``capacity`` slots;
    meaningful only where kept.
  kept_GxSxK: bool, the choice fits under capacity.
  """
  expert_index_GxSxK: jax.Array
  gate_GxSxK: jax.Array
  position_GxSxK: jax.Array
  kept_GxSxK: jax.Array


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert per group: max(min_capacity, floor(S * capacity_factor / E))."""
  return max(int(min_capacity), math.floor(group_size * capacity_factor / num_experts))


def assign_slots(expert_index_GxSxK: jax.Array, num_experts: int, capacity: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Positions in each expert's buffer, first come first served.

  Priority goes to all first choices before any second choice, and within one choice rank to
  sequence order (the cumulative sum over the group). Returns (position_GxSxK, kept_GxSxK).
  """
  g, s, k = expert_index_GxSxK.shape
  # Choice-major order: [G, K*S], so every token's first choice precedes any second choice.
  index_GxKS = jnp.swapaxes(expert_index_GxSxK, 1, 2).reshape(g, k * s)
  onehot_GxKSxE = jax.nn.one_hot(index_GxKS, num_experts, dtype=jnp.int32)
  position_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) - 1
  position_GxKS = jnp.sum(position_GxKSxE * onehot_GxKSxE, axis=-1)
  position_GxSxK = jnp.swapaxes(position_GxKS.reshape(g, k, s), 1, 2)
  return position_GxSxK, position_GxSxK < capacity


def load_balance_loss(probs_GxSxE: jax.Array, expert_index_GxS: jax.Array) -> jax.Array:
  """Switch loss N * sum_i f_i * P_i per group, averaged over groups (1.0 when uniform).

  f_i: fraction of the group's tokens whose top choice is expert i (no gradient flows through
  the argmax); P_i: mean router probability of expert i over the group.
  """
  num_experts = probs_GxSxE.shape[-1]
  f_GxE = jnp.mean(jax.nn.one_hot(expert_index_GxS, num_experts, dtype=jnp.float32), axis=1)
  p_GxE = jnp.mean(probs_GxSxE, axis=1)
  return num_experts * jnp.mean(jnp.sum(f_GxE * p_GxE, axis=-1))


def router_z_loss(logits_GxSxE: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxSxE, axis=-1)))


class Router(nnx.Module):
  """Linear router without bias, computed in ``dtype`` (float32: SW selective precision)."""

  def __init__(self, dim: int, num_experts: int, *, init_scale: float, jitter: float,
               dtype=jnp.float32, rngs: nnx.Rngs):
    # Replicated: the router is tiny and every token needs all of it.
    self.kernel = init_param(rngs, (dim, num_experts), ('embed', None), init_scale)
    self.jitter, self.dtype = jitter, dtype

  def __call__(self, x_GxSxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, jax.Array]:
    """Returns (logits_GxSxE, probs_GxSxE), both in the router dtype."""
    x = x_GxSxD.astype(self.dtype)
    if self.jitter > 0.0 and not deterministic:
      if rngs is None:
        raise ValueError('router jitter in training mode needs rngs with a "jitter" stream')
      x = x * jax.random.uniform(rngs.jitter(), x.shape, self.dtype,
                                 1.0 - self.jitter, 1.0 + self.jitter)
    logits_GxSxE = jnp.einsum('gsd,de->gse', x, self.kernel[...].astype(self.dtype))
    return logits_GxSxE, jax.nn.softmax(logits_GxSxE, axis=-1)


def switch_top1(probs_GxSxE: jax.Array, capacity: int) -> Routing:
  """Switch routing: each token goes to its argmax expert, gated by that probability."""
  expert_index_GxSx1 = jnp.argmax(probs_GxSxE, axis=-1)[..., None]
  gate_GxSx1 = jnp.take_along_axis(probs_GxSxE, expert_index_GxSx1, axis=-1)
  position_GxSx1, kept_GxSx1 = assign_slots(expert_index_GxSx1, probs_GxSxE.shape[-1],
                                            capacity)
  return Routing(expert_index_GxSxK=expert_index_GxSx1,
                 gate_GxSxK=jnp.where(kept_GxSx1, gate_GxSx1, 0.0),
                 position_GxSxK=position_GxSx1, kept_GxSxK=kept_GxSx1)
