"""Test-only fault injection: callbacks that kill or signal the training process at one point.

Installed through `train.train_and_evaluate`'s `callbacks_hook` by the subprocesses of
tests/test_crash.py (see `prelude`); production code never installs them. The points, for epoch E:

  start       epoch E is about to train; nothing of it exists yet.
  end         epoch E trained and evaluated; nothing of it is written yet.
  metrics     half of epoch E's metrics.jsonl line has been written and fsynced: a torn line.
  checkpoint  epoch E's metrics line is written and its checkpoint save has started in the
              background, not waited for.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from dsconv_jax import callbacks as callbacks_lib

POINTS = ('start', 'end', 'metrics', 'checkpoint')


def _kill() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


class Fault(callbacks_lib.Callback):
  """At `point` of epoch `epoch`, sends `signum` to this process (SIGKILL: a power cut)."""

  def __init__(self, point: str, epoch: int, signum: int = signal.SIGKILL,
               metrics_path: str | None = None):
    assert point in POINTS, point
    self.point, self.epoch, self.signum, self.metrics_path = point, epoch, signum, metrics_path

  def _fire(self) -> None:
    if self.signum == signal.SIGKILL:
      _kill()
    os.kill(os.getpid(), self.signum)

  def on_epoch_start(self, epoch) -> None:
    if (self.point, epoch) == ('start', self.epoch):
      self._fire()

  def on_epoch_end(self, epoch, row, state) -> None:
    if epoch != self.epoch or self.point == 'start':
      return
    if self.point == 'metrics':
      line = json.dumps(row, sort_keys=True) + '\n'
      with open(self.metrics_path, 'a') as f:
        f.write(line[:len(line) // 2])
        f.flush()
        os.fsync(f.fileno())
    self._fire()


def inject(point: str, epoch: int, signum: int = signal.SIGKILL):
  """A `callbacks_hook` that puts a `Fault` where `point` says in the loop's callbacks."""

  def hook(callbacks):
    callbacks = list(callbacks)
    metrics = [c for c in callbacks if isinstance(c, callbacks_lib.MetricsFile)]
    fault = Fault(point, epoch, signum, metrics[0].path if metrics else None)
    if point == 'checkpoint':
      return callbacks + [fault]  # After Checkpointing started the save.
    if point == 'metrics':
      # Just before the metrics file: at the fault's epoch, half of the line, then the kill.
      i = callbacks.index(metrics[0])
      return callbacks[:i] + [fault] + callbacks[i:]
    return [fault] + callbacks
  return hook


def prelude(point: str, epoch: int, signum: int = signal.SIGKILL) -> str:
  """Python code that makes `dsconv_jax.main`, run after it in the same process, use `inject`."""
  tests = os.path.dirname(os.path.abspath(__file__))
  return (f'import functools, sys\nsys.path.insert(0, {tests!r})\nimport faults\n'
          'from dsconv_jax import train\n'
          'train.train_and_evaluate = functools.partial(\n'
          f'    train.train_and_evaluate, callbacks_hook=faults.inject({point!r}, {epoch}, '
          f'{int(signum)}))\n')
