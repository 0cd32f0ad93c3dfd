"""Run by tests/test_parallel.py with 4 simulated CPU devices: Model 3 trained on 1 device and on 4
(the batch sharded), from the same state and batches, in float32 and in float64 (jax_enable_x64).

Prints, per precision, the largest relative difference of the losses after each step. The float32
runs drift apart (summation order differs when the batch is split: BatchNorm statistics and
gradients are sums over devices), and training amplifies it; in float64 the same computation
agrees to ~1e-12, which shows that the drift is rounding, not a semantic difference.
"""

import functools
import json
import sys

import jax

jax.config.update('jax_enable_x64', True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from dsconv_jax import layers, models, steps  # pylint: disable=wrong-import-position

STEPS, BATCH = 10, 16


def losses(dtype, mesh, images, labels):
  model = models.create_model('model3', options=layers.Options(depthwise='grouped'))
  state = steps.create_train_state(model, jax.random.key(0), (32, 32, 3), optax.sgd(0.05))
  state = state.replace(params=jax.tree.map(lambda a: a.astype(dtype), state.params),
                        batch_stats=jax.tree.map(lambda a: a.astype(dtype), state.batch_stats))
  state = state.replace(opt_state=state.tx.init(state.params))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  mean, std = jnp.zeros(3, dtype), jnp.full(3, 255.0, dtype)
  step = jax.jit(functools.partial(steps.train_step, mean=mean, std=std,
                                   compute_dtype=jnp.dtype(dtype).name))
  batch = NamedSharding(mesh, P('batch'))
  out = []
  for i in range(STEPS):
    state, m = step(state, jax.device_put(images[i], batch), jax.device_put(labels[i], batch),
                    jax.random.key(i))
    out.append(float(m['loss']))
  return out


def main():
  assert jax.device_count() == 4
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (STEPS, BATCH, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32)
  one, four = steps.create_mesh(jax.devices()[:1]), steps.create_mesh()
  result = {}
  for dtype in ('float32', 'float64'):
    a, b = losses(dtype, one, images, labels), losses(dtype, four, images, labels)
    result[dtype] = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    result[dtype + '_losses'] = a
  print('RESULT ' + json.dumps(result))
  sys.stdout.flush()


if __name__ == '__main__':
  main()
