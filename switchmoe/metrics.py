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


def flatten(tree: Mapping, prefix: str = '') -> dict:
  """{'moe': {'encoder/layer_1': {'confidence': x}}} -> {'moe/encoder/layer_1/confidence': x}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{name}/'))
    else:
      flat[name] = value
  return flat


def to_python(value):
  """Scalars to float/int; arrays (e.g. per-expert fractions) to lists."""
  value = np.asarray(value)
  if value.ndim == 0:
    return value.item()
  return value.tolist()


class MetricWriter:
  """Appends to ``workdir/metrics.jsonl`` and writes TensorBoard scalars under ``workdir``.

  A run resumed at step ``start`` first drops what an interrupted run logged after its last
  checkpoint (``metrics.jsonl`` lines and TensorBoard events past ``start``): the resumed run
  logs those steps again, and each file then holds one curve.
  """

  def __init__(self, workdir: str, *, start: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if start and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= start]
      with open(path, 'w') as f:
        f.writelines(kept)
    self._jsonl = open(path, 'a', buffering=1)
    from tensorboardX import SummaryWriter  # import here: only the writing process needs it
    self._tb = SummaryWriter(logdir=workdir, flush_secs=10,
                             purge_step=start + 1 if start else None)

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
    parts += [f'{record.get("perf/tokens_per_sec", 0):,.0f} tok/s', f'{step_time:.3f} s/step']
    if 'perf/mfu' in record:
      parts.append(f'MFU {100 * record["perf/mfu"]:.1f}%')
    parts.append(f'ETA {eta}')
    print(' | '.join(parts), file=self.stream, flush=True)
