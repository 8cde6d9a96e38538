"""Benchmark the Switch layer and whole train steps, against dense twins in the same process.

  python scripts/benchmark.py --suite=layer [--tokens=4096] [--d_model=256] [--d_ff=1024]
      [--experts=8,32] [--dispatch=einsum,gather,dropless,dropless:ragged_dot] [--group_sizes=1024]
      [--capacity_factor=1.25] [--dtype=float32] [--repeats=15] [--hf] [--json=FILE]
  python scripts/benchmark.py --suite=step [--cases t5_tiny switch_tiny ...] [--steps=10]
      [--batch_size=0] [--set=a.b=v,...] [--json=FILE]

``layer``: forward + backward of one Switch layer (router, aux losses, dispatch, experts,
combine) for each dispatch x number of experts x routing group size (``dropless:IMPL`` forces
model.moe.dropless_impl; plain ``dropless`` is ``auto``), against a dense FFN with
the same FLOPs per token (the active compute of top-1 routing). The cases of one (E, group
size) are timed round-robin with the dense FFN, ``--repeats`` rounds, so drift on a shared
machine hits them all alike; each figure is a median. ``x floor`` divides by the roofline floor
max(CF x dense matmul FLOPs at the matmul rate, expert-weight bytes at the memory bandwidth),
both rates measured in this process (CF = 1 for dropless). ``max load`` is the busiest
expert's share of the tokens over the mean share (1 = balanced), which sets dropless's buffers.
Each E also times ``experts_balanced``: the experts alone on a perfectly balanced buffer of the
same tokens, the least any dispatch running per-expert matmuls can cost on this device; and
``router``: the layer's routing alone (router matmul, softmax, slot assignment, aux losses and
diagnostics, forward + backward), its share of every dispatch's time (no floor). ``--hf``
adds HF transformers' Switch layer (``hf_sparse_mlp``: SwitchTransformersSparseMLP, in
PyTorch, with this layer's capacity per group) and its dense FFN (``hf_dense``) to the same
rounds; ``x own dense`` is each layer over its own framework's dense FFN.

``step``: full training steps (`switchmoe.train.train_step`, the optimizer included) of
config files on synthetic batches of the configured shapes: step time (median), tokens/s,
MFU where the device's peak is known, compile time, peak memory, and the bytes each device
receives through collectives per step (``comm MiB``, by kind in ``collective_bytes``), and
``update ms``: the step's second half alone (`switchmoe.train.apply_gradients`: clipping, the
optimizer's update, the non-finite guard), whose cost grows with the parameters, not the
tokens, so that it weighs most in a many-expert model at a small batch. A case
is a config name in configs/, optionally with overrides after a colon, comma-separated:
``switch_base:model.moe.num_experts=64,model.remat=full``; cases are separated by spaces.
The first case whose ``model.moe.every`` is 0 is the dense reference of ``x dense``. Meshes
come from the config (``--set=mesh.shape=(2,4),mesh.axes=('data','expert')``); on a CPU,
set JAX_NUM_CPU_DEVICES first to simulate devices.

Peak memory is XLA's compiled estimate (arguments + outputs + temporaries - aliased), the same
on every platform; accelerators also report the allocator's peak in ``device_peak_bytes``.
``--json`` writes one JSON record per case (one per line), rewritten after each case so that
a run cut short keeps what it measured. A step case that fails (out of memory, say) is recorded
with its ``error`` and the others still run; the script then exits 1. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchmoe import config as config_lib
from switchmoe import dispatch as dispatch_lib
from switchmoe import routing, train
from switchmoe.dispatch import DISPATCHERS, DISPATCHES, DROPLESS_IMPLS
from switchmoe.layers import Experts, FeedForward
from switchmoe.main import load_config
from switchmoe.moe import MoeConfig, MoeLayer, routing_groups
from switchmoe.optim import make_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def environment() -> dict:
  """What every record says about where it ran."""
  device = jax.devices()[0]
  try:
    git = lambda *a: subprocess.run(['git', *a], cwd=REPO, text=True, capture_output=True,
                                    check=True).stdout.strip()
    # A run of uncommitted code says so: its numbers belong to no commit.
    commit = git('rev-parse', '--short', 'HEAD') + ('+dirty' if git('status', '--porcelain',
                                                                    '--untracked-files=no')
                                                   else '')
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'devices': jax.device_count(), 'jax': jax.__version__, 'commit': commit,
          'host': platform.node(), 'cpus': os.cpu_count()}


def block(tree):
  return jax.block_until_ready(tree)


def time_once(fn, *args) -> float:
  start = time.perf_counter()
  block(fn(*args))
  return time.perf_counter() - start


COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'reduce-scatter', 'all-reduce',
               'collective-permute')
_COLLECTIVE = re.compile(r' (%s)(?:-start)?\(' % '|'.join(COLLECTIVES))
_SHAPE = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')  # f32[8,128], bf16[...], pred[...]


def collective_bytes(compiled) -> dict[str, int]:
  """Bytes each device receives per call, by collective kind: the result sizes of the
  collectives in the compiled (partitioned, per-device) HLO; a loop body counts once."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for line in compiled.as_text().splitlines():
    m = _COLLECTIVE.search(line)
    if not m or '=' not in line[:m.start()]:
      continue
    for dtype, dims in _SHAPE.findall(line[line.index('=') + 1:m.start()]):
      bits = re.search(r'[0-9]+', dtype)
      size = int(bits.group()) // 8 if bits else 1  # pred: one byte
      out[m.group(1)] += size * math.prod(int(d) for d in dims.split(',') if d)
  return {kind: b for kind, b in out.items() if b}


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def median_seconds(fn, *args, repeats: int) -> float:
  return statistics.median(time_once(fn, *args) for _ in range(repeats))


def matmul_rate(dtype, repeats: int) -> float:
  """FLOP/s of a square-ish matmul large enough to reach this device's rate."""
  n = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  a = jnp.ones((n, n), dtype)
  fn = jax.jit(lambda a: a @ a)
  block(fn(a))
  return 2 * n ** 3 / median_seconds(fn, a, repeats=repeats)


def memory_bandwidth(repeats: int) -> float:
  """Bytes/s of an elementwise pass over an array far larger than the caches (read + write)."""
  n = (64 if jax.devices()[0].platform == 'cpu' else 512) * 2 ** 20
  a = jnp.ones((n,), jnp.float32)
  fn = jax.jit(lambda a: a * 2.0 + 1.0)
  block(fn(a))
  return 2 * a.nbytes / median_seconds(fn, a, repeats=repeats)


# ----------------------------------------------------------------------------- layer suite

# The layer suite's reference for the experts' own cost: the lower bound of any dispatch
# that runs them as per-expert matmuls on this device (at small rows per expert, e.g. on a
# CPU, that alone costs well above the dense FFN).
BALANCED = 'experts_balanced'
ROUTER = 'router'
HF_DENSE, HF_SPARSE = 'hf_dense', 'hf_sparse_mlp'
HF_CASES = (HF_DENSE, HF_SPARSE)  # PyTorch callables: nothing to compile, no XLA peak


def moe_config(num_experts: int, dispatch: str, group_size: int, capacity_factor: float
               ) -> MoeConfig:
  """``dispatch`` is a model.moe.dispatch, for dropless optionally with its implementation:
  ``dropless:ragged_dot``."""
  c = config_lib.default_config()
  moe = c.model.moe
  moe.dispatch, _, impl = dispatch.partition(':')
  moe.dropless_impl = impl or 'auto'
  moe.num_experts, moe.group_size = num_experts, group_size
  moe.capacity_factor = moe.eval_capacity_factor = capacity_factor
  moe.expert_dropout = 0.0
  return MoeConfig.from_config(moe, causal=False, expert_parallel='gspmd')


def routing_rngs() -> nnx.Rngs:
  """Every routing randomness stream, as the training loop passes them."""
  return nnx.Rngs(**{name: i for i, name in enumerate(routing.RNG_STREAMS)})


def layer_fn(module: nnx.Module, kind: str):
  """Jitted (states, x, cotangent) -> (gradients of <y, cotangent> (+ aux losses) w.r.t.
  the weights and x, y): one forward and one backward pass of ``module``, a ``dense`` FFN, a
  ``moe`` layer, a moe layer's ``router`` part (`MoeLayer.route`, the gates' sum standing in
  for the combine), or bare ``experts`` fed a perfectly balanced buffer (x's N tokens as
  [E, N / E]: no router, no padding, no row moves).

  y is returned, as the next layer of a model would read it: <y, cotangent> is linear in y,
  so otherwise XLA drops the forward pass's last matmul from every case whose gradient does
  not read y, the dense FFN's among them (a MoE layer's gates read it), and the ratios to
  dense come out up to 6/5 too high."""
  # The router case differentiates the router's weights only: the (zero) gradients of every
  # expert's weights would cost more than the routing itself.
  filters = (nnx.PathContains('router'), ...) if kind == 'router' else (...,)
  graphdef, *states = nnx.split(module, *filters)

  def loss(state, rest, x_BxLxD, ct_BxLxD):
    m = nnx.merge(graphdef, state, *rest)
    extra = 0.0
    if kind == 'moe':
      y, stats = m(x_BxLxD, deterministic=False, rngs=routing_rngs())
      extra = sum(stats.losses.values())
    elif kind == 'router':
      r, stats = route(m, x_BxLxD)
      return jnp.sum(r.gate_GxSxK) + sum(stats.losses.values()), r.gate_GxSxK
    elif kind == 'experts':
      e, d = m.wi.shape[0], x_BxLxD.shape[-1]
      y = m(x_BxLxD.reshape(e, -1, d), deterministic=True, rngs=None).reshape(x_BxLxD.shape)
    else:
      y = m(x_BxLxD, deterministic=True, rngs=None)
    return jnp.sum(y.astype(jnp.float32) * ct_BxLxD) + extra, y

  grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
  return jax.jit(lambda states, x, ct: grad(states[0], states[1:], x, ct)), tuple(states)


def route(layer: MoeLayer, x_BxLxD: jax.Array):
  """(`routing.Routing`, `MoeStats`) of ``layer``'s training-mode routing of x's tokens."""
  g, s = routing_groups(*x_BxLxD.shape[:2], layer.cfg.group_size)
  return layer.route(x_BxLxD.reshape(g, s, -1), layer.capacity(s, False), deterministic=False,
                     rngs=routing_rngs(), valid_GxS=jnp.ones((g, s), bool))


def busiest_expert(layer: MoeLayer, x_BxLxD: jax.Array) -> float:
  """The top-1 load of the busiest expert over the mean, for these tokens (every layer of one
  case has the same router, so the same routing): what capacity padding and dropless
  buffers are sized against."""
  _, stats = nnx.jit(route)(layer, x_BxLxD)
  fraction_E = stats.diagnostics['expert_fraction_E']
  return float(jnp.max(fraction_E) * fraction_E.shape[0])


def hf_cases(layer: MoeLayer, x_1xNxD: jax.Array, group_size: int, args) -> dict:
  """HF transformers' Switch layer and its dense FFN, forward + backward in PyTorch, as
  callables of the suite's (state, x, cotangent) signature (they ignore those). HF routes
  each sequence as one group with an absolute capacity, so its tokens are x's as
  [N / group, group, D], its capacity is ``layer``'s, and its router weights are ``layer``'s:
  the same tokens go to the same experts and the same ones are dropped, so both layers have
  the same real work (HF's runs a loop over the experts on their kept tokens only; with
  weights of its own, an untrained router drops far more and looks cheaper). On a GPU when
  both frameworks see one, else on the CPU."""
  import torch
  from transformers.models.switch_transformers import modeling_switch_transformers as hf
  device = 'cuda' if jax.devices()[0].platform == 'gpu' and torch.cuda.is_available() else 'cpu'
  dtype = getattr(torch, args.dtype)
  g, s = routing_groups(1, args.tokens, group_size)
  kernel_DxE = np.array(layer.router.kernel.get_value(), np.float32)
  config = hf.SwitchTransformersConfig(
      d_model=args.d_model, d_ff=args.d_ff, num_experts=kernel_DxE.shape[1],
      expert_capacity=layer.capacity(s, False), dense_act_fn='relu', dropout_rate=0.0,
      router_jitter_noise=0.0, router_dtype='float32')
  torch.manual_seed(0)
  x = torch.from_numpy(np.array(x_1xNxD, np.float32).reshape(g, s, -1)).to(device)
  x = x.to(dtype).requires_grad_()
  ct = torch.randn(g, s, args.d_model, device=device)

  def case(module):
    module = module.to(device=device, dtype=dtype)

    def run(*_):
      x.grad = None
      module.zero_grad(set_to_none=True)
      y = module(x)
      y = y[0] if isinstance(y, tuple) else y  # transformers 4 also returned router outputs
      (y.float() * ct).sum().backward()
      if device == 'cuda':
        torch.cuda.synchronize()
    run.module = module
    return run
  sparse = hf.SwitchTransformersSparseMLP(config)
  with torch.no_grad():
    sparse.router.classifier.weight.copy_(torch.from_numpy(kernel_DxE.T))
  return {HF_DENSE: (case(hf.SwitchTransformersDenseActDense(config)), None),
          HF_SPARSE: (case(sparse), None)}


def run_layer_suite(args, env: dict, save: Callable[[list[dict]], None]) -> list[dict]:
  """Every E x group size; ``save`` gets the records after each."""
  dtype = jnp.dtype(args.dtype)
  repeats = args.repeats
  rate = matmul_rate(dtype, repeats)
  bandwidth = memory_bandwidth(repeats)
  progress(f'matmul {rate / 1e9:.1f} GFLOP/s ({args.dtype}), memory {bandwidth / 1e9:.1f} GB/s')
  d, f, n = args.d_model, args.d_ff, args.tokens
  x = jax.random.normal(jax.random.key(1), (1, n, d), jnp.float32).astype(dtype)
  ct = jax.random.normal(jax.random.key(2), (1, n, d), jnp.float32)
  dense_flops = 3 * 2 * 2 * n * d * f  # forward + backward of x @ wi, h @ wo
  rngs = nnx.Rngs(params=0)
  dense = FeedForward(d, f, activation='relu', init_scale=1.0, dropout_rate=0.0, dtype=dtype,
                      rngs=rngs)
  records = []
  for e in args.experts:
    for group_size in args.group_sizes:
      cases = {'dense': layer_fn(dense, 'dense')}
      if n % e == 0:
        cases[BALANCED] = layer_fn(Experts(e, d, f, activation='relu', init_scale=0.1,
                                           dropout_rate=0.0, dtype=dtype, rngs=rngs), 'experts')
      router = MoeLayer(d, f, moe_config(e, 'gather', group_size, args.capacity_factor),
                        activation='relu', init_scale=0.1, dtype=dtype, rngs=nnx.Rngs(params=e))
      cases[ROUTER] = layer_fn(router, 'router')
      max_load = busiest_expert(router, x)
      for dispatch in args.dispatch:
        cfg = moe_config(e, dispatch, group_size, args.capacity_factor)
        cases[dispatch] = layer_fn(MoeLayer(d, f, cfg, activation='relu', init_scale=0.1,
                                            dtype=dtype, rngs=nnx.Rngs(params=e)), 'moe')
      if args.hf:
        try:
          cases.update(hf_cases(router, x, group_size, args))
        except Exception as err:  # noqa: BLE001 -- another transformers' API, say
          records.append(failure_record('layer', f'{HF_SPARSE}/E{e}/G{group_size}', err, env))
      compiled = {}
      for name, (fn, state) in cases.items():
        start = time.perf_counter()
        try:
          compiled[name] = fn if name in HF_CASES else fn.lower(state, x, ct).compile()
          block(compiled[name](state, x, ct))
        except Exception as err:  # noqa: BLE001 -- one case (out of memory, say); not dense
          if name == 'dense':
            raise
          records.append(failure_record('layer', f'{name}/E{e}/G{group_size}', err, env))
          compiled.pop(name, None)
          continue
        progress(f'  E={e} group={group_size} {name}: compiled in '
                 f'{time.perf_counter() - start:.1f} s')
      seconds = {name: [] for name in compiled}
      for _ in range(repeats):
        for name, step in compiled.items():
          seconds[name].append(time_once(step, cases[name][1], x, ct))
      dense_s = statistics.median(seconds['dense'])
      own_dense_s = {name: statistics.median(seconds[HF_DENSE if name in HF_CASES else 'dense'])
                     for name in compiled}
      for name in compiled:
        ms = statistics.median(seconds[name]) * 1e3
        # HF's layer runs its experts on the kept tokens alone: no capacity padding.
        cf = (1.0 if name in ('dense', BALANCED, *HF_CASES) or name.startswith('dropless')
              else args.capacity_factor)
        weight_bytes = 3 * 2 * d * f * dtype.itemsize * (1 if name in ('dense', HF_DENSE) else e)
        floor_s = (None if name == ROUTER else
                   max(cf * dense_flops / rate, weight_bytes / bandwidth))
        records.append({
            'suite': 'layer', 'case': f'{name}/E{e}/G{group_size}', 'dispatch': name,
            'num_experts': 0 if name == 'dense' else e, 'group_size': group_size,
            'tokens': n, 'd_model': d, 'd_ff': f, 'dtype': args.dtype,
            'capacity_factor': cf,
            'max_load': max_load if name in (*args.dispatch, HF_SPARSE) else None,
            'ms': ms, 'ms_min': min(seconds[name]) * 1e3,
            'ratio_to_dense': ms / (dense_s * 1e3),
            'ratio_to_own_dense': ms / (own_dense_s[name] * 1e3),
            'framework': 'torch' if name in HF_CASES else 'jax',
            'ratio_to_floor': floor_s and ms / (floor_s * 1e3),
            'floor_ms': floor_s and floor_s * 1e3,
            'peak_bytes': (None if name in HF_CASES else
                           train.compiled_peak_bytes(compiled[name])),
            'matmul_flops_per_s': rate, 'bandwidth_bytes_per_s': bandwidth, **env})
      save(records)
  return records


# ------------------------------------------------------------------------------ step suite


def case_config(case: str, sets: list[str], batch_size: int):
  """The config of ``name[:a.b=v,...]`` with the suite's own overrides applied after."""
  name, _, own = case.partition(':')
  overrides = str_list(own) + sets
  if batch_size:
    overrides.append(f'train.batch_size={batch_size}')
  return load_config(str(REPO / 'configs' / f'{name}.py'), [f'--config.{o}' for o in overrides])


def synthetic_batch(config) -> dict[str, np.ndarray]:
  """Random tokens in the shapes and dtypes the config's objective produces."""
  rng = np.random.default_rng(0)
  b, lt, v = config.train.batch_size, config.data.targets_length, config.model.vocab_size
  tokens = lambda length: rng.integers(1, v, (b, length), dtype=np.int32)
  batch = {'decoder_input_tokens': tokens(lt), 'decoder_target_tokens': tokens(lt),
           'decoder_loss_weights': np.ones((b, lt), np.int32)}
  if config.model.arch == 'encoder_decoder':
    batch['encoder_input_tokens'] = tokens(config.data.inputs_length)
  return batch


def time_steps(step, state, args, *rest) -> tuple[float, dict]:
  """Median seconds of ``args.steps`` runs of ``step(state, *rest) -> (state, ...)`` after one
  warm-up run (which pays for allocation and caches), and the last state."""
  state = block(step(state, *rest))[0]
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state = block(step(state, *rest))[0]
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), state


def update_seconds(s: train.Setup, state, batch, args) -> float | None:
  """Median seconds of the step's second half alone (`train.apply_gradients`: clipping, the
  optimizer, the non-finite guard), donated as in the step. Its inputs are shaped like
  `train.gradients`' output without compiling that: each gradient is 1e-3 x its parameter
  (so it has the parameter's sharding), loss, metrics and routing statistics are zeros. None,
  with a line on stderr, where it fails (out of memory, say): the step's record stands."""
  config = s.config
  try:
    loss, metrics, aux, _ = jax.eval_shape(
        functools.partial(train.gradients, config=config, graphdef=s.graphdef), state, batch)
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
    trainable = train.split_trainable(s.graphdef, state['params'])[0]
    grads = jax.jit(lambda t: jax.tree.map(lambda p: p * 1e-3, t))(trainable)
    update = jax.jit(functools.partial(
        train.apply_gradients, config=config, graphdef=s.graphdef,
        tx=make_optimizer(config.optim, config.train.num_steps)), donate_argnums=0)
    return time_steps(update, state, args, zeros(loss), zeros(metrics), zeros(aux), grads)[0]
  except Exception as e:  # noqa: BLE001 -- any failure; the step's own figures are kept
    progress(f'    update alone: failed, {type(e).__name__}: {str(e).strip()[:200]}')
    return None


def step_record(case: str, args, env: dict) -> dict:
  """One case of the step suite: compile, one warm-up step, ``args.steps`` timed steps; then
  the update alone (`update_seconds`), ``args.steps`` times."""
  config = case_config(case, args.set, args.batch_size)
  s = train.make_setup(config)
  with train.mesh_context(s):
    state = s.init(jax.random.key(0))
    batch = train.device_batch(s, synthetic_batch(config))
    start = time.perf_counter()
    step = s.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    step_s, state = time_steps(step, state, args, batch)
    update_s = update_seconds(s, state, batch, args)
  perf = train.perf_metrics(config, s.mesh, step_s)
  moe = config.model.moe
  expert_axis = dict(s.mesh.shape).get('expert', 1)
  update = '' if update_s is None else f', update {update_s / step_s:.0%} of it'
  progress(f'  {case}: {step_s * 1e3:.1f} ms/step{update}, '
           f'{perf["perf/tokens_per_sec"]:,.0f} tok/s, compiled in {compile_s:.1f} s')
  return {
      'suite': 'step', 'case': case,
      'dispatch': dispatch_lib.resolve(moe.dispatch, expert_axis) if moe.every else 'dense',
      'mesh': dict(s.mesh.shape), 'collective_bytes': collective_bytes(step),
      'num_experts': moe.num_experts if moe.every else 0, 'tokens': train.tokens_per_step(config),
      'batch_size': config.train.batch_size, 'ms': step_s * 1e3,
      'update_ms': None if update_s is None else update_s * 1e3,
      'tokens_per_s': perf['perf/tokens_per_sec'],
      'model_tflops_per_device': perf['perf/model_tflops_per_device'],
      'mfu': perf.get('perf/mfu'), 'compile_s': compile_s,
      'peak_bytes': train.compiled_peak_bytes(step),
      # The process's peak so far: cases run in order, so a case after a larger one reads it.
      'device_peak_bytes': device_peak_bytes(), 'ratio_to_floor': None, **env}


def failure_record(suite: str, case: str, error: Exception, env: dict) -> dict:
  """The record of a case that failed, with the first line of its error."""
  lines = str(error).strip().splitlines() or ['']
  message = f'{type(error).__name__}: {lines[0]}'
  progress(f'  {case}: failed, {message}')
  return {'suite': suite, 'case': case, 'error': message, **env}


def run_step_suite(args, env: dict, save: Callable[[list[dict]], None]) -> list[dict]:
  """Every case in turn. A case that fails at run time (out of memory on a device, say) is
  recorded with its error and the next one runs; ``save`` gets the records after each."""
  is_dense = [not case_config(case, args.set, args.batch_size).model.moe.every
              for case in args.cases]
  records = []
  for case in args.cases:
    try:
      records.append(step_record(case, args, env))
    except Exception as e:  # noqa: BLE001 -- any failure of one case; the record says which
      records.append(failure_record('step', case, e, env))
    dense = next((r for r, d in zip(records, is_dense) if d and 'error' not in r), None)
    for r in records:
      if 'error' not in r:
        r['ratio_to_dense'] = None if dense is None else r['ms'] / dense['ms']
    save(records)
  return records


# ---------------------------------------------------------------------------------- output


def fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def print_table(records: list[dict]) -> None:
  failed = [r for r in records if 'error' in r]
  records = [r for r in records if 'error' not in r]
  for r in failed:
    print(f'{r["case"]}: failed, {r["error"]}')
  if not records:
    return
  if records[0]['suite'] == 'layer':
    own = any(r.get('framework') == 'torch' for r in records)  # --hf: two frameworks' denses
    header = (f'{"case":<30} {"ms":>9} {"x dense":>8} {"x floor":>8} {"peak MiB":>9} '
              f'{"max load":>8}' + (f' {"x own dense":>11}' if own else ''))
    rows = [f'{r["case"]:<30} {r["ms"]:>9.2f} {r["ratio_to_dense"]:>8.2f} '
            f'{fmt(r["ratio_to_floor"], ".2f"):>8} '
            f'{fmt(r["peak_bytes"] and r["peak_bytes"] / 2**20, ".1f"):>9} '
            f'{fmt(r["max_load"], ".2f"):>8}'
            + (f' {r["ratio_to_own_dense"]:>11.2f}' if own else '') for r in records]
  else:
    header = (f'{"case":<40} {"ms/step":>9} {"update ms":>9} {"tokens/s":>10} {"x dense":>8} '
              f'{"MFU":>6} {"compile s":>9} {"peak MiB":>9} {"comm MiB":>9}')
    rows = [f'{r["case"]:<40} {r["ms"]:>9.1f} {fmt(r.get("update_ms"), ".1f"):>9} '
            f'{r["tokens_per_s"]:>10,.0f} '
            f'{fmt(r["ratio_to_dense"], ".2f"):>8} {fmt(r["mfu"], ".1%"):>6} '
            f'{r["compile_s"]:>9.1f} {fmt(r["peak_bytes"] and r["peak_bytes"] / 2**20, ".1f"):>9} '
            f'{sum(r["collective_bytes"].values()) / 2**20:>9.2f}'
            for r in records]
  env = records[0]
  print(f'{env["suite"]} suite on {env["devices"]} x {env["device_kind"]} ({env["platform"]}), '
        f'jax {env["jax"]}, commit {env["commit"]}')
  print(header)
  print('\n'.join(rows))


def int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v]


def str_list(text: str) -> list[str]:
  """Comma-separated items; commas inside brackets stay (``mesh.shape=(2,4)``)."""
  items, depth, current = [], 0, ''
  for ch in text + ',':
    depth += (ch in '([{') - (ch in ')]}')
    if ch == ',' and depth == 0:
      items.append(current)
      current = ''
    else:
      current += ch
  return [v for v in items if v]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--suite', choices=('layer', 'step'), default='layer')
  p.add_argument('--tokens', type=int, default=4096)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--d_ff', type=int, default=1024)
  p.add_argument('--experts', type=int_list, default=[8, 32])
  p.add_argument('--dispatch', type=str_list, default=list(DISPATCHERS))
  p.add_argument('--group_sizes', type=int_list, default=[1024])
  p.add_argument('--capacity_factor', type=float, default=1.25)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--repeats', type=int, default=15)
  p.add_argument('--hf', action='store_true',
                 help='layer suite: also time HF transformers\' Switch layer (PyTorch)')
  p.add_argument('--cases', nargs='+', default=['t5_tiny', 'switch_tiny'],
                 help='config names, each optionally with overrides: name:a.b=v,c.d=w')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch_size', type=int, default=0, help='0: the config\'s own')
  p.add_argument('--set', type=str_list, default=[],
                 help='overrides for every step case, a.b=v,c.d=w')
  p.add_argument('--json', default='', help='write one JSON record per case to this file')
  args = p.parse_args(argv)
  allowed = (*DISPATCHES, *(f'dropless:{i}' for i in DROPLESS_IMPLS))
  bad = [d for d in args.dispatch if d not in allowed]
  if bad:
    p.error(f'--dispatch={",".join(bad)}: not an option; allowed: {", ".join(allowed)}')
  if args.hf:
    try:
      import torch  # noqa: F401
      from transformers.models.switch_transformers import modeling_switch_transformers  # noqa
    except ImportError as e:
      p.error(f'--hf: needs torch and transformers ({e})')
  if args.repeats < 1 or args.steps < 1:
    p.error('--repeats and --steps must be >= 1')
  for case in args.cases:
    if not (REPO / 'configs' / f'{case.partition(":")[0]}.py').exists():
      p.error(f'--cases: no config file configs/{case.partition(":")[0]}.py')
    if args.suite == 'step':
      try:
        case_config(case, args.set, args.batch_size)
      except ValueError as e:
        p.error(f'--cases {case}: {e}')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  env = environment()
  progress(f'{args.suite} suite on {env["device_kind"]} ({env["platform"]}), jax {env["jax"]}')

  def save(records: list[dict]) -> None:  # all records so far: a run cut short keeps them
    if args.json:
      with open(args.json + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
      os.replace(args.json + '.tmp', args.json)

  records = (run_layer_suite if args.suite == 'layer' else run_step_suite)(args, env, save)
  print_table(records)
  if any('error' in r for r in records):
    sys.exit(1)


if __name__ == '__main__':
  main()
