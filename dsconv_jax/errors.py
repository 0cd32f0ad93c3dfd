"""User-facing errors: one clear sentence, exit status 1, no traceback.

Every mistake a user can make (a bad config value, a missing dataset, an unwritable workdir, a
violated constraint) is raised as `UserError` deep inside the library; the command-line entry points
catch it through `run_cli` and print only the message.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
  """A mistake of the user's (config, data, paths), reported as one line with exit status 1."""


class UsageError(UserError):
  """A command-line usage mistake, reported with exit status 2."""

  exit_code = 2


def run_cli(fn: Callable[[], object]) -> None:
  """Runs `fn`, turning `UserError` into `error: MESSAGE` on stderr and its exit status."""
  try:
    fn()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(getattr(e, 'exit_code', 1))
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr, flush=True)
    sys.exit(130)
