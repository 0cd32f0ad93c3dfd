"""Model 3 trajectories of 40 train steps, to compare two versions of dsconv_jax step by step.

Run from the root of each checkout (the version under test is the `dsconv_jax` imported from the
current directory), with the same CACHE (a data cache .npz written by `dsconv_jax.main` with
`--config.cache_dir`, whose first 640 training images make the 40 batches of 16):

    python results/model3-cpu-5k-bs16-after-speed/step_equality.py CACHE OUT.json [PERTURB]

Initialises Model 3 as `train_and_evaluate` does for seed 0, then takes 40 jit-compiled
`steps.train_step`s (Adam lr 0.01, epsilon 1e-7; Threefry dropout masks, which both versions
draw) and writes the 40 losses to OUT.json. PERTURB > 0 multiplies every initial parameter by
(1 + PERTURB * N(0, 1)) first, to see how fast a float-sized difference grows.
"""

import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.getcwd())  # The checkout under test, not an installed copy.
from dsconv_jax import models, steps  # pylint: disable=g-import-not-at-top


def main(cache: str, out: str, perturb: float = 0.0) -> None:
  with np.load(cache) as z:
    x = z['train_images'][:640].reshape(40, 16, *z['train_images'].shape[1:])
    y = z['train_labels'][:640].reshape(40, 16)
  model = models.create_model('model3')
  key = jax.random.fold_in(jax.random.key(0), steps.INIT)
  state = steps.create_train_state(model, key, x.shape[2:], optax.adam(0.01, eps=1e-7))
  if perturb:
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    leaves = [p * (1 + perturb * jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(treedef, leaves))
  kwargs = dict(mean=jnp.zeros(3), std=jnp.full(3, 255.0))
  if 'dropout_impl' in inspect.signature(steps.train_step).parameters:
    kwargs['dropout_impl'] = 'threefry'  # Versions before the hash masks had only these.
  step = jax.jit(lambda s, xb, yb, k: steps.train_step(s, xb, yb, k, **kwargs))
  losses = []
  for i in range(len(x)):
    state, metrics = step(state, x[i], y[i], jax.random.fold_in(jax.random.key(1), i))
    losses.append(float(metrics['loss']))
  with open(out, 'w') as f:
    json.dump(losses, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
