"""Bad configs and workdirs are refused before compiling, with a one-line error naming the
field, and nothing is written to the workdir."""

import importlib.util
import json
import os

import ml_collections
import pytest

from switchmoe import config as config_lib
from switchmoe import train
from tests.helpers import tiny_config
from tests.train_helpers import REPO


def setter(path, value):
  def apply(c):
    *parents, leaf = path.split('.')
    node = c
    for key in parents:
      node = node[key]
    node[leaf] = value
  return apply


def replace_section(path, section):
  """Swaps a whole section, bypassing the type checks that ConfigDict makes per field."""
  def apply(c):
    parent, leaf = path.rsplit('.', 1) if '.' in path else ('', path)
    node = c[parent] if parent else c
    with node.ignore_type():
      node[leaf] = section(node[leaf])
  return apply


def with_field(section_path, **extra):
  def section(old):
    return ml_collections.ConfigDict({**old.to_dict(), **extra})
  return replace_section(section_path, section)


def decoder(c):
  c.model.arch, c.data.objective = 'decoder', 'causal_lm'


BAD = [
    # unknown fields and wrong types (as a config file could write them)
    (with_field('train', num_step=10), r"^train\.num_step=10: unknown field \(did you mean "
                                       r"num_steps\?\); allowed: batch_size, "),
    (with_field('model.moe', expert=4), r"^model\.moe\.expert=4: unknown field"),
    (with_field('train', num_steps='100'), r"^train\.num_steps='100': wrong type str; "
                                           r"allowed: an int$"),
    (with_field('train', batch_size=8.5), r"^train\.batch_size=8\.5: wrong type float"),
    (with_field('model', tie_embeddings=1), r"^model\.tie_embeddings=1: wrong type int; "
                                            r"allowed: True or False$"),
    (setter('optim.learning_rate', None), r"^optim\.learning_rate=None: wrong type"),
    (replace_section('model.moe', lambda old: 8), r"^model\.moe=8: must be a section"),
    (setter('mesh.shape', (2, '4')), r"^mesh\.shape=\(2, '4'\): entries must be ints"),
    # impossible values
    (setter('model.moe.capacity_factor', 0.0), r"^model\.moe\.capacity_factor=0\.0: must be "
                                               r"> 0$"),
    (setter('model.moe.eval_capacity_factor', -1.0), r"^model\.moe\.eval_capacity_factor="),
    (setter('model.moe.group_size', 24), r"^model\.moe\.group_size=24: does not divide the "
                                         r"128 decoder tokens .*allowed: a divisor of 128$"),
    (setter('data.inputs_length', 30), r"^model\.moe\.group_size=32: does not divide the 240 "
                                       r"encoder tokens"),
    (setter('model.arch', 'encoder'), r"^model\.arch='encoder': not an option; allowed: "
                                      r"'encoder_decoder', 'decoder'$"),
    (setter('optim.name', 'sgd'), r"^optim\.name='sgd': not an option"),
    (setter('train.nonfinite', 'ignore'), r"^train\.nonfinite='ignore': not an option; "
                                          r"allowed: 'skip', 'stop'$"),
    (setter('train.keep_checkpoints', 0), r"^train\.keep_checkpoints=0: must be >= 1$"),
    (setter('train.keep_period', -5), r"^train\.keep_period=-5: must be >= 0$"),
    (setter('train.eval_batches', 0), r"^train\.eval_batches=0: must be >= 1$"),
    (setter('train.peak_flops', -1.0), r"^train\.peak_flops=-1\.0: must be >= 0$"),
    (setter('train.init_from_params', 'enc(oder'), r"^train\.init_from_params='enc\(oder': "
                                                   r"bad regex"),
    (setter('optim.grad_clip', -1.0), r"^optim\.grad_clip=-1\.0: must be >= 0$"),
    (setter('seed', -1), r"^seed=-1: must be >= 0$"),
    (setter('model.dropout_rate', 1.0), r"^model\.dropout_rate=1\.0: must be in \[0, 1\)$"),
    (setter('train.batch_size', 0), r"^train\.batch_size=0: must be > 0$"),
    (setter('optim.learning_rate', float('inf')), r"^optim\.learning_rate=inf: must be finite$"),
    (setter('optim.learning_rate', float('nan')), r"^optim\.learning_rate=nan: must be finite$"),
    (setter('optim.learning_rate', 0.0), r"^optim\.learning_rate=0\.0: must be > 0$"),
    # every float field is checked for finiteness, not just the learning rate
    (setter('model.init_scale', float('inf')), r"^model\.init_scale=inf: must be finite$"),
    (setter('model.moe.capacity_factor', float('nan')),
     r"^model\.moe\.capacity_factor=nan: must be finite$"),
    (setter('optim.grad_clip', float('inf')), r"^optim\.grad_clip=inf: must be finite$"),
    (setter('train.max_skipped_steps', 0), r"^train\.max_skipped_steps=0: must be >= 1$"),
    (setter('model.moe.router_z_loss', -0.1), r"^model\.moe\.router_z_loss=-0\.1: must be >= 0$"),
    (setter('model.moe.load_balance_loss', -0.01), r"^model\.moe\.load_balance_loss=-0\.01: "
                                                   r"must be >= 0$"),
    (setter('model.moe.importance_loss', -1.0), r"^model\.moe\.importance_loss=-1\.0: must be "
                                                r">= 0$"),
    (setter('model.moe.expert_capacity', -1), r"^model\.moe\.expert_capacity=-1: must be >= 0$"),
    (lambda c: (setter('model.moe.expert_capacity', 4)(c),
                setter('model.moe.dispatch', 'dropless')(c)),
     r'^model\.moe\.expert_capacity=4: no effect with dispatch="dropless"'),
    # combinations owned by the router options
    (lambda c: (decoder(c), setter('model.moe.batch_prioritized', True)(c)),
     r"^model\.moe\.batch_prioritized=True: .*decoder"),
    (lambda c: (setter('model.moe.router', 'experts_choose')(c),
                setter('model.moe.dispatch', 'dropless')(c)),
     r'^model\.moe\.dispatch="dropless": needs a tokens-choose router'),
    (lambda c: (setter('model.moe.router', 'experts_choose')(c),
                setter('model.moe.bias_update_rate', 0.001)(c)),
     r'^model\.moe\.bias_update_rate=0\.001: only for tokens-choose routers \(switch, topk\)$'),
    (lambda c: (setter('model.moe.exploration', 'sample_softmax')(c),
                setter('model.moe.bias_update_rate', 0.001)(c)),
     r'^model\.moe\.bias_update_rate=0\.001: the bias steers the argmax'),
    (setter('model.moe.bias_update_rate', -0.001), r"^model\.moe\.bias_update_rate=-0\.001: "
                                                   r"must be >= 0$"),
    (setter('model.moe.num_shared_experts', -1), r"^model\.moe\.num_shared_experts=-1: must "
                                                 r"be >= 0$"),
    # exploration fields that the chosen mode would not read
    (setter('model.moe.jitter', 0.01), r"^model\.moe\.jitter=0\.01: no effect with "
                                       r"exploration='argmax'; allowed: 0\.0, or "
                                       r'exploration="input_jitter"$'),
    (lambda c: (setter('model.moe.exploration', 'input_dropout')(c),
                setter('model.moe.jitter', 0.01)(c)),
     r"^model\.moe\.jitter=0\.01: no effect with exploration='input_dropout'"),
    (setter('model.moe.exploration', 'input_jitter'), r'^model\.moe\.exploration="input_jitter"'
                                                      r': set model\.moe\.jitter > 0'),
    (lambda c: (setter('model.moe.exploration', 'input_dropout')(c),
                setter('model.moe.router_input_dropout', 0.0)(c)),
     r'^model\.moe\.router_input_dropout=0\.0: must be in \(0, 1\) for '
     r'exploration="input_dropout"$'),
    (lambda c: (setter('model.moe.router', 'topk')(c),
                setter('model.moe.exploration', 'sample_softmax')(c)),
     r"^model\.moe\.exploration='sample_softmax': only for router=\"switch\"$"),
]


@pytest.mark.parametrize('mutate, message', BAD, ids=[m for _, m in BAD])
def test_bad_config_is_refused_before_anything_is_written(mutate, message, data_dir, tmp_path):
  c = tiny_config()
  c.data.data_dir = data_dir  # never the user's cache, even if a case were let through
  mutate(c)
  with pytest.raises(ValueError, match=message) as error:
    train.train(c, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'run')


def test_shipped_configs_are_valid():
  for name in ('switch_tiny', 't5_tiny', 'switch_base', 't5_base'):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs',
                                                                    f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_lib.validate(module.get_config())


@pytest.mark.parametrize('router', ['switch', 'topk', 'experts_choose'])
def test_router_input_exploration_works_with_every_router(router):
  """Input jitter and input dropout act on the router's input, which every router has."""
  config_lib.validate(tiny_config(router=router, exploration='input_jitter', jitter=0.01))
  config_lib.validate(tiny_config(router=router, exploration='input_dropout'))


def test_group_size_0_is_one_group_per_sequence_whatever_the_lengths():
  c = tiny_config(group_size=0)
  c.data.inputs_length, c.data.targets_length = 30, 7  # no group size divides both stacks
  config_lib.validate(c)
  c.model.moe.group_size = -1
  with pytest.raises(ValueError, match=r'^model\.moe\.group_size=-1: must be >= 0$'):
    config_lib.validate(c)


def test_group_size_is_capped_at_the_batch_tokens():
  c = tiny_config()
  c.model.moe.group_size = 10_000  # larger than any stack's tokens: one group per stack
  config_lib.validate(c)


def write_run(workdir, config, step=5):
  """What a checkpoint commits of a run's identity: its config (``<step>/config``)."""
  folder = os.path.join(workdir, 'checkpoints', str(step), 'config')
  os.makedirs(folder)
  with open(os.path.join(folder, 'metadata'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def test_workdir_with_an_incompatible_run_is_refused_untouched(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  old = tiny_config()
  old.model.d_model = 64
  write_run(workdir, old)
  before = files(workdir)
  new = tiny_config()
  new.data.data_dir = data_dir
  with pytest.raises(ValueError, match=(
      rf'^model\.d_model=32: --workdir={workdir} holds a run \(checkpoint 5\) with '
      r'model\.d_model=64; allowed: its value \(to resume that run\) or a new --workdir$')):
    train.train(new, workdir)
  lock = os.path.join(workdir, 'lock')
  assert os.path.getsize(lock) == 0  # taken for the check, then released
  assert {k: v for k, v in files(workdir).items() if k != lock} == before


def files(workdir):
  """{path: mtime} of every file under ``workdir``."""
  paths = [os.path.join(root, n) for root, _, names in os.walk(workdir) for n in names]
  return {p: os.path.getmtime(p) for p in paths}


def test_a_start_that_saved_nothing_constrains_nothing(tmp_path):
  """Identity comes from checkpoints: a config.json left by a failed start is not one."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  other = tiny_config()
  other.model.d_model = 64
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(other.to_json_best_effort())
  train.check_workdir(tiny_config(), workdir)
  write_run(workdir, other)
  with pytest.raises(ValueError, match=r'^model\.d_model=32: '):
    train.check_workdir(tiny_config(), workdir)


def test_workdir_resume_may_change_capacity_dropout_and_schedule(tmp_path):
  workdir = str(tmp_path / 'run')
  write_run(workdir, tiny_config())
  new = tiny_config()
  new.model.moe.capacity_factor, new.model.dropout_rate = 2.0, 0.1
  new.optim.learning_rate, new.optim.grad_clip, new.train.num_steps = 1e-4, 1.0, 1000
  train.check_workdir(new, workdir)
  for field, value in (('model.moe.num_experts', 4), ('optim.name', 'adafactor'),
                       ('seed', 1)):
    changed = tiny_config()
    setter(field, value)(changed)
    with pytest.raises(ValueError, match=rf'^{field}='):
      train.check_workdir(changed, workdir)


def test_workdir_resume_keeps_expert_biases_on_or_off(tmp_path):
  workdir = str(tmp_path / 'run')
  with_bias = tiny_config(bias_update_rate=0.001)
  write_run(workdir, with_bias)
  train.check_workdir(tiny_config(bias_update_rate=0.01), workdir)  # the rate may change
  with pytest.raises(ValueError, match=r'^model\.moe\.bias_update_rate=0\.0: .* holds a run '
                                       r'.* with '
                                       r'expert biases; allowed: a rate > 0'):
    train.check_workdir(tiny_config(), workdir)


def test_missing_init_from_is_refused_before_compiling(data_dir, tmp_path):
  c = tiny_config()
  c.data.data_dir = data_dir
  c.train.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='nowhere: not a run folder, checkpoint step or export'):
    train.train(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_config_json_round_trips_through_find_config(tmp_path):
  from switchmoe import checkpoint
  c = tiny_config()
  c.mesh.shape, c.mesh.rules = (2, 4), (('embed', 'fsdp'),)
  os.makedirs(tmp_path / 'export' / 'params')
  with open(tmp_path / 'export' / 'config.json', 'w') as f:
    json.dump(json.loads(c.to_json()), f)
  loaded = checkpoint.find_config(str(tmp_path / 'export'))
  assert loaded.mesh.shape == (2, 4) and loaded.mesh.rules == (('embed', 'fsdp'),)
  config_lib.validate(loaded)
  assert loaded.to_json() == c.to_json()
