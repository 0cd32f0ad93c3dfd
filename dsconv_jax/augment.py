"""Batched, seeded augmentation on the accelerator, inside the compiled train step.

Ops take a float batch (N, H, W, C) and a PRNG key and return a batch of the same shape. A config
names them as a comma-separated string, e.g. `augment='crop,flip'` or `'crop,flip,cutout'`; the
source configs keep the sources' choice (none).

'altflip' (airbench's alternating flip) is not a per-batch op: it needs each image's index and
the epoch, so the epoch (`steps.make_train_epoch`) draws it, before the ops named here: image i is
mirrored in epoch 1 with probability 1/2 and in every later epoch exactly when it was not in the
previous one, so every pair of consecutive epochs shows both views of every image.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dsconv_jax.errors import UserError


def random_crop(x: jax.Array, key: jax.Array, padding: int = 4) -> jax.Array:
  """Pads by `padding` pixels (reflection) and crops back to size at a random offset per image."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode='reflect')
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


AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'crop': random_crop,
    'flip': random_flip,
    'cutout': cutout,
}


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


def apply(names: tuple[str, ...], x: jax.Array, key: jax.Array) -> jax.Array:
  """Applies the named per-batch augmentations in order, each with its own key."""
  for i, name in enumerate(names):
    if name in EPOCH_AUGMENTATIONS:
      continue
    x = AUGMENTATIONS[name](x, jax.random.fold_in(key, i))
  return x
