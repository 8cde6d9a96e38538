"""The training loop: build the mesh and sharded state, resume, step, evaluate, checkpoint.

The train state is a plain pytree ``{'params', 'opt_state', 'step'}``; the model's structure
(an NNX GraphDef) stays static and is merged with the params inside the jitted step. Every
random draw in step n comes from ``fold_in(seed, n)``, and the data iterator's position is
checkpointed, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from switchmoe import config as config_lib
from switchmoe import data as data_lib
from switchmoe import routing, sharding
from switchmoe.checkpoint import Checkpointer, abstract_like
from switchmoe.metrics import MetricWriter, Progress
from switchmoe.model import LanguageModel, loss_and_metrics
from switchmoe.optim import make_optimizer, schedule

State = dict[str, Any]


@dataclasses.dataclass
class Setup:
  """Everything a run compiles against: mesh, rules, model structure and step functions."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any          # key -> State, placed in state_shardings
  train_step: Any    # (State, batch) -> (State, metrics)
  eval_step: Any     # (params, batch) -> summed metrics


def batch_devices(mesh: jax.sharding.Mesh, rules: sharding.Rules) -> int:
  spec = sharding.logical_to_spec(('batch',), mesh.axis_names, rules)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[a] for a in axes]))


def make_setup(config: ml_collections.ConfigDict,
               devices: list[jax.Device] | None = None) -> Setup:
  """Validates ``config`` and builds (without compiling) the run's sharded functions."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
  rules = sharding.merge_rules(config.mesh.rules)
  n = batch_devices(mesh, rules)
  if config.train.batch_size % (n * jax.process_count()):
    raise ValueError(f'train.batch_size={config.train.batch_size} is not divisible by the '
                     f'{n} devices on the batch mesh axes')
  tx = make_optimizer(config.optim, config.train.num_steps)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0))))
  param_shardings = sharding.state_shardings(abstract_params, mesh, rules)

  def init(key: jax.Array) -> State:
    model = LanguageModel(config.model, rngs=nnx.Rngs(params=key))
    params = jax.lax.with_sharding_constraint(nnx.to_pure_dict(nnx.state(model)),
                                              param_shardings)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  with jax.set_mesh(mesh), sharding.use_rules(rules):
    state_shardings = jax.jit(init).lower(jax.random.key(0)).compile().output_shardings
  base_key = jax.random.key(config.seed)
  lr_schedule = schedule(config.optim, config.train.num_steps)

  def train_step(state: State, batch) -> tuple[State, dict]:
    step_key = jax.random.fold_in(base_key, state['step'])

    def loss_fn(params):
      # Rngs are stateful: build them inside the differentiated function's trace.
      rngs = nnx.Rngs(**{name: jax.random.fold_in(step_key, i)
                         for i, name in enumerate(('dropout',) + routing.RNG_STREAMS)})
      return loss_and_metrics(nnx.merge(graphdef, params), batch, deterministic=False,
                              rngs=rngs)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   learning_rate=lr_schedule(state['step']))
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  def eval_step(params, batch) -> dict:
    """Sums over tokens, so that averages over several batches are exact."""
    _, m = loss_and_metrics(nnx.merge(graphdef, params), batch, deterministic=True)
    weight = jnp.sum(batch['decoder_loss_weights'].astype(jnp.float32))
    return {'ce_sum': m['ce'] * weight, 'correct': m['accuracy'] * weight, 'weight': weight,
            'dropped_fraction': m['dropped_fraction']}

  batch_sharding = jax.sharding.NamedSharding(
      mesh, sharding.logical_to_spec(('batch', None), mesh.axis_names, rules))
  return Setup(
      config=config, mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
      state_shardings=state_shardings, batch_sharding=batch_sharding,
      init=jax.jit(init, out_shardings=state_shardings),
      train_step=jax.jit(train_step, out_shardings=(state_shardings, None),
                         donate_argnums=0),
      eval_step=jax.jit(eval_step))


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
  return {'eval/ce': float(totals['ce_sum']) / weight,
          'eval/accuracy': float(totals['correct']) / weight,
          'eval/dropped_fraction': float(totals['dropped_fraction']) / len(batches)}


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  length = config.data.targets_length
  if config.model.arch == 'encoder_decoder':
    length += config.data.inputs_length
  return config.train.batch_size * length


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains to ``config.train.num_steps``, resuming from ``workdir`` if it has checkpoints.

  Returns the metric records logged by this call (also in ``workdir/metrics.jsonl``).
  """
  s = make_setup(config)
  t = config.train
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  per_process = t.batch_size // jax.process_count()
  data_iter = data_lib.make_train_iterator(config, batch_size=per_process,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
  eval_batches = data_lib.make_eval_batches(config, batch_size=per_process,
                                            num_batches=t.eval_batches,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())
  checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=lead)
  records = []
  try:
    with jax.set_mesh(s.mesh), sharding.use_rules(s.rules):
      start = checkpointer.latest_step()
      if start is None:
        state, start = s.init(jax.random.key(config.seed)), 0
      else:
        abstract = abstract_like(jax.eval_shape(s.init, jax.random.key(0)), s.state_shardings)
        state, data_state = checkpointer.restore(start, abstract)
        data_iter.set_state(data_state)
        if lead:
          print(f'Resumed from {checkpointer.directory}/{start}', flush=True)
      progress = Progress(t.num_steps, start, enabled=lead)
      tokens = tokens_per_step(config)
      for step in range(start + 1, t.num_steps + 1):
        state, metrics = s.train_step(state, device_batch(s, next(data_iter)))
        if step == start + 1:  # keep compilation out of the step-time and ETA figures
          jax.block_until_ready(metrics)
          first_step_time = progress.lap(step)
          if lead:
            print(f'Compiled and ran the first step in {first_step_time:.1f} s', flush=True)
        last = step == t.num_steps
        if step % t.log_every == 0 or step % t.eval_every == 0 or last:
          metrics = jax.device_get(metrics)  # waits for the step: timing below is honest
          step_time = progress.lap(step)
          record = {f'train/{k}': v for k, v in metrics.items() if k != 'moe'}
          record['moe'] = metrics['moe']
          record.update({'perf/step_time': step_time, 'perf/tokens_per_sec': tokens / step_time})
          if step % t.eval_every == 0 or last:
            record.update(evaluate(s, state['params'], eval_batches))
            progress.lap(step)  # evaluation time is not training time
          records.append(writer.write(step, record))
          progress.report(step, records[-1], step_time)
        if step % t.checkpoint_every == 0 or last:
          checkpointer.save(step, state, data_iter.get_state(), json.loads(config.to_json()))
    checkpointer.wait()
  finally:
    checkpointer.close()
    writer.close()
    close = getattr(data_iter, 'close', None)
    if close is not None:
      close()
  return records
