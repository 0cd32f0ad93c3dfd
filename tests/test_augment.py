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


def test_alternating_flips_complement_each_other_epoch_after_epoch():
  key = jax.random.key(0)
  e1, e2, e3 = (np.asarray(augment.alternating_flips(key, 1000, jnp.int32(e))) for e in (1, 2, 3))
  assert 400 < e1.sum() < 600  # Epoch 1: a fair coin per image.
  np.testing.assert_array_equal(e2, ~e1)  # Every image shows its other view next epoch.
  np.testing.assert_array_equal(e3, e1)


def test_altflip_is_drawn_by_the_epoch_and_excludes_flip():
  assert augment.parse('crop,altflip') == ('crop', 'altflip')
  with pytest.raises(UserError, match="both 'flip' and 'altflip'"):
    augment.parse('flip,altflip')
  x = batch()
  np.testing.assert_array_equal(augment.apply(('altflip',), x, jax.random.key(0)), x)


def test_train_epoch_hands_each_image_its_alternating_flip():
  from dsconv_jax import steps
  n, batch_size = 16, 4
  seed_key = jax.random.key(3)

  def step_fn(state, x, y, key, flip):
    # The state counts, per image index (the images are their own indices), the epochs flipped.
    return state.at[x[:, 0]].add(flip.astype(jnp.int32)), jnp.zeros(())

  epoch = steps.make_train_epoch(steps.create_mesh(jax.devices()[:1]), steps_per_epoch=4,
                                 batch_size=batch_size, num_examples=n, seed_key=seed_key,
                                 step_fn=step_fn, alternate_flip=True)
  images, labels = jnp.arange(n)[:, None], jnp.zeros(n, jnp.int32)
  counts = jnp.zeros(n, jnp.int32)
  counts, _ = epoch(counts, images, labels, jnp.int32(1))
  first = augment.alternating_flips(jax.random.fold_in(seed_key, steps.FLIP), n, jnp.int32(1))
  np.testing.assert_array_equal(counts, first.astype(np.int32))
  counts, _ = epoch(counts, images, labels, jnp.int32(2))
  np.testing.assert_array_equal(counts, np.ones(n))  # Flipped in exactly one of two epochs.
