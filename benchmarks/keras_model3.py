"""Source 000's own Model 3 in Keras on TensorFlow: the other peer of `dsconv_jax.throughput`.

    python -m dsconv_jax.throughput --config=configs/model3.py --peer=keras [--json]

The model is the source's `Sequential` code as printed in source 000 (only `Convolution2D` is
spelled `Conv2D` and the input shape given by `keras.Input`), compiled with Adam (lr 0.01),
categorical cross-entropy on the softmax output (sparse labels) and the accuracy metric, and
trained one batch at a time with `train_on_batch`, which runs the model's compiled
`tf.function` train step (what `model.fit` runs per batch). The data is a float32 tensor scaled
by 1/255 once, as the source's notebook did, and each step gathers a random batch from it.
Runners: graph mode and XLA (`jit_compile=True`); the throughput tool reports the faster.
"""

from __future__ import annotations

import os
import time

os.environ['KERAS_BACKEND'] = 'tensorflow'  # The source's backend, whatever the user's default.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
from keras.layers import (Activation, BatchNormalization, Conv2D, DepthwiseConv2D, Dropout,
                          GlobalAveragePooling2D, MaxPooling2D)
import numpy as np  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position


def build_model(num_classes: int = 10) -> keras.Sequential:
  """Source 000's Model 3, layer for layer (35,387 parameters, 34,427 trainable)."""
  model = keras.Sequential()
  model.add(keras.Input((32, 32, 3)))
  model.add(DepthwiseConv2D(3, depth_multiplier=1, use_bias=False, padding='same'))
  model.add(Conv2D(32, 1, use_bias=False, padding='same'))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.1))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(64, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.1))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(128, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.1))

  model.add(MaxPooling2D(2))
  model.add(Conv2D(32, 1, use_bias=False))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(32, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.2))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(64, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.2))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(128, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.2))

  model.add(MaxPooling2D(2))
  model.add(Conv2D(32, 1, use_bias=False))

  model.add(DepthwiseConv2D(3, use_bias=False))
  model.add(Conv2D(32, 1, use_bias=False))
  model.add(Activation('relu'))
  model.add(BatchNormalization())
  model.add(Dropout(0.25))

  model.add(Conv2D(num_classes, 1, use_bias=False))
  model.add(GlobalAveragePooling2D())
  model.add(Activation('softmax'))
  return model


class KerasRunner:
  """Chunks of `steps` `train_on_batch` calls on synthetic data, with or without XLA."""

  def __init__(self, *, batch_size: int, steps: int, image_size: int, seed: int, xla: bool):
    if image_size != 32:
      raise ValueError('the Keras Model 3 peer is defined for 32x32 images')
    self.name = 'train_on_batch XLA' if xla else 'train_on_batch graph'
    self.batch_size, self.steps, self.seed, self.xla = batch_size, steps, seed, xla
    self.images_per_chunk = batch_size * steps

  def setup(self) -> float:
    keras.utils.set_random_seed(self.seed)
    rng = np.random.default_rng(self.seed)
    n = self.images_per_chunk
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    self.images = tf.constant(images.astype(np.float32) / 255.0)
    self.labels = tf.constant(rng.integers(0, 10, (n,), dtype=np.int32))
    self.model = build_model()
    self.model.compile(optimizer=keras.optimizers.Adam(0.01),
                       loss='sparse_categorical_crossentropy', metrics=['accuracy'],
                       jit_compile=self.xla)
    self.rng = np.random.default_rng(self.seed)
    t0 = time.perf_counter()
    self.run_chunk()  # Traces (and with XLA compiles) the train function, warms up.
    return time.perf_counter() - t0

  def run_chunk(self) -> float:
    t0 = time.perf_counter()
    order = tf.constant(self.rng.permutation(self.images_per_chunk).astype(np.int32))
    for i in range(self.steps):
      idx = order[i * self.batch_size:(i + 1) * self.batch_size]
      self.model.train_on_batch(tf.gather(self.images, idx), tf.gather(self.labels, idx))
    return time.perf_counter() - t0


def make_runners(*, batch_size: int, steps: int, image_size: int = 32, seed: int = 0,
                 compiled: bool = True) -> list[KerasRunner]:
  """Graph mode and (with `compiled`) XLA."""
  modes = (False, True) if compiled else (False,)
  return [KerasRunner(batch_size=batch_size, steps=steps, image_size=image_size, seed=seed,
                      xla=xla) for xla in modes]


def versions() -> dict[str, str]:
  return {'tensorflow': tf.__version__, 'keras': keras.__version__}
