"""config.compute_dtype: bfloat16 activations with float32 parameters, statistics and loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import experiment, models, optim, steps
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UserError

MEAN, STD = jnp.zeros(3), jnp.full(3, 255.0)


def _state_and_batch(model_name='tiny'):
  config = get_testing_config()
  config.model = model_name
  model = models.build_model(config, 10)
  tx = optim.create_optimizer(config, optim.create_schedule(config, 1))
  state = steps.create_train_state(model, jax.random.key(0), (16, 16, 3), tx)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (8,), dtype=np.int32))
  return model, state, images, labels


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def test_bfloat16_step_keeps_float32_state_and_computes_in_bfloat16():
  model, state, images, labels = _state_and_batch()
  step = functools.partial(steps.train_step, mean=MEAN, std=STD, compute_dtype='bfloat16')
  key = jax.random.key(1)
  new_state, metrics = jax.jit(step)(state, images, labels, key)
  assert _dtypes(new_state.params) == {'float32'}
  assert _dtypes(new_state.batch_stats) == {'float32'}
  assert _dtypes(new_state.opt_state) <= {'float32', 'int32'}
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(metrics['loss'])
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, new_state.params, state.params))

  # The network itself runs in bfloat16: its logits, and its matrix products' operands.
  x = steps.preprocess(images, MEAN, STD, jnp.bfloat16)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x)
  assert logits.dtype == jnp.bfloat16
  jaxpr = jax.make_jaxpr(step)(state, images, labels, key)
  products = [e for e in _all_eqns(jaxpr.jaxpr)
              if e.primitive.name in ('dot_general', 'conv_general_dilated')]
  assert products and all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      sub = getattr(param, 'jaxpr', param)
      if hasattr(sub, 'eqns'):
        yield from _all_eqns(sub)


def test_float32_step_computes_every_value_in_float32():
  _, state, images, labels = _state_and_batch()
  step = functools.partial(steps.train_step, mean=MEAN, std=STD, compute_dtype='float32')
  jaxpr = jax.make_jaxpr(step)(state, images, labels, jax.random.key(1))
  floats = {str(v.aval.dtype) for e in _all_eqns(jaxpr.jaxpr) for v in (*e.invars, *e.outvars)
            if hasattr(v, 'aval') and jnp.issubdtype(v.aval.dtype, jnp.floating)}
  assert floats == {'float32'}


def test_bfloat16_eval_matches_float32_closely():
  model, state, images, labels = _state_and_batch()
  mask = jnp.ones(8)
  f32 = steps.eval_step(state, images, labels, mask, mean=MEAN, std=STD)
  bf16 = steps.eval_step(state, images, labels, mask, mean=MEAN, std=STD,
                         compute_dtype='bfloat16')
  assert bf16.dtype == jnp.float32
  # eval_step really ran in bfloat16 (not the float32 network again) ...
  assert bf16[0] != f32[0]
  # ... and the summed loss matches the one of eval_step's own logits, computed in float32 from
  # the bfloat16 network's logits, which stay close to the float32 network's (8-bit mantissa).
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits32 = model.apply(variables, steps.preprocess(images, MEAN, STD))
  logits16 = model.apply(variables, steps.preprocess(images, MEAN, STD, jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(logits16, np.float32), logits32,
                             atol=0.02 * float(jnp.abs(logits32).max()))
  np.testing.assert_allclose(bf16[0], steps.cross_entropy_loss(logits16, labels).sum(),
                             rtol=1e-5)


def test_unknown_compute_dtype_is_a_user_error():
  config = get_testing_config()
  config.compute_dtype = 'float16'
  with pytest.raises(UserError, match='compute_dtype'):
    experiment.validate_config(config)
