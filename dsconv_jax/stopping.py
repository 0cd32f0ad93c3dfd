"""Clean stops on SIGTERM and SIGINT, at any moment: at the next safe point, never mid-call.

A preempted or Ctrl-C'd run should lose nothing and never crash. Python's own SIGINT handling
raises KeyboardInterrupt wherever the main thread is, inside an import of a compiled extension or
while XLA compiles, which ended in tracebacks and segmentation faults (issue: Ctrl-C during the
first compile crashed 2 of 4 times). So the handlers here only record the signal. `train` checks
it at safe points (after loading the data, after building and compiling, after each epoch's
checkpoint is saved) and raises `errors.Stopped`, which the command line reports as "stopped by
SIGTERM ...; run the same command to resume" with exit status 128 + the signal number. A second
signal ends the process at once (`os._exit`, as a kill would; runs survive kills).

The signals are counted off the main thread. Python runs a handler only between the main
thread's bytecodes, so while XLA compiles (seconds to minutes in one call) a second Ctrl-C would
wait with the first. Python's own C-level handler, which runs at once in whatever thread the
signal reaches, writes the signal's number to `signal.set_wakeup_fd`'s pipe; a watcher thread
reads it there and acts within milliseconds. (Blocking the signals and `signal.sigwait` in a
thread would do the same, but children inherit a blocked mask: a child process started by XLA
or a data pipeline could then not be interrupted.) The Python-level handler stays, so that a
signal is visible to the main thread's next `check` even before the watcher has run.

Entry points call `defer_signals()` before any other import, so that start-up is covered too; the
handlers then stay for the process. Used as a library, `train_and_evaluate` installs them for the
duration of the run (`StopOnSignals` as a context) and restores the previous ones afterwards.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from dsconv_jax.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_process_wide: StopOnSignals | None = None


class StopOnSignals:
  """A context within which SIGTERM and SIGINT ask for a stop at the next safe point.

  Entering it while `defer_signals` holds the process-wide handlers returns that one (which
  may already have recorded a signal) and leaves it in place on exit.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}
    self._received = 0  # Signals counted by the watcher thread.
    # Set once the first signal's notice is written: the stop message waits for it, so that the
    # notice never lands after (or inside) the last line.
    self._noticed = threading.Event()
    self._watcher: threading.Thread | None = None
    self._wakeup: tuple[int, int] | None = None  # The pipe's (read end, write end).
    self._previous_wakeup = -1

  def __enter__(self) -> StopOnSignals:
    if _process_wide is not None and _process_wide is not self:
      return _process_wide
    # Python only lets the main thread install handlers; elsewhere signals keep their behaviour.
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
      self._start_watcher()
    return self

  def __exit__(self, *exc_info) -> None:
    if self is _process_wide:
      return
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()
    self._stop_watcher()

  def _start_watcher(self) -> None:
    read, write = os.pipe()
    os.set_blocking(write, False)  # The C-level handler must never block.
    try:
      self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):  # Not possible here: the Python-level handler does it all.
      os.close(read)
      os.close(write)
      return
    self._wakeup = (read, write)
    self._watcher = threading.Thread(target=self._watch, args=(read,), daemon=True,
                                     name='dsconv_jax-signals')
    self._watcher.start()

  def _stop_watcher(self) -> None:
    if self._wakeup is None:
      return
    read, write = self._wakeup
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(write)  # The watcher reads the end of the pipe and returns.
    self._watcher.join()
    os.close(read)
    self._wakeup = self._watcher = None

  def _watch(self, read: int) -> None:
    while True:
      try:
        data = os.read(read, 64)
      except InterruptedError:
        continue
      if not data:
        return
      for signum in data:
        if signum in SIGNALS:
          self._count(signum)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _await_notice(self) -> None:
    if self._watcher is not None:
      self._noticed.wait(timeout=5.0)

  def stopped(self, epoch: int) -> Stopped:
    """The exception to raise once epoch `epoch` is saved."""
    self._await_notice()
    name = signal.Signals(self.signum).name
    return Stopped(f'stopped by {name} after saving epoch {epoch}; run the same command to '
                   'resume', self.signum)

  def stopped_before(self, epoch: int | None) -> Stopped:
    """The exception to raise when the signal came before epoch `epoch` started; `epoch=None`:
    before the workdir's checkpoints were read (a resumed run's are kept all the same)."""
    self._await_notice()
    name = signal.Signals(self.signum).name
    if epoch is None:
      where, kept = 'training started', 'no checkpoint was written or changed'
    else:
      where = f'epoch {epoch} started'
      kept = f'the checkpoint of epoch {epoch - 1} is kept' if epoch > 1 else 'nothing was trained'
    return Stopped(f'stopped by {name} before {where} ({kept}); run the same command to resume',
                   self.signum)

  def check(self, epoch: int | None) -> None:
    """Raises `stopped_before(epoch)` when a signal has come."""
    if self.requested:
      raise self.stopped_before(epoch)

  def _handle(self, signum: int, frame) -> None:
    """The Python-level handler (main thread, between bytecodes)."""
    del frame
    if self._wakeup is not None:
      # The watcher counts and reports; the main thread only sees the request at once.
      if self.signum is None:
        self.signum = signum
      return
    self._count(signum)

  def _count(self, signum: int) -> None:
    """One signal arrived: the first asks for a stop, the second ends the process."""
    name = signal.Signals(signum).name
    self._received += 1
    if self._received > 1:
      os.write(2, f'received {name} again: stopping now\n'.encode())
      os._exit(128 + signum)  # pylint: disable=protected-access
    if self.signum is None:
      self.signum = signum
    # os.write, not print: a handler may run while the main thread is inside a print. On a
    # terminal, the line first clears the transient progress line, so the notice stands alone.
    clear = '\r\x1b[K' if os.isatty(1) and os.isatty(2) else ''
    os.write(2, f'{clear}received {name}: stopping at the next safe point (after the current epoch '
                f'is saved, or before training starts); send {name} again to stop at '
                'once\n'.encode())
    self._noticed.set()


def defer_signals() -> StopOnSignals:
  """Installs the process-wide handlers (idempotent); command-line entry points only."""
  global _process_wide
  if _process_wide is None:
    handlers = StopOnSignals()
    handlers.__enter__()
    _process_wide = handlers
  return _process_wide
