"""scripts/benchmark.py runs both suites at toy sizes and writes the records it promises."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('suite', 'case', 'dispatch', 'num_experts', 'tokens', 'ms', 'ratio_to_dense',
          'ratio_to_floor', 'peak_bytes', 'platform', 'device_kind')


def run(args, tmp_path, returncode=0):
  out = tmp_path / 'records.jsonl'
  done = subprocess.run([sys.executable, 'scripts/benchmark.py', *args, f'--json={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == returncode, done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  for r in records:
    if 'error' not in r:
      assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
  return records, done.stdout


def test_layer_suite(tmp_path):
  records, table = run(['--suite=layer', '--tokens=64', '--d_model=8', '--d_ff=16',
                        '--experts=2,4', '--group_sizes=32', '--repeats=2'], tmp_path)
  cases = [r['case'] for r in records]
  assert cases == [f'{d}/E{e}/G32' for e in (2, 4)
                   for d in ('dense', 'experts_balanced', 'router', 'einsum', 'gather',
                             'dropless')]
  for r in records:
    assert r['ms'] > 0 and r['peak_bytes'] > 0
    # The router alone has no roofline floor; every layer does.
    assert (r['ratio_to_floor'] is None) == (r['dispatch'] == 'router')
    assert r['ratio_to_floor'] is None or r['ratio_to_floor'] > 0
    assert r['platform'] == 'cpu'
    if r['dispatch'] == 'dense':
      assert r['ratio_to_dense'] == 1.0 and r['num_experts'] == 0
    else:
      assert r['num_experts'] in (2, 4)
    routed = r['dispatch'] in ('einsum', 'gather', 'dropless')
    assert (r['max_load'] is not None) == routed
    assert r['capacity_factor'] == (1.25 if r['dispatch'] in ('einsum', 'gather', 'router')
                                    else 1.0)
  for case in cases:
    assert case in table


def test_hf_comparison_without_torch_is_one_line_naming_the_flag(tmp_path):
  if importlib.util.find_spec('torch') and importlib.util.find_spec('transformers'):
    pytest.skip('torch and transformers are installed: the comparison itself is tested')
  done = subprocess.run([sys.executable, 'scripts/benchmark.py', '--hf'], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert 'error: --hf: needs torch and transformers' in done.stderr.strip().splitlines()[-1]


def test_hf_switch_layer_routes_like_ours_and_is_timed_beside_it(tmp_path):
  """HF's layer gets this layer's router weights, capacity and tokens, so it keeps and drops
  exactly the tokens ours does (the same real work), and its rows carry both ratios."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  benchmark = load_script()
  args = benchmark.parse_args(['--hf', '--tokens=256', '--d_model=16', '--d_ff=32'])
  e, g, s = 8, 4, 64
  layer = benchmark.MoeLayer(16, 32, benchmark.moe_config(e, 'gather', s, 1.25),
                             activation='relu', init_scale=0.1, dtype=benchmark.jnp.float32,
                             rngs=benchmark.nnx.Rngs(params=3))
  x = benchmark.jax.random.normal(benchmark.jax.random.key(1), (1, g * s, 16))
  r, _ = benchmark.nnx.jit(benchmark.route)(layer, x)
  router = benchmark.hf_cases(layer, x, s, args)[benchmark.HF_SPARSE][0].module.router
  with torch.no_grad():
    mask = router.eval()(torch.from_numpy(np.array(x).reshape(g, s, 16)))[0]
  mask = mask.numpy().astype(bool)
  kept = np.asarray(r.kept_GxSxK)[..., 0]
  assert 0 < kept.mean() < 1  # some tokens dropped: the check below is not vacuous
  np.testing.assert_array_equal(mask.any(-1), kept)
  expert = np.asarray(r.expert_index_GxSxK)[..., 0]
  np.testing.assert_array_equal(mask.argmax(-1)[kept], expert[kept])
  records, table = run(['--suite=layer', '--tokens=256', '--d_model=16', '--d_ff=32',
                        '--experts=8', '--group_sizes=64', '--repeats=2', '--dispatch=gather',
                        '--hf'], tmp_path)
  by = {r['dispatch']: r for r in records}
  assert by['hf_dense']['ratio_to_own_dense'] == 1.0 and by['hf_dense']['framework'] == 'torch'
  assert by['hf_sparse_mlp']['max_load'] == by['gather']['max_load']
  assert by['gather']['ratio_to_own_dense'] == by['gather']['ratio_to_dense']
  assert 'x own dense' in table


@pytest.mark.slow  # test_readme runs the README's step-suite command in the default suite
def test_step_suite(tmp_path):
  small = 'model.num_layers=1,model.d_model=16,model.d_ff=32,model.num_heads=2,model.d_kv=8'
  # The middle case cannot fit one device (a billion-token vocabulary): recorded, not fatal.
  records, table = run(['--suite=step', '--cases', 't5_tiny',
                        't5_tiny:model.vocab_size=1000000000',
                        'switch_tiny:model.moe.num_experts=4,model.remat=full',
                        '--steps=2', '--batch_size=8', f'--set={small}'], tmp_path, returncode=1)
  dense, too_big, switch = records
  assert too_big['error'].startswith('ValueError: model: parameters, gradients and optimizer '
                                     'state need ')
  assert too_big['case'] in table and 'ms' not in too_big
  assert (dense['num_experts'], switch['num_experts']) == (0, 4)
  assert dense['ratio_to_dense'] == 1.0 and switch['ratio_to_dense'] > 0
  assert dense['tokens'] == switch['tokens'] == 8 * (128 + 32)
  for r in (dense, switch):
    assert r['tokens_per_s'] > 0 and r['compile_s'] > 0 and r['mfu'] is None  # CPU: no peak
    assert 0 < r['update_ms'] < r['ms']
  assert 'switch_tiny:model.moe.num_experts=4,model.remat=full' in table
  header, = (line for line in table.splitlines() if line.startswith('case '))
  assert 'update ms' in header


def test_a_failing_update_timing_keeps_the_steps_record(tmp_path, monkeypatch, capsys):
  benchmark = load_script()

  def out_of_memory(*args, **kwargs):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB')

  monkeypatch.setattr(benchmark, 'make_optimizer', out_of_memory)  # used by the update only
  out = tmp_path / 'records.jsonl'
  benchmark.main(['--suite=step', '--cases', 't5_tiny', '--steps=1', '--batch_size=8',
                  '--set=model.num_layers=1,model.d_model=16,model.d_ff=32,model.num_heads=2,'
                  'model.d_kv=8', f'--json={out}'])
  record, = map(json.loads, out.read_text().splitlines())
  assert record['ms'] > 0 and record['update_ms'] is None
  assert 'update alone: failed, RuntimeError: RESOURCE_EXHAUSTED' in capsys.readouterr().err


def test_bad_arguments_fail_in_one_line():
  done = subprocess.run([sys.executable, 'scripts/benchmark.py', '--dispatch=einsum,fast'],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 2
  assert ('--dispatch=fast: not an option; allowed: auto, einsum, gather, dropless, '
          'dropless:auto') in done.stderr


def load_script(name: str = 'benchmark'):
  """scripts/NAME.py as a module."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_collective_bytes_reads_the_partitioned_program():
  """Per-device result bytes by kind, from a program with known collectives on 8 devices."""
  import jax
  import jax.numpy as jnp
  benchmark = load_script()
  mesh = jax.make_mesh((8,), ('x',), axis_types=(jax.sharding.AxisType.Auto,))

  def f(a_8x4, b_8x2):  # per device: a [1, 4] float32, b [1, 2] int32
    total = jax.lax.psum(a_8x4, 'x')                                     # 16 bytes
    gathered = jax.lax.all_gather(b_8x2, 'x', tiled=True)                # 8 x 2 x 4 = 64
    swapped = jax.lax.all_to_all(jnp.tile(a_8x4, (8, 1)), 'x', 0, 0, tiled=True)  # 8 x 16
    return total, gathered, swapped

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(jax.P('x'), jax.P('x')),
                             out_specs=(jax.P('x'), jax.P('x'), jax.P('x'))))
  compiled = fn.lower(jnp.ones((8, 4)), jnp.ones((8, 2), jnp.int32)).compile()
  assert benchmark.collective_bytes(compiled) == {'all-reduce': 16, 'all-gather': 64,
                                                  'all-to-all': 128}


def test_a_failing_layer_case_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
  """As in the step suite: a layer case that fails (out of memory on a GPU, say) gets a
  record with its error, the other cases are timed, and the script exits 1."""
  benchmark = load_script()
  real_layer_fn = benchmark.layer_fn

  class OutOfMemory:
    def lower(self, *args):
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB\n(details)')

  def layer_fn(module, kind):
    fn, states = real_layer_fn(module, kind)
    if kind == 'moe' and module.cfg.dispatch == 'gather':
      return OutOfMemory(), states
    return fn, states

  monkeypatch.setattr(benchmark, 'layer_fn', layer_fn)
  out = tmp_path / 'records.jsonl'
  with pytest.raises(SystemExit) as exit_:
    benchmark.main(['--suite=layer', '--tokens=64', '--d_model=8', '--d_ff=16', '--experts=2',
                    '--group_sizes=32', '--repeats=1', '--dispatch=gather,dropless',
                    f'--json={out}'])
  assert exit_.value.code == 1
  records = {r['case']: r for r in map(json.loads, out.read_text().splitlines())}
  assert records['gather/E2/G32']['error'] == ('RuntimeError: RESOURCE_EXHAUSTED: Out of '
                                               'memory allocating 9 GiB')
  assert records['dropless/E2/G32']['ms'] > 0 and records['dense/E2/G32']['ms'] > 0
  assert 'gather/E2/G32: failed, RuntimeError' in capsys.readouterr().out


def test_layer_cases_do_all_of_their_forward_pass():
  """Each layer case computes y and its gradients: the dense FFN and the balanced experts run
  all six matmuls of a forward and a backward pass (XLA would drop the forward's last one if
  nothing read y), so the MoE layers, whose gates read y, are compared with all of it."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from switchmoe.layers import Experts, FeedForward
  benchmark = load_script()
  n, d, f, e = 64, 16, 32, 4
  x = jax.random.normal(jax.random.key(0), (1, n, d))
  ct = jax.random.normal(jax.random.key(1), (1, n, d))
  rngs = nnx.Rngs(params=0)
  modules = {'dense': FeedForward(d, f, activation='relu', init_scale=1.0, dropout_rate=0.0,
                                  dtype=jnp.float32, rngs=rngs),
             'experts': Experts(e, d, f, activation='relu', init_scale=1.0, dropout_rate=0.0,
                                dtype=jnp.float32, rngs=rngs)}
  for kind, module in modules.items():
    fn, states = benchmark.layer_fn(module, kind)
    flops = fn.lower(states, x, ct).compile().cost_analysis()['flops']
    assert flops >= 6 * 2 * n * d * f, (kind, flops)
    (_, dx), y = fn(states, x, ct)
    assert y.shape == x.shape == dx.shape


def test_override_lists_keep_bracketed_commas():
  benchmark = load_script()
  assert benchmark.str_list("mesh.shape=(2,4),mesh.axes=('data','expert'),,a=1") == [
      'mesh.shape=(2,4)', "mesh.axes=('data','expert')", 'a=1']


def test_device_check_steps_are_the_issues_models():
  """The GPU call's step cases, read from scripts/device_check.sh: T5-Base and Switch-Base with
  8, 64 and 128 experts (configs/switch_base.py alone has 128: its first case once ran that
  twice and never 8)."""
  benchmark = load_script()
  script = open(os.path.join(REPO, 'scripts', 'device_check.sh')).read()
  full = script[script.index('\nelse\n'):]
  words = re.search(r'STEP=\(([^)]*)\)', full).group(1).split()
  cases = [w for w in words if not w.startswith('--')]  # the rest are options
  configs = [benchmark.case_config(case, [], 0) for case in cases]
  assert [c.model.moe.num_experts if c.model.moe.every else 0 for c in configs] == [0, 8, 64, 128]


def test_device_check_script_runs_its_parts_and_rejects_unknown_ones(tmp_path):
  """scripts/device_check.sh (for a lent GPU) at SMALL sizes on the CPU: a part writes its
  records, its log into logs.tar.gz and a summary line; a part with too little of DEADLINE left
  is skipped, not started; an unknown part exits 2 naming it."""
  env = {**os.environ, 'OUT': str(tmp_path), 'SMALL': '1', 'TEST_PLATFORM': 'cpu',
         'PY': sys.executable}
  done = subprocess.run(['bash', 'scripts/device_check.sh', 'layer'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert re.fullmatch(r'layer +rc=0 .*\n', (tmp_path / 'summary.txt').read_text())
  records = [json.loads(line) for line in (tmp_path / 'layer.jsonl').read_text().splitlines()]
  # The GPU call's own dtype and dispatches, ragged_dot too.
  assert {r['dispatch'] for r in records} >= {'dense', 'gather', 'dropless',
                                              'dropless:ragged_dot'}
  assert {r['dtype'] for r in records} == {'bfloat16'}
  with tarfile.open(tmp_path / 'logs.tar.gz') as logs:
    log = logs.extractfile('./layer.log').read().decode()
  assert 'layer suite on' in log and 'layer suite on' in done.stdout
  # At most the 8 files a device call brings back, none in a sub-folder.
  assert len(list(tmp_path.iterdir())) <= 8 and all(p.is_file() for p in tmp_path.iterdir())
  late = subprocess.run(['bash', 'scripts/device_check.sh', 'layer'], cwd=REPO,
                        env={**env, 'DEADLINE': '5'}, capture_output=True, text=True,
                        timeout=120)
  assert late.returncode == 0 and re.fullmatch(
      r'layer +skipped: -?\d+s left of DEADLINE=5\n', (tmp_path / 'summary.txt').read_text())
  bad = subprocess.run(['bash', 'scripts/device_check.sh', 'bogus'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "unknown part 'bogus'" in bad.stderr


def test_plot_benchmark_draws_the_committed_layer_records(tmp_path):
  records = [os.path.join(REPO, 'docs', 'performance', name)
             for name in ('layer_08b4de0.jsonl', 'layer_08b4de0_E64_256.jsonl')]
  out = tmp_path / 'layer.png'
  done = subprocess.run([sys.executable, 'scripts/plot_benchmark.py', *records, f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert out.stat().st_size > 10_000 and f'{out}: ' in done.stdout
  # Not a record file, and records of two different layers: one line each, naming the file.
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('not json\n')
  mixed = tmp_path / 'mixed.jsonl'
  mixed.write_text(''.join(
      json.dumps({'suite': 'layer', 'dispatch': 'gather', 'num_experts': 8, 'tokens': t,
                  'd_model': 8, 'd_ff': 16, 'dtype': 'float32', 'device_kind': 'cpu',
                  'ratio_to_dense': 1.0, 'ratio_to_floor': 1.0}) + '\n' for t in (64, 128)))
  for path, message in ((bad, 'not a benchmark.py --json file'),
                        (mixed, 'records of different layers or devices')):
    done = subprocess.run([sys.executable, 'scripts/plot_benchmark.py', str(path),
                           f'--out={out}'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.strip().count('\n') == 0
    assert done.stderr.startswith(f'{path}: ') and message in done.stderr


def test_plot_benchmark_pools_runs_into_median_and_range():
  plot = load_script('plot_benchmark')
  record = lambda dispatch, e, ratio: {'dispatch': dispatch, 'num_experts': e,
                                       'ratio_to_dense': ratio}
  records = [record('gather', 8, 1.3), record('gather', 8, 1.1), record('gather', 8, 1.2),
             record('gather', 32, 1.5), record('dense', 0, 1.0), record('router', 8, 0.03)]
  assert plot.series(records, 'ratio_to_dense') == {
      'gather': [(8, 1.2, 1.1, 1.3), (32, 1.5, 1.5, 1.5)]}
