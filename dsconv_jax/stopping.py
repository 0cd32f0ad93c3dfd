"""Clean stops on SIGTERM and SIGINT: finish the epoch, save it, then exit 128 + signal number.

A preempted or Ctrl-C'd run should lose nothing. Inside `StopOnSignals`, the first SIGTERM or SIGINT
only sets a flag; the epoch loop checks it once the epoch's checkpoint is saved and raises
`errors.Stopped`, which the command line reports as "stopped by SIGTERM after saving epoch E; run
the same command to resume" with exit status 128 + the signal number. A second signal stops at
once, as if the handlers were not there. The previous handlers are restored on leaving.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from dsconv_jax.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignals:
  """A context within which SIGTERM and SIGINT ask for a stop at the next safe point."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopOnSignals:
    # Python only lets the main thread install handlers; elsewhere signals keep their behaviour.
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def stopped(self, epoch: int) -> Stopped:
    """The exception to raise once epoch `epoch` is saved."""
    name = signal.Signals(self.signum).name
    return Stopped(f'stopped by {name} after saving epoch {epoch}; run the same command to '
                   'resume', self.signum)

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      previous = self._previous.get(signum)
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
      signal.raise_signal(signum)
      return
    self.signum = signum
    # os.write, not print: a handler may run while the main thread is inside a print.
    os.write(2, f'received {name}: stopping once the current epoch is saved (send {name} again '
                'to stop at once)\n'.encode())
