"""Keras-equivalent layers in Flax Linen: depthwise, pointwise and separable convolutions and friends.

Every layer here subclasses `Layer`, takes `(x, train=False)` and is a row of the model summary
(`dsconv_jax.summary`). Defaults follow Keras, not Flax, because the source studies were written in
Keras and their parameter counts and training dynamics depend on them:

* padding 'valid' (Flax defaults to 'SAME'), with TensorFlow's 'same' (extra padding at the end);
* glorot-uniform kernels and zero biases (Flax: lecun-normal);
* BatchNorm momentum 0.99 and epsilon 1e-3 (Flax: epsilon 1e-5);
* depthwise kernels stored as (kh, kw, in_channels, depth_multiplier), Keras' layout, so that the
  glorot fans and the weights themselves are the same as in Keras.

Depthwise convolution has two numerically equivalent implementations (`impl`):
'grouped' is `lax.conv_general_dilated` with `feature_group_count=in_channels`; 'shifted' sums
kh*kw shifted, scaled copies of the input (at stride 1 with a hand-written gradient). Inside
Model 3's compiled CPU epoch the shifted form trains about 80x faster than the grouped one
(results/throughput-cpu-forms), while the grouped form keeps one fused convolution on
accelerators. 'auto' picks 'shifted' on CPU and 'grouped' elsewhere (GPU and TPU: still to be
measured).

Several layers carry a `jax.custom_vjp` for speed on XLA's CPU backend (pointwise convolution,
tiled max pooling, the stride-1 shifted depthwise form) and dropout draws its masks from a counter
hash; each is measured against the plain form in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

glorot_uniform = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros

DEPTHWISE_IMPLS = ('auto', 'grouped', 'shifted')
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu, 'relu6': nn.relu6, 'gelu': nn.gelu, 'silu': nn.silu, 'swish': nn.silu,
    'hard_swish': nn.hard_swish, 'tanh': jnp.tanh, 'sigmoid': nn.sigmoid, 'linear': lambda x: x,
    'softmax': nn.softmax,
}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _padding(padding: str) -> str:
  p = padding.upper()
  if p not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
  return p


class Layer(nn.Module):
  """Marker base class: each call of a `Layer` is one row of the model summary."""


def resolve_depthwise_impl(impl: str) -> str:
  """Maps 'auto' to the faster implementation for the default JAX backend."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  return impl


def _same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding: the odd pixel goes at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, strides=(1, 1), padding='VALID',
                   dilation=(1, 1), impl='grouped') -> jax.Array:
  """Depthwise convolution of NHWC `x` with a Keras-layout kernel (kh, kw, C, multiplier).

  Output channel `c * multiplier + j` is input channel `c` convolved with `kernel[..., c, j]`,
  as in Keras and as in XLA's grouped convolution.
  """
  kh, kw, c, m = kernel.shape
  impl = resolve_depthwise_impl(impl)
  if impl == 'grouped':
    return jax.lax.conv_general_dilated(
        x, kernel.reshape(kh, kw, 1, c * m), window_strides=strides, padding=padding,
        rhs_dilation=dilation, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=c)
  # Shifted multiply-adds: the same sums, as kh*kw strided slices of the padded input.
  sh, sw = strides
  dh, dw = dilation
  if padding == 'SAME':
    ph, pw = _same_padding(x.shape[1], kh, sh, dh), _same_padding(x.shape[2], kw, sw, dw)
    x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  out_h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
  out_w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
  if m > 1:
    x = jnp.repeat(x, m, axis=-1)
  k = kernel.reshape(kh, kw, c * m).astype(x.dtype)
  if strides == (1, 1):
    return _shifted_taps(x, k, (dh, dw))
  return _shifted_taps_strided(x, k, (sh, sw), (dh, dw), (out_h, out_w))


def _shifted_taps_strided(x, k, strides, dilation, out_size):
  """sum over taps (i, j) of the strided window of padded `x` at (i * dh, j * dw), times k[i, j]."""
  (sh, sw), (dh, dw), (out_h, out_w) = strides, dilation, out_size
  out = None
  for i in range(k.shape[0]):
    for j in range(k.shape[1]):
      patch = jax.lax.slice(
          x, (0, i * dh, j * dw, 0),
          (x.shape[0], i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, x.shape[3]),
          (1, sh, sw, 1))
      term = patch * k[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_taps(x, k, dilation):
  """The shifted depthwise form at stride 1, on the padded input, with a hand-written gradient.

  Autodiff of the slices gives one padded full-size tensor per tap for the input gradient, and
  XLA's CPU backend then recomputes the producers of `x` (BatchNorm, dropout) inside each.
  Written by hand, the input gradient is the same shifted form again (the padded output gradient
  against the flipped kernel) and the kernel gradient one reduction per tap.
  """
  kh, kw = k.shape[:2]
  dh, dw = dilation
  out_size = (x.shape[1] - (kh - 1) * dh, x.shape[2] - (kw - 1) * dw)
  return _shifted_taps_strided(x, k, (1, 1), dilation, out_size)


def _shifted_taps_fwd(x, k, dilation):
  return _shifted_taps(x, k, dilation), (x, k)


def _shifted_taps_bwd(dilation, residuals, dy):
  x, k = residuals
  kh, kw = k.shape[:2]
  dh, dw = dilation
  # dx[h] = sum_i dy[h - i * dh] k[i]: the output gradient padded by (k - 1) * d on both sides,
  # correlated with the flipped kernel.
  ph, pw = (kh - 1) * dh, (kw - 1) * dw
  dy_padded = jnp.pad(dy, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  dx = _shifted_taps_strided(dy_padded, k[::-1, ::-1], (1, 1), dilation, x.shape[1:3])
  oh, ow = dy.shape[1:3]
  dk = jnp.stack([
      jnp.stack([jnp.sum(x[:, i * dh:i * dh + oh, j * dw:j * dw + ow] * dy, axis=(0, 1, 2),
                         dtype=jnp.float32) for j in range(kw)]) for i in range(kh)])
  return dx, dk.astype(k.dtype)


_shifted_taps.defvjp(_shifted_taps_fwd, _shifted_taps_bwd)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 convolution of NHWC `x` with a (C, F) kernel.

  The gradient is written by hand as two (N*H*W, C)-shaped matrix products. With the einsum's own
  gradient, XLA's CPU backend computed the kernel gradient from a transposed copy of the output
  gradient, fused with everything that produces it (BatchNorm, ReLU and dropout backward): most of
  Model 3's CPU step (BENCHMARKS.md). The forward pass stays one einsum, which is what
  `dsconv_jax.analysis` reads.
  """
  return jnp.einsum('nhwc,cf->nhwf', x, kernel)


def _pointwise_conv_fwd(x, kernel):
  return pointwise_conv(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals, dy):
  x, kernel = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dkernel = jnp.matmul(x2.T, dy2, preferred_element_type=jnp.float32).astype(kernel.dtype)
  return (dy2 @ kernel.T).reshape(x.shape), dkernel


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


class DepthwiseConv2D(Layer):
  """Keras `DepthwiseConv2D`: one kh x kw filter per input channel (times `depth_multiplier`).

  Parameters: kh * kw * C * depth_multiplier (+ C * depth_multiplier with `use_bias`).
  """
  kernel_size: int | Sequence[int] = 3
  depth_multiplier: int = 1
  strides: int | Sequence[int] = 1
  padding: str = 'valid'
  dilation: int | Sequence[int] = 1
  use_bias: bool = True
  impl: str = 'auto'
  kernel_init: Callable[..., Any] = glorot_uniform

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kh, kw = _pair(self.kernel_size)
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (kh, kw, c, self.depth_multiplier))
    y = depthwise_conv(x, kernel.astype(x.dtype), strides=_pair(self.strides),
                       padding=_padding(self.padding), dilation=_pair(self.dilation),
                       impl=self.impl)
    if self.use_bias:
      y = y + self.param('bias', zeros, (c * self.depth_multiplier,)).astype(y.dtype)
    return y


class Conv2D(Layer):
  """Keras `Conv2D` (a full convolution across channels): kh * kw * C * F (+ F) parameters."""
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: str = 'valid'
  dilation: int | Sequence[int] = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                   padding=_padding(self.padding), kernel_dilation=_pair(self.dilation),
                   use_bias=self.use_bias, kernel_init=glorot_uniform, bias_init=zeros,
                   dtype=x.dtype, name='conv')(x)


class PointwiseConv2D(Layer):
  """A 1x1 convolution mixing channels: C * F (+ F) parameters."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kernel = self.param('kernel', glorot_uniform, (1, 1, x.shape[-1], self.features))
    y = pointwise_conv(x, kernel[0, 0].astype(x.dtype))
    if self.use_bias:
      y = y + self.param('bias', zeros, (self.features,)).astype(y.dtype)
    return y


class SeparableConv2D(Layer):
  """Keras `SeparableConv2D`: depthwise kh x kw (times `depth_multiplier`), then pointwise 1x1.

  Parameters: kh * kw * C * m + C * m * F (+ F with `use_bias`; Keras puts the single bias on the
  pointwise part).
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  depth_multiplier: int = 1
  strides: int | Sequence[int] = 1
  padding: str = 'valid'
  dilation: int | Sequence[int] = 1
  use_bias: bool = True
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    kh, kw = _pair(self.kernel_size)
    dw_kernel = self.param('depthwise_kernel', glorot_uniform, (kh, kw, c, self.depth_multiplier))
    y = depthwise_conv(x, dw_kernel.astype(x.dtype), strides=_pair(self.strides),
                       padding=_padding(self.padding), dilation=_pair(self.dilation),
                       impl=self.impl)
    pw_kernel = self.param('pointwise_kernel', glorot_uniform,
                           (1, 1, c * self.depth_multiplier, self.features))
    y = pointwise_conv(y, pw_kernel[0, 0].astype(y.dtype))
    if self.use_bias:
      y = y + self.param('bias', zeros, (self.features,)).astype(y.dtype)
    return y


class Dense(Layer):
  """Keras `Dense` on the last axis: C * F (+ F) parameters."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.Dense(self.features, use_bias=self.use_bias, kernel_init=glorot_uniform,
                    bias_init=zeros, dtype=x.dtype, name='dense')(x)


_BATCH_NORM_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'batch_norm_axis', default=None)


@contextlib.contextmanager
def batch_norm_axis(axis_name: str | None) -> Iterator[None]:
  """Within this context (at trace time), BatchNorm averages its statistics over `axis_name`.

  Only needed under `jax.pmap`/`shard_map`, where each device sees its slice of the batch; under
  jit with a sharded batch (the default path) XLA already computes global-batch statistics.
  A context rather than a model field keeps every model's definition free of parallelism.
  """
  token = _BATCH_NORM_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BATCH_NORM_AXIS.reset(token)


class BatchNorm(Layer):
  """Keras `BatchNormalization` (momentum 0.99, epsilon 1e-3).

  4 * C parameters: scale and bias are trainable ('params'); the moving mean and variance are not
  ('batch_stats'), and Keras counts them as non-trainable parameters.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        epsilon=self.epsilon, dtype=x.dtype, param_dtype=jnp.float32,
                        axis_name=_BATCH_NORM_AXIS.get() if train else None, name='bn')(x)


DROPOUT_IMPLS = ('hash', 'threefry')
_DROPOUT_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar('dropout_impl',
                                                                   default='hash')


@contextlib.contextmanager
def dropout_impl(impl: str) -> Iterator[None]:
  """Within this context (at trace time), Dropout draws its masks with `impl` (DROPOUT_IMPLS)."""
  if impl not in DROPOUT_IMPLS:
    raise ValueError(f'dropout_impl must be one of {DROPOUT_IMPLS}, got {impl!r}')
  token = _DROPOUT_IMPL.set(impl)
  try:
    yield
  finally:
    _DROPOUT_IMPL.reset(token)


def _hash32(v: jax.Array) -> jax.Array:
  """Wellons' 'lowbias32' integer hash: a bijection of uint32 with full avalanche."""
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x7FEB352D)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)


def hash_keep_mask(key: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """A boolean mask, True with probability 1 - rate, from a counter hash seeded by `key`.

  Each element's flat index is hashed twice with two 32-bit words drawn from `key`. Compared with
  `jax.random.bernoulli` (one Threefry-2x32 block, 20 rounds, per element) this is a handful of
  integer operations that XLA fuses into the consumer of the mask, and it is cheap enough that the
  backward pass recomputes it instead of storing it. Deterministic for a given key and shape, and
  independent of how the batch is sharded (the index is the element's global position).
  """
  if rate <= 0:
    return jnp.ones(shape, bool)
  size = 1
  for d in shape:
    size *= d
  if size >= 2**32:  # The 32-bit counter would repeat: use the standard generator.
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  bits = _hash32(_hash32(index ^ seed[0]) ^ seed[1])
  # P(bits >= t) = 1 - t / 2**32, exact to 2**-32.
  threshold = min(round(rate * 2**32), 2**32 - 1)
  return bits >= jnp.uint32(threshold)


class Dropout(Layer):
  """Keras `Dropout`: active only in training, with the 'dropout' rng.

  Masks come from `hash_keep_mask` (the default, `dropout_impl('hash')`) or, under
  `dropout_impl('threefry')`, from Flax's `nn.Dropout` (`jax.random.bernoulli`), which draws
  exactly what this project drew before the hash existed. The hash is the default because
  Threefry masks were about half of Model 3's CPU step (BENCHMARKS.md).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if _DROPOUT_IMPL.get() == 'threefry':
      return nn.Dropout(self.rate, deterministic=not train)(x)
    if not train or self.rate == 0:
      return x
    if self.rate >= 1:
      return jnp.zeros_like(x)
    keep = hash_keep_mask(self.make_rng('dropout'), self.rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


class Activation(Layer):
  """Keras `Activation` by name ('relu', 'relu6', 'gelu', 'silu', 'hard_swish', 'softmax', ...)."""
  function: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.function not in _ACTIVATIONS:
      raise ValueError(f'unknown activation {self.function!r}; known: {sorted(_ACTIVATIONS)}')
    return _ACTIVATIONS[self.function](x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """Max pooling of NHWC `x` over non-overlapping `window`s ('valid' padding).

  Same values and gradient as `nn.max_pool` (the gradient goes to the first maximum of each
  window in row-major order, like XLA's select-and-scatter and TensorFlow). Computed through a
  reshape instead: XLA's CPU backend expands select-and-scatter into four index arrays, a
  variadic reduce-window and a scatter, about 15% of Model 3's CPU step (BENCHMARKS.md), where
  this is a few fused elementwise operations and a reduction.
  """
  return nn.max_pool(x, window, window, padding='VALID')


def _windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """(N, H, W, C) -> (N, H // ph, ph, W // pw, pw, C), dropping the rows and columns left over."""
  n, h, w, c = x.shape
  (ph, pw), (oh, ow) = window, (h // window[0], w // window[1])
  return x[:, :oh * ph, :ow * pw].reshape(n, oh, ph, ow, pw, c)


def _window_positions(shape, window):
  """Each element's row-major position inside its window, for `_windows`-shaped arrays."""
  dtype = jnp.int8 if window[0] * window[1] < 127 else jnp.int32
  return (jax.lax.broadcasted_iota(dtype, shape, 2) * dtype(window[1])
          + jax.lax.broadcasted_iota(dtype, shape, 4))


def _tiled_max_pool_fwd(x, window):
  xw = _windows(x, window)
  y = xw.max(axis=(2, 4))
  # The first maximum's position is kept (one byte per output) rather than `x`: recomputing
  # it in the backward pass from `x` also recomputed everything fused into `x`.
  position = _window_positions(xw.shape, window)
  first = jnp.min(jnp.where(xw == y[:, :, None, :, None], position, jnp.iinfo(position.dtype).max),
                  axis=(2, 4))
  return y, (first, x.shape)


def _tiled_max_pool_bwd(window, residuals, dy):
  first, (n, h, w, c) = residuals
  ph, pw = window
  oh, ow = dy.shape[1:3]
  position = _window_positions((n, oh, ph, ow, pw, c), window)
  dxw = jnp.where(position == first[:, :, None, :, None], dy[:, :, None, :, None],
                  jnp.zeros((), dy.dtype))
  dx = dxw.reshape(n, oh * ph, ow * pw, c)
  return (jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0))),)


tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


class MaxPool2D(Layer):
  """Keras `MaxPooling2D` (strides default to the pool size, padding 'valid')."""
  pool_size: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  padding: str = 'valid'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    window = _pair(self.pool_size)
    strides = window if self.strides is None else _pair(self.strides)
    padding = _padding(self.padding)
    if strides == window and padding == 'VALID':
      return tiled_max_pool(x, window)
    return nn.max_pool(x, window, strides, padding=padding)


class GlobalAvgPool(Layer):
  """Keras `GlobalAveragePooling2D`: mean over height and width."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


class Flatten(Layer):
  """Keras `Flatten`: (N, H, W, C) -> (N, H * W * C)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return x.reshape(x.shape[0], -1)
