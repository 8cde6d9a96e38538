"""Reproduce the Switch Transformer (SW) and ST-MoE (ST) ablations, with seeds and intervals.

  python scripts/ablate.py STUDY [--scale=smoke|cpu|paper] [--seeds=S] [--steps=N]
                           [--only=row1,row2] [--out=runs/ablate] [--config.a.b=v ...]
  python scripts/ablate.py [STUDY] --list [--scale=...]   # rows and overrides, validated

STUDY is one of `STUDIES` (sw_table1, sw_table2, sw_table3, sw_fig12, sw_table11, st_table8,
st_zloss). Each row is a Switch or dense config at the chosen scale plus the fields that make
it the paper's row. ``--scale`` (`SCALES`): ``smoke`` takes seconds (tests), ``cpu`` is sized
so the effects can rise above seed noise on a 2-core CPU (docs/results/README.md says why that
size), ``paper`` is the paper's T5-Base / Switch-Base setup for accelerators (pass the C4 and
SentencePiece fields as ``--config.data.*``). ``--config.*`` applies to every row after the
scale's fields, but a row's own fields win so a study keeps its meaning; seed i sets ``seed=i``.

Each run trains into OUT/STUDY/ROW/seed_i. A finished run (its last logged step is num_steps)
is skipped and a partial one resumed, so re-running an interrupted sweep continues it. The
summary, OUT/STUDY/STUDY.md and STUDY.json, gives per row the final evaluation neg. log
perplexity (mean, std and 95% t-interval over seeds), its difference to the study's baseline
row with a 95% interval (paired by seed, which fixes the data order), the steps and wall-clock
time it needs to reach the baseline's final quality (the paper's "time to quality" speed-up),
and a verdict per paper claim: reproduced, not reproduced (the interval excludes zero the other
way) or inconclusive. With matplotlib, OUT/STUDY/STUDY.png draws train and eval curves, one
line per row with a band over seeds. Exit code 2 with one line for a bad STUDY, row or field.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import scipy.stats
from absl import logging

from switchmoe import config as config_lib
from switchmoe import train
from switchmoe.main import apply_overrides, load_config
from switchmoe.metrics import read_metrics
from switchmoe.workdir import LockHeld

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY = 'eval/neg_log_perplexity'


class Row(NamedTuple):
  name: str
  kind: str                    # 'switch' or 'dense': which config of the scale it starts from
  fields: dict                 # {'model.moe.capacity_factor': 1.0, ...}
  paper: float | None = None   # the paper's quality (neg. log perplexity), full scale


class Claim(NamedTuple):
  """The paper says row ``better`` reaches a higher final quality than row ``worse``."""
  text: str
  better: str
  worse: str


class Study(NamedTuple):
  title: str
  paper_setup: str
  rows: tuple[Row, ...]
  claims: tuple[Claim, ...] = ()
  paper_fields: dict = {}      # fields of the paper's own setup, used at scale='paper'

  @property
  def baseline(self) -> str:
    """Differences and speed-ups are taken against the first row."""
    return self.rows[0].name


class Scale(NamedTuple):
  description: str
  configs: dict                # row kind -> file in configs/, without .py
  fields: dict                 # applied to every row before the user's overrides
  seeds: int                   # default number of seeds


TINY = {'switch': 'switch_tiny', 'dense': 't5_tiny'}
SCALES = {
    'smoke': Scale('seconds per row, for tests: 2 + 2 layers, 6 steps, 1 eval batch', TINY,
                   {'model.num_layers': 2, 'train.num_steps': 6, 'train.log_every': 2,
                    'train.eval_every': 3, 'train.eval_batches': 1,
                    'train.checkpoint_every': 6}, 1),
    'cpu': Scale('switch_tiny / t5_tiny for 600 steps, evaluated every 30 on 16 batches '
                 '(about 4 minutes per run on 2 cores)', TINY,
                 {'train.num_steps': 600, 'train.log_every': 10, 'train.eval_every': 30,
                  'train.eval_batches': 16, 'train.checkpoint_every': 300}, 3),
    'paper': Scale('T5-Base / Switch-Base (configs/t5_base.py, switch_base.py), the paper\'s '
                   'batch and steps; C4 and the T5 vocabulary via --config.data.*',
                   {'switch': 'switch_base', 'dense': 't5_base'}, {}, 1),
}


def _switch(name: str, paper: float | None, **fields) -> Row:
  """A Switch row; fields as ``model__moe__jitter=0.01``."""
  return Row(name, 'switch', {k.replace('__', '.'): v for k, v in fields.items()}, paper)


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
        (Row(DENSE, 'dense', {}, -1.731),
         _capacity('moe_top2_cf2.0', 2.0, 2.0, -1.547, top2=True),
         _capacity('switch_cf2.0', 2.0, 2.0, -1.554),
         _capacity('moe_top2_cf1.25', 1.25, 2.0, -1.559, top2=True),
         _capacity('switch_cf1.25', 1.25, 2.0, -1.553),
         _capacity('moe_top2_cf1.0', 1.0, 2.0, -1.572, top2=True),
         _capacity('switch_cf1.0', 1.0, 2.0, -1.561)),
        (Claim('Switch (capacity factor 1.25) beats dense T5 at equal FLOPs per token',
               'switch_cf1.25', DENSE),
         Claim('MoE top-2 (capacity factor 1.25) beats dense T5', 'moe_top2_cf1.25', DENSE),
         Claim('at capacity factor 1.0, Switch beats MoE top-2', 'switch_cf1.0',
               'moe_top2_cf1.0')),
        {'model.moe.num_experts': 128}),
    'sw_table2': Study(
        'SW Table 2: selective precision (float32 / bfloat16 / bfloat16 with a float32 router)',
        '32 experts, early in training; paper ex/s 1160 / 1390 / 1390; bfloat16 diverged',
        (_switch('float32', -1.718, model__dtype='float32', model__moe__router_dtype='float32'),
         _switch('bfloat16', -3.780, model__dtype='bfloat16',
                 model__moe__router_dtype='bfloat16'),
         _switch('selective', -1.716, model__dtype='bfloat16',
                 model__moe__router_dtype='float32')),
        (Claim('a float32 router (selective precision) beats an all-bfloat16 model',
               'selective', 'bfloat16'),),
        {'model.moe.num_experts': 32}),
    'sw_table3': Study(
        'SW Table 3: initialization scale 0.1 vs 1.0',
        '32 experts, 3.5k steps, 3 seeds; std 0.01 (scale 0.1) vs 0.68 (scale 1.0)',
        (_switch('init_0.1', -2.72, model__init_scale=0.1),
         _switch('init_1.0', -3.60, model__init_scale=1.0)),
        (Claim('the reduced initialization scale 0.1 beats 1.0', 'init_0.1', 'init_1.0'),),
        {'model.moe.num_experts': 32, 'train.num_steps': 3500}),
    'sw_fig12': Study(
        'SW Figure 12: dense T5 (one expert) vs Switch with 2 / 4 / 8 / 16 / 32 experts, '
        'same FLOPs per token',
        'about 90k steps, read off the plot (16 experts is not in Figure 12)',
        (Row(DENSE, 'dense', {}, -1.695),
         _switch('experts_2', -1.685, model__moe__num_experts=2),
         _switch('experts_4', -1.65, model__moe__num_experts=4),
         _switch('experts_8', -1.605, model__moe__num_experts=8),
         _switch('experts_16', None, model__moe__num_experts=16),
         _switch('experts_32', -1.575, model__moe__num_experts=32)),
        (Claim('Switch with 8 experts beats dense T5', 'experts_8', DENSE),
         Claim('more experts help: 32 experts beat 2', 'experts_32', 'experts_2'),
         Claim('more experts help: 32 experts beat 8', 'experts_32', 'experts_8'))),
    'sw_table11': Study(
        'SW Table 11: router exploration strategies',
        'Switch-Base scale',
        (_switch('argmax', -1.471, model__moe__exploration='argmax'),
         _switch('sample_softmax', -1.570, model__moe__exploration='sample_softmax'),
         _switch('input_dropout', -1.480, model__moe__exploration='input_dropout'),
         _switch('input_jitter', -1.468, model__moe__exploration='input_jitter',
                 model__moe__jitter=0.01)),
        (Claim('argmax routing beats sampling from the softmax', 'argmax', 'sample_softmax'),)),
    'st_table8': Study(
        'ST Table 8: train / eval capacity factors for top-1 and top-2 routing',
        '32 experts, 100k steps; dense FLOP-matched baseline -1.474',
        (Row(DENSE, 'dense', {}, -1.474),
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
         _capacity('top2_cf2.0_eval2.0', 2.0, 2.0, -1.360, top2=True)),
        (Claim('a larger evaluation capacity factor helps (top-1 at 0.75)',
               'top1_cf0.75_eval2.0', 'top1_cf0.75_eval0.75'),
         Claim('top-1 at capacity factor 1.25 beats dense', 'top1_cf1.25_eval1.25', DENSE)),
        {'model.moe.num_experts': 32}),
    'st_zloss': Study(
        'ST stability: router z-loss on / off (and input jitter instead)',
        'ST Tables 2-4; paper stable runs: z-loss 3/3, baseline 4/6, jitter 3/3',
        (_switch('z_loss', -1.741, model__moe__router_z_loss=0.001),
         _switch('no_z_loss', -1.755, model__moe__router_z_loss=0.0),
         _switch('input_jitter', -1.777, model__moe__router_z_loss=0.0,
                 model__moe__exploration='input_jitter', model__moe__jitter=0.01)),
        (Claim('the router z-loss improves quality', 'z_loss', 'no_z_loss'),
         Claim('the z-loss beats input jitter', 'z_loss', 'input_jitter'))),
}


# ----------------------------------------------------------------------------- statistics

def mean_interval(values: list[float], level: float = 0.95) -> dict:
  """Mean, sample std and the t-interval of the mean; std and interval need two values."""
  n = len(values)
  out = {'mean': statistics.fmean(values) if values else None, 'std': None, 'low': None,
         'high': None, 'n': n}
  if n > 1:
    std = statistics.stdev(values)
    half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    out.update(std=std, low=out['mean'] - half, high=out['mean'] + half)
  return out


def difference(values: dict[int, float], base: dict[int, float], level: float = 0.95) -> dict:
  """Mean of ``values - base`` (each keyed by seed) with its t-interval.

  Paired by seed when both have the same seeds (a seed fixes the data order, so pairing removes
  that share of the noise); otherwise Welch's interval with Satterthwaite's degrees of freedom.
  """
  if values and values.keys() == base.keys():
    out = mean_interval([values[s] - base[s] for s in sorted(values)], level)
    return {**out, 'paired': True}
  a, b = list(values.values()), list(base.values())
  out = {'mean': None, 'std': None, 'low': None, 'high': None, 'n': min(len(a), len(b)),
         'paired': False}
  if not a or not b:
    return out
  out['mean'] = statistics.fmean(a) - statistics.fmean(b)
  if len(a) > 1 and len(b) > 1:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb)**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se else 1
    half = scipy.stats.t.ppf(0.5 + level / 2, df) * se
    out.update(std=se, low=out['mean'] - half, high=out['mean'] + half)
  return out


def verdict(diff: dict) -> str:
  """For a claim "better beats worse", given the interval of better - worse."""
  if diff['low'] is None:
    return 'inconclusive (one seed: no interval)' if diff['mean'] is not None else 'no result'
  if diff['low'] > 0:
    return 'reproduced'
  if diff['high'] < 0:
    return 'not reproduced (the opposite holds)'
  return 'inconclusive (the interval contains 0)'


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
  """First step at which a rising quality curve reaches ``target``, linearly interpolated
  between evaluations; None if it never does."""
  previous = None
  for step, value in curve:
    if value >= target:
      if previous is None or previous[1] >= value:
        return float(step)
      (s0, v0) = previous
      return s0 + (step - s0) * (target - v0) / (value - v0)
    previous = (step, value)
  return None


# ----------------------------------------------------------------------------- runs

def row_config(study: Study, row: Row, scale: str, overrides: list[str], steps: int | None,
               seed: int | None):
  """The validated config of one run: config file, scale fields, (paper fields), user
  overrides, then the row's fields, ``--steps`` and the seed."""
  s = SCALES[scale]
  fields = {**s.fields, **(study.paper_fields if scale == 'paper' else {})}
  config = load_config(os.path.join(REPO, 'configs', f'{s.configs[row.kind]}.py'),
                       [f'--config.{k}={v!r}' for k, v in fields.items()] + list(overrides))
  apply_overrides(config, [f'--config.{k}={v!r}' for k, v in row.fields.items()])
  if steps is not None:
    config.train.num_steps = steps
  if seed is not None:
    config.seed = seed
  config_lib.validate(config)
  return config


def select_rows(table: str, only: str | None) -> tuple[Study, list[Row]]:
  if table not in STUDIES:
    raise ValueError(f'STUDY={table!r}: unknown study; allowed: {", ".join(STUDIES)}')
  study = STUDIES[table]
  if not only:
    return study, list(study.rows)
  names = [n.strip() for n in only.split(',') if n.strip()]
  known = [r.name for r in study.rows]
  for name in names:
    if name not in known:
      raise ValueError(f'--only={name!r}: no such row in {table}; allowed: {", ".join(known)}')
  return study, [r for r in study.rows if r.name in names]


def check_scale(scale: str) -> Scale:
  if scale not in SCALES:
    raise ValueError(f'--scale={scale!r}: unknown scale; allowed: {", ".join(SCALES)}')
  return SCALES[scale]


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  return read_metrics(path) if os.path.exists(path) else []


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


def _finite(values) -> list[float]:
  return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values) -> float | None:
  values = _finite(values)
  return statistics.fmean(values) if values else None


def eval_curve(run: dict) -> list[tuple[int, float]]:
  return [(r['step'], r[QUALITY]) for r in run['records'] if QUALITY in r]


def mean_curve(runs: list[dict], key: str) -> list[tuple[int, float, float, float]]:
  """(step, mean, min, max) over the runs at each step that all of them logged ``key``."""
  by_step: dict[int, list[float]] = {}
  for run in runs:
    for r in run['records']:
      if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key]):
        by_step.setdefault(r['step'], []).append(r[key])
  return [(step, statistics.fmean(v), min(v), max(v)) for step, v in sorted(by_step.items())
          if len(v) == len(runs)]


def final_quality(runs: list[dict]) -> dict[int, float]:
  """Each finished seed's last evaluation; a failed (diverged) run has no final result."""
  out = {}
  for run in runs:
    curve = eval_curve(run)
    if not run['error'] and curve and math.isfinite(curve[-1][1]):
      out[run['seed']] = curve[-1][1]
  return out


def step_time(runs: list[dict]) -> float | None:
  times = _finite(r.get('perf/step_time') for run in runs for r in run['records'])
  return statistics.median(times) if times else None


def summarize_row(row: Row, runs: list[dict], base_runs: list[dict], num_steps: int) -> dict:
  """Per row: final quality over seeds, its difference to the baseline, the steps and time to
  reach the baseline's final quality, accuracy, speed and dropped fractions."""
  finals, base_finals = final_quality(runs), final_quality(base_runs)
  quality = mean_interval(list(finals.values()))
  accuracy = mean_interval(_finite(
      next((r.get('eval/accuracy') for r in reversed(run['records']) if QUALITY in r), None)
      for run in runs if run['seed'] in finals))
  speeds = _finite(r.get('perf/tokens_per_sec') for run in runs for r in run['records'])
  target = statistics.fmean(base_finals.values()) if base_finals else None
  curve = [(s, m) for s, m, _, _ in mean_curve(runs, QUALITY)]
  reach = steps_to_reach(curve, target) if target is not None and curve else None
  row_time, base_time = step_time(runs), step_time(base_runs)
  speedup = time_speedup = None
  if reach:
    speedup = num_steps / reach
    if row_time and base_time:
      time_speedup = num_steps * base_time / (reach * row_time)
  late = [r for run in runs for r in run['records'] if r['step'] > num_steps // 2]
  return {
      'row': row.name, 'kind': row.kind, 'fields': row.fields, 'paper': row.paper,
      'seeds': len(runs), 'final_by_seed': {str(k): v for k, v in finals.items()},
      'neg_log_perplexity': quality['mean'], 'neg_log_perplexity_std': quality['std'],
      'interval': [quality['low'], quality['high']],
      'difference': difference(finals, base_finals),
      'steps_to_baseline': reach, 'speedup_steps': speedup, 'speedup_time': time_speedup,
      'accuracy': accuracy['mean'], 'accuracy_std': accuracy['std'],
      'tokens_per_sec': statistics.median(speeds) if speeds else None,
      'step_time': row_time,
      'dropped_fraction': _mean(r.get('train/dropped_fraction') for r in late),
      'eval_dropped_fraction': _mean(r.get('eval/dropped_fraction') for r in late),
      'failed': [run['error'] for run in runs if run['error']],
  }


def judge_claims(study: Study, runs: dict[str, list[dict]]) -> list[dict]:
  out = []
  for claim in study.claims:
    if claim.better not in runs or claim.worse not in runs:
      continue
    diff = difference(final_quality(runs[claim.better]), final_quality(runs[claim.worse]))
    out.append({'claim': claim.text, 'better': claim.better, 'worse': claim.worse,
                'difference': diff, 'verdict': verdict(diff)})
  return out


def command_line(table, scale, steps, seeds, out, only, overrides) -> str:
  """The command that repeats this sweep (and, finished, just rewrites its summary)."""
  args = [table, f'--scale={scale}'] + [f'--{name}={value}' for name, value in
                                        (('steps', steps), ('seeds', seeds), ('out', out),
                                         ('only', only)) if value is not None]
  return shlex.join(['python', 'scripts/ablate.py', *args, *overrides])


def provenance(command: str) -> dict:
  """Where the numbers come from: command, commit, software and hardware."""
  import jax  # after the config is checked, so a bad argument does not wait for JAX

  def git(*args):
    try:
      return subprocess.run(['git', '-C', REPO, *args], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ''

  commit = git('rev-parse', '--short', 'HEAD')
  if commit and git('status', '--porcelain', '--untracked-files=no'):
    commit += ' (with uncommitted changes)'
  device = jax.devices()[0]
  return {'command': command, 'commit': commit or None, 'jax': jax.__version__, 'python': platform.python_version(),
          'platform': device.platform, 'device_kind': device.device_kind,
          'devices': jax.device_count(), 'cpus': os.cpu_count(),
          'machine': platform.machine()}


def _fmt(value, spec: str, none: str = '-') -> str:
  return none if value is None else format(value, spec)


def _signed_interval(d: dict) -> str:
  if d['mean'] is None:
    return '-'
  if d['low'] is None:
    return f'{d["mean"]:+.4f}'
  return f'{d["mean"]:+.4f} [{d["low"]:+.4f}, {d["high"]:+.4f}]'


def markdown(summary: dict) -> str:
  s, base = summary, summary['baseline']
  lines = [f'## {s["table"]}: {s["title"]}', '',
           f'Scale `{s["scale"]}` ({SCALES[s["scale"]].description}): {s["steps"]} steps, '
           f'{s["seeds"]} seed(s) per row. Paper: {s["paper_setup"]}. Quality is the final '
           'evaluation neg. log perplexity (nats per target token, higher is better); '
           'intervals are 95% t-intervals over seeds; differences are to '
           f'`{base}`, paired by seed. Tiny models are not expected to match the paper\'s '
           'values, only its directions.', '',
           '| row | seeds | quality (mean ± std) | 95% interval | vs baseline [95%] '
           '| steps to baseline quality (speed-up) | time speed-up | eval accuracy '
           '| train tokens/s | dropped train / eval | paper |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in s['rows']:
    quality = _fmt(r['neg_log_perplexity'], '.4f')
    if r['neg_log_perplexity_std'] is not None:
      quality += f' ± {r["neg_log_perplexity_std"]:.4f}'
    if r['failed']:
      quality += f' ({len(r["failed"])} failed)'
    interval = ('-' if r['interval'][0] is None else
                f'[{r["interval"][0]:.4f}, {r["interval"][1]:.4f}]')
    reach = ('not reached' if r['steps_to_baseline'] is None else
             f'{r["steps_to_baseline"]:.0f} ({r["speedup_steps"]:.2f}x)')
    lines.append(
        f'| {r["row"]} | {r["seeds"]} | {quality} | {interval} '
        f'| {"baseline" if r["row"] == base else _signed_interval(r["difference"])} '
        f'| {reach} | {_fmt(r["speedup_time"], ".2f")}x | {_fmt(r["accuracy"], ".4f")} '
        f'| {_fmt(r["tokens_per_sec"], ",.0f")} | {_fmt(r["dropped_fraction"], ".3f")} / '
        f'{_fmt(r["eval_dropped_fraction"], ".3f")} | {_fmt(r["paper"], ".3f")} |')
  if s['claims']:
    lines += ['', '| paper claim | difference [95%] | verdict |', '|---|---|---|']
    lines += [f'| {c["claim"]} (`{c["better"]}` − `{c["worse"]}`) '
              f'| {_signed_interval(c["difference"])} | **{c["verdict"]}** |'
              for c in s['claims']]
  failures = [f'- {r["row"]}: {e}' for r in s['rows'] for e in r['failed']]
  p = s['provenance']
  lines += ['', *failures, *([''] if failures else []),
            f'Made by `{p["command"]}` at commit {p["commit"]}, jax {p["jax"]} on '
            f'{p["devices"]} x {p["device_kind"]} ({p["platform"]}, {p["cpus"]} CPUs); '
            f'training time {_duration(s["train_seconds"])}.']
  return '\n'.join(lines) + '\n'


def plot(path: str, summary: dict, runs: dict[str, list[dict]]) -> bool:
  """Train cross-entropy and eval quality vs step, mean over seeds with a min-max band, and
  the baseline's final quality as a line; False without matplotlib."""
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use('Agg')  # files only; no display needed
  import matplotlib.pyplot as plt
  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 5), layout='constrained')
  for i, (name, row_runs) in enumerate(runs.items()):
    for ax, key, marker in ((ax_train, 'train/ce', None), (ax_eval, QUALITY, 'o')):
      curve = mean_curve(row_runs, key)
      if not curve:
        continue
      steps, mean, low, high = zip(*curve)
      color = f'C{i % 10}'
      ax.plot(steps, mean, color=color, marker=marker, markersize=3,
              label=f'{name} ({len(row_runs)} seed{"s" if len(row_runs) > 1 else ""})')
      if len(row_runs) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
  base = next((r for r in summary['rows'] if r['row'] == summary['baseline']), None)
  if base and base['neg_log_perplexity'] is not None:
    ax_eval.axhline(base['neg_log_perplexity'], color='gray', linestyle=':', linewidth=1,
                    label=f'{summary["baseline"]} final')
  ax_train.set(xscale='log', xlabel='step (log scale)',
               ylabel='train cross-entropy (nats/token, lower is better)',
               title='training loss (mean over seeds, band: min-max)')
  ax_eval.set(xlabel='step', ylabel='eval neg. log perplexity (nats/token, higher is better)',
              title='evaluation quality (mean over seeds, band: min-max)')
  # Zoom on the second half, where rows separate; the early drop would flatten them.
  late = [m for name in runs for s, m, lo, hi in mean_curve(runs[name], QUALITY)
          if s >= summary['steps'] // 2 for m in (lo, hi)]
  if late:
    pad = max(0.02, 0.1 * (max(late) - min(late)))
    ax_eval.set_ylim(min(late) - pad, max(late) + pad)
  for ax in (ax_train, ax_eval):
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  fig.suptitle(f'{summary["table"]}: {summary["title"]}', fontsize='medium')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def run_study(table: str, *, scale: str = 'cpu', steps: int | None = None,
              seeds: int | None = None, out: str = 'runs/ablate', only: str | None = None,
              overrides: list[str] = (), summarize_only: bool = False) -> dict | None:
  """Trains (or resumes, or skips) every run of a study and writes its summary; returns it.

  ``summarize_only``: train nothing; the summary covers the runs that are finished (a row's
  ``seeds`` counts them). Returns None, writing no summary, when SIGTERM or SIGINT stopped a
  run (saved, to be resumed by the same call).

  ValueError for a bad study, scale, row or field, raised before anything is trained. The
  summary's ``files`` holds the paths of the markdown, JSON and plot (None without
  matplotlib) it wrote.
  """
  study, rows = select_rows(table, only)
  seeds = seeds or check_scale(scale).seeds
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: must be >= 1')
  plan = [(row, seed, row_config(study, row, scale, list(overrides), steps, seed))
          for row in rows for seed in range(seeds)]
  folder = os.path.join(out, table)
  runs = {row.name: [] for row in rows}
  start, trained = time.time(), []
  train_seconds = 0.0
  for i, (row, seed, config) in enumerate(plan):
    workdir = os.path.join(folder, row.name, f'seed_{seed}')
    label = f'[{i + 1}/{len(plan)}] {table}/{row.name} seed {seed}'
    records, error = read_records(workdir), None
    info_path = os.path.join(workdir, 'ablate_run.json')
    info = {'seconds': 0.0}
    if os.path.exists(info_path):
      with open(info_path) as f:
        info = json.load(f)
    error = info.get('error')  # a diverged run stays a failed result: it is not retried
    if (records and records[-1]['step'] == config.train.num_steps) or error:
      print(f'{label}: skip, {"failed" if error else "finished"} in {workdir}', flush=True)
    elif summarize_only:
      print(f'{label}: not finished, left out of the summary', flush=True)
      continue
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
      except LockHeld as e:  # another sweep process trains it: leave it to that one
        print(f'{label}: skip, {e}', flush=True)
        continue
      except train.StoppedDuringStartup:
        print(f'{label}: stopped; run the same command to resume the sweep', flush=True)
        return None
      trained.append(time.time() - began)
      info = {'seconds': info['seconds'] + trained[-1], 'error': error}
      with open(info_path, 'w') as f:
        json.dump(info, f)
      records = read_records(workdir)
      if not error and not (records and records[-1]['step'] == config.train.num_steps):
        # train() returns early only when SIGTERM / SIGINT stopped it: so does the sweep.
        print(f'{label}: stopped; run the same command to resume the sweep', flush=True)
        return None
    train_seconds += info['seconds']
    runs[row.name].append({'seed': seed, 'records': records, 'error': error})
  num_steps = plan[0][2].train.num_steps
  base_runs = runs.get(study.baseline, [])
  summary = {'table': table, 'title': study.title, 'paper_setup': study.paper_setup,
             'scale': scale, 'steps': num_steps, 'seeds': seeds, 'overrides': list(overrides),
             'baseline': study.baseline,
             'rows': [summarize_row(row, runs[row.name], base_runs, num_steps) for row in rows],
             'claims': judge_claims(study, runs), 'train_seconds': train_seconds,
             'provenance': provenance(command_line(table, scale, steps, seeds, out, only,
                                                   overrides))}
  files = {'markdown': os.path.join(folder, f'{table}.md'),
           'json': os.path.join(folder, f'{table}.json'),
           'plot': os.path.join(folder, f'{table}.png')}
  text = markdown(summary)
  with open(files['markdown'], 'w') as f:
    f.write(text)
  if not plot(files['plot'], summary, runs):
    print('No plot: matplotlib is not installed (pip install -e ".[plot]").')
    files['plot'] = None
  summary['files'] = files
  with open(files['json'], 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'\nDone in {_duration(time.time() - start)}.\n\n{text}')
  print('Wrote ' + ', '.join(os.path.abspath(p) for p in files.values() if p))
  return summary


def list_studies(tables: list[str], overrides: list[str], steps: int | None,
                 scale: str = 'cpu', only: str | None = None) -> None:
  """Prints each study's rows with their fields, validating every row's config."""
  check_scale(scale)
  for table in tables:
    study, rows = select_rows(table, only)
    for row in rows:  # all first, so an error is the only line printed for this study
      row_config(study, row, scale, overrides, steps, None)
    print(f'{table}: {study.title} [scale {scale}, {SCALES[scale].seeds} seed(s)]')
    for row in rows:
      fields = ' '.join(f'--config.{k}={v!r}' for k, v in row.fields.items())
      paper = '' if row.paper is None else f'  (paper {row.paper})'
      print(f'  {row.name:<22} configs/{SCALES[scale].configs[row.kind]}.py {fields}{paper}')
    for claim in study.claims:
      print(f'  claim: {claim.text} ({claim.better} > {claim.worse})')


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      epilog='Any --config.<field>=<value> applies to every row (e.g. '
             '--config.data.data_dir=/data/tfds).')
  parser.add_argument('table', nargs='?', metavar='STUDY',
                      help=f'the study to run: {", ".join(STUDIES)}')
  parser.add_argument('--scale', default='cpu',
                      help='; '.join(f'{k}: {v.description}' for k, v in SCALES.items()))
  parser.add_argument('--steps', type=int, help="train.num_steps of every row (default: the "
                      "scale's)")
  parser.add_argument('--seeds', type=int,
                      help='seeds per row, seed i setting seed=i (default: the scale\'s)')
  parser.add_argument('--out', default='runs/ablate',
                      help='runs go to OUT/STUDY/ROW/seed_i, the summary to OUT/STUDY/')
  parser.add_argument('--only', help='comma-separated rows to run (default: all)')
  parser.add_argument('--list', action='store_true',
                      help='print and validate the rows of STUDY (or all), train nothing')
  parser.add_argument('--summarize', action='store_true',
                      help='train nothing: summarize the runs of STUDY that are finished')
  args, overrides = parser.parse_known_args(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  try:
    if args.only and not args.table:
      raise ValueError('--only: needs a STUDY')
    if args.list:
      list_studies([args.table] if args.table else list(STUDIES), overrides, args.steps,
                   args.scale, args.only)
    elif not args.table:
      raise ValueError(f'STUDY: missing; allowed: {", ".join(STUDIES)}')
    else:
      run_study(args.table, scale=args.scale, steps=args.steps, seeds=args.seeds, out=args.out,
                only=args.only, overrides=overrides, summarize_only=args.summarize)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
