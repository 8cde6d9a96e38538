"""The README's shell commands work as written on a fresh clone: every command of its ```bash
blocks runs here, in README order (later commands read what earlier ones wrote), runs as
written in the slow suite (`SLOW`), or is excused in `EXCUSED` with the reason it cannot run
here."""

import configparser
import gzip
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import sysconfig

import pytest

from switchmoe import sources
from tests.train_helpers import REPO, cli_env, compile_cache  # noqa: F401  (a fixture)

# README commands that cannot run here, and why. A command neither run nor excused fails the
# test, and so does an entry that is no longer in the README.
EXCUSED = {
    "pip install -e '.[test]' && python -m pytest tests": 'the test suite itself',
    'srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 switchmoe-train '
    '--config=configs/switch_base.py --workdir=/shared/runs/sb --config.mesh.shape=\'(-1,32)\'':
        'needs SLURM (srun) and 4 hosts of 8 GPUs',
    'tfds build c4/en:3.0.1 --data_dir=/data/tfds --file_format=array_record':
        'downloads C4 (needs the network and ~1 TB)',
    'switchmoe-train --config=configs/switch_base.py --workdir=runs/base '
    '--config.data.source=c4/en:3.0.1 --config.data.data_dir=/data/tfds '
    '--config.data.tokenizer=/data/t5/sentencepiece.model':
        "needs C4 prepared by the command above and T5's SentencePiece model",
    'huggingface-cli download google/switch-base-8 --local-dir=/data/hf/switch-base-8':
        'downloads from the HuggingFace hub (needs the network)',
    'python scripts/convert_hf.py --hf_dir=/data/hf/switch-base-8 --out=runs/switch-base-8':
        'needs the download above; tests/test_convert.py runs convert_hf.py on tiny folders '
        "written in HF's layout",
    'python scripts/convert_hf.py --hf_dir=/data/hf/switch-base-128 --out=runs/switch-base-128 '
    '--config.mesh.shape=\'(2,4)\' --config.mesh.axes="(\'data\',\'expert\')"':
        'needs switch-base-128 from the hub and 8 devices; tests/test_convert.py converts onto '
        'a (2, 4) mesh of simulated devices and from two processes',
    'python scripts/ablate.py sw_table1 --scale=cpu':
        'about 1.5 h on 2 cores; its results are committed in docs/results/ and the smoke '
        'scale of the same script runs here and in tests/test_ablate.py',
}

# README commands too slow for the default suite, with what each takes on 2 cores: the slow
# test below runs them as written.
SLOW = {
    "python scripts/plan.py --config=configs/switch_base.py --devices=32 "
    "--config.mesh.shape='(1,32)'": 'compiles Switch-Base for 32 devices, ~2 min',
}

# The package is installed already (pip install -e '.[test]'); the rest of the command runs.
PIP_INSTALL = re.compile(r'^pip install -e \S+ && ')

# Appended to every training command: a model that compiles in seconds, with the layout as
# written (architecture, Switch layers, experts, mesh).
TINY_MODEL = ['--config.model.d_model=32', '--config.model.num_layers=2',
              '--config.model.num_heads=2', '--config.model.d_kv=16', '--config.model.d_ff=64',
              '--config.model.moe.group_size=64', '--config.train.batch_size=8',
              '--config.data.inputs_length=32', '--config.data.targets_length=16',
              '--config.train.eval_batches=1']


def without_comment(line: str) -> str:
  """``line`` up to its shell comment: a ``#`` starting a word outside quotes."""
  for match in re.finditer(r'(?:^|\s)#', line):
    try:
      shlex.split(line[:match.start()])
    except ValueError:  # no closing quotation: the '#' is quoted
      continue
    return line[:match.start()].rstrip()
  return line


def readme_commands() -> list[str]:
  """The commands of README.md's ```bash blocks, continued lines joined, comments dropped."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  commands = []
  for block in re.findall(r'^ *```bash\n(.*?)^ *```', text, re.M | re.S):
    for line in re.sub(r'\\\n\s*', '', block).splitlines():
      command = without_comment(line.strip())
      if command:
        commands.append(command)
  return commands


def appended(command: str, later: list[str]) -> list[str]:
  """Flags appended to ``command`` to make it quick here; what the README wrote stays."""
  if 'switchmoe-train' in command:
    workdir = re.search(r'--workdir=(\S+)', command).group(1)
    if any(f'{workdir}/checkpoints/' in c for c in later):
      return TINY_MODEL  # the written number of steps: a later command reads a step's checkpoint
    return TINY_MODEL + ['--config.train.num_steps=2']
  if 'train_tokenizer.py' in command:
    # Less text; the default 32000 pieces need more text than the test corpus holds.
    return ['--max_chars=1000000'] + ([] if '--vocab_size=' in command else ['--vocab_size=1000'])
  if 'benchmark_data.py' in command:
    return ['--batches=3', '--workers=0']
  if 'scripts/benchmark.py' in command:  # toy sizes; tests/test_benchmark.py checks the records
    return ['--tokens=256', '--d_model=16', '--d_ff=32', '--repeats=1', '--steps=1',
            '--batch_size=8', '--set=model.num_layers=1,model.d_model=16,model.d_ff=32']
  return []


def write_own_corpus(folder: pathlib.Path) -> None:
  """The files the README's own-corpus commands read: corpus/**/*.txt and dumps/*.jsonl.gz."""
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  (folder / 'corpus' / 'lib').mkdir(parents=True)
  for name in ('argparse', 'dataclasses', 'textwrap'):
    (folder / 'corpus' / 'lib' / f'{name}.txt').write_text((stdlib / f'{name}.py').read_text())
  (folder / 'dumps').mkdir()
  passages = sources.split_passages((stdlib / 'shutil.py').read_text())
  (folder / 'dumps' / 'shutil.jsonl.gz').write_bytes(
      gzip.compress('\n'.join(json.dumps({'text': p}) for p in passages).encode('utf-8')))


def test_every_excused_command_is_in_the_readme():
  commands = readme_commands()
  assert not (set(EXCUSED) | set(SLOW)) - set(commands)
  # The parser sees every block, continued lines and comments included.
  assert len(commands) > 10 and commands[0].startswith('pip install -e . && switchmoe-train')
  assert not any(c.endswith('\\') or re.search(r'\s#', c) for c in commands)


def test_readme_commands_run_as_written(data_dir, corpus, compile_cache, tmp_path):
  # Run from a folder of their own, where their outputs land (runs/, spm/, exports/, ...).
  for name in ('configs', 'scripts'):
    (tmp_path / name).symlink_to(os.path.join(REPO, name))
  write_own_corpus(tmp_path)
  inputs = set(os.listdir(tmp_path))
  # One CPU device, as on a laptop: XLA_FLAGS only where a command sets it.
  env = {k: v for k, v in cli_env(compile_cache).items() if k != 'XLA_FLAGS'}
  env.update(SWITCHMOE_DATA_DIR=data_dir,  # the session's corpora, not ~/.cache
             PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
  commands = readme_commands()
  stdout = {}
  for i, command in enumerate(commands):
    if command in EXCUSED or command in SLOW:
      continue
    command = PIP_INSTALL.sub('', command)
    line = ' '.join([command, *map(shlex.quote, appended(command, commands[i + 1:]))])
    done = subprocess.run(['bash', '-c', line], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f'{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}'
    stdout[command] = done.stdout

  def output_of(program: str) -> list[str]:
    return [out for command, out in stdout.items() if program in command]

  run = tmp_path / 'runs' / 'switch_tiny'
  assert output_of('--workdir=runs/switch_tiny')[0].splitlines()[-1].startswith(
      f'Done: checkpoint {run}/checkpoints/300, metrics {run}/metrics.jsonl')
  evaluations = [json.loads(out.splitlines()[-1]) for out in output_of('evaluate.py')]
  assert [e['step'] for e in evaluations] == [300, 300]
  assert all(e['eval/ce'] > 0 for e in evaluations)
  assert (tmp_path / 'exports' / 'switch_tiny' / 'params').is_dir()
  assert output_of('generate.py')[0].startswith('The <extra_id_0> walks in <extra_id_1> park -> ')
  assert os.path.getsize(tmp_path / 'curves.png') > 10_000
  assert (tmp_path / 'spm' / 'stdlib8k.model').is_file()
  # A fresh clone stays clean: git ignores whatever the commands wrote.
  written = sorted(set(os.listdir(tmp_path)) - inputs)
  assert 'runs' in written
  paths = [name + '/' if (tmp_path / name).is_dir() else name for name in written]
  ignored = subprocess.run(['git', 'check-ignore', '--no-index', *paths], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
  assert ignored == paths


@pytest.mark.slow
@pytest.mark.parametrize('command', SLOW)
def test_slow_readme_commands_run_as_written(command):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  done = subprocess.run(['bash', '-c', command], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert done.returncode == 0, f'{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}'
  if 'plan.py' in command:  # the README's figures for it
    count = int(re.search(r'parameters \(all devices\) +([\d,]+)', done.stdout).group(1)
                .replace(',', ''))
    params = re.search(r'params per device +([\d.]+) GiB', done.stdout).group(1)
    with open(os.path.join(REPO, 'README.md')) as f:
      readme = ' '.join(f.read().split())
    assert f'({count / 1e9:.2f}B parameters)' in readme
    assert f'{float(params):.2f} GiB of parameters' in readme


def test_license_is_the_apache_text_that_setup_cfg_names():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  assert setup['metadata']['license'] == 'Apache-2.0'
  assert setup['metadata']['license_files'] == 'LICENSE'
  with open(os.path.join(REPO, 'LICENSE')) as f:
    text = ' '.join(f.read().split())
  assert text.startswith('Apache License Version 2.0, January 2004 '
                         'http://www.apache.org/licenses/ TERMS AND CONDITIONS')
  assert 'END OF TERMS AND CONDITIONS' in text
