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


def pixels(n=8, size=8, seed=0):
  """A batch of pixels in [0, 1], as the pixel-space ops see them."""
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize('op, off, on', [
    (augment.random_rotate, {'degrees': 0.0}, {'degrees': 30.0}),
    (augment.random_sharpen, {'max_factor': 1.0}, {'max_factor': 2.2}),
    (augment.color_jitter, {'strengths': (0, 0, 0, 0)}, {'strengths': (0.1, 0.1, 0.5, 0.05)}),
])
def test_strong_ops_keep_shape_and_range_are_seeded_and_vanish_at_strength_zero(op, off, on):
  x = pixels()
  np.testing.assert_array_equal(op(x, jax.random.key(0), **off), x)
  y = op(x, jax.random.key(0), **on)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0  # Bilinear, or clipped like kornia.
  np.testing.assert_array_equal(y, op(x, jax.random.key(0), **on))
  assert not np.array_equal(y, op(x, jax.random.key(1), **on))
  changed = [not np.array_equal(y[i], x[i]) for i in range(len(x))]
  assert sum(changed) >= len(x) // 2  # Probability 0.9-0.95 per image.


def test_rotate_turns_about_the_centre_and_reflects_the_border():
  x = pixels(n=64, size=9)
  y = np.asarray(augment.random_rotate(x, jax.random.key(3), degrees=15.0, p=1.0))
  # An odd-sized image turns about its centre pixel, which therefore keeps its value.
  np.testing.assert_allclose(y[:, 4, 4], np.asarray(x)[:, 4, 4], atol=1e-6)
  flat = jnp.full((4, 9, 9, 3), 0.25)  # Reflection brings the image's own values in at corners.
  np.testing.assert_allclose(augment.random_rotate(flat, jax.random.key(0), 15.0, p=1.0), flat,
                             atol=1e-6)


def test_sharpen_is_pils_sharpness_with_the_border_kept():
  x = pixels(n=16, size=6)
  y = np.asarray(augment.random_sharpen(x, jax.random.key(0), max_factor=2.0, p=1.0))
  x = np.asarray(x)
  np.testing.assert_array_equal(y[:, 0], x[:, 0])  # Border rows and columns are kept.
  np.testing.assert_array_equal(y[:, :, -1], x[:, :, -1])
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
  smooth = sum(kernel[a, b] * x[:, a:a + 4, b:b + 4] for a in range(3) for b in range(3))
  inner = x[:, 1:-1, 1:-1]
  # Where nothing clips, the result is the image moved away from its smoothed copy by factor f.
  f = (y[:, 1:-1, 1:-1] - smooth) / (inner - smooth)
  ok = (y[:, 1:-1, 1:-1] > 0) & (y[:, 1:-1, 1:-1] < 1) & (np.abs(inner - smooth) > 0.05)
  for i in range(len(x)):
    factors = f[i][ok[i]]
    assert 1.0 <= factors.mean() <= 2.0 and np.ptp(factors) < 1e-3


def test_jitter_saturation_and_hue_leave_grey_alone_and_brightness_shifts():
  grey = jnp.repeat(pixels(n=16)[..., :1] * 0.8 + 0.1, 3, axis=-1)
  np.testing.assert_allclose(
      augment.color_jitter(grey, jax.random.key(0), (0, 0, 0.5, 0.05), p=1.0), grey, atol=1e-6)
  x = pixels(n=16) * 0.6 + 0.2  # Away from 0 and 1: a brightness of +-0.1 never clips.
  y = np.asarray(augment.color_jitter(x, jax.random.key(1), (0.1, 0, 0, 0), p=1.0))
  shift = (y - np.asarray(x)).reshape(16, -1)
  np.testing.assert_allclose(shift, shift[:, :1] + 0 * shift, atol=1e-6)  # One shift an image.
  assert np.abs(shift).max() <= 0.1 + 1e-6 and np.ptp(shift[:, 0]) > 0.02


def test_pixel_ops_run_on_the_pixels_behind_the_normalisation():
  mean, std = jnp.asarray([120.0, 110.0, 100.0]), jnp.asarray([60.0, 62.0, 64.0])
  x = (pixels() * 255 - mean) / std
  off = augment.Strengths(sharpen_factor=1.0, color_jitter=(0, 0, 0, 0))
  np.testing.assert_allclose(augment.apply(('sharpen', 'jitter'), x, jax.random.key(0), off,
                                           mean, std), x, atol=1e-5)
  y = augment.apply(('jitter',), x, jax.random.key(0), augment.Strengths(), mean, std)
  back = np.asarray(y * std + mean) / 255
  assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5  # Clipped to [0, 1] as pixels.
  with pytest.raises(ValueError, match='normalisation'):
    augment.apply(('sharpen',), x, jax.random.key(0))


def test_crop_edge_mode_repeats_the_border():
  x = batch(n=16)
  y = augment.random_crop(x, jax.random.key(1), padding=2, mode='edge')
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode='edge')
  for i in range(len(x)):
    assert any(np.array_equal(y[i], padded[i, a:a + 8, b:b + 8])
               for a in range(5) for b in range(5))


def test_strengths_and_mixing_keys_are_checked():
  import ml_collections
  from dsconv_jax import defaults
  config = defaults.get_config()
  assert augment.strengths_from_config(config) == augment.Strengths()
  assert augment.mix_from_config(config, 10) is None
  bad = [('crop_padding_mode', 'wrap', 'crop_padding_mode'), ('rotate_degrees', -1.0, 'rotate'),
         ('sharpen_factor', 0.5, 'sharpen'), ('color_jitter', (0.1, 0.1), 'color_jitter'),
         ('mixup', 1.5, 'mixup'), ('mix_ramp', 2.0, 'mix_ramp')]
  for key, value, match in bad:
    broken = ml_collections.ConfigDict(config.to_dict())
    broken[key] = value
    with pytest.raises(UserError, match=match):
      augment.strengths_from_config(broken)
      augment.mix_from_config(broken, 10)
  config.mixup, config.cutmix = 0.5, 0.5
  with pytest.raises(UserError, match='one of them'):
    augment.mix_from_config(config, 10)
