"""Batch mixing (mixup, cutmix) and its loss, the plain EMA, AdamW with one-cycle cosine and
decay on every parameter, and the 'center' normalisation: the recipe of the reference network."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsconv_jax import augment, data, models, optim, steps
from dsconv_jax.defaults import get_config


def images(n=16, size=8, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def test_mixup_blends_each_image_with_its_partner_by_its_own_lam():
  x = images()
  y, partner, lam = augment.mix_batch('mixup', x, jax.random.key(0), jnp.float32(0.5))
  assert sorted(np.asarray(partner).tolist()) == list(range(16))  # A permutation of the batch.
  assert float(lam.min()) >= 0 and float(lam.max()) <= 0.5 and float(jnp.ptp(lam)) > 0
  w = lam[:, None, None, None]
  np.testing.assert_allclose(y, (1 - w) * x + w * x[partner], rtol=1e-6, atol=1e-6)
  same = augment.mix_batch('mixup', x, jax.random.key(0), jnp.float32(0.5))
  np.testing.assert_array_equal(same[0], y)  # Determined by the key.
  for kind in augment.MIX_KINDS:  # Strength 0 leaves the batch as it is.
    np.testing.assert_array_equal(augment.mix_batch(kind, x, jax.random.key(1), 0.0)[0], x)


def test_cutmix_pastes_a_box_whose_area_is_the_partners_share():
  x = images(n=32, size=16)
  y, partner, lam = augment.mix_batch('cutmix', x, jax.random.key(3), jnp.float32(1.0))
  y, x, partner, lam = map(np.asarray, (y, x, partner, lam))
  for i in range(32):
    from_partner = np.all(y[i] == x[partner[i]], axis=-1) & np.any(y[i] != x[i], axis=-1)
    kept = np.all(y[i] == x[i], axis=-1)
    assert np.all(from_partner | kept)
    if partner[i] != i:
      rows, cols = np.nonzero(from_partner)
      if len(rows):  # One axis-aligned box.
        assert len(rows) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
      assert lam[i] == pytest.approx(from_partner.sum() / 256)
  assert lam.max() > 0.2


def test_mix_strength_ramps_per_epoch_to_its_bound():
  strength = augment.mix_schedule(0.5, 0.5, num_epochs=50, steps_per_epoch=10)
  values = [float(strength(jnp.int32(s))) for s in (0, 9, 10, 120, 249, 250, 499)]
  # The reference recipe's bound: min(epoch / 50, 0.5) in 0-based epochs.
  np.testing.assert_allclose(values, [0, 0, 0.02, 0.24, 0.48, 0.5, 0.5], rtol=1e-6)
  assert float(augment.mix_schedule(0.3, 0.0, 50, 10)(jnp.int32(0))) == pytest.approx(0.3)


def test_mixed_loss_is_cross_entropy_against_the_mixed_soft_label():
  logits = jax.random.normal(jax.random.key(0), (6, 5))
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  partner = jnp.array([1, 0, 3, 2, 5, 4])
  lam = jnp.array([0.0, 0.1, 0.25, 0.4, 0.5, 0.3])
  for smoothing in (0.0, 0.1):
    targets = ((1 - lam[:, None]) * jax.nn.one_hot(labels, 5) +
               lam[:, None] * jax.nn.one_hot(labels[partner], 5))
    expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing))
    got = steps.mixed_cross_entropy(logits, labels, partner, lam, smoothing)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_array_equal(steps.mixed_cross_entropy(logits, labels),
                                steps.cross_entropy_loss(logits, labels))


def tiny_state():
  model = models.create_model('tiny', num_classes=3)
  return steps.create_train_state(model, jax.random.key(0), (8, 8, 3), optax.sgd(0.1), ema=True)


def step_args():
  batch = jax.random.randint(jax.random.key(1), (8, 8, 8, 3), 0, 255).astype(jnp.uint8)
  return batch, jnp.array([0, 1, 2, 0, 1, 2, 0, 1]), jax.random.key(2)


def test_train_step_mixes_with_the_strength_of_its_step():
  kwargs = dict(mean=jnp.zeros(3), std=jnp.full(3, 255.0))
  plain, _ = steps.train_step(tiny_state(), *step_args(), **kwargs)
  ramp = augment.Mix('mixup', augment.mix_schedule(0.5, 0.5, 10, 100))
  early, _ = steps.train_step(tiny_state(), *step_args(), mix=ramp, **kwargs)  # Step 0: lam 0.
  jax.tree.map(np.testing.assert_array_equal, early.params, plain.params)
  full = augment.Mix('mixup', augment.mix_schedule(0.5, 0.0, 10, 100))
  mixed, metrics = steps.train_step(tiny_state(), *step_args(), mix=full, **kwargs)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(mixed.params),
                                                   jax.tree.leaves(plain.params)))
  assert np.isfinite(float(metrics['loss']))


def test_plain_ema_averages_with_its_decay_from_the_first_step():
  state = tiny_state()
  moved = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
  new = steps.update_ema(moved, 0.999, warmup=False)
  jax.tree.map(lambda e, e0, p: np.testing.assert_allclose(e, 0.999 * e0 + 0.001 * p, rtol=1e-6,
                                                           atol=1e-7),
               new.ema_params, state.ema_params, moved.params)


def onecycle_config(**overrides):
  config = get_config()
  config.update(dict(lr_schedule='cosine_onecycle', learning_rate=0.02, num_epochs=50,
                     warmup_epochs=0.5, final_learning_rate=0.002), **overrides)
  return config


def test_cosine_onecycle_rises_from_a_25th_and_falls_to_the_final_rate():
  schedule = optim.create_schedule(onecycle_config(), steps_per_epoch=100)  # 5,000 steps.
  lr = lambda s: float(schedule(s))
  assert lr(0) == pytest.approx(0.02 / 25)
  assert lr(25) == pytest.approx(0.0008 + (0.02 - 0.0008) / 2, rel=1e-5)  # Cosine: half way.
  assert lr(50) == pytest.approx(0.02)
  assert lr(2525) == pytest.approx(0.002 + (0.02 - 0.002) / 2, rel=1e-4)
  assert lr(5000) == pytest.approx(0.002) and lr(4999) > 0.002
  values = [lr(s) for s in range(50, 5001, 50)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  epoch_lr = optim.create_learning_rate_fn(onecycle_config(), 100)
  assert epoch_lr(2) == pytest.approx(lr(100))
  with pytest.raises(Exception, match='final_learning_rate'):
    optim.create_schedule(onecycle_config(final_learning_rate=0.5), 100)


@pytest.mark.parametrize('which, bias_decays', [('kernels', False), ('all', True)])
def test_adamw_decays_biases_only_when_told_to_decay_everything(which, bias_decays):
  config = get_config()
  config.update(dict(optimizer='adamw', weight_decay=0.1, weight_decay_params=which,
                     lr_schedule='constant', learning_rate=0.1))
  tx = optim.create_optimizer(config, optim.create_schedule(config, 1))
  params = {'conv': {'kernel': jnp.ones((1, 1, 2, 2)), 'bias': jnp.ones((2,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.01)  # lr * wd * param
  np.testing.assert_allclose(updates['conv']['bias'], -0.01 if bias_decays else 0.0)
  config.weight_decay_params = 'biases'
  with pytest.raises(Exception, match='weight_decay_params'):
    optim.create_optimizer(config, optim.create_schedule(config, 1))


def test_center_normalisation_maps_pixels_to_plus_minus_a_half():
  mean, std = data.normalization_stats(np.zeros((2, 4, 4, 3), np.uint8), 'center')
  x = steps.preprocess(jnp.asarray([0, 255], jnp.uint8)[:, None], jnp.asarray(mean[:1]),
                       jnp.asarray(std[:1]))
  np.testing.assert_allclose(np.asarray(x)[:, 0], [-0.5, 0.5])
