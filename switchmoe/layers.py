"""Transformer building blocks (T5 style): RMSNorm, embeddings, attention with relative
position buckets, and the feed-forward block shared by dense layers and experts.

Shape suffixes: B batch, L (query) length, K key length, D d_model, H heads, Dk head dim,
F d_ff, E experts, T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from switchmoe.sharding import constrain

NEG_INF = -1e9  # finite, so fully masked rows (padding queries) give zeros rather than NaN


def init_param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None],
               scale: float, in_axis=-2, out_axis=-1, batch_axis=()) -> nnx.Param:
  """Float32 weight ~ truncated normal with std sqrt(scale / fan_in), cut at 2 std (SW §2.3).

  ``scale`` is the paper's s (0.1 in Switch, 1.0 in a standard Transformer).
  """
  init = jax.nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal',
                                              in_axis=in_axis, out_axis=out_axis,
                                              batch_axis=batch_axis)
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32),
                   logical_axes=tuple(logical_axes))


def draw_key(rngs: nnx.Rngs | None, stream: str, why: str) -> jax.Array:
  """A key from ``rngs.<stream>``, or a one-line error naming the missing stream."""
  try:
    return getattr(rngs, stream)()
  except AttributeError:
    raise ValueError(f'{why} in training mode needs rngs with the "{stream}" stream') from None


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None, deterministic: bool) -> jax.Array:
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(draw_key(rngs, 'dropout', 'dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

  def __init__(self, dim: int, *, dtype, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=('embed',))
    self.dtype, self.eps = dtype, eps

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding; with ``attend`` it doubles as the tied output projection."""

  def __init__(self, vocab_size: int, dim: int, *, init_scale: float, dtype, rngs: nnx.Rngs):
    # T5 draws embeddings with std 1 (fan_in taken as 1); the Switch scale s applies here too.
    self.embedding = init_param(rngs, (vocab_size, dim), ('vocab', 'embed'), init_scale,
                                in_axis=(), out_axis=-1, batch_axis=(0,))
    self.dtype = dtype

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.embedding[...].astype(self.dtype), tokens_BxL, axis=0)
    return constrain(x_BxLxD, ('batch', 'length', 'embed'))

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    return jnp.einsum('bld,vd->blv', x_BxLxD, self.embedding[...].astype(self.dtype))


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5 buckets: exact for small distances, logarithmic up to ``max_distance``.

  relative_position = key_position - query_position. Bidirectional buckets spend half the
  buckets on each sign; causal ones only see the past (positive distances are clipped to 0).
  """
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(n < 0, num_buckets, 0)
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / jnp.log(
      max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
  """Learned per-head bias over position buckets, shared by all layers of one stack."""

  def __init__(self, num_buckets: int, max_distance: int, num_heads: int, *,
               bidirectional: bool, init_scale: float, rngs: nnx.Rngs):
    self.rel_embedding = init_param(rngs, (num_buckets, num_heads), (None, 'heads'),
                                    init_scale, in_axis=(), out_axis=-1, batch_axis=(0,))
    self.num_buckets, self.max_distance = num_buckets, max_distance
    self.bidirectional = bidirectional

  def __call__(self, query_len: int, key_len: int, query_start: int | jax.Array = 0
               ) -> jax.Array:
    """Returns bias_1xHxLxK (float32) of queries at positions query_start, query_start + 1,
    ... (a decoding step: one query at its position) against keys 0 .. key_len - 1."""
    relative = (jnp.arange(key_len)[None, :] -
                (query_start + jnp.arange(query_len))[:, None])
    buckets_LxK = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
    bias_LxKxH = jnp.take(self.rel_embedding[...], buckets_LxK, axis=0)
    return jnp.transpose(bias_LxKxH, (2, 0, 1))[None]


class Attention(nnx.Module):
  """Multi-head dot-product attention; logits and softmax in float32."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, init_scale: float,
               dropout_rate: float, dtype, rngs: nnx.Rngs):
    proj = lambda: init_param(rngs, (dim, num_heads, head_dim), ('embed', 'heads', 'kv'),
                              init_scale, in_axis=0, out_axis=(1, 2))
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = init_param(rngs, (num_heads, head_dim, dim), ('heads', 'kv', 'embed'),
                          init_scale, in_axis=(0, 1), out_axis=2)
    self.dropout_rate, self.dtype = dropout_rate, dtype

  def project_kv(self, kv_BxKxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(k_BxKxHxDk, v_BxKxHxDk) of the keys' inputs: what a decoding cache holds."""
    cast = lambda p: p[...].astype(self.dtype)
    return (jnp.einsum('bld,dhk->blhk', kv_BxKxD, cast(self.key)),
            jnp.einsum('bld,dhk->blhk', kv_BxKxD, cast(self.value)))

  def attend(self, x_BxLxD: jax.Array, k_BxKxHxDk: jax.Array, v_BxKxHxDk: jax.Array,
             mask_Bx1xLxK: jax.Array, bias_1xHxLxK: jax.Array | None, *, deterministic: bool,
             rngs: nnx.Rngs | None) -> jax.Array:
    """Queries from x_BxLxD against projected keys and values."""
    cast = lambda p: p[...].astype(self.dtype)
    q_BxLxHxDk = jnp.einsum('bld,dhk->blhk', x_BxLxD, cast(self.query))
    q_BxLxHxDk = constrain(q_BxLxHxDk, ('batch', 'length', 'heads', 'kv'))
    logits_BxHxLxK = jnp.einsum('blhk,bmhk->bhlm', q_BxLxHxDk, k_BxKxHxDk,
                                preferred_element_type=jnp.float32)
    logits_BxHxLxK = logits_BxHxLxK / jnp.sqrt(q_BxLxHxDk.shape[-1]).astype(jnp.float32)
    if bias_1xHxLxK is not None:
      logits_BxHxLxK = logits_BxHxLxK + bias_1xHxLxK
    logits_BxHxLxK = jnp.where(mask_Bx1xLxK, logits_BxHxLxK, NEG_INF)
    probs_BxHxLxK = jax.nn.softmax(logits_BxHxLxK, axis=-1).astype(self.dtype)
    probs_BxHxLxK = dropout(probs_BxHxLxK, self.dropout_rate, rngs, deterministic)
    out_BxLxHxDk = jnp.einsum('bhlm,bmhk->blhk', probs_BxHxLxK, v_BxKxHxDk)
    out_BxLxD = jnp.einsum('blhk,hkd->bld', out_BxLxHxDk, cast(self.out))
    return constrain(out_BxLxD, ('batch', 'length', 'embed'))

  def __call__(self, x_BxLxD: jax.Array, kv_BxKxD: jax.Array, mask_Bx1xLxK: jax.Array,
               bias_1xHxLxK: jax.Array | None, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    return self.attend(x_BxLxD, *self.project_kv(kv_BxKxD), mask_Bx1xLxK, bias_1xHxLxK,
                       deterministic=deterministic, rngs=rngs)


ACTIVATIONS = ('relu', 'geglu')


def _ffn_weights(rngs: nnx.Rngs, dim: int, hidden: int, activation: str, init_scale: float,
                 lead: tuple[int, ...] = (), lead_axes: tuple[str, ...] = ()):
  """wi, wi_gate (GEGLU only, else None), wo; ``lead`` dimensions are batch dimensions of the
  init (one fan-in per expert)."""
  batch = tuple(range(len(lead)))
  make_in = lambda: init_param(rngs, (*lead, dim, hidden), (*lead_axes, 'embed', 'mlp'),
                               init_scale, batch_axis=batch)
  wi = make_in()
  wi_gate = make_in() if activation == 'geglu' else None
  wo = init_param(rngs, (*lead, hidden, dim), (*lead_axes, 'mlp', 'embed'), init_scale,
                  batch_axis=batch)
  return wi, wi_gate, wo


def _ffn(module, x: jax.Array, matmul, hidden_axes, *, deterministic: bool,
         rngs: nnx.Rngs | None) -> jax.Array:
  """wo(dropout(act(wi x))) of a FeedForward or Experts ``module``, with its ``matmul``."""
  cast = lambda p: p[...].astype(module.dtype)
  h = matmul(x, cast(module.wi))
  if module.wi_gate is not None:
    h = jax.nn.gelu(matmul(x, cast(module.wi_gate)), approximate=True) * h
  else:
    h = jax.nn.relu(h)
  h = constrain(h, hidden_axes)
  h = dropout(h, module.dropout_rate, rngs, deterministic)
  return matmul(h, cast(module.wo))


class FeedForward(nnx.Module):
  """Dense ReLU or GEGLU feed-forward block: x_BxLxD -> y_BxLxD, weights [D, F], [F, D]."""

  def __init__(self, dim: int, hidden: int, *, activation: str, init_scale: float,
               dropout_rate: float, dtype, rngs: nnx.Rngs):
    self.wi, self.wi_gate, self.wo = _ffn_weights(rngs, dim, hidden, activation, init_scale)
    self.dropout_rate, self.dtype = dropout_rate, dtype

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    return _ffn(self, x_BxLxD, lambda a, w: jnp.einsum('bld,df->blf', a, w),
                ('batch', 'length', 'mlp'), deterministic=deterministic, rngs=rngs)


class Experts(nnx.Module):
  """E feed-forward experts with batched weights [E, D, F], [E, F, D]; the leading expert
  dimension is the logical ``expert`` axis, so it can be sharded over the mesh.

  Two layouts of the input: an expert buffer x_Ex...xD (expert e runs on x[e]), or, with
  ``group_sizes_E``, rows x_NxD sorted by expert (the first group_sizes_E[0] rows are expert
  0's, ...), run as grouped matmuls (`jax.lax.ragged_dot`).
  """

  def __init__(self, num_experts: int, dim: int, hidden: int, *, activation: str,
               init_scale: float, dropout_rate: float, dtype, rngs: nnx.Rngs):
    self.wi, self.wi_gate, self.wo = _ffn_weights(rngs, dim, hidden, activation, init_scale,
                                                  (num_experts,), ('expert',))
    self.dropout_rate, self.dtype = dropout_rate, dtype

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None,
               group_sizes_E: jax.Array | None = None) -> jax.Array:
    if group_sizes_E is not None:
      return _ffn(self, x, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes_E), (None, 'mlp'),
                  deterministic=deterministic, rngs=rngs)
    x_ExTxD = x.reshape(x.shape[0], -1, x.shape[-1])
    y_ExTxD = _ffn(self, x_ExTxD, lambda a, w: jnp.einsum('etd,edf->etf', a, w),
                   ('expert', 'batch', 'mlp'), deterministic=deterministic, rngs=rngs)
    return y_ExTxD.reshape(x.shape)
