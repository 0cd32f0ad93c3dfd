"""The defaults (dsconv_jax/defaults.py): source 000's Model 3 recipe on CIFAR-10.

    python -m dsconv_jax.main --config=configs/default.py --workdir=runs/default
"""

from dsconv_jax.defaults import get_config  # pylint: disable=unused-import
