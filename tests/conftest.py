"""Shared fixtures: small generated image-folder datasets (no network, nothing from outside the
repository)."""

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def make_image_folder(root, classes=('cat', 'dog', 'frog'), per_class=(12, 4), size=32,
                      mode='RGB', ext='.png', seed=0):
  """Writes ROOT/{train,test}/<class>/NNNN<ext>; class c's images are brightest in channel c."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  channels = 1 if mode == 'L' else 3
  for split, n in zip(('train', 'test'), per_class):
    for c, name in enumerate(classes):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        img = rng.integers(0, 90, (size, size, channels), dtype=np.uint8)
        img[..., c % channels] += 160 if channels == 3 else 40 * c
        arr = img[..., 0] if channels == 1 else img
        Image.fromarray(arr, mode).save(os.path.join(d, f'{i:04d}{ext}'))
  return str(root)


@pytest.fixture
def image_folder(tmp_path):
  return make_image_folder(tmp_path / 'images')


# Set by this file in each test process for its own compilation cache (see pytest_configure).
_OWN_CACHE = 'DSCONV_TEST_COMPILATION_CACHE'


def pytest_collection_modifyitems(session, config, items):
  """Files with slow tests first: run.sh spreads whole files over the workers (pytest-xdist's
  loadfile), and a long file started last would keep one worker busy while the others idle."""
  del session, config
  slow_files = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow_files)  # Stable: the order within a file.


def pytest_configure(config):
  """Gives each test process (the main one, or each pytest-xdist worker) a persistent compilation
  cache of its own, inherited by the programs it starts, so that a program compiled once (the tiny
  config's epoch, a worker's step) is loaded afterwards, bitwise the same executable. Measured on
  the 2-core CPU machine (12-04, two workers, training stopped): 760 s for the suite against 979 s
  with a cache only for the command-line runs of `cli_env`. The cache is bounded, as
  `dsconv_jax.compile_cache` bounds it for runs: JAX then locks the folder around each read and
  write (unbounded, it writes entries in place without a lock), so this process and the programs
  it starts share it safely. A cache the user set (JAX_COMPILATION_CACHE_DIR) is left alone."""
  del config
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') and not os.environ.get(_OWN_CACHE):
    return
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  path = tempfile.mkdtemp(prefix=f'dsconv-jax-cache-{worker}-')
  os.environ.update({_OWN_CACHE: path, 'JAX_COMPILATION_CACHE_DIR': path,
                     'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                     'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
                     'JAX_COMPILATION_CACHE_MAX_SIZE': str(2 * 1024 ** 3)})


def pytest_unconfigure(config):
  del config
  path = os.environ.get(_OWN_CACHE)
  if path and os.environ.get('JAX_COMPILATION_CACHE_DIR') == path:
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='session')
def cli_env():
  """Environment for command-line runs in subprocesses: CPU only, no fault injection, and this
  test process's compilation cache (pytest_configure)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('DSCONV_FAULT', None)
  return env


@pytest.fixture
def batched_mock_reads(monkeypatch):
  """Makes `mock_data`'s data sources answer batched `__getitems__` reads.

  tfds 4.9.10 (testing/mocking.py) assigns `functools.partial(_getitems, ...)` as `__getitems__` of
  a MagicMock, which does not bind instance attributes, so `self` is never passed and every
  batched read fails with a TypeError; single `ds[i]` reads work. Wrapping the module-level
  `_getitems` that the partial is built from accepts both the unbound and a fixed, bound call.
  """
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  original = mocking._getitems  # pylint: disable=protected-access

  def getitems(*args, generator, serialized=False):
    *maybe_self, record_keys = args
    self = maybe_self[0] if maybe_self else None  # Only used when `serialized`.
    return original(self, record_keys, generator=generator, serialized=serialized)

  monkeypatch.setattr(mocking, '_getitems', getitems)
