"""A model of your own in plain Flax NNX, trained by dsconv_jax without editing the package.

`configs/my_nnx_module.py` names it as `config.model = 'examples.my_nnx_nets:SeparableNet'` (an
import path, resolved from the working directory, here the repository root). The contract: an
`nnx.Module` class constructed with `rngs=` (an `nnx.Rngs` seeded from `config.seed`) and called as
`model(images)` on float32 NHWC images, returning logits of shape (batch, num_classes); Dropout and
BatchNorm follow the mode that `model.train()` / `model.eval()` set, as in any NNX training loop.
Nothing here comes from dsconv_jax. The pipeline passes `num_classes` only to a constructor that
takes it, `width_multiplier` (config.fit_params) only through `config.model_kwargs`, and sets
`config.bn_momentum` / `config.bn_epsilon`, when given, on every `nnx.BatchNorm`; other arguments
come from `config.model_kwargs`.

The same network as examples/my_nets.py's Linen SeparableNet: 37,829 parameters with the default
widths (36,933 trainable).
"""

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp


class SeparableBlock(nnx.Module):
  """Depthwise 3x3 (one filter per channel: feature_group_count = channels), pointwise 1x1,
  BatchNorm, ReLU. No bias before a BatchNorm (it would cancel out)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.depthwise = nnx.Conv(in_features, in_features, (3, 3), padding='SAME',
                              feature_group_count=in_features, use_bias=False, rngs=rngs)
    self.pointwise = nnx.Conv(in_features, out_features, (1, 1), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(out_features, momentum=0.99, epsilon=1e-3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.norm(self.pointwise(self.depthwise(x))))


class SeparableNet(nnx.Module):
  """Two `SeparableBlock`s per stage of `widths`, max-pooling between stages, dropout, a 1x1
  convolution to the classes and the mean over height and width. `in_features`: the images'
  channels (3 for RGB)."""

  def __init__(self, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
               dropout_rate: float = 0.1, width_multiplier: float = 1.0, in_features: int = 3,
               *, rngs: nnx.Rngs):
    self.stages = nnx.List()
    channels = in_features
    for width in widths:
      width = max(1, round(width * width_multiplier))
      self.stages.append(nnx.List([SeparableBlock(channels, width, rngs=rngs),
                                   SeparableBlock(width, width, rngs=rngs)]))
      channels = width
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.classes = nnx.Conv(channels, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, stage in enumerate(self.stages):
      if i:
        # By keyword: export (jax2onnx) replaces nnx.max_pool with a form that takes no
        # positional window.
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
      for block in stage:
        x = block(x)
    x = self.dropout(x)
    return jnp.mean(self.classes(x), axis=(1, 2))
