"""Orbax checkpoints under ``workdir/checkpoints/<step>/``.

Each step folder holds three items: ``state`` (params, optimizer state and step, restored
directly into the run's shardings), ``data`` (the grain iterator state, JSON) and ``config``
(JSON). Orbax writes into a temporary folder and renames it when complete, so an interrupted
save never replaces the last good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('state', 'data', 'config'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Starts an asynchronous save; `wait` or the next save joins it."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Returns (state placed like ``abstract_state``'s shardings, data iterator state)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying ``shardings``: the restore target, allocating nothing."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
