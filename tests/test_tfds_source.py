"""Tests of dsconv_jax.tfds_source: shapes, dtypes, class names and the offline/user errors.

Nothing here touches the network: tfds is mocked with `tfds.testing.mock_data`, or a tiny dataset
generated locally is prepared, and the reachability probe is monkeypatched.
"""

from __future__ import annotations

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
    images, labels, class_names = tfds_source.load_split('cifar10', split, str(tmp_path))
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
  train_images, train_labels, class_names = tfds_source.load_split(
      'tiny_labeled_images', 'train', str(tmp_path))
  assert (tmp_path / 'tiny_labeled_images' / '1.0.0').is_dir()
  assert list((tmp_path / 'tiny_labeled_images' / '1.0.0').glob('*.array_record*'))
  assert train_images.shape == (12, 4, 5, 3) and train_images.dtype == np.uint8
  assert train_labels.shape == (12,) and train_labels.dtype == np.int32
  assert class_names == _TINY_NAMES
  # tfds shuffles at preparation time; whatever the order, images and labels must stay paired.
  np.testing.assert_array_equal(train_labels, train_images[:, 0, 0, 0] % 3)
  assert sorted(train_images[:, 0, 0, 0].tolist()) == list(range(12))
  # The second call reads the prepared files, and in the same order.
  again, again_labels, _ = tfds_source.load_split('tiny_labeled_images', 'train', str(tmp_path))
  np.testing.assert_array_equal(again, train_images)
  np.testing.assert_array_equal(again_labels, train_labels)
  test_images, test_labels, _ = tfds_source.load_split(
      'tiny_labeled_images', 'test', str(tmp_path))
  assert test_images.shape == (5, 4, 5, 3) and test_labels.shape == (5,)
  assert not no_network


def test_unknown_split_is_user_error(tmp_path):
  pytest.importorskip('tensorflow')
  tfds_source.load_split('tiny_labeled_images', 'train', str(tmp_path))
  with pytest.raises(UserError, match="no split 'validation'"):
    tfds_source.load_split('tiny_labeled_images', 'validation', str(tmp_path))


def test_offline_fails_fast_with_manual_dir_and_folder_hint(monkeypatch, tmp_path, no_network):
  probes = []

  def unreachable(host, port, timeout):
    probes.append((host, port, timeout))
    return False

  monkeypatch.setattr(tfds_source, '_can_reach', unreachable)
  start = time.monotonic()
  with pytest.raises(UserError) as excinfo:
    tfds_source.load_split('cifar10', 'train', str(tmp_path))
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


def test_unknown_dataset_is_user_error(tmp_path, no_network):
  with pytest.raises(UserError, match="unknown tfds dataset 'no_such_dataset_xyz'") as excinfo:
    tfds_source.load_split('no_such_dataset_xyz', 'train', str(tmp_path))
  assert '\n' not in str(excinfo.value)
  assert 'folder:' in str(excinfo.value)


def test_missing_tfds_is_user_error(monkeypatch):
  # A None entry in sys.modules makes `import tensorflow_datasets` raise ImportError.
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(UserError, match='pip install tensorflow-datasets tensorflow-cpu'):
    tfds_source.load_split('cifar10', 'train', None)


def test_missing_importlib_resources_is_user_error(monkeypatch):
  monkeypatch.setattr(tfds_source, '_has_module', lambda name: name != 'importlib_resources')
  with pytest.raises(UserError, match='pip install importlib_resources'):
    tfds_source.load_split('cifar10', 'train', None)


def test_missing_tensorflow_for_prepare_is_user_error(monkeypatch, tmp_path, no_network):
  monkeypatch.setattr(tfds_source, '_has_module', lambda name: name != 'tensorflow')
  with pytest.raises(UserError, match='needs TensorFlow'):
    tfds_source.load_split('cifar10', 'train', str(tmp_path))


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

  monkeypatch.setattr(tfds_source, 'load_split', no_decoding)
  again = data.load_dataset('tiny_labeled_images', str(tmp_path / 'tfds'), str(cache))
  for split in ('train', 'test'):
    np.testing.assert_array_equal(getattr(again, split).images, getattr(first, split).images)
    np.testing.assert_array_equal(getattr(again, split).labels, getattr(first, split).labels)
  assert again.class_names == first.class_names == _TINY_NAMES
  assert again.source == first.source
  assert not no_network
