"""Plot scripts/benchmark.py records: the layer suite's cost against the number of experts.

  python scripts/plot_benchmark.py RECORDS.jsonl [RECORDS.jsonl ...] [--out=layer.png]

Reads every layer-suite record of the given files (`benchmark.py --json`) and draws, per
dispatch, its time over the dense FFN's and over its roofline floor against the number of
experts, with the capacity padding's 1.25x marked. Records of several files are pooled; where
one dispatch has several records at one E (several runs), the plot shows their median with
the range as an error bar, so the noise between runs is on the plot. Failed cases (records
with an ``error``) are left out. Needs matplotlib (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

# The two panels: record field, axis label.
PANELS = (('ratio_to_dense', 'time / dense FFN'), ('ratio_to_floor', 'time / roofline floor'))
SKIPPED = ('dense', 'router')  # the reference itself, and a part of the layer


def layer_records(paths: list[str]) -> list[dict]:
  records = []
  for path in paths:
    try:
      with open(path) as f:
        records += [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
      sys.exit(f'{path}: not a benchmark.py --json file ({e})')
  return [r for r in records if r.get('suite') == 'layer' and 'error' not in r]


def series(records: list[dict], field: str) -> dict[str, list[tuple[int, float, float, float]]]:
  """dispatch -> [(E, median, min, max)] of ``field`` over the records of each E."""
  values: dict[str, dict[int, list[float]]] = {}
  for r in records:
    if r['dispatch'] not in SKIPPED and r.get(field) is not None:
      values.setdefault(r['dispatch'], {}).setdefault(r['num_experts'], []).append(r[field])
  return {name: [(e, statistics.median(v), min(v), max(v)) for e, v in sorted(by_e.items())]
          for name, by_e in values.items()}


def plot(records: list[dict], out: str) -> None:
  fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
  experts = sorted({r['num_experts'] for r in records if r['num_experts']})
  for ax, (field, label) in zip(axes, PANELS):
    for name, points in sorted(series(records, field).items()):
      e, mid, low, high = zip(*points)
      ax.errorbar(e, mid, yerr=[[m - lo for m, lo in zip(mid, low)],
                                [hi - m for m, hi in zip(mid, high)]],
                  marker='o', capsize=3, label=name)
    ax.axhline(1.0, color='grey', linewidth=0.8)
    if field == 'ratio_to_dense':
      ax.axhline(1.25, color='grey', linestyle='--', linewidth=0.8,
                 label='capacity padding, 1.25x')
    ax.set_xscale('log', base=2)
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.minorticks_off()
    ax.set_xlabel('experts')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  first = records[0]
  fig.suptitle(f'Switch layer, forward + backward: {first["tokens"]} tokens, d_model '
               f'{first["d_model"]}, d_ff {first["d_ff"]}, {first["dtype"]} on '
               f'{first["device_kind"]} (jax {first["jax"]})', fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('records', nargs='+', help='benchmark.py --json files')
  p.add_argument('--out', default='layer.png')
  args = p.parse_args(argv)
  records = layer_records(args.records)
  if not records:
    sys.exit(f'{", ".join(args.records)}: no layer-suite records to plot')
  shapes = {(r['tokens'], r['d_model'], r['d_ff'], r['dtype'], r['device_kind'])
            for r in records}
  if len(shapes) > 1:
    sys.exit(f'{", ".join(args.records)}: records of different layers or devices '
             f'({len(shapes)} kinds); plot one kind at a time')
  plot(records, args.out)
  print(f'{args.out}: {len(records)} records')


if __name__ == '__main__':
  main()
