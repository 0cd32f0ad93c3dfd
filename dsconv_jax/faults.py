"""Test-only fault injection: the training process SIGKILLs itself at a chosen point of a run.

Set `DSCONV_FAULT=POINT:EPOCH` (e.g. `checkpoint:3`) in the environment of a training process to
kill it, as a power cut or the kernel's OOM killer would, at one of these points of epoch EPOCH:

  step        the epoch's compiled training call has been dispatched and is still running on the
              device (dispatch is asynchronous); nothing of the epoch is written yet.
  eval        training of the epoch is done and its evaluation has been dispatched.
  metrics     half of the epoch's metrics.jsonl line has been written and fsynced: a torn line.
  checkpoint  the epoch's metrics line is written and its checkpoint save has started in the
              background, not waited for.

tests/test_crash.py uses it to check that the same command, run again, ends with the metrics of a
run that was never interrupted. Nothing else may set it: it exists only for those tests, and when
the variable is unset (always, outside them) each hook costs one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from dsconv_jax.errors import UserError

ENV = 'DSCONV_FAULT'
POINTS = ('step', 'eval', 'metrics', 'checkpoint')


def _armed(point: str, epoch: int) -> bool:
  spec = os.environ.get(ENV)
  if not spec:
    return False
  name, _, at = spec.partition(':')
  if name not in POINTS or not at.isdigit():
    raise UserError(f'{ENV}={spec!r} is not POINT:EPOCH with POINT one of {", ".join(POINTS)} '
                    '(a test-only setting; unset it)')
  return name == point and int(at) == epoch


def _kill() -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill(point: str, epoch: int) -> None:
  """Kills this process when `DSCONV_FAULT` names `point` and `epoch`."""
  if _armed(point, epoch):
    _kill()


def maybe_tear_line(path: str, row: dict[str, Any], epoch: int) -> None:
  """At the 'metrics' point: appends the first half of `row`'s JSON line to `path`, then kills."""
  if _armed('metrics', epoch):
    line = json.dumps(row, sort_keys=True) + '\n'
    with open(path, 'a') as f:
      f.write(line[:len(line) // 2])
      f.flush()
      os.fsync(f.fileno())
    _kill()
