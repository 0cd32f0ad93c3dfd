"""Loads whole TensorFlow Datasets image classification splits as numpy arrays.

tensorflow-datasets is an optional extra (`pip install 'dsconv_jax[tfds]'`): it is imported only
when a `TfdsSource` is opened, so importing `dsconv_jax` and training from image folders need
neither it nor TensorFlow. Reading goes through tfds' random-access data sources (ArrayRecord
files), which need no TensorFlow; only preparing a dataset that is not yet on disk does.

Only tfds' public API is used (`tfds.builder`, the builder's `info`, `is_prepared`,
`download_and_prepare` and `as_data_source`, `tfds.download.DownloadConfig`, `tfds.features`), plus
the builder's `url_infos` attribute for the list of archives (see `_missing_downloads`). One
builder serves a whole load: building one reads the dataset's code, checksums and metadata.

Offline machines get a prompt, actionable `UserError` instead of tfds' minutes of download retries:
before preparing, the download host is probed with a plain TCP connection unless every archive the
dataset needs is already in `<data_dir>/downloads/manual/` or tfds' download cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np

from dsconv_jax.errors import UserError

# Long enough for a slow but working link, short enough that an offline run fails at once.
_PROBE_TIMEOUT_S = 3.0
# Examples decoded per `__getitems__` call: batched reads amortise the per-call overhead of the
# ArrayRecord reader while keeping the undecoded records of one chunk small.
_CHUNK = 4096
_FOLDER_LAYOUT = '(layout ROOT/{train,test}/<class>/*.jpg)'
_INSTALL = "pip install 'dsconv_jax[tfds]'"


def _can_reach(host: str, port: int, timeout: float) -> bool:
  """Returns whether a TCP connection to `host:port` opens within about `timeout` seconds."""
  reached = []

  def attempt() -> None:
    try:
      with socket.create_connection((host, port), timeout=timeout):
        reached.append(True)
    except OSError:  # DNS failure, refused, unreachable and timeout all mean "cannot download".
      pass

  # The socket timeout does not cover name resolution, which can hang far longer on a machine
  # without DNS; a daemon thread bounds the wait and is left to finish on its own.
  thread = threading.Thread(target=attempt, name='tfds-probe', daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(reached)


def _has_module(name: str) -> bool:
  """Returns whether `name` is importable, without importing it (TensorFlow takes seconds)."""
  return importlib.util.find_spec(name) is not None


def _brief(e: BaseException) -> str:
  """Returns the first line of an exception's message, short enough for a one-line UserError."""
  lines = str(e).strip().splitlines()
  text = lines[0].strip() if lines else ''
  if len(text) > 200:
    text = text[:197] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _folder_hint(name: str) -> str:
  """Returns the advice to train from an image folder instead, for error messages."""
  return (f'train from an image folder with --config.dataset=folder:/path/to/{name}-jpeg '
          f'{_FOLDER_LAYOUT}')


def _import_tfds(name: str) -> Any:
  """Imports tensorflow_datasets, turning a missing or broken install into a UserError."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if e.name == 'tensorflow_datasets':  # Not installed: the optional extra was left out.
      raise UserError(
          f'tfds dataset {name!r} needs tensorflow-datasets, which is not installed: {_INSTALL}, '
          f'or use --config.dataset=folder:ROOT {_FOLDER_LAYOUT}') from e
    # Installed but one of its own imports fails: say which, since reinstalling is the cure.
    raise UserError(f'tensorflow-datasets is installed but cannot be imported ({_brief(e)}): '
                    f'{_INSTALL}, or use --config.dataset=folder:ROOT {_FOLDER_LAYOUT}') from e
  # tfds 4.9.x imports importlib_resources lazily (core/dataset_builder.py) without declaring it
  # as a dependency, so its absence would otherwise surface as a confusing error mid-load.
  if not _has_module('importlib_resources'):
    raise UserError('tensorflow-datasets needs importlib_resources, which it does not install '
                    f'itself: pip install importlib_resources (or {_INSTALL})')
  return tfds


def _make_builder(tfds: Any, name: str, data_dir: str | None) -> Any:
  """Returns the tfds builder of `name`, with unknown names reported as a UserError."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    # tfds' own message lists every registered dataset, hundreds of lines.
    raise UserError(
        f'unknown tfds dataset {name!r} (not in tensorflow-datasets {tfds.__version__}): check the '
        'name (e.g. cifar10; see https://www.tensorflow.org/datasets/catalog), or use '
        '--config.dataset=folder:/path/to/images') from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not open tfds dataset {name!r}: {_brief(e)}; check the name and '
                    'data_dir, or use --config.dataset=folder:/path/to/images') from e


def _is_prepared(builder: Any) -> bool:
  """Returns `builder.is_prepared()`, without its warning about a folder that does not exist.

  `is_prepared` checks the version folder through tfds' `file_utils.is_valid_variant_dir`, which
  logs (absl, WARNING) "Variant folder <data_dir>/<name>/<version> has no dataset_info.json" when
  that folder is simply absent, i.e. on every first run, where it reads like an error. An absent
  folder is answered here instead; a folder that exists but is incomplete still gets the warning.
  """
  return builder.data_path.exists() and builder.is_prepared()


def _download_dirs(builder: Any) -> tuple[Any, Any]:
  """Returns (download dir, manual dir): tfds' defaults, passed to it explicitly on preparing.

  Passing them (`download_dir`, `DownloadConfig.manual_dir`) makes the folders that the offline
  check inspects and names in its message the ones tfds uses, by construction.
  """
  download_dir = builder.data_dir_root / 'downloads'
  return download_dir, download_dir / 'manual'


def _cached_sizes(download_dir: Any, name: str) -> dict[str, int]:
  """Returns {url: file size} of the files in tfds' download cache.

  tfds writes a JSON sidecar `<file>.INFO` next to each file it downloaded, listing its "urls"
  (the cache layout that `tfds.download.DownloadManager`'s docstring describes, there with the
  name `<file>.INFO.json`; tfds 4.9 writes `<file>.INFO`). Reading those files avoids tfds'
  private cache-naming helpers. Should the layout change, cached archives merely go unnoticed: an
  offline run then fails fast, naming the manual folder, instead of preparing from the cache.
  """
  sizes = {}
  for folder in (download_dir / name, download_dir):  # Per-dataset subfolder, then legacy layout.
    try:
      info_paths = sorted(folder.glob('*.INFO'))
    except OSError:
      continue
    for info_path in info_paths:
      path = info_path.with_suffix('')  # 'x.tar.gz.INFO' -> 'x.tar.gz'
      try:
        urls = json.loads(info_path.read_text()).get('urls', [])
        # A sidecar without its file is a download tfds does not reuse. (os, not epath: the size
        # field of epath's stat result differs between its local and cloud backends.)
        size = os.path.getsize(os.fspath(path))
      except (OSError, ValueError, AttributeError):
        continue
      for url in urls:
        sizes.setdefault(url, size)
  return sizes


def _missing_downloads(builder: Any) -> list[tuple[str, str]]:
  """Returns (url, file name) of each archive neither in the manual dir nor in tfds' cache.

  The archives come from `builder.url_infos` (url -> size, sha256 and file name, from the
  dataset's registered checksums), the one semi-public name used in this module: an attribute of
  `tfds.core.DatasetBuilder` without a leading underscore, but absent from tfds' guides, and its
  `UrlInfo` values are of a type tfds does not export. tfds offers no documented way to list a
  dataset's downloads before downloading them; only the values' `filename` and `size` are read,
  with defaults, and a missing `url_infos` means nothing to check (tfds then downloads itself).
  """
  url_infos = builder.url_infos or {}  # None for builders without registered checksums.
  download_dir, manual_dir = _download_dirs(builder)
  cached = None  # Read only when an archive is not in the manual folder.
  missing = []
  for url, info in url_infos.items():
    filename = (getattr(info, 'filename', None) or
                posixpath.basename(urllib.parse.urlsplit(url).path))
    # tfds takes a manual file by the registered file name without any download.
    if filename and (manual_dir / filename).exists():
      continue
    if cached is None:
      cached = _cached_sizes(download_dir, builder.name)
    size = getattr(info, 'size', None)
    # A cached file of another size than registered is downloaded again by tfds.
    if url in cached and (not size or cached[url] == size):
      continue
    missing.append((url, filename))
  return missing


def _check_downloadable(builder: Any, name: str) -> None:
  """Raises a UserError at once when archives are missing and their host cannot be reached."""
  missing = _missing_downloads(builder)
  hosts = []  # Each (host, port) once, in URL order.
  for url, _ in missing:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname, parts.port or (80 if parts.scheme == 'http' else 443))
    if parts.hostname and host not in hosts:
      hosts.append(host)
  for host, port in hosts:
    if not _can_reach(host, port, _PROBE_TIMEOUT_S):
      files = ', '.join(f for _, f in missing)
      _, manual_dir = _download_dirs(builder)
      raise UserError(
          f'tfds dataset {name!r} could not be downloaded ({host}:{port} unreachable, no '
          f'network?): place {files} in {manual_dir}/, or {_folder_hint(name)}')


def _feature_keys(tfds: Any, info: Any, name: str) -> tuple[str, str]:
  """Returns the (image, label) feature keys, from supervised_keys when the dataset has them."""
  features = info.features
  supervised = info.supervised_keys
  if (isinstance(supervised, tuple) and len(supervised) == 2 and
      all(isinstance(k, str) and k in features for k in supervised)):
    image_key, label_key = supervised
  else:
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if len(images) != 1 or len(labels) != 1:
      raise UserError(
          f'tfds dataset {name!r} is not a plain image classification dataset (image features '
          f'{images}, class label features {labels}); use --config.dataset=folder:/path/to/images')
    image_key, label_key = images[0], labels[0]
  if not isinstance(features[image_key], tfds.features.Image):
    raise UserError(f'tfds dataset {name!r}: feature {image_key!r} is not an image')
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise UserError(f'tfds dataset {name!r}: feature {label_key!r} is not a class label')
  return image_key, label_key


def _to_numpy(source: Any, image_key: str, label_key: str, image_shape: Any, name: str,
              split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every example of `source`, in stored order, into preallocated arrays."""
  n = len(source)
  labels = np.empty((n,), np.int32)
  images = None
  for start in range(0, n, _CHUNK):
    # Batched reads: one reader call per chunk instead of one per example.
    examples = source.__getitems__(list(range(start, min(n, start + _CHUNK))))
    for i, example in enumerate(examples, start):
      image = np.asarray(example[image_key])
      if images is None:
        # Preallocating avoids holding a list of 60k arrays and their stacked copy at once.
        images = np.empty((n,) + image.shape, np.uint8)
      if image.dtype != np.uint8:
        raise UserError(f'tfds dataset {name!r} has {image.dtype} images; only uint8 is supported')
      if image.shape != images.shape[1:]:
        raise UserError(
            f'tfds dataset {name!r} split {split!r} has images of different shapes '
            f'({images.shape[1:]} and {image.shape}); use --config.dataset=folder:/path/to/images')
      images[i] = image
      labels[i] = int(example[label_key])
  if images is None:  # Empty split: keep the feature's static shape where it is known.
    images = np.zeros((0,) + tuple(d or 0 for d in image_shape), np.uint8)
  return images, labels


class TfdsSource:
  """One tfds image classification dataset, read through a single tfds builder.

  The builder is made once, here, and serves the cache key (`fingerprint`), the class names, the
  preparation and every split (`load_split`).

  Args:
    name: tfds dataset name, e.g. 'cifar10' (optionally with config and version, as tfds accepts).
    data_dir: tfds data folder; None for tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets).

  Raises:
    UserError: tensorflow-datasets is missing or the name is unknown.
  """

  def __init__(self, name: str, data_dir: str | None):
    self.name = name
    self._tfds = _import_tfds(name)
    if data_dir:
      data_dir = os.path.expanduser(data_dir)
    self._builder = _make_builder(self._tfds, name, data_dir)
    self._keys: tuple[str, str] | None = None

  def _feature_keys(self) -> tuple[str, str]:
    """(image, label) feature keys, checked once."""
    if self._keys is None:
      self._keys = _feature_keys(self._tfds, self._builder.info, self.name)
    return self._keys

  def is_prepared(self) -> bool:
    """Whether the dataset is on disk (downloaded and written as record files)."""
    return _is_prepared(self._builder)

  @property
  def class_names(self) -> list[str]:
    """Class names in label order (some datasets, e.g. cifar10, only know them once prepared)."""
    _, label_key = self._feature_keys()
    return [str(c) for c in self._builder.info.features[label_key].names]

  def fingerprint(self) -> str | None:
    """A key of the prepared files; None while the dataset is not prepared.

    The key names every file of the prepared version with its size and modification time, so a
    cache of the decoded arrays (`dsconv_jax.data`) is used only while those files are unchanged.
    Reading the dataset info is cheap; decoding the images is what the cache saves.
    """
    if not self.is_prepared():
      return None
    self._feature_keys()  # Not an image classification dataset: the UserError, not a cache hit.
    root = os.fspath(self._builder.data_dir)
    entries = []
    for file_name in sorted(os.listdir(root)):
      st = os.stat(os.path.join(root, file_name))
      entries.append(f'{file_name}|{st.st_size}|{st.st_mtime_ns}')
    return f'{root}|{self._builder.info.full_name}|' + ';'.join(entries)

  def prepare(self) -> None:
    """Downloads the dataset and writes it as ArrayRecord files, unless it is prepared already.

    Raises:
      UserError: preparing needs TensorFlow, which is missing; the archives are missing and their
        host cannot be reached; or the download or preparation failed.
    """
    if self.is_prepared():
      return
    builder, name = self._builder, self.name
    root = builder.data_dir_root
    # Writing tf.train.Example records needs TensorFlow even though reading them back does not.
    if not _has_module('tensorflow'):
      raise UserError(
          f'tfds dataset {name!r} is not prepared in {root} and preparing it needs TensorFlow: '
          f'{_INSTALL} (or pip install tensorflow-cpu), or {_folder_hint(name)}')
    _check_downloadable(builder, name)
    download_dir, manual_dir = _download_dirs(builder)
    try:
      builder.download_and_prepare(
          download_dir=download_dir,
          # ArrayRecord is the format data sources read; GCS copies of prepared datasets are
          # TFRecord only, so they are not tried.
          file_format='array_record',
          download_config=self._tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                             try_download_gcs=False))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(
          f'could not download and prepare tfds dataset {name!r} in {root} ({_brief(e)}): check '
          f'the network and disk space, place the archives in {manual_dir}/, or '
          f'{_folder_hint(name)}') from e

  def _data_source(self, split: str) -> Any:
    """Returns the random-access data source of `split`."""
    builder, name = self._builder, self.name
    splits = builder.info.splits
    # Only plain names are checked here; tfds itself rejects bad slices like 'train[:200%]'.
    if splits and split.isidentifier() and split not in splits:
      raise UserError(f'tfds dataset {name!r} has no split {split!r}; it has '
                      f'{", ".join(sorted(splits))}')
    try:
      return builder.as_data_source(split=split)
    except NotImplementedError as e:
      # Raised when an earlier `tfds.load` prepared the same version as TFRecord files.
      fmt = getattr(builder.info.file_format, 'value', builder.info.file_format)
      raise UserError(
          f'tfds dataset {name!r} is prepared in {builder.data_dir} as {fmt}, which cannot be '
          'read without TensorFlow; delete that folder (it is then prepared again as '
          'array_record) or use another data_dir') from e
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'could not read split {split!r} of tfds dataset {name!r} in '
                      f'{builder.data_dir}: {_brief(e)}') from e

  def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split into memory, preparing the dataset first when it is not on disk yet.

    Args:
      split: split name, e.g. 'train' or 'test'.

    Returns:
      (images uint8 [N, H, W, C], labels int32 [N]) of all examples of the split, in the
      dataset's stored order.

    Raises:
      UserError: the split is unknown, the dataset cannot be prepared (see `prepare`), or it is
        not a uint8 image classification dataset of fixed image size.
    """
    self.prepare()
    image_key, label_key = self._feature_keys()
    source = self._data_source(split)
    image_shape = self._builder.info.features[image_key].shape
    return _to_numpy(source, image_key, label_key, image_shape, self.name, split)
