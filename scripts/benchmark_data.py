"""Benchmark the input pipeline: can it feed training, and where does its time go?

  python scripts/benchmark_data.py [--config=configs/switch_base.py] [--batch_size=32]
      [--batches=50] [--workers=0,1,2] [--target_batches_per_s=2.0] [--json]
      [--config.a.b=v ...]

First ``data.make_train_iterator`` is timed end to end for each worker count: the first batch
(worker start, shuffle window fill) is reported apart, then ``--batches`` batches give the rates,
checked against the target. Packed rows are shuffled in windows of 1024 filled all at once, so
batches come in bursts: "slowest" is the refill stall, and ``--batches`` x ``--batch_size`` a
multiple of 1024 (64 batches of 32) makes the rate cover whole windows. Then each stage (read,
tokenize, pack, objective, batch) is timed alone, in this process, on the documents of 20
batches, to show which one to speed up.
Progress goes to stderr; ``--json`` adds the results as one JSON object on the last line.
Timings on a machine shared with other work are noisy: run it twice before drawing conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import grain
import numpy as np

from switchmoe import data as data_lib
from switchmoe import sources
from switchmoe import train
from switchmoe.main import load_config
from switchmoe.tokenizer import make_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ('read', 'tokenize', 'pack', 'objective', 'batch')
STAGE_BATCHES = 20


def progress(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def time_pipeline(config, batch_size: int, num_batches: int) -> dict:
  """Rates of make_train_iterator with config.data.num_workers, after its first batch."""
  start = time.perf_counter()
  iterator = data_lib.make_train_iterator(config, batch_size=batch_size)
  try:
    next(iterator)
    first = time.perf_counter() - start
    # The slowest batch shows the stall when the row shuffle window refills.
    slowest, start = 0.0, time.perf_counter()
    for _ in range(num_batches):
      before = time.perf_counter()
      next(iterator)
      slowest = max(slowest, time.perf_counter() - before)
    elapsed = time.perf_counter() - start
  finally:
    if config.data.num_workers:
      iterator.close()
  batches_per_s = num_batches / elapsed
  return {'workers': config.data.num_workers, 'batches_per_s': batches_per_s,
          'examples_per_s': batches_per_s * batch_size,
          'tokens_per_s': batches_per_s * batch_size * train.tokens_per_example(config),
          'first_batch_s': first, 'slowest_batch_s': slowest}


def stack(examples: list[dict]) -> dict:
  """What grain's batch does to a list of example dicts."""
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def time_stages(config, batch_size: int) -> dict:
  """Seconds per example of each stage, run one after another on the same documents."""
  tokenizer = make_tokenizer(config.data.tokenizer)
  source = sources.open_split(config, config.data.train_split)
  num_examples, length = STAGE_BATCHES * batch_size, data_lib.row_length(config)
  # Random order, as training reads them, so the read cost is the one training pays.
  order = np.random.default_rng(config.seed).permutation(len(source))
  seconds = dict.fromkeys(STAGES, 0.0)
  documents, num_tokens = [], 0
  progress('stages: read + tokenize')
  while num_tokens < num_examples * length:
    start = time.perf_counter()
    example = source[int(order[len(documents) % len(order)])]
    middle = time.perf_counter()
    ids_N = data_lib.tokenize_document(example, tokenizer=tokenizer,
                                       text_field=config.data.text_field,
                                       append_eos=config.model.arch == 'decoder')
    seconds['read'] += middle - start
    seconds['tokenize'] += time.perf_counter() - middle
    documents.append(ids_N)
    num_tokens += len(ids_N)

  progress('stages: pack')
  # No read threads, so packing is timed alone, with the grain iterator it pulls from in training.
  tokens = grain.MapDataset.source(documents).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  row_iterator = iter(data_lib.PackedRows(tokens, length))
  start = time.perf_counter()
  rows = [next(row_iterator) for _ in range(num_examples)]
  seconds['pack'] = time.perf_counter() - start

  progress('stages: objective')
  rng = np.random.default_rng(config.seed)
  start = time.perf_counter()
  examples = [data_lib.objective_features(row, rng, config=config, tokenizer=tokenizer)
              for row in rows]
  seconds['objective'] = time.perf_counter() - start

  progress('stages: batch')
  start = time.perf_counter()
  for i in range(0, num_examples, batch_size):
    stack(examples[i : i + batch_size])
  seconds['batch'] = time.perf_counter() - start

  total = sum(seconds.values())
  return {'examples': num_examples,
          'documents_per_batch': len(documents) / STAGE_BATCHES,
          'us_per_example': {s: seconds[s] / num_examples * 1e6 for s in STAGES},
          'percent': {s: 100 * seconds[s] / total for s in STAGES}}


def print_tables(config_path: str, config, args, pipeline: list[dict], stages: dict) -> None:
  d = config.data
  shape = (d.inputs_length, d.targets_length) if config.model.arch == 'encoder_decoder' else (
      d.targets_length,)
  print(f'\n{os.path.basename(config_path)}: {config.model.arch} {d.objective}, batch '
        f'{args.batch_size} x {shape}, source {d.source!r}, {os.cpu_count()} cores '
        '(timings are noisy on a shared machine)')
  print(f'{"workers":>7} {"batches/s":>10} {"examples/s":>11} {"tokens/s":>11} '
        f'{"first batch":>12} {"slowest":>8}  target {args.target_batches_per_s:g}/s')
  for r in pipeline:
    print(f'{r["workers"]:>7} {r["batches_per_s"]:>10.2f} {r["examples_per_s"]:>11.1f} '
          f'{r["tokens_per_s"]:>11,.0f} {r["first_batch_s"]:>10.2f} s '
          f'{r["slowest_batch_s"]:>6.2f} s  {"PASS" if r["pass"] else "FAIL"}')
  print(f'\nWhere time goes (one process, {stages["examples"]} examples, '
        f'{stages["documents_per_batch"]:.1f} documents read per batch):')
  print(f'{"stage":<10} {"µs/example":>11} {"%":>6}')
  for s in STAGES:
    print(f'{s:<10} {stages["us_per_example"][s]:>11.1f} {stages["percent"][s]:>6.1f}')
  total = sum(stages['us_per_example'].values())
  print(f'{"total":<10} {total:>11.1f} {100:>6.1f}   = {1e6 / (total * args.batch_size):.1f} '
        'batches/s in one process, before grain\'s own overhead')


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=str(REPO / 'configs' / 'switch_base.py'))
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=50)
  parser.add_argument('--workers', default='0,1,2', help='comma-separated worker counts')
  parser.add_argument('--target_batches_per_s', type=float, default=2.0)
  parser.add_argument('--json', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  try:
    config = load_config(args.config, overrides)
    pipeline = []
    for workers in (int(w) for w in args.workers.split(',')):
      progress(f'pipeline: {workers} workers, {args.batches} batches')
      config.data.num_workers = workers
      result = time_pipeline(config, args.batch_size, args.batches)
      pipeline.append({**result, 'pass': result['batches_per_s'] >= args.target_batches_per_s})
    stages = time_stages(config, args.batch_size)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print_tables(args.config, config, args, pipeline, stages)
  if args.json:
    print(json.dumps({'config': args.config, 'batch_size': args.batch_size,
                      'target_batches_per_s': args.target_batches_per_s,
                      'pipeline': pipeline, 'stages': stages}))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
