"""Image-folder datasets: layout, formats, caching, subsets and the errors for bad folders."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import make_image_folder
from dsconv_jax import data
from dsconv_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_folder_dataset_reads_both_splits_in_class_order(image_folder):
  ds = data.load_folder(image_folder)
  assert ds.class_names == ['cat', 'dog', 'frog']
  assert ds.train.images.shape == (36, 32, 32, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (12, 32, 32, 3)
  assert sorted(set(ds.train.labels.tolist())) == [0, 1, 2]
  # make_image_folder brightens channel c for class c: labels and pixels stay paired.
  brightest = ds.train.images.reshape(36, -1, 3).mean(1).argmax(-1)
  np.testing.assert_array_equal(brightest, ds.train.labels)


def test_grayscale_jpeg_and_odd_sizes(tmp_path):
  root = make_image_folder(tmp_path / 'gray', mode='L', ext='.jpg', size=20, per_class=(3, 2))
  ds = data.load_folder(root)
  assert ds.image_shape == (20, 20, 1)
  resized = data.load_folder(root, image_size=12)
  assert resized.image_shape == (12, 12, 1)


def test_cache_is_written_and_reused(tmp_path, image_folder):
  cache = tmp_path / 'cache'
  first = data.load_folder(image_folder, cache_dir=str(cache))
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].endswith('.npz')
  # Touching the files changes the cache key: a changed folder gets a fresh entry.
  for dirpath, _, names in os.walk(image_folder):
    for n in names:
      os.utime(os.path.join(dirpath, n), ns=(1, 1))
  second = data.load_folder(image_folder, cache_dir=str(cache))
  np.testing.assert_array_equal(first.train.images, second.train.images)
  assert len(os.listdir(cache)) == 2


def test_cache_hit_skips_decoding(tmp_path, image_folder, monkeypatch):
  cache = str(tmp_path / 'cache')
  data.load_folder(image_folder, cache_dir=cache)
  monkeypatch.setattr(data, '_decode_all', lambda *a, **k: pytest.fail('decoded again'))
  data.load_folder(image_folder, cache_dir=cache)


def test_subset_is_seeded_and_fixed(image_folder):
  ds = data.load_folder(image_folder)
  a = data.take_subset(ds.train, 10, seed=0)
  b = data.take_subset(ds.train, 10, seed=0)
  c = data.take_subset(ds.train, 10, seed=1)
  np.testing.assert_array_equal(a.images, b.images)
  assert len(a.labels) == 10 and not np.array_equal(a.images, c.images)


def test_normalization_stats():
  images = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (10, 30)])
  assert data.normalization_stats(images, 'scale') == ([0.0] * 3, [255.0] * 3)
  mean, std = data.normalization_stats(images, 'standardize')
  np.testing.assert_allclose(mean, [20.0] * 3)
  np.testing.assert_allclose(std, [10.0] * 3)
  with pytest.raises(UserError, match='normalization'):
    data.normalization_stats(images, 'zca')


def test_missing_folder(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    data.load_dataset(f'folder:{tmp_path}/nowhere')


def test_missing_split_and_empty_folders(tmp_path, image_folder):
  shutil.rmtree(os.path.join(image_folder, 'test'))
  with pytest.raises(UserError, match='has no test/ folder'):
    data.load_folder(image_folder)
  os.makedirs(os.path.join(image_folder, 'test'))
  with pytest.raises(UserError, match='has no class folders'):
    data.load_folder(image_folder)


def test_half_copied_class_folder(image_folder):
  d = os.path.join(image_folder, 'test', 'dog')
  for f in os.listdir(d):
    os.unlink(os.path.join(d, f))
  with pytest.raises(UserError, match="holds no images"):
    data.load_folder(image_folder)


def test_class_folders_that_differ(image_folder):
  os.rename(os.path.join(image_folder, 'test', 'dog'), os.path.join(image_folder, 'test', 'wolf'))
  with pytest.raises(UserError, match=r"differ \(only in train: \['dog'\]; only in test: "
                                      r"\['wolf'\]\)"):
    data.load_folder(image_folder)


def test_corrupt_image_is_named(image_folder):
  bad = os.path.join(image_folder, 'train', 'cat', '0003.png')
  with open(bad, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\nnot really')
  with pytest.raises(UserError, match='0003.png'):
    data.load_folder(image_folder)


def test_mixed_sizes_need_image_size(tmp_path):
  root = make_image_folder(tmp_path / 'a', per_class=(2, 2))
  from PIL import Image
  Image.new('RGB', (40, 40)).save(os.path.join(root, 'train', 'cat', 'big.png'))
  with pytest.raises(UserError, match='image_size'):
    data.load_folder(root)
  assert data.load_folder(root, image_size=32).image_shape == (32, 32, 3)


def test_import_and_folder_datasets_need_no_tensorflow(tmp_path, image_folder):
  # tensorflow-datasets and TensorFlow are the optional `tfds` extra. A fresh interpreter where
  # importing them fails, as when they are not installed, imports every module of the package,
  # reads a folder dataset, and gets a one-line UserError naming the extra for a tfds name.
  script = textwrap.dedent(f"""
      import importlib, pkgutil, sys
      for name in ('tensorflow', 'tensorflow_datasets'):
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError.
      import dsconv_jax
      assert dsconv_jax.__path__[0].startswith({ROOT!r}), dsconv_jax.__path__  # This checkout's.
      from dsconv_jax import data
      from dsconv_jax.errors import UserError
      for module in pkgutil.iter_modules(dsconv_jax.__path__):
        importlib.import_module('dsconv_jax.' + module.name)
      ds = data.load_dataset('folder:{image_folder}', cache_dir={str(tmp_path / 'cache')!r})
      assert ds.train.images.shape == (36, 32, 32, 3), ds.train.images.shape
      try:
        data.load_dataset('cifar10')
      except UserError as e:
        print('UserError:', e)
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  assert "pip install 'dsconv_jax[tfds]'" in lines[0]
  assert '--config.dataset=folder:ROOT' in lines[0]


def _one_image_folder(root, images):
  """ROOT/{train,test}/a/0.png from Pillow images (the same one in both splits)."""
  for split in ('train', 'test'):
    for i, img in enumerate(images):
      d = os.path.join(root, split, 'a')
      os.makedirs(d, exist_ok=True)
      img.save(os.path.join(d, f'{i}.png' if img.mode != 'CMYK' else f'{i}.jpg'))
  return str(root)


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
  from PIL import Image
  values = np.linspace(1, 65420, 64).astype(np.uint16).reshape(8, 8)
  img = Image.fromarray(values)  # mode I;16
  assert img.mode.startswith('I')
  ds = data.load_folder(_one_image_folder(tmp_path / 'f', [img]))
  np.testing.assert_array_equal(ds.train.images[0, ..., 0], np.round(values / 257.0))
  assert ds.image_shape == (8, 8, 1)


def test_palette_rgba_la_and_cmyk_follow_the_stated_rules(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  alpha = rng.integers(0, 256, (6, 6, 1), dtype=np.uint8)
  grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
  cases = {
      # Alpha dropped: the stored colour, whatever the transparency.
      'RGBA': (Image.fromarray(np.concatenate([rgb, alpha], -1), 'RGBA'), rgb),
      # A palette image: its colours.
      'P': (Image.fromarray(rgb).quantize(16), None),
      # Grey with alpha, next to colour images: the grey repeated in R, G and B.
      'LA': (Image.fromarray(np.stack([grey, alpha[..., 0]], -1), 'LA'),
             np.repeat(grey[..., None], 3, -1)),
      'CMYK': (Image.fromarray(rgb).convert('CMYK'), None),
  }
  cases['P'] = (cases['P'][0], np.asarray(cases['P'][0].convert('RGB')))
  for mode, (img, expected) in cases.items():
    root = _one_image_folder(tmp_path / mode, [img, Image.fromarray(rgb)])
    got = data.load_folder(root).train.images[0]
    if mode == 'CMYK':  # Stored as JPEG: Pillow's decoding, then its CMYK -> RGB conversion.
      with Image.open(os.path.join(root, 'train', 'a', '0.jpg')) as stored:
        expected = np.asarray(stored.convert('RGB'))
    np.testing.assert_array_equal(got, expected, err_msg=mode)


def test_grey_alone_stays_one_channel_and_bilevel_is_0_or_255(tmp_path):
  from PIL import Image
  bits = np.random.default_rng(1).integers(0, 2, (8, 8)).astype(bool)
  ds = data.load_folder(_one_image_folder(tmp_path / 'f', [Image.fromarray(bits)]))
  np.testing.assert_array_equal(ds.train.images[0, ..., 0], bits * 255)


def test_cache_is_keyed_on_the_decoding_rules(tmp_path, monkeypatch):
  from PIL import Image
  root = _one_image_folder(tmp_path / 'f', [Image.fromarray(np.full((4, 4), 1000, np.uint16))])
  cache = str(tmp_path / 'cache')
  # A cache written by the old rules (Pillow's plain conversion clipped 16-bit grey at 255) ...
  monkeypatch.setattr(data, 'DECODE_RULES', 'v1')
  monkeypatch.setattr(data, '_to_8bit', lambda img, mode: img.convert(mode))
  assert data.load_folder(root, cache_dir=cache).train.images.max() == 255
  monkeypatch.undo()
  # ... is never read back under the current ones: 1000 / 257 rounds to 4.
  assert data.load_folder(root, cache_dir=cache).train.images.max() == 4
  assert len(os.listdir(cache)) == 2
