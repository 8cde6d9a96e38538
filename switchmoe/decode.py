"""Autoregressive decoding with a key/value cache: greedy and temperature / top-k / top-p
sampling (`generate`) and beam search (`beam_search`), for encoder-decoder and decoder-only
`LanguageModel`s, batched, compiled once per shape.

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


def _start(model: LanguageModel, encoder_tokens_BxL, prompt_BxP, max_new_tokens: int,
           copies: int = 1):
  """What both decoders start from: (rows B, prompt_BxP, cross_kvs, cross_mask, caches), with
  the encoder side and the caches repeated ``copies`` times per row (beams of a row adjacent).
  Cross-attention keys and values are projected once per decoder layer."""
  if (encoder_tokens_BxL is None) != (model.encoder is None):
    raise ValueError('decoding: encoder_tokens_BxL goes with an encoder-decoder model, and '
                     'only with one')
  rows = (encoder_tokens_BxL if prompt_BxP is None else prompt_BxP).shape[0]
  prompt_BxP = jnp.zeros((rows, 0), jnp.int32) if prompt_BxP is None else prompt_BxP
  tile = lambda a: jnp.repeat(a, copies, axis=0)
  cross_kvs = cross_mask = None
  if model.encoder is not None:
    encoded = tile(model.encode(encoder_tokens_BxL))
    cross_kvs = [layer.cross_attn.project_kv(encoded) for layer in model.decoder.layers]
    cross_mask = tile(encoder_tokens_BxL > 0)[:, None, None, :]
  attn = model.decoder.layers[0].self_attn
  shape = (rows * copies, prompt_BxP.shape[1] + max_new_tokens, attn.query.shape[1],
           attn.query.shape[2])
  caches = [(jnp.zeros(shape, model.dtype),) * 2 for _ in model.decoder.layers]
  return rows, prompt_BxP, cross_kvs, cross_mask, caches


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
  if temperature > 0.0 and key is None:
    raise ValueError('generate: temperature > 0 samples, and needs a key')
  rows, prompt_BxP, cross_kvs, cross_mask, caches = _start(model, encoder_tokens_BxL,
                                                           prompt_BxP, max_new_tokens)
  p, n = prompt_BxP.shape[1], max_new_tokens
  total = p + n
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


def _length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha; 1 at alpha 0."""
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'beams', 'length_alpha',
                                             'eos_id'))
def beam_search(model: LanguageModel, *, encoder_tokens_BxL: jax.Array | None = None,
                prompt_BxP: jax.Array | None = None, max_new_tokens: int, beams: int,
                length_alpha: float = 0.0, eos_id: int = EOS_ID
                ) -> tuple[jax.Array, jax.Array]:
  """(tokens_BxN of each row's best beam, its score_B) by beam search over ``beams``
  hypotheses per row, with the same cache and inputs as `generate`.

  A hypothesis scores the sum of its tokens' log-probabilities; one that has emitted
  ``eos_id`` is finished: it keeps its score and emits 0 after. The best final hypothesis
  maximises score / ((5 + length) / 6) ** length_alpha (GNMT), length counting tokens up to
  and including EOS. With one beam this is greedy decoding.
  """
  k, n = beams, max_new_tokens
  rows, prompt_BxP, cross_kvs, cross_mask, caches = _start(model, encoder_tokens_BxL,
                                                           prompt_BxP, n, copies=k)
  p = prompt_BxP.shape[1]
  vocab = model.embed.embedding.shape[0]
  prompt = jnp.repeat(prompt_BxP, k, axis=0)

  def step(t, carry):
    token_R, caches, score_BxK, done_BxK, length_BxK, tokens_BxKxN = carry   # R = B*K
    x_Rx1xD, caches = model.decoder.decode(model.embed(token_R[:, None]), caches, t,
                                           cross_kvs=cross_kvs, cross_mask=cross_mask)
    logp_BxKxV = jax.nn.log_softmax(model.logits(x_Rx1xD)[:, 0]).reshape(rows, k, vocab)
    # A finished hypothesis extends only by 0, at no cost.
    finished_V = jnp.full((vocab,), -jnp.inf).at[0].set(0.0)
    logp_BxKxV = jnp.where(done_BxK[..., None], finished_V, logp_BxKxV)
    total_BxKV = (score_BxK[..., None] + logp_BxKxV).reshape(rows, k * vocab)
    best_BxK, flat_BxK = jax.lax.top_k(total_BxKV, k)
    parent_BxK, chosen_BxK = flat_BxK // vocab, (flat_BxK % vocab).astype(jnp.int32)
    generating = t >= p
    keep = lambda new, old: jnp.where(generating, new, old)
    parent_BxK = keep(parent_BxK, jnp.broadcast_to(jnp.arange(k), (rows, k)))
    gather = lambda a_BxK: jnp.take_along_axis(a_BxK, parent_BxK, axis=1)
    index_R = (jnp.arange(rows)[:, None] * k + parent_BxK).reshape(-1)
    caches = [(kc[index_R], vc[index_R]) for kc, vc in caches]
    was_done = gather(done_BxK)
    tokens_BxKxN = jnp.take_along_axis(tokens_BxKxN, parent_BxK[..., None], axis=1)
    index = jnp.maximum(t - p, 0)
    tokens_BxKxN = keep(tokens_BxKxN.at[:, :, index].set(chosen_BxK), tokens_BxKxN)
    score_BxK = keep(best_BxK, score_BxK)
    length_BxK = keep(gather(length_BxK) + (~was_done).astype(jnp.int32), length_BxK)
    done_BxK = keep(was_done | (chosen_BxK == eos_id), done_BxK)
    next_R = jnp.where(t < p, prompt[:, jnp.minimum(t, max(p - 1, 0))] if p else 0,
                       chosen_BxK.reshape(-1))
    return next_R, caches, score_BxK, done_BxK, length_BxK, tokens_BxKxN

  # Only the first beam of a row is live at first: the others would repeat it.
  score_BxK = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (rows, 1))
  carry = (jnp.zeros((rows * k,), jnp.int32), caches, score_BxK, jnp.zeros((rows, k), bool),
           jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k, n), jnp.int32))
  _, _, score_BxK, _, length_BxK, tokens_BxKxN = jax.lax.fori_loop(0, p + n, step, carry)
  final_BxK = score_BxK / _length_penalty(length_BxK.astype(jnp.float32), length_alpha)
  best_B = jnp.argmax(final_BxK, axis=1)
  tokens_BxN = jnp.take_along_axis(tokens_BxKxN, best_B[:, None, None], axis=1)[:, 0]
  return tokens_BxN, jnp.take_along_axis(score_BxK, best_B[:, None], axis=1)[:, 0]
