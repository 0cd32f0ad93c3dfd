"""Source 001: 7 SeparableConv2D layers + BN + dropout 0.07, GAP; 80,203 parameters.

    python -m dsconv_jax.main --config=configs/separable80k.py --workdir=runs/separable80k

80,203 parameters (78,891 trainable). Keras' Adam with the same per-epoch schedule as source 000
(the log shows lr 0.01, 0.0075815, ...), batch 256, per-channel mean/std normalisation of the
training images, no augmentation, 50 epochs.

Source reported: max val acc 83.10% (epoch 44), final 82.25%, 3774 s.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'separable80k'
  config.batch_size = 256
  config.normalization = 'standardize'
  return config
