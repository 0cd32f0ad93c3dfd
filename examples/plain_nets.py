"""Two networks written in plain Flax, as a new user writes them: Linen and NNX, nothing from dsconv_jax.

Each is also written as a `sequential` spec (examples/model3_spec.py, examples/tiny_spec.py), and
`dsconv_jax.throughput` times the forms side by side (results/throughput-cpu-plain-forms): however
a model is written, `dsconv_jax.fast_forms` gives its depthwise and 1x1 convolutions, max pooling
and dropout the same fast forms.

* Model 3 of source 000 (the built-in 'model3'): three depthwise-separable blocks (depthwise 3x3,
  1x1, ReLU, BatchNorm, dropout), max pool, 1x1, three blocks, max pool, 1x1, one block, 1x1 to
  the classes, global average. 35,387 parameters (34,427 trainable), as Keras counts them.
* Tiny: depthwise 3x3, 1x1 to 32, BatchNorm, ReLU, max pool, depthwise 3x3, 1x1 to 64, BatchNorm,
  ReLU, 1x1 to the classes (with a bias), global average. 3,493 parameters (3,301 trainable).

Linen modules are called as `module(images, train=...)`; NNX modules are built with `rngs=` and
switched with `model.train()` / `model.eval()`, as Flax's NNX guides write them.
"""

from typing import Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

MODEL3_WIDTHS = ((32, 64, 128), (32, 64, 128), (32,))  # Block widths per stage.
MODEL3_DROPOUT = (0.1, 0.2, 0.25)  # Per stage.


class Model3Linen(nn.Module):
  """Model 3 in plain Linen (`nn.Conv` with `feature_group_count`, 1x1 `nn.Conv`, `nn.max_pool`,
  `nn.BatchNorm`, `nn.Dropout`). The first block pads 'SAME', the others 'VALID', as in Keras."""
  num_classes: int = 10
  dropout_rates: Sequence[float] = MODEL3_DROPOUT
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def block(x, features, rate, padding='VALID'):
      channels = x.shape[-1]
      x = nn.Conv(channels, (3, 3), padding=padding, feature_group_count=channels,
                  use_bias=False)(x)
      x = nn.Conv(features, (1, 1), use_bias=False)(x)
      x = nn.relu(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon)(x)
      return nn.Dropout(rate, deterministic=not train)(x)

    for stage, (widths, rate) in enumerate(zip(MODEL3_WIDTHS, self.dropout_rates)):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(32, (1, 1), use_bias=False)(x)
      for i, width in enumerate(widths):
        x = block(x, width, rate, 'SAME' if stage == i == 0 else 'VALID')
    x = nn.Conv(self.num_classes, (1, 1), use_bias=False)(x)
    return jnp.mean(x, axis=(1, 2))


class Model3NNX(nnx.Module):
  """Model 3 in plain NNX (`nnx.Conv` with `feature_group_count`, 1x1 `nnx.Conv`, `nnx.max_pool`,
  `nnx.BatchNorm`, `nnx.Dropout`)."""

  def __init__(self, num_classes: int = 10, in_features: int = 3,
               dropout_rates: Sequence[float] = MODEL3_DROPOUT, bn_momentum: float = 0.99,
               bn_epsilon: float = 1e-3, *, rngs: nnx.Rngs):
    layers = []
    channels = in_features

    def block(channels, features, rate, padding):
      return [nnx.Conv(channels, channels, (3, 3), padding=padding, feature_group_count=channels,
                       use_bias=False, rngs=rngs),
              nnx.Conv(channels, features, (1, 1), use_bias=False, rngs=rngs),
              nnx.relu,
              nnx.BatchNorm(features, momentum=bn_momentum, epsilon=bn_epsilon, rngs=rngs),
              nnx.Dropout(rate, rngs=rngs)]

    for stage, (widths, rate) in enumerate(zip(MODEL3_WIDTHS, dropout_rates)):
      if stage:
        layers += [_max_pool_2, nnx.Conv(channels, 32, (1, 1), use_bias=False, rngs=rngs)]
        channels = 32
      for i, width in enumerate(widths):
        layers += block(channels, width, rate, 'SAME' if stage == i == 0 else 'VALID')
        channels = width
    layers += [nnx.Conv(channels, num_classes, (1, 1), use_bias=False, rngs=rngs), _global_mean]
    self.layers = nnx.Sequential(*layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layers(x)


class TinyLinen(nn.Module):
  """The tiny net in plain Linen."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for stage, width in enumerate((32, 64)):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      channels = x.shape[-1]
      x = nn.Conv(channels, (3, 3), feature_group_count=channels, use_bias=False)(x)
      x = nn.Conv(width, (1, 1), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3)(x)
      x = nn.relu(x)
    x = nn.Conv(self.num_classes, (1, 1))(x)
    return jnp.mean(x, axis=(1, 2))


class TinyNNX(nnx.Module):
  """The tiny net in plain NNX."""

  def __init__(self, num_classes: int = 10, in_features: int = 3, *, rngs: nnx.Rngs):
    layers = []
    channels = in_features
    for stage, width in enumerate((32, 64)):
      if stage:
        layers.append(_max_pool_2)
      layers += [nnx.Conv(channels, channels, (3, 3), feature_group_count=channels,
                          use_bias=False, rngs=rngs),
                 nnx.Conv(channels, width, (1, 1), use_bias=False, rngs=rngs),
                 nnx.BatchNorm(width, momentum=0.99, epsilon=1e-3, rngs=rngs),
                 nnx.relu]
      channels = width
    layers += [nnx.Conv(channels, num_classes, (1, 1), rngs=rngs), _global_mean]
    self.layers = nnx.Sequential(*layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layers(x)


def _max_pool_2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _global_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))
