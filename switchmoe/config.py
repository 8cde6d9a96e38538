"""The full set of config fields with defaults, and their validation.

Files in ``configs/`` start from `default_config()` and change what they need; any field can
be overridden on the command line (``--config.model.moe.num_experts=16``). Tuples such as
``mesh.shape`` are overridden as ``--config.mesh.shape='(2,4)'``.
"""

from __future__ import annotations

import difflib
import math
import re

import ml_collections

OPTIMIZERS = ('adafactor', 'adamw')
SCHEDULES = ('rsqrt', 'cosine', 'constant')
DTYPES = ('float32', 'bfloat16')
NONFINITE = ('skip', 'stop')
OBJECTIVES = {'encoder_decoder': ('span_corruption', 'prefix_lm', 'supervised'),
              'decoder': ('causal_lm', 'prefix_lm')}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.arch = 'encoder_decoder'
  m.vocab_size = 384           # >= tokenizer vocab (359 for bytes); a multiple of 128
  m.d_model = 128
  m.num_layers = 4             # encoder layers (and decoder layers, unless set below)
  m.num_decoder_layers = 0     # 0: same as num_layers
  m.num_heads = 4
  m.d_kv = 32
  m.d_ff = 512                 # hidden size of dense FFNs and of each expert
  m.ffn_activation = 'geglu'   # 'relu' (classic T5) or 'geglu' (T5.1.1, Switch-Base)
  m.tie_embeddings = False
  m.dropout_rate = 0.0
  m.relative_attention_num_buckets = 32
  m.relative_attention_max_distance = 128
  m.init_scale = 0.1           # SW §2.3: s = 0.1 instead of 1.0
  m.dtype = 'float32'          # activation dtype; parameters are always float32
  m.remat = 'none'             # recompute in the backward pass: 'none' | 'full' | 'save_dots'
                               # (keep unbatched matmul outputs) | 'save_all_dots'
  m.remat_blocks = 'all'       # which blocks: 'all' | 'moe' (Switch blocks) | 'dense'

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 8
  e.every = 2                  # every 2nd FFN is a Switch layer; 0 = dense (T5 baseline)
  e.group_size = 256           # tokens per routing group (capped at the batch's tokens);
                               # 0: each sequence is one group
  e.capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.min_capacity = 4
  e.expert_capacity = 0        # > 0: this many slots per expert per group in training and
                               # evaluation (HF checkpoints' expert_capacity); 0: from the factors
  e.load_balance_loss = 0.01   # alpha
  e.router_z_loss = 0.001
  e.jitter = 0.0               # epsilon of exploration='input_jitter' (SW App. C: 0.01)
  e.expert_dropout = 0.0       # dropout inside experts (0.4 when fine-tuning, SW §4)
  e.router_dtype = 'float32'   # selective precision
  e.router = 'switch'          # 'switch' (top-1) | 'topk' | 'experts_choose'
  e.num_selected = 2           # k for 'topk' (k=2: the paper's MoE-Base)
  e.renormalize_gates = True   # 'topk': the k gates sum to 1 (Mesh TF, GShard)
  e.second_policy = 'all'      # 'topk': 'all' | 'random' (keep w.p. min(1, g2/threshold))
  e.second_threshold = 0.2
  e.capacity_scales_with_k = False  # t5x does not scale capacity with k
  e.batch_prioritized = False  # BPR: confident tokens take capacity first (encoder only)
  e.ntlb_rounds = 0            # 'switch': no-token-left-behind re-routing rounds (SW App. B)
  e.exploration = 'argmax'     # | 'sample_softmax' | 'input_dropout' | 'input_jitter' (SW T.11)
  e.router_input_dropout = 0.1  # rate for exploration='input_dropout'
  e.importance_loss = 0.0      # GShard / V-MoE importance loss weight
  e.dispatch = 'auto'          # 'einsum' | 'gather' | 'dropless' (no capacity); auto: einsum on
                               # TPU or an expert mesh axis, else gather (dispatch.resolve)
  e.dropless_impl = 'auto'     # dropless rows: 'ragged_dot' | 'bucketed' (padded buffers); auto:
                               # ragged_dot on TPU, else bucketed (dispatch.uses_buckets)
  e.bias_update_rate = 0.0     # aux-loss-free balancing: bias step per train step (DeepSeek 0.001)
  e.num_shared_experts = 0     # always-on experts per Switch layer (DeepSeekMoE); 0 = none

  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'          # 'stdlib' (embedded corpus) | 'files' | a TFDS name, 'c4/en:3.0.1'
  d.files = ''                 # source='files': comma-separated globs of .txt/.jsonl(.gz) files
  d.dataset_name = ''          # source='files': TFDS config name; '' = files_<fingerprint>
  d.data_dir = ''              # '' = $SWITCHMOE_DATA_DIR or ~/.cache/switchmoe/tfds
  d.text_field = 'text'        # the feature (or .jsonl key) holding each document's text
  d.train_split = 'train'
  d.eval_split = 'validation'  # lm1b has none: use 'test'
  d.tokenizer = 'byte'         # 'byte' | path to a SentencePiece .model (100 extra ids appended)
  d.objective = 'span_corruption'  # encoder_decoder: | 'prefix_lm' | 'supervised' (a task's
                               # input -> target pairs); decoder: 'causal_lm' | 'prefix_lm'
  d.inputs_field = 'inputs'    # objective='supervised': the features (or .jsonl keys) holding
  d.targets_field = 'targets'  # each example's input and target text
  d.inputs_length = 128
  d.targets_length = 32
  d.noise_density = 0.15
  d.mean_noise_span_length = 3.0
  d.num_workers = 0

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 300
  t.batch_size = 16            # global batch, split over the batch mesh axes and processes
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.checkpoint_every = 100     # asynchronous saves; also saved at the end and on SIGTERM
  t.keep_checkpoints = 3       # newest checkpoints kept ...
  t.keep_period = 0            # ... plus every step divisible by this (0 = none)
  t.nonfinite = 'skip'         # non-finite loss or gradients: 'skip' the update, or 'stop'
  t.max_skipped_steps = 20     # 'skip': stop the run (exit 1) after this many in a row
  t.init_from = ''             # fine-tune: a run folder, checkpoint step or export to load
  t.init_from_params = 'all'   # which of its params: 'all', 'non_expert', a path regex, or
                               # 'upcycle': a dense model's FFNs copied into every expert
  t.profile_steps = 0          # trace this many steps after the first into workdir/profile
  t.peak_flops = 0.0           # per-device peak FLOP/s for MFU; 0 = by device kind

  c.optim = o = ml_collections.ConfigDict()
  o.name = 'adafactor'
  o.learning_rate = 0.01       # peak learning rate
  o.schedule = 'rsqrt'         # T5: constant for warmup_steps, then 1/sqrt(step) decay
  o.warmup_steps = 10_000
  o.weight_decay = 0.0
  o.grad_clip = 0.0            # global-norm clipping; 0 = off

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)       # -1: all remaining devices
  c.mesh.axes = ('data', 'expert')
  c.mesh.expert_parallel = 'gspmd'  # 'gspmd' (constraints) | 'shard_map' (explicit all_to_all;
  #                                   dropless: ragged_all_to_all, padded all_to_all on CPU)
  c.mesh.rules = ()            # overrides of sharding.DEFAULT_RULES: (('embed', 'fsdp'), ...)
  return c


def finetune_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Switch Transformer fine-tuning setup (SW §4, Table 4), in place: dropout 0.1 outside
  the experts and 0.4 inside them, Adafactor at a constant 1e-4, on a task's input -> target
  pairs (``data.objective='supervised'``) read from local .jsonl files (``data.files``, with
  ``data.inputs_field`` / ``targets_field``; set them, and ``train.init_from``)."""
  c.model.dropout_rate = 0.1
  c.model.moe.expert_dropout = 0.4
  c.optim.name, c.optim.schedule = 'adafactor', 'constant'
  c.optim.learning_rate, c.optim.warmup_steps = 1e-4, 0
  c.data.source, c.data.objective = 'files', 'supervised'
  return c


def base_size(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """T5-Base sizes and the paper's pretraining setup (SW Table 9, T5X defaults), in place.

  d_model 768, GEGLU d_ff 2048, 12 heads of 64, 12 + 12 layers; span corruption at
  512 / 114 tokens; Adafactor, 10k constant warmup at 0.01 then 1/sqrt decay; bfloat16.
  The data stay the embedded corpus so the config runs anywhere; the paper's C4 and T5
  vocabulary are ``--config.data.source=c4/en:3.0.1 --config.data.tokenizer=<t5 .model>``
  with a prepared ``data.data_dir`` (README, Data).
  """
  m = c.model
  m.vocab_size = 32128         # T5's SentencePiece vocabulary size (padded)
  m.d_model, m.d_ff, m.d_kv, m.num_heads, m.num_layers = 768, 2048, 64, 12, 12
  m.ffn_activation = 'geglu'
  m.dtype = 'bfloat16'
  c.data.inputs_length, c.data.targets_length = 512, 114
  c.train.batch_size = 256
  c.train.num_steps = 100_000
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 100, 1000, 2000
  c.optim.name, c.optim.schedule = 'adafactor', 'rsqrt'
  c.optim.learning_rate, c.optim.warmup_steps = 0.01, 10_000
  return c


def _choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r}: not an option; allowed: '
                     f'{", ".join(map(repr, allowed))}')


def _positive(name: str, value) -> None:
  if not value > 0:
    raise ValueError(f'{name}={value!r}: must be > 0')


def _validate_routing(e: ml_collections.ConfigDict, arch: str) -> None:
  """Router / dispatch combinations (model.moe.*)."""
  from switchmoe.dispatch import DISPATCHES, DROPLESS_IMPLS
  from switchmoe.routing import EXPLORATION, ROUTERS, SECOND_POLICIES
  _choice('model.moe.router', e.router, ROUTERS)
  _choice('model.moe.dispatch', e.dispatch, DISPATCHES)
  _choice('model.moe.dropless_impl', e.dropless_impl, DROPLESS_IMPLS)
  _choice('model.moe.exploration', e.exploration, EXPLORATION)
  _choice('model.moe.second_policy', e.second_policy, SECOND_POLICIES)
  if e.router == 'topk' and not 1 <= e.num_selected <= e.num_experts:
    raise ValueError(f'model.moe.num_selected={e.num_selected}: must be in [1, num_experts]')
  if e.batch_prioritized and arch == 'decoder':
    raise ValueError('model.moe.batch_prioritized=True: BPR lets later tokens take capacity '
                     'from earlier ones, which leaks the future in a causal decoder; it applies '
                     'to encoder layers only, so it needs model.arch="encoder_decoder"')
  if e.batch_prioritized and e.router == 'experts_choose':
    raise ValueError('model.moe.batch_prioritized=True: only for tokens-choose routers '
                     '(switch, topk)')
  if e.dispatch == 'dropless' and e.router == 'experts_choose':
    raise ValueError('model.moe.dispatch="dropless": needs a tokens-choose router (switch, '
                     'topk); experts_choose is capacity-bound by definition')
  if e.ntlb_rounds and e.router != 'switch':
    raise ValueError(f'model.moe.ntlb_rounds={e.ntlb_rounds}: only for router="switch"')
  # Input jitter and dropout act on the router input, which every router has.
  if e.exploration == 'sample_softmax' and e.router != 'switch':
    raise ValueError(f'model.moe.exploration={e.exploration!r}: only for router="switch"')
  if e.jitter > 0 and e.exploration != 'input_jitter':
    raise ValueError(f'model.moe.jitter={e.jitter}: no effect with exploration='
                     f'{e.exploration!r}; allowed: 0.0, or exploration="input_jitter"')
  if e.exploration == 'input_jitter' and e.jitter <= 0:
    raise ValueError('model.moe.exploration="input_jitter": set model.moe.jitter > 0 '
                     '(SW App. C uses 0.01)')
  if e.exploration == 'input_dropout' and not 0 < e.router_input_dropout < 1:
    raise ValueError(f'model.moe.router_input_dropout={e.router_input_dropout}: must be in '
                     '(0, 1) for exploration="input_dropout"')
  _at_least('model.moe.bias_update_rate', e.bias_update_rate, 0)
  _at_least('model.moe.num_shared_experts', e.num_shared_experts, 0)
  if e.bias_update_rate and e.router == 'experts_choose':
    raise ValueError(f'model.moe.bias_update_rate={e.bias_update_rate}: only for tokens-choose '
                     'routers (switch, topk)')
  if e.bias_update_rate and e.exploration == 'sample_softmax':
    raise ValueError(f'model.moe.bias_update_rate={e.bias_update_rate}: the bias steers the '
                     'argmax, which exploration="sample_softmax" replaces; use another '
                     'exploration')


def unknown_field_message(path: str, value, known) -> str:
  """``path=value: unknown field (did you mean x?); allowed: a, b`` for a misspelt field."""
  name = path.rsplit('.', 1)[-1]
  close = difflib.get_close_matches(name, list(known), n=1)
  hint = f' (did you mean {close[0]}?)' if close else ''
  return f'{path}={value!r}: unknown field{hint}; allowed: {", ".join(sorted(known))}'


def _type_name(reference) -> str:
  return {bool: 'True or False', int: 'an int', float: 'a number', str: 'a string',
          tuple: 'a tuple'}.get(type(reference), type(reference).__name__)


def _has_type(value, reference) -> bool:
  if isinstance(reference, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(reference, bool)
  if isinstance(reference, float):
    return isinstance(value, (int, float))
  if isinstance(reference, tuple):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(reference))


def check_fields(c: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
                 prefix: str = '') -> None:
  """Every field of ``c`` exists in `default_config()` with the same type, and none is missing.

  Command-line overrides are checked by ml_collections; this catches config files and
  programmatic configs (a misspelt ``c.train.num_step = 10`` silently adds a field).
  """
  reference = default_config() if reference is None else reference
  for key in c.keys():
    path, value = f'{prefix}{key}', c[key]
    if key not in reference:
      raise ValueError(unknown_field_message(path, value, reference.keys()))
    ref = reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f'{path}={value!r}: must be a section; allowed: its fields '
                         f'{", ".join(sorted(ref.keys()))}')
      check_fields(value, ref, f'{path}.')
    elif not _has_type(value, ref):
      raise ValueError(f'{path}={value!r}: wrong type {type(value).__name__}; allowed: '
                       f'{_type_name(ref)}')
  for key in reference.keys():
    if key not in c:
      raise ValueError(f'{prefix}{key}: missing; allowed: {_type_name(reference[key])} '
                       f'(default {reference[key]!r})')


def _at_least(name: str, value, low) -> None:
  if not value >= low:
    raise ValueError(f'{name}={value!r}: must be >= {low}')


def _check_groups(c: ml_collections.ConfigDict) -> None:
  """Each stack with a Switch layer splits a global batch's tokens into whole groups."""
  e, m, t, d = c.model.moe, c.model, c.train, c.data
  stacks = [('decoder', 'data.targets_length', d.targets_length,
             m.num_decoder_layers or m.num_layers)]
  if m.arch == 'encoder_decoder':
    stacks.append(('encoder', 'data.inputs_length', d.inputs_length, m.num_layers))
  for stack, length_name, length, layers in stacks:
    tokens = t.batch_size * length
    if e.group_size and layers >= e.every and tokens % min(e.group_size, tokens):
      raise ValueError(f'model.moe.group_size={e.group_size}: does not divide the {tokens} '
                       f'{stack} tokens of a batch (train.batch_size * {length_name}); '
                       f'allowed: a divisor of {tokens}')


def _validate_training(c: ml_collections.ConfigDict) -> None:
  """The train and optim sections, the seed, mesh entries and routing groups."""
  t, o = c.train, c.optim
  _at_least('seed', c.seed, 0)
  _choice('train.nonfinite', t.nonfinite, NONFINITE)
  for name, value, low in (('train.eval_batches', t.eval_batches, 1),
                           ('train.max_skipped_steps', t.max_skipped_steps, 1),
                           ('train.keep_checkpoints', t.keep_checkpoints, 1),
                           ('train.keep_period', t.keep_period, 0),
                           ('train.profile_steps', t.profile_steps, 0),
                           ('train.peak_flops', t.peak_flops, 0),
                           ('optim.warmup_steps', o.warmup_steps, 0),
                           ('optim.weight_decay', o.weight_decay, 0),
                           ('optim.grad_clip', o.grad_clip, 0),
                           ('model.num_decoder_layers', c.model.num_decoder_layers, 0)):
    _at_least(name, value, low)
  if t.init_from_params == 'upcycle' and not (t.init_from and c.model.moe.every > 0):
    raise ValueError("train.init_from_params='upcycle': copies a dense model's FFNs into the "
                     'experts of a Switch model; needs train.init_from (the dense model) and '
                     'model.moe.every > 0')
  if t.init_from_params not in ('all', 'non_expert', 'upcycle'):
    try:
      re.compile(t.init_from_params)
    except re.error as err:
      raise ValueError(f'train.init_from_params={t.init_from_params!r}: bad regex ({err}); '
                       "allowed: 'all', 'non_expert', 'upcycle' or a regular expression") from None
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in c.mesh.shape):
    raise ValueError(f'mesh.shape={tuple(c.mesh.shape)!r}: entries must be ints; allowed: '
                     'positive sizes and at most one -1')
  if not all(isinstance(a, str) for a in c.mesh.axes):
    raise ValueError(f'mesh.axes={tuple(c.mesh.axes)!r}: entries must be axis names')
  if c.model.moe.every > 0:
    _check_groups(c)


def _leaves(c: ml_collections.ConfigDict, prefix: str = ''):
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field; cheap, runs before any compilation."""
  check_fields(c)
  for name, value in _leaves(c):
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'{name}={value!r}: must be finite')
  # Allowed values come from the modules that implement them.
  from switchmoe.layers import ACTIVATIONS
  from switchmoe.model import ARCHS, REMAT_BLOCKS, REMAT_POLICIES
  from switchmoe.sharding import EXPERT_PARALLEL
  m, e, d, o = c.model, c.model.moe, c.data, c.optim
  _choice('model.arch', m.arch, ARCHS)
  if d.objective not in OBJECTIVES[m.arch]:
    raise ValueError(f'data.objective={d.objective!r}: not an option for model.arch={m.arch!r}; '
                     f'allowed: {", ".join(map(repr, OBJECTIVES[m.arch]))}')
  _choice('model.dtype', m.dtype, DTYPES)
  _choice('model.moe.router_dtype', e.router_dtype, DTYPES)
  _choice('model.ffn_activation', m.ffn_activation, ACTIVATIONS)
  _choice('model.remat', m.remat, REMAT_POLICIES)
  _choice('model.remat_blocks', m.remat_blocks, REMAT_BLOCKS)
  _choice('optim.name', o.name, OPTIMIZERS)
  _choice('optim.schedule', o.schedule, SCHEDULES)
  for name in ('model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads',
               'model.d_kv', 'model.d_ff', 'model.init_scale',
               'data.inputs_length', 'data.targets_length', 'train.num_steps',
               'train.batch_size', 'train.log_every', 'train.eval_every',
               'train.checkpoint_every'):
    section, *rest = name.split('.')
    value = c[section]
    for key in rest:
      value = value[key]
    _positive(name, value)
  _positive('optim.learning_rate', o.learning_rate)
  if e.every < 0:
    raise ValueError(f'model.moe.every={e.every}: must be >= 0 (0 = dense)')
  _at_least('model.moe.group_size', e.group_size, 0)
  if e.every > 0:
    _positive('model.moe.num_experts', e.num_experts)
    _positive('model.moe.capacity_factor', e.capacity_factor)
    _positive('model.moe.eval_capacity_factor', e.eval_capacity_factor)
    if e.min_capacity < 0:
      raise ValueError(f'model.moe.min_capacity={e.min_capacity}: must be >= 0')
    _at_least('model.moe.expert_capacity', e.expert_capacity, 0)
    if e.expert_capacity and e.dispatch == 'dropless':
      raise ValueError(f'model.moe.expert_capacity={e.expert_capacity}: no effect with '
                       'dispatch="dropless", which has no capacity; allowed: 0')
    if not 0.0 <= e.jitter < 1.0:
      raise ValueError(f'model.moe.jitter={e.jitter}: must be in [0, 1)')
    for name in ('load_balance_loss', 'router_z_loss', 'importance_loss'):
      _at_least(f'model.moe.{name}', e[name], 0)
    _validate_routing(e, m.arch)
  for name, rate in (('model.dropout_rate', m.dropout_rate),
                     ('model.moe.expert_dropout', e.expert_dropout)):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'{name}={rate}: must be in [0, 1)')
  _choice('mesh.expert_parallel', c.mesh.expert_parallel, EXPERT_PARALLEL)
  if len(tuple(c.mesh.shape)) != len(tuple(c.mesh.axes)):
    raise ValueError(f'mesh.shape {tuple(c.mesh.shape)} and mesh.axes {tuple(c.mesh.axes)} '
                     'differ in length')
  _validate_training(c)
