"""Files that are never half-written: write to a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any, Iterator

import numpy as np

from dsconv_jax.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w') -> Iterator[Any]:
  """Yields a file that replaces `path` only once it is completely written and flushed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = _create_temporary(folder, os.path.basename(path))
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_folder(folder)


def _create_temporary(folder: str, name: str) -> tuple[int, str]:
  """A new hidden file next to `name`, created with the umask's permissions.

  Not `tempfile.mkstemp`: its files are 0600, which a rename would carry over to summaries and
  curves that the user's teammates should be able to read.
  """
  while True:
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except FileExistsError:
      continue


def _fsync_folder(folder: str) -> None:
  """Makes a rename in `folder` survive a power cut, not only a killed process."""
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
  """Turns an OSError while writing `what` (a full disk, a read-only folder) into a UserError."""
  try:
    yield
  except OSError as e:
    raise UserError(f'cannot write {what} ({e.strerror or e}); free disk space or choose another '
                    '--workdir, then run the same command to resume') from None


def atomic_write_text(path: str, text: str) -> None:
  with atomic_open(path, 'w') as f:
    f.write(text)


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def atomic_write_npz(path: str, **arrays: np.ndarray) -> None:
  with atomic_open(path, 'wb') as f:
    np.savez(f, **arrays)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads complete JSON lines; a torn last line (a killed writer) is ignored."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      if not line.endswith('\n'):
        break
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def append_jsonl(path: str, row: dict[str, Any]) -> None:
  """Appends one line and fsyncs it, so a finished epoch's metrics survive a crash."""
  with open(path, 'a') as f:
    f.write(json.dumps(row, sort_keys=True) + '\n')
    f.flush()
    os.fsync(f.fileno())
