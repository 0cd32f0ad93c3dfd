"""Datasets as uint8 arrays: CIFAR-10 (or any tfds name) and image folders, decoded once and cached.

A dataset is small enough (CIFAR-10: 180 MB as uint8) to live in accelerator memory whole, so this
module only produces numpy arrays; batching, shuffling, preprocessing and augmentation happen on the
device inside compiled code (`dsconv_jax.train`, `dsconv_jax.augment`).

Sources (`config.dataset`):
* `cifar10` or any tfds image-classification name, through tensorflow-datasets (`tfds_source`; the
  optional `dsconv_jax[tfds]` extra);
* `folder:ROOT`, the layout `ROOT/{train,test}/<class>/<image>` (JPEG, PNG, ... of any size,
  RGB or grayscale), read with Pillow alone, without TensorFlow. Class ids follow the sorted class
  folder names (CIFAR-10's ids for the CIFAR-10 folders).

Decoded arrays of both sources are cached in `cache_dir` (keyed by the source files' names, sizes
and times: the images, or the prepared tfds files), so the next run skips decoding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np

from dsconv_jax import fileio
from dsconv_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
SPLITS = ('train', 'test')


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]


@dataclasses.dataclass
class Dataset:
  train: Split
  test: Split
  class_names: list[str]
  source: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def load_dataset(dataset: str, data_dir: str | None = None, cache_dir: str | None = None,
                 image_size: int = 0) -> Dataset:
  """Loads both splits of `dataset` ('cifar10', a tfds name, or 'folder:ROOT')."""
  if not dataset:
    raise UserError('config.dataset is empty; use cifar10 or folder:/path/to/images')
  if dataset.startswith('folder:'):
    root = os.path.expanduser(dataset[len('folder:'):])
    return load_folder(root, cache_dir=cache_dir, image_size=image_size)
  from dsconv_jax import tfds_source  # tensorflow-datasets, an optional extra, only when used.
  source = f'tfds:{dataset}'
  # One tfds builder serves the cache key, the class names and both splits.
  tfds_dataset = tfds_source.TfdsSource(dataset, data_dir or None)

  def cache_path() -> str | None:
    # Keyed by the prepared files (names, sizes, times), like folder datasets by their images.
    key = tfds_dataset.fingerprint() if cache_dir else None
    if key is None:
      return None
    digest = hashlib.sha256(f'v1|{dataset}|{image_size}|{key}'.encode()).hexdigest()[:24]
    return os.path.join(os.path.expanduser(cache_dir), f'tfds-{digest}.npz')

  path = cache_path()
  cached = _read_cache(path) if path else None
  if cached is not None:
    return Dataset(cached['train'], cached['test'], tfds_dataset.class_names, source)
  splits = {}
  for split in SPLITS:
    images, labels = tfds_dataset.load_split(split)  # The first call prepares the dataset.
    splits[split] = Split(_resize_all(images, image_size), labels.astype(np.int32))
  if path is None:
    path = cache_path()  # Prepared by this load.
  if path:
    _write_cache(path, splits)
  return Dataset(splits['train'], splits['test'], tfds_dataset.class_names, source)


def _list_folder(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """Returns class names and, per split, (path, label) pairs in a deterministic order."""
  if os.path.exists(root) and not os.path.isdir(root):
    raise UserError(f'dataset folder {root!r} is a file, not a folder; folder:ROOT names a folder '
                    'with ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg')
  if not os.path.isdir(root):
    raise UserError(f'dataset folder {root!r} does not exist; expected ROOT/train/<class>/*.jpg '
                    'and ROOT/test/<class>/*.jpg')
  classes_per_split = {}
  for split in SPLITS:
    d = os.path.join(root, split)
    if not os.path.isdir(d):
      raise UserError(f'dataset folder {root!r} has no {split}/ folder; expected '
                      'ROOT/train/<class>/ and ROOT/test/<class>/ with one folder per class')
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith('.'))
    if not classes:
      raise UserError(f'{d!r} has no class folders; expected {d}/<class>/<image files>')
    classes_per_split[split] = classes
  if classes_per_split['train'] != classes_per_split['test']:
    only_train = sorted(set(classes_per_split['train']) - set(classes_per_split['test']))
    only_test = sorted(set(classes_per_split['test']) - set(classes_per_split['train']))
    raise UserError(f'the class folders of train/ and test/ in {root!r} differ (only in train: '
                    f'{only_train or "none"}; only in test: {only_test or "none"})')
  class_names = classes_per_split['train']
  files = {}
  for split in SPLITS:
    items = []
    for label, name in enumerate(class_names):
      d = os.path.join(root, split, name)
      names = sorted(f for f in os.listdir(d)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
      if not names:
        raise UserError(f'class folder {d!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
                        'is the copy complete?')
      items.extend((os.path.join(d, f), label) for f in names)
    files[split] = items
  return class_names, files


# How stored pixels become uint8 (the rules of `_to_8bit`); part of the decoded-array cache's key,
# so that arrays decoded under other rules are never read back.
DECODE_RULES = ('v2: 16/32-bit integer grey scaled by 1/257 and clipped, float grey clipped to '
                '0..255, alpha dropped, palette and CMYK through Pillow\'s RGB conversion')
# Pillow modes decoded as one grey channel; every other mode is decoded as RGB.
GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')


def _to_8bit(img, mode: str):
  """A Pillow image as 8-bit `mode` ('L' or 'RGB'), by these rules (`DECODE_RULES`):

  * 16-bit (and 32-bit integer) grey: v -> round(v / 257), i.e. 0..65535 onto 0..255, values
    outside that range clipped; float grey ('F') is taken as 0..255 and clipped;
  * alpha (RGBA, LA, PA and palettes with transparency) is dropped, keeping the stored colour, as
    Keras' `image_dataset_from_directory` and torchvision's `ImageFolder` loaders do;
  * palette, CMYK, YCbCr and the other colour modes: Pillow's conversion to RGB (CMYK without a
    colour profile); bilevel ('1'): 0 and 255.
  Grey images become RGB by repeating the grey value when `mode` is 'RGB'.
  """
  from PIL import Image
  if img.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'):
    a = np.asarray(img, dtype=np.float64)
    a = a / 257.0 if img.mode != 'F' else a
    img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), 'L')
  elif img.mode in ('LA', 'La'):
    img = img.getchannel('L')
  elif img.mode in ('P', 'PA'):
    img = img.convert('RGBA')
  return img.convert(mode)


def _decode(path: str, image_size: int, mode: str | None):
  from PIL import Image  # Pillow is only needed for folder datasets.
  try:
    with Image.open(path) as img:
      img.load()
      if mode is None:
        mode = 'L' if img.mode in GREY_MODES else 'RGB'
      img = _to_8bit(img, mode)
      if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
      arr = np.asarray(img, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f'cannot read image {path!r} ({type(e).__name__}: {e}); replace or remove '
                    'the file') from None
  return arr[..., None] if arr.ndim == 2 else arr


def _grayscale(path: str) -> bool:
  from PIL import Image
  try:
    with Image.open(path) as img:
      return img.mode in GREY_MODES
  except (OSError, ValueError, SyntaxError) as e:
    raise UserError(f'cannot read image {path!r} ({type(e).__name__}: {e}); replace or remove '
                    'the file') from None


def _decode_all(paths: Sequence[str], image_size: int, mode: str) -> np.ndarray:
  workers = min(32, (os.cpu_count() or 1) * 4)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    arrays = list(pool.map(lambda p: _decode(p, image_size, mode), paths, chunksize=256))
  shape = arrays[0].shape
  for path, arr in zip(paths, arrays):
    if arr.shape != shape:
      raise UserError(f'image {path!r} is {arr.shape[1]}x{arr.shape[0]} but {paths[0]!r} is '
                      f'{shape[1]}x{shape[0]}; set --config.image_size=N to resize all images')
  return np.stack(arrays)


def load_folder(root: str, cache_dir: str | None = None, image_size: int = 0) -> Dataset:
  """Reads an image-folder dataset, decoding once and caching the arrays in `cache_dir`."""
  root = os.path.abspath(root)
  class_names, files = _list_folder(root)
  digest = hashlib.sha256(f'{DECODE_RULES}|{root}|{image_size}'.encode())
  for split in SPLITS:
    for path, label in files[split]:
      st = os.stat(path)
      digest.update(f'{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n'
                    .encode())
  cache_path = None
  if cache_dir:
    cache_path = os.path.join(os.path.expanduser(cache_dir), f'folder-{digest.hexdigest()[:24]}.npz')
    cached = _read_cache(cache_path)
    if cached is not None:
      return Dataset(cached['train'], cached['test'], class_names, f'folder:{root}')
  # One channel count for the whole dataset: grayscale only if every image is.
  all_paths = [p for split in SPLITS for p, _ in files[split]]
  mode = 'L' if all(_grayscale(p) for p in all_paths) else 'RGB'
  splits = {}
  for split in SPLITS:
    paths = [p for p, _ in files[split]]
    labels = np.array([l for _, l in files[split]], np.int32)
    splits[split] = Split(_decode_all(paths, image_size, mode), labels)
  if splits['train'].images.shape[1:] != splits['test'].images.shape[1:]:
    raise UserError(f'train images are {splits["train"].images.shape[1:]} but test images are '
                    f'{splits["test"].images.shape[1:]}; set --config.image_size=N')
  if cache_path:
    _write_cache(cache_path, splits)
  return Dataset(splits['train'], splits['test'], class_names, f'folder:{root}')


def _write_cache(path: str, splits: dict[str, Split]) -> None:
  try:
    fileio.atomic_write_npz(path, train_images=splits['train'].images,
                            train_labels=splits['train'].labels,
                            test_images=splits['test'].images, test_labels=splits['test'].labels)
  except OSError:
    pass  # The cache only saves time; an unwritable cache directory is not an error.


def _read_cache(path: str) -> dict[str, Split] | None:
  try:
    with np.load(path) as z:
      return {s: Split(z[f'{s}_images'], z[f'{s}_labels']) for s in SPLITS}
  except (OSError, KeyError, ValueError):
    return None


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
  if not image_size or images.shape[1:3] == (image_size, image_size):
    return images
  from PIL import Image
  out = [np.asarray(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).resize(
      (image_size, image_size), Image.BILINEAR)) for im in images]
  return np.stack([o[..., None] if o.ndim == 2 else o for o in out])


def take_subset(split: Split, n: int, seed: int) -> Split:
  """The first `n` examples of a seeded shuffle of `split` (all of it, shuffled, when n is 0)."""
  if n < 0:
    raise UserError(f'a subset size must be >= 0 (0 means all), got {n}')
  order = np.random.default_rng(seed).permutation(len(split.labels))
  if n:
    order = order[:n]
  return Split(split.images[order], split.labels[order])


def split_holdout(split: Split, n: int, seed: int, num_classes: int) -> tuple[Split, Split]:
  """(the rest, a class-balanced holdout of `n` examples) of `split`, drawn by `seed`.

  Each class gives n // num_classes examples, and the first n % num_classes classes of a seeded
  order one more, so the holdout's class balance does not depend on the split's. The rest keeps
  the split's order; the two never share an example.
  """
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise UserError(f'config.holdout must be an integer >= 0 (0 = validate on the test split), '
                    f'got {n!r}')
  if n < num_classes:
    raise UserError(f'config.holdout={n} is fewer than the {num_classes} classes, so some class '
                    f'would not be validated on; use at least {num_classes} (or 0 for off)')
  rng = np.random.default_rng([seed, 0x401D])  # A stream of its own, apart from take_subset's.
  quota = np.full(num_classes, n // num_classes)
  quota[rng.permutation(num_classes)[:n % num_classes]] += 1
  held = []
  for label in range(num_classes):
    members = np.flatnonzero(split.labels == label)
    if len(members) <= quota[label]:
      raise UserError(f'config.holdout={n} takes {quota[label]} images of class {label}, which '
                      f'has {len(members)} training images (at least one must stay to train on); '
                      'use a smaller holdout')
    held.append(rng.choice(members, quota[label], replace=False))
  held_idx = np.sort(np.concatenate(held))
  keep = np.ones(len(split.labels), bool)
  keep[held_idx] = False
  return (Split(split.images[keep], split.labels[keep]),
          Split(split.images[held_idx], split.labels[held_idx]))


def normalization_stats(images: np.ndarray, kind: str) -> tuple[list[float], list[float]]:
  """Per-channel (mean, std) that preprocessing subtracts and divides by, in 0..255 units.

  'scale' divides by 255 (source 000); 'center' also subtracts 0.5 (pixel / 255 - 0.5, the input
  of xvel/cifar10-tiniest); 'standardize' uses the training images' per-channel mean and standard
  deviation (source 001). Evaluation always reuses the training statistics.
  """
  c = images.shape[-1]
  if kind == 'scale':
    return [0.0] * c, [255.0] * c
  if kind == 'center':
    return [127.5] * c, [255.0] * c
  if kind == 'standardize':
    flat = images.reshape(-1, c).astype(np.float64)
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()
  raise UserError(f"config.normalization must be 'scale', 'center' or 'standardize', got "
                  f"{kind!r}")
