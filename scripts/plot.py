"""Plot training curves of one or several runs side by side.

  python scripts/plot.py WORKDIR [WORKDIR ...] [--out=curves.png]

Reads each run's ``metrics.jsonl`` and draws, in one PNG: training cross-entropy, evaluation
neg. log perplexity (the paper's metric) and accuracy (runs overlaid, labelled by folder name), and one expert-load panel
per run: for each Switch layer, the busiest expert's share of tokens times the number of
experts (1 = perfectly balanced, E = everything on one expert), with the share of tokens
dropped for capacity dashed. Needs matplotlib (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from switchmoe.metrics import read_metrics  # noqa: E402

EXPERT_FRACTION = re.compile(r'moe/(.+)/expert_fraction_E$')


def read_run(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'{workdir}: no metrics.jsonl')
  return read_metrics(path)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[key]) for r in records if key in r]
  return [s for s, _ in points], [v for _, v in points]


def expert_load(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """Per Switch layer: steps and max_i(fraction_i) * E."""
  loads = {}
  for record in records:
    for key, fractions in record.items():
      match = EXPERT_FRACTION.match(key)
      if match and fractions:
        steps, values = loads.setdefault(match.group(1), ([], []))
        steps.append(record['step'])
        values.append(max(fractions) * len(fractions))
  return loads


def plot(workdirs: list[str], out: str) -> None:
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(names)) < len(names):  # runs/a/run and runs/b/run: label by the full path
    names = list(workdirs)
  runs = {name: read_run(w) for name, w in zip(names, workdirs)}
  fig = plt.figure(figsize=(5 * max(3, len(runs)), 8), layout='constrained')
  top, bottom = fig.subfigures(2, 1)
  curves = top.subplots(1, 3)
  for (key, title), ax in zip((('train/ce', 'train cross-entropy'),
                               ('eval/neg_log_perplexity', 'eval neg. log perplexity (nats/token)'),
                               ('eval/accuracy', 'eval accuracy')), curves):
    for name, records in runs.items():
      ax.plot(*series(records, key), '.-', label=name)
    ax.set(title=title, xlabel='step')
    ax.grid(alpha=0.3)
  curves[0].legend()
  panels = bottom.subplots(1, len(runs), squeeze=False)[0]
  for ax, (name, records) in zip(panels, runs.items()):
    for layer, (steps, values) in sorted(expert_load(records).items()):
      ax.plot(steps, values, label=layer)
    ax.plot(*series(records, 'train/dropped_fraction'), 'k--', label='dropped fraction')
    ax.axhline(1.0, color='grey', lw=0.5)
    ax.set(title=f'{name}: expert load (max share x E)', xlabel='step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default='curves.png')
  args = parser.parse_args(argv)
  try:
    plot(args.workdirs, args.out)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'Wrote {os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
