"""The learning-rate schedule and Keras' Adam, against the sources' logs and Keras' formula."""

import jax.numpy as jnp
import numpy as np
import optax

from dsconv_jax import optim
from dsconv_jax.defaults import get_config


def test_inverse_time_schedule_matches_model3_log():
  lr = optim.create_learning_rate_fn(get_config(), steps_per_epoch=390)
  # "LearningRateScheduler setting learning rate to ..." in source 000's log, epochs 1-4, 10, 50.
  logged = {1: 0.01, 2: 0.0075815011, 3: 0.0061050061, 4: 0.005109862, 10: 0.0025833118,
            50: 0.0006012868}
  for epoch, value in logged.items():
    np.testing.assert_allclose(lr(epoch), value, rtol=1e-7)


def test_step_schedule_is_constant_within_an_epoch():
  lr = optim.create_learning_rate_fn(get_config(), steps_per_epoch=10)
  schedule = optim.step_schedule(lr, 10)
  assert [float(schedule(s)) for s in (0, 9)] == [0.01, 0.01]
  np.testing.assert_allclose(float(schedule(10)), 0.0075815011, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(jnp.int32(25))), lr(3), rtol=1e-6)


def test_keras_adam_matches_keras_update_rule():
  rng = np.random.default_rng(0)
  p = rng.normal(size=5).astype(np.float32)
  grads = [rng.normal(size=5).astype(np.float32) * 1e-3 for _ in range(4)]
  tx = optax.chain(optim.scale_by_keras_adam(), optax.scale_by_learning_rate(0.01))
  state, params = tx.init(jnp.asarray(p)), jnp.asarray(p)
  m = v = np.zeros(5)
  ref = p.astype(np.float64)
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update(jnp.asarray(g), state)
    params = optax.apply_updates(params, updates)
    # Keras: m, v moments; alpha = lr * sqrt(1 - b2^t) / (1 - b1^t); p -= alpha m / (sqrt(v) + 1e-7)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    ref = ref - 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-7)
  np.testing.assert_allclose(params, ref, rtol=1e-5)
  # And it is not optax.adam, whose epsilon sits elsewhere: visible with small gradients.
  adam = optax.adam(0.01)
  s2, p2 = adam.init(jnp.asarray(p)), jnp.asarray(p)
  for g in grads:
    u, s2 = adam.update(jnp.asarray(g) * 1e-4, s2)
    p2 = optax.apply_updates(p2, u)
  assert not np.allclose(p2, params)


def test_bad_schedule_and_optimizer_are_user_errors():
  import pytest
  c = get_config()
  c.lr_schedule = 'exponential'
  with pytest.raises(optim.UserError, match='lr_schedule'):
    optim.create_learning_rate_fn(c, 1)
  c = get_config()
  c.optimizer = 'lamb'
  with pytest.raises(optim.UserError, match='optimizer'):
    optim.create_optimizer(c, lambda s: 0.1)
