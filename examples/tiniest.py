"""xvel/cifar10-tiniest in Flax Linen: the smallest published CIFAR-10 network near 94%.

The reference network of configs/tiniest.py, which names it by import path
(`config.model = 'examples.tiniest:Tiniest'`, resolved from the repository root like
configs/my_module.py's model): it is a model from outside this project, trained by dsconv_jax as
any user's module is, and it breaks the source rules (a 3x3 full convolution as the stem, a
grouped 4x4 convolution to downsample, LayerNorm instead of BatchNorm, a dense head), so it is
a reference for what 97,530 parameters can do, not a model of the project's.

The architecture is the original's (its model.py), ported:

* stem: 3x3 convolution 3 -> 48 with bias, LayerNorm over the channels of each pixel;
* three `Block`s of width 48 at 32x32;
* one downsampling: a 4x4 convolution with stride 2 and 16 groups, 48 -> 80, LayerNorm;
* three `Block`s of width 80 at 16x16;
* global average pooling, a dense layer to the classes.

A `Block` splits its channels into four quarters: the first passes unchanged, the second goes
through a depthwise 3x3, the third a depthwise 7x7, the fourth a 3x3 average pool (zeros counted,
PyTorch's default) and then a depthwise 7x7 with dilation 3 (each with a bias). The quarters are
concatenated, normalised (LayerNorm), widened by a pointwise convolution to twice `ffdim`
channels, halved by a gate (g, v) -> tanh(exp(g)) * g * v, brought back by a pointwise
convolution, and added to the block's input scaled by a learned per-channel factor (starting at
1). 97,530 parameters, all trainable; 43.9M multiply-accumulates per image.

Layers are the project's where one exists (`DepthwiseConv2D`, `PointwiseConv2D`,
`GlobalAvgPool`: the fast depthwise and pointwise forms of dsconv_jax.layers); the rest are plain
Flax (`nn.Conv`, `nn.LayerNorm`, `nn.avg_pool`, `nn.Dense`). Every kernel and bias starts as
PyTorch's default initialisation does (uniform in +-1 / sqrt(fan_in)), since the recipe was tuned
with it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsconv_jax import layers


def torch_kernel_init(in_axis: int = -2, out_axis: int = -1) -> Callable[..., Any]:
  """PyTorch's default for conv and linear weights (kaiming_uniform with a = sqrt(5)): uniform in
  +-1 / sqrt(fan_in). `in_axis` is the axis of the kernel's input channels per group."""
  return nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=in_axis,
                                          out_axis=out_axis)


def torch_bias_init(fan_in: int) -> Callable[..., Any]:
  """PyTorch's default for conv and linear biases: uniform in +-1 / sqrt(fan_in)."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class LayerNorm(layers.Layer):
  """LayerNorm over the channels of each pixel (PyTorch's nn.LayerNorm(C) on NHWC; epsilon 1e-5)."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.LayerNorm(epsilon=self.epsilon, use_fast_variance=False, dtype=x.dtype,
                        param_dtype=jnp.float32, name='ln')(x)


def gate(g: jax.Array, v: jax.Array) -> jax.Array:
  """tanh(exp(g)) * g * v. exp's argument is capped at 20, where tanh(exp) is already exactly 1
  in float32 and its derivative exactly 0, as they are beyond: the cap changes no value and no
  gradient, and keeps exp from overflowing into inf * 0 = nan in the backward pass (g > 88)."""
  return jnp.tanh(jnp.exp(jnp.minimum(g, 20.0))) * g * v


class Block(nn.Module):
  """One block of the network (see the module docstring): mixed depthwise filters on channel
  quarters, LayerNorm, a gated pointwise expansion, and a scaled identity shortcut."""
  dim: int
  ffdim: int
  options: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def depthwise(y, k, dilation=1):
      return layers.DepthwiseConv2D(
          k, padding='same', dilation=dilation, kernel_init=torch_kernel_init(-1, -2),
          bias_init=torch_bias_init(k * k), options=self.options)(y, train)

    def pointwise(y, features):
      return layers.PointwiseConv2D(features, kernel_init=torch_kernel_init(),
                                    bias_init=torch_bias_init(y.shape[-1]))(y, train)

    same, small, large, dilated = jnp.split(x, 4, axis=-1)
    dilated = nn.avg_pool(dilated, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    y = jnp.concatenate([same, depthwise(small, 3), depthwise(large, 7),
                         depthwise(dilated, 7, dilation=3)], axis=-1)
    y = pointwise(LayerNorm()(y, train), 2 * self.ffdim)
    y = pointwise(gate(*jnp.split(y, 2, axis=-1)), self.dim)
    scale = self.param('residual_scale', nn.initializers.ones, (self.dim,))
    return y + x * scale.astype(x.dtype)


class Tiniest(nn.Module):
  """xvel/cifar10-tiniest (see the module docstring): 97,530 parameters with the defaults."""
  num_classes: int = 10
  dims: Sequence[int] = (48, 80)  # Widths at full and at half resolution.
  depth: int = 3  # Blocks at each resolution.
  groups: int = 16  # Of the downsampling convolution.
  options: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    first, second = self.dims
    x = nn.Conv(first, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_kernel_init(),
                bias_init=torch_bias_init(9 * x.shape[-1]), dtype=x.dtype)(x)
    x = LayerNorm()(x, train)
    for _ in range(self.depth):
      x = Block(first, first, options=self.options)(x, train)
    x = nn.Conv(second, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                feature_group_count=self.groups, kernel_init=torch_kernel_init(),
                bias_init=torch_bias_init(16 * first // self.groups), dtype=x.dtype)(x)
    x = LayerNorm()(x, train)
    for _ in range(self.depth):
      x = Block(second, second, options=self.options)(x, train)
    x = layers.GlobalAvgPool()(x, train)
    return nn.Dense(self.num_classes, kernel_init=torch_kernel_init(),
                    bias_init=torch_bias_init(second), dtype=x.dtype)(x)
