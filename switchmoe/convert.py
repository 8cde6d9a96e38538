"""Released HuggingFace checkpoints (SwitchTransformers, T5 v1.0 / v1.1) as switchmoe models.

A HuggingFace folder holds ``config.json``, the weights as ``model.safetensors`` or as shards
listed in ``model.safetensors.index.json``, and usually the tokenizer ``spiece.model``. It is
read with ``safetensors`` and NumPy only (no torch), one tensor at a time, and every tensor
must map onto switchmoe's parameter tree and back: a tensor of the folder that nothing reads,
or a parameter that nothing fills, is an error. Shapes are checked from the files' headers
before any weight is read. Given a mesh, `load_hf_params` streams the weights onto it: each
process reads only the blocks its devices hold, one at a time, so a checkpoint larger than
any host (switch-c-2048) converts as long as the mesh holds it.

Conventions that differ, and how a conversion keeps the checkpoint's function:
- T5 does not scale attention logits by 1/sqrt(d_kv); switchmoe does, so the query weights
  are multiplied by sqrt(d_kv) on import.
- HF routes each sequence as one group with a fixed ``expert_capacity``: the converted config
  has ``model.moe.group_size=0`` and ``model.moe.expert_capacity`` set to it.
- HF makes layer i sparse when ``i % sparse_step == 1`` (every layer for step 1); switchmoe
  when ``i % every == every - 1``. They agree for steps 1 and 2, which is what released
  checkpoints use; other steps are refused.
- Linear weights are stored [out, in]; attention heads are the outer part of each projection's
  out dimension. T5.1.1's ``wi_0`` is the GELU branch (switchmoe's ``wi_gate``), ``wi_1`` the
  linear one (``wi``).
- Tied embeddings: both rescale the decoder output by d_model**-0.5 before the output
  projection; untied checkpoints (T5.1.1) have an ``lm_head`` and no rescaling.
- Dropped tokens: the sparse layer outputs 0 for them and the residual carries the token, as in
  Mesh TF, t5x and transformers >= 4.53. transformers <= 4.50 instead passed a dropped
  token's hidden state through the sparse layer (its output buffer started as a copy of the
  input), so logits from those versions differ wherever a token is dropped.
- Padding: switchmoe's routers give padding no capacity (Mesh TF); HF's router sees padding as
  tokens. Logits agree wherever the padding would not have pushed a real token over capacity
  (always, for unpadded rows).

Shape suffixes: D d_model, F d_ff, H heads, K d_kv, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from switchmoe.config import default_config

MODEL_TYPES = ('switch_transformers', 't5')
_INDEX = 'model.safetensors.index.json'
_SINGLE = 'model.safetensors'


class _Tensors:
  """The folder's tensors by name, read on demand from one file or an index of shards.

  Each file is opened once (safetensors maps it), so reading one tensor, or asking its shape,
  touches only that tensor's bytes.
  """

  def __init__(self, folder: str):
    from safetensors import safe_open
    self._open = lambda path: safe_open(path, framework='np')
    self._handles: dict[str, tuple] = {}
    index = os.path.join(folder, _INDEX)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{index}: not a safetensors index ({type(e).__name__}: {e})') from None
      self.files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
      for shard in sorted(set(self.files.values())):
        if not os.path.isfile(shard):
          raise ValueError(f'{index}: names shard {os.path.basename(shard)}, which is missing')
    elif os.path.isfile(os.path.join(folder, _SINGLE)):
      path = os.path.join(folder, _SINGLE)
      self.files = {name: path for name in self._handle_of(path)[1]}
    else:
      raise ValueError(f'{folder}: no weights ({_SINGLE} or {_INDEX}); only safetensors '
                       'checkpoints are read')

  def __iter__(self) -> Iterator[str]:
    return iter(self.files)

  def _handle_of(self, path: str) -> tuple:
    if path not in self._handles:
      handle = self._open(path)
      self._handles[path] = (handle, frozenset(handle.keys()))
    return self._handles[path]

  def _handle(self, name: str):
    handle, names = self._handle_of(self.files[name])
    if name not in names:
      raise ValueError(f'{self.files[name]}: lacks {name}, which the index places there')
    return handle

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, from the file's header alone."""
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    return np.asarray(self._handle(name).get_tensor(name), np.float32)


def read_hf_config(folder: str) -> dict:
  """The folder's ``config.json``; ValueError for a missing file or an unknown model_type."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isdir(folder):
    raise ValueError(f'{folder}: no such folder')
  try:
    with open(path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'{path}: missing; a HuggingFace checkpoint folder has config.json '
                     'and safetensors weights') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: cannot read ({type(e).__name__}: {e})') from None
  if hf.get('model_type') not in MODEL_TYPES:
    raise ValueError(f'{path}: model_type={hf.get("model_type")!r}; allowed: '
                     f'{", ".join(map(repr, MODEL_TYPES))}')
  return hf


def config_from_hf(hf: dict, folder: str = '') -> ml_collections.ConfigDict:
  """A switchmoe config with the model of HF config ``hf`` (``config.json``'s dict). Data and
  training fields keep their defaults but the tokenizer, ``folder/spiece.model`` if present."""
  where = f'{folder}/config.json' if folder else 'config.json'

  def need(key):
    if key not in hf:
      raise ValueError(f'{where}: lacks {key}')
    return hf[key]

  c = default_config()
  m, e = c.model, c.model.moe
  m.vocab_size, m.d_model, m.d_kv = need('vocab_size'), need('d_model'), need('d_kv')
  m.d_ff, m.num_heads, m.num_layers = need('d_ff'), need('num_heads'), need('num_layers')
  m.num_decoder_layers = hf.get('num_decoder_layers') or m.num_layers
  m.relative_attention_num_buckets = hf.get('relative_attention_num_buckets', 32)
  m.relative_attention_max_distance = hf.get('relative_attention_max_distance', 128)
  m.dropout_rate = float(hf.get('dropout_rate', 0.1))
  if not math.isclose(hf.get('layer_norm_epsilon', 1e-6), 1e-6):
    raise ValueError(f'{where}: layer_norm_epsilon={hf["layer_norm_epsilon"]}; allowed: 1e-06 '
                     "(switchmoe's RMSNorm)")
  # Explicit is_gated_act / dense_act_fn win over feed_forward_proj, as in HF.
  projection = hf.get('feed_forward_proj', 'relu')
  gated = hf.get('is_gated_act', projection.startswith('gated-'))
  act = hf.get('dense_act_fn', projection.split('-')[-1])
  activations = {(False, 'relu'): 'relu', (True, 'gelu_new'): 'geglu', (True, 'gelu'): 'geglu'}
  if (gated, act) not in activations:
    raise ValueError(f'{where}: feed_forward_proj={projection!r} (is_gated_act={gated}, '
                     f'dense_act_fn={act!r}); allowed: relu, or gated-gelu with the tanh GELU')
  if (gated, act) == (True, 'gelu'):
    # T5's gated-gelu checkpoints name the tanh approximation 'gelu_new'; 'gelu' would be
    # the exact erf GELU, which switchmoe's GEGLU does not compute.
    raise ValueError(f'{where}: dense_act_fn=\'gelu\' (exact GELU); allowed: \'gelu_new\'')
  m.ffn_activation = activations[(gated, act)]
  # Tied embeddings and the d_model**-0.5 output scale go together in switchmoe; HF decides
  # the scale by scale_decoder_outputs if present. Unscaled output without an lm_head uses
  # shared.weight as an untied projection (`tensor_names`).
  m.tie_embeddings = bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))
  m.arch = 'encoder_decoder'
  if hf['model_type'] == 'switch_transformers':
    steps = {hf.get('encoder_sparse_step'), hf.get('decoder_sparse_step')}
    if len(steps) != 1 or steps - {1, 2}:
      raise ValueError(f'{where}: encoder_sparse_step / decoder_sparse_step '
                       f'{hf.get("encoder_sparse_step")} / {hf.get("decoder_sparse_step")}; '
                       'allowed: both 1 or both 2 (the sparse layers must sit where '
                       'switchmoe puts them)')
    if hf.get('router_bias', False):
      raise ValueError(f'{where}: router_bias=true; allowed: false (switchmoe routers have '
                       'no bias)')
    e.every = steps.pop()
    e.num_experts = need('num_experts')
    e.expert_capacity = need('expert_capacity')
    e.group_size = 0                      # HF routes each sequence as one group
    e.load_balance_loss = float(hf.get('router_aux_loss_coef', 0.001))
    e.router_z_loss = float(hf.get('router_z_loss_coef', 0.001))
    jitter = float(hf.get('router_jitter_noise', 0.0))
    if jitter > 0:
      e.exploration, e.jitter = 'input_jitter', jitter
  else:
    e.every = 0
  tokenizer = os.path.join(folder, 'spiece.model') if folder else ''
  if tokenizer and os.path.isfile(tokenizer):
    c.data.tokenizer = tokenizer
  return c


# ------------------------------------------------------------------------------ tensor names

@dataclasses.dataclass(frozen=True)
class Layout:
  """How one HF tensor becomes a switchmoe array (``to_ours``) and back (``to_hf``)."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda x: x, lambda x: x)
LINEAR = Layout(lambda w_OxI: w_OxI.T, lambda w_IxO: w_IxO.T)   # [out, in] <-> [in, out]


def heads_in(heads: int, scale: float = 1.0) -> Layout:
  """q / k / v [H*K, D] <-> [D, H, K], times ``scale`` on the way in."""
  return Layout(lambda w: w.T.reshape(w.shape[1], heads, -1) * np.float32(scale),
                lambda w_DxHxK: (w_DxHxK / np.float32(scale)).reshape(w_DxHxK.shape[0], -1).T)


def heads_out(heads: int) -> Layout:
  """o [D, H*K] <-> [H, K, D]."""
  return Layout(lambda w: w.T.reshape(heads, -1, w.shape[0]),
                lambda w_HxKxD: w_HxKxD.reshape(-1, w_HxKxD.shape[-1]).T)


def _is_sparse(layer: int, every: int) -> bool:
  return every > 0 and layer % every == every - 1


def _block_names(c: ml_collections.ConfigDict, stack: str, i: int
                 ) -> Iterator[tuple[str, str, Layout]]:
  """(HF name, switchmoe path, layout) of one block's tensors; experts as ``{e}``."""
  m = c.model
  switch = m.moe.every > 0
  hf, ours = f'{stack}.block.{i}.layer', f'{stack}/layers/{i}'
  attn = {'q': ('query', heads_in(m.num_heads, math.sqrt(m.d_kv))),
          'k': ('key', heads_in(m.num_heads)), 'v': ('value', heads_in(m.num_heads)),
          'o': ('out', heads_out(m.num_heads))}
  parts = [('0', 'SelfAttention', 'self_attn')]
  if stack == 'decoder':
    parts.append(('1', 'EncDecAttention', 'cross_attn'))
  for j, hf_attn, our_attn in parts:
    for p, (name, layout) in attn.items():
      yield f'{hf}.{j}.{hf_attn}.{p}.weight', f'{ours}/{our_attn}/{name}', layout
    yield f'{hf}.{j}.layer_norm.weight', f'{ours}/{our_attn}_norm/scale', SAME
  j = str(len(parts))
  yield f'{hf}.{j}.layer_norm.weight', f'{ours}/ffn_norm/scale', SAME
  inputs = (('wi_0', 'wi_gate'), ('wi_1', 'wi')) if m.ffn_activation == 'geglu' else (
      ('wi', 'wi'),)
  if switch and _is_sparse(i, m.moe.every):
    yield (f'{hf}.{j}.mlp.router.classifier.weight', f'{ours}/ffn/router/kernel', LINEAR)
    for hf_w, our_w in inputs + (('wo', 'wo'),):
      yield (f'{hf}.{j}.mlp.experts.expert_{{e}}.{hf_w}.weight', f'{ours}/ffn/experts/{our_w}',
             LINEAR)
  else:
    ffn = 'mlp' if switch else 'DenseReluDense'
    for hf_w, our_w in inputs + (('wo', 'wo'),):
      yield f'{hf}.{j}.{ffn}.{hf_w}.weight', f'{ours}/ffn/{our_w}', LINEAR


def tensor_names(c: ml_collections.ConfigDict) -> list[tuple[str, str, Layout]]:
  """Every tensor of a HF checkpoint of config ``c`` (a Switch model if ``model.moe.every``
  > 0, else T5): (HF name, switchmoe path, layout). Expert tensors carry ``{e}`` in the HF
  name; their arrays stack into the leading expert dimension of the switchmoe parameter."""
  m = c.model
  names = [('shared.weight', 'embed/embedding', SAME)]
  if not m.tie_embeddings:
    names.append(('lm_head.weight', 'logits_kernel', LINEAR))
  for stack, layers in (('encoder', m.num_layers),
                        ('decoder', m.num_decoder_layers or m.num_layers)):
    names.append((f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                  f'{stack}/rel_bias/rel_embedding', SAME))
    names.append((f'{stack}.final_layer_norm.weight', f'{stack}/final_norm/scale', SAME))
    for i in range(layers):
      names.extend(_block_names(c, stack, i))
  return names


# Copies of shared.weight that some checkpoints store; read only to check they are copies.
_TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


@dataclasses.dataclass(frozen=True)
class _Source:
  """The HF tensors of one switchmoe parameter: one name, or one per expert (``stacked``:
  they stack into the parameter's leading expert dimension)."""
  names: tuple[str, ...]
  layout: Layout
  stacked: bool


def _sources(tensors: _Tensors, folder: str, c: ml_collections.ConfigDict,
             expected: dict[str, tuple[int, ...]]) -> dict[str, _Source]:
  """{switchmoe path: its HF tensors}, checked against the files' headers before any weight
  is read (but for the stored copies of ``shared.weight``, which are compared with it).

  ``expected``: {switchmoe path: shape} of the model built from ``c``. ValueError naming the
  tensor for one that is missing, misshaped, or maps to nothing.
  """
  import jax
  available = set(tensors)
  sources, used = {}, set()
  for hf_name, path, layout in tensor_names(c):
    if path not in expected:
      raise ValueError(f'{folder}: {hf_name} maps to {path}, which this model lacks')
    stacked = '{e}' in hf_name
    names = [hf_name.format(e=e) for e in range(c.model.moe.num_experts)] if stacked else [
        hf_name]
    # No lm_head: the output goes through the input embedding, unscaled, as HF does.
    names = ['shared.weight' if n == 'lm_head.weight' and n not in available else n
             for n in names]
    for name in names:
      if name not in available:
        raise ValueError(f'{folder}: lacks tensor {name} (for {path})')
      if tensors.shape(name) != tensors.shape(names[0]):
        raise ValueError(f'{folder}: tensor {name} is {tensors.shape(name)}, '
                         f'{names[0]} is {tensors.shape(names[0])}; experts must agree')
    shape = jax.eval_shape(layout.to_ours, jax.ShapeDtypeStruct(tensors.shape(names[0]),
                                                                np.float32)).shape
    shape = (len(names), *shape) if stacked else tuple(shape)
    if shape != tuple(expected[path]):
      raise ValueError(f'{folder}: tensor {hf_name.format(e=0)} gives {path} the shape '
                       f'{shape}; the config needs {tuple(expected[path])}')
    sources[path] = _Source(tuple(names), layout, stacked)
    used.update(names)
  for name in sorted(set(_TIED_COPIES) & available):
    if not np.array_equal(tensors.read(name), tensors.read('shared.weight')):
      raise ValueError(f'{folder}: {name} differs from shared.weight; only copies of it are '
                       'allowed there')
    used.add(name)
  if c.model.tie_embeddings and 'lm_head.weight' in available:
    if not np.array_equal(tensors.read('lm_head.weight'), tensors.read('shared.weight')):
      raise ValueError(f'{folder}: lm_head.weight differs from shared.weight, but '
                       'tie_word_embeddings is true')
    used.add('lm_head.weight')
  unused = sorted(available - used)
  if unused:
    raise ValueError(f'{folder}: {len(unused)} tensor(s) map to nothing in switchmoe, e.g. '
                     f'{unused[0]}')
  missing = sorted(set(expected) - set(sources))
  if missing:
    raise ValueError(f'{folder}: nothing fills the parameter {missing[0]}')
  return sources


def _read(tensors: _Tensors, source: _Source,
          index: tuple[slice, ...] = (slice(None),)) -> np.ndarray:
  """Block ``index`` of one parameter (slices, as `jax.sharding` gives a device's block), as
  float32; of a stacked parameter only the experts in ``index[0]`` are read."""
  if source.stacked:
    return np.stack([source.layout.to_ours(tensors.read(name))[index[1:]]
                     for name in source.names[index[0]]])
  return np.ascontiguousarray(source.layout.to_ours(tensors.read(source.names[0]))[index])


def _place(tensors: _Tensors, source: _Source, shape: tuple[int, ...], sharding):
  """One parameter as a `jax.Array` with ``sharding``, built block by block on this process's
  devices: each distinct block is read once and copied to the devices that hold it, so the
  host holds one block (and the HF tensors it is cut from) at a time."""
  import jax
  blocks: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = tuple((s.start, s.stop, s.step) for s in index)  # slices hash from Python 3.12 only
    blocks.setdefault(key, (index, []))[1].append(device)
  arrays = []
  for index, devices in blocks.values():
    # One copy from the host (never an alias of the block, which is freed before the next
    # is read), the replicas from that device.
    first = jax.device_put(_read(tensors, source, index), devices[0], may_alias=False)
    arrays += jax.block_until_ready([first] + [jax.device_put(first, d) for d in devices[1:]])
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_hf_params(folder: str, mesh=None, rules=None
                   ) -> tuple[dict, ml_collections.ConfigDict]:
  """(params as a pure dict in switchmoe's tree, the validated config) of a HuggingFace
  SwitchTransformers / T5 folder; nothing is written.

  Without ``mesh`` the params are NumPy arrays on the host. With a `jax.sharding.Mesh` (and
  optionally the rules table, `sharding.merge_rules`) they are `jax.Array`s laid out as a run
  on that mesh lays them out (experts over ``expert`` ...), and the whole model is never on
  the host: the tensors are read one parameter at a time, and of each parameter only the
  blocks this process's devices hold (in a multi-process run, each process reads its own).
  """
  from flax import nnx, traverse_util
  from switchmoe import config as config_lib
  from switchmoe import sharding as sharding_lib
  from switchmoe.model import LanguageModel
  folder = os.path.abspath(os.path.expanduser(folder))
  hf = read_hf_config(folder)
  config = config_from_hf(hf, folder)
  config_lib.validate(config)
  abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0))))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  path_of = {'/'.join(map(str, key)): key for key in flat}
  tensors = _Tensors(folder)
  sources = _sources(tensors, folder, config,
                     {path: flat[key].shape for path, key in path_of.items()})
  if mesh is None:
    params = {path_of[p]: _read(tensors, source) for p, source in sources.items()}
  else:
    shardings = traverse_util.flatten_dict(sharding_lib.state_shardings(abstract, mesh, rules))
    params = {path_of[p]: _place(tensors, source, flat[path_of[p]].shape, shardings[path_of[p]])
              for p, source in sources.items()}
  return traverse_util.unflatten_dict(params), config


def load_hf(folder: str, mesh=None, rules=None
            ) -> tuple[TokenModel, ml_collections.ConfigDict]:
  """(model, config) of a HuggingFace SwitchTransformers / T5 folder.

  ``model(encoder_tokens_BxL, decoder_tokens_BxT)`` gives float32 logits [B, T, V] in
  deterministic mode (`TokenModel`), routed as the checkpoint routes; ``config`` is the
  switchmoe config it was built from. With ``mesh`` the weights are streamed onto it (see
  `load_hf_params`) and the model runs there.
  """
  from flax import nnx
  from switchmoe import sharding as sharding_lib
  from switchmoe.model import LanguageModel
  params, config = load_hf_params(folder, mesh, rules)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: LanguageModel(config.model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return TokenModel(nnx.merge(graphdef, state), mesh,
                    rules or sharding_lib.DEFAULT_RULES), config


def hf_config(c: ml_collections.ConfigDict) -> dict:
  """The HF ``config.json`` dict of switchmoe config ``c``; ValueError naming the field for a
  model that HF's SwitchTransformers / T5 cannot express."""
  m, e = c.model, c.model.moe
  if m.arch != 'encoder_decoder':
    raise ValueError(f'model.arch={m.arch!r}: HF SwitchTransformers / T5 are encoder-decoders')
  gated = m.ffn_activation == 'geglu'
  out = {'vocab_size': m.vocab_size, 'd_model': m.d_model, 'd_kv': m.d_kv, 'd_ff': m.d_ff,
         'num_heads': m.num_heads, 'num_layers': m.num_layers,
         'num_decoder_layers': m.num_decoder_layers or m.num_layers,
         'relative_attention_num_buckets': m.relative_attention_num_buckets,
         'relative_attention_max_distance': m.relative_attention_max_distance,
         'dropout_rate': m.dropout_rate, 'layer_norm_epsilon': 1e-6,
         'feed_forward_proj': 'gated-gelu' if gated else 'relu', 'is_gated_act': gated,
         'dense_act_fn': 'gelu_new' if gated else 'relu',
         'tie_word_embeddings': m.tie_embeddings, 'is_encoder_decoder': True,
         'pad_token_id': 0, 'eos_token_id': 1, 'decoder_start_token_id': 0}
  if e.every == 0:
    return {'model_type': 't5', 'architectures': ['T5ForConditionalGeneration'], **out}
  for name, ok, allowed in (
      ('every', e.every in (1, 2), '1 or 2'),
      ('group_size', e.group_size == 0, '0 (HF routes each sequence as one group)'),
      ('expert_capacity', e.expert_capacity > 0, '> 0 (HF has a fixed capacity)'),
      ('router', e.router == 'switch', "'switch'"),
      ('num_shared_experts', e.num_shared_experts == 0, '0'),
      ('bias_update_rate', e.bias_update_rate == 0, '0'),
      ('dispatch', e.dispatch != 'dropless', "'einsum' or 'gather'")):
    if not ok:
      raise ValueError(f'model.moe.{name}={e[name]!r}: HF SwitchTransformers cannot express '
                       f'it; allowed: {allowed}')
  if gated:
    raise ValueError("model.ffn_activation='geglu': HF SwitchTransformers experts are not "
                     "gated; allowed: 'relu'")
  layers = {'encoder': out['num_layers'], 'decoder': out['num_decoder_layers']}
  return {'model_type': 'switch_transformers',
          'architectures': ['SwitchTransformersForConditionalGeneration'], **out,
          'num_experts': e.num_experts, 'expert_capacity': e.expert_capacity,
          **{f'{stack}_sparse_step': e.every for stack in layers},
          **{f'num_sparse_{stack}_layers': n // e.every for stack, n in layers.items()},
          'router_bias': False, 'router_dtype': 'float32', 'router_ignore_padding_tokens': False,
          'router_jitter_noise': e.jitter if e.exploration == 'input_jitter' else 0.0,
          'router_z_loss_coef': e.router_z_loss, 'router_aux_loss_coef': e.load_balance_loss}


def save_hf(params: dict, c: ml_collections.ConfigDict, folder: str) -> int:
  """Writes ``params`` (a pure dict of switchmoe's tree) of config ``c`` as a HF folder:
  ``config.json`` and ``model.safetensors`` (plus ``spiece.model`` if ``data.tokenizer`` is
  one). Returns the number of tensors. ValueError, and nothing written, for an existing
  ``folder``, a model HF cannot express or a parameter with no HF tensor."""
  from flax import traverse_util
  from safetensors.numpy import save_file
  folder = os.path.abspath(os.path.expanduser(folder))
  if os.path.exists(folder):
    raise ValueError(f'{folder}: exists; allowed: a new folder')
  config = hf_config(c)
  flat = {'/'.join(map(str, k)): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}
  tensors, used = {}, set()
  for hf_name, path, layout in tensor_names(c):
    if path not in flat:
      raise ValueError(f'{path}: missing from the parameters (needed for {hf_name})')
    used.add(path)
    if '{e}' in hf_name:
      for i, w in enumerate(flat[path]):
        tensors[hf_name.format(e=i)] = layout.to_hf(w)
    else:
      tensors[hf_name] = layout.to_hf(flat[path])
  if config['model_type'] == 'switch_transformers' and not c.model.tie_embeddings:
    for name in _TIED_COPIES:  # transformers 5 ties nothing in an untied Switch model
      tensors[name] = tensors['shared.weight']
  unused = sorted(set(flat) - used)
  if unused:
    raise ValueError(f'{unused[0]}: no HF SwitchTransformers / T5 tensor holds it')
  os.makedirs(folder)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(folder, _SINGLE), metadata={'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if c.data.tokenizer.endswith('.model') and os.path.isfile(c.data.tokenizer):
    shutil.copy(c.data.tokenizer, os.path.join(folder, 'spiece.model'))
  return len(tensors)


def checkpoint_to_hf(path: str, folder: str) -> int:
  """`save_hf` of a run folder (latest step), checkpoint step or export; returns the number
  of tensors written."""
  import jax
  from switchmoe import checkpoint as checkpoint_lib
  from switchmoe import config as config_lib
  from switchmoe import train
  c = checkpoint_lib.find_config(path)
  config_lib.validate(c)
  hf_config(c)  # refuse before compiling anything
  s = train.make_setup(c, jax.devices()[:1])
  with train.mesh_context(s):
    params, _ = checkpoint_lib.load_params(path, s.abstract_state['params'])
  return save_hf(jax.device_get(params), c, folder)


class TokenModel:
  """A converted `LanguageModel` called on token arrays, deterministically, compiled once per
  shape (under ``mesh`` and ``rules`` when it was loaded onto one).

  ``encoder_tokens_BxL``: int32, 0 = padding. ``decoder_tokens_BxT``: the decoder input
  (start token 0, then the targets shifted right), every position real.
  """

  def __init__(self, model, mesh=None, rules=None):
    import jax
    from flax import nnx
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.rules = mesh, rules
    self._logits = jax.jit(_logits, static_argnums=0)

  def __call__(self, encoder_tokens_BxL, decoder_tokens_BxT) -> np.ndarray:
    import contextlib
    import jax
    import jax.numpy as jnp
    from switchmoe import sharding as sharding_lib
    decoder = jnp.asarray(decoder_tokens_BxT, jnp.int32)
    batch = {'encoder_input_tokens': jnp.asarray(encoder_tokens_BxL, jnp.int32),
             'decoder_input_tokens': decoder,
             'decoder_target_tokens': jnp.ones_like(decoder),
             'decoder_segment_ids': jnp.ones_like(decoder)}
    with contextlib.ExitStack() as stack:
      if self.mesh is not None:
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(sharding_lib.use_rules(self.rules))
      return self._logits(self.graphdef, self.state, batch)


def _logits(graphdef, state, batch):
  from flax import nnx
  logits, _ = nnx.merge(graphdef, state)(batch, deterministic=True)
  return logits
