"""Model 3 of source 000 as a `sequential` spec: the built-in 'model3' written as Keras layer calls.

    python -m dsconv_jax.throughput --config=examples/model3_spec.py --steps=5 --chunks=3 \
        --also="--config.model=model3 --config.layers=()" \
        --also="--config.model=examples.plain_nets:Model3Linen --config.layers=()"

The same network as configs/model3.py (35,387 parameters, 34,427 trainable) and as
examples/plain_nets.py's Model3Linen and Model3NNX; the command above times the forms side by side
(results/throughput-cpu-plain-forms). The recipe is Model 3's.
"""

from dsconv_jax import defaults as default


def _block(filters, rate, padding='valid'):
  return [f'DepthwiseConv2D(3, use_bias=False, padding="{padding}")',
          f'Conv2D({filters}, 1, use_bias=False)', 'Activation("relu")', 'BatchNormalization()',
          f'Dropout({rate})']


def get_config():
  config = default.get_config()
  config.model = 'sequential'
  config.layers = (_block(32, 0.1, 'same') + _block(64, 0.1) + _block(128, 0.1)
                   + ['MaxPooling2D(2)', 'Conv2D(32, 1, use_bias=False)']
                   + _block(32, 0.2) + _block(64, 0.2) + _block(128, 0.2)
                   + ['MaxPooling2D(2)', 'Conv2D(32, 1, use_bias=False)']
                   + _block(32, 0.25)
                   + ['Conv2D("num_classes", 1, use_bias=False)', 'GlobalAveragePooling2D()'])
  return config
