"""Layers: parameter counts and output shapes against the Keras formulas; depthwise forms agree."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import fast_grads, layers


def _init(module, shape):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = module.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)
  return variables, module.apply(variables, x)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('k,m,c,padding,stride,use_bias', [
    (3, 1, 8, 'valid', 1, False), (3, 2, 5, 'same', 1, True), (5, 1, 4, 'same', 2, False),
    ((3, 1), 3, 2, 'valid', 1, True)])
def test_depthwise_params_and_shape(k, m, c, padding, stride, use_bias):
  kh, kw = (k, k) if isinstance(k, int) else k
  module = layers.DepthwiseConv2D(k, depth_multiplier=m, padding=padding, strides=stride,
                                  use_bias=use_bias)
  variables, y = _init(module, (2, 11, 11, c))
  # Keras: kh * kw * C * m weights (+ C * m biases).
  assert _count(variables) == kh * kw * c * m + (c * m if use_bias else 0)
  if padding == 'same':
    assert y.shape == (2, -(-11 // stride), -(-11 // stride), c * m)
  else:
    assert y.shape == (2, (11 - kh) // stride + 1, (11 - kw) // stride + 1, c * m)


@pytest.mark.parametrize('c,f,use_bias', [(3, 32, False), (16, 10, True)])
def test_pointwise_params(c, f, use_bias):
  variables, y = _init(layers.PointwiseConv2D(f, use_bias=use_bias), (2, 5, 5, c))
  assert _count(variables) == c * f + (f if use_bias else 0)
  assert y.shape == (2, 5, 5, f)


@pytest.mark.parametrize('c,f,m,use_bias,padding', [(3, 32, 1, False, 'same'),
                                                     (32, 48, 1, False, 'same'),
                                                     (8, 16, 2, True, 'valid')])
def test_separable_params_match_keras_formula(c, f, m, use_bias, padding):
  variables, y = _init(layers.SeparableConv2D(f, 3, depth_multiplier=m, use_bias=use_bias,
                                              padding=padding), (2, 9, 9, c))
  # Keras SeparableConv2D: kh*kw*Cin*m + Cin*m*F (+F); source 001's first layer: 27 + 96 = 123.
  assert _count(variables) == 9 * c * m + c * m * f + (f if use_bias else 0)
  assert y.shape == (2, 9, 9, f) if padding == 'same' else (2, 7, 7, f)


def test_separable_first_layer_of_source_001_has_123_params():
  variables, _ = _init(layers.SeparableConv2D(32, 3, padding='same', use_bias=False),
                       (1, 32, 32, 3))
  assert _count(variables) == 123


def test_conv_dense_batchnorm_params():
  v, y = _init(layers.Conv2D(48, 3, padding='same'), (1, 32, 32, 3))
  assert _count(v) == 3 * 3 * 3 * 48 + 48 and y.shape == (1, 32, 32, 48)
  v, y = _init(layers.Dense(512), (1, 768))
  assert _count(v) == 768 * 512 + 512
  v, _ = _init(layers.BatchNorm(), (2, 4, 4, 32))
  assert _count(v['params']) == 64 and _count(v['batch_stats']) == 64


def test_batchnorm_uses_keras_epsilon_and_momentum():
  bn = layers.BatchNorm()
  x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (64, 2, 2, 4)), jnp.float32)
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, train=True, mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / jnp.sqrt(var + 1e-3), atol=1e-4)
  np.testing.assert_allclose(upd['batch_stats']['bn']['mean'], 0.01 * mean, rtol=1e-4)


# 'valid' at strides 2 and 3 leaves rows and columns of the 10x9 input that no window reads.
@pytest.mark.parametrize('padding,stride,m,dilation', [('valid', 1, 1, 1), ('same', 1, 2, 1),
                                                       ('same', 2, 1, 1), ('valid', 1, 1, 2),
                                                       ('same', 2, 3, 1), ('valid', 2, 2, 1),
                                                       ('valid', 3, 1, 2)])
def test_depthwise_forms_agree_forward_and_gradient(padding, stride, m, dilation):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 10, 9, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, m)), jnp.float32)

  def f(impl):
    fn = lambda x, k: layers.depthwise_conv(x, k, strides=(stride, stride),
                                            padding=padding.upper(),
                                            dilation=(dilation, dilation), impl=impl)
    y = fn(x, kernel)
    loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k)))
    return y, jax.grad(loss, argnums=(0, 1))(x, kernel)

  y_g, (gx_g, gk_g) = f('grouped')
  y_s, (gx_s, gk_s) = f('shifted')
  assert y_g.shape == y_s.shape
  np.testing.assert_allclose(y_s, y_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_s, gx_g, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gk_s, gk_g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('batch,chunk,stride', [(6, 2, 1), (5, 1, 2)])
def test_depthwise_kernel_gradient_sums_cache_sized_chunks_of_the_batch(monkeypatch, batch, chunk,
                                                                        stride):
  """On the CPU the kernel gradient is summed a chunk of the batch at a time (the largest divisor
  of the batch under the byte budget); the sums equal the grouped convolution's gradient."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(batch, 8, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(5, 5, 3, 1)), jnp.float32)
  padded_image_bytes = 16 * 16 * 3 * 4  # 'SAME' at dilation 2 pads 8x8 to at least 15x15.
  monkeypatch.setattr(fast_grads, '_CHUNK_BYTES', 2 * padded_image_bytes + 1)
  seen = []
  per_tap = fast_grads._taps_kernel_grad
  monkeypatch.setattr(fast_grads, '_taps_kernel_grad',
                      lambda x, *a, **k: seen.append(x.shape[0]) or per_tap(x, *a, **k))

  def grads(impl):
    fn = lambda x, k: layers.depthwise_conv(x, k, strides=(stride, stride), padding='SAME',
                                            dilation=(2, 2), impl=impl)
    return jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), argnums=(0, 1))(x, kernel)

  gx_s, gk_s = grads('shifted')
  assert chunk in seen  # The loop's body, traced on chunks of `chunk` images.
  gx_g, gk_g = grads('grouped')
  np.testing.assert_allclose(gx_s, gx_g, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gk_s, gk_g, rtol=1e-4, atol=1e-4)


SHARDED_KERNEL_GRAD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dsconv_jax import fast_grads
mesh = Mesh(np.array(jax.devices()), ('batch',))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 10, 10, 5)).astype(np.float32)
dy = rng.normal(size=(16, 8, 8, 5)).astype(np.float32)
fast_grads._CHUNK_BYTES = 2 * x[0].nbytes  # Two images a device a chunk: two chunks.
args = [jax.device_put(a, NamedSharding(mesh, P('batch'))) for a in (x, dy)]
grad = jax.jit(lambda x, dy: fast_grads._taps_kernel_grad_blocked(x, dy, (3, 3), (1, 1), (1, 1)))
hlo = grad.lower(*args).compile().as_text()
assert 'all-gather' not in hlo, 'the batch is gathered onto every device'
np.testing.assert_allclose(grad(*args), fast_grads._taps_kernel_grad(x, dy, (3, 3), (1, 1), (1, 1)), rtol=1e-5, atol=1e-4)
"""


def test_depthwise_kernel_gradient_chunks_keep_a_sharded_batch_on_its_devices():
  """Under jit with the batch split across devices, every chunk takes images from each device's
  block: no device gathers the batch, and the sums are the unchunked ones."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': root}
  done = subprocess.run([sys.executable, '-c', SHARDED_KERNEL_GRAD], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]


def test_depthwise_matches_direct_formula():
  """out[y, x, c*m + j] = sum_{dy,dx} in[y+dy, x+dx, c] * k[dy, dx, c, j] (Keras semantics)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 5, 2)).astype(np.float32)
  k = rng.normal(size=(3, 3, 2, 2)).astype(np.float32)
  expected = np.zeros((1, 3, 3, 4), np.float32)
  for yy in range(3):
    for xx in range(3):
      for c in range(2):
        for j in range(2):
          expected[0, yy, xx, c * 2 + j] = np.sum(x[0, yy:yy + 3, xx:xx + 3, c] * k[:, :, c, j])
  for impl in ('grouped', 'shifted'):
    np.testing.assert_allclose(layers.depthwise_conv(jnp.asarray(x), jnp.asarray(k), impl=impl),
                               expected, rtol=1e-5, atol=1e-5)


def test_unknown_depthwise_impl_is_rejected():
  with pytest.raises(ValueError, match='depthwise_impl'):
    layers.resolve_depthwise_impl('fft')


def test_hash_dropout_mask_rate_determinism_and_independence():
  key = jax.random.key(3)
  shape = (64, 32, 32, 16)
  mask = np.asarray(layers.hash_keep_mask(key, 0.25, shape))
  assert mask.dtype == bool and mask.shape == shape
  assert abs(mask.mean() - 0.75) < 0.003  # 1M draws: the standard error is 0.0004.
  np.testing.assert_array_equal(mask, layers.hash_keep_mask(key, 0.25, shape))
  other = np.asarray(layers.hash_keep_mask(jax.random.fold_in(key, 1), 0.25, shape))
  assert (mask != other).any()
  # Independent streams: both keep with probability 0.75 ** 2.
  assert abs((mask & other).mean() - 0.5625) < 0.003
  # Neighbours within one mask are not correlated either (rows, columns, channels).
  for axis in (1, 2, 3):
    a, b = np.moveaxis(mask, axis, 0)[:-1], np.moveaxis(mask, axis, 0)[1:]
    assert abs((a & b).mean() - 0.5625) < 0.003, axis
  assert layers.hash_keep_mask(key, 0.0, (3,)).all()


def test_dropout_impls_scale_kept_units_and_threefry_is_flax_dropout():
  x = jnp.ones((4, 8, 8, 16))
  rngs = {'dropout': jax.random.key(7)}
  for impl in layers.DROPOUT_IMPLS:
    dropout = layers.Dropout(0.2, options=layers.Options(dropout=impl))
    y = dropout.apply({}, x, train=True, rngs=rngs)
    assert (dropout.apply({}, x, train=False) == x).all()
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.8, rtol=1e-6)
    assert 0.7 < kept.mean() < 0.9, impl
  # 'threefry' draws what Flax's nn.Dropout draws (the masks of runs before 'hash' existed).
  y = layers.Dropout(0.2, options=layers.Options(dropout='threefry')).apply({}, x, train=True,
                                                                           rngs=rngs)


  class FlaxDropoutInside(nn.Module):  # Same module path, so the same rng.

    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.2, deterministic=False, name='Dropout_0')(x)

  np.testing.assert_array_equal(y, FlaxDropoutInside().apply({}, x, rngs=rngs))
  with pytest.raises(ValueError, match='dropout_impl'):
    layers.Options(dropout='philox')


def test_tiled_max_pool_gradient_survives_its_input_computed_again_in_another_fusion():
  # After ReLU and a normalisation XLA computes the pooled map inside each fusion that reads it;
  # unoptimised CPU code computes it differently in two of them. Each window's gradient must
  # still reach one of its elements: the unoptimised step's gradients equal the optimised one's.
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(8, 16, 16, 6)), jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=(6,)), jnp.float32) for _ in range(2))

  def loss(z, scale, bias):
    x = jax.nn.relu(z)
    x = (x - x.mean((0, 1, 2))) * jax.lax.rsqrt(x.var((0, 1, 2)) + 1e-3) * scale + bias
    return jnp.sum(fast_grads.tiled_max_pool(x, (2, 2)) ** 3)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(z, scale, bias)
  optimised = lowered.compile()(z, scale, bias)
  unoptimised = lowered.compile(
      compiler_options={'xla_backend_optimization_level': 0})(z, scale, bias)
  for a, b in zip(optimised, unoptimised):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_tiled_max_pool_and_pointwise_conv_match_their_reference_gradients():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 3)), jnp.float32)
  x = x.at[0, 0, 1, 0].set(5.0).at[0, 1, 0, 0].set(5.0)  # A tie: the first maximum gets it all.
  pool = lambda f: jax.value_and_grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
  (v1, g1), (v2, g2) = (pool(lambda x: fast_grads.tiled_max_pool(x, (2, 2))),
                        pool(lambda x: nn.max_pool(x, (2, 2), (2, 2), padding='VALID')))
  assert v1 == v2
  np.testing.assert_array_equal(g1, g2)
  k = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  conv = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
  for a, b in zip(conv(fast_grads.pointwise_conv),
                  conv(lambda x, k: jnp.einsum('nhwc,cf->nhwf', x, k))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
