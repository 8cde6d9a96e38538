"""Autoregressive decoding with a key/value cache: greedy and temperature / top-k / top-p
sampling, for encoder-decoder and decoder-only `LanguageModel`s, batched, compiled once per
shape.

Each step feeds one token per row through the decoder (`model.Stack.decode`): its keys and
values are written into a per-layer cache [B, T, H, Dk] at its position, the relative
position bias is computed for that one query row, and cross-attention reads keys and values
projected once from the encoder output. Switch layers route each decoding token as its own
group with at least one slot per expert (`moe.MoeLayer` ``decoding``), so decoding never
drops a token; wherever the full forward pass drops nothing either, the cached logits equal
its logits position by position (tests/test_decode.py).

Shape suffixes: B batch, L encoder length, P prompt length, N new tokens, T = P + N decoder
positions, V vocab, D d_model, H heads, Dk head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from switchmoe.model import LanguageModel

EOS_ID = 1   # T5's </s>; the byte and SentencePiece tokenizers here use it too


def choose(logits_BxV: jax.Array, key: jax.Array | None, *, temperature: float, top_k: int,
           top_p: float) -> jax.Array:
  """Next tokens, int32 [B]: the argmax at temperature 0, else a sample from the softmax of
  logits / temperature restricted to the top_k most likely tokens (0: all) and to the smallest
  set whose probability reaches top_p (1.0: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep a token while the mass before it is below top_p: the most likely always stays.
    keep_BxV = (cumulative_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'eos_id'))
def generate(model: LanguageModel, *, encoder_tokens_BxL: jax.Array | None = None,
             prompt_BxP: jax.Array | None = None, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             key: jax.Array | None = None, eos_id: int = EOS_ID
             ) -> tuple[jax.Array, jax.Array]:
  """(tokens_BxN int32, logits_BxNxV float32) of ``max_new_tokens`` decoding steps.

  Encoder-decoder: ``encoder_tokens_BxL`` (0 = padding) is encoded once and the decoder
  starts from token 0. Decoder-only: the decoder reads token 0, then ``prompt_BxP`` (every
  row as long; optional), then generates. A row that emits ``eos_id`` emits 0 after it. ``key``
  is needed when ``temperature`` > 0. The logits are those each new token was chosen from.
  """
  if (encoder_tokens_BxL is None) != (model.encoder is None):
    raise ValueError('generate: encoder_tokens_BxL goes with an encoder-decoder model, and '
                     'only with one')
  if temperature > 0.0 and key is None:
    raise ValueError('generate: temperature > 0 samples, and needs a key')
  rows = (encoder_tokens_BxL if prompt_BxP is None else prompt_BxP).shape[0]
  prompt_BxP = jnp.zeros((rows, 0), jnp.int32) if prompt_BxP is None else prompt_BxP
  p, n = prompt_BxP.shape[1], max_new_tokens
  total = p + n
  cross_kvs = cross_mask = None
  if model.encoder is not None:
    encoded_BxLxD = model.encode(encoder_tokens_BxL)
    cross_kvs = [layer.cross_attn.project_kv(encoded_BxLxD) for layer in model.decoder.layers]
    cross_mask = (encoder_tokens_BxL > 0)[:, None, None, :]
  attn = model.decoder.layers[0].self_attn
  heads, head_dim = attn.query.shape[1], attn.query.shape[2]
  caches = [(jnp.zeros((rows, total, heads, head_dim), model.dtype),) * 2
            for _ in model.decoder.layers]
  key = jax.random.key(0) if key is None else key

  def step(t, carry):
    token_B, caches, done_B, tokens_BxN, logits_BxNxV = carry
    x_Bx1xD, caches = model.decoder.decode(model.embed(token_B[:, None]), caches, t,
                                           cross_kvs=cross_kvs, cross_mask=cross_mask)
    logits_BxV = model.logits(x_Bx1xD)[:, 0]
    chosen_B = choose(logits_BxV, jax.random.fold_in(key, t), temperature=temperature,
                      top_k=top_k, top_p=top_p)
    new = t - p  # >= 0 once the whole prompt has been read
    chosen_B = jnp.where(done_B, 0, chosen_B)
    generating = new >= 0
    index = jnp.maximum(new, 0)
    tokens_BxN = jnp.where(generating, tokens_BxN.at[:, index].set(chosen_B), tokens_BxN)
    logits_BxNxV = jnp.where(generating, logits_BxNxV.at[:, index].set(logits_BxV),
                             logits_BxNxV)
    done_B = done_B | (generating & (chosen_B == eos_id))
    prompt_next_B = prompt_BxP[:, jnp.minimum(t, max(p - 1, 0))] if p else chosen_B
    next_B = jnp.where(t < p, prompt_next_B, chosen_B)
    return next_B, caches, done_B, tokens_BxN, logits_BxNxV

  vocab = model.embed.embedding.shape[0]
  carry = (jnp.zeros((rows,), jnp.int32), caches, jnp.zeros((rows,), bool),
           jnp.zeros((rows, n), jnp.int32), jnp.zeros((rows, n, vocab), jnp.float32))
  _, _, _, tokens_BxN, logits_BxNxV = jax.lax.fori_loop(0, total, step, carry)
  return tokens_BxN, logits_BxNxV
