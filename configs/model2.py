"""Source 000, Model 2: the same network as Model 3 with a lower learning rate, stronger decay.

    python -m dsconv_jax.main --config=configs/model2.py --workdir=runs/model2

35,387 parameters. The source does not give Model 2's learning rate or decay; this config assumes
the course's usual lr = 0.003 / (1 + 0.319 * (epoch - 1)). Batch 128, x / 255.

Source reported: max val acc 80.23%, test 80.23%, 1104 s.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'model2'
  config.learning_rate = 0.003  # Assumed: not given by the source.
  config.lr_decay = 0.319
  return config
