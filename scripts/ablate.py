"""Reproduce the Switch Transformer (SW) and ST-MoE (ST) ablation tables at tiny scale.

  python scripts/ablate.py TABLE [--steps=N] [--seeds=S] [--out=runs/ablate]
                           [--only=row1,row2] [--config.a.b=v ...]
  python scripts/ablate.py [TABLE] --list     # rows, their overrides; validated, not trained

TABLE is one of the studies in `STUDIES` (sw_table1, sw_table2, sw_table3, sw_fig12,
sw_table11, st_table8, st_zloss). Each row is a tiny config (``configs/switch_tiny.py`` or
``configs/t5_tiny.py``) plus the fields that make it the paper's row. ``--config.*`` applies to
every row (e.g. ``--config.model.num_layers=2``), but a row's own fields win so a study keeps
its meaning. ``--steps`` sets ``train.num_steps`` (evaluation always runs at the last step);
``--seeds`` defaults to the study's (3 for sw_table3, else 1), seed i setting ``seed=i``.

Each run trains into OUT/TABLE/ROW (OUT/TABLE/ROW/seed_i with several seeds). A finished run
(its last logged step is num_steps) is skipped and a partial one resumed, so re-running an
interrupted sweep continues it. At the end it prints and writes OUT/TABLE/summary.md and
summary.json (final eval neg. log perplexity mean +- std over seeds, accuracy, median train
tokens/s, dropped fractions, the paper's full-scale number) and, with matplotlib,
OUT/TABLE/curves.png. Tiny models are not expected to match the paper's values, only their
ordering. Exit code 2 with a one-line error for a bad TABLE, row name or config field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import NamedTuple

from absl import logging

from switchmoe import config as config_lib
from switchmoe import train
from switchmoe.main import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Row(NamedTuple):
  name: str
  config: str                  # a file in configs/, without .py
  fields: dict                 # {'model.moe.capacity_factor': 1.0, ...}
  paper: float | None = None   # the paper's quality (neg. log perplexity), full scale


class Study(NamedTuple):
  title: str
  paper_setup: str
  rows: tuple[Row, ...]
  seeds: int = 1


def _switch(name: str, paper: float | None, **fields) -> Row:
  """A row of configs/switch_tiny.py; fields as ``model__moe__jitter=0.01``."""
  return Row(name, 'switch_tiny', {k.replace('__', '.'): v for k, v in fields.items()}, paper)


def _capacity(name: str, train_cf: float, eval_cf: float, paper: float,
              top2: bool = False) -> Row:
  """A Switch row at train / eval capacity factors; ``top2``: MoE-Base (router topk, k=2)."""
  router = {'model__moe__router': 'topk', 'model__moe__num_selected': 2} if top2 else {}
  return _switch(name, paper, model__moe__capacity_factor=train_cf,
                 model__moe__eval_capacity_factor=eval_cf, **router)


DENSE = 't5_dense'

STUDIES = {
    'sw_table1': Study(
        'SW Table 1: dense T5 vs Switch (top-1) vs MoE (top-2) at capacity factors 2.0, 1.25, '
        '1.0 (training; evaluation at 2.0)',
        '128 experts, 100k steps; paper ex/s on 32 TPUv3 cores: T5 1600, MoE 840/790/860, '
        'Switch 860/910/1000',
        (Row(DENSE, 't5_tiny', {}, -1.731),
         _capacity('moe_top2_cf2.0', 2.0, 2.0, -1.547, top2=True),
         _capacity('switch_cf2.0', 2.0, 2.0, -1.554),
         _capacity('moe_top2_cf1.25', 1.25, 2.0, -1.559, top2=True),
         _capacity('switch_cf1.25', 1.25, 2.0, -1.553),
         _capacity('moe_top2_cf1.0', 1.0, 2.0, -1.572, top2=True),
         _capacity('switch_cf1.0', 1.0, 2.0, -1.561))),
    'sw_table2': Study(
        'SW Table 2: selective precision (float32 / bfloat16 / bfloat16 with a float32 router)',
        '32 experts, early in training; paper ex/s 1160 / 1390 / 1390; bfloat16 diverged',
        (_switch('float32', -1.718, model__dtype='float32', model__moe__router_dtype='float32'),
         _switch('bfloat16', -3.780, model__dtype='bfloat16',
                 model__moe__router_dtype='bfloat16'),
         _switch('selective', -1.716, model__dtype='bfloat16',
                 model__moe__router_dtype='float32'))),
    'sw_table3': Study(
        'SW Table 3: initialization scale 0.1 vs 1.0',
        '32 experts, 3.5k steps, 3 seeds; std 0.01 (scale 0.1) vs 0.68 (scale 1.0)',
        (_switch('init_0.1', -2.72, model__init_scale=0.1),
         _switch('init_1.0', -3.60, model__init_scale=1.0)),
        seeds=3),
    'sw_fig12': Study(
        'SW Figure 12: dense T5 vs Switch with 2 / 4 / 8 / 16 experts (same FLOPs per token)',
        'about 90k steps, read off the plot (16 experts is not in Figure 12)',
        (Row(DENSE, 't5_tiny', {}, -1.695),
         _switch('experts_2', -1.685, model__moe__num_experts=2),
         _switch('experts_4', -1.65, model__moe__num_experts=4),
         _switch('experts_8', -1.605, model__moe__num_experts=8),
         _switch('experts_16', None, model__moe__num_experts=16))),
    'sw_table11': Study(
        'SW Table 11: router exploration strategies',
        'Switch-Base scale',
        (_switch('argmax', -1.471, model__moe__exploration='argmax'),
         _switch('sample_softmax', -1.570, model__moe__exploration='sample_softmax'),
         _switch('input_dropout', -1.480, model__moe__exploration='input_dropout'),
         _switch('input_jitter', -1.468, model__moe__exploration='input_jitter',
                 model__moe__jitter=0.01))),
    'st_table8': Study(
        'ST Table 8: train / eval capacity factors for top-1 and top-2 routing',
        '32 experts, 100k steps; dense FLOP-matched baseline -1.474',
        (Row(DENSE, 't5_tiny', {}, -1.474),
         _capacity('top1_cf0.75_eval0.75', 0.75, 0.75, -1.428),
         _capacity('top1_cf0.75_eval2.0', 0.75, 2.0, -1.404),
         _capacity('top1_cf1.0_eval1.0', 1.0, 1.0, -1.397),
         _capacity('top1_cf1.0_eval2.0', 1.0, 2.0, -1.384),
         _capacity('top1_cf1.25_eval1.25', 1.25, 1.25, -1.378),
         _capacity('top1_cf1.25_eval2.0', 1.25, 2.0, -1.373),
         _capacity('top2_cf0.75_eval0.75', 0.75, 0.75, -1.424, top2=True),
         _capacity('top2_cf1.0_eval1.0', 1.0, 1.0, -1.392, top2=True),
         _capacity('top2_cf1.25_eval1.25', 1.25, 1.25, -1.375, top2=True),
         _capacity('top2_cf1.25_eval2.0', 1.25, 2.0, -1.369, top2=True),
         _capacity('top2_cf2.0_eval2.0', 2.0, 2.0, -1.360, top2=True))),
    'st_zloss': Study(
        'ST stability: router z-loss on / off (and input jitter instead)',
        'ST Tables 2-4; paper stable runs: z-loss 3/3, baseline 4/6, jitter 3/3',
        (_switch('z_loss', -1.741, model__moe__router_z_loss=0.001),
         _switch('no_z_loss', -1.755, model__moe__router_z_loss=0.0),
         _switch('input_jitter', -1.777, model__moe__router_z_loss=0.0,
                 model__moe__exploration='input_jitter', model__moe__jitter=0.01))),
}


def row_config(row: Row, overrides: list[str], steps: int | None, seed: int | None):
  """The validated config of one run: config file, user overrides, then the row's fields."""
  config = load_config(os.path.join(REPO, 'configs', f'{row.config}.py'), overrides)
  apply_overrides(config, [f'--config.{k}={v!r}' for k, v in row.fields.items()])
  if steps is not None:
    config.train.num_steps = steps
  if seed is not None:
    config.seed = seed
  config_lib.validate(config)
  return config


def select_rows(table: str, only: str | None) -> tuple[Study, list[Row]]:
  if table not in STUDIES:
    raise ValueError(f'TABLE={table!r}: unknown study; allowed: {", ".join(STUDIES)}')
  study = STUDIES[table]
  if not only:
    return study, list(study.rows)
  names = [n.strip() for n in only.split(',') if n.strip()]
  known = [r.name for r in study.rows]
  for name in names:
    if name not in known:
      raise ValueError(f'--only={name!r}: no such row in {table}; allowed: {", ".join(known)}')
  return study, [r for r in study.rows if r.name in names]


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes}m{seconds:02d}s'


def _finite(values: list) -> list[float]:
  return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values: list) -> float | None:
  values = _finite(values)
  return statistics.fmean(values) if values else None


def summarize_row(row: Row, runs: list[dict]) -> dict:
  """Per row: final evaluation (mean, std over seeds), median tokens/s, dropped fractions."""
  # A failed run's last evaluation predates its divergence: it is no final result
  finals = [next((r for r in reversed(run['records']) if 'eval/neg_log_perplexity' in r), {})
            for run in runs if not run['error']]
  nlp = _finite([f.get('eval/neg_log_perplexity') for f in finals])
  speeds = _finite([r.get('perf/tokens_per_sec') for run in runs for r in run['records']])
  return {
      'row': row.name, 'config': row.config, 'fields': row.fields, 'paper': row.paper,
      'seeds': len(runs), 'neg_log_perplexity': _mean(nlp),
      'neg_log_perplexity_std': statistics.stdev(nlp) if len(nlp) > 1 else None,
      'accuracy': _mean([f.get('eval/accuracy') for f in finals]),
      'tokens_per_sec': statistics.median(speeds) if speeds else None,
      'dropped_fraction': _mean([r.get('train/dropped_fraction')
                                 for run in runs for r in run['records']]),
      'eval_dropped_fraction': _mean([f.get('eval/dropped_fraction') for f in finals]),
      'failed': [run['error'] for run in runs if run['error']],
  }


def _cell(value, fmt: str) -> str:
  return '-' if value is None else format(value, fmt)


def markdown(table: str, study: Study, steps: int, rows: list[dict]) -> str:
  lines = [f'## {table}: {study.title}', '',
           f'Tiny scale, {steps} steps; paper: {study.paper_setup}. Small-scale values are not '
           'expected to match the paper, only the ordering and trends.', '',
           '| row | seeds | eval neg. log perplexity | eval accuracy | train tokens/s '
           '| dropped (train) | dropped (eval) | paper (full scale) |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    nlp = _cell(r['neg_log_perplexity'], '.4f')
    if r['neg_log_perplexity_std'] is not None:
      nlp += f' ± {r["neg_log_perplexity_std"]:.4f}'
    if r['failed']:
      nlp += f' ({len(r["failed"])} failed)'
    lines.append(f'| {r["row"]} | {r["seeds"]} | {nlp} | {_cell(r["accuracy"], ".4f")} '
                 f'| {_cell(r["tokens_per_sec"], ",.0f")} | {_cell(r["dropped_fraction"], ".4f")} '
                 f'| {_cell(r["eval_dropped_fraction"], ".4f")} | {_cell(r["paper"], ".3f")} |')
  failures = [f'- {r["row"]}: {e}' for r in rows for e in r['failed']]
  return '\n'.join(lines + ([''] + failures if failures else [])) + '\n'


def plot(path: str, table: str, runs: dict[str, list[dict]]) -> bool:
  """Eval neg. log perplexity vs step, one colour per row; False without matplotlib."""
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use('Agg')  # files only; no display needed
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), layout='constrained')
  for i, (name, row_runs) in enumerate(runs.items()):
    for j, run in enumerate(row_runs):
      evals = [r for r in run['records'] if 'eval/neg_log_perplexity' in r]
      ax.plot([r['step'] for r in evals], [r['eval/neg_log_perplexity'] for r in evals], 'o-',
              color=f'C{i % 10}', alpha=0.8, label=name if j == 0 else None)
  ax.set(title=table, xlabel='step', ylabel='eval neg. log perplexity (higher is better)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def run_study(table: str, *, steps: int | None = None, seeds: int | None = None,
              out: str = 'runs/ablate', only: str | None = None,
              overrides: list[str] = ()) -> dict:
  """Trains (or resumes, or skips) every run of a study and writes its summary; returns it.

  ValueError for a bad table, row or field, raised before anything is trained.
  """
  study, rows = select_rows(table, only)
  seeds = seeds or study.seeds
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: must be >= 1')
  plan = [(row, seed, row_config(row, list(overrides), steps, seed if seeds > 1 else None))
          for row in rows for seed in range(seeds)]
  folder = os.path.join(out, table)
  runs = {row.name: [] for row in rows}
  start, trained = time.time(), []
  for i, (row, seed, config) in enumerate(plan):
    workdir = os.path.join(folder, row.name, *([f'seed_{seed}'] if seeds > 1 else []))
    label = f'[{i + 1}/{len(plan)}] {table}/{row.name}' + (f' seed {seed}' if seeds > 1 else '')
    records, error = read_records(workdir), None
    if records and records[-1]['step'] == config.train.num_steps:
      print(f'{label}: skip, finished in {workdir}', flush=True)
    else:
      left = len(plan) - i
      eta = _duration(statistics.fmean(trained) * left) if trained else '?'
      print(f'{label}: training {config.train.num_steps} steps in {workdir} (elapsed '
            f'{_duration(time.time() - start)}, ETA {eta})', flush=True)
      began = time.time()
      try:
        train.train(config, workdir)
      except train.NonFiniteError as e:  # a diverged row is a result (SW Table 2), not a crash
        error = str(e)
        print(f'{label}: failed: {error}', flush=True)
      trained.append(time.time() - began)
      records = read_records(workdir)
    runs[row.name].append({'seed': config.seed, 'records': records, 'error': error})
  summary_rows = [summarize_row(row, runs[row.name]) for row in rows]
  num_steps = plan[0][2].train.num_steps
  summary = {'table': table, 'title': study.title, 'paper_setup': study.paper_setup,
             'steps': num_steps, 'seeds': seeds, 'overrides': list(overrides),
             'rows': summary_rows}
  with open(os.path.join(folder, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  text = markdown(table, study, num_steps, summary_rows)
  with open(os.path.join(folder, 'summary.md'), 'w') as f:
    f.write(text)
  print(f'\nDone in {_duration(time.time() - start)}.\n\n{text}')
  png = os.path.join(folder, 'curves.png')
  if plot(png, table, runs):
    print(f'Wrote {os.path.abspath(png)}')
  else:
    print('No plot: matplotlib is not installed (pip install -e ".[plot]").')
  return summary


def list_studies(tables: list[str], overrides: list[str], steps: int | None) -> None:
  """Prints each study's rows with their fields, validating every row's config."""
  for table in tables:
    study, rows = select_rows(table, None)
    for row in rows:  # all first, so an error is the only line printed for this study
      row_config(row, overrides, steps, None)
    print(f'{table}: {study.title} [{study.seeds} seed(s)]')
    for row in rows:
      fields = ' '.join(f'--config.{k}={v!r}' for k, v in row.fields.items())
      paper = '' if row.paper is None else f'  (paper {row.paper})'
      print(f'  {row.name:<22} configs/{row.config}.py {fields}{paper}')


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('table', nargs='?')
  parser.add_argument('--steps', type=int)
  parser.add_argument('--seeds', type=int)
  parser.add_argument('--out', default='runs/ablate')
  parser.add_argument('--only')
  parser.add_argument('--list', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    if args.list:
      list_studies([args.table] if args.table else list(STUDIES), overrides, args.steps)
    elif not args.table:
      raise ValueError(f'TABLE: missing; allowed: {", ".join(STUDIES)}')
    else:
      run_study(args.table, steps=args.steps, seeds=args.seeds, out=args.out, only=args.only,
                overrides=overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
