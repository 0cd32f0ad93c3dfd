"""Hand-written gradients that make XLA's CPU backend fast; forward values equal the plain forms.

Each function here has the values of a plain JAX expression and a `jax.custom_vjp` whose backward
pass XLA's CPU backend compiles into far less work than autodiff of that expression. Each one's
reason, measured on Model 3's compiled CPU step (results/throughput-cpu-ablation, BENCHMARKS.md):

* `shifted_taps`: autodiff of the shifted depthwise form made one padded full-size tensor per tap
  and recomputed BatchNorm and dropout inside each (undoing it: 384 -> 322 img/s). On the CPU
  its kernel gradient is summed a cache-sized chunk of the batch at a time; one pass over the
  batch per tap, with autodiff at stride 2, was 1.21x slower for configs/dsresnet.py and 1.41x
  for its 5x5-kernel form (results/throughput-cpu-dw-kernel-grad).
* `pointwise_conv`: autodiff computed the kernel gradient from a transposed copy of the output
  gradient fused with its producers (undoing it: 384 -> 198 img/s).
* `tiled_max_pool`: XLA's select-and-scatter became index arrays, a variadic reduce-window and a
  scatter (undoing it: 384 -> 336 img/s).

tests/test_layers.py checks every gradient here against autodiff of the plain form.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _accumulation(dtype) -> jnp.dtype:
  """Kernel gradients sum over the batch and the map in at least float32 (bfloat16 activations),
  and in float64 when the activations are (x64 runs must not round to float32 here)."""
  return jnp.promote_types(dtype, jnp.float32)


def shifted_taps_strided(x, k, strides, dilation, out_size):
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


def shifted_depthwise(x, k, strides, padding, dilation):
  """Depthwise convolution of NHWC `x` (C channels) with a (kh, kw, C * m) kernel, as shifted
  multiply-adds: output channel `c * m + j` is input channel `c` against `k[..., c * m + j]`, as in
  XLA's grouped convolution with `feature_group_count=C`. `padding` is ((top, bottom), (left,
  right)) of zeros; the gradient is `shifted_taps`' hand-written one.
  """
  if any(padding[0]) or any(padding[1]):
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  if k.shape[2] != x.shape[3]:
    x = jnp.repeat(x, k.shape[2] // x.shape[3], axis=-1)
  return shifted_taps(x, k.astype(x.dtype), tuple(dilation), tuple(strides))


def _out_size(x_shape, taps, dilation, strides):
  return tuple((x_shape[1 + a] - (taps[a] - 1) * dilation[a] - 1) // strides[a] + 1
               for a in (0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_taps(x, k, dilation, strides):
  """The shifted depthwise form on the padded input, with a hand-written gradient.

  Autodiff of the slices gives one padded full-size tensor per tap for the input gradient, and
  XLA's CPU backend then recomputes the producers of `x` (BatchNorm, dropout) inside each.
  Written by hand, the input gradient is the same shifted form again (the output gradient,
  dilated by the stride and padded, against the flipped kernel) and the kernel gradient one
  reduction per tap, on the CPU a chunk of the batch at a time (`_taps_kernel_grad_blocked`).
  """
  return shifted_taps_strided(x, k, strides, dilation, _out_size(x.shape, k.shape, dilation,
                                                                 strides))


def _shifted_taps_fwd(x, k, dilation, strides):
  return shifted_taps(x, k, dilation, strides), (x, k)


def _shifted_taps_bwd(dilation, strides, residuals, dy):
  x, k = residuals
  kh, kw = k.shape[:2]
  (dh, dw), (sh, sw), (oh, ow) = dilation, strides, dy.shape[1:3]
  # dx[h] = sum_i dy'[h - i * dh] k[i], dy' the output gradient at every sh-th row (zeros
  # between): dy' padded by (k - 1) * d before and up to x's size after, correlated with the
  # flipped kernel.
  ph, pw = (kh - 1) * dh, (kw - 1) * dw
  dy_padded = jax.lax.pad(dy, jnp.zeros((), dy.dtype), (
      (0, 0, 0), (ph, x.shape[1] - (oh - 1) * sh - 1, sh - 1),
      (pw, x.shape[2] - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
  dx = shifted_taps_strided(dy_padded, k[::-1, ::-1], (1, 1), dilation, x.shape[1:3])
  grad = functools.partial(_taps_kernel_grad, taps=(kh, kw), dilation=dilation, strides=strides)
  blocked = functools.partial(_taps_kernel_grad_blocked, taps=(kh, kw), dilation=dilation,
                              strides=strides)
  dk = jax.lax.platform_dependent(x, dy, cpu=blocked, default=grad)
  return dx, dk.astype(k.dtype)


def _taps_kernel_grad(x, dy, taps, dilation, strides):
  """(kh, kw, C): per tap, the strided window of `x` it reads times `dy`, summed over batch and
  map."""
  (kh, kw), (dh, dw), (sh, sw), (oh, ow) = taps, dilation, strides, dy.shape[1:3]
  window = lambda i, j: jax.lax.slice(
      x, (0, i * dh, j * dw, 0),
      (x.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, x.shape[3]),
      (1, sh, sw, 1))
  return jnp.stack([
      jnp.stack([jnp.sum(window(i, j) * dy, axis=(0, 1, 2), dtype=_accumulation(x.dtype))
                 for j in range(kw)]) for i in range(kh)])


# Bytes of `x` per chunk of `_taps_kernel_grad_blocked`: the chunk and its output gradient stay
# in a core's cache while every tap reads them. On DS-ResNet's layer shapes at 3x3 and 5x5 taps
# (benchmarks/depthwise_chunks.py, 2-core AMD EPYC) this size took 1.00-1.12x the best chunk's
# time and ran 1.3-4.7x faster than one pass over the batch per tap. The budget is per device.
_CHUNK_BYTES = 640 * 1024


def _taps_kernel_grad_blocked(x, dy, taps, dilation, strides):
  """`_taps_kernel_grad` a few images at a time: the same sums, with every tap reading a chunk
  of the batch while it is in cache.

  XLA's CPU backend compiles `_taps_kernel_grad` into one reduction per tap, each streaming `x`
  and `dy` through memory; at kh * kw taps those dominate the depthwise layer's backward pass
  (BENCHMARKS.md). A loop over chunks of the batch keeps each chunk in cache for all the taps.
  """
  n, devices = x.shape[0], jax.device_count()
  # A batch sharded across devices (jit over a mesh) is split in `devices` contiguous blocks:
  # each chunk takes `local` images from every block, so every device sums its own images.
  devices = devices if n % devices == 0 else 1
  image_bytes = math.prod(x.shape[1:]) * x.dtype.itemsize
  local = max([b for b in range(1, n // devices + 1)
               if (n // devices) % b == 0 and b * image_bytes <= _CHUNK_BYTES], default=1)
  steps = n // (devices * local)
  # Image (d, s, l) of the batch, d the block: chunk s holds every (d, l).
  xs, dys = (a.reshape(devices, steps, local, *a.shape[1:]) for a in (x, dy))

  def add(s, total):
    take = lambda a: jax.lax.dynamic_index_in_dim(a, s, axis=1, keepdims=False).reshape(
        devices * local, *a.shape[3:])
    return total + _taps_kernel_grad(take(xs), take(dys), taps, dilation, strides)

  zeros = jnp.zeros((*taps, x.shape[3]), _accumulation(x.dtype))
  return jax.lax.fori_loop(0, steps, add, zeros)


shifted_taps.defvjp(_shifted_taps_fwd, _shifted_taps_bwd)


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
  dkernel = jnp.matmul(x2.T, dy2, preferred_element_type=_accumulation(x.dtype)).astype(
      kernel.dtype)
  return (dy2 @ kernel.T).reshape(x.shape), dkernel


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """Max pooling of NHWC `x` over non-overlapping `window`s ('valid' padding).

  Same values and gradient as `nn.max_pool` (the gradient goes to the first maximum of each
  window in row-major order, like XLA's select-and-scatter and TensorFlow), except in a window
  holding a NaN, whose gradient goes to its first NaN. Computed through a
  reshape instead: XLA's CPU backend expands select-and-scatter into four index arrays, a
  variadic reduce-window and a scatter, about 15% of Model 3's CPU step (BENCHMARKS.md), where
  this is a max and an argmax over each window and a few fused elementwise operations.
  """
  # Keywords, not positions: jax2onnx (the ONNX export, `dsconv_jax.export`) replaces
  # `nn.max_pool` while it traces with a function whose window and strides are keyword-only.
  return nn.max_pool(x, window_shape=window, strides=window, padding='VALID')


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
  n, oh, ph, ow, pw, c = xw.shape
  # The first maximum's position is kept (one byte per output) rather than `x`: recomputing
  # it in the backward pass from `x` also recomputed everything fused into `x`. It comes from
  # `argmax` over each window (row-major, the first of ties; a NaN counts as the maximum), whose
  # comparisons are among the window's own elements: an equality test of `x` against `y` can
  # match no element at all, dropping the window's gradient, because XLA may compute `x` again
  # in each fusion that reads it and two computations of one value need not agree to the bit
  # (at `xla_backend_optimization_level=0` on the CPU they differ in about a third of Model 3's
  # windows after BatchNorm).
  dtype = jnp.int8 if ph * pw < 127 else jnp.int32
  first = jax.lax.argmax(xw.transpose(0, 1, 3, 5, 2, 4).reshape(n, oh, ow, c, ph * pw), 4, dtype)
  return xw.max(axis=(2, 4)), (first, x.shape)


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


