"""Batched, seeded augmentation on the accelerator, inside the compiled train step.

Ops take a float batch (N, H, W, C) and a PRNG key and return a batch of the same shape. A config
names them as a comma-separated string, e.g. `augment='crop,flip'` or `'crop,flip,cutout'`; the
source configs keep the sources' choice (none). Their strengths are config keys gathered in one
`Strengths` value. Every random draw is per image, from the key alone.

'rotate', 'sharpen' and 'jitter' follow the kornia augmentations that xvel/cifar10-tiniest trains
with (`RandomAffine` rotation, `RandomSharpness`, `ColorJiggle`), with its probabilities. 'sharpen'
and 'jitter' are defined on pixels in [0, 1] (they clip there and go through HSV), so `apply` runs
them on the batch mapped back from the network's normalisation and forward again.

Batch mixing (`mix_batch`: mixup, cutmix) is not an op of this list: it changes the labels too,
so the train step applies it after the ops and weighs the loss of both labels.

'altflip' (airbench's alternating flip) is not a per-batch op: it needs each image's index and
the epoch, so the epoch (`steps.make_train_epoch`) draws it, before the ops named here: image i is
mirrored in epoch 1 with probability 1/2 and in every later epoch exactly when it was not in the
previous one, so every pair of consecutive epochs shows both views of every image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import dm_pix
import jax
import jax.numpy as jnp

from dsconv_jax import layers
from dsconv_jax.errors import UserError

# jnp.pad modes of 'crop' (config.crop_padding_mode): 'reflect' mirrors the border pixels' inner
# neighbours, 'edge' repeats them (kornia's and PyTorch's 'replicate').
CROP_PADDING_MODES = ('reflect', 'edge')
# Per-image probabilities of the kornia-style ops (those of xvel/cifar10-tiniest's train.py).
ROTATE_P, SHARPEN_P, JITTER_P = 0.95, 0.95, 0.9
MIX_KINDS = ('mixup', 'cutmix')


@dataclasses.dataclass(frozen=True)
class Strengths:
  """The strengths of the ops (hashable: bound into the compiled step). Each is a config key."""
  crop_padding_mode: str = 'reflect'  # config.crop_padding_mode
  rotate_degrees: float = 15.0  # config.rotate_degrees: angles uniform in +-this.
  sharpen_factor: float = 2.2  # config.sharpen_factor: factors uniform in [1, this].
  # config.color_jitter: (brightness, contrast, saturation, hue), as kornia's ColorJiggle takes them.
  color_jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.5, 0.05)


def random_crop(x: jax.Array, key: jax.Array, padding: int = 4,
                mode: str = 'reflect') -> jax.Array:
  """Pads by `padding` pixels (`mode`: 'reflect' or 'edge') and crops back to size at a random
  offset per image."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def random_flip(x: jax.Array, key: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def cutout(x: jax.Array, key: jax.Array, size: int = 8) -> jax.Array:
  """Zeroes one `size` x `size` square per image at a random centre (clipped by the border)."""
  n, h, w, _ = x.shape
  ky, kx = jax.random.split(key)
  y0 = jax.random.randint(ky, (n, 1, 1, 1), 0, h) - size // 2
  x0 = jax.random.randint(kx, (n, 1, 1, 1), 0, w) - size // 2
  ys = jnp.arange(h)[None, :, None, None]
  xs = jnp.arange(w)[None, None, :, None]
  inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
  return jnp.where(inside, jnp.zeros((), x.dtype), x)


def random_rotate(x: jax.Array, key: jax.Array, degrees: float = 15.0,
                  p: float = ROTATE_P) -> jax.Array:
  """Rotates each image, with probability `p`, by an angle uniform in +-`degrees` about its centre.

  Bilinear resampling (`jax.scipy.ndimage.map_coordinates`); pixels that come from outside the
  image are reflected back in ('reflect': about the border's edge, like kornia's 'reflection').
  """
  if not degrees:
    return x
  n, h, w, c = x.shape
  k_angle, k_apply = jax.random.split(key)
  angle = jax.random.uniform(k_angle, (n,), minval=-degrees, maxval=degrees) * (math.pi / 180)
  angle = jnp.where(jax.random.bernoulli(k_apply, p, (n,)), angle, 0.0)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing='ij')

  def rotate_one(image, a):
    cos, sin = jnp.cos(a), jnp.sin(a)
    src = [cy + cos * ys - sin * xs, cx + sin * ys + cos * xs]  # Where each output pixel samples.
    channel = lambda plane: jax.scipy.ndimage.map_coordinates(plane, src, order=1, mode='reflect')
    return jnp.stack([channel(image[..., i]) for i in range(c)], axis=-1)

  return jax.vmap(rotate_one)(x, angle).astype(x.dtype)


def random_sharpen(x: jax.Array, key: jax.Array, max_factor: float = 2.2,
                   p: float = SHARPEN_P) -> jax.Array:
  """PIL's Sharpness enhancement (kornia's `sharpness`) on pixels in [0, 1], with probability `p`
  and a factor uniform in [1, `max_factor`] per image: the image moved away from its 3x3-smoothed
  copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, border pixels kept) by the factor, clipped to
  [0, 1]. Factor 1 is the image itself."""
  if max_factor == 1.0:
    return x
  n, _, _, c = x.shape
  k_factor, k_apply = jax.random.split(key)
  factor = jax.random.uniform(k_factor, (n, 1, 1, 1), minval=1.0, maxval=max_factor)
  kernel = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], x.dtype) / 13
  smooth = layers.depthwise_conv(x, jnp.tile(kernel[:, :, None, None], (1, 1, c, 1)), impl='auto')
  degenerate = x.at[:, 1:-1, 1:-1].set(jnp.clip(smooth, 0.0, 1.0))
  sharpened = jnp.clip(degenerate + (x - degenerate) * factor, 0.0, 1.0)
  return jnp.where(jax.random.bernoulli(k_apply, p, (n, 1, 1, 1)), sharpened, x)


def color_jitter(x: jax.Array, key: jax.Array,
                 strengths: tuple[float, float, float, float] = (0.1, 0.1, 0.5, 0.05),
                 p: float = JITTER_P) -> jax.Array:
  """kornia's `ColorJiggle` on RGB pixels in [0, 1], with probability `p` per image.

  `strengths` = (b, c, s, h): brightness adds a value uniform in +-b, contrast multiplies by one in
  [1 - c, 1 + c] (both clipped to [0, 1]; kornia's forms, not torchvision's mean-centred
  contrast), saturation multiplies HSV saturation by one in [1 - s, 1 + s] (clipped to [0, 1]),
  hue turns by one in +-h of the colour circle (`dm_pix.adjust_saturation` and
  `dm_pix.adjust_hue`, the same definitions). The four go in one random order per batch, as
  kornia draws it; a strength of 0 leaves its adjustment out.
  """
  b, c, s, h = (float(v) for v in strengths)
  n = x.shape[0]
  keys = jax.random.split(key, 6)
  draw = lambda k, lo, hi, shape: jax.random.uniform(k, shape, minval=lo, maxval=hi)
  ops = []
  if b:
    shift = draw(keys[0], -b, b, (n, 1, 1, 1))
    ops.append(lambda y: jnp.clip(y + shift, 0.0, 1.0))
  if c:
    scale = draw(keys[1], max(0.0, 1 - c), 1 + c, (n, 1, 1, 1))
    ops.append(lambda y: jnp.clip(y * scale, 0.0, 1.0))
  if s:  # dm_pix works on the (N, H, W) planes: one factor per image.
    factor = draw(keys[2], max(0.0, 1 - s), 1 + s, (n, 1, 1))
    ops.append(lambda y: dm_pix.adjust_saturation(y, factor))
  if h:
    turn = draw(keys[3], -h, h, (n, 1, 1))
    ops.append(lambda y: dm_pix.adjust_hue(y, turn))
  if not ops:
    return x
  y = x
  order = jax.random.permutation(keys[4], len(ops))
  for i in range(len(ops)):
    y = jax.lax.switch(order[i], ops, y)
  return jnp.where(jax.random.bernoulli(keys[5], p, (n, 1, 1, 1)), y, x)


AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'crop': random_crop,
    'flip': random_flip,
    'cutout': cutout,
    'rotate': random_rotate,
    'sharpen': random_sharpen,
    'jitter': color_jitter,
}
# Ops defined on pixels in [0, 1] rather than on the normalised network input.
PIXEL_SPACE = ('sharpen', 'jitter')


# Names the epoch applies itself (see the module docstring).
EPOCH_AUGMENTATIONS = ('altflip',)


def parse(spec: str, key: str = 'config.augment') -> tuple[str, ...]:
  """Validates a comma-separated augmentation list ('' or 'none' for no augmentation); errors
  name `key`, the config value the list came from."""
  names = tuple(s.strip() for s in (spec or '').split(',') if s.strip() and s.strip() != 'none')
  unknown = [n for n in names if n not in AUGMENTATIONS and n not in EPOCH_AUGMENTATIONS]
  if 'altflip' in names and 'flip' in names:
    raise UserError(f"{key} names both 'flip' and 'altflip'; keep one")
  if unknown:
    raise UserError(f'unknown augmentation(s) {unknown} in {key}; known: '
                    f'{", ".join((*AUGMENTATIONS, *EPOCH_AUGMENTATIONS))}')
  return names


def alternating_flips(key: jax.Array, num_examples: int, epoch: jax.Array) -> jax.Array:
  """Whether each training image is mirrored in `epoch` (1-based) under 'altflip'."""
  first = jax.random.bernoulli(key, 0.5, (num_examples,))
  return first ^ (epoch % 2 == 0)


def _op(name: str, strengths: Strengths) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The op `name` at `strengths`."""
  if name == 'crop':
    return functools.partial(random_crop, mode=strengths.crop_padding_mode)
  if name == 'rotate':
    return functools.partial(random_rotate, degrees=float(strengths.rotate_degrees))
  if name == 'sharpen':
    return functools.partial(random_sharpen, max_factor=float(strengths.sharpen_factor))
  if name == 'jitter':
    return functools.partial(color_jitter, strengths=tuple(strengths.color_jitter))
  return AUGMENTATIONS[name]


def apply(names: tuple[str, ...], x: jax.Array, key: jax.Array,
          strengths: Strengths = Strengths(), mean: jax.Array | None = None,
          std: jax.Array | None = None) -> jax.Array:
  """Applies the named per-batch augmentations in order, each with its own key.

  `x` is the normalised batch, (pixel - `mean`) / `std` in 0..255 units (`steps.preprocess`);
  the pixel-space ops ('sharpen', 'jitter') see pixel / 255 and need `mean` and `std`.
  """
  for i, name in enumerate(names):
    if name in EPOCH_AUGMENTATIONS:
      continue
    op, k = _op(name, strengths), jax.random.fold_in(key, i)
    if name in PIXEL_SPACE:
      if mean is None or std is None:
        raise ValueError(f'augmentation {name!r} needs the normalisation (mean, std)')
      x = (op((x * std + mean) / 255.0, k) * 255.0 - mean) / std
    else:
      x = op(x, k)
  return x


def strengths_from_config(config) -> Strengths:
  """The `Strengths` of config.crop_padding_mode, rotate_degrees, sharpen_factor, color_jitter,
  checked (a UserError names the key)."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  mode = config.get('crop_padding_mode', 'reflect')
  if mode not in CROP_PADDING_MODES:
    raise UserError(f'config.crop_padding_mode must be one of {", ".join(CROP_PADDING_MODES)}, '
                    f'got {mode!r}')
  degrees = config.get('rotate_degrees', 15.0)
  if not number(degrees) or not 0 <= degrees <= 180:
    raise UserError(f'config.rotate_degrees must be a number in [0, 180], got {degrees!r}')
  sharpen = config.get('sharpen_factor', 2.2)
  if not number(sharpen) or sharpen < 1:
    raise UserError(f'config.sharpen_factor must be a number >= 1 (1 = off), got {sharpen!r}')
  jitter = config.get('color_jitter', (0.1, 0.1, 0.5, 0.05))
  if (not isinstance(jitter, (tuple, list)) or len(jitter) != 4
      or not all(number(v) and v >= 0 for v in jitter) or jitter[3] > 0.5):
    raise UserError('config.color_jitter must be 4 numbers >= 0 (brightness, contrast, '
                    f'saturation, hue; hue at most 0.5), got {jitter!r}')
  return Strengths(mode, float(degrees), float(sharpen), tuple(float(v) for v in jitter))


def mix_batch(kind: str, x: jax.Array, key: jax.Array,
              strength: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixes each image with a partner of the batch (a random permutation): mixup or cutmix.

  Returns (mixed images, partner indices, lam): image i is (1 - lam_i) itself and lam_i its
  partner, and so is its loss (`steps.mixed_cross_entropy`). lam_i is uniform in [0, `strength`]
  per image (kornia's `RandomMixUpV2` with lambda_val=(0, strength), which xvel/cifar10-tiniest
  ramps). 'mixup' blends whole images; 'cutmix' pastes a box of the partner, about lam_i of the
  image's area at a random centre, clipped by the border, and lam_i becomes the area it covers.
  """
  n, h, w, _ = x.shape
  k_perm, k_lam, k_y, k_x = jax.random.split(key, 4)
  partner = jax.random.permutation(k_perm, n)
  lam = jax.random.uniform(k_lam, (n,)) * strength
  if kind == 'mixup':
    weight = lam[:, None, None, None].astype(x.dtype)
    return x * (1 - weight) + x[partner] * weight, partner, lam
  side = jnp.sqrt(lam)
  half_h, half_w = jnp.round(side * h / 2), jnp.round(side * w / 2)
  cy = jax.random.randint(k_y, (n,), 0, h)
  cx = jax.random.randint(k_x, (n,), 0, w)
  y0, y1 = jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h)
  x0, x1 = jnp.clip(cx - half_w, 0, w), jnp.clip(cx + half_w, 0, w)
  ys = jnp.arange(h)[None, :, None]
  xs = jnp.arange(w)[None, None, :]
  inside = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None]) &
            (xs >= x0[:, None, None]) & (xs < x1[:, None, None]))
  area = (y1 - y0) * (x1 - x0) / (h * w)
  return jnp.where(inside[..., None], x[partner], x), partner, area.astype(lam.dtype)


def mix_schedule(max_strength: float, ramp: float, num_epochs: int,
                 steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """step -> the bound of lam in that step's epoch: `max_strength` reached linearly over the first
  `ramp` of the run's epochs (0 = from the start), held per epoch. xvel/cifar10-tiniest's mixup
  is (0.5, 0.5): its bound is min(e / E, 0.5) in 0-based epoch e of E."""
  ramp_epochs = float(ramp) * num_epochs

  def strength(step):
    if not ramp_epochs:
      return jnp.asarray(max_strength, jnp.float32)
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)  # 0-based, as the anchor.
    return max_strength * jnp.minimum(1.0, epoch / ramp_epochs)

  return strength


@dataclasses.dataclass(frozen=True)
class Mix:
  """Batch mixing in the train step: `kind` ('mixup' or 'cutmix') and its step -> strength."""
  kind: str
  strength: Callable[[jax.Array], jax.Array]


def mix_from_config(config, steps_per_epoch: int) -> Mix | None:
  """The `Mix` of config.mixup / config.cutmix (the largest lam; 0 = off) and config.mix_ramp."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  values = {kind: config.get(kind, 0.0) or 0.0 for kind in MIX_KINDS}
  for kind, value in values.items():
    if not number(value) or not 0 <= value <= 1:
      raise UserError(f'config.{kind} must be a number in [0, 1] (the largest share of the partner '
                      f'image; 0 = off), got {value!r}')
  ramp = config.get('mix_ramp', 0.0) or 0.0
  if not number(ramp) or not 0 <= ramp <= 1:
    raise UserError(f'config.mix_ramp must be a fraction of the run in [0, 1], got {ramp!r}')
  on = [kind for kind, value in values.items() if value]
  if len(on) > 1:
    raise UserError('config.mixup and config.cutmix are both set; set one of them to 0')
  if not on:
    return None
  kind = on[0]
  return Mix(kind, mix_schedule(float(values[kind]), float(ramp), int(config.num_epochs),
                                steps_per_epoch))
