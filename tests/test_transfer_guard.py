"""After setup, a training epoch copies nothing from the host: the data already lives on the device."""

import functools

import jax
import numpy as np
import pytest

from dsconv_jax import optim, steps, train
from dsconv_jax.defaults import get_testing_config


def _setup(steps_per_epoch=3, batch_size=8):
  config = get_testing_config()
  model = train.create_model(config, 3)
  mesh = steps.create_mesh()
  n = steps_per_epoch * batch_size
  rng = np.random.default_rng(0)
  images = steps.put_sharded_rows(mesh, rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
  labels = steps.put_sharded_rows(mesh, rng.integers(0, 3, (n,), dtype=np.int32))
  tx = optim.create_optimizer(config, optim.create_schedule(config, steps_per_epoch))
  seed_key = jax.random.key(0)
  state = jax.jit(functools.partial(steps.create_train_state, model, image_shape=(16, 16, 3),
                                    tx=tx))(seed_key)
  step_fn = functools.partial(
      steps.train_step, mean=steps.put_replicated(mesh, np.zeros(3, np.float32)),
      std=steps.put_replicated(mesh, np.full(3, 255.0, np.float32)), augment=('crop', 'flip'))
  train_epoch = steps.make_train_epoch(mesh, steps_per_epoch=steps_per_epoch,
                                       batch_size=batch_size, num_examples=n,
                                       seed_key=seed_key, step_fn=step_fn)
  return train_epoch, state, images, labels


def test_train_epoch_runs_under_a_disallowing_transfer_guard():
  train_epoch, state, images, labels = _setup()
  epochs = [jax.device_put(np.int32(e)) for e in (1, 2)]
  state, _ = train_epoch(state, images, labels, epochs[0])  # Compiles outside the guard.
  with jax.transfer_guard('disallow'):
    state, metrics = train_epoch(state, images, labels, epochs[1])
    jax.block_until_ready((state, metrics))
  assert np.isfinite(np.asarray(metrics['loss'])).all()

  # The guard does catch host data: the same call with the images as a numpy array fails.
  host_images = np.asarray(images)
  with pytest.raises(Exception, match='host-to-device'):
    with jax.transfer_guard('disallow'):
      train_epoch(state, host_images, labels, epochs[1])
