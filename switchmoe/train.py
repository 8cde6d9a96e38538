"""The training loop: build the mesh and sharded state, resume, step, evaluate, checkpoint.

The train state is a plain pytree ``{'params', 'opt_state', 'step', 'skipped_steps',
'last_skipped_step'}``; the model's structure (an NNX GraphDef) stays static and is merged
with the params inside the jitted step. ``params`` holds all the model's variables: its
``nnx.Param``s, which alone get gradients and optimizer state, and with
``model.moe.bias_update_rate`` > 0 each router's `routing.ExpertBias`, which the step moves
from its own routing (aux-loss-free balancing). So checkpoints, exports and ``init_from``
carry the bias with the weights it was balanced for. Every random draw in step n comes from
``fold_in(seed, n)``, and the data iterator's position is checkpointed, so a resumed run
repeats the uninterrupted one bit for bit.

A step whose loss or gradient norm is not finite leaves params and optimizer state as they
were and only counts itself (``train.nonfinite='skip'``); with ``'stop'`` the host raises
`NonFiniteError` naming the step at the next log or checkpoint step, before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import config as config_lib
from switchmoe import data as data_lib
from switchmoe import sources
from switchmoe import flops as flops_lib
from switchmoe import routing, sharding
from switchmoe import workdir as workdir_lib
from switchmoe.checkpoint import Checkpointer, abstract_like
from switchmoe.metrics import MetricWriter, Progress
from switchmoe.model import LanguageModel, loss_and_metrics
from switchmoe.optim import clip_by_global_norm, make_optimizer, schedule

State = dict[str, Any]


@dataclasses.dataclass
class Setup:
  """Everything a run compiles against: mesh, rules, model structure and step functions."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  graphdef: nnx.GraphDef
  abstract_state: State  # ShapeDtypeStructs with shardings: the restore target
  batch_sharding: jax.sharding.NamedSharding
  init: Any          # key -> State, placed in the state's shardings (compiled)
  train_step: Any    # (State, batch) -> (State, metrics): `train_step`, jitted
  eval_step: Any     # (params, batch) -> summed metrics: `eval_step`, jitted


def batch_devices(mesh: jax.sharding.Mesh, rules: sharding.Rules) -> int:
  spec = sharding.logical_to_spec(('batch',), mesh.axis_names, rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[a] for a in axes]))


def split_trainable(graphdef: nnx.GraphDef, variables: dict) -> tuple[dict, dict]:
  """(the nnx.Params, every other variable: the expert biases) of a params dict."""
  model = nnx.merge(graphdef, variables)
  return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))


def init_state(key: jax.Array, *, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, param_shardings) -> State:
  """A fresh train state: the model initialised from ``key``, optimizer state, counters."""
  model = LanguageModel(config.model, rngs=nnx.Rngs(params=key),
                        expert_parallel=config.mesh.expert_parallel)
  variables = jax.lax.with_sharding_constraint(nnx.to_pure_dict(nnx.state(model)),
                                               param_shardings)
  zero = jnp.zeros((), jnp.int32)
  return {'params': variables, 'opt_state': tx.init(split_trainable(graphdef, variables)[0]),
          'step': zero, 'skipped_steps': zero, 'last_skipped_step': zero,
          'skipped_in_a_row': zero}


def gradients(state: State, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
              graphdef: nnx.GraphDef) -> tuple[jax.Array, dict, dict, dict]:
  """(loss, metrics, aux, grads) of ``batch``: the first half of `train_step`, with the
  step's dropout and routing draws; ``grads`` has the trainable params' structure."""
  step_key = jax.random.fold_in(jax.random.key(config.seed), state['step'])
  trainable, fixed = split_trainable(graphdef, state['params'])

  def loss_fn(params):
    # Rngs are stateful: build them inside the differentiated function's trace.
    rngs = nnx.Rngs(**{name: jax.random.fold_in(step_key, i)
                       for i, name in enumerate(('dropout',) + routing.RNG_STREAMS)})
    loss, metrics, aux = loss_and_metrics(nnx.merge(graphdef, params, fixed), batch,
                                          deterministic=False, rngs=rngs)
    return loss, (metrics, aux)

  (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  return loss, metrics, aux, grads


def apply_gradients(state: State, loss: jax.Array, metrics: dict, aux: dict, grads: dict, *,
                    config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation) -> tuple[State, dict]:
  """The second half of `train_step`: clip, the optimizer's update, the non-finite guard,
  the expert biases; returns the new state and the step's metrics."""
  trainable, fixed = split_trainable(graphdef, state['params'])
  grad_norm = optax.tree.norm(grads)
  grads = clip_by_global_norm(grads, grad_norm, config.optim.grad_clip)
  updates, opt_state = tx.update(grads, state['opt_state'], trainable)
  params = optax.apply_updates(trainable, updates)
  update_norm = optax.tree.norm(updates)
  # A finite gradient can still overflow into the update (a huge learning rate): such a step
  # is skipped like one with a non-finite loss. The new float32 weights need no check of
  # their own: a finite update norm bounds every update by sqrt(float32 max) ~ 1.8e19, far
  # below half an ulp of float32 max, so finite weights plus it stay finite; that check cost
  # one more pass over all parameters (docs/performance.md, "The update's share of a step").
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                   (params, opt_state), (trainable, state['opt_state']))
  model = nnx.merge(graphdef, params, fixed)
  rate = config.model.moe.bias_update_rate
  if rate:  # a skipped step leaves the biases as they were, like the weights
    model.balance_experts(aux, jnp.where(finite, rate, 0.0))
  step = state['step'] + 1
  skipped = state['skipped_steps'] + (~finite).astype(jnp.int32)
  lr_schedule = schedule(config.optim, config.train.num_steps)
  metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                 update_norm=update_norm, skipped_steps=skipped,
                 learning_rate=lr_schedule(state['step']))
  return {'params': nnx.to_pure_dict(nnx.state(model)), 'opt_state': opt_state, 'step': step,
          'skipped_steps': skipped,
          'last_skipped_step': jnp.where(finite, state['last_skipped_step'], step),
          'skipped_in_a_row': jnp.where(finite, 0, state['skipped_in_a_row'] + 1)}, metrics


def train_step(state: State, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation
               ) -> tuple[State, dict]:
  """One optimizer step on ``batch`` (each feature [batch, length]); returns the new state and
  the step's metrics. A step whose loss, gradient or update is not finite changes neither
  parameters nor optimizer state (nor expert biases) and is counted."""
  return apply_gradients(state, *gradients(state, batch, config=config, graphdef=graphdef),
                         config=config, graphdef=graphdef, tx=tx)


def eval_step(params: dict, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> dict:
  """Deterministic forward pass; sums over target tokens, so that averages over several
  batches are exact."""
  _, m, _ = loss_and_metrics(nnx.merge(graphdef, params), batch, deterministic=True)
  weight = jnp.sum(batch['decoder_loss_weights'].astype(jnp.float32))
  return {'ce_sum': m['ce'] * weight, 'correct': m['accuracy'] * weight, 'weight': weight,
          'dropped_fraction': m['dropped_fraction']}


def make_setup(config: ml_collections.ConfigDict,
               devices: list[jax.Device] | None = None,
               device_bytes: int | None | str = 'own') -> Setup:
  """The run's sharded functions for a validated ``config`` (`config.validate`; `train`
  validates), compiling only the init. ``device_bytes``: what `check_fits` holds one device
  to, ``'own'`` for the devices' own memory, a byte count for a device planned for
  (scripts/plan.py's simulated devices are not the target), None for no check."""
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
  rules = sharding.merge_rules(config.mesh.rules)
  n = batch_devices(mesh, rules)
  # n counts the devices of all processes, so this also splits evenly between processes.
  if config.train.batch_size % n or config.train.batch_size % jax.process_count():
    raise ValueError(f'train.batch_size={config.train.batch_size} is not divisible by the '
                     f'{n} devices on the batch mesh axes ({jax.process_count()} processes)')
  e, n_expert = config.model.moe.num_experts, dict(mesh.shape).get('expert', 1)
  if config.model.moe.every and e % n_expert and n_expert % e:
    raise ValueError(f'model.moe.num_experts={e} and the expert mesh axis ({n_expert}) must '
                     'divide one another')
  if (config.model.moe.every and config.model.moe.dispatch == 'dropless' and e % n_expert
      and config.mesh.expert_parallel == 'shard_map'):
    raise ValueError(f'model.moe.num_experts={e} on an expert mesh axis of {n_expert}: '
                     "dropless with mesh.expert_parallel='shard_map' needs a whole number of "
                     'experts per device')
  tx = make_optimizer(config.optim, config.train.num_steps)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0),
                                           expert_parallel=config.mesh.expert_parallel)))
  param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
  if device_bytes == 'own':
    device = (devices or jax.devices())[0]
    check_fits(config, abstract_params, param_shardings, device_memory(device),
               f'one {device.device_kind} device')
  elif device_bytes is not None:
    check_fits(config, abstract_params, param_shardings, device_bytes, 'the device planned for')
  init = functools.partial(init_state, config=config, graphdef=graphdef, tx=tx,
                           param_shardings=param_shardings)
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    # Compiled once: the optimizer state's shardings are whatever GSPMD chose for it.
    compiled_init = jax.jit(init).lower(jax.random.key(0)).compile()
  state_shardings = compiled_init.output_shardings
  batch_sharding = jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(('batch', None), mesh.axis_names, rules))
  step = functools.partial(train_step, config=config, graphdef=graphdef, tx=tx)
  return Setup(
      config=config, mesh=mesh, rules=rules, graphdef=graphdef, batch_sharding=batch_sharding,
      abstract_state=abstract_like(compiled_init.out_info, state_shardings),
      init=compiled_init,
      train_step=jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=0),
      eval_step=jax.jit(functools.partial(eval_step, graphdef=graphdef)))


def device_memory(device: jax.Device) -> int | None:
  """Bytes one device can hold: its allocator's limit, or on CPU its share of host RAM."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None
  return ram // max(jax.local_device_count(), 1)


def compiled_peak_bytes(compiled) -> int | None:
  """XLA's estimate of a compiled function's peak memory per device: its arguments, outputs
  and temporaries, donated arguments counted once (they alias the outputs they become)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def check_fits(config: ml_collections.ConfigDict, abstract_params, shardings,
               have: int | None, where: str) -> None:
  """Raises ValueError before compiling if one device (``have`` bytes, ``where``) cannot
  even hold its shard of the parameters, their gradients and the optimizer state
  (activations come on top)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  sizes = [(np.prod(sh.shard_shape(x.value.shape if hasattr(x, 'value') else x.shape),
                    dtype=np.float64) * np.dtype(x.dtype).itemsize, path, x)
           for (path, x), sh in zip(leaves, jax.tree.leaves(shardings))]
  # Gradients as large as the parameters; AdamW keeps two moments, Adafactor's factored
  # moments are small next to the weights.
  copies = 2 + (2 if config.optim.name == 'adamw' else 0)
  need = copies * sum(size for size, _, _ in sizes)
  if have is None or need <= have:
    return
  size, path, x = max(sizes, key=lambda item: item[0])
  gib, name = 2.0 ** 30, checkpoint_lib.path_name(path).removesuffix('/value')
  raise ValueError(
      f'model: parameters, gradients and optimizer state need {need / gib:,.2f} GiB per '
      f'device, more than the {have / gib:,.2f} GiB of {where} (the largest, {name} '
      f'{tuple(x.shape)}, is {size / gib:,.2f} GiB per device); allowed: smaller model.* '
      'sizes or more devices on the mesh axes that shard them')


@contextlib.contextmanager
def mesh_context(s: Setup):
  """The mesh and sharding rules to run ``s``'s functions and restore checkpoints under."""
  with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
    yield


def device_batch(s: Setup, local_batch: dict) -> dict:
  """Assembles each process's NumPy batch into global arrays sharded on the batch axes."""
  return {k: jax.make_array_from_process_local_data(s.batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(s: Setup, params, batches: list[dict]) -> dict:
  totals = None
  for batch in batches:
    out = s.eval_step(params, device_batch(s, batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  weight = max(float(totals['weight']), 1.0)
  ce = float(totals['ce_sum']) / weight
  # The paper's quality metric: mean log-likelihood per target token, in nats.
  return {'eval/ce': ce, 'eval/neg_log_perplexity': -ce,
          'eval/accuracy': float(totals['correct']) / weight,
          'eval/dropped_fraction': float(totals['dropped_fraction']) / len(batches)}


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
  """Encoder plus decoder positions of one example."""
  length = config.data.targets_length
  if config.model.arch == 'encoder_decoder':
    length += config.data.inputs_length
  return length


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.train.batch_size * tokens_per_example(config)


class NonFiniteError(RuntimeError):
  """Training met a non-finite loss or gradient with ``train.nonfinite='stop'``."""


# Fields that fix the parameters' shapes or what the run is (its model, optimizer-state tree,
# data and seed). Resuming a workdir with other values is refused; the remaining fields
# (capacity factors, loss weights, dropout, dtypes, dispatch, group size, learning rate,
# num_steps, mesh ...) may change between a run's restarts.
RUN_IDENTITY = ('seed', 'model.arch', 'model.vocab_size', 'model.d_model', 'model.num_layers',
                'model.num_decoder_layers', 'model.num_heads', 'model.d_kv', 'model.d_ff',
                'model.ffn_activation', 'model.tie_embeddings',
                'model.relative_attention_num_buckets', 'model.relative_attention_max_distance',
                'model.moe.num_experts', 'model.moe.every', 'model.moe.router',
                'model.moe.num_shared_experts', 'optim.name', 'data.source', 'data.tokenizer')


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  dataset: str | None = None) -> None:
  """Raises ValueError if ``workdir``'s newest checkpoint holds a run whose `RUN_IDENTITY`
  fields differ or (given ``dataset``, see `sources.dataset_identity`) another dataset.

  The identity is what the checkpoints stored, so a start that saved nothing constrains
  nothing."""
  committed = workdir_lib.committed_run(workdir)
  if committed is None:
    return
  step, stored, run = committed
  old = ml_collections.ConfigDict(stored)
  where = f'--workdir={workdir} holds a run (checkpoint {step})'
  for name in RUN_IDENTITY:
    try:
      was = functools.reduce(lambda c, key: c[key], name.split('.'), old)
    except KeyError:  # written before the field existed
      continue
    now = functools.reduce(lambda c, key: c[key], name.split('.'), config)
    if was != now:
      raise ValueError(f'{name}={now!r}: {where} with {name}={was!r}; allowed: its value '
                       '(to resume that run) or a new --workdir')
  # The rate itself may change on resume, but whether the expert-bias variables exist may not.
  had_bias = old.get('model', {}).get('moe', {}).get('bias_update_rate', 0.0) > 0
  if had_bias != (config.model.moe.bias_update_rate > 0):
    raise ValueError(f'model.moe.bias_update_rate={config.model.moe.bias_update_rate!r}: '
                     f'{where} {"with" if had_bias else "without"} expert biases; allowed: a '
                     f'rate {"> 0" if had_bias else "of 0"} (to resume that run) or a new '
                     '--workdir')
  if dataset is not None and run.get('dataset', dataset) != dataset:
    field = 'data.files' if config.data.source == 'files' else 'data.source'
    raise ValueError(f'{field}: {where} trained on {run["dataset"]}, but this config reads '
                     f'{dataset}; allowed: the same data (to resume that run), or a new '
                     f'--workdir with --config.train.init_from={workdir} to go on from its '
                     'weights with the new data')


def param_filter(spec: str):
  """train.init_from_params -> predicate on names like 'encoder/layers/1/ffn/experts/wi'."""
  if spec == 'all':
    return lambda name: True
  if spec == 'non_expert':  # everything but expert FFNs and routers, e.g. from a dense T5
    return lambda name: not re.search(r'(^|/)(experts|router)/', name)
  return lambda name: re.search(spec, name) is not None


class StopSignals:
  """Turns SIGTERM / SIGINT (preemption, Ctrl-C) into a flag the loop checks after each
  step; a second signal gets the previous handler (Ctrl-C twice interrupts at once)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __enter__(self):
    self.received, self._previous = None, {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def _handle(self, signum, frame) -> None:
    self.received = signal.Signals(signum).name
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, sync: bool) -> bool:
    """Single process: after every step. Several: only at ``sync`` steps (log steps), agreed
    by all processes, so that they all save the same step."""
    if jax.process_count() == 1:
      return self.received is not None
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Profiler:
  """JAX profiler trace of steps [first, first + num) into ``workdir/profile``."""

  def __init__(self, workdir: str, first: int, num: int, *, enabled: bool):
    self.directory = os.path.join(workdir, 'profile')
    self.first, self.last, self.enabled = first, first + num - 1, enabled and num > 0
    self.active = False

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step == self.last:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      print(f'Profiled steps {self.first}-{self.last} into {self.directory}', flush=True)


def check_numerics(state: State, metrics: dict, step: int, start: int,
                   config: ml_collections.ConfigDict) -> None:
  """At log and checkpoint steps: raises NonFiniteError if this run skipped a step under
  ``train.nonfinite='stop'``, skipped ``train.max_skipped_steps`` steps in a row, or if the
  parameters themselves became non-finite."""
  last_skipped = int(state['last_skipped_step'])
  if config.train.nonfinite == 'stop' and last_skipped > start:
    raise NonFiniteError(
        f'non-finite loss, gradients or update at step {last_skipped} (train.nonfinite=stop); '
        f'nothing after step {start} was saved')
  in_a_row = int(state['skipped_in_a_row'])
  if in_a_row >= config.train.max_skipped_steps:
    raise NonFiniteError(
        f'steps {step - in_a_row + 1}-{step} were all skipped (non-finite loss, gradients or '
        f'update; train.max_skipped_steps={config.train.max_skipped_steps}); not saving them: '
        'the newest checkpoint holds the last good state')
  if not np.isfinite(float(metrics['param_norm'])):
    raise NonFiniteError(f'parameters are non-finite after step {step}; not saving them')


def made_progress(state: State, step: int, start: int) -> bool:
  """Whether some step of this run since ``start`` was not skipped: a run whose every step
  was skipped has nothing worth a checkpoint."""
  return int(state['skipped_in_a_row']) < step - start


def perf_metrics(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 step_time: float) -> dict:
  """Tokens/s, step time, model TFLOP/s per device and, where the peak is known, MFU."""
  devices = mesh.devices.size
  flops_per_sec = flops_lib.train_step_flops(config) / step_time / devices
  out = {'perf/step_time': step_time,
         'perf/tokens_per_sec': tokens_per_step(config) / step_time,
         'perf/model_tflops_per_device': flops_per_sec / 1e12}
  peak = config.train.peak_flops or flops_lib.peak_flops(mesh.devices.flat[0].device_kind)
  if peak:
    out['perf/mfu'] = flops_per_sec / peak
  return out


_EXPERT_WEIGHT = re.compile(r'(.*)/ffn/experts/(wi|wi_gate|wo)')


def upcycle(s: Setup, params: dict, path: str) -> tuple[dict, list[str]]:
  """Sparse upcycling (Komatsuzaki et al. 2022) of a fresh Switch model's ``params`` from the
  dense model at ``path`` (a run folder, step or export of this config with
  ``model.moe.every=0``, trained here or converted).

  Every parameter the dense model has is loaded as it is; every expert of a Switch layer
  starts as a copy of that layer's dense FFN; routers, shared experts and expert biases keep
  their fresh init. Returns (params, the names filled from ``path``).
  """
  dense_config = s.config.copy_and_resolve_references()
  dense_config.model.moe.every = 0
  dense_state = nnx.state(nnx.eval_shape(
      lambda: LanguageModel(dense_config.model, rngs=nnx.Rngs(0))))
  target = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      nnx.to_pure_dict(dense_state), sharding.state_shardings(dense_state, s.mesh, s.rules))
  dense, _ = checkpoint_lib.load_params(path, target)
  dense = {checkpoint_lib.path_name(p): x
           for p, x in jax.tree_util.tree_flatten_with_path(dense)[0]}
  filled = []

  def fill(key_path, x):
    name = checkpoint_lib.path_name(key_path)
    expert = _EXPERT_WEIGHT.fullmatch(name)
    source = f'{expert[1]}/ffn/{expert[2]}' if expert else name
    if source not in dense:
      return x
    filled.append(name)
    copies = jax.jit(lambda w: jnp.broadcast_to(w, x.shape).astype(x.dtype),
                     out_shardings=x.sharding)
    return copies(dense[source])

  return jax.tree_util.tree_map_with_path(fill, params), sorted(filled)


def restore_or_init(s: Setup, checkpointer: Checkpointer, data_iter, lead: bool
                    ) -> tuple[State, int]:
  """(state, step): the workdir's newest checkpoint that restores, else a fresh init (plus
  ``train.init_from`` params)."""
  config = s.config
  restored = checkpointer.restore_newest(s.abstract_state, lead=lead)
  if restored is not None:
    start, state, data_state = restored
    data_iter.set_state(data_state)
    if lead:
      print(f'Resumed from {checkpointer.directory}/{start}', flush=True)
    return state, start
  state = s.init(jax.random.key(config.seed))
  if config.train.init_from_params == 'upcycle':
    state['params'], names = upcycle(s, state['params'], config.train.init_from)
    if lead:
      print(f'Upcycled {len(names)} of {len(jax.tree.leaves(state["params"]))} parameter '
            f'arrays from the dense model {config.train.init_from}', flush=True)
  elif config.train.init_from:
    # A model trained without expert biases starts its own at zero.
    state['params'], names = checkpoint_lib.load_params(
        config.train.init_from, state['params'], param_filter(config.train.init_from_params),
        optional=lambda name: name.endswith('/expert_bias'))
    if lead:
      total = len(jax.tree.leaves(state['params']))
      print(f'Initialised {len(names)} of {total} parameter arrays from '
            f'{config.train.init_from}', flush=True)
  return state, 0


def process_0_first(fn):
  """``fn()`` on process 0 before the others go on, its error raised on every process (the
  others raise ``RuntimeError``): none waits at a barrier that process 0 never reaches."""
  error, result = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised below, after the barrier
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is None and np.any(failed):
      raise RuntimeError('process 0 failed to start; its output says why')
  if error is not None:
    raise error
  return result


def open_data(config: ml_collections.ConfigDict, stack: contextlib.ExitStack):
  """(train iterator, eval batches) for this process; raises ValueError for bad data fields."""
  t = config.train
  # Process 0 builds a missing 'stdlib' / 'files' dataset first: on a shared filesystem the
  # others then find it ready instead of all writing it at once.
  process_0_first(lambda: sources.builder_for(config))
  per_process = t.batch_size // jax.process_count()
  data_iter = data_lib.make_train_iterator(config, batch_size=per_process,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
  close = getattr(data_iter, 'close', None)
  if close is not None:
    stack.callback(close)
  eval_batches = data_lib.make_eval_batches(config, batch_size=per_process,
                                            num_batches=t.eval_batches,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())
  return data_iter, eval_batches


class StoppedDuringStartup(Exception):
  """SIGTERM / SIGINT arrived before the first step: nothing to save (exit 0)."""


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains to ``config.train.num_steps``, resuming from ``workdir`` if it has checkpoints.

  Everything that can be checked (config fields, workdir path, lock and compatibility, data
  fields, ``init_from`` path, memory, mesh) raises before compiling: ValueError for bad input,
  `workdir.LockHeld` if another process trains in ``workdir``. SIGTERM / SIGINT end the run
  after the current step with a checkpoint (during start-up: `StoppedDuringStartup`). Returns
  the metric records logged by this call (also in ``workdir/metrics.jsonl``).
  """
  config_lib.validate(config)
  t = config.train
  if t.init_from:
    checkpoint_lib.find_params(t.init_from)
  lead = jax.process_index() == 0
  records = []
  with contextlib.ExitStack() as stack:
    # First, so that a preemption during the slow start-up is answered, not fatal.
    signals = stack.enter_context(StopSignals())

    def startup_point():
      if signals.received:
        raise StoppedDuringStartup(signals.received)

    workdir = workdir_lib.check_path(workdir)
    process_0_first(lambda: stack.enter_context(workdir_lib.Lock(workdir)))
    check_workdir(config, workdir)
    data_iter, eval_batches = open_data(config, stack)
    dataset = sources.dataset_identity(config)
    check_workdir(config, workdir, dataset)
    startup_point()
    s = make_setup(config)
    startup_point()
    if lead:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:  # for people; not the identity
        f.write(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, keep_period=t.keep_period)
    stack.callback(checkpointer.close)
    stack.enter_context(mesh_context(s))
    state, start = restore_or_init(s, checkpointer, data_iter, lead)
    startup_point()
    writer = MetricWriter(workdir, start=start, enabled=lead)
    stack.callback(writer.close)
    profiler = Profiler(workdir, start + 2, t.profile_steps, enabled=lead)
    stack.callback(profiler.stop)
    progress = Progress(t.num_steps, start, enabled=lead)
    config_json = json.loads(config.to_json())
    run_json = {'dataset': dataset}
    for step in range(start + 1, t.num_steps + 1):
      profiler.before(step)
      state, metrics = s.train_step(state, device_batch(s, next(data_iter)))
      profiler.after(step, state)
      checkpointer.check_for_errors()  # a failed async save stops the run now
      if step == start + 1:  # keep compilation out of the step-time and ETA figures
        jax.block_until_ready(metrics)
        first_step_time = progress.lap(step)
        if lead:
          print(f'Compiled and ran the first step in {first_step_time:.1f} s', flush=True)
      last, evaluate_now = step == t.num_steps, step % t.eval_every == 0
      log = step % t.log_every == 0 or evaluate_now or last
      stop = signals.should_stop(sync=log)
      if log:
        metrics = jax.device_get(metrics)  # waits for the step: timing below is honest
        check_numerics(state, metrics, step, start, config)
        step_time = progress.lap(step)
        record = {f'train/{k}': v for k, v in metrics.items() if k != 'moe'}
        record['moe'] = metrics['moe']
        if step > start + 1:  # the first step's time is mostly compilation
          record.update(perf_metrics(config, s.mesh, step_time))
        if evaluate_now or last:
          record.update(evaluate(s, state['params'], eval_batches))
          progress.lap(step)  # evaluation time is not training time
        records.append(writer.write(step, record))
        progress.report(step, records[-1], step_time)
      if step % t.checkpoint_every == 0 or last or stop:
        check_numerics(state, jax.device_get(metrics), step, start, config)
        if made_progress(state, step, start):
          checkpointer.save(step, state, data_iter.get_state(), config_json, run_json)
        elif last:
          raise NonFiniteError(f'all {step - start} steps of this run were skipped (non-finite '
                               'loss, gradients or update); nothing was saved')
      if stop:
        checkpointer.wait()
        if lead:
          saved = checkpointer.latest_step()
          print(f'Stopped by {signals.received or "another process"} after step {step}; '
                + (f'saved {checkpointer.directory}/{saved}' if saved == step else
                   'every step since the start was skipped, so nothing new was saved')
                + '. Run the same command to resume.', flush=True)
        break
    else:  # not stopped by a signal, which has said its own last word
      checkpointer.wait()
      if lead:
        print(f'Done: checkpoint {checkpointer.directory}/{checkpointer.latest_step()}, metrics '
              f'{workdir}/metrics.jsonl, TensorBoard events {workdir}/events.out.tfevents.*',
              flush=True)
  return records
