"""Orbax checkpoints of the train state, one per epoch, with fallback past a damaged newest one.

Orbax writes each step into a temporary folder and renames it when complete, so a save killed
halfway is never listed as a step. A checkpoint that is listed but cannot be read (a damaged disk,
a file truncated by hand) makes `restore_latest` warn and fall back to the previous one; two are
kept for that reason.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsconv_jax.errors import UserError


class Checkpoints:
  """The checkpoints of one run, stored as `DIR/<epoch>/` (Orbax steps are finished epochs)."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        create=True,
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max(1, keep)),
        enable_async_checkpointing=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f'cannot create the checkpoint folder {self.directory!r}: {e}') from None

  def epochs(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, epoch: int, state: Any) -> None:
    """Starts saving `state` as epoch `epoch`; the device-to-host copy finishes before returning."""
    try:
      self.manager.save(epoch, args=ocp.args.StandardSave(state))
    except OSError as e:
      raise UserError(f'cannot save the checkpoint of epoch {epoch} in {self.directory!r} '
                      f'({e}); free disk space or choose another --workdir') from None

  def restore_latest(self, target: Any) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into the structure of `target`, or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for epoch in reversed(self.epochs()):
      try:
        return epoch, self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('checkpoint of epoch %d in %s cannot be restored (%s: %s); falling back '
                        'to the previous one', epoch, self.directory, type(e).__name__, e)
        print(f'warning: checkpoint of epoch {epoch} is damaged ({type(e).__name__}); '
              'falling back to the previous one', flush=True)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
