"""What a model is, computed from its real computation: layers, shapes, parameters, receptive fields.

`analyze_model` traces the model once (`jax.make_jaxpr`, eval mode, nothing is run) with a Flax
method interceptor that records every call of a layer (name, type, output shape, parameters) and
tags its output with a marker. A layer is a `dsconv_jax.layers.Layer`, or a plain `flax.linen`
`Conv`, `BatchNorm`, `Dropout` or `Dense` that no layer wraps; its row is named by its Flax path
(`Conv_0`, `Block_0/BatchNorm_0`) and typed as the project's layer would be (`nn.Conv` is a
`DepthwiseConv2D` when `feature_group_count` equals its input channels, a `PointwiseConv2D` when 1x1
with one group, else a `Conv2D`). Functions (`nn.relu`, `nn.max_pool`, `jnp.mean`) have no row: the
walk below follows their operations, and the next row shows what they did.

The receptive field is propagated through the jaxpr primitive by primitive, so it is exact for any
topology (residual branches, 'same' padding, strided and dilated convolutions, shifted-slice
depthwise convolutions), with nothing typed in by hand. For each array we keep, per image axis
(height, width), where that axis is in the array, the interval of input pixels that pixel 0 sees
(`lo`, `hi`) and the jump (input pixels between neighbouring pixels); the receptive field is
`hi - lo + 1`. Every primitive that meets an array with height and width axes must be one the walk
knows (elementwise, reductions, convolutions, pooling, slicing, padding, reshapes that keep or
flatten the map, transposes and concatenations that keep them in place, ...). Once height and
width are pooled or flattened away, a value sees the union of what its inputs saw. Where such a
pooled value is mixed back into the map (squeeze-and-excitation's gate, the statistics of a norm
over the map, attention), every pixel from there on sees the whole image: its rows say so
(`sees_whole_image`, RF "image") and the report lists where (`global_context`).

An analysis that reports never blocks: any other primitive, and any known one used in a way whose
field no single window per axis describes (a gather or a flip along height or width, a transpose
that swaps them, a concatenation along one), is listed in `ModelReport.unknown` with its layer and
reason, and the rows it reaches report no receptive field (never a wrong number). Nothing else
stops: parameters, MACs and the constraints are computed on everything that is known.

The same walk checks the design constraints of the source studies on the real operations: a k x k
convolution (k > 1) across channels, a dense layer (a matrix product on features with no spatial
extent left: after global pooling or a flatten, or a 1x1 convolution on a 1x1 map; not one whose
result is mixed back into the map, as squeeze-and-excitation's gate is) and the absence of
BatchNorm (a normalisation by stored moving statistics, found by what it computes) are violations
when the config forbids them. Each names its row as the table does.

It also counts the multiply-accumulates (MACs) of one image, per layer and in total. Counted are
the operations that multiply data by weights: convolutions (output elements x kh*kw*Cin/groups),
matrix products (output elements x contracted size), and elementwise products of data with a
value computed from kernel weights alone, which is how the shifted depthwise form multiplies, so
that both depthwise forms count the same. BatchNorm, biases, activations and pooling are not
counted (Model 3's BatchNorm layers, folded into one multiply-add per element, would add 210,048,
1.9%). The operations of a layer are those traced between its call and its return (markers around
each top-level layer call); an operation outside every layer counts only in the total.

`receptive_field_advice` compares the receptive field of the output with the image; see its
docstring for the thresholds.

Finally, `parameter_structure` traces a model once more to say which parameters are convolution
kernels (with their groups, channels and layout) and which are a normalisation's shift, by what
the computation does with them, never by their names: Dirac initialisation, the BatchNorm-bias
learning rate and export's grouped-convolution check rely on it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import textwrap
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dsconv_jax import layers as layers_lib
from dsconv_jax import nnx_adapter
from dsconv_jax.errors import UserError

_MARKER_PREFIX = '_dsconv_layer_'
_BEGIN_PREFIX = '_dsconv_begin_'
# A receptive field more than this many times the image size "overshoots" it (see
# `receptive_field_advice`).
RF_OVERSHOOT_FACTOR = 4
# Plain Flax layers that get a row of their own, with the type the project's layer would have
# (`nn.Conv` is typed by `_conv_type`).
_FLAX_ROWS = ((nn.BatchNorm, 'BatchNorm'), (nn.Dropout, 'Dropout'), (nn.Dense, 'Dense'),
              (nn.GroupNorm, 'GroupNorm'), (nn.LayerNorm, 'LayerNorm'),
              (nnx.BatchNorm, 'BatchNorm'), (nnx.Dropout, 'Dropout'), (nnx.Linear, 'Dense'),
              (nnx.GroupNorm, 'GroupNorm'), (nnx.LayerNorm, 'LayerNorm'))

# Primitives the walk enters and follows inside (called once, with these operands).
_CALLS = frozenset({'jit', 'closed_call', 'custom_jvp_call', 'custom_vjp_call', 'remat2'})
_ELEMENTWISE = frozenset({
    'abs', 'acos', 'acosh', 'add', 'and', 'asin', 'asinh', 'atan', 'atan2', 'atanh', 'cbrt', 'ceil',
    'clamp', 'conj', 'convert_element_type', 'copy', 'cos', 'cosh', 'digamma', 'div', 'eq', 'erf',
    'erf_inv', 'erfc', 'exp', 'exp2', 'expm1', 'floor', 'ge', 'gt', 'imag', 'integer_pow',
    'is_finite', 'le', 'lgamma', 'log', 'log1p', 'logistic', 'lt', 'max', 'min', 'mul', 'ne', 'neg',
    'nextafter', 'not', 'or', 'population_count', 'pow', 'real', 'reduce_precision', 'rem', 'round',
    'rsqrt', 'select_n', 'shift_left', 'shift_right_arithmetic', 'shift_right_logical', 'sign',
    'sin', 'sinh', 'sqrt', 'square', 'stop_gradient', 'sub', 'tan', 'tanh', 'xor'})
_REDUCTIONS = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and',
                         'reduce_or', 'reduce_xor', 'argmax', 'argmin'})
# Operations along one axis, where each value sees the values before it (or all of them).
_ALONG_AXIS = frozenset({'cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp', 'sort'})
_WINDOWS = frozenset({'reduce_window_sum', 'reduce_window_max', 'reduce_window_min',
                      'reduce_window'})
# Operations that use every value of their operands: on a flattened map, whose values see different
# pixels, the union of what the inputs saw is still what the result sees as a whole.
_USES_EVERY_VALUE = _ELEMENTWISE | _REDUCTIONS | {'dot_general', 'broadcast_in_dim', 'reshape',
                                                  'squeeze', 'transpose', 'concatenate'}


@dataclasses.dataclass
class LayerReport:
  name: str
  type: str
  output_shape: list[int]
  params: int
  params_trainable: int
  # None where the walk could not follow the map (`ModelReport.unknown` says where and why).
  receptive_field: int | list[int] | None
  jump: int | list[int] | None
  macs: int = 0  # Multiply-accumulates per image (see the module docstring).
  activation_bytes: int = 0  # Size of the layer's output per image.
  # Every pixel of the output sees the whole image (global context was mixed in at or before this
  # layer); `receptive_field` is then the image's size.
  sees_whole_image: bool = False


@dataclasses.dataclass
class ModelReport:
  input_shape: list[int]
  layers: list[LayerReport]
  params_total: int
  params_trainable: int
  params_non_trainable: int
  violations: list[str]
  macs_total: int = 0
  # Sum of every layer's output per image (about what training keeps for the backward pass), and
  # the largest single output.
  activation_bytes_total: int = 0
  activation_bytes_max: int = 0
  # Receptive-field advice for the output (`receptive_field_advice`); never a violation.
  output_receptive_field: int | list[int] | None = None
  receptive_field_layer: str | None = None
  receptive_field_status: str = 'none'
  receptive_field_verdict: str = ''
  # Where a value pooled over the map is mixed back into it ('mul in Block_0/SE_0'): every pixel
  # sees the whole image from there on.
  global_context: list[str] = dataclasses.field(default_factory=list)
  # What the analysis could not decide, each with its place and reason; the constraints are
  # checked on everything else, and nothing here stops a run.
  unknown: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Info:
  """Receptive-field state of one array computed from the image.

  Per image axis (height, width): `lo` and `hi`, the interval of input pixels that the array's
  pixel 0 sees; `jump`, the input pixels between neighbouring pixels; `axes`, where that image axis
  is in the array, None once it is pooled or flattened away (the interval then covers the axis).
  `uniform` is False after a flatten, whose values see different pixels: picking some of them
  would see less than the union kept here. `whole`, per image axis, is True once a value pooled
  over that axis has been mixed back into the map (squeeze-and-excitation's gate, a norm over the
  map, attention): from there on every pixel sees the whole image along it, and `lo`/`hi` no
  longer describe a window that moves with the pixel.
  """
  lo: tuple[int, int]
  hi: tuple[int, int]
  jump: tuple[int, int]
  axes: tuple[int | None, int | None] = (1, 2)
  uniform: bool = True
  whole: tuple[bool, bool] = (False, False)
  # The dense operations (indices into `_Walker.dense_ops`) this value was computed through.
  dense: frozenset[int] = frozenset()

  def spatial(self) -> bool:
    return any(p is not None for p in self.axes)

  def union(self, other: '_Info') -> '_Info':
    return dataclasses.replace(self, lo=tuple(map(min, self.lo, other.lo)),
                               hi=tuple(map(max, self.hi, other.hi)),
                               jump=tuple(map(max, self.jump, other.jump)),
                               uniform=self.uniform and other.uniform,
                               whole=tuple(map(operator.or_, self.whole, other.whole)),
                               dense=self.dense | other.dense)

  def window(self, axis: int, size: int, stride: int, dilation: int, pad_lo: int) -> '_Info':
    lo, hi, jump = list(self.lo), list(self.hi), list(self.jump)
    lo[axis] -= pad_lo * jump[axis]
    hi[axis] += ((size - 1) * dilation - pad_lo) * jump[axis]
    jump[axis] *= stride
    return dataclasses.replace(self, lo=tuple(lo), hi=tuple(hi), jump=tuple(jump))

  def shifted(self, axis: int, start: int, stride: int = 1) -> '_Info':
    """Pixel 0 of a slice that starts at pixel `start` of `axis` and keeps every `stride`-th."""
    return self.window(axis, 1, stride, 1, -start)

  def pooled(self, axis: int, n: int) -> '_Info':
    """A reduction over `axis` (n pixels) sees all of it; the axis is gone."""
    hi, jump, axes = list(self.hi), list(self.jump), list(self.axes)
    hi[axis] += (n - 1) * jump[axis]
    jump[axis] *= n
    axes[axis] = None
    return dataclasses.replace(self, hi=tuple(hi), jump=tuple(jump), axes=tuple(axes))

  def moved(self, axes: Sequence[int | None]) -> '_Info':
    return dataclasses.replace(self, axes=tuple(axes))

  def size(self) -> tuple[int, int]:
    return tuple(h - l + 1 for l, h in zip(self.lo, self.hi))

  def sees_whole_image(self) -> bool:
    """Whether every pixel of a map with this state sees the whole image (see `whole`); also a
    value pooled over the map and spread back over one (uniform: every value sees the same)."""
    return all(self.whole) or (not self.spatial() and self.uniform)


# The state of an array derived from one whose receptive field the walk could not follow: its
# rows report no field, and nothing after it is refused for it (`_Walker.unknown` says why).
_UNKNOWN = object()


def _squash(v: Sequence[int]) -> int | list[int]:
  return int(v[0]) if v[0] == v[1] else [int(x) for x in v]


class _Unknown(Exception):
  """Raised by a propagation rule with the reason the walk cannot follow an operation exactly."""


class _Walker:
  """Propagates `_Info` through a jaxpr; records markers, convolution and matmul facts, MACs.

  `names` are the table's row names by index, `modules` the paths of every Flax module called (to
  name, outside every row, the module an operation belongs to), `input_shape` the image's (H, W, C).
  """

  def __init__(self, names: Sequence[str], modules: set[str], input_shape: Sequence[int]):
    self.names = names
    self.modules = modules
    self.input_shape = input_shape
    self.marked: dict[int, _Info | None] = {}
    self.violations_conv: list[str] = []
    self.dense_ops: list[str] = []
    # Dense operations whose result is mixed back into the map (squeeze-and-excitation's gate):
    # global context, not a classifier head, so the no-dense rule leaves them alone.
    self.gates: set[int] = set()
    self.macs: dict[int, int] = {}  # Per layer row, by index.
    self.macs_total = 0
    # What the walk could not decide ('mul in Block_0: ...'), and where a value pooled over the
    # map is mixed back into it (every pixel sees the whole image from there on).
    self.unknown: list[str] = []
    self.global_context: list[str] = []
    self._layer: int | None = None  # The row whose operations are being walked.
    # Vars computed from kernel weights alone (no input pixel): multiplying data by one is a MAC.
    self._weights: set[Any] = set()

  def run(self, jaxpr, in_infos, in_weights=None, scope: str = ''):
    """Walks `jaxpr`; `scope` is the name stack of the call that holds it (inner ones are relative)."""
    env: dict[Any, _Info | None] = {}
    read = lambda v: None if isinstance(v, jax.extend.core.Literal) else env.get(v)
    for v, info, weight in zip(jaxpr.invars, in_infos, in_weights or [False] * len(in_infos)):
      env[v] = info
      self._set_weight(v, weight)
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      weights = [self._is_weight(v) for v in eqn.invars]
      outs = self._eqn(eqn, ins, weights, scope)
      if eqn.primitive.name in _CALLS:
        out_weights = [self._is_weight(v) for v in _sub_jaxpr(eqn).outvars]
      else:
        out_weights = [any(weights) and all(i is None for i in ins)] * len(eqn.outvars)
      for v, info, weight in zip(eqn.outvars, outs, out_weights):
        env[v] = info
        self._set_weight(v, weight)
    return [read(v) for v in jaxpr.outvars]

  def _is_weight(self, v) -> bool:
    return not isinstance(v, jax.extend.core.Literal) and v in self._weights

  def _set_weight(self, v, weight: bool) -> None:
    # Set both ways: a cached sub-jaxpr is walked again for every call, with other inputs.
    if weight:
      self._weights.add(v)
    else:
      self._weights.discard(v)

  def _eqn(self, eqn, ins, weights, scope):
    name = eqn.primitive.name
    if name in _CALLS:
      fn_name = eqn.params.get('name', '')
      if isinstance(fn_name, str) and fn_name.startswith(_MARKER_PREFIX):
        self.marked[int(fn_name[len(_MARKER_PREFIX):])] = ins[0]
        self._layer = None
      elif isinstance(fn_name, str) and fn_name.startswith(_BEGIN_PREFIX):
        self._layer = int(fn_name[len(_BEGIN_PREFIX):])
      return self.run(_sub_jaxpr(eqn), ins, weights, _join(scope, eqn.source_info.name_stack))
    if all(i is None for i in ins):
      return [None] * len(eqn.outvars)
    self._count_macs(eqn, weights)
    n_dense = len(self.dense_ops)
    self._check_design(eqn, ins, scope)
    if any(i is _UNKNOWN for i in ins):
      return [_UNKNOWN] * len(eqn.outvars)
    try:
      if any(i is not None and i.spatial() for i in ins):
        if name not in _RULES:
          raise _Unknown('the walk does not know how it moves pixels')
        outs = _RULES[name](eqn, ins)
      else:
        outs = _flat(eqn, ins)
    except _Unknown as e:
      # A gap in the report, never a reason to stop: later rows show no field.
      self.unknown.append(f'receptive field after {name} in {self._where(eqn, scope)}: {e}')
      return [_UNKNOWN] * len(eqn.outvars)
    if (any(o is not None and o.whole != (False, False) for o in outs)
        and not any(i is not None and i.whole != (False, False) for i in ins)):
      self.global_context.append(f'{name} in {self._where(eqn, scope)}')
    if any(o is not None and o.spatial() for o in outs):
      for i in ins:
        if i is not None and not i.spatial():
          self.gates |= i.dense
    new = frozenset(range(n_dense, len(self.dense_ops)))
    return [o if o is None or not new else dataclasses.replace(o, dense=o.dense | new)
            for o in outs]

  def _where(self, eqn, scope: str) -> str:
    """The table's name of the row running `eqn`; outside every row, its Flax module or the model."""
    if self._layer is not None:
      return self.names[self._layer]
    parts = _join(scope, eqn.source_info.name_stack).split('/')
    # The name stack starts with the model and may end with scopes that are not modules (einsum).
    for end in range(len(parts), 1, -1):
      path = '/'.join(parts[1:end])
      if path in self.modules:
        return path
    return parts[0] or 'the model'

  def _check_design(self, eqn, ins, scope: str) -> None:
    """Records the convolutions across channels and the dense layers among the real operations."""
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      dn = eqn.params['dimension_numbers']
      kernel = [rhs[d] for d in dn.rhs_spec[2:]]
      in_ch = lhs[dn.lhs_spec[1]]
      groups = eqn.params['feature_group_count']
      if max(kernel) > 1 and groups < in_ch:
        self.violations_conv.append(
            f'{self._where(eqn, scope)}: a {"x".join(map(str, kernel))} convolution across '
            f'channels ({in_ch} inputs, feature_group_count={groups}) is not '
            f'depthwise-separable (make it depthwise, feature_group_count={in_ch}, followed by a '
            '1x1 convolution, or set --config.constraints.depthwise_separable_only=False)')
      if max(kernel) == 1 and all(lhs[d] == 1 for d in dn.lhs_spec[2:]) and ins[0] is not None:
        self._dense_candidate(eqn, scope, ins[0])
    elif name == 'dot_general':
      k, info = next((k, i) for k, i in enumerate(ins) if i is not None)
      shape = eqn.invars[k].aval.shape
      if info is _UNKNOWN or all(p is None or shape[p] == 1 for p in info.axes):
        self._dense_candidate(eqn, scope, info)

  def _dense_candidate(self, eqn, scope: str, info) -> None:
    """Records a dense layer; past a gap in the walk, lists the question instead (whether its
    result is mixed back into the map, as a gate, is then unknown)."""
    if info is _UNKNOWN:
      self.unknown.append(f'whether {eqn.primitive.name} in {self._where(eqn, scope)} is a dense '
                          'layer or a gate on the map: the walk lost the map before it')
    else:
      self.dense_ops.append(self._dense(eqn, scope, info))

  def _dense(self, eqn, scope: str, info: _Info) -> str:
    """The violation of a matrix product on data with no spatial extent, and how to avoid it."""
    where = self._where(eqn, scope)
    if not info.spatial():
      return (f'{where}: a dense layer (a matrix product on features, with no height or width '
              'left): use a 1x1 convolution before the global pooling instead, or set '
              '--config.constraints.allow_dense=True')
    # The map is 1x1 at this image size: one more jump of input pixels per axis makes it 2x2.
    h, w = self.input_shape[:2]
    n = max(s + j for s, j, p in zip((h, w), info.jump, info.axes) if p is not None)
    return (f'{where}: a 1x1 convolution on a 1x1 map is a dense layer (with {h}x{w} images '
            f'this map is 1x1: --config.image_size={n} or more keeps it at least 2x2, or set '
            '--config.constraints.allow_dense=True)')

  def _count_macs(self, eqn, weights) -> None:
    """Adds the MACs of `eqn`, an operation on data of one image, to its layer and the total."""
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...) axes.
      macs = math.prod(out) * math.prod(rhs[d] for d in rhs_spec[1:])
    elif name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      macs = math.prod(out) * math.prod(lhs[d] for d in lhs_contracting)
    elif name == 'mul' and any(weights):
      macs = math.prod(out)  # The shifted depthwise form: data times a kernel tap.
    else:
      return
    self.macs_total += macs
    if self._layer is not None:
      self.macs[self._layer] = self.macs.get(self._layer, 0) + macs


def _join(scope: str, name_stack) -> str:
  return '/'.join(s for s in (scope, str(name_stack)) if s)


def _sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr'):
    sub = eqn.params.get(key)
    if sub is not None:
      return getattr(sub, 'jaxpr', sub) if not hasattr(sub, 'eqns') else sub
  return None


# Propagation rules. `_flat` serves operations whose operands have no height or width axes left;
# `_RULES` maps each primitive the walk knows to a function of (eqn, operand infos) that returns
# the output infos or raises `_Unknown`.


def _flat(eqn, ins) -> list[_Info]:
  """Values with no height or width left: the result sees the union of what its inputs saw.

  Exact for any operation when every input value sees the same pixels (after a pooling or a dense
  layer). After a flatten, whose values see different pixels, only for operations that use every
  value; the result sees the same pixels everywhere again once it sums over every axis.
  """
  known = [(k, i) for k, i in enumerate(ins) if i is not None]
  out = functools.reduce(_Info.union, [i for _, i in known])
  if not out.uniform:
    if eqn.primitive.name not in _USES_EVERY_VALUE:
      raise _Unknown('it may pick some values of a flattened map, which see different pixels')
    out = dataclasses.replace(out, uniform=all(i.uniform or _covers(eqn, k) for k, i in known))
  return [out] * len(eqn.outvars)


def _covers(eqn, k: int) -> bool:
  """Whether `eqn` reduces or contracts operand `k` over every axis longer than 1."""
  name = eqn.primitive.name
  if name in _REDUCTIONS:
    over = eqn.params['axes']
  elif name == 'dot_general':
    over = eqn.params['dimension_numbers'][0][k]
  else:
    return False
  return all(d in over for d, n in enumerate(eqn.invars[k].aval.shape) if n > 1)


def _merge(infos: Sequence[_Info]) -> _Info:
  """The union of arrays that meet pixel by pixel (an add, a concatenation along channels).

  Exact when their image axes are in the same places and their pixels as far apart: otherwise what
  a pixel sees would differ from pixel to pixel. A map combined with a value pooled over one of
  its axes (squeeze-and-excitation's gate, the mean of a norm over the map) sees the whole image
  along that axis from there on (`_Info.whole`).
  """
  out = infos[0]
  for other in infos[1:]:
    axes, jump, whole = list(out.axes), list(out.jump), list(out.whole)
    for a in range(2):
      p, q = out.axes[a], other.axes[a]
      if (p is None) != (q is None):
        axes[a], whole[a] = (p, True) if q is None else (q, True)
        jump[a] = out.jump[a] if q is None else other.jump[a]
        continue
      if p != q:
        raise _Unknown('it combines arrays whose height and width axes are in different places')
      if p is not None and out.jump[a] != other.jump[a]:
        raise _Unknown(f'it combines maps whose neighbouring pixels are {out.jump[a]} and '
                       f'{other.jump[a]} input pixels apart')
    out = dataclasses.replace(out.union(other), axes=tuple(axes), jump=tuple(jump),
                              whole=tuple(map(operator.or_, whole, other.whole)))
  return out


def _only(ins, k: int = 0) -> _Info:
  """Operand `k`, the one computed from the image that a rule follows; any other one is refused."""
  if any(i is not None for j, i in enumerate(ins) if j != k):
    raise _Unknown('it also takes indices, padding or weights computed from the image')
  return ins[k]


def _without(axes, removed) -> list[int | None]:
  """The positions of `axes` once the array axes `removed` are gone."""
  return [None if p is None else p - sum(r < p for r in removed) for p in axes]


def _elementwise(eqn, ins):
  out = eqn.outvars[0].aval.shape
  for v, info in zip(eqn.invars, ins):
    if info is not None and any(p is not None and v.aval.shape[p] != out[p] for p in info.axes):
      raise _Unknown('it spreads a 1-pixel map over a larger one')
  return [_merge([i for i in ins if i is not None])] * len(eqn.outvars)


def _reduce(eqn, ins):
  info, shape, axes = _only(ins), eqn.invars[0].aval.shape, eqn.params['axes']
  for a, p in enumerate(info.axes):
    if p in axes:
      info = info.pooled(a, shape[p])
  return [info.moved(_without(info.axes, axes))] * len(eqn.outvars)


def _along_axis(eqn, ins):
  axis = eqn.params['dimension' if eqn.primitive.name == 'sort' else 'axis']
  infos = [i for i in ins if i is not None]
  if any(axis in i.axes for i in infos):
    raise _Unknown('it runs along the height or width axis, so what a pixel sees depends on '
                   'where it is')
  return [_merge(infos)] * len(eqn.outvars)


def _window_ops(eqn, ins):
  """Pooling (reduce_window): a window on each image axis, like a convolution's."""
  n = len(eqn.outvars)
  if any(i is not None for i in ins[n:]):
    raise _Unknown('its initial value is computed from the image')
  p = eqn.params
  outs = []
  for info in ins[:n]:
    if info is None:
      continue
    for a, pos in enumerate(info.axes):
      if pos is None:
        continue
      if p['base_dilation'][pos] != 1:
        raise _Unknown('its base dilation spreads pixels apart')
      info = info.window(a, p['window_dimensions'][pos], p['window_strides'][pos],
                         p['window_dilation'][pos], p['padding'][pos][0])
    outs.append(info)
  return [_merge(outs)] * n


def _conv(eqn, ins):
  info, p = _only(ins), eqn.params
  dn, rhs = p['dimension_numbers'], eqn.invars[1].aval.shape
  lhs_spatial = list(dn.lhs_spec[2:])
  axes = list(info.axes)
  for a, pos in enumerate(info.axes):
    if pos is None:
      continue
    if pos not in lhs_spatial:
      raise _Unknown('it treats the height or width axis as batch or channels')
    i = lhs_spatial.index(pos)
    if p['lhs_dilation'][i] != 1:
      raise _Unknown('its input dilation (a transposed convolution) spreads pixels apart')
    info = info.window(a, rhs[dn.rhs_spec[2 + i]], p['window_strides'][i], p['rhs_dilation'][i],
                       p['padding'][i][0])
    axes[a] = dn.out_spec[2 + i]
  return [info.moved(axes)]


def _dot_general(eqn, ins):
  """A matrix product: image axes must stay free (a 1x1 convolution) or batch axes."""
  (contract, batch) = eqn.params['dimension_numbers']
  ranks = [len(v.aval.shape) for v in eqn.invars]
  free = [[d for d in range(r) if d not in contract[k] and d not in batch[k]]
          for k, r in enumerate(ranks)]
  moved = []
  for k, info in enumerate(ins):
    if info is None:
      continue
    offset = len(batch[0]) + (len(free[0]) if k else 0)
    axes = []
    for p in info.axes:
      if p in contract[k]:
        raise _Unknown('it sums over the height or width axis with weights, a dense layer over '
                       'pixels')
      axes.append(None if p is None else
                  batch[k].index(p) if p in batch[k] else offset + free[k].index(p))
    moved.append(info.moved(axes))
  return [_merge(moved)]


def _gather(eqn, ins):
  """Indexing: exact while the height and width axes are kept whole and in order."""
  info, shape = _only(ins), eqn.invars[0].aval.shape
  dnums, sizes = eqn.params['dimension_numbers'], eqn.params['slice_sizes']
  kept = [d for d in range(len(shape))
          if d not in dnums.collapsed_slice_dims and d not in dnums.operand_batching_dims]
  axes = []
  for p in info.axes:
    if p is not None and (p in dnums.start_index_map or p not in kept or sizes[p] != shape[p]):
      raise _Unknown('it picks pixels by index along the height or width axis')
    axes.append(None if p is None else dnums.offset_dims[kept.index(p)])
  return [info.moved(axes)]


def _broadcast(eqn, ins):
  info, dims = _only(ins), eqn.params['broadcast_dimensions']
  shape, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if any(p is not None and out[dims[p]] != shape[p] for p in info.axes):
    raise _Unknown('it spreads a 1-pixel map over a larger one')
  return [info.moved([None if p is None else dims[p] for p in info.axes])]


def _reshape(eqn, ins):
  """Keeps the map when the axes up to width are unchanged; flattens it with everything after."""
  info, shape, out = _only(ins), eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  tracked = [p for p in info.axes if p is not None]
  if shape[:max(tracked) + 1] == out[:max(tracked) + 1]:
    return [info]
  first = min(tracked)
  if len(out) != first + 1 or shape[:first] != out[:first]:
    raise _Unknown('it reshapes the height or width axis other than by flattening the map')
  for a, p in enumerate(info.axes):
    if p is not None:
      info = info.pooled(a, shape[p])
  # Side by side, the flattened values see different pixels (unless the map was 1x1).
  return [dataclasses.replace(info, uniform=all(shape[p] == 1 for p in tracked))]


def _squeeze(eqn, ins):
  info, dims = _only(ins), eqn.params['dimensions']
  for a, p in enumerate(info.axes):
    if p in dims:
      info = info.pooled(a, 1)
  return [info.moved(_without(info.axes, dims))]


def _transpose(eqn, ins):
  info, perm = _only(ins), eqn.params['permutation']
  axes = [None if p is None else perm.index(p) for p in info.axes]
  if None not in axes and axes[0] > axes[1]:
    # Exact in itself, but the table would pair the field of the height with the width.
    raise _Unknown('it swaps the height and width axes')
  return [info.moved(axes)]


def _rev(eqn, ins):
  info = _only(ins)
  if any(p in eqn.params['dimensions'] for p in info.axes if p is not None):
    raise _Unknown('it flips the height or width axis: neighbouring pixels then step backwards '
                   'through the image, which one window per axis moving forward with the pixel '
                   'cannot describe')
  return [info]


def _concatenate(eqn, ins):
  infos = [i for i in ins if i is not None]
  if any(eqn.params['dimension'] in i.axes for i in infos):
    raise _Unknown('it joins maps along the height or width axis, so the pixels of every map '
                   'after the first sit at shifted positions')
  return [_merge(infos)]


def _split(eqn, ins):
  info, axis, sizes = _only(ins), eqn.params['axis'], eqn.params['sizes']
  if axis not in info.axes:
    return [info] * len(sizes)
  a = info.axes.index(axis)
  return [info.shifted(a, int(sum(sizes[:k]))) for k in range(len(sizes))]


def _pad(eqn, ins):
  info = _only(ins)
  for a, p in enumerate(info.axes):
    if p is None:
      continue
    low, _, interior = eqn.params['padding_config'][p]
    if interior:
      raise _Unknown('its interior padding spreads pixels apart')
    info = info.shifted(a, -low)
  return [info]


def _slice(eqn, ins):
  info, start = _only(ins), eqn.params['start_indices']
  strides = eqn.params['strides'] or (1,) * len(start)
  for a, p in enumerate(info.axes):
    if p is not None:
      info = info.shifted(a, start[p], strides[p])
  return [info]


_RULES = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _reduce for name in _REDUCTIONS},
    **{name: _along_axis for name in _ALONG_AXIS},
    **{name: _window_ops for name in _WINDOWS},
    'conv_general_dilated': _conv, 'dot_general': _dot_general, 'gather': _gather,
    'broadcast_in_dim': _broadcast, 'reshape': _reshape, 'squeeze': _squeeze,
    'transpose': _transpose, 'rev': _rev, 'concatenate': _concatenate, 'split': _split,
    'pad': _pad, 'slice': _slice,
}


def _conv_type(module: nn.Conv | nnx.Conv, in_features: int) -> str:
  """The project's type of a plain `nn.Conv` or `nnx.Conv`: depthwise, pointwise, or a full
  (grouped) one."""
  kernel = (module.kernel_size,) if isinstance(module.kernel_size, int) else module.kernel_size
  if module.feature_group_count == in_features:
    return 'DepthwiseConv2D'
  if module.feature_group_count == 1 and all(k == 1 for k in kernel):
    return 'PointwiseConv2D'
  return 'Conv2D'


def _row_type(module: nn.Module, args, kwargs) -> str | None:
  """The type of `module`'s row in the table, or None when its call has no row of its own."""
  if isinstance(module, layers_lib.Layer):
    return type(module).__name__
  if isinstance(module, (nn.Conv, nnx.Conv)):
    return _conv_type(module, (*args, *kwargs.values())[0].shape[-1])
  return next((name for cls, name in _FLAX_ROWS if isinstance(module, cls)), None)


def analyze_model(model: nn.Module, input_shape: Sequence[int],
                  constraints: Any = None) -> ModelReport:
  """Traces `model` on one image of `input_shape` (H, W, C) and reports every layer.

  `constraints` (a ConfigDict or mapping with max_params, depthwise_separable_only,
  require_batch_norm, allow_dense) adds one violation string per broken rule. The batch of the
  trace is one image, so MACs and activation sizes are per image. An operation on the map whose
  receptive field the walk cannot follow exactly is listed in the report's `unknown`, never
  raised.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = _abstract_variables(model, input_shape)

  rows: list[dict[str, Any]] = []
  active: list[nn.Module] = []
  modules: set[str] = set()
  saw_batch_norm = [False]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    return on_call(tuple(context.module.scope.path), context.module, next_fun, args, kwargs)

  def on_call(path, module, next_fun, args, kwargs):
    """A module call (Linen's, or an NNX model's submodule's): a row when it is a layer."""
    modules.add('/'.join(path))
    if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):  # The project's BatchNorm wraps one.
      saw_batch_norm[0] = True
    row_type = _row_type(module, args, kwargs)
    if row_type is None:
      return next_fun(*args, **kwargs)
    outermost = not active
    if outermost and args and isinstance(args[0], jax.Array):
      # Everything traced from here to the end marker is this layer's (for its MACs).
      args = (_tag(args[0], f'{_BEGIN_PREFIX}{len(rows)}'), *args[1:])
    active.append(module)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      active.pop()
    if not outermost:
      return out
    index = len(rows)
    rows.append({'path': path, 'type': row_type,
                 'shape': list(out.shape[1:]), 'itemsize': out.dtype.itemsize})
    return _tag(out, f'{_MARKER_PREFIX}{index}')

  def apply(variables, x):
    with nn.intercept_methods(interceptor), nnx_adapter.intercept_calls(on_call):
      return model.apply(variables, x, train=False)

  closed = jax.make_jaxpr(apply)(variables, x)
  walker = _Walker(['/'.join(row['path']) for row in rows], modules, input_shape)
  n_var_leaves = len(jax.tree.leaves(variables))
  in_infos = [None] * n_var_leaves + [_Info((0, 0), (0, 0), (1, 1))]
  walker.run(closed.jaxpr, in_infos, _kernel_leaves(variables) + [False])

  trainable = variables.get('params', {})
  weights = _weights(variables)
  layer_reports = []
  for index, row in enumerate(rows):
    n_train = _count(_subtree(trainable, row['path']))
    n_all = sum(_count(_subtree(tree, row['path'])) for tree in weights.values())
    rf, jump, whole = _row_field(walker.marked.get(index), row['shape'], input_shape)
    layer_reports.append(LayerReport(
        name='/'.join(row['path']), type=row['type'], output_shape=row['shape'], params=n_all,
        params_trainable=n_train, receptive_field=rf, jump=jump, macs=walker.macs.get(index, 0),
        activation_bytes=math.prod(row['shape']) * row['itemsize'], sees_whole_image=whole))

  total = _count(weights)
  n_trainable = _count(trainable)
  activations = [l.activation_bytes for l in layer_reports]
  report = ModelReport(input_shape=list(input_shape), layers=layer_reports, params_total=total,
                       params_trainable=n_trainable, params_non_trainable=total - n_trainable,
                       violations=[], macs_total=walker.macs_total,
                       activation_bytes_total=sum(activations),
                       activation_bytes_max=max(activations, default=0),
                       global_context=walker.global_context, unknown=walker.unknown,
                       **receptive_field_advice(layer_reports, input_shape))
  if constraints is not None:
    # A flax BatchNorm, or any normalisation by stored (moving) statistics, found by what it
    # computes (`parameter_structure`), traced only when the rule needs it.
    uses_batch_norm = lambda: saw_batch_norm[0] or any(
        n.moving for n in parameter_structure(model, input_shape).normalisations)
    report.violations = _violations(report, walker, uses_batch_norm, constraints)
  return report


def _row_field(info, shape: Sequence[int], input_shape: Sequence[int]):
  """(receptive field, jump, sees the whole image) of a row whose output has `info` and `shape`.

  A map (3 axes) whose pixels all see the whole image along an axis reports the image's size
  there; a row the walk could not follow reports None.
  """
  if info is None:  # Not computed from the image.
    return 1, 1, False
  if info is _UNKNOWN:
    return None, None, False
  whole = list(info.whole)
  if len(shape) == 3 and not info.spatial() and info.uniform:
    whole = [True, True]  # A pooled value spread over a map again (as attention does).
  size = [input_shape[a] if w else n for a, (w, n) in enumerate(zip(whole, info.size()))]
  return _squash(size), _squash(info.jump), len(shape) == 3 and all(whole)


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """The Keras parameter count of `model` (BatchNorm statistics included), without a full trace.

  Equal to `analyze_model(...).params_total`, at a fraction of its cost (`dsconv_jax.budget`
  calls it many times).
  """
  return _count(_weights(_abstract_variables(model, input_shape)))


def _weights(variables) -> dict[str, Any]:
  """The collections of `variables` that hold weights (Keras' count): all but an NNX model's
  random-stream state (`nnx_adapter.STATE`)."""
  return {k: v for k, v in variables.items() if k != nnx_adapter.STATE}


def _abstract_variables(model: nn.Module, input_shape: Sequence[int]):
  """The shapes and dtypes of `model`'s variables for one image of `input_shape` (none computed)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  key = jax.random.key(0)
  return jax.eval_shape(
      lambda x: model.init({'params': key, 'dropout': key}, jnp.zeros(x.shape), train=False), x)


def _tag(x, name: str):
  """`x` through an identity jit named `name`: a marker the walker finds in the jaxpr."""
  marker = lambda t: t
  marker.__name__ = name
  return jax.jit(marker)(x)


def _kernel_leaves(variables) -> list[bool]:
  """Per leaf of `variables` (in `jax.tree.leaves` order): is it a weight kernel?

  Keras and Flax name the weights that multiply data `kernel` (`depthwise_kernel`,
  `pointwise_kernel`); BatchNorm's scale and statistics and the biases are not kernels.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  return [str(getattr(path[-1], 'key', path[-1])).endswith('kernel') for path, _ in leaves]


def receptive_field_advice(layers: Sequence[LayerReport],
                           input_shape: Sequence[int]) -> dict[str, Any]:
  """Compares the receptive field of the network's output with the image; advice, never an error.

  "The output" is the last layer that still has spatial axes (for Model 3, its last 1x1
  convolution, 30 pixels on a 32x32 image): global average pooling after it sees the whole map by
  construction (its own row says 34 for Model 3), but it only averages features that each saw the
  receptive field of that last spatial layer. Thresholds, per axis:

  * 'short': smaller than the image; no output feature sees the whole image.
  * 'covers': at least the image size, and at most `RF_OVERSHOOT_FACTOR` (4) times it.
  * 'overshoots': more than 4 times the image; the deepest layers mostly see padding.

  Two more: 'whole', when global context (a value pooled over the map: squeeze-and-excitation,
  attention, a norm over the map) makes every pixel of that layer see the whole image, and
  'unknown', when the analysis could not follow the map up to it.

  Returns the `ModelReport` fields `output_receptive_field`, `receptive_field_layer`,
  `receptive_field_status` and `receptive_field_verdict` (one or two plain sentences saying what
  to change: pooling position, kernel size, dilation, depth).
  """
  spatial = [l for l in layers if len(l.output_shape) == 3]
  if not spatial:
    return {'output_receptive_field': None, 'receptive_field_layer': None,
            'receptive_field_status': 'none',
            'receptive_field_verdict': 'No layer keeps spatial axes: no receptive-field advice.'}
  last = spatial[-1]
  image = tuple(input_shape[:2])
  size = f'{image[0]}x{image[1]}'
  if last.receptive_field is None:
    return {'output_receptive_field': None, 'receptive_field_layer': last.name,
            'receptive_field_status': 'unknown',
            'receptive_field_verdict': f'The output\'s receptive field at {last.name} (the last '
                                       'layer with spatial axes) is unknown: the analysis could '
                                       'not follow the map there (see "Not analysed").'}
  if last.sees_whole_image:
    return {'output_receptive_field': last.receptive_field, 'receptive_field_layer': last.name,
            'receptive_field_status': 'whole',
            'receptive_field_verdict': f'Every output pixel at {last.name} (the last layer with '
                                       f'spatial axes) sees the whole {size} image: global '
                                       'context (a value pooled over the map) is mixed into '
                                       'the map before it.'}
  rf, jump = _pair(last.receptive_field), _pair(last.jump)
  seen = (f'The output\'s receptive field, {_fmt(last.receptive_field)} pixels at {last.name} '
          '(the last layer with spatial axes),')
  if any(r < s for r, s in zip(rf, image)):
    status = 'short'
    verdict = (f'{seen} falls short of the {size} image: no output feature sees the whole image '
               'before global pooling averages them. To widen it: move a pooling layer earlier '
               '(every later layer then grows it faster), use larger kernels or dilation in the '
               f'last layers, or add depth (one more 3x3 layer there adds {2 * max(jump)}).')
  elif any(r > RF_OVERSHOOT_FACTOR * s for r, s in zip(rf, image)):
    status = 'overshoots'
    times = max(r / s for r, s in zip(rf, image))
    verdict = (f'{seen} overshoots the {size} image {times:.1f} times: the deepest layers mostly '
               'see padding. Use fewer layers or smaller kernels or dilation there, or move a '
               'pooling layer later, and spend the parameters on width instead.')
  else:
    status = 'covers'
    verdict = f'{seen} covers the whole {size} image.'
  return {'output_receptive_field': last.receptive_field, 'receptive_field_layer': last.name,
          'receptive_field_status': status, 'receptive_field_verdict': verdict}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _subtree(tree, path):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return {}
    tree = tree[p]
  return tree


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def _violations(report: ModelReport, walker: _Walker, uses_batch_norm: Callable[[], bool],
                c: Any) -> list[str]:
  get = c.get if hasattr(c, 'get') else lambda k, d=None: getattr(c, k, d)
  out = []
  max_params = int(get('max_params', 0) or 0)
  if max_params and report.params_total >= max_params:
    out.append(f'{report.params_total:,} parameters (Keras count, BatchNorm statistics included) '
               f'is not below constraints.max_params={max_params:,}')
  if get('depthwise_separable_only', False):
    out.extend(walker.violations_conv)
  if not get('allow_dense', True):
    out.extend(v for k, v in enumerate(walker.dense_ops) if k not in walker.gates)
  if get('require_batch_norm', False) and not uses_batch_norm():
    out.append('the model has no BatchNorm layer (constraints.require_batch_norm=True)')
  return out


def format_table(report: ModelReport, title: str = '') -> str:
  """A Keras-summary-like table with MACs, activation, receptive field and jump columns, the
  totals and the receptive-field advice."""
  header = ('Layer', 'Type', 'Output', 'Params', 'MACs', 'Act. bytes', 'RF', 'Jump')
  body = []
  for layer in report.layers:
    shape = 'x'.join(str(s) for s in layer.output_shape)
    rf = 'image' if layer.sees_whole_image else _fmt(layer.receptive_field)
    body.append((layer.name, layer.type, shape, f'{layer.params:,}', f'{layer.macs:,}',
                 f'{layer.activation_bytes:,}', rf, _fmt(layer.jump)))
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  line = lambda r: '  '.join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  rule = '-' * len(line(header))
  out = []
  if title:
    out.append(title)
  out += [rule, line(header), rule] + [line(r) for r in body] + [rule]
  out.append(f'Total params: {report.params_total:,}')
  out.append(f'Trainable params: {report.params_trainable:,}')
  out.append(f'Non-trainable params: {report.params_non_trainable:,}')
  out.append(f'MACs per image: {report.macs_total:,} (convolutions and matrix products)')
  out.append(f'Activations per image: {report.activation_bytes_total:,} bytes (all layer outputs; '
             f'largest {report.activation_bytes_max:,})')
  out.extend(textwrap.wrap(report.receptive_field_verdict, 100))
  if report.global_context:
    out.extend(textwrap.wrap(
        'Global context: every pixel sees the whole image (RF "image") after '
        f'{"; ".join(report.global_context)}, where a value pooled over the map is mixed back '
        'into it (squeeze-and-excitation, attention, a norm over the map).', 100))
  if report.unknown:
    out.append('Not analysed (rows show "?"; the constraints are checked on everything else):')
    out.extend(textwrap.fill(u, 100, initial_indent='  - ', subsequent_indent='    ')
               for u in report.unknown)
  return '\n'.join(out)


def _fmt(v: int | list[int] | None) -> str:
  if v is None:
    return '?'
  return str(v) if isinstance(v, int) else 'x'.join(map(str, v))


def batch_norm_settings(model: nn.Module, input_shape: Sequence[int]
                        ) -> list[tuple[float, float]]:
  """(momentum, epsilon) of every `flax.linen.BatchNorm` or `flax.nnx.BatchNorm` that `model`
  calls, in call order (the project's BatchNorm layers wrap one), found by tracing it in
  evaluation mode abstractly."""
  settings = []

  def record(module, next_fun, args, kwargs):
    out = next_fun(*args, **kwargs)
    # Read after the call: an inner interceptor may set them (`models.BatchNormOverride`).
    if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
      settings.append((float(module.momentum), float(module.epsilon)))
    return out

  def linen(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    return record(context.module, next_fun, args, kwargs)

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = _abstract_variables(model, input_shape)
  with nn.intercept_methods(linen), nnx_adapter.intercept_calls(
      lambda path, *call: record(*call)):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return settings


# ---------------------------------------------------------------------------------------------
# Parameter structure: which parameters are convolution kernels and which are the shifts of a
# normalisation, found from what the traced model computes with them, never from their names.

# Operations that move or retype the elements of one array without mixing them: a kernel reaches
# its convolution through them (a reshape to the grouped layout, a squeeze of a 1x1 kernel's
# taps, a cast to the compute dtype), a bias its addition (a broadcast over the map).
_VIEWS = frozenset({'convert_element_type', 'reshape', 'squeeze', 'expand_dims', 'transpose',
                    'copy', 'copy_p', 'broadcast_in_dim', 'slice', 'reduce_precision'})
# Those of them that lose nothing when they keep the number of elements: the kernel in the
# convolution's layout then gives back the parameter (`Convolution.from_hwio`).
_BIJECTIVE = _VIEWS - {'reduce_precision'}


@dataclasses.dataclass(frozen=True)
class Convolution:
  """A convolution the model computes (a 1x1 one may be a matrix product on the map)."""
  path: tuple[str, ...] | None  # Its kernel's path in the 'params' collection; None if computed.
  groups: int
  in_channels: int
  out_channels: int
  kernel_size: tuple[int, ...]
  # The kernel parameter's value -> the kernel in (*kernel_size, in_channels / groups,
  # out_channels) layout, and back; None when the parameter does not reach the convolution
  # element for element.
  to_hwio: Callable[[jax.Array], jax.Array] | None = None
  from_hwio: Callable[[jax.Array], jax.Array] | None = None

  @property
  def depthwise(self) -> bool:
    """One input channel per group (a depthwise convolution, any depth multiplier)."""
    return self.groups > 1 and self.groups == self.in_channels


@dataclasses.dataclass(frozen=True)
class Normalisation:
  """Data scaled by the inverse of a standard deviation (BatchNorm, LayerNorm, GroupNorm, ...)."""
  moving: bool  # Its statistics are stored variables (BatchNorm's moving averages), not the data's.
  shift: tuple[str, ...] | None  # The path of the parameter added right after it (its bias).


@dataclasses.dataclass(frozen=True)
class Structure:
  """The convolutions and normalisations of a model, traced once (`parameter_structure`)."""
  convolutions: tuple[Convolution, ...]
  normalisations: tuple[Normalisation, ...]

  def batch_norm_bias_mask(self, params) -> Any:
    """True for the shift (bias) of every normalisation by moving statistics: BatchNorm's."""
    shifts = {n.shift for n in self.normalisations if n.moving and n.shift is not None}
    return jax.tree_util.tree_map_with_path(lambda path, _: _keys(path) in shifts, params)

  def grouped_convolutions(self) -> list[int]:
    """The groups of every convolution with more than one (depthwise ones included), sorted."""
    return sorted(c.groups for c in self.convolutions if c.groups > 1)


@dataclasses.dataclass(frozen=True)
class _Source:
  """What one traced array is made of, for `_StructureWalker`.

  `data`: computed from the image; `moving`: from variables outside 'params' (BatchNorm's moving
  statistics); `param`, with `chain`: a view (`_VIEWS`) of that one parameter alone, through
  those operations. `inv_std`, `std`: an inverse standard deviation (times scales) or a standard
  deviation, True when of moving statistics; `normalised`: data scaled by one, the index of its
  `Normalisation`.
  """
  data: bool = False
  moving: bool = False
  param: tuple[str, ...] | None = None
  chain: tuple[Any, ...] = ()
  inv_std: bool | None = None
  std: bool | None = None
  normalised: int | None = None


class _StructureWalker:
  """Follows parameters through a jaxpr to the convolutions and normalisations that use them."""

  def __init__(self, param_avals: dict[tuple[str, ...], Any]):
    self.param_avals = param_avals
    self.convolutions: list[Convolution] = []
    self.normalisations: list[dict[str, Any]] = []

  def run(self, jaxpr, sources: Sequence[_Source]) -> list[_Source]:
    env = dict(zip(jaxpr.invars, sources))
    read = lambda v: _Source() if isinstance(v, jax.extend.core.Literal) else env.get(v, _Source())
    for eqn in jaxpr.eqns:
      outs = self._eqn(eqn, [read(v) for v in eqn.invars])
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn, ins: list[_Source]) -> list[_Source]:
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if name in _CALLS else None
    if sub is not None:
      return self.run(sub, ins)
    plain = _Source(data=any(i.data for i in ins), moving=any(i.moving for i in ins))
    arrays = [k for k, v in enumerate(eqn.invars) if not isinstance(v, jax.extend.core.Literal)]
    if name in _VIEWS and len(arrays) == 1:
      i = ins[arrays[0]]
      return [dataclasses.replace(i, chain=i.chain + (eqn,) if i.param else ())]
    if name == 'conv_general_dilated':
      self._conv(eqn, ins)
    elif name == 'dot_general':
      self._matmul(eqn, ins)
    elif name in ('rsqrt', 'sqrt') and (ins[0].data or ins[0].moving):
      key = 'inv_std' if name == 'rsqrt' else 'std'
      return [dataclasses.replace(plain, **{key: not ins[0].data})]
    elif name == 'mul' and len(ins) == 2:
      return [self._mul(plain, ins)]
    elif name == 'div' and ins[0].data and ins[0].inv_std is None and ins[1].std is not None:
      return [self._normalised(plain, ins[1].std)]
    elif name in ('add', 'sub') and len(ins) == 2:
      for a, b in (ins, ins[::-1]):
        if a.normalised is not None and b.param is not None and not (b.data or b.moving):
          self.normalisations[a.normalised]['shift'] = b.param
    return [plain] * len(eqn.outvars)

  def _mul(self, plain: _Source, ins: list[_Source]) -> _Source:
    for a, b in (ins, ins[::-1]):
      if a.inv_std is not None and b.inv_std is None and not b.data:
        return dataclasses.replace(plain, inv_std=a.inv_std)  # Times a scale parameter.
      if a.inv_std is not None and b.data and b.inv_std is None and b.normalised is None:
        return self._normalised(plain, a.inv_std)
      if a.normalised is not None and not (b.data or b.moving):
        return dataclasses.replace(plain, normalised=a.normalised)  # Scaled after normalising.
    return plain

  def _normalised(self, plain: _Source, moving: bool) -> _Source:
    self.normalisations.append({'moving': moving, 'shift': None})
    return dataclasses.replace(plain, normalised=len(self.normalisations) - 1)

  def _conv(self, eqn, ins: list[_Source]) -> None:
    lhs, rhs = ins
    if not lhs.data or rhs.data or eqn.params['batch_group_count'] != 1:
      return
    spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...) axes of the kernel.
    shape = eqn.invars[1].aval.shape
    groups = eqn.params['feature_group_count']
    order = (*spec[2:], spec[1], spec[0])
    self._record(rhs, eqn.invars[1].aval, lambda w: jnp.transpose(w, order), groups,
                 shape[spec[1]] * groups, shape[spec[0]], tuple(shape[d] for d in spec[2:]))

  def _matmul(self, eqn, ins: list[_Source]) -> None:
    """A matrix product of a map (batch, height, width, ...) with a kernel matrix: a 1x1 conv."""
    (contract, batch) = eqn.params['dimension_numbers']
    for k in (0, 1):
      data, kernel, aval = ins[k], ins[1 - k], eqn.invars[1 - k].aval
      if (data.data and not kernel.data and len(eqn.invars[k].aval.shape) >= 4
          and len(aval.shape) == 2 and len(contract[1 - k]) == 1 and not batch[0]):
        c = contract[1 - k][0]
        in_ch, out_ch = aval.shape[c], aval.shape[1 - c]
        to_hwio = lambda w, c=c, n=in_ch, m=out_ch: jnp.reshape(w if c == 0 else w.T, (1, 1, n, m))
        self._record(kernel, aval, to_hwio, 1, in_ch, out_ch, (1, 1))

  def _record(self, kernel: _Source, aval, layout: Callable, groups: int, in_ch: int,
              out_ch: int, size: tuple[int, ...]) -> None:
    to_hwio = from_hwio = None
    if kernel.param is not None:
      leaf = self.param_avals[kernel.param]
      chain = kernel.chain
      if (all(e.primitive.name in _BIJECTIVE for e in chain)
          and math.prod(leaf.shape) == math.prod(aval.shape)):
        to_hwio = lambda w: layout(_apply_chain(chain, w))
        spec = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        # A permutation of the elements: its transpose is its inverse.
        from_hwio = lambda w: jax.linear_transpose(to_hwio, spec)(w.astype(leaf.dtype))[0]
    self.convolutions.append(Convolution(kernel.param, groups, in_ch, out_ch, size, to_hwio,
                                         from_hwio))


def _apply_chain(chain: Sequence[Any], value: jax.Array) -> jax.Array:
  """`value` through the recorded view operations (each with one array operand)."""
  for eqn in chain:
    args = [v.val if isinstance(v, jax.extend.core.Literal) else value for v in eqn.invars]
    value = eqn.primitive.bind(*args, **eqn.params)
  return value


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def structure_of(apply: Callable[[Any, jax.Array], Any], variables, image) -> Structure:
  """The `Structure` of `apply(variables, image)`, traced once (nothing is computed).

  `variables` maps collection names to trees ('params' holds the parameters; any other
  collection, such as 'batch_stats', holds stored statistics); `image` is an array or a
  `jax.ShapeDtypeStruct`. Works for any way of writing a model that can be called so.
  """
  closed = jax.make_jaxpr(apply)(variables, image)
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  sources, avals = [], {}
  for path, leaf in leaves:
    keys = _keys(path)
    if keys[0] == 'params':
      avals[keys[1:]] = leaf
      sources.append(_Source(param=keys[1:]))
    else:
      sources.append(_Source(moving=True))
  walker = _StructureWalker(avals)
  walker.run(closed.jaxpr, sources + [_Source(data=True)])
  return Structure(tuple(walker.convolutions),
                   tuple(Normalisation(**n) for n in walker.normalisations))


def parameter_structure(model: nn.Module, input_shape: Sequence[int]) -> Structure:
  """The convolutions and normalisations of a Linen `model` on one image of `input_shape`.

  Traced in evaluation mode with every layer of the project in its plain form (`_grouped_forms`:
  depthwise convolutions grouped, one `conv_general_dilated` each), so that each convolution is
  one operation whatever form the run trains with; the parameters are the same in every form.
  """
  image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def apply(variables, x):
    with nn.intercept_methods(_grouped_forms):
      return model.apply(variables, x, train=False)

  return structure_of(apply, _abstract_variables(model, input_shape), image)


def _grouped_forms(next_fun, args, kwargs, context):
  """A Flax interceptor: a module with layer `Options` computes with grouped depthwise
  convolutions during its call (the form changes how, never what; the trace runs nothing)."""
  module = context.module
  options = getattr(module, 'options', None)
  if not isinstance(options, layers_lib.Options) or options.depthwise == 'grouped':
    return next_fun(*args, **kwargs)
  object.__setattr__(module, 'options', dataclasses.replace(options, depthwise='grouped'))
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, 'options', options)


def batch_norm_biases(model: nn.Module, input_shape: Sequence[int]) -> Callable[[Any], Any]:
  """params -> True for the biases of `model`'s BatchNorm layers (normalisations by moving
  statistics), for `optim.create_optimizer`; the model is traced on the first call only."""
  structure = functools.cache(lambda: parameter_structure(model, input_shape))
  return lambda params: structure().batch_norm_bias_mask(params)
