"""Tests of dsconv_jax.tfds_source: shapes, dtypes, class names and the offline/user errors.

Nothing here touches the network: tfds is mocked with `tfds.testing.mock_data`, or a tiny dataset
generated locally is prepared, and the reachability probe is monkeypatched.
"""

from __future__ import annotations

import builtins
import json
import logging
import socket
import sys
import time

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')

from dsconv_jax import tfds_source  # pylint: disable=g-import-not-at-top,wrong-import-position
from dsconv_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_TINY_NAMES = ['cat', 'dog', 'frog']


class TinyLabeledImages(tfds.core.GeneratorBasedBuilder):
  """A 3-class, 4x5 RGB dataset generated locally, to exercise the real prepare-and-read path."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(4, 5, 3)),
            'label': tfds.features.ClassLabel(names=_TINY_NAMES),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(12), 'test': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      # The pixel value encodes the index, so each image can be matched with its label.
      yield i, {'image': np.full((4, 5, 3), i, np.uint8), 'label': i % 3}


@pytest.fixture
def no_network(monkeypatch):
  """Makes any socket connection attempt fail the test, and returns the list of attempts."""
  attempts = []

  def refuse(self, address, *args):
    attempts.append(address)
    raise AssertionError(f'network connection attempted to {address}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
  return attempts


@pytest.mark.parametrize('split', ['train', 'test'])
def test_cifar10_mock_shapes_dtypes_and_class_names(monkeypatch, tmp_path, no_network,
                                                    batched_mock_reads, split):
  # mock_data makes the builder look unprepared and `download_and_prepare` a no-op, so only the
  # probe has to be told that the (never contacted) host is reachable.
  monkeypatch.setattr(tfds_source, '_can_reach', lambda host, port, timeout: True)
  with tfds.testing.mock_data(num_examples=7):
    source = tfds_source.TfdsSource('cifar10', str(tmp_path))
    images, labels = source.load_split(split)
    class_names = source.class_names
  assert images.shape == (7, 32, 32, 3)
  assert images.dtype == np.uint8
  assert labels.shape == (7,)
  assert labels.dtype == np.int32
  assert ((labels >= 0) & (labels < 10)).all()
  # Unprepared cifar10 has the unnamed ClassLabel(num_classes=10) of its builder code.
  assert class_names == [str(i) for i in range(10)]
  assert not no_network


def test_prepares_and_reads_local_dataset_in_stored_order(monkeypatch, tmp_path, no_network):
  pytest.importorskip('tensorflow')  # Preparing writes tf.train.Example records.
  monkeypatch.setattr(tfds_source, '_CHUNK', 5)  # 12 examples: two full chunks and a partial one.
  source = tfds_source.TfdsSource('tiny_labeled_images', str(tmp_path))
  assert not source.is_prepared() and source.fingerprint() is None
  train_images, train_labels = source.load_split('train')
  class_names = source.class_names
  assert (tmp_path / 'tiny_labeled_images' / '1.0.0').is_dir()
  assert list((tmp_path / 'tiny_labeled_images' / '1.0.0').glob('*.array_record*'))
  assert train_images.shape == (12, 4, 5, 3) and train_images.dtype == np.uint8
  assert train_labels.shape == (12,) and train_labels.dtype == np.int32
  assert class_names == _TINY_NAMES
  # tfds shuffles at preparation time; whatever the order, images and labels must stay paired.
  np.testing.assert_array_equal(train_labels, train_images[:, 0, 0, 0] % 3)
  assert sorted(train_images[:, 0, 0, 0].tolist()) == list(range(12))
  # A new source reads the prepared files, and in the same order.
  again = tfds_source.TfdsSource('tiny_labeled_images', str(tmp_path))
  assert again.is_prepared() and again.fingerprint() == source.fingerprint() is not None
  again_images, again_labels = again.load_split('train')
  np.testing.assert_array_equal(again_images, train_images)
  np.testing.assert_array_equal(again_labels, train_labels)
  test_images, test_labels = again.load_split('test')
  assert test_images.shape == (5, 4, 5, 3) and test_labels.shape == (5,)
  assert not no_network


def test_unknown_split_is_user_error(tmp_path):
  pytest.importorskip('tensorflow')
  source = tfds_source.TfdsSource('tiny_labeled_images', str(tmp_path))
  source.prepare()
  with pytest.raises(UserError, match="no split 'validation'"):
    source.load_split('validation')


def test_offline_fails_fast_with_manual_dir_and_folder_hint(monkeypatch, tmp_path, no_network):
  probes = []

  def unreachable(host, port, timeout):
    probes.append((host, port, timeout))
    return False

  monkeypatch.setattr(tfds_source, '_can_reach', unreachable)
  start = time.monotonic()
  with pytest.raises(UserError) as excinfo:
    tfds_source.TfdsSource('cifar10', str(tmp_path)).load_split('train')
  assert time.monotonic() - start < 5
  message = str(excinfo.value)
  assert '\n' not in message
  assert 'cifar-10-binary.tar.gz' in message
  assert f'{tmp_path}/downloads/manual' in message
  assert '--config.dataset=folder:' in message
  assert probes == [('www.cs.toronto.edu', 443, tfds_source._PROBE_TIMEOUT_S)]
  assert not no_network


def test_manual_archive_skips_probe(monkeypatch, tmp_path):
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  (manual / 'cifar-10-binary.tar.gz').write_bytes(b'')
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  assert tfds_source._missing_downloads(builder) == []
  monkeypatch.setattr(tfds_source, '_can_reach',
                      lambda *a: pytest.fail('probed despite the manual archive'))
  tfds_source._check_downloadable(builder, 'cifar10')


def _cache_archive(folder, url, size, name='cached-archive.tar.gz'):
  """Writes a file of `size` bytes and the `<file>.INFO` sidecar tfds writes next to downloads."""
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / name, 'wb') as f:
    f.truncate(size)  # Sparse: the size is what counts, not the content.
  (folder / f'{name}.INFO').write_text(json.dumps({'dataset_names': ['cifar10'], 'urls': [url]}))


@pytest.mark.parametrize('layout', ['per_dataset', 'legacy_flat'])
def test_cached_archive_skips_probe(monkeypatch, tmp_path, layout):
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  (url, info), = builder.url_infos.items()
  downloads = tmp_path / 'downloads'
  folder = downloads / 'cifar10' if layout == 'per_dataset' else downloads
  _cache_archive(folder, url, info.size)
  assert tfds_source._missing_downloads(builder) == []
  monkeypatch.setattr(tfds_source, '_can_reach',
                      lambda *a: pytest.fail('probed despite the cached archive'))
  tfds_source._check_downloadable(builder, 'cifar10')


def test_partial_or_orphaned_cache_still_probes(tmp_path):
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  (url, info), = builder.url_infos.items()
  downloads = tmp_path / 'downloads' / 'cifar10'
  # tfds downloads again a file of another size than registered (a truncated download) ...
  _cache_archive(downloads, url, info.size - 1)
  assert tfds_source._missing_downloads(builder) == [(url, 'cifar-10-binary.tar.gz')]
  # ... and one whose sidecar lists another url, or whose file is gone.
  (downloads / 'cached-archive.tar.gz.INFO').unlink()
  _cache_archive(downloads, 'https://example.com/other.tar.gz', info.size)
  _cache_archive(downloads, url, info.size, name='gone.tar.gz')
  (downloads / 'gone.tar.gz').unlink()
  assert tfds_source._missing_downloads(builder) == [(url, 'cifar-10-binary.tar.gz')]


def test_offline_load_logs_no_warning_about_absent_folders(monkeypatch, tmp_path, capfd, caplog,
                                                           no_network):
  # tfds' `is_prepared` warns "Variant folder .../cifar10/3.0.2 has no dataset_info.json" about a
  # folder that a first run has not created yet; the user should see only the UserError.
  from dsconv_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds_source, '_can_reach', lambda host, port, timeout: False)
  caplog.set_level(logging.INFO)
  with pytest.raises(UserError, match='could not be downloaded'):
    data.load_dataset('cifar10', str(tmp_path / 'tfds'), str(tmp_path / 'cache'))
  logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [m for m in logged if 'Variant folder' in m], logged
  assert 'Variant folder' not in capfd.readouterr().err
  assert not (tmp_path / 'tfds' / 'cifar10').exists()  # The folder the warning named.
  assert not no_network


def test_incomplete_variant_folder_still_warns(tmp_path, caplog):
  # Only the warning about an absent folder is silenced: one that exists but lacks its metadata
  # (copied half, or deleted in part) is worth tfds' warning.
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  builder.data_path.mkdir(parents=True)
  caplog.set_level(logging.WARNING)
  assert not tfds_source._is_prepared(builder)
  assert any('Variant folder' in r.getMessage() for r in caplog.records)


@pytest.fixture
def builder_calls(monkeypatch):
  """Counts `tfds.builder` calls: returns the list of dataset names it was called with."""
  calls = []
  original = tfds.builder

  def counting_builder(name, *args, **kwargs):
    calls.append(name)
    return original(name, *args, **kwargs)

  monkeypatch.setattr(tfds, 'builder', counting_builder)
  return calls


def test_one_builder_serves_fingerprint_and_both_splits(monkeypatch, tmp_path, no_network,
                                                        batched_mock_reads, builder_calls):
  from dsconv_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds_source, '_can_reach', lambda host, port, timeout: True)
  with tfds.testing.mock_data(num_examples=6):
    # With a cache dir: cache key, preparation, both splits, then the key again for writing.
    ds = data.load_dataset('cifar10', str(tmp_path / 'tfds'), str(tmp_path / 'cache'))
  assert ds.train.images.shape == ds.test.images.shape == (6, 32, 32, 3)
  assert builder_calls == ['cifar10']


def test_one_builder_per_load_of_a_prepared_and_cached_dataset(tmp_path, no_network,
                                                               builder_calls):
  pytest.importorskip('tensorflow')  # Preparing writes tf.train.Example records.
  from dsconv_jax import data  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  data.load_dataset('tiny_labeled_images', str(tmp_path / 'tfds'), str(cache))
  assert builder_calls == ['tiny_labeled_images']  # Prepared, read and cached with one builder.
  assert len(list(cache.glob('tfds-*.npz'))) == 1
  data.load_dataset('tiny_labeled_images', str(tmp_path / 'tfds'), str(cache))
  assert builder_calls == ['tiny_labeled_images'] * 2  # The cached load: one more.


def test_unknown_dataset_is_user_error(tmp_path, no_network):
  with pytest.raises(UserError, match="unknown tfds dataset 'no_such_dataset_xyz'") as excinfo:
    tfds_source.TfdsSource('no_such_dataset_xyz', str(tmp_path))
  assert '\n' not in str(excinfo.value)
  assert 'folder:' in str(excinfo.value)


def test_missing_tfds_is_user_error_naming_the_extra(monkeypatch):
  from dsconv_jax import data  # pylint: disable=g-import-not-at-top
  # A None entry in sys.modules makes `import tensorflow_datasets` raise ModuleNotFoundError, as
  # when the package is not installed.
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(UserError) as excinfo:
    data.load_dataset('cifar10')
  message = str(excinfo.value)
  assert '\n' not in message
  assert "needs tensorflow-datasets, which is not installed: pip install 'dsconv_jax[tfds]'" in (
      message)
  assert '--config.dataset=folder:ROOT' in message


def test_broken_tfds_install_is_user_error_naming_the_cause(monkeypatch):
  real_import = builtins.__import__

  def import_with_broken_dependency(name, *args, **kwargs):
    if name == 'tensorflow_datasets':  # As if one of its own dependencies were missing.
      raise ModuleNotFoundError("No module named 'etils'", name='etils')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', import_with_broken_dependency)
  with pytest.raises(UserError) as excinfo:
    tfds_source.TfdsSource('cifar10', None)
  message = str(excinfo.value)
  assert 'installed but cannot be imported' in message and "'etils'" in message
  assert "pip install 'dsconv_jax[tfds]'" in message and '\n' not in message


def test_missing_importlib_resources_is_user_error(monkeypatch):
  monkeypatch.setattr(tfds_source, '_has_module', lambda name: name != 'importlib_resources')
  with pytest.raises(UserError, match='pip install importlib_resources'):
    tfds_source.TfdsSource('cifar10', None)


def test_missing_tensorflow_for_prepare_is_user_error(monkeypatch, tmp_path, no_network):
  monkeypatch.setattr(tfds_source, '_has_module', lambda name: name != 'tensorflow')
  with pytest.raises(UserError, match=r"needs TensorFlow: pip install 'dsconv_jax\[tfds\]'"):
    tfds_source.TfdsSource('cifar10', str(tmp_path)).load_split('train')


def test_can_reach_false_for_closed_port():
  # A freshly bound but non-listening local port refuses at once; no external network involved.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  assert not tfds_source._can_reach('127.0.0.1', port, 1.0)


def test_decoded_tfds_dataset_is_cached_for_the_next_run(monkeypatch, tmp_path, no_network):
  pytest.importorskip('tensorflow')  # Preparing writes tf.train.Example records.
  from dsconv_jax import data  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  first = data.load_dataset('tiny_labeled_images', str(tmp_path / 'tfds'), str(cache))
  assert len(list(cache.glob('tfds-*.npz'))) == 1

  def no_decoding(*args, **kwargs):
    raise AssertionError('the cached dataset was decoded again')

  monkeypatch.setattr(tfds_source.TfdsSource, 'load_split', no_decoding)
  again = data.load_dataset('tiny_labeled_images', str(tmp_path / 'tfds'), str(cache))
  for split in ('train', 'test'):
    np.testing.assert_array_equal(getattr(again, split).images, getattr(first, split).images)
    np.testing.assert_array_equal(getattr(again, split).labels, getattr(first, split).labels)
  assert again.class_names == first.class_names == _TINY_NAMES
  assert again.source == first.source
  assert not no_network
