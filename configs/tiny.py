"""A tiny depthwise-separable model on a few images, used for testing only.

    python -m dsconv_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.dataset=folder:/path/to/images
"""

from dsconv_jax import defaults as default


def get_config():
  return default.get_testing_config()
