"""Source 000, Model 4: Model 3 with more dropout.

    python -m dsconv_jax.main --config=configs/model4.py --workdir=runs/model4

35,387 parameters; recipe as Model 3. The source gives no dropout values; the registered model
'model4' uses 0.2 / 0.3 / 0.35 instead of Model 3's 0.1 / 0.2 / 0.25 (this project's assumption).

Source reported: about 5 points lower training and 2 points lower validation accuracy than Model 3.
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'model4'
  return config
