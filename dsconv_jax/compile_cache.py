"""JAX's persistent compilation cache, on by default: compilation is paid once per program.

A run's compiled epoch and evaluation are written to `config.compilation_cache_dir`
(default `~/.cache/dsconv_jax/compilation`), so that a rerun, a resume and each further bench seed
load them instead of compiling again. `''` turns it off (JAX's own `JAX_COMPILATION_CACHE_DIR`
then still applies); that variable, when set, also takes precedence over the config key. Clearing
the cache is deleting the folder (`rm -r ~/.cache/dsconv_jax/compilation`); a stale entry is never
used (its key covers the program, the JAX and XLA versions and the device).

Several processes may share the folder: with a size bound set, JAX's cache takes a file lock
(`filelock`) around every read and write, so no process reads an entry another is still writing
(unbounded, JAX writes entries in place with no lock). The bound is `MAX_BYTES`; the least
recently used entries are evicted past it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

DEFAULT_DIR = '~/.cache/dsconv_jax/compilation'
MAX_BYTES = 2 * 1024 ** 3

_EVENTS = {'/jax/compilation_cache/cache_hits': 'hits',
           '/jax/compilation_cache/cache_misses': 'misses'}
_counts = {'hits': 0, 'misses': 0}
_listening = False
_lock = threading.Lock()


def configure(directory: str) -> str | None:
  """Turns the cache on in `directory` ('' = leave JAX's settings alone); returns the folder in
  use, or None when there is none. Takes effect only before this process's first compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  _listen()
  chosen = os.environ.get('JAX_COMPILATION_CACHE_DIR') or (
      os.path.expanduser(directory) if directory else '')
  if not chosen:
    return None
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # A declared dependency; without it the cache would be unsafe to share.
    return None
  jax.config.update('jax_compilation_cache_dir', chosen)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  # Every program, however quick to compile: an epoch of a small model compiles in under the
  # default threshold of one second on an accelerator, and the evaluation often does.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  return chosen


def counts() -> dict[str, int]:
  """Programs loaded from the cache ('hits') and compiled afresh ('misses') in this process."""
  with _lock:
    return dict(_counts)


def _listen() -> None:
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  import jax.monitoring  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_listener(_on_event)


def _on_event(event: str, **kwargs: Any) -> None:
  del kwargs
  name = _EVENTS.get(event)
  if name is not None:
    with _lock:
      _counts[name] += 1
