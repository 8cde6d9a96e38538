"""The Colab notebooks: well formed, pointing at setup.cfg's url, and run top to bottom.

Each notebook runs in its own kernel at smoke scale, its parameter cell extended with
``SCALE = 'smoke'`` and a WORKDIR under tmp_path, with the session's TFDS data_dir
(``SWITCHMOE_DATA_DIR``), one CPU device and the shared persistent compilation cache (the
notebooks train the same smoke configs, so most programs compile once).
"""

from __future__ import annotations

import configparser
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings

import nbformat
import pytest
from nbclient import NotebookClient

from tests.train_helpers import REPO, cli_env, compile_cache  # noqa: F401 (fixture)

COLAB = os.path.join(REPO, 'colab')
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLAB, '*.ipynb')))
BADGE = re.compile(r'https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/'
                   r'(colab/[\w.-]+\.ipynb)')
GITHUB = re.compile(r'https://github\.com/[\w-]+/[\w-]+')


def repository_url() -> str:
  setup_cfg = configparser.ConfigParser()
  setup_cfg.read(os.path.join(REPO, 'setup.cfg'))
  return setup_cfg['metadata']['url']


def read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(COLAB, name), as_version=nbformat.NO_CONVERT)


def code_cells(nb) -> list:
  return [c for c in nb.cells if c.cell_type == 'code']


def test_there_are_the_three_notebooks():
  assert NOTEBOOKS == ['ablations.ipynb', 'quickstart.ipynb', 'switch_vs_dense.ipynb']


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_valid_clean_and_parameters_come_first(name):
  nb = read(name)
  assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # nbformat warns, not fails, on e.g. missing cell ids
    nbformat.validate(nb)
  ids = [c.get('id') for c in nb.cells]
  assert all(ids) and len(set(ids)) == len(ids), ids
  cells = code_cells(nb)
  assert all(c.outputs == [] and c.execution_count is None for c in cells)
  assert cells[0].metadata.get('tags') == ['parameters']
  parameters = {}
  exec(cells[0].source, parameters)  # plain assignments, nothing imported or run
  assert {'SCALE', 'STEPS', 'WORKDIR'} <= parameters.keys()
  assert parameters['SCALE'] == 'cpu' and not os.path.isabs(parameters['WORKDIR'])
  assert '/tmp' not in ''.join(c.source for c in nb.cells)
  # The same install cell everywhere, right after the parameters.
  assert cells[1].source == code_cells(read('quickstart.ipynb'))[1].source
  assert 'jax.default_backend()' in cells[1].source


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_badge_and_links_point_at_setup_cfg_url(name):
  nb = read(name)
  url = repository_url()
  assert nb.cells[0].cell_type == 'markdown'
  badges = BADGE.findall(nb.cells[0].source)
  assert badges == [(url.removeprefix('https://github.com/'), f'colab/{name}')]
  text = ''.join(c.source for c in nb.cells)
  assert set(GITHUB.findall(text)) == {url}
  assert len(BADGE.findall(text)) == 1


def test_readme_points_at_setup_cfg_url():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  url = repository_url()
  assert set(GITHUB.findall(readme)) == {url}
  for path, notebook in BADGE.findall(readme):
    assert (f'https://github.com/{path}', os.path.basename(notebook) in NOTEBOOKS) == (url, True)


@pytest.mark.parametrize('runtime, pip_jax', [
    ({}, ['-c', 'WORKDIR/jax-constraints.txt']),  # the installed jax, in range: pinned
    ({'jax': '0.4.30', 'jaxlib': '0.4.30', 'jax-cuda12-plugin': '0.4.30'},  # too old: upgraded
     ['jax[cuda12]<0.13,>=0.10'])], ids=['jax_in_range', 'jax_too_old'])
def test_install_cell_on_a_fresh_runtime_clones_and_keeps_the_accelerator(
    runtime, pip_jax, tmp_path, monkeypatch, capsys):
  """The install cell in an empty folder, switchmoe not importable: it clones (here: links)
  the repository, pip-installs it keeping jax's accelerator, and imports from the clone."""
  commands = []

  def run(args, check):
    commands.append(args)
    if args[:2] == ['git', 'clone']:
      os.symlink(REPO, args[-1])

  version = importlib.metadata.version
  monkeypatch.setattr(importlib.metadata, 'version',
                      lambda name: runtime[name] if name in runtime else version(name))
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  monkeypatch.setattr(subprocess, 'run', run)
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.chdir(tmp_path)
  workdir = str(tmp_path / 'WORKDIR')
  exec(code_cells(read('quickstart.ipynb'))[1].source, {'WORKDIR': workdir})
  clone = str(tmp_path / 'switchmoe')
  assert commands == [
      ['git', 'clone', '-q', '--depth=1', repository_url(), 'switchmoe'],
      [sys.executable, '-m', 'pip', 'install', '-q',
       *(a.replace('WORKDIR', workdir) for a in pip_jax), '-e', f'{clone}[plot]']]
  assert sys.path[0] == clone
  if not runtime:
    with open(os.path.join(workdir, 'jax-constraints.txt')) as f:
      pins = f.read().split()
    assert {f'jax=={version("jax")}', f'jaxlib=={version("jaxlib")}'} <= set(pins)
  assert 'found CPU' in capsys.readouterr().out


def kernel_env(cache_dir: str, data_dir: str) -> dict:
  """The notebook kernel's environment: CPU only, one device, this session's data and cache."""
  env = cli_env(cache_dir)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return dict(env, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags), SWITCHMOE_DATA_DIR=data_dir)


def execute(name: str, workdir: str, env: dict, parameters: str = '') -> nbformat.NotebookNode:
  """Runs the notebook in colab/ (as from a checkout) with smoke-scale parameters."""
  nb = read(name)
  cell = code_cells(nb)[0]
  cell.source += f"\nSCALE = 'smoke'\nWORKDIR = {workdir!r}\n{parameters}"
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': COLAB}}).execute(env=env)
  return nb


def outputs(nb, kind: str) -> str:
  """Text of all outputs of one kind: 'stream', or a MIME type such as 'text/markdown'."""
  parts = []
  for cell in code_cells(nb):
    for out in cell.outputs:
      if kind == 'stream' and out.output_type == 'stream':
        parts.append(out.text)
      elif kind in out.get('data', {}):
        parts.append(out.data[kind])
  return '\n'.join(parts)


@pytest.fixture
def run_notebook(tmp_path, data_dir, corpus, compile_cache):
  """Executes a notebook; checks that it wrote nothing outside its WORKDIR (in colab/)."""
  env = kernel_env(compile_cache, data_dir)

  def run(name, parameters=''):
    before = sorted(os.listdir(COLAB))
    workdir = str(tmp_path / 'work')
    nb = execute(name, workdir, env, parameters)
    assert sorted(os.listdir(COLAB)) == before
    assert 'found CPU' in outputs(nb, 'stream')  # the install cell's report
    return nb, workdir

  return run


def test_quickstart_trains_plots_and_shows_routing(run_notebook):
  nb, workdir = run_notebook('quickstart.ipynb')
  run = os.path.join(workdir, 'quickstart', 'switch_tiny_smoke')
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    assert json.loads(f.readlines()[-1])['step'] == 6
  assert os.path.isfile(os.path.join(run, 'curves.png'))
  assert outputs(nb, 'image/png')
  text = outputs(nb, 'stream')
  # Smoke scale: 2 encoder layers, the second a Switch layer; one table per sample.
  assert text.count('\nencoder/layer_1 ') >= 3 and 'encoder/layer_3' not in text
  assert text.count('dropped tokens (of ') == 3
  assert 'token           T h e \u2423 q u i c k' in text


def test_switch_vs_dense_shows_the_pair_with_intervals(run_notebook):
  nb, workdir = run_notebook('switch_vs_dense.ipynb')
  summary = outputs(nb, 'text/markdown')
  assert 't5_dense' in summary and 'switch_cf1.25' in summary
  assert outputs(nb, 'image/png')
  folder = os.path.join(workdir, 'sw_table1')
  runs = {f for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f))}
  assert runs == {'t5_dense', 'switch_cf1.25'}


def test_ablations_runs_a_study(run_notebook):
  nb, workdir = run_notebook('ablations.ipynb', "TABLE = 'sw_table2'\nONLY = 'float32'")
  assert 'float32' in outputs(nb, 'text/markdown')
  assert 'sw_table2: ' in outputs(nb, 'stream')  # list_studies validated the study's rows
  assert os.listdir(os.path.join(workdir, 'sw_table2', 'float32'))
