"""Orbax checkpoints of the train state, one per epoch, with fallback past a damaged newest one.

Orbax writes each step into a temporary folder and renames it when complete, so a save killed
halfway is never listed as a step. A checkpoint that is listed but cannot be read (a damaged disk,
a file truncated by hand) makes `restore_latest` warn and fall back to the previous one; two are
kept for that reason. The damaged one is moved aside to `DIR.damaged/` (not deleted: a read error
may be transient) so that the epoch can be saved again. When no checkpoint at all can be restored,
the folder most likely belongs to another model, and nothing is moved: that is an error.

A full disk or an unwritable folder while saving is a `UserError`, whether the save itself fails
or its background write does (which surfaces at the next save, `wait` or `close`). Orbax's
background threads log such a failure with a traceback each (through absl logging) before the
waiting thread sees it; `_QuietOrbaxErrors` drops those records while this module holds the
error, so the run ends with its one `error:` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from dsconv_jax.errors import UserError


# Causes worth naming when a save fails: tensorstore reports OS errors inside other exceptions.
_CAUSES = ('No space left on device', 'Disk quota exceeded', 'File too large', 'Permission denied',
           'Read-only file system')


# How long Orbax lets a background save run before its wait raises TimeoutError (its default is
# 1,200 s). The deadline runs from the start of the save, so a process suspended mid-save (a
# laptop asleep, a job frozen by its scheduler, SIGSTOP) for longer than this would fail its
# next save although the write needs milliseconds. A save that truly hangs still ends, after this.
SAVE_TIMEOUT_SECONDS = 12 * 3600


def _cause(e: BaseException) -> str:
  """A short cause for a failed save: the OS error's text, wherever Orbax wrapped it."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = str(e)
  for cause in _CAUSES:
    if cause in text:
      return cause
  return f'{type(e).__name__}: {(text.splitlines() or [""])[0][:200]}'


class _QuietOrbaxErrors(logging.Filter):
  """Drops error records logged from Orbax's own source files (its background save threads).

  The failure they report is raised again in the thread that waits for the save, where
  `Checkpoints` turns it into one `UserError`; the records would only print the same error with
  a traceback per thread.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and '/orbax/' in record.pathname.replace(
        '\\', '/'))


@contextlib.contextmanager
def _without_read_only_notice() -> Iterator[None]:
  """Drops Orbax's warning that a read-only manager's folder is read only: asked for, not news."""
  notice = lambda record: not record.getMessage().startswith('Given directory is read only')
  logger = logging.getLogger('absl')
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


class Checkpoints:
  """The checkpoints of one run, stored as `DIR/<epoch>/` (Orbax steps are finished epochs)."""

  def __init__(self, directory: str, keep: int = 2, read_only: bool = False):
    """`read_only` (for reading a finished run: `dsconv_jax.inference`) creates, cleans up and
    moves nothing, so that it is safe beside a training process writing the same folder."""
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(
          create=True,
          # A save killed halfway leaves `<epoch>.orbax-checkpoint-tmp`; remove it quietly at start.
          cleanup_tmp_directories=True,
          preservation_policy=ocp.checkpoint_managers.LatestN(n=max(1, keep)),
          enable_async_checkpointing=True,
          async_options=ocp.AsyncOptions(timeout_secs=SAVE_TIMEOUT_SECONDS))
    try:
      with _without_read_only_notice():
        self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise UserError(f'cannot create the checkpoint folder {self.directory!r}: {e}') from None
    # The newest whole checkpoint, and the epoch whose background save is in flight.
    self._saved: int | None = max(self.epochs(), default=None)
    self._pending: int | None = None
    self._failed = False  # A save failed: Orbax's threads may still log it, the filter stays.
    # Orbax logs through absl's logger in some versions and its own module loggers in others; all
    # reach the root logger's handlers (absl's among them), so the filter sits on those too.
    self._quiet = _QuietOrbaxErrors()
    self._filtered = [logging.getLogger('absl'), *logging.getLogger().handlers,
                      *logging.getLogger('absl').handlers]
    for target in self._filtered:
      target.addFilter(self._quiet)

  def epochs(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @contextlib.contextmanager
  def _write_errors(self, epoch: int) -> Iterator[None]:
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      self._failed = True
      # Orbax and tensorstore raise ValueError, RuntimeError or OSError for the same full disk.
      kept = (f'the checkpoint of epoch {self._saved} is intact' if self._saved else
              'no epoch is saved yet')
      if isinstance(e, TimeoutError):  # Not the disk: the save outlived Orbax's deadline.
        raise UserError(f'the checkpoint of epoch {epoch} in {self.directory!r} was not saved '
                        f'within {SAVE_TIMEOUT_SECONDS} s (the process was suspended, or the '
                        f'disk stalled); {kept}: run the same command to resume') from None
      raise UserError(f'cannot save the checkpoint of epoch {epoch} in {self.directory!r} '
                      f'({_cause(e)}); {kept}: free disk space or choose another --workdir, '
                      'then run the same command') from None

  def save(self, epoch: int, state: Any) -> None:
    """Starts saving `state` as epoch `epoch`; the device-to-host copy finishes before returning.

    Waits for the previous save first, so that its failure is reported as that epoch's.
    """
    self.wait()
    with self._write_errors(epoch):
      self.manager.save(epoch, args=ocp.args.StandardSave(state))
    self._pending = epoch

  def restore_latest(self, target: Any) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into the structure of `target`, or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    damaged, first_error = [], None
    for epoch in reversed(self.epochs()):
      try:
        restored = self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        logging.info('checkpoint of epoch %d in %s cannot be restored (%s: %s)', epoch,
                     self.directory, type(e).__name__, e)
        print(f'warning: the checkpoint of epoch {epoch} cannot be read ({type(e).__name__}); '
              'falling back to the previous one', file=sys.stderr, flush=True)
        damaged.append(epoch)
        first_error = first_error or e
        continue
      if damaged and not self.read_only:
        self._move_aside(damaged)
      return epoch, restored
    if damaged:
      # Orbax's messages can hold a whole tensorstore spec: the start says enough.
      detail = (str(first_error).splitlines() or [''])[0][:200]
      raise UserError(f'no checkpoint in {self.directory!r} can be restored (epochs '
                      f'{", ".join(map(str, sorted(damaged)))}; {type(first_error).__name__}: '
                      f'{detail}); they may belong to a different model: use a new --workdir'
                      ) from None
    return None

  def _move_aside(self, epochs: list[int]) -> None:
    """Moves unreadable checkpoints to DIR.damaged/, so that their epochs can be saved again."""
    if jax.process_index() == 0:
      aside = self.directory + '.damaged'
      os.makedirs(aside, exist_ok=True)
      for epoch in epochs:
        target = os.path.join(aside, f'{epoch}-{time.strftime("%Y%m%d-%H%M%S")}')
        os.replace(os.path.join(self.directory, str(epoch)), target)
        print(f'warning: moved the unreadable checkpoint of epoch {epoch} to {target}',
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      # Other processes must not list a step that process 0 is moving away.
      multihost_utils.sync_global_devices('dsconv_jax.checkpoint.move_aside')
    self.manager.reload()

  def wait(self) -> None:
    """Waits until the save in flight is on disk."""
    if self._pending is None:
      return
    with self._write_errors(self._pending):
      self.manager.wait_until_finished()
    self._saved, self._pending = self._pending, None

  def close(self) -> None:
    try:
      self.wait()
    except BaseException:
      self._failed = True
      raise
    finally:
      # After a failed save (here, or earlier in `save` itself, where the manager's synchronous
      # part raised while its write threads ran on) Orbax's threads may still log it after the
      # manager is closed, so the filter stays for the rest of the process (our error line
      # reports the failure), whichever call saw it first.
      if self._failed:
        with contextlib.suppress(Exception):
          self.manager.close()
      else:
        self.manager.close()
        for target in self._filtered:
          target.removeFilter(self._quiet)
