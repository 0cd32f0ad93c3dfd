"""After setup, a training epoch copies nothing from the host: the data already lives on the device."""

import jax
import numpy as np
import pytest

from dsconv_jax import experiment
from dsconv_jax.defaults import get_testing_config


def _setup(steps_per_epoch=3, batch_size=8):
  """The experiment `main` would build, on synthetic 16x16 images, with augmentation on."""
  config = get_testing_config()
  config.batch_size = batch_size
  config.augment = 'crop,flip'
  data = experiment.synthetic_data(steps_per_epoch * batch_size, (16, 16, 3), 3, seed=0)
  exp = experiment.create_experiment(config, data)
  return exp.train_epoch, exp.state, exp.train_images, exp.train_labels


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
