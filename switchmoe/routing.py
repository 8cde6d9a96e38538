"""Routers: which expert slots each token goes to, and the router's auxiliary losses.

Routing works on groups: tokens are split into G groups of S tokens and capacity is counted
per group (SW §2.2, as in Mesh TensorFlow and flaxformer). Every router returns the same
`Routing` value (K choices per token with their expert, slot and gate), and every dispatch in
`switchmoe.moe` consumes it, so any router works with any dispatch. Nothing here moves token
activations.

Routers (config ``model.moe.router``):
- ``switch``: top-1 tokens-choose (SW), with optional no-token-left-behind re-routing.
- ``topk``: tokens choose k experts (GShard / Mesh TF "MoE"); all first choices take capacity
  before any second choice; optional random second-expert policy.
- ``experts_choose``: each expert takes its top-C tokens (Zhou et al. 2022); K = E.
Tokens-choose routers can use batch-prioritized routing (V-MoE BPR): tokens with a higher top
gate take capacity first, instead of sequence order. They can also balance without an aux loss
(Wang et al. 2024, DeepSeek-V3): a per-expert bias b_E, added to the probabilities only to
choose experts, moves after each training step toward an even load (`balance_bias`).

Padding (``valid_GxS`` False: padding, or segment id 0 in a packed row) routes nowhere, as in
Mesh TensorFlow: every router gives it no slot (an expert never picks it), and the aux losses
average over real tokens only. ``valid_GxS`` None means every token is real.

Shape suffixes: G groups, S tokens per group, D d_model, E experts, K choices per token,
C capacity (slots per expert per group).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from switchmoe.layers import draw_key, init_param

ROUTERS = ('switch', 'topk', 'experts_choose')
EXPLORATION = ('argmax', 'sample_softmax', 'input_dropout', 'input_jitter')
SECOND_POLICIES = ('all', 'random')
# Each source of routing randomness has its own stream; the training loop passes all of them.
RNG_STREAMS = ('jitter', 'router_dropout', 'router_sample', 'second_expert')


@struct.dataclass
class Routing:
  """Each token's K expert choices and where they land.

  expert_index_GxSxK: int32 expert id of each choice.
  gate_GxSxK: float32 combine weight of each choice, zero where not kept.
  position_GxSxK: int32 slot inside the chosen expert's buffer; meaningful only where kept.
  kept_GxSxK: bool, the choice was made and fits under capacity.
  selected_GxSxK: int32 expert the router selected, before capacity; differs from
    expert_index only where no-token-left-behind re-routed an overflowing choice.
  """
  expert_index_GxSxK: jax.Array
  gate_GxSxK: jax.Array
  position_GxSxK: jax.Array
  kept_GxSxK: jax.Array
  selected_GxSxK: jax.Array


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
  """Static routing choices, the ``model.moe`` fields of the same names (defaults and
  meanings: `switchmoe.config`); built by `from_config`."""
  router: str
  num_selected: int             # k, for ``topk``
  renormalize_gates: bool       # ``topk``: gates of the k choices sum to 1
  second_policy: str            # ``topk``: one of SECOND_POLICIES
  second_threshold: float       # ``random``: keep 2nd choice w.p. min(1, g2 / threshold)
  capacity_scales_with_k: bool
  batch_prioritized: bool
  ntlb_rounds: int              # ``switch``: re-routing rounds for overflowing tokens
  exploration: str

  @classmethod
  def from_config(cls, moe, *, causal: bool) -> RoutingOptions:
    """From a validated ``model.moe`` section, for an encoder (``causal`` False) or decoder
    stack. Batch-prioritized routing is for encoders only: in a causal stack it would let
    later tokens take capacity from earlier ones."""
    fields = {f.name: moe[f.name] for f in dataclasses.fields(cls)}
    fields['batch_prioritized'] = moe.batch_prioritized and not causal
    return cls(**fields)


def expert_capacity(group_size: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert per group: max(min_capacity, floor(S * capacity_factor / E))."""
  return max(int(min_capacity), math.floor(group_size * capacity_factor / num_experts))


def assign_slots(expert_index_GxSxK: jax.Array, num_experts: int, capacity: int, *,
                 valid_GxSxK: jax.Array | None = None, priority_GxS: jax.Array | None = None,
                 used_GxE: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Positions in each expert's buffer, first come first served.

  All first choices go before any second choice; within one choice rank, tokens go in
  sequence order, or by descending ``priority_GxS`` (BPR). Choices with ``valid`` False take
  no slot (position 0, not kept); ``used_GxE`` slots per expert are already taken. Returns
  (position, kept), GxSxK.

  A choice's position is its rank among the same expert's choices, found by one sort of the
  group's K*S choices by (expert, order): its cost does not grow with E, unlike a cumulative
  sum over a [G, K*S, E] one-hot (13-17x slower at E = 128-256 on a CPU).
  """
  g, s, k = expert_index_GxSxK.shape
  n = k * s
  if (num_experts + 1) * n >= 2**31:
    raise ValueError(f'model.moe.group_size: {s} tokens x {k} choices x {num_experts + 1} '
                     'experts is too large to rank in int32; use smaller groups')
  valid = jnp.ones((g, s, k), bool) if valid_GxSxK is None else valid_GxSxK
  index = expert_index_GxSxK
  if priority_GxS is not None:
    order_GxS = jnp.argsort(-priority_GxS, axis=1, stable=True)
    index = jnp.take_along_axis(index, order_GxS[..., None], axis=1)
    valid = jnp.take_along_axis(valid, order_GxS[..., None], axis=1)
  # Choice-major order [G, K*S], so every token's first choice precedes any second choice.
  to_choice_major = lambda a: jnp.swapaxes(a, 1, 2).reshape(g, n)
  valid_GxN = to_choice_major(valid)
  # Invalid choices sort last, as expert E. Packing (expert, order) into one int32 key makes
  # a plain sort stable and returns the permutation with it (3-6x faster than sorting a
  # (key, index) pair).
  expert_GxN = jnp.where(valid_GxN, to_choice_major(index), num_experts).astype(jnp.int32)
  order_N = jnp.arange(n, dtype=jnp.int32)
  packed_GxN = jax.lax.sort(expert_GxN * n + order_N, dimension=1)
  sorted_expert_GxN, source_GxN = packed_GxN // n, packed_GxN % n
  first_GxN = jnp.concatenate([jnp.ones((g, 1), bool),
                               sorted_expert_GxN[:, 1:] != sorted_expert_GxN[:, :-1]], axis=1)
  run_start_GxN = jax.lax.cummax(jnp.where(first_GxN, order_N, 0), axis=1)
  rank_GxN = order_N - run_start_GxN
  if used_GxE is not None:
    used_GxE1 = jnp.pad(used_GxE.astype(jnp.int32), ((0, 0), (0, 1)))
    rank_GxN = rank_GxN + jnp.take_along_axis(used_GxE1, sorted_expert_GxN, axis=1)
  # vmap makes the group a batch dimension of the scatter, which GSPMD keeps sharded (an
  # explicit group index would be all-gathered).
  position_GxN = jax.vmap(lambda source_N, rank_N: jnp.zeros((n,), jnp.int32).at[source_N].set(
      rank_N, unique_indices=True))(source_GxN, rank_GxN)
  position = jnp.where(valid, jnp.swapaxes(position_GxN.reshape(g, k, s), 1, 2), 0)
  kept = valid & (position < capacity)
  if priority_GxS is not None:
    inverse_GxS = jnp.argsort(order_GxS, axis=1)
    position = jnp.take_along_axis(position, inverse_GxS[..., None], axis=1)
    kept = jnp.take_along_axis(kept, inverse_GxS[..., None], axis=1)
  return position, kept


def real_tokens(valid_GxS: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """valid_GxS, or all True for a [G, S, ...] ``shape`` when it is None."""
  return jnp.ones(shape[:2], bool) if valid_GxS is None else valid_GxS


def masked_mean(x: jax.Array, valid: jax.Array, axis=None) -> jax.Array:
  """Mean of ``x`` over ``axis`` counting only entries where ``valid`` (bool, broadcast to
  x's shape); 0 where nothing is valid."""
  valid = jnp.broadcast_to(valid, x.shape)
  count = jnp.sum(valid, axis=axis, dtype=x.dtype)
  return jnp.sum(jnp.where(valid, x, 0), axis=axis) / jnp.maximum(count, 1)


def load_balance_loss(probs_GxSxE: jax.Array, expert_index_GxS: jax.Array,
                      valid_GxS: jax.Array | None = None) -> jax.Array:
  """Switch loss N * sum_i f_i * P_i per group, averaged over groups (1.0 when uniform).

  f_i: fraction of the group's real tokens whose top choice is expert i (no gradient flows
  through the argmax); P_i: mean router probability of expert i over them. Groups without a
  real token do not count.
  """
  num_experts = probs_GxSxE.shape[-1]
  valid_GxS = real_tokens(valid_GxS, probs_GxSxE.shape)
  group_mean = lambda a_GxSxE: masked_mean(a_GxSxE, valid_GxS[..., None], axis=1)
  f_GxE = group_mean(jax.nn.one_hot(expert_index_GxS, num_experts, dtype=jnp.float32))
  p_GxE = group_mean(probs_GxSxE)
  return num_experts * masked_mean(jnp.sum(f_GxE * p_GxE, axis=-1), jnp.any(valid_GxS, axis=1))


def importance_loss(probs_GxSxE: jax.Array, valid_GxS: jax.Array | None = None) -> jax.Array:
  """GShard / V-MoE importance loss: squared coefficient of variation of the per-expert
  probability mass of each group's real tokens, averaged over groups that have one (0 when
  perfectly even)."""
  valid_GxS = real_tokens(valid_GxS, probs_GxSxE.shape)
  importance_GxE = jnp.sum(jnp.where(valid_GxS[..., None], probs_GxSxE, 0.0), axis=1)
  mean = jnp.mean(importance_GxE, axis=-1)
  return masked_mean(jnp.var(importance_GxE, axis=-1) / jnp.square(mean + 1e-9),
                     jnp.any(valid_GxS, axis=1))


def router_z_loss(logits_GxSxE: jax.Array, valid_GxS: jax.Array | None = None) -> jax.Array:
  """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2."""
  return masked_mean(jnp.square(jax.nn.logsumexp(logits_GxSxE, axis=-1)),
                     real_tokens(valid_GxS, logits_GxSxE.shape))


def balance_bias(bias_E: jax.Array, selected_E: jax.Array,
                 rate: float | jax.Array) -> jax.Array:
  """One auxiliary-loss-free balancing step (Wang et al. 2024): b_i += rate * sign(mean load
  - load_i), so under-loaded experts become more attractive. ``selected_E``: each expert's load
  (count or fraction of the choices that selected it, before capacity)."""
  return bias_E + rate * jnp.sign(jnp.mean(selected_E) - selected_E).astype(bias_E.dtype)


class ExpertBias(nnx.Variable):
  """The balancing bias b_E: model state that steers expert selection, never a trained
  parameter (no gradient reaches it and the optimizer never sees it)."""


class Router(nnx.Module):
  """Linear router without a logit bias, computed in ``dtype`` (float32: SW selective
  precision).

  In training, ``jitter`` > 0 multiplies the input by Uniform[1 - jitter, 1 + jitter] (SW
  App. C) and ``input_dropout`` > 0 applies dropout to it (SW Table 11); `moe.MoeLayer` sets
  each only in its own exploration mode (``input_jitter``, ``input_dropout``). With
  ``expert_bias`` the router also holds the aux-loss-free balancing bias ``expert_bias``
  (float32 [E], zeros at init), which `route` adds to the probabilities to choose experts.
  """

  def __init__(self, dim: int, num_experts: int, *, init_scale: float, jitter: float,
               input_dropout: float = 0.0, dtype=jnp.float32, expert_bias: bool = False,
               rngs: nnx.Rngs):
    # Replicated: the router is tiny and every token needs all of it.
    self.kernel = init_param(rngs, (dim, num_experts), ('embed', None), init_scale)
    self.expert_bias = (ExpertBias(jnp.zeros((num_experts,), jnp.float32), logical_axes=(None,))
                        if expert_bias else None)
    self.jitter, self.input_dropout, self.dtype = jitter, input_dropout, dtype

  def __call__(self, x_GxSxD: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, jax.Array]:
    """Returns (logits_GxSxE, probs_GxSxE), both in the router dtype."""
    x = x_GxSxD.astype(self.dtype)
    if not deterministic and self.jitter > 0.0:
      x = x * jax.random.uniform(draw_key(rngs, 'jitter', 'router jitter'), x.shape,
                                 self.dtype, 1.0 - self.jitter, 1.0 + self.jitter)
    if not deterministic and self.input_dropout > 0.0:
      key = draw_key(rngs, 'router_dropout', 'router input dropout')
      keep = jax.random.bernoulli(key, 1.0 - self.input_dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.input_dropout), 0.0).astype(self.dtype)
    logits_GxSxE = jnp.einsum('gsd,de->gse', x, self.kernel[...].astype(self.dtype))
    return logits_GxSxE, jax.nn.softmax(logits_GxSxE, axis=-1)


def _routing(expert_index, gate, position, kept, selected=None) -> Routing:
  expert_index = expert_index.astype(jnp.int32)
  return Routing(expert_index_GxSxK=expert_index,
                 gate_GxSxK=jnp.where(kept, gate, 0.0).astype(jnp.float32),
                 position_GxSxK=position.astype(jnp.int32), kept_GxSxK=kept,
                 selected_GxSxK=expert_index if selected is None else selected.astype(jnp.int32))


def _selection_scores(probs_GxSxE: jax.Array, bias_E: jax.Array | None) -> jax.Array:
  """What tokens-choose routers rank experts by: the probabilities, plus the balancing bias
  if any. Gates always come from the probabilities alone."""
  return probs_GxSxE if bias_E is None else probs_GxSxE + bias_E


def switch_top1(probs_GxSxE: jax.Array, capacity: int, *, priority_GxS: jax.Array | None = None,
                ntlb_rounds: int = 0, expert_index_GxS: jax.Array | None = None,
                bias_E: jax.Array | None = None, valid_GxS: jax.Array | None = None) -> Routing:
  """Switch routing: each token goes to its top expert, gated by that probability.

  ``expert_index_GxS`` overrides the argmax (exploration by sampling). With ``ntlb_rounds``
  (no-token-left-behind, SW App. B), tokens over capacity try their next-best expert with
  room, one rank further per round. ``bias_E`` (aux-loss-free balancing) shifts which expert
  is top, not the gate.
  """
  num_experts = probs_GxSxE.shape[-1]
  scores_GxSxE = _selection_scores(probs_GxSxE, bias_E)
  if expert_index_GxS is None:
    expert_index_GxS = jnp.argmax(scores_GxSxE, axis=-1)
  expert = selected = expert_index_GxS[..., None]
  valid_GxSx1 = real_tokens(valid_GxS, probs_GxSxE.shape)[..., None]
  position, kept = assign_slots(expert, num_experts, capacity, valid_GxSxK=valid_GxSx1,
                                priority_GxS=priority_GxS)
  if ntlb_rounds:
    ranked_GxSxE = jnp.argsort(-scores_GxSxE, axis=-1)
    for r in range(1, min(ntlb_rounds, num_experts - 1) + 1):
      used_GxE = jnp.sum(jax.nn.one_hot(expert[..., 0], num_experts, dtype=jnp.int32) *
                         kept, axis=1)
      candidate = ranked_GxSxE[..., r:r + 1]
      new_position, new_kept = assign_slots(candidate, num_experts, capacity,
                                            valid_GxSxK=valid_GxSx1 & ~kept,
                                            priority_GxS=priority_GxS, used_GxE=used_GxE)
      expert = jnp.where(new_kept, candidate, expert)
      position = jnp.where(new_kept, new_position, position)
      kept = kept | new_kept
  gate = jnp.take_along_axis(probs_GxSxE, expert, axis=-1)
  return _routing(expert, gate, position, kept, selected)


def top_k(probs_GxSxE: jax.Array, capacity: int, k: int, *, renormalize: bool,
          second_policy: str = 'all', second_threshold: float = 0.2,
          rng: jax.Array | None = None, priority_GxS: jax.Array | None = None,
          bias_E: jax.Array | None = None, valid_GxS: jax.Array | None = None) -> Routing:
  """Tokens choose their k most probable experts; first choices are served first.

  ``second_policy='random'`` (Mesh TF): the second choice is made only with probability
  min(1, g2 / threshold), g2 its (renormalized) gate; it needs ``rng``. ``bias_E``
  (aux-loss-free balancing) changes which k experts are chosen, not their gates.
  """
  _, expert_GxSxK = jax.lax.top_k(_selection_scores(probs_GxSxE, bias_E), k)
  gate_GxSxK = jnp.take_along_axis(probs_GxSxE, expert_GxSxK, axis=-1)
  if renormalize:
    gate_GxSxK = gate_GxSxK / jnp.sum(gate_GxSxK, axis=-1, keepdims=True)
  valid = jnp.broadcast_to(real_tokens(valid_GxS, probs_GxSxE.shape)[..., None],
                           expert_GxSxK.shape)
  if second_policy == 'random' and k > 1:
    if rng is None:
      raise ValueError('model.moe.second_policy="random" needs the "second_expert" rng stream')
    draw_GxS = jax.random.uniform(rng, gate_GxSxK.shape[:2])
    second_GxS = draw_GxS < gate_GxSxK[..., 1] / second_threshold
    valid = valid.at[..., 1].set(valid[..., 1] & second_GxS)
  position, kept = assign_slots(expert_GxSxK, probs_GxSxE.shape[-1], capacity,
                                valid_GxSxK=valid, priority_GxS=priority_GxS)
  return _routing(expert_GxSxK, gate_GxSxK, position, kept)


def experts_choose(probs_GxSxE: jax.Array, capacity: int,
                   valid_GxS: jax.Array | None = None) -> Routing:
  """Each expert takes the ``capacity`` real tokens with the highest probability for it.

  K = E: choice e of a token is expert e, kept if the expert picked the token. A token may be
  picked by several experts or none.
  """
  g, s, e = probs_GxSxE.shape
  capacity = min(capacity, s)
  valid_GxS = real_tokens(valid_GxS, probs_GxSxE.shape)
  # Padding ranks below every probability: an expert reaches it only once out of real tokens,
  # and does not keep it then.
  scores_GxExS = jnp.where(valid_GxS[:, None, :], jnp.swapaxes(probs_GxSxE, 1, 2), -1.0)
  _, token_GxExC = jax.lax.top_k(scores_GxExS, capacity)
  picked_GxExCxS = jax.nn.one_hot(token_GxExC, s, dtype=jnp.int32)
  kept_GxSxE = (jnp.swapaxes(jnp.sum(picked_GxExCxS, axis=2), 1, 2) > 0) & valid_GxS[..., None]
  rank_C = jnp.arange(capacity, dtype=jnp.int32)
  position_GxSxE = jnp.swapaxes(jnp.einsum('gecs,c->ges', picked_GxExCxS, rank_C), 1, 2)
  expert_GxSxE = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  return _routing(expert_GxSxE, probs_GxSxE, position_GxSxE, kept_GxSxE)


def route(logits_GxSxE: jax.Array, probs_GxSxE: jax.Array, capacity: int,
          options: RoutingOptions, *, deterministic: bool, rngs: nnx.Rngs | None,
          bias_E: jax.Array | None = None, valid_GxS: jax.Array | None = None) -> Routing:
  """Applies the configured router to float32 router outputs.

  ``bias_E``: the aux-loss-free balancing bias of a tokens-choose router. BPR priority stays
  the top gate: for top-1, a per-expert constant could not reorder one expert's queue anyway.
  ``valid_GxS``: bool, False on padding, which routes nowhere (None: all tokens are real).
  """
  o = options
  priority = jnp.max(probs_GxSxE, axis=-1) if o.batch_prioritized else None
  if o.router == 'experts_choose':
    return experts_choose(probs_GxSxE, capacity, valid_GxS)
  if o.router == 'topk':
    rng = None
    if o.second_policy == 'random' and not deterministic:
      rng = draw_key(rngs, 'second_expert', 'model.moe.second_policy="random"')
    return top_k(probs_GxSxE, capacity, o.num_selected, renormalize=o.renormalize_gates,
                 second_policy=o.second_policy if not deterministic else 'all',
                 second_threshold=o.second_threshold, rng=rng, priority_GxS=priority,
                 bias_E=bias_E, valid_GxS=valid_GxS)
  sampled = None
  if o.exploration == 'sample_softmax' and not deterministic:
    key = draw_key(rngs, 'router_sample', 'model.moe.exploration="sample_softmax"')
    sampled = jax.random.categorical(key, logits_GxSxE, axis=-1)
  return switch_top1(probs_GxSxE, capacity, priority_GxS=priority, ntlb_rounds=o.ntlb_rounds,
                     expert_index_GxS=sampled, bias_E=bias_E, valid_GxS=valid_GxS)
