"""Using a finished run: `load_run(workdir)` restores its model and weights, and predicts.

A finished run's workdir is all that inference needs. summary.json holds the config as the run
resolved it (the model as built, a width fitted to `config.fit_params` included), the class names,
the image shape and the normalisation; checkpoints/ holds the weights, of which the newest is the
last epoch's. The weights are those the run evaluated: the exponential moving average when the run
kept one (`config.ema_decay`), else the trained parameters, with BatchNorm's moving statistics, or
the statistics recomputed for them (`eval_batch_stats.msgpack`, config.bn_recalibrate_batches).

    run = dsconv_jax.load_run('runs/model3')
    probabilities = run.predict(images)       # uint8 [N, H, W, C] -> float32 [N, classes]
    run.class_names[probabilities.argmax(-1)[0]]
    images = run.load_images(['cat.jpg'])     # decoded and resized as training decoded its images

`run.model` and `run.variables` are the model as its author wrote it: a Linen module and its
variables dict ({'params', 'batch_stats'}), or for a Flax NNX model the trained `nnx.Module` (in
evaluation mode) and its `nnx.State`. `run.network` and `run.network_variables` are the
functional form the pipeline runs (`network.apply(network_variables, x, train=False)`), the same
for every kind of model.

Used by `python -m dsconv_jax.predict`, `dsconv_jax.evaluate` and `dsconv_jax.export`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
from flax import nnx
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsconv_jax import analysis
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import data as data_lib
from dsconv_jax import experiment as experiment_lib
from dsconv_jax import models
from dsconv_jax import nnx_adapter
from dsconv_jax import optim
from dsconv_jax import steps
from dsconv_jax.errors import UserError

# Batches of `Run.logits` are padded up to a power of two (at least this), so that a handful of
# compiled shapes serve every batch size.
_MIN_BATCH = 8


@dataclasses.dataclass(repr=False)
class Run:
  """A finished run, restored for inference (see the module docstring)."""
  workdir: str
  config: ml_collections.ConfigDict  # As the run resolved it (fitted width included).
  summary: dict[str, Any]  # summary.json.
  class_names: list[str]  # Index = class id.
  image_shape: tuple[int, int, int]  # (height, width, channels) of the model's input.
  mean: np.ndarray  # float32 [channels]: the normalisation, in 0..255 units.
  std: np.ndarray
  # Built as the run built it (its config's layer options): `apply(variables, x, train=False)`.
  network: Any
  # {'params', 'batch_stats', ...}: what the run evaluated (EMA or not), as `network` takes them.
  network_variables: dict[str, Any]
  epoch: int  # The epoch of the restored checkpoint: the run's last.
  ema: bool  # Whether the parameters are the exponential moving average.

  def __post_init__(self):
    model, dtype = self.network, self.config.get('compute_dtype', 'float32')

    def logits(variables, images, mean, std, tta_flip=False, tta_translate=0):
      # The run's evaluation (`steps.eval_logits`), in the run's compute dtype.
      x = steps.preprocess(images, mean, std, dtype)
      apply = lambda x: model.apply(variables, x, train=False)
      return steps.tta_logits(apply, x, tta_flip=tta_flip,
                              tta_translate=tta_translate).astype(jnp.float32)

    self._nnx_module = None
    self._logits = jax.jit(logits, static_argnames=('tta_flip', 'tta_translate'))
    self._probabilities = jax.jit(lambda *args: jax.nn.softmax(logits(*args), axis=-1))

  def __repr__(self) -> str:
    h, w, c = self.image_shape
    return (f'Run({self.workdir!r}, model={self.config.model!r}, epoch={self.epoch}, '
            f'{len(self.class_names)} classes, {h}x{w}x{c} images, ema={self.ema})')

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def model(self) -> Any:
    """The trained model as written: a Linen module (its weights in `variables`), or the trained
    `nnx.Module` itself, in evaluation mode."""
    if isinstance(self.network, nnx_adapter.NNXModel):
      if self._nnx_module is None:
        self._nnx_module = self.network.merge(self.network_variables, train=False)
      return self._nnx_module
    return self.network

  @property
  def variables(self) -> Any:
    """The trained weights: Linen's variables dict, or the NNX model's `nnx.State`."""
    if isinstance(self.network, nnx_adapter.NNXModel):
      return nnx.state(self.model)
    return self.network_variables

  def logits(self, images: np.ndarray, batch_size: int = 256, tta_flip: bool = False,
             tta_translate: int = 0) -> np.ndarray:
    """float32 [N, classes] logits of uint8 [N, H, W, C] images, in batches of `batch_size`;
    optionally with test-time augmentation (`steps.eval_logits`: the training config's
    `tta_flip` / `tta_translate`)."""
    fn = functools.partial(self._logits, tta_flip=bool(tta_flip), tta_translate=int(tta_translate))
    return self._batched(fn, images, batch_size)

  def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 [N, classes] class probabilities (softmax) of uint8 [N, H, W, C] images."""
    return self._batched(self._probabilities, images, batch_size)

  def _batched(self, fn, images, batch_size: int) -> np.ndarray:
    images = self.check_images(images)
    n = len(images)
    if n == 0:
      return np.zeros((0, self.num_classes), np.float32)
    size = max(1, min(int(batch_size), 1 << max(_MIN_BATCH.bit_length() - 1,
                                                (n - 1).bit_length())))
    mean, std = jnp.asarray(self.mean), jnp.asarray(self.std)
    out = []
    for start in range(0, n, size):
      chunk = images[start:start + size]
      # Padding rows are computed and dropped: evaluation-mode layers treat rows independently.
      logits = fn(self.network_variables, steps.pad_rows(chunk, size), mean, std)
      out.append(np.asarray(logits)[:len(chunk)])
    return np.concatenate(out)

  def check_images(self, images: Any) -> np.ndarray:
    """`images` as a uint8 [N, H, W, C] array of the model's image shape, or a UserError."""
    images = np.asarray(images)
    shape = 'x'.join(map(str, self.image_shape))
    if images.dtype != np.uint8:
      raise UserError(f'images must be uint8 (0..255, as stored; the run normalises them), got '
                      f'{images.dtype}')
    if images.ndim == 3 and images.shape == self.image_shape:
      raise UserError(f'images must be a batch [N, {", ".join(map(str, self.image_shape))}]; for '
                      'one image pass image[None]')
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise UserError(f'images must be [N, {", ".join(map(str, self.image_shape))}] (the run\'s '
                      f'{shape} images), got shape {list(images.shape)}; run.load_images(paths) '
                      'decodes and resizes files as training did')
    return images

  def load_images(self, paths: Sequence[str]) -> np.ndarray:
    """Decodes image files as training decoded its images: uint8 [N, H, W, C].

    The rules of `dsconv_jax.data` (16-bit grey scaled to 8 bits, alpha dropped, palettes and
    CMYK converted to RGB), then grey or RGB as the run's channels, then a bilinear resize to the
    run's image size when the file's differs. An unreadable file is a UserError naming it.
    """
    h, w, c = self.image_shape
    mode = 'L' if c == 1 else 'RGB'
    decode = functools.partial(decode_image, size=(h, w), mode=mode)
    if len(paths) <= 1:
      arrays = [decode(p) for p in paths]
    else:
      with concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 4)) as pool:
        arrays = list(pool.map(decode, paths))
    if not arrays:
      return np.zeros((0, h, w, c), np.uint8)
    return np.stack(arrays)

  def dataset(self) -> data_lib.Dataset:
    """The run's own dataset (both splits), loaded as training loaded it (from its cache).

    A UserError when it no longer matches the run (other classes or image shape): for example a
    folder whose class folders changed since.
    """
    config = self.config
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.cache_dir,
                                    config.image_size)
    check_classes(dataset.class_names, self.class_names, dataset.source)
    if tuple(dataset.image_shape) != self.image_shape:
      raise UserError(f'the images of {dataset.source} are now '
                      f'{"x".join(map(str, dataset.image_shape))} but the run was trained on '
                      f'{"x".join(map(str, self.image_shape))}')
    return dataset


def decode_image(path: str, size: tuple[int, int], mode: str) -> np.ndarray:
  """One image file as uint8 [height, width, channels] by training's decoding rules."""
  h, w = size
  # The training pipeline's own decoder (`data._decode`): the same mode rules and the same
  # bilinear resize (which it does for square sizes).
  array = data_lib._decode(path, h if h == w else 0, mode)  # pylint: disable=protected-access
  if array.shape[:2] != (h, w):
    from PIL import Image
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    array = np.asarray(image.resize((w, h), Image.BILINEAR), np.uint8)
    array = array[..., None] if array.ndim == 2 else array
  return array


def check_classes(found: Sequence[str], expected: Sequence[str], source: str) -> None:
  """A UserError unless `found` are the run's classes `expected`, in the same order."""
  if list(found) == list(expected):
    return
  extra = sorted(set(found) - set(expected))
  missing = sorted(set(expected) - set(found))
  if not extra and not missing:
    raise UserError(f'the classes of {source} are the run\'s in another order ({", ".join(found)}'
                    f' against {", ".join(expected)})')
  raise UserError(f'the classes of {source} differ from the run\'s (only in the dataset: '
                  f'{", ".join(extra) or "none"}; only in the run: {", ".join(missing) or "none"})')


def read_summary(workdir: str) -> dict[str, Any]:
  """summary.json of a finished run in `workdir`, or a UserError saying what is missing."""
  if not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} does not exist' if not os.path.exists(workdir) else
                    f'workdir {workdir!r} is not a folder')
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    started = os.path.isdir(os.path.join(workdir, 'checkpoints'))
    raise UserError(f'workdir {workdir!r} holds no finished run (no summary.json); '
                    + ('run its training command again to finish it' if started else
                       'train one there with python -m dsconv_jax.main'))
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path!r} ({e})') from None
  if not isinstance(summary, dict) or 'config' not in summary:
    raise UserError(f'{path!r} is not the summary of a dsconv_jax run (no config)')
  return summary


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs hold (model fields such as `dropout_rates`)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_of(summary: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run's resolved config from its summary."""
  return ml_collections.ConfigDict(_tuples(summary['config']))


def _class_names_of(workdir: str, summary: dict[str, Any], num_classes: int) -> list[str]:
  """Class names of a run from before summary.json stored them: a folder dataset's folder names
  when the folder is still there, else `class_<id>`."""
  source = summary.get('dataset', '')
  if source.startswith('folder:'):
    train = os.path.join(source[len('folder:'):], 'train')
    if os.path.isdir(train):
      names = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith('.'))
      if len(names) == num_classes:
        return names
  print(f'warning: {workdir!r} does not store its class names (a run from before they were '
        'stored); naming them class_0, class_1, ...', file=sys.stderr)
  return [f'class_{i}' for i in range(num_classes)]


def abstract_state(config: ml_collections.ConfigDict, model: nn.Module, image_shape,
                   num_train_examples: int) -> steps.TrainState:
  """The shapes and dtypes of the run's train state, as `experiment.init_state` builds it."""
  steps_per_epoch = max(1, num_train_examples // int(config.batch_size))
  tx = optim.create_optimizer(config, optim.create_schedule(config, steps_per_epoch),
                              analysis.batch_norm_biases(model, image_shape))
  create = functools.partial(steps.create_train_state, model, image_shape=tuple(image_shape),
                             tx=tx, ema=bool(experiment_lib.ema_decay_of(config)),
                             ema_extra=len(experiment_lib.ema_extra_decays_of(config)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                      jax.eval_shape(create, jax.random.key(0)))


def load_run(workdir: str) -> Run:
  """Restores the finished run in `workdir` for inference (its last epoch's checkpoint).

  A UserError when `workdir` holds no finished run, or its checkpoint cannot be read.
  """
  summary = read_summary(workdir)
  config = config_of(summary)
  identity = {}
  try:
    with open(os.path.join(workdir, 'run.json')) as f:
      identity = json.load(f)
  except (OSError, ValueError):
    pass
  image_shape = summary.get('image_shape') or identity.get('image_shape')
  num_classes = len(summary.get('class_names') or []) or identity.get('num_classes')
  if not image_shape or not num_classes:
    raise UserError(f'{workdir!r} stores neither its image shape nor its classes (summary.json, '
                    'run.json); is it a workdir of dsconv_jax.main?')
  image_shape = tuple(int(v) for v in image_shape)
  class_names = summary.get('class_names') or _class_names_of(workdir, summary, num_classes)
  normalization = summary.get('normalization') or {}
  if 'mean' not in normalization or 'std' not in normalization:
    raise UserError(f'{workdir!r}: summary.json has no normalization (mean, std)')
  model = models.build_model(config, len(class_names))

  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'workdir {workdir!r} has no checkpoints/ folder: the weights are gone')
  target = abstract_state(config, model, image_shape, int(summary.get('train_examples', 0)))
  checkpoints = checkpoint_lib.Checkpoints(directory, read_only=True)
  try:
    # Checkpoint warnings go to stderr: `predict --json` keeps stdout for its JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
      restored = checkpoints.restore_latest(target)
  finally:
    checkpoints.close()
  if restored is None:
    raise UserError(f'workdir {workdir!r} holds no checkpoint in {directory!r}')
  epoch, state = restored
  if summary.get('epochs') is not None and epoch != summary['epochs']:
    raise UserError(f'the newest checkpoint of {workdir!r} is of epoch {epoch} but its '
                    f'summary.json of epoch {summary["epochs"]}: the run is being continued; '
                    'use it once that run has finished')
  ema = state.ema_params is not None
  batch_stats = state.batch_stats
  eval_stats = os.path.join(workdir, experiment_lib.EVAL_BATCH_STATS)
  if os.path.exists(eval_stats):
    # The statistics the run evaluated with (PreciseBN, config.bn_recalibrate_batches).
    with open(eval_stats, 'rb') as f:
      batch_stats = flax.serialization.from_bytes(jax.device_get(batch_stats), f.read())
  variables = {'params': state.ema_params if ema else state.params, 'batch_stats': batch_stats,
               **(state.model_state or {})}
  return Run(workdir=workdir, config=config, summary=summary, class_names=list(class_names),
             image_shape=image_shape,
             mean=np.asarray(normalization['mean'], np.float32),
             std=np.asarray(normalization['std'], np.float32), network=model,
             network_variables=variables, epoch=int(epoch), ema=ema)


def check_writable(path: str, flag: str) -> None:
  """A UserError unless a file can be written at `path` (its folder is created if needed).

  Checked before the work whose result goes there, so that a mistyped `flag` costs nothing.
  """
  if os.path.isdir(path):
    raise UserError(f'{flag}={path} is a folder; name a file')
  folder = os.path.dirname(os.path.abspath(path))
  ancestor = folder
  while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise UserError(f'cannot write {flag}={path}: {ancestor} is a file, not a folder; choose '
                    f'another {flag}')
  probe = os.path.join(folder, f'.write-test-{os.getpid()}')
  try:
    os.makedirs(folder, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.unlink(probe)
  except OSError as e:
    raise UserError(f'cannot write {flag}={path} ({e.strerror or e}); choose another {flag}'
                    ) from None


def find_images(paths: Sequence[str]) -> list[str]:
  """Image files named by `paths`: files as given, folders searched recursively (sorted).

  In folders, files with an image extension (`data.IMAGE_EXTENSIONS`) count, hidden ones not. A
  path that does not exist, or folders without any image, are a UserError.
  """
  found = []
  for path in paths:
    if os.path.isdir(path):
      inside = []
      for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        inside += [os.path.join(folder, f) for f in sorted(files)
                   if f.lower().endswith(data_lib.IMAGE_EXTENSIONS) and not f.startswith('.')]
      if not inside:
        raise UserError(f'folder {path!r} holds no images ({", ".join(data_lib.IMAGE_EXTENSIONS)})')
      found += inside
    elif os.path.exists(path):
      found.append(path)
    else:
      raise UserError(f'{path!r} does not exist')
  return found
