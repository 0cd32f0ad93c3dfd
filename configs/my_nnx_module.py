"""A model of your own in Flax NNX, by import path: examples/my_nnx_nets.py's SeparableNet.

    python -m dsconv_jax.summary --config=configs/my_nnx_module.py
    python -m dsconv_jax.main --config=configs/my_nnx_module.py --workdir=runs/my_nnx_module

Run from the repository root: `config.model = 'package.module:Class'` is imported from the working
directory (or from the installed packages), and `config.model_kwargs` sets the constructor's
arguments. Any `nnx.Module` constructed with `rngs=` and called as `model(images)` (train and eval
mode as NNX sets them) will do; see the contract in examples/my_nnx_nets.py. The same network as
configs/my_module.py's Linen one: 37,829 parameters (36,933 trainable). Not trained yet; the
recipe is the defaults' (Model 3's).
"""

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'examples.my_nnx_nets:SeparableNet'
  config.model_kwargs.widths = (32, 64, 128)
  config.model_kwargs.dropout_rate = 0.1
  return config
