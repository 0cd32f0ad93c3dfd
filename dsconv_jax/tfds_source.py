"""Loads a whole TensorFlow Datasets image classification split as numpy arrays.

Reading goes through tfds' random-access data sources (ArrayRecord files), which need no
TensorFlow; only preparing a dataset that is not yet on disk does. `tensorflow_datasets` is imported
inside `load_split` so that the rest of the project works without it installed.

Offline machines get a prompt, actionable `UserError` instead of tfds' minutes of download retries:
before preparing, the download host is probed with a plain TCP connection unless every archive the
dataset needs is already in `<data_dir>/downloads/manual/` or tfds' download cache.
"""

from __future__ import annotations

import importlib.util
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


def _import_tfds() -> Any:
  """Imports tensorflow_datasets, turning a missing install into a UserError."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        'tfds datasets need tensorflow-datasets: pip install tensorflow-datasets tensorflow-cpu, '
        'or use --config.dataset=folder:/path/to/images') from e
  # tfds 4.9.x imports importlib_resources lazily (core/dataset_builder.py) without declaring it
  # as a dependency, so its absence would otherwise surface as a confusing error mid-load.
  if not _has_module('importlib_resources'):
    raise UserError('tensorflow-datasets needs importlib_resources, which it does not install '
                    'itself: pip install importlib_resources')
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


def _is_cached(download_dir: Any, url: str, checksum: str | None) -> bool:
  """Returns whether tfds' download cache already holds `url` (see DownloadManager._get_dl_path)."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from tensorflow_datasets.core.download import resource as resource_lib
    return any(
        resource_lib.is_locally_cached(d / resource_lib.get_dl_fname(url, c))
        for d in download_dir  # Per-dataset subfolder, then the legacy flat layout.
        for c in (checksum, None))  # Registered checksum, then the url-hash name.
  except Exception:  # pylint: disable=broad-except
    # A tfds internal that moved only costs a probe that may turn out unnecessary.
    return False


def _missing_downloads(builder: Any) -> list[tuple[str, str]]:
  """Returns (url, file name) of each archive neither in the manual dir nor in tfds' cache."""
  url_infos = builder.url_infos or {}  # None for builders without registered checksums.
  download_dir = builder.data_dir_root / 'downloads'
  manual_dir = download_dir / 'manual'
  missing = []
  for url, info in url_infos.items():
    filename = info.filename or posixpath.basename(urllib.parse.urlsplit(url).path)
    # tfds takes a manual file by the registered file name without any download.
    if filename and (manual_dir / filename).exists():
      continue
    if _is_cached((download_dir / builder.name, download_dir), url, info.checksum):
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
      manual_dir = builder.data_dir_root / 'downloads' / 'manual'
      raise UserError(
          f'tfds dataset {name!r} could not be downloaded ({host}:{port} unreachable, no '
          f'network?): place {files} in {manual_dir}/, or {_folder_hint(name)}')


def _prepare(tfds: Any, builder: Any, name: str) -> None:
  """Downloads and writes the dataset as ArrayRecord files, the format data sources read."""
  root = builder.data_dir_root
  # Writing tf.train.Example records needs TensorFlow even though reading them back does not.
  if not _has_module('tensorflow'):
    raise UserError(
        f'tfds dataset {name!r} is not prepared in {root} and preparing it needs TensorFlow: '
        f'pip install tensorflow-cpu, or {_folder_hint(name)}')
  _check_downloadable(builder, name)
  try:
    # GCS copies of prepared datasets are TFRecord only, which data sources cannot read.
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
        f'could not download and prepare tfds dataset {name!r} in {root} ({_brief(e)}): check the '
        f'network and disk space, place the archives in {root / "downloads" / "manual"}/, or '
        f'{_folder_hint(name)}') from e


def _data_source(builder: Any, name: str, split: str) -> Any:
  """Returns the random-access data source of `split`."""
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
        f'tfds dataset {name!r} is prepared in {builder.data_dir} as {fmt}, which cannot be read '
        'without TensorFlow; delete that folder (it is then prepared again as array_record) or '
        'use another data_dir') from e
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not read split {split!r} of tfds dataset {name!r} in '
                    f'{builder.data_dir}: {_brief(e)}') from e


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


def prepared_fingerprint(name: str, data_dir: str | None) -> tuple[str, list[str]] | None:
  """(a key of the prepared files, class names) of a prepared dataset; None if not prepared.

  The key names every file of the prepared version with its size and modification time, so a
  cache of the decoded arrays (`dsconv_jax.data`) is used only while those files are unchanged.
  Reading the dataset info is cheap; decoding the images is what the cache saves.
  """
  tfds = _import_tfds()
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  builder = _make_builder(tfds, name, data_dir)
  if not builder.is_prepared():
    return None
  info = builder.info
  _, label_key = _feature_keys(tfds, info, name)
  root = os.fspath(builder.data_dir)
  entries = []
  for file_name in sorted(os.listdir(root)):
    st = os.stat(os.path.join(root, file_name))
    entries.append(f'{file_name}|{st.st_size}|{st.st_mtime_ns}')
  key = f'{root}|{builder.info.full_name}|' + ';'.join(entries)
  return key, [str(c) for c in info.features[label_key].names]


def load_split(name: str, split: str,
               data_dir: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Loads one split of a tfds image classification dataset into memory.

  Prepares the dataset first (download, then ArrayRecord files under `data_dir`) when it is not on
  disk yet.

  Args:
    name: tfds dataset name, e.g. 'cifar10' (optionally with config and version, as tfds accepts).
    split: split name, 'train' or 'test'.
    data_dir: tfds data folder; None for tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N], class_names) of all examples of the split, in
    the dataset's stored order.

  Raises:
    UserError: tfds is missing, the name or split is unknown, the dataset cannot be downloaded or
      prepared, or it is not a uint8 image classification dataset of fixed image size.
  """
  tfds = _import_tfds()
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  builder = _make_builder(tfds, name, data_dir)
  if not builder.is_prepared():
    _prepare(tfds, builder, name)
  info = builder.info
  image_key, label_key = _feature_keys(tfds, info, name)
  source = _data_source(builder, name, split)
  images, labels = _to_numpy(source, image_key, label_key, info.features[image_key].shape, name,
                             split)
  class_names = [str(c) for c in info.features[label_key].names]
  return images, labels, class_names
