"""Run by tests/test_parallel.py in a subprocess with 4 simulated CPU devices.

Trains a few steps of the tiny model three ways from the same initial state and batches:
one device, jit with the batch sharded over 4 devices, and `jax.pmap` over 4 devices with a named
axis; prints the per-step losses and final parameters' differences as JSON.
"""

import functools
import json

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from dsconv_jax import experiment, fast_forms, layers, models, steps
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UserError

N_STEPS, BATCH = 3, 16


def fresh_state(dropout, batch_norm_axis=None, fast=False):
  """The tiny model's initial state; with `fast`, its grouped depthwise convolutions are put in
  the shifted form by `fast_forms.accelerate` (what `experiment` does to every model)."""
  options = layers.Options(depthwise='grouped', batch_norm_axis=batch_norm_axis)
  model = models.create_model('tiny', dropout_rate=dropout, options=options)
  state = steps.create_train_state(model, jax.random.key(0), (32, 32, 3), optax.adam(1e-2))
  if fast:
    state = state.replace(apply_fn=fast_forms.accelerate(model.apply, fast_forms.Forms()))
  return state


def grouped_convs(state):
  """How many grouped (depthwise) convolutions the state's apply_fn computes."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  x = np.zeros((1, 32, 32, 3), np.float32)
  return len(fast_forms.depthwise_convs(
      jax.make_jaxpr(lambda v: state.apply_fn(v, x))(variables)))


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N_STEPS, BATCH, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (N_STEPS, BATCH)).astype(np.int32)
  mean, std = np.zeros(3, np.float32), np.full(3, 255.0, np.float32)
  step = functools.partial(steps.train_step, mean=mean, std=std)
  out = {}
  for dropout in (0.0, 0.3):
    one_device = steps.create_mesh(jax.devices()[:1])
    state = jax.device_put(fresh_state(dropout), NamedSharding(one_device, P()))
    losses_1 = []
    jitted = jax.jit(step)
    for i in range(N_STEPS):
      state, m = jitted(state, images[i], labels[i], jax.random.key(i))
      losses_1.append(float(m['loss']))
    params_1 = state.params

    mesh = steps.create_mesh()
    state = jax.device_put(fresh_state(dropout), NamedSharding(mesh, P()))
    batch = NamedSharding(mesh, P('batch'))
    losses_spmd = []
    for i in range(N_STEPS):
      state, m = jitted(state, jax.device_put(images[i], batch), jax.device_put(labels[i], batch),
                        jax.random.key(i))
      losses_spmd.append(float(m['loss']))
    assert len(state.params['PointwiseConv2D_0']['kernel'].sharding.device_set) == 4
    out[f'spmd_dropout{dropout}'] = {
        'loss_diff': max(abs(a - b) for a, b in zip(losses_1, losses_spmd)),
        'param_diff': max_diff(params_1, state.params)}

    if dropout == 0.0:
      # pmap: each device gets a quarter of the batch; dropout off since per-device random
      # streams cannot reproduce one global mask.
      pstep = jax.pmap(
          lambda s, x, y, k: step(s, x, y, jax.random.wrap_key_data(k), axis_name='batch'),
          axis_name='batch')
      # The model's BatchNorm averages its statistics over the pmap axis, like the gradients.
      for form, fast in (('pmap', False), ('pmap_fast_forms', True)):
        state = jax.tree.map(lambda a: np.stack([np.asarray(a)] * 4),
                             fresh_state(dropout, batch_norm_axis='batch', fast=fast))
        losses_pmap = []
        for i in range(N_STEPS):
          key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(i)))] * 4)
          state, m = pstep(state, images[i].reshape(4, BATCH // 4, 32, 32, 3),
                           labels[i].reshape(4, BATCH // 4), key_data)
          losses_pmap.append(float(m['loss'][0]))
        params_pmap = jax.tree.map(lambda a: a[0], state.params)
        out[form] = {'loss_diff': max(abs(a - b) for a, b in zip(losses_1, losses_pmap)),
                     'param_diff': max_diff(params_1, params_pmap),
                     'replicas_agree': max_diff(jax.tree.map(lambda a: a[0], state.params),
                                                jax.tree.map(lambda a: a[3], state.params))}
    out[f'losses_dropout{dropout}'] = losses_1

  out['grouped_convs'] = {'plain': grouped_convs(fresh_state(0.0)),
                          'fast_forms': grouped_convs(fresh_state(0.0, fast=True))}

  config = get_testing_config()
  config.batch_size = 6
  try:
    experiment.validate_config(config)
    out['indivisible_batch_error'] = None
  except UserError as e:
    out['indivisible_batch_error'] = str(e)
  print('RESULT ' + json.dumps(out))


if __name__ == '__main__':
  main()
