"""T5-style encoder-decoder and decoder-only language models with Switch FFN layers.

Both architectures share one `Block` (pre-norm self-attention, optional cross-attention,
dense or Switch FFN) and one `Stack`. Models return ``(logits, aux)`` where ``aux`` maps each
Switch layer's name (``encoder/layer_1``, ...) to its `switchmoe.moe.MoeStats`; a dense model
returns an empty ``aux``. The model config is read here; ``model.moe`` becomes one
`switchmoe.moe.MoeConfig` per stack.

Shape suffixes: B batch, L length, Li encoder length, Lt decoder length, D d_model, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from switchmoe.layers import (Attention, Embed, FeedForward, RelativePositionBias, RMSNorm,
                              dropout, init_param)
from switchmoe.moe import AUX_LOSSES, MoeConfig, MoeLayer, MoeStats
from switchmoe.sharding import constrain

ARCHS = ('encoder_decoder', 'decoder')

Batch = dict[str, jax.Array]


def is_moe_layer(index: int, every: int) -> bool:
  """Layer ``index`` (0-based) is a Switch layer when every > 0 and it is the every-th one."""
  return every > 0 and index % every == every - 1


class Block(nnx.Module):
  """One pre-norm Transformer layer; residual branches add into x_BxLxD.

  valid_BxL (bool, False on padding) reaches the Switch FFN, where padding takes no capacity.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, cross_attention: bool,
               moe: MoeConfig | None, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    attn = lambda: Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, init_scale=cfg.init_scale,
                             dropout_rate=cfg.dropout_rate, dtype=dtype, rngs=rngs)
    norm = lambda: RMSNorm(cfg.d_model, dtype=dtype)
    self.self_attn_norm, self.self_attn = norm(), attn()
    self.cross_attn_norm = norm() if cross_attention else None
    self.cross_attn = attn() if cross_attention else None
    self.ffn_norm = norm()
    if moe is not None:
      self.ffn = MoeLayer(cfg.d_model, cfg.d_ff, moe, activation=cfg.ffn_activation,
                          init_scale=cfg.init_scale, dtype=dtype, rngs=rngs)
    else:
      self.ffn = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.ffn_activation,
                             init_scale=cfg.init_scale, dropout_rate=cfg.dropout_rate,
                             dtype=dtype, rngs=rngs)
    self.is_moe, self.dropout_rate = moe is not None, cfg.dropout_rate

  def __call__(self, x_BxLxD, *, valid_BxL, self_mask, self_bias, encoded=None,
               cross_mask=None, deterministic: bool, rngs: nnx.Rngs | None):
    drop = lambda y: dropout(y, self.dropout_rate, rngs, deterministic)
    h = self.self_attn_norm(x_BxLxD)
    x_BxLxD = x_BxLxD + drop(self.self_attn(h, h, self_mask, self_bias,
                                            deterministic=deterministic, rngs=rngs))
    if self.cross_attn is not None:
      h = self.cross_attn_norm(x_BxLxD)
      x_BxLxD = x_BxLxD + drop(self.cross_attn(h, encoded, cross_mask, None,
                                               deterministic=deterministic, rngs=rngs))
    h = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      y, stats = self.ffn(h, deterministic=deterministic, rngs=rngs, valid_BxL=valid_BxL)
    else:
      y, stats = self.ffn(h, deterministic=deterministic, rngs=rngs), None
    x_BxLxD = constrain(x_BxLxD + drop(y), ('batch', 'length', 'embed'))
    return x_BxLxD, stats


  def decode(self, x_Bx1xD, cache_kv, position, *, self_bias, cross_kv=None,
             cross_mask=None):
    """One decoding step of a causal block at ``position`` (int, traced): x_Bx1xD is that
    position's input, ``cache_kv`` its (k_BxTxHxDk, v_BxTxHxDk) self-attention cache, whose
    entry at ``position`` this step writes. ``cross_kv``: the projected encoder output.
    Returns (x_Bx1xD, the updated cache). Deterministic."""
    h = self.self_attn_norm(x_Bx1xD)
    k_new, v_new = self.self_attn.project_kv(h)
    k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), position, axis=1)
            for c, new in zip(cache_kv, (k_new, v_new)))
    mask_1x1x1xT = (jnp.arange(k.shape[1]) <= position)[None, None, None, :]
    x_Bx1xD = x_Bx1xD + self.self_attn.attend(h, k, v, mask_1x1x1xT, self_bias,
                                              deterministic=True, rngs=None)
    if self.cross_attn is not None:
      h = self.cross_attn_norm(x_Bx1xD)
      x_Bx1xD = x_Bx1xD + self.cross_attn.attend(h, *cross_kv, cross_mask, None,
                                                 deterministic=True, rngs=None)
    h = self.ffn_norm(x_Bx1xD)
    if self.is_moe:
      y = self.ffn(h, deterministic=True, rngs=None, decoding=True)[0]
    else:
      y = self.ffn(h, deterministic=True, rngs=None)
    return x_Bx1xD + y, (k, v)


class Stack(nnx.Module):
  """Encoder (bidirectional) or decoder (causal, optionally cross-attending) layer stack."""

  def __init__(self, cfg: ml_collections.ConfigDict, num_layers: int, *, causal: bool,
               cross_attention: bool, expert_parallel: str, rngs: nnx.Rngs):
    self.rel_bias = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        bidirectional=not causal, init_scale=cfg.init_scale, rngs=rngs)
    moe = (MoeConfig.from_config(cfg.moe, causal=causal, expert_parallel=expert_parallel)
           if cfg.moe.every > 0 else None)
    self.layers = nnx.List([
        Block(cfg, cross_attention=cross_attention,
              moe=moe if is_moe_layer(i, cfg.moe.every) else None,
              rngs=rngs) for i in range(num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, dtype=jnp.dtype(cfg.dtype))
    self.dropout_rate = cfg.dropout_rate
    self.remat, self.remat_blocks = cfg.remat, cfg.remat_blocks

  def __call__(self, x_BxLxD, *, valid_BxL, self_mask, encoded=None, cross_mask=None,
               name: str, deterministic: bool, rngs: nnx.Rngs | None):
    length = x_BxLxD.shape[1]
    # Indices, not the batch's *_positions: within a packed segment (contiguous positions)
    # key_index - query_index == key_position - query_position, and self_mask hides keys of
    # other segments, so this bias_1xHxLxK is exact without a per-example [B, H, L, K] one
    # (B times the memory).
    bias = self.rel_bias(length, length)
    aux = {}
    x_BxLxD = dropout(x_BxLxD, self.dropout_rate, rngs, deterministic)
    for i, layer in enumerate(self.layers):
      call = _call_block
      if not deterministic and self.remat != 'none' and self.remat_blocks in (
          'all', 'moe' if layer.is_moe else 'dense'):
        call = nnx.remat(_call_block, policy=REMAT_POLICIES[self.remat], static_argnums=(7,))
      x_BxLxD, stats = call(layer, x_BxLxD, valid_BxL, self_mask, bias, encoded, cross_mask,
                            deterministic, rngs)
      if stats is not None:
        aux[_aux_name(name, i)] = stats
    x_BxLxD = self.final_norm(x_BxLxD)
    return dropout(x_BxLxD, self.dropout_rate, rngs, deterministic), aux

  def switch_layers(self, name: str) -> list[tuple[str, MoeLayer]]:
    """(aux name, layer) of each Switch layer, named as in the ``aux`` that a call returns."""
    return [(_aux_name(name, i), layer.ffn) for i, layer in enumerate(self.layers)
            if layer.is_moe]


  def decode(self, x_Bx1xD, caches, position, *, cross_kvs=None, cross_mask=None):
    """One decoding step of a causal stack (see `Block.decode`); ``caches`` and
    ``cross_kvs`` hold one entry per layer. Returns (x_Bx1xD after the final norm, caches)."""
    bias_1xHx1xT = self.rel_bias(1, caches[0][0].shape[1], position)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x_Bx1xD, cache = layer.decode(x_Bx1xD, caches[i], position, self_bias=bias_1xHx1xT,
                                    cross_kv=None if cross_kvs is None else cross_kvs[i],
                                    cross_mask=cross_mask)
      new_caches.append(cache)
    return self.final_norm(x_Bx1xD), new_caches


# Config model.remat: what a block's backward pass may keep from its forward pass (the rest
# is recomputed). ``save_dots``: outputs of matmuls without batch dimensions (projections,
# dense FFNs); ``save_all_dots`` also keeps batched ones (attention scores, expert einsums).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_all_dots': jax.checkpoint_policies.dots_saveable,
}
REMAT_BLOCKS = ('all', 'moe', 'dense')


def _call_block(layer, x_BxLxD, valid_BxL, self_mask, bias, encoded, cross_mask,
                deterministic, rngs):
  """One block's call in positional form, for `nnx.remat`."""
  return layer(x_BxLxD, valid_BxL=valid_BxL, self_mask=self_mask, self_bias=bias,
               encoded=encoded, cross_mask=cross_mask, deterministic=deterministic, rngs=rngs)


def _aux_name(stack: str, index: int) -> str:
  return f'{stack}/layer_{index}'


def attention_mask(query_segments_BxL, key_segments_BxK, *, causal: bool = False,
                   prefix_BxL=None) -> jax.Array:
  """mask_Bx1xLxK: True where a query may attend to a key.

  query_segments_BxL, key_segments_BxK: int segment ids (1, 2, ... per packed example,
  0 = padding); a query attends only to keys of its own segment. An unpacked row is one
  segment: 1 on its real tokens.
  causal: self-attention (L = K) where a query sees no later key, except that positions with
  prefix_BxL > 0 (int, a prefix LM's ``decoder_causal_attention``) see each other within
  their segment.
  """
  q_BxLx1, k_Bx1xK = query_segments_BxL[:, :, None], key_segments_BxK[:, None, :]
  mask_BxLxK = (q_BxLx1 == k_Bx1xK) & (q_BxLx1 > 0)
  if causal:
    length = query_segments_BxL.shape[1]
    visible = jnp.tril(jnp.ones((length, length), bool))[None]
    if prefix_BxL is not None:
      in_prefix_BxL = prefix_BxL > 0
      visible = visible | (in_prefix_BxL[:, :, None] & in_prefix_BxL[:, None, :])
    mask_BxLxK = mask_BxLxK & visible
  return mask_BxLxK[:, None]


def segment_ids(batch: Batch, stack: str, tokens_BxL: jax.Array) -> jax.Array:
  """segments_BxL: the batch's ``<stack>_segment_ids``, or one segment on tokens > 0."""
  segments_BxL = batch.get(f'{stack}_segment_ids')
  return (tokens_BxL > 0).astype(jnp.int32) if segments_BxL is None else segments_BxL


class LanguageModel(nnx.Module):
  """Encoder-decoder (``arch='encoder_decoder'``) or decoder-only (``'decoder'``) model.

  Batch keys: ``decoder_input_tokens`` and ``decoder_target_tokens`` int32 [B, Lt] (targets
  > 0 mark real tokens; the decoder input starts with 0), and for the encoder-decoder
  ``encoder_input_tokens`` int32 [B, Li] (0 = padding).

  Optional keys for packed rows (t5x names), each absent key keeping the unpacked behaviour:
  ``decoder_segment_ids`` int32 [B, Lt] and ``encoder_segment_ids`` int32 [B, Li]: 1, 2, ...
  per packed example, 0 = padding; they replace tokens > 0 as validity, attention stays within
  a segment, and cross-attention too when both are given. ``decoder_positions`` int32
  [B, Lt] and ``encoder_positions`` int32 [B, Li]: 0, 1, ... restarting in each segment;
  accepted but unused, since relative position buckets from indices equal those from
  contiguous positions inside a segment (see `Stack`). ``decoder_causal_attention`` int32
  [B, Lt] (decoder-only prefix LM): 1 on the positions whose decoder input is the start token
  or a prefix token; these attend to each other bidirectionally, all else is causal.

  ``expert_parallel`` is config ``mesh.expert_parallel`` (see `switchmoe.moe`); it only
  matters on a mesh with an ``expert`` axis, and the default suits every other use.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               expert_parallel: str = 'gspmd'):
    dtype = jnp.dtype(cfg.dtype)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, init_scale=cfg.init_scale, dtype=dtype,
                       rngs=rngs)
    self.encoder = (Stack(cfg, cfg.num_layers, causal=False, cross_attention=False,
                          expert_parallel=expert_parallel, rngs=rngs)
                    if cfg.arch == 'encoder_decoder' else None)
    num_decoder = cfg.num_decoder_layers if cfg.num_decoder_layers > 0 else cfg.num_layers
    self.decoder = Stack(cfg, num_decoder, causal=True,
                         cross_attention=cfg.arch == 'encoder_decoder',
                         expert_parallel=expert_parallel, rngs=rngs)
    self.logits_kernel = (None if cfg.tie_embeddings else init_param(
        rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.init_scale))
    self.dtype, self.d_model = dtype, cfg.d_model

  def __call__(self, batch: Batch, *, deterministic: bool, rngs: nnx.Rngs | None = None
               ) -> tuple[jax.Array, dict]:
    """Returns (logits_BxLtxV in float32, aux)."""
    decoder_segments_BxLt = segment_ids(batch, 'decoder', batch['decoder_target_tokens'])
    aux, encoded, cross_mask = {}, None, None
    if self.encoder is not None:
      inputs_BxLi = batch['encoder_input_tokens']
      encoder_segments_BxLi = segment_ids(batch, 'encoder', inputs_BxLi)
      encoded, aux = self.encoder(
          self.embed(inputs_BxLi), valid_BxL=encoder_segments_BxLi > 0,
          self_mask=attention_mask(encoder_segments_BxLi, encoder_segments_BxLi),
          name='encoder', deterministic=deterministic, rngs=rngs)
      if 'encoder_segment_ids' in batch and 'decoder_segment_ids' in batch:
        cross_mask = attention_mask(decoder_segments_BxLt, encoder_segments_BxLi)
      else:  # segment numbers of one side mean nothing to the other: validity only
        one_segment = lambda segments: (segments > 0).astype(jnp.int32)
        cross_mask = attention_mask(one_segment(decoder_segments_BxLt),
                                    one_segment(encoder_segments_BxLi))
    x_BxLtxD, decoder_aux = self.decoder(
        self.embed(batch['decoder_input_tokens']), valid_BxL=decoder_segments_BxLt > 0,
        self_mask=attention_mask(decoder_segments_BxLt, decoder_segments_BxLt, causal=True,
                                 prefix_BxL=batch.get('decoder_causal_attention')),
        encoded=encoded, cross_mask=cross_mask, name='decoder', deterministic=deterministic,
        rngs=rngs)
    return self.logits(x_BxLtxD), {**aux, **decoder_aux}

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """logits_BxLxV (float32) of the decoder's output."""
    if self.logits_kernel is None:
      # Tied embeddings: rescale as T5 does, since the embedding was drawn with std ~ 1.
      logits = self.embed.attend(x_BxLxD) / jnp.sqrt(self.d_model).astype(self.dtype)
    else:
      logits = jnp.einsum('bld,dv->blv', x_BxLxD, self.logits_kernel[...].astype(self.dtype))
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def encode(self, encoder_tokens_BxL: jax.Array) -> jax.Array:
    """The encoder's output encoded_BxLxD (deterministic; 0 tokens are padding)."""
    segments_BxL = (encoder_tokens_BxL > 0).astype(jnp.int32)
    encoded, _ = self.encoder(self.embed(encoder_tokens_BxL), valid_BxL=segments_BxL > 0,
                              self_mask=attention_mask(segments_BxL, segments_BxL),
                              name='encoder', deterministic=True, rngs=None)
    return encoded

  def balance_experts(self, aux: dict[str, MoeStats], rate: float | jax.Array) -> None:
    """Aux-loss-free balancing, once per training step: every Switch layer's expert bias takes
    a step of ``rate`` toward an even load of the selections in its ``aux`` stats."""
    for name, stack in (('encoder', self.encoder), ('decoder', self.decoder)):
      for key, layer in stack.switch_layers(name) if stack is not None else ():
        layer.balance(aux[key].selected_fraction_E, rate)


def loss_and_metrics(model: LanguageModel, batch: Batch, *, deterministic: bool,
                     rngs: nnx.Rngs | None = None
                     ) -> tuple[jax.Array, dict, dict[str, MoeStats]]:
  """Total loss = token-mean cross-entropy + sum over Switch layers of their aux losses.

  Returns (loss, metrics, aux): metrics ``loss``, ``ce``, ``accuracy``, ``load_balance``,
  ``importance``, ``z_loss``, ``dropped_fraction`` (mean over Switch layers) and ``moe``
  (per-layer `MoeStats.as_dict`, for logging); aux is the model's (layer name -> `MoeStats`).
  """
  logits_BxLxV, aux = model(batch, deterministic=deterministic, rngs=rngs)
  targets = batch['decoder_target_tokens']
  weights = batch['decoder_loss_weights'].astype(jnp.float32)
  token_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), targets[..., None],
                                  axis=-1)[..., 0]
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  ce = jnp.sum(token_ce * weights) / denom
  accuracy = jnp.sum((jnp.argmax(logits_BxLxV, -1) == targets) * weights) / denom
  stats = list(aux.values())
  zero = jnp.zeros((), jnp.float32)
  losses = {name: sum((st.losses[name] for st in stats), zero) for name in AUX_LOSSES}
  loss = ce + sum(losses.values())
  dropped = (sum(st.diagnostics['dropped_fraction'] for st in stats) / len(stats)
             if stats else zero)
  return loss, {'loss': loss, 'ce': ce, 'accuracy': accuracy, **losses,
                'dropped_fraction': dropped,
                'moe': {name: st.as_dict() for name, st in aux.items()}}, aux
