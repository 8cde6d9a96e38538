"""HuggingFace checkpoint fixtures: tiny random HF folders and an independent float64 forward.

For the tests of an HF-checkpoint converter, with no torch and no network. Imports only NumPy,
json, math, os and ``safetensors.numpy``; calls no switchmoe code.

- `small_switch_config` / `small_t5_config`: HF ``config.json`` dicts of tiny
  ``SwitchTransformersForConditionalGeneration`` / ``T5ForConditionalGeneration`` models.
- `hf_tensor_shapes(config)`: the exact {name: shape} that ``save_pretrained`` writes.
- `write_hf_checkpoint(folder, config, seed, shards)`: writes ``config.json`` and
  ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``)
  and returns the float32 tensors written. `read_hf_checkpoint(folder)` reads one back.
- `hf_forward(config, weights, enc_BxL, dec_BxT)`: float64 logits [B, T, V] of HF's eval-mode
  forward ``model(input_ids=enc, attention_mask=(enc != pad_token_id), decoder_input_ids=dec)``;
  `hf_decoder_input(labels)`: HF's ``_shift_right``. `hf_sparse_layers(config)`: which blocks
  are Switch layers.

Mirrors transformers 5.24.0 (modeling_t5.py, modeling_switch_transformers.py, their configs);
checked against the real models (torch 2.13 CPU, float32, eval): max |diff| / max |logit|
below 1e-6. HF's conventions:

- Layout: Linear weights are [out, in] (``y = x @ W.T``); q/k/v [H*d_kv, d_model],
  o [d_model, H*d_kv]; ``relative_attention_bias`` [num_buckets, H] only in block 0 of each
  stack's self-attention (decoder cross-attention has none), reused by every later block.
  Saved files hold ``shared.weight`` but not the tied ``encoder/decoder.embed_tokens.weight``
  nor, when tied, ``lm_head.weight`` (T5.1.1 has its own ``lm_head.weight``). Exception: a
  Switch config with ``tie_word_embeddings`` false ties nothing in transformers 5, so it
  saves all four (embed_tokens written as copies of shared).
- Layer norm: T5 RMS norm ``w * x / sqrt(mean(x^2) + eps)``, no mean, no bias; pre-norm
  residual blocks; a final RMS norm per stack.
- Attention is NOT scaled by 1/sqrt(d_kv) (HF sets ``scaling = 1.0``); scores get the relative
  position bias (bidirectional buckets in the encoder, causal in the decoder) plus the mask,
  added as ``float32.min`` on masked keys (so an all-padding row attends uniformly, as eager).
- Padding: only the encoder mask ``enc != pad_token_id`` is used, in encoder self-attention and
  decoder cross-attention; decoder self-attention is causal only (HF builds no decoder padding
  mask by itself, and decoder_start_token_id is the pad id 0).
- FFN: T5 1.0 ``relu(x wi) wo``; T5.1.1 ``gelu_new(x wi_0) * (x wi_1) wo`` (``wi_0`` is the
  GELU-tanh branch). ``is_gated_act`` / ``dense_act_fn`` in the config win over what
  ``feed_forward_proj`` implies (as T5Config's __post_init__ lets them). Switch experts and
  dense layers: ``act(x wi) wo`` with ``dense_act_fn`` (relu).
- Sparse layers: block i is a Switch layer iff ``sparse_step > 0 and (i % sparse_step == 1 or
  sparse_step == 1)``, with sparse_step = config ``encoder_sparse_step`` (resp. decoder) when
  present, else ``num_layers // num_sparse_encoder_layers`` (``num_layers`` when that is 0).
  So step 1: every block; step 2: blocks 1, 3, 5...; step 3: 1, 4, 7...
- Switch layer: router ``Linear(d_model, E, bias=router_bias)`` (``...mlp.router.classifier``),
  softmax (float32 in HF, float64 here), top-1 by argmax; each SEQUENCE is one group with the
  fixed ``expert_capacity``: the tokens of a sequence that chose expert e keep their slot in
  sequence order while e holds at most ``expert_capacity`` of them; later ones are dropped.
  Output = max prob * expert(x) for kept tokens and exactly 0 for dropped tokens (the residual
  carries them; older releases, said to be those before 4.53 and not checked here, gave them
  p * x, from an expert output buffer cloned from the input). No jitter in
  eval. Padding is NOT excluded from routing: pad tokens route and take capacity like real
  ones (``router_ignore_padding_tokens`` is stored in the config but unused), so right padding
  only uses slots left after the real tokens, while left or interior padding can push real
  tokens out.
- LM head: logits = ``(h * d_model**-0.5) @ E.T`` when the decoder outputs are scaled, else
  ``h @ lm_head.T``. Scaled iff ``scale_decoder_outputs`` (T5, when present) else
  ``tie_word_embeddings`` (default true): T5 1.0 and Switch scale, T5.1.1 (untied) does not.
  The head matrix is ``lm_head.weight`` when the checkpoint has it, else ``shared.weight``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file, save_file

MIRRORED_TRANSFORMERS_VERSION = '5.24.0'

_F32_MIN = float(np.finfo(np.float32).min)


# --------------------------------------------------------------------------------------------
# Configs.


def _common_config(**fields):
  base = {
      'vocab_size': 64,
      'd_model': 16,
      'd_kv': 4,
      'd_ff': 32,
      'num_heads': 2,
      'num_layers': 2,
      'num_decoder_layers': 2,
      'relative_attention_num_buckets': 8,
      'relative_attention_max_distance': 16,
      'dropout_rate': 0.1,
      'layer_norm_epsilon': 1e-6,
      'initializer_factor': 1.0,
      'is_encoder_decoder': True,
      'is_decoder': False,
      'use_cache': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
      'dtype': 'float32',
      'transformers_version': MIRRORED_TRANSFORMERS_VERSION,
  }
  base.update(fields)
  return base


def small_switch_config(sparse_step=2, **overrides):
  """A tiny ``switch_transformers`` config.json dict: d_model 16, d_kv 4, 2 heads, d_ff 32,
  2 + 2 layers, vocab 64, 4 experts, expert_capacity 2 (drops on sequences over ~8 tokens).

  ``sparse_step`` sets ``num_sparse_{en,de}coder_layers = num_layers // sparse_step``;
  ``overrides`` replace any field, after which ``encoder_sparse_step`` / ``decoder_sparse_step``
  are derived as SwitchTransformersConfig does, unless they are overridden themselves.
  """
  cfg = _common_config(
      architectures=['SwitchTransformersForConditionalGeneration'],
      model_type='switch_transformers',
      num_experts=4,
      expert_capacity=2,
      router_bias=False,
      router_jitter_noise=0.01,
      router_dtype='float32',
      router_ignore_padding_tokens=False,
      router_z_loss_coef=0.001,
      router_aux_loss_coef=0.001,
      add_router_probs=False,
      add_cross_attention=False,
      bos_token_id=None,
      dense_act_fn='relu',
      tie_word_embeddings=True,
  )
  layers = overrides.get('num_layers', cfg['num_layers'])
  dec_layers = overrides.get('num_decoder_layers', layers)
  cfg['num_decoder_layers'] = dec_layers
  cfg['num_sparse_encoder_layers'] = layers // sparse_step
  cfg['num_sparse_decoder_layers'] = dec_layers // sparse_step
  cfg.update(overrides)
  for stack, n_key in (('encoder', 'num_layers'), ('decoder', 'num_decoder_layers')):
    if f'{stack}_sparse_step' not in overrides:
      n, n_sparse = cfg[n_key], cfg[f'num_sparse_{stack}_layers']
      cfg[f'{stack}_sparse_step'] = n // n_sparse if n_sparse > 0 else n
  return dict(sorted(cfg.items()))


def small_t5_config(version='1.1', **overrides):
  """A tiny ``t5`` config.json dict (same sizes as `small_switch_config`, no experts).

  '1.0': ReLU FFN, tied embeddings (decoder output scaled by d_model**-0.5);
  '1.1': gated-GELU FFN (``wi_0`` / ``wi_1``), untied ``lm_head``, no scaling. Written in the
  hub's style (``tie_word_embeddings`` false for 1.1; no ``scale_decoder_outputs`` key).
  """
  if version == '1.0':
    ffn = dict(feed_forward_proj='relu', dense_act_fn='relu', is_gated_act=False,
               tie_word_embeddings=True)
  elif version == '1.1':
    ffn = dict(feed_forward_proj='gated-gelu', dense_act_fn='gelu_new', is_gated_act=True,
               tie_word_embeddings=False)
  else:
    raise ValueError(f"version must be '1.0' or '1.1', not {version!r}")
  cfg = _common_config(architectures=['T5ForConditionalGeneration'], model_type='t5',
                       classifier_dropout=0.0, **ffn)
  cfg.update(overrides)
  return dict(sorted(cfg.items()))


# --------------------------------------------------------------------------------------------
# HF's rules, read off a config.


def _model_type(config):
  mt = config.get('model_type')
  if mt not in ('t5', 'switch_transformers'):
    raise ValueError(f'model_type must be t5 or switch_transformers, not {mt!r}')
  return mt


def _num_layers(config):
  n = config.get('num_layers', 12 if _model_type(config) == 'switch_transformers' else 6)
  dec = config.get('num_decoder_layers')
  return n, (n if dec is None else dec)


def _sparse_step(config, stack):
  """SwitchTransformersConfig's {en,de}coder_sparse_step (an explicit field wins)."""
  key = f'{stack}_sparse_step'
  if key in config:
    return config[key]
  n_enc, n_dec = _num_layers(config)
  n = n_enc if stack == 'encoder' else n_dec
  n_sparse = config.get(f'num_sparse_{stack}_layers', 3)
  return n // n_sparse if n_sparse > 0 else n


def hf_sparse_layers(config):
  """{'encoder': [block indices], 'decoder': [...]} of the Switch layers ([] for T5)."""
  out = {'encoder': [], 'decoder': []}
  if _model_type(config) != 'switch_transformers':
    return out
  for stack, n in zip(('encoder', 'decoder'), _num_layers(config)):
    step = _sparse_step(config, stack)
    out[stack] = [i for i in range(n) if step > 0 and (i % step == 1 or step == 1)]
  return out


def _ffn_kind(config):
  """(gated, activation) of the dense FFNs, as T5Config / SwitchTransformersConfig resolve it."""
  if _model_type(config) == 'switch_transformers':
    return False, config.get('dense_act_fn', 'relu')
  proj = config.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  act = 'gelu_new' if proj == 'gated-gelu' else parts[-1]
  return config.get('is_gated_act', parts[0] == 'gated'), config.get('dense_act_fn', act)


def _scale_decoder_outputs(config):
  if _model_type(config) == 't5' and 'scale_decoder_outputs' in config:
    return bool(config['scale_decoder_outputs'])
  return config.get('tie_word_embeddings', True) is not False


def _saves_lm_head(config):
  return config.get('tie_word_embeddings', True) is False


# --------------------------------------------------------------------------------------------
# Tensor names and shapes.


def hf_tensor_shapes(config, include_tied_duplicates=False):
  """Ordered {name: shape} of the tensors ``save_pretrained`` writes for ``config``.

  ``include_tied_duplicates`` adds ``encoder.embed_tokens.weight`` and
  ``decoder.embed_tokens.weight`` (and ``lm_head.weight`` when tied), as older
  ``pytorch_model.bin``-era checkpoints carry them.
  """
  mt = _model_type(config)
  d, dkv, h = config['d_model'], config['d_kv'], config['num_heads']
  dff, v = config['d_ff'], config['vocab_size']
  nb = config.get('relative_attention_num_buckets', 32)
  inner = h * dkv
  gated, _ = _ffn_kind(config)
  sparse = hf_sparse_layers(config)
  shapes = {}

  def attention(prefix, relative):
    for p in ('q', 'k', 'v'):
      shapes[f'{prefix}.{p}.weight'] = (inner, d)
    shapes[f'{prefix}.o.weight'] = (d, inner)
    if relative:
      shapes[f'{prefix}.relative_attention_bias.weight'] = (nb, h)

  def ffn(prefix, is_sparse):
    shapes[f'{prefix}.layer_norm.weight'] = (d,)
    if mt == 't5':
      base = f'{prefix}.DenseReluDense'
      for name in (('wi_0', 'wi_1') if gated else ('wi',)):
        shapes[f'{base}.{name}.weight'] = (dff, d)
      shapes[f'{base}.wo.weight'] = (d, dff)
    elif not is_sparse:
      shapes[f'{prefix}.mlp.wi.weight'] = (dff, d)
      shapes[f'{prefix}.mlp.wo.weight'] = (d, dff)
    else:
      e = config['num_experts']
      shapes[f'{prefix}.mlp.router.classifier.weight'] = (e, d)
      if config.get('router_bias', False):
        shapes[f'{prefix}.mlp.router.classifier.bias'] = (e,)
      for i in range(e):
        shapes[f'{prefix}.mlp.experts.expert_{i}.wi.weight'] = (dff, d)
        shapes[f'{prefix}.mlp.experts.expert_{i}.wo.weight'] = (d, dff)

  shapes['shared.weight'] = (v, d)
  untied_switch = mt == 'switch_transformers' and _saves_lm_head(config)
  for stack, n in zip(('encoder', 'decoder'), _num_layers(config)):
    if include_tied_duplicates or untied_switch:
      shapes[f'{stack}.embed_tokens.weight'] = (v, d)
    for i in range(n):
      blk = f'{stack}.block.{i}.layer'
      attention(f'{blk}.0.SelfAttention', relative=(i == 0))
      shapes[f'{blk}.0.layer_norm.weight'] = (d,)
      j = 1
      if stack == 'decoder':
        attention(f'{blk}.1.EncDecAttention', relative=False)
        shapes[f'{blk}.1.layer_norm.weight'] = (d,)
        j = 2
      ffn(f'{blk}.{j}', i in sparse[stack])
    shapes[f'{stack}.final_layer_norm.weight'] = (d,)
  if _saves_lm_head(config) or include_tied_duplicates:
    shapes['lm_head.weight'] = (v, d)
  return shapes


def _init_std(name, config):
  """Std of the random normal values: HF-like fan-in scales, sized for non-degenerate logits
  (O(1) attention scores and vocab logits) and routers far from ties."""
  d, dkv, h, dff = config['d_model'], config['d_kv'], config['num_heads'], config['d_ff']
  if name.endswith(('shared.weight', 'embed_tokens.weight')):
    return 1.0
  if name == 'lm_head.weight':
    return d ** -0.5
  if name.endswith('relative_attention_bias.weight'):
    return 1.0
  if 'router.classifier' in name:
    return 0.5
  if name.endswith(('.q.weight', '.k.weight', '.v.weight')):
    return d ** -0.5
  if name.endswith('.o.weight'):
    return (h * dkv) ** -0.5
  if name.endswith(('wi.weight', 'wi_0.weight', 'wi_1.weight')):
    return d ** -0.5
  if name.endswith('wo.weight'):
    return dff ** -0.5 if 'experts' not in name else d ** -0.5
  raise KeyError(name)


def _random_weights(config, seed, include_tied_duplicates):
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in hf_tensor_shapes(config, include_tied_duplicates).items():
    if name.endswith('embed_tokens.weight'):
      continue                       # copies of shared.weight, filled below
    if name == 'lm_head.weight' and not _saves_lm_head(config):
      continue                       # a tied duplicate
    if name.endswith('layer_norm.weight'):
      w = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      w = _init_std(name, config) * rng.standard_normal(shape)
    weights[name] = w.astype(np.float32)
  for name in hf_tensor_shapes(config, include_tied_duplicates):
    if name not in weights:
      weights[name] = weights['shared.weight'].copy()
  return weights


# --------------------------------------------------------------------------------------------
# Writing and reading checkpoint folders.


def _shard_names(names, nbytes, shards):
  """Cut ``names`` (in order) into ``shards`` contiguous runs of about equal bytes."""
  total = sum(nbytes[n] for n in names)
  out, acc = [], 0
  for n in names:
    k = min(shards - 1, int(acc * shards // total))
    out.append(k)
    acc += nbytes[n]
  # Every shard gets at least one tensor (files named -of-N must all exist).
  for k in range(shards):
    if k not in out:
      raise ValueError(f'too many shards ({shards}) for {len(names)} tensors')
  return out


def write_hf_checkpoint(folder, config, seed=0, shards=1, include_tied_duplicates=False):
  """Write a random HF checkpoint of ``config`` into ``folder``; return {name: float32 array}.

  Files: ``config.json`` (``config`` as given), and ``model.safetensors`` (shards=1) or
  ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``
  (``{"metadata": {"total_parameters", "total_size"}, "weight_map": {name: file}}``), each file
  with safetensors metadata ``{"format": "pt"}`` as ``save_pretrained`` writes.
  """
  _model_type(config)
  if shards < 1:
    raise ValueError('shards must be >= 1')
  os.makedirs(folder, exist_ok=True)
  weights = _random_weights(config, seed, include_tied_duplicates)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  names = sorted(weights)
  meta = {'format': 'pt'}
  if shards == 1:
    save_file({n: weights[n] for n in names}, os.path.join(folder, 'model.safetensors'),
              metadata=meta)
    return weights
  nbytes = {n: weights[n].nbytes for n in names}
  which = _shard_names(names, nbytes, shards)
  files = [f'model-{k + 1:05d}-of-{shards:05d}.safetensors' for k in range(shards)]
  for k, fname in enumerate(files):
    part = {n: weights[n] for n, s in zip(names, which) if s == k}
    save_file(part, os.path.join(folder, fname), metadata=meta)
  index = {
      'metadata': {
          'total_parameters': int(sum(weights[n].size for n in names)),
          'total_size': int(sum(nbytes.values())),
      },
      'weight_map': {n: files[s] for n, s in zip(names, which)},
  }
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write('\n')
  return weights


def read_hf_checkpoint(folder):
  """(config dict, {name: array}) of an HF folder, single-file or sharded."""
  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  index_path = os.path.join(folder, 'model.safetensors.index.json')
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  weights = {}
  for fname in files:
    weights.update(load_file(os.path.join(folder, fname)))
  return config, weights


# --------------------------------------------------------------------------------------------
# The float64 forward.


def hf_decoder_input(labels_BxT, decoder_start_token_id=0, pad_token_id=0):
  """HF's ``_shift_right``: [start, labels[:-1]], with -100 replaced by ``pad_token_id``."""
  labels = np.asarray(labels_BxT)
  out = np.zeros_like(labels)
  out[:, 1:] = labels[:, :-1]
  out[:, 0] = decoder_start_token_id
  return np.where(out == -100, pad_token_id, out)


def _activation(name, x):
  if name == 'relu':
    return np.maximum(x, 0.0)
  if name in ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
  if name == 'gelu':
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
  if name in ('silu', 'swish'):
    return x / (1.0 + np.exp(-x))
  raise ValueError(f'unsupported activation {name!r}')


def _rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _relative_position_bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's bucket of ``rel = key_pos - query_pos``; the log part in float32, as torch does it."""
  rel = np.asarray(rel, np.int64)
  bucket = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    bucket += (rel > 0).astype(np.int64) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  safe = np.where(is_small, max_exact, n).astype(np.float32)
  scaled = (np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return bucket + np.where(is_small, n, large)


def _position_bias(table_NxH, q_len, k_len, bidirectional, num_buckets, max_distance):
  """[H, q_len, k_len] bias from a stack's block-0 ``relative_attention_bias``."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  buckets = _relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
  return np.transpose(table_NxH[buckets], (2, 0, 1))


def _attention(x_BxQxD, kv_BxKxD, w, prefix, heads, bias_HxQxK, keep_BxQxK):
  """Unscaled multi-head attention; masked keys get float32.min added to the score."""
  b, q_len, _ = x_BxQxD.shape
  k_len = kv_BxKxD.shape[1]

  def split(x, name, length):
    return (x @ w[f'{prefix}.{name}.weight'].T).reshape(b, length, heads, -1).transpose(0, 2, 1, 3)

  q = split(x_BxQxD, 'q', q_len)
  k = split(kv_BxKxD, 'k', k_len)
  v = split(kv_BxKxD, 'v', k_len)
  s = q @ k.transpose(0, 1, 3, 2) + bias_HxQxK[None]
  s = s + np.where(keep_BxQxK[:, None], 0.0, _F32_MIN)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p = p / p.sum(-1, keepdims=True)
  o = (p @ v).transpose(0, 2, 1, 3).reshape(b, q_len, -1)
  return o @ w[f'{prefix}.o.weight'].T


def _dense(x, w, prefix, gated, act):
  if gated:
    h = _activation(act, x @ w[f'{prefix}.wi_0.weight'].T) * (x @ w[f'{prefix}.wi_1.weight'].T)
  else:
    h = _activation(act, x @ w[f'{prefix}.wi.weight'].T)
  return h @ w[f'{prefix}.wo.weight'].T


def _switch_mlp(x_BxLxD, w, prefix, config, act, routing):
  """HF's SwitchTransformersSparseMLP: top-1, capacity per sequence, dropped tokens -> 0."""
  logits = x_BxLxD @ w[f'{prefix}.router.classifier.weight'].T
  if f'{prefix}.router.classifier.bias' in w:
    logits = logits + w[f'{prefix}.router.classifier.bias']
  z = np.exp(logits - logits.max(-1, keepdims=True))
  probs = z / z.sum(-1, keepdims=True)
  expert = np.argmax(probs, -1)                                   # [B, L]
  e = probs.shape[-1]
  onehot = expert[..., None] == np.arange(e)                       # [B, L, E]
  priority = np.cumsum(onehot, axis=1)                             # slot number in the sequence
  kept = np.take_along_axis(priority, expert[..., None], -1)[..., 0] <= config['expert_capacity']
  gate = probs.max(-1)
  out = np.zeros_like(x_BxLxD)
  for i in range(e):
    sel = kept & (expert == i)
    if sel.any():
      out[sel] = gate[sel][:, None] * _dense(x_BxLxD[sel], w, f'{prefix}.experts.expert_{i}',
                                             False, act)
  top2 = np.sort(probs, -1)[..., -2:]
  margin = float((top2[..., 1] - top2[..., 0]).min()) if e > 1 else math.inf
  routing.append({'name': prefix, 'expert': expert, 'kept': kept, 'gate': gate, 'probs': probs,
                  'margin': margin})
  return out


def hf_forward(config, weights, encoder_tokens_BxL, decoder_tokens_BxT, return_routing=False):
  """Float64 logits [B, T, V] of HF's eval forward (see the module docstring).

  Same as ``model(input_ids=enc, attention_mask=(enc != pad_token_id), decoder_input_ids=dec)
  .logits`` of ``T5ForConditionalGeneration`` / ``SwitchTransformersForConditionalGeneration``.
  ``return_routing``: also return a list, one dict per Switch layer in forward order (encoder
  blocks, then decoder blocks), of 'name' (module prefix), 'expert' [B, S] (argmax),
  'kept' [B, S] (False: dropped over capacity), 'gate' [B, S], 'probs' [B, S, E] and 'margin'
  (the smallest top-1 minus top-2 probability: how far the routing is from a tie).
  """
  mt = _model_type(config)
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  enc = np.asarray(encoder_tokens_BxL)
  dec = np.asarray(decoder_tokens_BxT)
  b, l = enc.shape
  t = dec.shape[1]
  heads = config['num_heads']
  eps = config.get('layer_norm_epsilon', 1e-6)
  nb = config.get('relative_attention_num_buckets', 32)
  md = config.get('relative_attention_max_distance', 128)
  gated, act = _ffn_kind(config)
  sparse = hf_sparse_layers(config)
  n_enc, n_dec = _num_layers(config)
  routing = []

  def ffn(x, prefix, stack, i):
    y = _rms_norm(x, w[f'{prefix}.layer_norm.weight'], eps)
    if mt == 't5':
      y = _dense(y, w, f'{prefix}.DenseReluDense', gated, act)
    elif i in sparse[stack]:
      y = _switch_mlp(y, w, f'{prefix}.mlp', config, act, routing)
    else:
      y = _dense(y, w, f'{prefix}.mlp', False, act)
    return x + y

  shared = w['shared.weight']
  enc_keep_BxL = enc != config.get('pad_token_id', 0)

  # Encoder.
  x = w.get('encoder.embed_tokens.weight', shared)[enc]
  bias = _position_bias(w['encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'],
                        l, l, True, nb, md)
  keep = np.broadcast_to(enc_keep_BxL[:, None, :], (b, l, l))
  for i in range(n_enc):
    blk = f'encoder.block.{i}.layer'
    y = _rms_norm(x, w[f'{blk}.0.layer_norm.weight'], eps)
    x = x + _attention(y, y, w, f'{blk}.0.SelfAttention', heads, bias, keep)
    x = ffn(x, f'{blk}.1', 'encoder', i)
  memory = _rms_norm(x, w['encoder.final_layer_norm.weight'], eps)

  # Decoder.
  x = w.get('decoder.embed_tokens.weight', shared)[dec]
  bias = _position_bias(w['decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'],
                        t, t, False, nb, md)
  causal = np.broadcast_to(np.tril(np.ones((t, t), bool))[None], (b, t, t))
  cross_keep = np.broadcast_to(enc_keep_BxL[:, None, :], (b, t, l))
  no_bias = np.zeros((heads, t, l))
  for i in range(n_dec):
    blk = f'decoder.block.{i}.layer'
    y = _rms_norm(x, w[f'{blk}.0.layer_norm.weight'], eps)
    x = x + _attention(y, y, w, f'{blk}.0.SelfAttention', heads, bias, causal)
    y = _rms_norm(x, w[f'{blk}.1.layer_norm.weight'], eps)
    x = x + _attention(y, memory, w, f'{blk}.1.EncDecAttention', heads, no_bias, cross_keep)
    x = ffn(x, f'{blk}.2', 'decoder', i)
  h = _rms_norm(x, w['decoder.final_layer_norm.weight'], eps)

  if _scale_decoder_outputs(config):
    h = h * config['d_model'] ** -0.5
  logits = h @ w.get('lm_head.weight', shared).T
  return (logits, routing) if return_routing else logits
