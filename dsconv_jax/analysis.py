"""What a model is, computed from its real computation: layers, shapes, parameters, receptive fields.

`analyze_model` traces the model once (`jax.make_jaxpr`, eval mode, nothing is run) with a Flax
method interceptor that records every call of a `dsconv_jax.layers.Layer` (name, type, output shape,
parameters) and tags its output with a marker. The receptive field is then propagated through the
jaxpr primitive by primitive, so it is exact for any topology (residual branches, 'same' padding,
strided and dilated convolutions, shifted-slice depthwise convolutions), with nothing typed in by
hand. For each array we keep, per spatial axis, the interval of input pixels that output pixel 0 sees
(`lo`, `hi`) and the jump (input pixels between neighbouring outputs); the receptive field is
`hi - lo + 1`.

The same walk checks the design constraints of the source studies on the real operations: a k x k
convolution (k > 1) across channels, a dense layer (a matrix product on features with no spatial
axes left) and the absence of BatchNorm are violations when the config forbids them.

It also counts the multiply-accumulates (MACs) of one image, per layer and in total. Counted are
the operations that multiply data by weights: convolutions (output elements x kh*kw*Cin/groups),
matrix products (output elements x contracted size), and elementwise products of data with a
value computed from kernel weights alone, which is how the shifted depthwise form multiplies, so
that both depthwise forms count the same. BatchNorm, biases, activations and pooling are not
counted (Model 3's BatchNorm layers, folded into one multiply-add per element, would add 210,048,
1.9%). The operations of a layer are those traced between its call and its return (markers around
each top-level `Layer` call); an operation outside every layer counts only in the total.

Finally, `receptive_field_advice` compares the receptive field of the output with the image; see
its docstring for the thresholds.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsconv_jax import layers as layers_lib

_MARKER_PREFIX = '_dsconv_layer_'
_BEGIN_PREFIX = '_dsconv_begin_'
# A receptive field more than this many times the image size "overshoots" it (see
# `receptive_field_advice`).
RF_OVERSHOOT_FACTOR = 4


@dataclasses.dataclass
class LayerReport:
  name: str
  type: str
  output_shape: list[int]
  params: int
  params_trainable: int
  receptive_field: int | list[int]
  jump: int | list[int]
  macs: int = 0  # Multiply-accumulates per image (see the module docstring).
  activation_bytes: int = 0  # Size of the layer's output per image.


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

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Info:
  """Receptive-field state of one array: per spatial axis (lo, hi) of output pixel 0, and jump."""
  lo: tuple[int, int]
  hi: tuple[int, int]
  jump: tuple[int, int]

  def union(self, other: '_Info') -> '_Info':
    return _Info(tuple(map(min, self.lo, other.lo)), tuple(map(max, self.hi, other.hi)),
                 tuple(map(max, self.jump, other.jump)))

  def window(self, axis: int, size: int, stride: int, dilation: int, pad_lo: int) -> '_Info':
    lo, hi, jump = list(self.lo), list(self.hi), list(self.jump)
    lo[axis] -= pad_lo * jump[axis]
    hi[axis] += ((size - 1) * dilation - pad_lo) * jump[axis]
    jump[axis] *= stride
    return _Info(tuple(lo), tuple(hi), tuple(jump))

  def size(self) -> tuple[int, int]:
    return tuple(h - l + 1 for l, h in zip(self.lo, self.hi))


def _squash(v: Sequence[int]) -> int | list[int]:
  return int(v[0]) if v[0] == v[1] else [int(x) for x in v]


class _Walker:
  """Propagates `_Info` through a jaxpr; records markers, convolution and matmul facts, MACs."""

  def __init__(self):
    self.marked: dict[int, _Info | None] = {}
    self.violations_conv: list[str] = []
    self.dense_ops: list[str] = []
    self.macs: dict[int, int] = {}  # Per layer row, by index.
    self.macs_total = 0
    self._layer: int | None = None  # The row whose operations are being walked.
    # Vars computed from kernel weights alone (no input pixel): multiplying data by one is a MAC.
    self._weights: set[Any] = set()

  def run(self, jaxpr, in_infos, in_weights=None):
    env: dict[Any, _Info | None] = {}
    read = lambda v: None if isinstance(v, jax.extend.core.Literal) else env.get(v)
    for v, info, weight in zip(jaxpr.invars, in_infos, in_weights or [False] * len(in_infos)):
      env[v] = info
      self._set_weight(v, weight)
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      weights = [self._is_weight(v) for v in eqn.invars]
      outs = self._eqn(eqn, ins, weights)
      sub = _sub_jaxpr(eqn)
      if sub is not None and len(sub.invars) == len(ins):
        out_weights = [self._is_weight(v) for v in sub.outvars]
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

  def _eqn(self, eqn, ins, weights):
    name = eqn.primitive.name
    params = eqn.params
    where = str(eqn.source_info.name_stack).partition('/')[2] or '(top level)'
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      fn_name = params.get('name', '')
      if isinstance(fn_name, str) and fn_name.startswith(_MARKER_PREFIX):
        self.marked[int(fn_name[len(_MARKER_PREFIX):])] = ins[0]
        self._layer = None
      elif isinstance(fn_name, str) and fn_name.startswith(_BEGIN_PREFIX):
        self._layer = int(fn_name[len(_BEGIN_PREFIX):])
      if len(sub.invars) == len(ins):
        return self.run(sub, ins, weights)
    known = [i for i in ins if i is not None]
    merged = None
    for i in known:
      merged = i if merged is None else merged.union(i)
    n_out = len(eqn.outvars)
    if merged is None:
      return [None] * n_out
    self._count_macs(eqn, weights)
    if name == 'conv_general_dilated':
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      dn = params['dimension_numbers']
      lhs_spatial, rhs_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:]
      kernel = [rhs.shape[d] for d in rhs_spatial]
      in_ch = lhs.shape[dn.lhs_spec[1]]
      groups = params['feature_group_count']
      info = ins[0]
      for axis in range(2):
        info = info.window(axis, kernel[axis], params['window_strides'][axis],
                           params['rhs_dilation'][axis], params['padding'][axis][0])
      if max(kernel) > 1 and groups < in_ch:
        self.violations_conv.append(
            f'{where}: a {kernel[0]}x{kernel[1]} convolution across channels '
            f'({in_ch} inputs, feature_group_count={groups}) is not depthwise-separable')
      if all(lhs.shape[d] == 1 for d in lhs_spatial) and max(kernel) == 1:
        self.dense_ops.append(f'{where}: a 1x1 convolution on a 1x1 map is a dense layer')
      return [info]
    if name.startswith('reduce_window') or name in ('reduce_window', 'max_pool', 'avg_pool'):
      info = merged
      for axis in range(2):
        d = axis + 1
        info = info.window(axis, params['window_dimensions'][d], params['window_strides'][d],
                           params['window_dilation'][d], params['padding'][d][0])
      return [info] * n_out
    if name == 'pad':
      info = merged
      config = params['padding_config']
      return [_Info(tuple(info.lo[a] - config[a + 1][0] * info.jump[a] for a in range(2)),
                    tuple(info.hi[a] - config[a + 1][0] * info.jump[a] for a in range(2)),
                    info.jump)]
    if name == 'slice' and len(eqn.invars[0].aval.shape) == 4:
      info = merged
      start, strides = params['start_indices'], params['strides'] or (1,) * 4
      return [_Info(tuple(info.lo[a] + start[a + 1] * info.jump[a] for a in range(2)),
                    tuple(info.hi[a] + start[a + 1] * info.jump[a] for a in range(2)),
                    tuple(info.jump[a] * strides[a + 1] for a in range(2)))]
    if name in ('reduce_sum', 'reduce_max', 'reduce_min', 'argmax', 'argmin', 'reduce_prod'):
      shape = eqn.invars[0].aval.shape
      if len(shape) == 4:
        return [_globalize(merged, shape, [a - 1 for a in params['axes'] if a in (1, 2)])] * n_out
    if name == 'reshape':
      shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      if len(shape) == 4 and tuple(out_shape[:3]) != tuple(shape[:3]):
        return [_globalize(merged, shape, [0, 1])]
    if name == 'dot_general':
      lhs = eqn.invars[0].aval.shape
      if len(lhs) <= 2 and len(eqn.invars[1].aval.shape) <= 2:
        self.dense_ops.append(f'{where}: a dense layer (matrix product on features)')
      elif len(lhs) == 4 and lhs[1] == lhs[2] == 1:
        self.dense_ops.append(f'{where}: a 1x1 convolution on a 1x1 map is a dense layer')
    return [merged] * n_out


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


def _globalize(info: _Info, shape, axes) -> _Info:
  """A reduction over spatial axes sees the whole extent of those axes."""
  lo, hi, jump = list(info.lo), list(info.hi), list(info.jump)
  for a in axes:
    n = shape[a + 1]
    hi[a] += (n - 1) * jump[a]
    jump[a] *= n
  return _Info(tuple(lo), tuple(hi), tuple(jump))


def _sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    return getattr(sub, 'jaxpr', sub) if not hasattr(sub, 'eqns') else sub
  return None


def analyze_model(model: nn.Module, input_shape: Sequence[int],
                  constraints: Any = None) -> ModelReport:
  """Traces `model` on one image of `input_shape` (H, W, C) and reports every layer.

  `constraints` (a ConfigDict or mapping with max_params, depthwise_separable_only,
  require_batch_norm, allow_dense) adds one violation string per broken rule. The batch of the
  trace is one image, so MACs and activation sizes are per image.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = _abstract_variables(model, input_shape)

  rows: list[dict[str, Any]] = []
  active: list[nn.Module] = []
  saw_batch_norm = [False]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, layers_lib.Layer):
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
    if isinstance(module, layers_lib.BatchNorm):
      saw_batch_norm[0] = True
    if not outermost:
      return out
    index = len(rows)
    rows.append({'path': tuple(module.scope.path), 'type': type(module).__name__,
                 'shape': list(out.shape[1:]), 'itemsize': out.dtype.itemsize})
    return _tag(out, f'{_MARKER_PREFIX}{index}')

  def apply(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  closed = jax.make_jaxpr(apply)(variables, x)
  walker = _Walker()
  n_var_leaves = len(jax.tree.leaves(variables))
  in_infos = [None] * n_var_leaves + [_Info((0, 0), (0, 0), (1, 1))]
  walker.run(closed.jaxpr, in_infos, _kernel_leaves(variables) + [False])

  trainable = variables.get('params', {})
  layer_reports = []
  for index, row in enumerate(rows):
    info = walker.marked.get(index)
    n_train = _count(_subtree(trainable, row['path']))
    n_all = sum(_count(_subtree(tree, row['path'])) for tree in variables.values())
    rf = _squash(info.size()) if info else 1
    jump = _squash(info.jump) if info else 1
    layer_reports.append(LayerReport(
        name='/'.join(row['path']), type=row['type'], output_shape=row['shape'], params=n_all,
        params_trainable=n_train, receptive_field=rf, jump=jump, macs=walker.macs.get(index, 0),
        activation_bytes=math.prod(row['shape']) * row['itemsize']))

  total = _count(variables)
  n_trainable = _count(trainable)
  activations = [l.activation_bytes for l in layer_reports]
  report = ModelReport(input_shape=list(input_shape), layers=layer_reports, params_total=total,
                       params_trainable=n_trainable, params_non_trainable=total - n_trainable,
                       violations=[], macs_total=walker.macs_total,
                       activation_bytes_total=sum(activations),
                       activation_bytes_max=max(activations, default=0),
                       **receptive_field_advice(layer_reports, input_shape))
  if constraints is not None:
    report.violations = _violations(report, walker, saw_batch_norm[0], constraints)
  return report


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """The Keras parameter count of `model` (BatchNorm statistics included), without a full trace.

  Equal to `analyze_model(...).params_total`, at a fraction of its cost (`dsconv_jax.budget`
  calls it many times).
  """
  return _count(_abstract_variables(model, input_shape))


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
  rf, jump, image = _pair(last.receptive_field), _pair(last.jump), tuple(input_shape[:2])
  seen = (f'The output\'s receptive field, {_fmt(last.receptive_field)} pixels at {last.name} '
          '(the last layer with spatial axes),')
  size = f'{image[0]}x{image[1]}'
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


def _violations(report: ModelReport, walker: _Walker, saw_batch_norm: bool, c: Any) -> list[str]:
  get = c.get if hasattr(c, 'get') else lambda k, d=None: getattr(c, k, d)
  out = []
  max_params = int(get('max_params', 0) or 0)
  if max_params and report.params_total >= max_params:
    out.append(f'{report.params_total:,} parameters (Keras count, BatchNorm statistics included) '
               f'is not below constraints.max_params={max_params:,}')
  if get('depthwise_separable_only', False):
    out.extend(walker.violations_conv)
  if not get('allow_dense', True):
    out.extend(walker.dense_ops)
  if get('require_batch_norm', False) and not saw_batch_norm:
    out.append('the model has no BatchNorm layer (constraints.require_batch_norm=True)')
  return out


def format_table(report: ModelReport, title: str = '') -> str:
  """A Keras-summary-like table with MACs, activation, receptive field and jump columns, the
  totals and the receptive-field advice."""
  header = ('Layer', 'Type', 'Output', 'Params', 'MACs', 'Act. bytes', 'RF', 'Jump')
  body = []
  for layer in report.layers:
    shape = 'x'.join(str(s) for s in layer.output_shape)
    body.append((layer.name, layer.type, shape, f'{layer.params:,}', f'{layer.macs:,}',
                 f'{layer.activation_bytes:,}', _fmt(layer.receptive_field), _fmt(layer.jump)))
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
  return '\n'.join(out)


def _fmt(v: int | list[int]) -> str:
  return str(v) if isinstance(v, int) else 'x'.join(map(str, v))


def batch_norm_momenta(model: nn.Module, input_shape: Sequence[int]) -> list[float]:
  """The momentum of every `flax.linen.BatchNorm` that `model` calls (the project's BatchNorm
  layers wrap one), found by tracing its initialisation abstractly."""
  momenta = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      momenta.append(float(context.module.momentum))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape))))
  return momenta
