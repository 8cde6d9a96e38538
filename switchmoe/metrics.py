"""Metric sinks: ``metrics.jsonl`` (one object per logged step), TensorBoard event files
(through tensorboardX, so TensorFlow is not needed) and a one-line progress report."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
from flax import traverse_util


def flatten(tree: Mapping) -> dict:
  """{'moe': {'encoder/layer_1': {'confidence': x}}} -> {'moe/encoder/layer_1/confidence': x}."""
  return traverse_util.flatten_dict(dict(tree), sep='/')


def to_python(value):
  """Scalars to float/int; arrays (e.g. per-expert fractions) to lists."""
  value = np.asarray(value)
  if value.ndim == 0:
    return value.item()
  return value.tolist()


def read_metrics(path: str, *, warn=None) -> list[dict]:
  """The records of a ``metrics.jsonl`` file (or of the one in a run folder), in order.

  A torn last line (a process killed mid-write) is dropped, with a line to ``warn`` if given;
  any other line that is not a JSON object raises a ValueError naming the file and line.
  """
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get('step'), int):
        raise ValueError('not a record with an integer "step"')
    except ValueError as e:
      if number == len(lines):  # no newline after it: the write never finished
        if warn:
          warn(f'{path} line {number}: dropped a torn last line ({line[:40]!r})')
        break
      raise ValueError(f'{path} line {number}: {e}') from None
    records.append(record)
  return records


class MetricWriter:
  """Appends to ``workdir/metrics.jsonl`` and writes TensorBoard scalars under ``workdir``.

  A run starting at step ``start`` (0 for a fresh start) first drops what an earlier attempt
  logged after that step (``metrics.jsonl`` lines and TensorBoard events): this run logs those
  steps again, and each file then holds one curve. The file is rewritten into a temporary
  file that then replaces it, so a kill at any moment leaves the old or the new history.
  """

  def __init__(self, workdir: str, *, start: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path):
      warn = lambda message: print(f'warning: {message}', file=sys.stderr, flush=True)
      kept = [r for r in read_metrics(path, warn=warn) if r['step'] <= start]
      temporary = f'{path}.tmp'
      with open(temporary, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, path)
    self._jsonl = open(path, 'a', buffering=1)
    from tensorboardX import SummaryWriter  # import here: only the writing process needs it
    self._tb = SummaryWriter(logdir=workdir, flush_secs=10, purge_step=start + 1)

  def write(self, step: int, metrics: Mapping) -> dict:
    record = {'step': int(step), **{k: to_python(v) for k, v in flatten(metrics).items()}}
    if self.enabled:
      self._jsonl.write(json.dumps(record) + '\n')
      for name, value in record.items():
        if name != 'step' and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, global_step=step)
    return record

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Prints ``[####----] step n/N | loss | ... | tok/s | MFU | ETA`` lines, measuring time
  between reports. One line per report (not a redrawn bar), so logs of batch jobs read well.
  """

  BAR_WIDTH = 20

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, stream=None):
    self.total, self.enabled = total_steps, enabled
    self.stream = stream or sys.stdout
    self._last_step, self._last_time = start_step, time.perf_counter()

  def lap(self, step: int) -> float:
    """Seconds per step since the previous lap (call after the step's results are ready)."""
    now = time.perf_counter()
    per_step = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_step, self._last_time = step, now
    return per_step

  def bar(self, step: int) -> str:
    done = round(self.BAR_WIDTH * step / max(self.total, 1))
    return '[' + '#' * done + '-' * (self.BAR_WIDTH - done) + ']'

  def report(self, step: int, record: Mapping, step_time: float) -> None:
    if not self.enabled:
      return
    eta = datetime.timedelta(seconds=round(step_time * (self.total - step)))
    parts = [f'{self.bar(step)} step {step}/{self.total}']
    for key, label, fmt in (('train/loss', 'loss', '.4f'), ('train/ce', 'ce', '.4f'),
                            ('eval/ce', 'eval ce', '.4f'),
                            ('train/dropped_fraction', 'dropped', '.3f'),
                            ('train/grad_norm', 'grad norm', '.3g')):
      if key in record and math.isfinite(record[key]):
        parts.append(f'{label} {record[key]:{fmt}}')
    if record.get('train/skipped_steps'):
      parts.append(f'skipped {record["train/skipped_steps"]}')
    if 'perf/tokens_per_sec' in record:
      parts += [f'{record["perf/tokens_per_sec"]:,.0f} tok/s', f'{step_time:.3f} s/step']
    if 'perf/mfu' in record:
      parts.append(f'MFU {100 * record["perf/mfu"]:.1f}%')
    parts.append(f'ETA {eta}')
    print(' | '.join(parts), file=self.stream, flush=True)
