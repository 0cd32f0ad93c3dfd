"""A tiny depthwise-separable net as a `sequential` spec (3,493 parameters, 3,301 trainable).

    python -m dsconv_jax.throughput --config=examples/tiny_spec.py --steps=5 --chunks=3 \
        --also="--config.model=examples.plain_nets:TinyLinen --config.layers=()"

Depthwise 3x3, 1x1 to 32, BatchNorm, ReLU, max pool, depthwise 3x3, 1x1 to 64, BatchNorm, ReLU,
1x1 to the classes (with a bias), global average: the same network as examples/plain_nets.py's
TinyLinen and TinyNNX; the command above times the forms side by side
(results/throughput-cpu-plain-forms). The recipe is Model 3's.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'sequential'
  config.layers = [
      'DepthwiseConv2D(3, padding="same", use_bias=False)',
      'Conv2D(32, 1, use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'MaxPooling2D()',
      'DepthwiseConv2D(3, padding="same", use_bias=False)',
      'Conv2D(64, 1, use_bias=False)',
      'BatchNormalization()',
      'ReLU()',
      'Conv2D("num_classes", 1)',
      'GlobalAveragePooling2D()',
  ]
  return config
