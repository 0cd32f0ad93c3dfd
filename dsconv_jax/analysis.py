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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsconv_jax import layers as layers_lib

_MARKER_PREFIX = '_dsconv_layer_'


@dataclasses.dataclass
class LayerReport:
  name: str
  type: str
  output_shape: list[int]
  params: int
  params_trainable: int
  receptive_field: int | list[int]
  jump: int | list[int]


@dataclasses.dataclass
class ModelReport:
  input_shape: list[int]
  layers: list[LayerReport]
  params_total: int
  params_trainable: int
  params_non_trainable: int
  violations: list[str]

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
  """Propagates `_Info` through a jaxpr; records markers, convolution and matmul facts."""

  def __init__(self):
    self.marked: dict[int, _Info | None] = {}
    self.violations_conv: list[str] = []
    self.dense_ops: list[str] = []

  def run(self, jaxpr, in_infos):
    env: dict[Any, _Info | None] = {}
    read = lambda v: None if isinstance(v, jax.extend.core.Literal) else env.get(v)
    for v, info in zip(jaxpr.invars, in_infos):
      env[v] = info
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self._eqn(eqn, ins)
      for v, info in zip(eqn.outvars, outs):
        env[v] = info
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn, ins):
    name = eqn.primitive.name
    params = eqn.params
    where = str(eqn.source_info.name_stack).partition('/')[2] or '(top level)'
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      fn_name = params.get('name', '')
      if isinstance(fn_name, str) and fn_name.startswith(_MARKER_PREFIX):
        self.marked[int(fn_name[len(_MARKER_PREFIX):])] = ins[0]
      if len(sub.invars) == len(ins):
        return self.run(sub, ins)
    known = [i for i in ins if i is not None]
    merged = None
    for i in known:
      merged = i if merged is None else merged.union(i)
    n_out = len(eqn.outvars)
    if merged is None:
      return [None] * n_out
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
  require_batch_norm, allow_dense) adds one violation string per broken rule.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  key = jax.random.key(0)
  variables = jax.eval_shape(
      lambda x: model.init({'params': key, 'dropout': key}, jnp.zeros(x.shape), train=False), x)

  rows: list[dict[str, Any]] = []
  active: list[nn.Module] = []
  saw_batch_norm = [False]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, layers_lib.Layer):
      return next_fun(*args, **kwargs)
    outermost = not active
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
                 'shape': list(out.shape[1:])})
    marker = lambda t: t
    marker.__name__ = f'{_MARKER_PREFIX}{index}'
    return jax.jit(marker)(out)

  def apply(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  closed = jax.make_jaxpr(apply)(variables, x)
  walker = _Walker()
  n_var_leaves = len(jax.tree.leaves(variables))
  in_infos = [None] * n_var_leaves + [_Info((0, 0), (0, 0), (1, 1))]
  walker.run(closed.jaxpr, in_infos)

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
        params_trainable=n_train, receptive_field=rf, jump=jump))

  total = _count(variables)
  n_trainable = _count(trainable)
  report = ModelReport(input_shape=list(input_shape), layers=layer_reports, params_total=total,
                       params_trainable=n_trainable, params_non_trainable=total - n_trainable,
                       violations=[])
  if constraints is not None:
    report.violations = _violations(report, walker, saw_batch_norm[0], constraints)
  return report


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
  """A Keras-summary-like table with receptive field and jump columns, and the totals."""
  header = ('Layer', 'Type', 'Output', 'Params', 'RF', 'Jump')
  body = []
  for layer in report.layers:
    shape = 'x'.join(str(s) for s in layer.output_shape)
    body.append((layer.name, layer.type, shape, f'{layer.params:,}', _fmt(layer.receptive_field),
                 _fmt(layer.jump)))
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
  return '\n'.join(out)


def _fmt(v: int | list[int]) -> str:
  return str(v) if isinstance(v, int) else 'x'.join(map(str, v))
