"""A model designed in this file: Keras layer calls, checked, then trained like the built-in ones.

    python -m dsconv_jax.summary --config=configs/my_sequential.py
    python -m dsconv_jax.main --config=configs/my_sequential.py --workdir=runs/my_sequential

An example of `config.model = 'sequential'` (grammar: dsconv_jax/sequential.py): a colour stem
(depthwise 3x3 with 6 filters per channel, then pointwise), a separable stage at 32x32, two stages
of a separable convolution and one residual block at 16x16 and 8x8, the second block's first
convolution dilated (receptive field 52 pixels on the 32x32 image), dropout, then a pointwise
convolution to the classes ("num_classes") and global average pooling. 91,154 parameters
(89,554 trainable), depthwise-separable convolutions and BatchNorm only, no dense layer: within
the source rules. Not trained yet; the recipe is the defaults' (Model 3's).
`--config.fit_params=N` scales every width but the classes layer's to fill a budget.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'sequential'
  config.layers = [
      'DepthwiseConv2D(3, padding="same", depth_multiplier=6, use_bias=False)',
      'Conv2D(32, 1, use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'SeparableConv2D(48, 3, padding="same", use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'MaxPooling2D()',
      'SeparableConv2D(96, 3, padding="same", use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'Residual([SeparableConv2D(96, 3, padding="same", use_bias=False), BatchNormalization(), '
      'ReLU(), SeparableConv2D(96, 3, padding="same", use_bias=False), BatchNormalization()])',
      'ReLU()',
      'MaxPooling2D()',
      'SeparableConv2D(144, 3, padding="same", use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'Residual([SeparableConv2D(144, 3, padding="same", dilation_rate=2, use_bias=False), '
      'BatchNormalization(), ReLU(), '
      'SeparableConv2D(144, 3, padding="same", use_bias=False), BatchNormalization()])',
      'ReLU()',
      'Dropout(0.1)',
      'Conv2D("num_classes", 1, use_bias=False)',
      'GlobalAveragePooling2D()',
  ]
  return config
