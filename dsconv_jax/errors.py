"""User-facing errors: one clear sentence, exit status 1, no traceback.

Every mistake a user can make (a bad config value, a missing dataset, an unwritable workdir, a
violated constraint) is raised as `UserError` deep inside the library; the command-line entry points
catch it through `run_cli` and print only the message.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
  """A mistake of the user's (config, data, paths), reported as one line with exit status 1."""


class UsageError(UserError):
  """A command-line usage mistake, reported with exit status 2."""

  exit_code = 2


class Stopped(Exception):
  """A run that stopped cleanly on a signal after saving; exit status 128 + the signal number.

  Not a `UserError`: nothing is wrong, so the message is printed without an 'error:' prefix, and
  the exit status is the one a shell reports for a process ended by that signal, so that job
  schedulers and scripts see the run as interrupted, not failed.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


def run_cli(fn: Callable[[], object]) -> None:
  """Runs `fn`, turning `UserError` into `error: MESSAGE` on stderr and its exit status.

  `Stopped` prints its message and exits with its status (128 + the signal number). A reader of
  stdout that goes away (`... | head`) ends the program quietly with SIGPIPE's status, 141.
  """
  try:
    fn()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(getattr(e, 'exit_code', 1))
  except Stopped as e:
    # One write: a line that no other thread's output can split.
    sys.stderr.write(f'{e}\n')
    sys.stderr.flush()
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr, flush=True)
    sys.exit(130)
  except BrokenPipeError:
    # Python's advice: point stdout at /dev/null, so that flushing it at exit cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + 13)
