"""One writer per workdir: a run holds an OS lock on `DIR/.lock` for as long as it writes there.

Two runs in one folder (the same command in two terminals, a scheduler's retry) would both train
and interleave their metrics, checkpoints and summaries. `hold(DIR)` takes `fcntl.flock` on
`DIR/.lock` without waiting and records the holder (host, pid, command) in it; a second run then
ends at once with one line naming the holder. The kernel releases the lock when its holder exits
or is killed, so a crashed run never leaves a stale lock behind, and the file itself stays (it is
never deleted: a process waiting on a deleted file would lock a name nobody else sees).

Commands that only read a run (`predict`, `evaluate`, `compare`, `load_run`) take no lock. In a
multi-host run only process 0 writes, so only it locks. flock is advisory and local: on a network
filesystem it holds between processes of one host (NFS forwards it to the server on Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from typing import Iterator

from dsconv_jax.errors import UserError

LOCK_NAME = '.lock'


class WorkdirBusy(UserError):
  """Another live process holds the workdir's lock."""


def describe_holder(path: str) -> str:
  """'pid 123 on host, running python -m ...' from a lock file, or what is known."""
  try:
    with open(path) as f:
      holder = json.loads(f.read() or '{}')
  except (OSError, ValueError):
    holder = {}
  if not holder.get('pid'):
    return 'a process that has not recorded itself yet'
  return (f'pid {holder["pid"]} on {holder.get("host", "?")}, running '
          f'{holder.get("command", "?")}')


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s lock (which must exist as a folder) for the `with` block.

  Raises `WorkdirBusy` at once when another process holds it.
  """
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise UserError(f'cannot lock the workdir {workdir!r} ({e.strerror or e}); choose another '
                    '--workdir') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(f'workdir {workdir!r} is in use by another run ({describe_holder(path)}); '
                        'wait for it to finish or stop it, or choose another --workdir') from None
    _record_holder(fd)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _record_holder(fd: int) -> None:
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'command': ' '.join([os.path.basename(sys.executable), *_command_line()])}
  data = (json.dumps(holder) + '\n').encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)


def _command_line() -> list[str]:
  """The command as typed: `-m dsconv_jax.main ...` rather than runpy's path of the module."""
  argv = list(sys.argv)
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  if spec is not None and argv and argv[0].endswith('.py'):
    return ['-m', spec.name, *argv[1:]]
  return argv
