"""HuggingFace checkpoints in, switchmoe models out: tiny random SwitchTransformers and T5
folders written in HF's layout (tests/hf_reference.py, checked there against transformers)
give logits equal to an independent float64 NumPy forward of the same weights, tokens dropped
by capacity included; every bad folder is one line and writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import convert
from tests import hf_reference as hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    'switch_step2': (hf.small_switch_config(sparse_step=2), 1, False),
    'switch_step1_3_shards': (hf.small_switch_config(sparse_step=1), 3, False),
    'switch_untied': (hf.small_switch_config(tie_word_embeddings=False), 1, False),
    'switch_tied_copies': (hf.small_switch_config(), 1, True),
    't5_1.0_2_shards': (hf.small_t5_config('1.0'), 2, False),
    't5_1.1': (hf.small_t5_config('1.1'), 1, False),
    't5_1.1_copies': (hf.small_t5_config('1.1'), 1, True),
}


def tokens(vocab, seed):
  """Encoder tokens [2, 20] (row 1 right-padded after 13) and decoder inputs [2, 18]."""
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, vocab, (2, 20)).astype(np.int32)
  enc[1, 13:] = 0
  labels = rs.randint(2, vocab, (2, 18)).astype(np.int32)
  return enc, hf.hf_decoder_input(labels).astype(np.int32)


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_equal_the_float64_hf_forward(case, tmp_path):
  config, shards, copies = CASES[case]
  weights = hf.write_hf_checkpoint(str(tmp_path), config, seed=3, shards=shards,
                                   include_tied_duplicates=copies)
  model, c = convert.load_hf(str(tmp_path))
  enc, dec = tokens(config['vocab_size'], seed=1)
  want, routing = hf.hf_forward(config, weights, enc, dec, return_routing=True)
  got = np.asarray(model(enc, dec), np.float64)
  assert got.shape == want.shape == (2, 18, config['vocab_size'])
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
  if config['model_type'] == 'switch_transformers':
    assert c.model.moe.group_size == 0 and c.model.moe.expert_capacity == 2
    # Far from a routing tie (float32 here, float64 there), and capacity does bite.
    assert min(layer['margin'] for layer in routing) > 1e-4
    real = [layer['kept'][np.asarray(enc) > 0] if layer['name'].startswith('encoder') else
            layer['kept'] for layer in routing]
    assert all(not np.all(kept) for kept in real)
  else:
    assert c.model.moe.every == 0


def test_conventions_reach_the_config(tmp_path):
  c = convert.config_from_hf(hf.small_t5_config('1.1'))
  assert (c.model.ffn_activation, c.model.tie_embeddings, c.model.moe.every) == (
      'geglu', False, 0)
  c = convert.config_from_hf(hf.small_switch_config(sparse_step=2))
  assert (c.model.ffn_activation, c.model.tie_embeddings, c.model.moe.every) == (
      'relu', True, 2)
  assert (c.model.moe.exploration, c.model.moe.jitter) == ('input_jitter', 0.01)
  assert (c.model.d_model, c.model.d_kv, c.model.num_heads, c.model.d_ff) == (16, 4, 2, 32)
  # HF 5 re-saves T5.1.1 as tied but unscaled, with its own lm_head: unscaled wins.
  resaved = hf.small_t5_config('1.1', tie_word_embeddings=True, scale_decoder_outputs=False)
  assert not convert.config_from_hf(resaved).model.tie_embeddings


def _write(tmp_path, config=None, **kw):
  folder = str(tmp_path / 'hf')
  os.makedirs(folder)
  hf.write_hf_checkpoint(folder, config or hf.small_switch_config(), **kw)
  return folder


def _rewrite_tensors(folder, edit):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(folder, 'model.safetensors')
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def _set_config(folder, **fields):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(fields)
  with open(path, 'w') as f:
    json.dump(config, f)


BAD = {
    'no_config': (lambda f: os.remove(os.path.join(f, 'config.json')),
                  r'config\.json: missing'),
    'model_type': (lambda f: _set_config(f, model_type='bart'),
                   r"model_type='bart'; allowed: 'switch_transformers', 't5'"),
    'no_weights': (lambda f: os.remove(os.path.join(f, 'model.safetensors')),
                   r'no weights \(model\.safetensors or model\.safetensors\.index\.json\)'),
    'missing_tensor': (lambda f: _rewrite_tensors(
        f, lambda t: t.pop('decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight')),
        r'lacks tensor decoder\.block\.1\.layer\.2\.mlp\.experts\.expert_3\.wo\.weight'),
    'misshaped': (lambda f: _rewrite_tensors(
        f, lambda t: t.update({'encoder.final_layer_norm.weight': np.ones(17, np.float32)})),
        r'encoder\.final_layer_norm\.weight gives encoder/final_norm/scale the shape \(17,\); '
        r'the config needs \(16,\)'),
    'extra_tensor': (lambda f: _rewrite_tensors(
        f, lambda t: t.update({'encoder.block.0.layer.0.SelfAttention.q.bias':
                               np.zeros(8, np.float32)})),
        r'1 tensor\(s\) map to nothing in switchmoe, e\.g\. '
        r'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias'),
    'sparse_step_3': (lambda f: _set_config(f, encoder_sparse_step=3, decoder_sparse_step=3),
                      r'encoder_sparse_step / decoder_sparse_step 3 / 3; allowed: both 1 or '
                      r'both 2'),
    'router_bias': (lambda f: _set_config(f, router_bias=True), r'router_bias=true'),
    'epsilon': (lambda f: _set_config(f, layer_norm_epsilon=1e-5), r'layer_norm_epsilon=1e-05'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_folder_is_one_line(case, tmp_path):
  folder = _write(tmp_path)
  damage, message = BAD[case]
  damage(folder)
  with pytest.raises(ValueError, match=message) as error:
    convert.load_hf_params(folder)
  assert '\n' not in str(error.value)


def test_index_naming_a_missing_shard(tmp_path):
  folder = _write(tmp_path, shards=2)
  os.remove(os.path.join(folder, 'model-00002-of-00002.safetensors'))
  with pytest.raises(ValueError, match=r'names shard model-00002-of-00002\.safetensors, which '
                                       r'is missing'):
    convert.load_hf_params(folder)


def _cli(*args):
  return subprocess.run([sys.executable, 'scripts/convert_hf.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_an_export_and_a_config_file_that_fine_tunes_from_it(tmp_path):
  folder, out = _write(tmp_path), str(tmp_path / 'out')
  done = _cli(f'--hf_dir={folder}', f'--out={out}')
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'Converted' in done.stdout and sorted(os.listdir(out)) == [
      'config.json', 'config.py', 'params']
  params, config = convert.load_hf_params(folder)
  assert checkpoint_lib.find_config(out).to_json() == config.to_json()
  from switchmoe.main import load_config
  fine_tune = load_config(os.path.join(out, 'config.py'), [])
  assert fine_tune.train.init_from == out
  # The converted model under the SW fine-tuning recipe: dropout 0.1 / 0.4 in the experts.
  assert (fine_tune.model.dropout_rate, fine_tune.model.moe.expert_dropout) == (0.1, 0.4)
  fine_tune.model.dropout_rate = config.model.dropout_rate
  fine_tune.model.moe.expert_dropout = config.model.moe.expert_dropout
  assert fine_tune.model.to_json() == config.model.to_json()
  assert (fine_tune.optim.name, fine_tune.optim.schedule, fine_tune.optim.learning_rate,
          fine_tune.data.objective) == ('adafactor', 'constant', 1e-4, 'supervised')
  stored, names = checkpoint_lib.load_params(out, jax.tree.map(jax.numpy.asarray, params))
  assert len(names) == len(jax.tree.leaves(params))
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_cli_bad_folder_exits_2_and_writes_nothing(tmp_path):
  folder, out = _write(tmp_path), str(tmp_path / 'out')
  _set_config(folder, model_type='bart')
  done = _cli(f'--hf_dir={folder}', f'--out={out}')
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: {folder}/config.json: model_type='bart'; allowed: 'switch_transformers', 't5'"]
  assert not os.path.exists(out)


# Big enough (4 + 4 layers, 8 experts of d_model 128 x d_ff 512: 20 MiB) that one block of one
# parameter, 2 experts' weights, is a small part of the model.
STREAMED = hf.small_switch_config(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_experts=8,
                                  num_layers=4)


def _expert_mesh():
  from switchmoe import sharding
  return sharding.make_mesh((2, 4), ('data', 'expert'))


def test_streaming_onto_a_mesh_reads_each_block_once_and_never_the_whole_model(
    tmp_path, monkeypatch):
  import tracemalloc
  from flax import traverse_util
  folder = _write(tmp_path, STREAMED, seed=4)
  host, c = convert.load_hf_params(folder)
  total = sum(x.nbytes for x in jax.tree.leaves(host))
  reads = []
  real_read = convert._Tensors.read
  monkeypatch.setattr(convert._Tensors, 'read',
                      lambda self, name: reads.append(name) or real_read(self, name))
  tracemalloc.start()
  try:
    placed, placed_config = convert.load_hf_params(folder, _expert_mesh())
    streamed_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    convert.load_hf_params(folder)
    host_peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert placed_config.to_json() == c.to_json()
  # The host load holds every weight at once; the streamed one a few blocks at a time.
  assert host_peak > total > 6 * streamed_peak, (host_peak, total, streamed_peak)
  # Data replicas share one read: every tensor is read once (twice counting the host load).
  _, weights = hf.read_hf_checkpoint(folder)
  assert sorted(reads) == sorted(list(weights) * 2)
  flat_host, flat = (traverse_util.flatten_dict(t) for t in (host, placed))
  assert flat.keys() == flat_host.keys()
  for key, array in flat.items():
    np.testing.assert_array_equal(np.asarray(array), flat_host[key], err_msg=str(key))
    if key[-2] == 'experts':  # [E=8, ...] split 4 ways: 2 experts per device
      assert array.sharding.spec[0] == 'expert'
      assert {s.data.shape[0] for s in array.addressable_shards} == {2}


def test_a_model_streamed_onto_a_mesh_gives_the_same_logits(tmp_path):
  folder = _write(tmp_path, STREAMED, seed=6)
  enc, dec = tokens(STREAMED['vocab_size'], seed=3)
  host_model, _ = convert.load_hf(folder)
  model, _ = convert.load_hf(folder, _expert_mesh())
  got, want = np.asarray(model(enc, dec)), np.asarray(host_model(enc, dec))
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 2e-5  # sums split over devices


def test_cli_places_the_weights_on_the_given_mesh(tmp_path):
  from switchmoe import train
  folder, out = _write(tmp_path, STREAMED, seed=8), str(tmp_path / 'out')
  mesh = ["--config.mesh.shape=(2,4)", "--config.mesh.axes=('data','expert')"]
  done = _cli(f'--hf_dir={folder}', f'--out={out}', *mesh)
  assert done.returncode == 0, done.stderr[-2000:]
  config = checkpoint_lib.find_config(out)
  assert tuple(config.mesh.shape) == (2, 4)  # fine-tuning runs on the same layout
  config.train.batch_size = 8
  s = train.make_setup(config)
  with train.mesh_context(s):
    stored, names = checkpoint_lib.load_params(out, s.abstract_state['params'])
  host, _ = convert.load_hf_params(folder)
  assert len(names) == len(jax.tree.leaves(host))
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), b)
  wi = stored['encoder']['layers'][1]['ffn']['experts']['wi']
  assert wi.sharding.spec[0] == 'expert'


def test_two_processes_each_read_only_their_own_experts(tmp_path):
  """A 2-process conversion onto 8 experts split over 8 devices (4 per process): each process
  reads the experts its devices hold and every other tensor once; the checkpoint they write
  together is the whole model."""
  import portpicker
  folder, out = _write(tmp_path, STREAMED, seed=9), str(tmp_path / 'out')
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  workers = [subprocess.Popen([sys.executable, '-m', 'tests.convert_worker', str(port), str(i),
                               folder, out], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for w, (stdout, stderr) in zip(workers, outputs):
    assert w.returncode == 0, stderr[-3000:]
  results = sorted((json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs),
                   key=lambda r: r['process'])
  assert [r['code'] for r in results] == [0, 0]
  _, weights = hf.read_hf_checkpoint(folder)
  expert = re.compile(r'\.expert_(\d+)\.')
  for r in results:
    own = {n for n in weights if not expert.search(n) or
           int(expert.search(n).group(1)) // 4 == r['process']}
    assert sorted(r['reads']) == sorted(own)
  host, _ = convert.load_hf_params(folder)
  stored, names = checkpoint_lib.load_params(out, jax.tree.map(jax.numpy.asarray, host))
  assert len(names) == len(jax.tree.leaves(host))
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize('flag,message', [
    ('--config.train.batch_size=8', r'--config\.train\.batch_size=8: unknown flag; allowed: '
                                    r'.*--config\.mesh\.\*'),
    ('--config.mesh.shape=(3,4)', r'mesh\.shape \(3, 4\) needs 12 devices, only 8'),
    ('--config.mesh.axez=(1,)', r'mesh\.axez'),
])
def test_cli_bad_mesh_flag_exits_2_and_writes_nothing(flag, message, tmp_path):
  folder, out = _write(tmp_path), str(tmp_path / 'out')
  done = _cli(f'--hf_dir={folder}', f'--out={out}', flag)
  assert done.returncode == 2, done.stderr[-2000:]
  assert len(done.stderr.strip().splitlines()) == 1
  assert re.search(message, done.stderr), done.stderr
  assert not os.path.exists(out)


ROUND_TRIP = ['switch_step2', 'switch_step1_3_shards', 'switch_untied', 't5_1.0_2_shards',
              't5_1.1']


@pytest.mark.parametrize('case', ROUND_TRIP)
def test_save_hf_writes_back_the_same_tensors(case, tmp_path):
  config, shards, _ = CASES[case]
  weights = hf.write_hf_checkpoint(str(tmp_path / 'in'), config, seed=5, shards=shards)
  params, c = convert.load_hf_params(str(tmp_path / 'in'))
  count = convert.save_hf(params, c, str(tmp_path / 'out'))
  saved_config, saved = hf.read_hf_checkpoint(str(tmp_path / 'out'))
  assert count == len(saved) and sorted(saved) == sorted(weights)
  for name, w in weights.items():  # sqrt(d_kv) = 2 scales q exactly: bit for bit
    np.testing.assert_array_equal(saved[name], w, err_msg=name)
  enc, dec = tokens(config['vocab_size'], seed=2)
  np.testing.assert_array_equal(hf.hf_forward(saved_config, saved, enc, dec),
                                hf.hf_forward(config, weights, enc, dec))
  assert convert.config_from_hf(saved_config).to_json() == c.to_json()


@pytest.mark.parametrize('field,value,message', [
    ('model.moe.group_size', 256, r'model\.moe\.group_size=256: HF SwitchTransformers cannot '
                                  r'express it; allowed: 0'),
    ('model.moe.expert_capacity', 0, r'model\.moe\.expert_capacity=0: .*allowed: > 0'),
    ('model.moe.router', 'topk', r"model\.moe\.router='topk'"),
    ('model.arch', 'decoder', r"model\.arch='decoder'"),
])
def test_save_hf_refuses_what_hf_cannot_express(field, value, message, tmp_path):
  params, c = convert.load_hf_params(_write(tmp_path))
  section, *rest = field.split('.')
  node = c[section]
  for key in rest[:-1]:
    node = node[key]
  node[rest[-1]] = value
  with pytest.raises(ValueError, match=message):
    convert.save_hf(params, c, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def test_cli_round_trip_from_an_export(tmp_path):
  folder, out, back = _write(tmp_path, seed=7), str(tmp_path / 'out'), str(tmp_path / 'back')
  assert _cli(f'--hf_dir={folder}', f'--out={out}').returncode == 0
  done = _cli(f'--checkpoint={out}', f'--hf_out={back}')
  assert done.returncode == 0, done.stderr[-2000:]
  _, original = hf.read_hf_checkpoint(folder)
  _, saved = hf.read_hf_checkpoint(back)
  assert sorted(saved) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
  assert _cli(f'--checkpoint={out}').returncode == 2


@pytest.mark.slow
def test_plan_lays_out_a_converted_checkpoint_on_an_expert_mesh(tmp_path):
  """The config.py that convert_hf.py writes is a config file like any other: plan.py
  compiles its training step on 8 simulated devices with the experts split 4 ways."""
  folder, out = _write(tmp_path), str(tmp_path / 'out')
  assert _cli(f'--hf_dir={folder}', f'--out={out}').returncode == 0
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  done = subprocess.run(
      [sys.executable, 'scripts/plan.py', f'--config={out}/config.py', '--devices=8',
       '--config.mesh.shape=(2,4)', '--config.train.batch_size=8'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "mesh {'data': 2, 'expert': 4} on 8 simulated devices" in done.stdout
  assert int(re.search(r'all-to-all ops in the step\s+(\d+)', done.stdout).group(1)) > 0
  params, _ = convert.load_hf_params(folder)
  count = sum(np.asarray(x).size for x in jax.tree.leaves(params))
  assert re.search(rf'parameters \(all devices\) +{count:,}\n', done.stdout)


@pytest.mark.slow
def test_fine_tune_a_converted_checkpoint_on_a_task_file(tmp_path):
  """convert_hf.py's config.py trains as written, on a .jsonl task file, from the converted
  weights: after 3 steps of the recipe's small constant learning rate every parameter is
  within 1e-2 of the checkpoint's and some have moved."""
  folder = str(tmp_path / 'hf')
  os.makedirs(folder)
  hf.write_hf_checkpoint(folder, hf.small_switch_config(vocab_size=384))  # byte tokenizer
  out, workdir = str(tmp_path / 'out'), str(tmp_path / 'ft')
  assert _cli(f'--hf_dir={folder}', f'--out={out}').returncode == 0
  rows = [{'inputs': f'translate {i}', 'targets': f'{i} etalsnart'} for i in range(50)]
  (tmp_path / 'task.jsonl').write_text('\n'.join(map(json.dumps, rows)), encoding='utf-8')
  done = subprocess.run(
      ['switchmoe-train', f'--config={out}/config.py', f'--workdir={workdir}',
       f'--config.data.files={tmp_path}/task.jsonl', f'--config.data.data_dir={tmp_path}/tfds',
       '--config.data.inputs_length=16', '--config.data.targets_length=8',
       '--config.train.batch_size=8', '--config.train.num_steps=3',
       '--config.train.eval_every=3', '--config.train.eval_batches=1'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  converted, _ = convert.load_hf_params(folder)
  trained, _ = checkpoint_lib.load_params(workdir, jax.tree.map(jax.numpy.asarray, converted))
  moved = [np.max(np.abs(np.asarray(a) - b)) for a, b in
           zip(jax.tree.leaves(trained), jax.tree.leaves(converted))]
  assert max(moved) < 1e-2 and max(moved) > 0
