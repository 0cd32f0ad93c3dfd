"""Source 000's Baseline: 6 Conv2D + 3 Dense, dropout 0.25/0.5; 1,172,410 parameters.

    python -m dsconv_jax.main --config=configs/baseline.py --workdir=runs/baseline

It breaks the design rules on purpose (it is the score to beat), so its constraints are off.
Keras' Adam at its default constant learning rate 0.001, batch 128, x / 255, no augmentation;
the source states neither the learning rate nor the batch size, these are Keras' and the
course's defaults (assumed).

Source reported: max val acc 82.93%, 14,330 s. Its "18.31% on test data" was an evaluation bug
(test images not preprocessed like training images) that this pipeline cannot make: training and
evaluation share one preprocessing function.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'baseline'
  config.learning_rate = 0.001
  config.lr_schedule = 'constant'
  config.constraints.max_params = 0
  config.constraints.depthwise_separable_only = False
  config.constraints.require_batch_norm = False
  config.constraints.allow_dense = True
  return config
