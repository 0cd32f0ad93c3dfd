"""A model of your own as a Flax module, by import path: examples/my_nets.py's SeparableNet.

    python -m dsconv_jax.summary --config=configs/my_module.py
    python -m dsconv_jax.main --config=configs/my_module.py --workdir=runs/my_module

Run from the repository root: `config.model = 'package.module:Class'` is imported from the working
directory (or from the installed packages), and `config.model_kwargs` sets the module's fields.
Any `flax.linen.Module` called as `module(images, train=...)` and returning logits will do; see
the contract in examples/my_nets.py. Depthwise-separable blocks with BatchNorm and no dense layer:
37,829 parameters (36,933 trainable) with these widths. Not trained yet; the recipe is the
defaults' (Model 3's).
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'examples.my_nets:SeparableNet'
  config.model_kwargs.widths = (32, 64, 128)
  config.model_kwargs.dropout_rate = 0.1
  return config
