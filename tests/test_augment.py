"""On-device augmentations: shapes, semantics and seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import augment
from dsconv_jax.errors import UserError


def batch(n=16, size=8):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, size, size, 3)), jnp.float32)


def test_flip_mirrors_some_images_exactly():
  x = batch()
  y = augment.random_flip(x, jax.random.key(0))
  flipped = [bool(jnp.all(y[i] == x[i, :, ::-1])) for i in range(len(x))]
  kept = [bool(jnp.all(y[i] == x[i])) for i in range(len(x))]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crop_is_a_shifted_window_of_the_reflected_image():
  x = batch(n=32)
  y = augment.random_crop(x, jax.random.key(1), padding=2)
  assert y.shape == x.shape
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  for i in range(len(x)):
    assert any(np.array_equal(y[i], padded[i, a:a + 8, b:b + 8])
               for a in range(5) for b in range(5))
  assert not np.array_equal(y, x)


def test_cutout_zeroes_at_most_one_square():
  x = batch() + 10.0
  y = augment.cutout(x, jax.random.key(2), size=4)
  zeros = np.asarray((y == 0).all(-1)).reshape(len(x), -1).sum(-1)
  assert zeros.max() <= 16 and zeros.min() >= 4  # a 4x4 square, clipped by at most half per axis


def test_apply_is_seeded_and_parse_validates():
  names = augment.parse('crop, flip,cutout')
  assert names == ('crop', 'flip', 'cutout') and augment.parse('') == () and augment.parse(
      'none') == ()
  a = augment.apply(names, batch(), jax.random.key(5))
  b = augment.apply(names, batch(), jax.random.key(5))
  np.testing.assert_array_equal(a, b)
  with pytest.raises(UserError, match='unknown augmentation'):
    augment.parse('crop,mixup')
