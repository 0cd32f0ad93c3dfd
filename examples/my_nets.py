"""A model of your own in plain Flax Linen, trained by dsconv_jax without editing the package.

`configs/my_module.py` names it as `config.model = 'examples.my_nets:SeparableNet'` (an import
path, resolved from the working directory, here the repository root). The contract: a
`flax.linen.Module` called as `module(images, train=True|False)` on float32 NHWC images, returning
logits of shape (batch, num_classes), with a 'dropout' rng in training and BatchNorm statistics in
the 'batch_stats' collection. The pipeline passes `num_classes`, `options`, `bn_momentum` and
`bn_epsilon` only to fields a module declares, and `width_multiplier` (config.fit_params) only
through `config.model_kwargs`; other fields are set from `config.model_kwargs`.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class SeparableNet(nn.Module):
  """Depthwise-separable blocks (depthwise 3x3, pointwise 1x1, BatchNorm, ReLU) in three stages
  of `widths`, max-pooling between stages, dropout, a 1x1 convolution to the classes and the mean
  over height and width. No bias before a BatchNorm (it would cancel out)."""
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  dropout_rate: float = 0.1
  width_multiplier: float = 1.0  # Declared, so that config.fit_params can scale the widths.
  bn_momentum: float = 0.99  # Declared, so that config.bn_momentum and bn_epsilon reach them.
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for stage, width in enumerate(self.widths):
      width = max(1, round(width * self.width_multiplier))
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(2):
        channels = x.shape[-1]
        # Depthwise: one 3x3 filter per channel (feature_group_count = channels).
        x = nn.Conv(channels, (3, 3), padding='SAME', feature_group_count=channels,
                    use_bias=False)(x)
        x = nn.Conv(width, (1, 1), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon)(x)
        x = nn.relu(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Conv(self.num_classes, (1, 1))(x)
    return jnp.mean(x, axis=(1, 2))
