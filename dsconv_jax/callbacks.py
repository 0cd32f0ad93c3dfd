"""What happens around each epoch, as a list of callbacks that the training loop calls in order.

`train.train_and_evaluate` builds the default list (`default_callbacks`): the metrics file, the
TensorBoard events and the progress display on the writing process, then the checkpoint, which every
process takes part in. The order matters: an epoch's metrics line is appended before its checkpoint
is saved, so that a crash in between drops the line on resume and redoes the epoch (the other order
could keep a checkpoint whose line is lost). Tests hand the loop extra callbacks (fault injection,
tests/faults.py); production code installs none.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Sequence

from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import fileio
from dsconv_jax import reporting
from dsconv_jax.errors import Stopped


class Callback:
  """Hooks of the epoch loop; each does nothing unless overridden."""

  def on_epoch_start(self, epoch: int) -> None:
    """Epoch `epoch` (1-based) is about to train."""

  def on_epoch_end(self, epoch: int, row: dict[str, Any], state: Any) -> None:
    """Epoch `epoch` trained and evaluated: `row` is its metrics.jsonl line, `state` the state."""

  def close(self, error: BaseException | None) -> None:
    """The loop ended: normally (`error` None), on a signal (`errors.Stopped`) or on an error.

    Called for every callback whatever happens; an error raised here replaces a `Stopped` (a stop
    whose last save failed is a failure), but never another error.
    """


class MetricsFile(Callback):
  """metrics.jsonl: one JSON line per epoch, appended and fsynced as soon as the epoch ends.

  On start the file is rewritten with `history`, the lines up to the restored checkpoint: lines of
  epochs past it (their state was lost) and a torn last line are dropped.
  """

  def __init__(self, path: str, history: Sequence[dict[str, Any]]):
    self.path = path
    with fileio.writing(repr(path)):
      fileio.atomic_write_text(path, ''.join(json.dumps(r, sort_keys=True) + '\n'
                                             for r in history))

  def on_epoch_end(self, epoch, row, state) -> None:
    with fileio.writing(f'the metrics of epoch {epoch} to {self.path!r}'):
      fileio.append_jsonl(self.path, row)


class TensorBoard(Callback):
  """Per-epoch scalars (metrics and learning rate) as TensorBoard event files in the workdir."""

  def __init__(self, logdir: str, start_epoch: int):
    from dsconv_jax import tensorboard  # tensorboardX is imported only by the writing process.
    with fileio.writing(f'TensorBoard events in {logdir!r}'):
      # Readers drop what a killed run wrote past its last checkpoint (those epochs rerun).
      self.writer = tensorboard.EventWriter(logdir, start_step=start_epoch)

  def on_epoch_end(self, epoch, row, state) -> None:
    with fileio.writing(f'TensorBoard events of epoch {epoch}'):
      self.writer.scalars({k: v for k, v in row.items() if k != 'epoch'}, epoch)

  def close(self, error) -> None:
    try:
      with fileio.writing('TensorBoard events'):
        self.writer.close()
    except Exception:  # pylint: disable=broad-except
      if error is None:
        raise


class ProgressDisplay(Callback):
  """The per-epoch progress lines (`reporting.Progress`)."""

  def __init__(self, progress: reporting.Progress):
    self.progress = progress

  def on_epoch_start(self, epoch) -> None:
    self.progress.start(epoch)

  def on_epoch_end(self, epoch, row, state) -> None:
    self.progress.end(row)

  def close(self, error) -> None:
    if error is not None:
      self.progress.clear()  # The transient line must not run into the error or stop message.


class Checkpointing(Callback):
  """Saves each epoch's state (Orbax, in the background) and waits for the last save on close."""

  def __init__(self, checkpoints: checkpoint_lib.Checkpoints):
    self.checkpoints = checkpoints

  def on_epoch_end(self, epoch, row, state) -> None:
    self.checkpoints.save(epoch, state)

  def close(self, error) -> None:
    if error is None or isinstance(error, Stopped):
      self.checkpoints.close()  # A failed last save is the run's error.
      return
    # The save in flight must finish, whatever stopped the run, so that the newest checkpoint on
    # disk is whole; its own error, if any, would only hide the one being raised.
    with contextlib.suppress(Exception):
      self.checkpoints.close()


def default_callbacks(*, metrics_path: str, history: Sequence[dict[str, Any]],
                      logdir: str, start_epoch: int, progress: reporting.Progress,
                      checkpoints: checkpoint_lib.Checkpoints, is_writer: bool) -> list[Callback]:
  """The loop's callbacks, in order (see the module docstring)."""
  callbacks: list[Callback] = []
  if is_writer:
    callbacks += [MetricsFile(metrics_path, history), TensorBoard(logdir, start_epoch + 1),
                  ProgressDisplay(progress)]
  return callbacks + [Checkpointing(checkpoints)]


def close_all(callbacks: Sequence[Callback], error: BaseException | None) -> None:
  """Closes every callback; the first error raised by one is raised after all are closed."""
  first = None
  for callback in callbacks:
    try:
      callback.close(error)
    except Exception as e:  # pylint: disable=broad-except
      first = first or e
  if first is not None:
    raise first
