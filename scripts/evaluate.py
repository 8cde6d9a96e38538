"""Evaluate a checkpoint on a data split.

  python scripts/evaluate.py PATH [--split=validation|train] [--batches=N] [--config.a.b=v ...]

PATH is a run folder (its latest checkpoint), one ``checkpoints/<step>`` folder or an export.
The model and data come from the config stored with it; ``--config.*`` overrides fields, e.g.
``--config.model.moe.eval_capacity_factor=1.0`` or ``--config.train.batch_size=64``. The
``validation`` split uses the fixed evaluation batches of training; ``train`` the first
batches of the training stream (same seed, so the batches the run started with). Prints one
JSON object: ``eval/ce``, ``eval/neg_log_perplexity`` (= -ce, nats per target token, the
paper's metric), ``eval/accuracy``, ``eval/dropped_fraction``, the checkpoint's
``step`` (if it has one), ``split`` and ``batches``. Exit code 2 with a one-line error for a
bad path or field.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from switchmoe import checkpoint as checkpoint_lib
from switchmoe import config as config_lib
from switchmoe import data as data_lib
from switchmoe import train
from switchmoe.main import apply_overrides


def split_batches(config, split: str, num_batches: int) -> list[dict]:
  per_process = config.train.batch_size // jax.process_count()
  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if split == 'validation':
    return data_lib.make_eval_batches(config, batch_size=per_process, num_batches=num_batches,
                                      **where)
  iterator = data_lib.make_train_iterator(config, batch_size=per_process, **where)
  return [next(iterator) for _ in range(num_batches)]


def checkpoint_step(path: str) -> int | None:
  folder, prefix = checkpoint_lib.find_params(path)
  return int(folder.split('/')[-2]) if prefix else None


def evaluate_checkpoint(path: str, split: str, num_batches: int, overrides: list[str]) -> dict:
  config = checkpoint_lib.find_config(path)
  apply_overrides(config, overrides)
  config_lib.validate(config)
  batches = split_batches(config, split, num_batches)
  s = train.make_setup(config)
  with train.mesh_context(s):
    params, _ = checkpoint_lib.load_params(path, s.abstract_state['params'])
    metrics = train.evaluate(s, params, batches)
  return {'step': checkpoint_step(path), 'split': split, 'batches': num_batches, **metrics}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
  parser.add_argument('path')
  parser.add_argument('--split', choices=('validation', 'train'), default='validation')
  parser.add_argument('--batches', type=int, default=4)
  args, overrides = parser.parse_known_args(argv)
  if args.batches < 1:
    print(f'error: --batches={args.batches}: must be >= 1', file=sys.stderr)
    return 2
  try:
    result = evaluate_checkpoint(args.path, args.split, args.batches, overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
