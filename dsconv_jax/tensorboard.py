"""TensorBoard scalars through tensorboardX, without TensorFlow: one event file per process.

Resuming: the writer of a run that starts at step S first writes a SessionLog START event at S, as
tensorboardX's `SummaryWriter(purge_step=S)` does (tensorboardX/writer.py, `_get_file_writer`).
TensorBoard then drops the points at steps >= S read before it, from this file and the earlier
files of the folder: those a killed run wrote past its last checkpoint, whose epochs are redone.

Why not `SummaryWriter` itself: it hands events to a daemon thread through a queue, which writes
them and flushes only every `flush_secs` (120 s). What it loses or hides, with tensorboardX 2.6.5:
  - `flush()` flushes only what that thread has already dequeued, so the points of the last epoch
    are often not on disk when it returns, and a run killed then loses them for good (the resumed
    run starts after the checkpoint, so it does not write them again). No `flush_secs` fixes this;
    `flush_secs=0` makes the thread spin on the queue.
  - A write error (a full disk) in that thread prints "Exception in thread" with a traceback and
    ends the thread; whether a later `flush()` of the caller raises it too is down to timing.
  - `FileWriter` registers an atexit `close()` that flushes again, so the same error prints a
    second traceback ("Exception ignored in atexit callback") when the process exits.
  - The file name has the time in whole seconds and the host name only: two writers of one folder
    in the same second (a quick restart, a test) open the same file, and the second one empties it.
`EventsWriter` is the synchronous core that this thread calls (tensorboardX/event_file_writer.py):
used directly, every write happens in the caller's thread, so an OSError reaches the caller, which
turns it into a one-line error, and nothing prints a traceback. The files are the same.
"""

from __future__ import annotations

import itertools
import os
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

_file_counter = itertools.count()  # tells apart writers that one process opens in one nanosecond


class EventWriter:
  """Writes scalars to a new `events.out.tfevents.*` file in `logdir`, for a run starting at
  `start_step`; TensorBoard then drops the points at `start_step` and later in earlier files.

  Every call writes and flushes in the caller's thread: an OSError (an unwritable folder, a full
  disk) is raised by the call that hit it, and once raised, `close()` closes the file quietly.
  """

  def __init__(self, logdir: str | os.PathLike, start_step: int):
    logdir = os.fspath(logdir)
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard reads the files of a folder in name order, and purges by what it read before the
    # START event, so names must sort in creation order: after tensorboardX's whole seconds and host
    # name come nanoseconds (19 digits until 2286), then the pid and a counter so that no two
    # writers ever share a file.
    suffix = f'.{time.time_ns()}.{os.getpid()}.{next(_file_counter)}'
    self._failed = False
    self._closed = False
    # Creates the file and writes the file_version event first: it makes TensorBoard purge by
    # SessionLog START (file_version >= 2) rather than by steps that go backwards.
    self._events = EventsWriter(os.path.join(logdir, 'events'), suffix)
    try:
      self._write(Event(wall_time=time.time(), step=int(start_step),
                        session_log=SessionLog(status=SessionLog.START)))
    except OSError:
      self.close()  # Quietly: the caller never gets a writer to close.
      raise

  def scalars(self, values: dict[str, float], step: int) -> None:
    """Writes `values` as one event at `step`, tags as given, and flushes it to disk, so that a run
    killed right after keeps them."""
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))
                             for tag, value in values.items()])
    self._write(Event(wall_time=time.time(), step=int(step), summary=summary))

  def _write(self, event: Event) -> None:
    try:
      self._events.write_event(event)
      self._events.flush()  # also fsyncs
    except OSError:
      self._failed = True
      raise

  def close(self) -> None:
    """Closes the file; raises an OSError only if flushing fails now. Closing twice is harmless."""
    if self._closed:
      return
    self._closed = True
    try:
      self._events.close()
    except OSError:
      # The error was already raised by the write that hit it, and the bytes it left in the buffer
      # are lost either way: closing quietly keeps a caller's error path from raising it twice.
      if not self._failed:
        raise
      # tensorboardX's close flushes before it closes, so the file is still open. Its own close
      # fails to flush once more but closes it all the same; left to the garbage collector, it
      # would print "Exception ignored" at exit (Python 3.13).
      stream = getattr(getattr(self._events, '_py_recordio_writer', None), '_writer', None)
      if stream is not None:
        try:
          stream.close()
        except OSError:
          pass

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
