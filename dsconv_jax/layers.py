"""Keras-equivalent layers in Flax Linen: depthwise, pointwise and separable convolutions and friends.

Every layer here subclasses `Layer`, takes `(x, train=False)` and is a row of the model summary
(`dsconv_jax.summary`). Defaults follow Keras, not Flax, because the source studies were written in
Keras and their parameter counts and training dynamics depend on them:

* padding 'valid' (Flax defaults to 'SAME'), with TensorFlow's 'same' (extra padding at the end);
* glorot-uniform kernels and zero biases (Flax: lecun-normal);
* BatchNorm momentum 0.99 and epsilon 1e-3 (Flax: epsilon 1e-5);
* depthwise kernels stored as (kh, kw, in_channels, depth_multiplier), Keras' layout, so that the
  glorot fans and the weights themselves are the same as in Keras.

How a layer computes (not what) is chosen by one `Options` value, a field of every layer and model
that has a choice to make, so that it is part of the module `jit` traces and never a global:

Depthwise convolution has two numerically equivalent implementations (`Options.depthwise`):
'grouped' is `lax.conv_general_dilated` with `feature_group_count=in_channels`; 'shifted' sums
kh*kw shifted, scaled copies of the input (at stride 1 with a hand-written gradient). Inside
Model 3's compiled CPU epoch the shifted form trains about 80x faster than the grouped one
(results/throughput-cpu-forms), while the grouped form keeps one fused convolution on
accelerators. Here 'auto' emits 'shifted' on CPU and 'grouped' elsewhere; training then puts
every model's depthwise convolutions, these layers' included, in the form timed faster on an
accelerator (`dsconv_jax.fast_forms`: on an H200 the shifted form trained DS-ResNet 1.26x faster
than grouped, results/gpu-h200-dsresnet-bench). `python -m dsconv_jax.throughput` times both
forms of a model on the device at hand (BENCHMARKS.md).

Pointwise convolution, tiled max pooling and the stride-1 shifted depthwise form use the
hand-written gradients of `dsconv_jax.fast_grads` (for speed on XLA's CPU backend), and dropout
draws its masks from a counter hash (`Options.dropout`); each is measured against the plain form in
BENCHMARKS.md; `dsconv_jax.fast_forms` gives the same forms to models written without these layers
(plain Flax). BatchNorm averages its statistics over `Options.batch_norm_axis` when set (only
needed under `jax.pmap`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsconv_jax.fast_grads import pointwise_conv, shifted_depthwise, tiled_max_pool

glorot_uniform = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros

DEPTHWISE_IMPLS = ('auto', 'grouped', 'shifted')
DROPOUT_IMPLS = ('hash', 'threefry')
# Activation names (Keras' spelling) -> functions: `Activation`'s choices.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu, 'relu6': nn.relu6, 'gelu': nn.gelu, 'silu': nn.silu, 'swish': nn.silu,
    'hard_swish': nn.hard_swish, 'tanh': jnp.tanh, 'sigmoid': nn.sigmoid, 'linear': lambda x: x,
    'softmax': nn.softmax,
}


def scale_width(width: int, multiplier: float) -> int:
  """A hidden width times a model's `width_multiplier`: rounded, at least 1.

  A model family that declares a `width_multiplier: float = 1.0` field and scales every hidden
  width (never `num_classes`) with this can be fitted to a parameter budget
  (`config.fit_params`, `dsconv_jax.budget`). Also `dsconv_jax.models.scale_width`; it lives
  here so that both the built-in models and `dsconv_jax.sequential` can use it.
  """
  return max(1, int(round(width * multiplier)))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _padding(padding: str) -> str:
  p = padding.upper()
  if p not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
  return p


class Layer(nn.Module):
  """Marker base class: each call of a `Layer` is one row of the model summary."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How layers compute, never what: every choice gives the same function of the parameters.

  A field (`options`) of each layer and model with such a choice, so it is part of the module that
  `jit` traces (hashable, compared by value). `dsconv_jax.models.build_model` sets it from the
  config for models that declare the field.

  depthwise: 'auto' (shifted on CPU, grouped elsewhere), 'grouped' or 'shifted'.

  dropout: 'hash' (counter-hash masks, fused into the step) or 'threefry' (`nn.Dropout`'s
    masks); the masks differ, their distribution does not.

  batch_norm_axis: the `jax.pmap` axis name over which BatchNorm averages its batch statistics in
    training; None under `jit` with a sharded batch, where XLA already computes them globally.
  """
  depthwise: str = 'auto'
  dropout: str = 'hash'
  batch_norm_axis: str | None = None

  def __post_init__(self):
    if self.depthwise not in DEPTHWISE_IMPLS:
      raise ValueError(f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {self.depthwise!r}')
    if self.dropout not in DROPOUT_IMPLS:
      raise ValueError(f'dropout_impl must be one of {DROPOUT_IMPLS}, got {self.dropout!r}')


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
  if padding == 'SAME':
    pads = (_same_padding(x.shape[1], kh, strides[0], dilation[0]),
            _same_padding(x.shape[2], kw, strides[1], dilation[1]))
  else:
    pads = ((0, 0), (0, 0))
  return shifted_depthwise(x, kernel.reshape(kh, kw, c * m), strides, pads, dilation)


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
  kernel_init: Callable[..., Any] = glorot_uniform
  bias_init: Callable[..., Any] = zeros
  options: Options = Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kh, kw = _pair(self.kernel_size)
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (kh, kw, c, self.depth_multiplier))
    y = depthwise_conv(x, kernel.astype(x.dtype), strides=_pair(self.strides),
                       padding=_padding(self.padding), dilation=_pair(self.dilation),
                       impl=self.options.depthwise)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (c * self.depth_multiplier,)).astype(y.dtype)
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
  kernel_init: Callable[..., Any] = glorot_uniform  # Of the (1, 1, C, F) kernel.
  bias_init: Callable[..., Any] = zeros

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
    y = pointwise_conv(x, kernel[0, 0].astype(x.dtype))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,)).astype(y.dtype)
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
  options: Options = Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    kh, kw = _pair(self.kernel_size)
    dw_kernel = self.param('depthwise_kernel', glorot_uniform, (kh, kw, c, self.depth_multiplier))
    y = depthwise_conv(x, dw_kernel.astype(x.dtype), strides=_pair(self.strides),
                       padding=_padding(self.padding), dilation=_pair(self.dilation),
                       impl=self.options.depthwise)
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


class BatchNorm(Layer):
  """Keras `BatchNormalization` (momentum 0.99, epsilon 1e-3).

  4 * C parameters: scale and bias are trainable ('params'); the moving mean and variance are not
  ('batch_stats'), and Keras counts them as non-trainable parameters.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  options: Options = Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                        epsilon=self.epsilon, dtype=x.dtype, param_dtype=jnp.float32,
                        axis_name=self.options.batch_norm_axis if train else None, name='bn')(x)


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

  Masks come from `hash_keep_mask` (the default, `Options(dropout='hash')`) or, with
  `Options(dropout='threefry')`, from Flax's `nn.Dropout` (`jax.random.bernoulli`), which draws
  exactly what this project drew before the hash existed. The hash is the default because
  Threefry masks were about half of Model 3's CPU step (BENCHMARKS.md).
  """
  rate: float
  options: Options = Options()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.options.dropout == 'threefry':
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
    if self.function not in ACTIVATIONS:
      raise ValueError(f'unknown activation {self.function!r}; known: {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[self.function](x)


def _pool_window(pool_size, strides) -> tuple[tuple[int, int], tuple[int, int]]:
  """Keras pooling's (window, strides): strides default to the pool size."""
  window = _pair(pool_size)
  return window, window if strides is None else _pair(strides)


class MaxPool2D(Layer):
  """Keras `MaxPooling2D` (strides default to the pool size, padding 'valid')."""
  pool_size: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  padding: str = 'valid'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    window, strides = _pool_window(self.pool_size, self.strides)
    padding = _padding(self.padding)
    if strides == window and padding == 'VALID':
      return tiled_max_pool(x, window)
    return nn.max_pool(x, window, strides, padding=padding)


class AvgPool2D(Layer):
  """Keras `AveragePooling2D` (strides default to the pool size, padding 'valid').

  With padding 'same' the padded pixels are left out of each average, as in Keras (TensorFlow's
  `avg_pool`), not counted as zeros.
  """
  pool_size: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  padding: str = 'valid'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    window, strides = _pool_window(self.pool_size, self.strides)
    return nn.avg_pool(x, window, strides, padding=_padding(self.padding), count_include_pad=False)


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


def dirac_init(params: Any, convolutions: Sequence[Any]) -> Any:
  """Identity (Dirac) initialisation of the convolutions, airbench's form for separable layers.

  airbench overwrites the first C_in filters of each C_in -> C_out convolution with the
  identity, so that every layer starts by passing its input through (plus random filters for
  the rest). `convolutions` says which parameters are kernels and how each convolution uses its
  own (`dsconv_jax.analysis.parameter_structure(...).convolutions`: groups, channels, and the
  kernel in (kh, kw, C_in / groups, C_out) layout and back), so that a kernel is found by what it
  computes, whatever its name. In that layout:

  * depthwise (one input channel per group, any depth multiplier): every filter of the first
    half of the channels is the centre tap, the rest keep their random initialisation;
  * otherwise, in each group, when it widens (C_out >= C_in per group, pointwise or full), its
    first C_in filters are the centre-tap identity; narrowing convolutions (C_out < C_in, such as
    the classes layer) keep their random initialisation.

  Kernels reached through computations other than views (reshapes, casts) are left alone.
  """
  new = {}
  for conv in convolutions:
    if conv.path is None or conv.to_hwio is None or len(conv.kernel_size) != 2:
      continue
    kernel = params
    for key in conv.path:
      kernel = kernel[key]
    w = conv.to_hwio(kernel)
    kh, kw, per_group, c_out = w.shape
    delta = jnp.zeros((kh, kw), w.dtype).at[kh // 2, kw // 2].set(1)
    out_per_group = c_out // conv.groups
    if conv.groups > 1 and per_group == 1:
      w = w.at[:, :, 0, :(conv.in_channels // 2) * out_per_group].set(delta[:, :, None])
    elif out_per_group >= per_group:
      identity = delta[:, :, None, None] * jnp.eye(per_group, dtype=w.dtype)[None, None]
      for g in range(conv.groups):
        start = g * out_per_group
        w = w.at[:, :, :, start:start + per_group].set(identity)
    else:
      continue
    new.setdefault(tuple(conv.path), conv.from_hwio(w).astype(kernel.dtype))

  def init(path, p):
    return new.get(tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path), p)

  return jax.tree_util.tree_map_with_path(init, params)
