"""The run folder (``--workdir``): checking its path, locking it, and the run it holds.

One training process at a time may own a workdir: a scheduler retry or a double submit on
the same folder would interleave metrics and race on checkpoint saves. Process 0 takes an
exclusive ``flock`` on ``WORKDIR/lock`` and writes its host, pid and start time there; the
kernel drops the lock when the process dies however it dies, so a lock file left by a killed
run is simply taken over (with a line saying whose it was). The file is emptied, never
deleted, on release: deleting a locked file lets two later processes lock two different
files of the same name.

What run a workdir holds is read from its newest checkpoint, which stores the config it was
saved with: a start that crashed before saving anything leaves no identity behind to refuse
the next start with.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; the holder file is all there is
  fcntl = None


class LockHeld(RuntimeError):
  """Another live process owns the workdir (exit code 3)."""


def check_path(workdir: str) -> str:
  """Creates ``workdir`` if needed and returns its absolute path; a one-line ValueError if it
  is empty, a file, under a file, or not writable."""
  if not workdir:
    raise ValueError("--workdir='': needs a folder path")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir={workdir}: is a file, not a folder')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot create it ({e.strerror}'
                     f'{": " + e.filename if e.filename else ""})') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'--workdir={workdir}: not writable by this user')
  return path


def _describe(holder: dict) -> str:
  return (f'pid {holder.get("pid", "?")} on {holder.get("host", "?")}, started '
          f'{holder.get("started", "?")}')


class Lock:
  """``with Lock(workdir):`` owns ``workdir`` or raises `LockHeld` naming the holder."""

  def __init__(self, workdir: str, *, announce=print):
    self.path = os.path.join(workdir, 'lock')
    self._announce = announce
    self._fd = None

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        text = f.read().strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {'pid': '?', 'host': '?', 'started': '? (unreadable lock file)'}

  def __enter__(self) -> Lock:
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ValueError(f'--workdir={os.path.dirname(self.path)}: cannot write its lock file '
                       f'({e.strerror})') from None
    if fcntl is None:
      previous = None
    else:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        previous = self._holder()  # under the lock: left by a process that died holding it
      except BlockingIOError:
        os.close(fd)
        raise LockHeld(f'--workdir={os.path.dirname(self.path)}: in use by '
                       f'{_describe(self._holder())} ({self.path}); wait for that run to '
                       'end or stop it, or use another --workdir') from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        previous = None
    if previous is None:  # no advisory locks here: trust the holder file alone
      previous = self._holder()
      if previous:
        os.close(fd)
        raise LockHeld(f'--workdir={os.path.dirname(self.path)}: {self.path} names '
                       f'{_describe(previous)} and this filesystem cannot tell whether it '
                       'still runs; delete that file if it does not')
    elif previous:
      self._announce(f'Took over {self.path} from {_describe(previous)}, which is no longer '
                     'running')
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode() + b'\n', 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None


def committed_run(workdir: str) -> tuple[int, dict, dict] | None:
  """(step, config dict, run dict) of the newest checkpoint in ``workdir`` whose stored config
  reads, or None if it has none: the identity of the run the workdir holds. The run dict
  (the dataset's identity) is empty for checkpoints written before it was stored."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return None
  for step in sorted((int(n) for n in os.listdir(folder) if n.isdigit()), reverse=True):
    try:
      with open(os.path.join(folder, str(step), 'config', 'metadata')) as f:
        config = json.load(f)
    except (OSError, ValueError):
      continue  # a damaged checkpoint; restoring it will set it aside
    try:
      with open(os.path.join(folder, str(step), 'run', 'metadata')) as f:
        run = json.load(f)
    except (OSError, ValueError):
      run = {}
    return step, config, run
  return None
