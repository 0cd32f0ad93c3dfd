"""Source 000, Model 3: DepthwiseConv2D + 1x1 Conv2D, BN, dropout 0.1/0.2/0.25, GAP.

    python -m dsconv_jax.main --config=configs/model3.py --workdir=runs/model3

35,387 parameters (34,427 trainable). Keras' Adam, lr = 0.01 / (1 + 0.319 * (epoch - 1)) set
per epoch, batch 128, x / 255, no augmentation, 50 epochs.

Source reported: max val acc 82.97% (epoch 47), test 81.54%, 1967 s (Keras, 2019 GPU). That log
did not start from scratch (69% training accuracy after epoch 1, likely Model 2's weights); the
same recipe run fresh in Keras 3.15 on the JPEG CIFAR-10 copy reached 74.64% max val.
This project, on the same copy (results/model3-cpu-50ep, 2-core CPU, seed 0): 74.97% max val
(epoch 31), 74.37% final/test, 81.13% training accuracy, in 5,480 s. On an H200
(results/gpu-h200-model3-50ep): 35.0 s of training, 77.14% max val, 76.38% final/test.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'model3'
  return config
