"""A model written in the config file: `config.model = 'sequential'` and `config.layers`.

`config.layers` is a list of strings, each one Keras layer call, with Keras' class names, argument
names, argument order and defaults (padding 'valid', use_bias=True, ...)::

    config.model = 'sequential'
    config.layers = [
        'SeparableConv2D(32, 3, padding="same", use_bias=False)',
        'BatchNormalization()',
        'Activation("relu")',
        'MaxPooling2D()',
        'Residual([SeparableConv2D(32, 3, padding="same", use_bias=False), BatchNormalization()])',
        'ReLU()',
        'Conv2D("num_classes", 1, use_bias=False)',
        'GlobalAveragePooling2D()',
    ]

Each string is read with Python's `ast`, never evaluated: a call with positional and keyword
arguments whose values are literals (numbers, strings, True/False/None, tuples and lists of them).
A `keras.layers.` or `layers.` prefix is allowed. The layers, each built from the
`dsconv_jax.layers` layer named after the arrow (so that the summary shows one row per layer)::

  DepthwiseConv2D(kernel_size, strides=1, padding='valid', depth_multiplier=1, dilation_rate=1,
                  activation=None, use_bias=True)                       -> DepthwiseConv2D
  SeparableConv2D(filters, kernel_size, strides=1, padding='valid', dilation_rate=1,
                  depth_multiplier=1, activation=None, use_bias=True)   -> SeparableConv2D
  Conv2D(filters, kernel_size, strides=1, padding='valid', dilation_rate=1, activation=None,
         use_bias=True)          -> Conv2D; a 1x1 kernel at stride 1 -> PointwiseConv2D
  PointwiseConv2D(filters, activation=None, use_bias=True)              -> PointwiseConv2D
  Dense(units, activation=None, use_bias=True)                          -> Dense
  BatchNormalization(axis=-1, momentum=None, epsilon=None)              -> BatchNorm
  Dropout(rate)                                                         -> Dropout
  Activation(activation)   ('relu', 'relu6', 'gelu', 'silu', ...)       -> Activation
  ReLU(max_value=None)     (max_value None or 6)                        -> Activation
  MaxPooling2D(pool_size=2, strides=None, padding='valid')              -> MaxPool2D
  AveragePooling2D(pool_size=2, strides=None, padding='valid')          -> AvgPool2D
  GlobalAveragePooling2D()                                              -> GlobalAvgPool
  Flatten()                                                             -> Flatten
  Residual([LAYER, ...])   (this project's; see below)

Keras' aliases Convolution2D, SeparableConvolution2D, MaxPool2D, AvgPool2D and GlobalAvgPool2D
are accepted. Sizes (kernel_size, strides, dilation_rate, pool_size) are an int or a pair;
`activation=` on a convolution or Dense adds an Activation layer after it, as in Keras.
`BatchNormalization()` takes the model's `bn_momentum` and `bn_epsilon` (from `config.bn_momentum`
and `config.bn_epsilon`, Keras' 0.99 and 1e-3 by default); explicit momentum= and epsilon= win.

The classes layer. The output must be logits, one per class: shape (batch, num_classes). The layer
that produces them writes its filters (or units) as the string "num_classes", which becomes the
number of classes of the dataset, e.g. 'Conv2D("num_classes", 1, use_bias=False)' followed by
'GlobalAveragePooling2D()', or 'Dense("num_classes")'. Keras code as written works too: in a spec
without "num_classes", the last entry with filters or units is the classes layer, and its number
(e.g. 'Conv2D(10, 1, use_bias=False)') must equal the dataset's number of classes (a one-line
error says so when it does not). Every other width written as a number is a hidden width, scaled
by the model's `width_multiplier` (`scale_width`), so that `config.fit_params` fits any spec to a
budget; the classes layer is never scaled. A spec whose output is not (batch, num_classes) is
refused.

Residual blocks. 'Residual([LAYER, LAYER, ...])' runs its layers (written as calls, like list
entries but without their quotes; a quoted string is accepted too) on its input x and returns
x + f(x), the identity shortcut of ResNet: f must keep the shape of x (there is no projection
shortcut; change the width or size in a layer outside the block). The ReLU after the addition is
the next list entry, e.g. 'ReLU()'. Blocks may nest. `configs/my_sequential.py` has an example,
and `tests/test_sequential.py` writes the built-in models (DS-ResNet included) as specs.

Every mistake (a string that is not a call, an unknown layer or argument, a value of the wrong type
or range, a window that does not fit its input map, a residual branch that changes the shape, an
output that is not the logits) is a `UserError` of one line naming the entry by its Python index
(config.layers[0] is the first), e.g. "config.layers[3] 'MaxPooling2D(3, padding=\"full\")':
padding='full' must be 'same' or 'valid'".
Errors about shapes surface when the model is first traced (`summary`, or before training).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from dsconv_jax import layers as layers_lib
from dsconv_jax.errors import UserError

CLASSES = 'num_classes'  # The filters/units placeholder of the classes layer.
_REQUIRED = object()


class _Bad(Exception):
  """A problem with one argument value; becomes a UserError naming the entry."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One parsed entry of `config.layers`: a Keras layer name and its checked arguments.

  Hashable (a field of the `Sequential` module). `args` holds every argument of `kind`, the
  defaults filled in; `inner` holds a Residual block's layers.
  """
  kind: str  # Keras' class name, aliases resolved: 'SeparableConv2D', 'Residual', ...
  args: tuple[tuple[str, Any], ...]
  where: str  # 'config.layers[3]' (Python's index), or 'config.layers[3], residual layer 2'
  text: str  # The entry as written.
  inner: tuple['LayerSpec', ...] = ()
  # The classes layer written with a literal class count (Keras code as written): never scaled,
  # and the count must be the dataset's.
  classes: bool = False

  def arg(self, name: str) -> Any:
    return dict(self.args)[name]

  def error(self, problem: str) -> UserError:
    return UserError(f'{self.where} {self.text!r}: {problem}')


# Argument checks: each returns the value to keep (lists become tuples) or raises _Bad.

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _width(v):
  if v == CLASSES or (_is_int(v) and v > 0):
    return v
  raise _Bad(f'must be a positive integer, or "{CLASSES}" for the classes layer')


def _positive_int(v):
  if _is_int(v) and v > 0:
    return v
  raise _Bad('must be a positive integer')


def _size(v):
  if _is_int(v) and v > 0:
    return v
  if isinstance(v, tuple) and len(v) == 2 and all(_is_int(a) and a > 0 for a in v):
    return v
  raise _Bad('must be a positive integer or a pair of them, e.g. 3 or (3, 3)')


def _optional_size(v):
  return None if v is None else _size(v)


def _padding(v):
  if isinstance(v, str) and v.lower() in ('same', 'valid'):
    return v.lower()
  raise _Bad("must be 'same' or 'valid'")


def _bool(v):
  if isinstance(v, bool):
    return v
  raise _Bad('must be True or False')


def _rate(v):
  if _is_number(v) and 0 <= v < 1:
    return float(v)
  raise _Bad('must be a number in [0, 1)')


def _momentum(v):
  if v is None or (_is_number(v) and 0 <= v <= 1):
    return v if v is None else float(v)
  raise _Bad('must be a number in [0, 1] (or None: config.bn_momentum)')


def _epsilon(v):
  if v is None or (_is_number(v) and v > 0):
    return v if v is None else float(v)
  raise _Bad('must be a positive number (or None: config.bn_epsilon)')


def _activation(v):
  if isinstance(v, str) and v in layers_lib.ACTIVATIONS:
    return v
  raise _Bad(f'must be one of {", ".join(sorted(layers_lib.ACTIVATIONS))}')


def _optional_activation(v):
  return None if v is None else _activation(v)


def _axis(v):
  if v in (-1, 3) and _is_int(v):
    return v
  raise _Bad('must be -1 (channels last; the only layout here)')


def _relu_max(v):
  if v is None or (_is_number(v) and v == 6):
    return v
  raise _Bad('must be None (ReLU) or 6 (ReLU6)')


@dataclasses.dataclass(frozen=True)
class _Kind:
  """A layer's arguments: Keras' positional order (as far as supported) and name -> (default,
  check)."""
  positional: tuple[str, ...]
  args: dict[str, tuple[Any, Callable[[Any], Any]]]


_CONV = {'strides': (1, _size), 'padding': ('valid', _padding), 'dilation_rate': (1, _size)}
_POOL = _Kind(('pool_size', 'strides', 'padding'),
              {'pool_size': (2, _size), 'strides': (None, _optional_size),
               'padding': ('valid', _padding)})
KINDS: dict[str, _Kind] = {
    'DepthwiseConv2D': _Kind(
        ('kernel_size', 'strides', 'padding', 'depth_multiplier'),
        {'kernel_size': (_REQUIRED, _size), **_CONV, 'depth_multiplier': (1, _positive_int),
         'activation': (None, _optional_activation), 'use_bias': (True, _bool)}),
    'SeparableConv2D': _Kind(
        ('filters', 'kernel_size', 'strides', 'padding'),
        {'filters': (_REQUIRED, _width), 'kernel_size': (_REQUIRED, _size), **_CONV,
         'depth_multiplier': (1, _positive_int), 'activation': (None, _optional_activation),
         'use_bias': (True, _bool)}),
    'Conv2D': _Kind(
        ('filters', 'kernel_size', 'strides', 'padding'),
        {'filters': (_REQUIRED, _width), 'kernel_size': (_REQUIRED, _size), **_CONV,
         'activation': (None, _optional_activation), 'use_bias': (True, _bool)}),
    'PointwiseConv2D': _Kind(
        ('filters',),
        {'filters': (_REQUIRED, _width), 'activation': (None, _optional_activation),
         'use_bias': (True, _bool)}),
    'Dense': _Kind(
        ('units', 'activation', 'use_bias'),
        {'units': (_REQUIRED, _width), 'activation': (None, _optional_activation),
         'use_bias': (True, _bool)}),
    'BatchNormalization': _Kind(
        ('axis', 'momentum', 'epsilon'),
        {'axis': (-1, _axis), 'momentum': (None, _momentum), 'epsilon': (None, _epsilon)}),
    'Dropout': _Kind(('rate',), {'rate': (_REQUIRED, _rate)}),
    'Activation': _Kind(('activation',), {'activation': (_REQUIRED, _activation)}),
    'ReLU': _Kind(('max_value',), {'max_value': (None, _relu_max)}),
    'MaxPooling2D': _POOL,
    'AveragePooling2D': _POOL,
    'GlobalAveragePooling2D': _Kind((), {}),
    'Flatten': _Kind((), {}),
    'Residual': _Kind(('layers',), {'layers': (_REQUIRED, None)}),  # Parsed by _parse_call.
}
ALIASES = {'Convolution2D': 'Conv2D', 'SeparableConvolution2D': 'SeparableConv2D',
           'MaxPool2D': 'MaxPooling2D', 'AvgPool2D': 'AveragePooling2D',
           'GlobalAvgPool2D': 'GlobalAveragePooling2D'}
_WINDOWED = {'DepthwiseConv2D', 'SeparableConv2D', 'Conv2D', 'MaxPooling2D', 'AveragePooling2D'}
_NEEDS_MAP = _WINDOWED | {'PointwiseConv2D', 'GlobalAveragePooling2D'}


def parse_layers(entries: Any, where: str = 'config.layers') -> tuple[LayerSpec, ...]:
  """Parses `config.layers` (a list of layer strings) into specs; UserError on the first mistake."""
  if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
    raise UserError(f"{where} must be a list of layer strings like 'Conv2D(32, 3)', got "
                    f'{type(entries).__name__} {entries!r}')
  if not entries:
    raise UserError(f"{where} is empty; config.model = 'sequential' builds its model from it, e.g. "
                    f"['SeparableConv2D(32, 3, padding=\"same\")', ..., "
                    f"'Conv2D(\"{CLASSES}\", 1)', 'GlobalAveragePooling2D()']")
  specs = tuple(parse_layer(entry, f'{where}[{i}]') for i, entry in enumerate(entries))
  if any(_writes_classes(s) for s in specs):
    return specs
  # Keras code as written: the last layer with a width gives the logits.
  last = next((i for i in reversed(range(len(specs))) if _width_arg(specs[i])), None)
  if last is None:
    raise UserError(
        f'{where} has no classes layer: end it with the layer that outputs the logits, its '
        f'filters (or units) the number of classes or "{CLASSES}", e.g. '
        f'\'Conv2D("{CLASSES}", 1, use_bias=False)\' then \'GlobalAveragePooling2D()\', or '
        "'Dense(\"num_classes\")'")
  return specs[:last] + (dataclasses.replace(specs[last], classes=True),) + specs[last + 1:]


def parse_layer(entry: Any, where: str) -> LayerSpec:
  """One entry (a string holding one layer call) as a spec; `where` names it in errors."""
  if not isinstance(entry, str):
    raise UserError(f"{where} {entry!r}: must be a string holding one layer call, e.g. "
                    "'Conv2D(32, 3)'")
  source = entry.strip()
  try:
    tree = ast.parse(source, mode='eval')
  except SyntaxError as e:
    raise UserError(f'{where} {entry!r}: not a layer call ({e.msg})') from None
  return _parse_call(tree.body, source, where, entry)


def _parse_call(node: ast.expr, source: str, where: str, text: str) -> LayerSpec:
  def bad(problem: str) -> UserError:
    return UserError(f'{where} {text!r}: {problem}')

  if not isinstance(node, ast.Call):
    name = _callee(node)
    if name is not None and ALIASES.get(name, name) in KINDS:
      raise bad(f'write the layer as a call: {name}(...)')
    raise bad("not a layer call like 'Conv2D(32, 3)'")
  name = _callee(node.func)
  if name is None:
    raise bad("not a layer call like 'Conv2D(32, 3)'")
  kind_name = ALIASES.get(name, name)
  if kind_name not in KINDS:
    close = difflib.get_close_matches(name, list(KINDS) + list(ALIASES), n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    raise bad(f'unknown layer {name!r}{hint}; known: {", ".join(KINDS)}')
  kind = KINDS[kind_name]

  given: dict[str, ast.expr] = {}
  if any(isinstance(a, ast.Starred) for a in node.args):
    raise bad('*args is not allowed; write each argument')
  if len(node.args) > len(kind.positional):
    names = ', '.join(kind.positional) or 'none'
    n = len(kind.positional)
    raise bad(f'{name} takes at most {n} positional argument{"" if n == 1 else "s"} here '
              f'({names}), got {len(node.args)}')
  given.update(zip(kind.positional, node.args))
  for kw in node.keywords:
    if kw.arg is None:
      raise bad('**kwargs is not allowed; write each argument')
    if kw.arg not in kind.args:
      close = difflib.get_close_matches(kw.arg, list(kind.args), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      known = ', '.join(kind.args) or 'none'
      raise bad(f'unknown or unsupported argument {kw.arg!r} of {name}{hint}; its arguments '
                f'here: {known}')
    if kw.arg in given:
      raise bad(f'argument {kw.arg!r} given twice')
    given[kw.arg] = kw.value

  if kind_name == 'Residual':
    if 'layers' not in given:
      raise bad('Residual needs its layers: Residual([LAYER, ...])')
    inner = _parse_inner(given['layers'], source, where, bad)
    return LayerSpec('Residual', (), where, text, inner)

  args = []
  for arg_name, (default, check) in kind.args.items():
    if arg_name not in given:
      if default is _REQUIRED:
        raise bad(f'missing argument {arg_name!r} of {name}')
      args.append((arg_name, default))
      continue
    try:
      value = _literal(given[arg_name])
    except _Bad as e:
      raise bad(f'argument {arg_name!r}: {e}') from None
    try:
      args.append((arg_name, check(value)))
    except _Bad as e:
      raise bad(f'{arg_name}={value!r} {e}') from None
  return LayerSpec(kind_name, tuple(args), where, text)


def _parse_inner(node: ast.expr, source: str, where: str, bad) -> tuple[LayerSpec, ...]:
  """A Residual block's layers: a list of calls (or of strings holding one call each)."""
  if not isinstance(node, (ast.List, ast.Tuple)):
    raise bad('Residual takes a list of layers: Residual([LAYER, ...])')
  if not node.elts:
    raise bad('Residual([]) has no layers')
  inner = []
  for j, element in enumerate(node.elts, 1):
    inner_where = f'{where}, residual layer {j}'
    if isinstance(element, ast.Constant) and isinstance(element.value, str):
      inner.append(parse_layer(element.value, inner_where))
    else:
      inner_text = ast.get_source_segment(source, element) or ast.unparse(element)
      inner.append(_parse_call(element, source, inner_where, inner_text))
  return tuple(inner)


def _callee(node: ast.expr) -> str | None:
  """'Conv2D' for `Conv2D`, `layers.Conv2D` or `keras.layers.Conv2D`; None for anything else."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = node.value
    while isinstance(base, ast.Attribute):
      base = base.value
    return node.attr if isinstance(base, ast.Name) else None
  return None


def _literal(node: ast.expr) -> Any:
  """The value of a literal node: numbers, strings, True/False/None, tuples and lists (as tuples,
  which are hashable) of them. Anything else, a name or a call, is refused, never evaluated."""
  if isinstance(node, ast.Constant) and (node.value is None or
                                         isinstance(node.value, (bool, int, float, str))):
    return node.value
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_literal(e) for e in node.elts)
  if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
      and isinstance(node.operand, ast.Constant) and _is_number(node.operand.value)):
    return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
  hint = ''
  if isinstance(node, ast.Name):
    hint = f' (a string needs quotes: "{node.id}")'
  raise _Bad(f'{ast.unparse(node)} is not a literal (numbers, strings, True/False/None, tuples '
             f'and lists of them){hint}')


def _width_arg(spec: LayerSpec) -> str | None:
  """The name of `spec`'s width argument ('filters' or 'units'), or None."""
  return next((name for name, _ in spec.args if name in ('filters', 'units')), None)


def _writes_classes(spec: LayerSpec) -> bool:
  return any(v == CLASSES for _, v in spec.args) or any(_writes_classes(s) for s in spec.inner)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _shape(shape: Sequence[int]) -> str:
  return 'x'.join(str(d) for d in shape)


class Sequential(nn.Module):
  """The model of a `config.layers` spec (see the module docstring for the grammar).

  `layers` holds the parsed specs (`parse_layers`; a tuple of strings is parsed when called).
  Hidden widths scale with `width_multiplier` (never the "num_classes" layer); BatchNormalization
  without momentum/epsilon takes `bn_momentum`/`bn_epsilon`; `options` goes to every layer with an
  implementation choice. Returns logits, shape (batch, num_classes).
  """
  layers: tuple[LayerSpec, ...]
  num_classes: int = 10
  options: layers_lib.Options = layers_lib.Options()
  width_multiplier: float = 1.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    specs = self.layers
    if any(isinstance(s, str) for s in specs):
      specs = parse_layers(list(specs), 'layers')
    x = _run(self, specs, x, train)
    if x.shape[1:] != (self.num_classes,):
      raise specs[-1].error(
          f'the model\'s output is {_shape(x.shape[1:])} per image, not {self.num_classes} logits '
          f'(num_classes): end the spec with the classes layer ("{CLASSES}" as its filters or '
          'units), and after a convolution with GlobalAveragePooling2D()')
    return x


def _run(model: Sequential, specs: Sequence[LayerSpec], x: jax.Array, train: bool) -> jax.Array:
  """Applies `specs` in order, creating each layer in `model`'s scope (one summary row each)."""
  for spec in specs:
    if spec.kind == 'Residual':
      y = _run(model, spec.inner, x, train)
      if y.shape != x.shape:
        raise spec.error(f'the residual branch turns its {_shape(x.shape[1:])} input into '
                         f'{_shape(y.shape[1:])}; it must keep the shape, since the input is '
                         'added to its output')
      x = x + y
      continue
    _check_input(spec, x.shape)
    for layer in _make_layers(model, spec):
      try:
        x = layer(x, train)
      except (ValueError, TypeError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise spec.error(f'cannot apply it to its {_shape(x.shape[1:])} input: {detail}') from None
  return x


def _check_input(spec: LayerSpec, shape: Sequence[int]) -> None:
  """Refuses an input the layer cannot take, before the layer sees it."""
  if spec.kind in _NEEDS_MAP and len(shape) != 4:
    raise spec.error(f'needs a height x width x channels map, but its input is a vector of '
                     f'{_shape(shape[1:])} features per image (an earlier layer flattened it)')
  if spec.kind in _WINDOWED:
    args = dict(spec.args)
    window = _pair(args['kernel_size'] if 'kernel_size' in args else args['pool_size'])
    dilation = _pair(args.get('dilation_rate', 1))
    if args['padding'] == 'valid':
      extent = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
      if any(e > s for e, s in zip(extent, shape[1:3])):
        dilated = '' if dilation == (1, 1) else f' (dilation {_shape(dilation)})'
        raise spec.error(f"a 'valid' {_shape(window)} window{dilated} does not fit the "
                         f'{_shape(shape[1:3])} map it gets; use padding="same", a smaller '
                         'window, or fewer poolings before it')


def _make_layers(model: Sequential, spec: LayerSpec) -> list[nn.Module]:
  """The `dsconv_jax.layers` layers of one spec (a convolution's activation= adds a second)."""
  a = dict(spec.args)
  kind, options = spec.kind, model.options

  def width(v):
    if v == CLASSES:
      return model.num_classes
    if spec.classes:
      if v != model.num_classes:
        raise spec.error(
            f'its {v} {_width_arg(spec)} are the logits (the last layer with a width is the '
            f'classes layer), but the dataset has {model.num_classes} classes: write '
            f'{model.num_classes}, or "{CLASSES}" for any dataset')
      return v
    return layers_lib.scale_width(v, model.width_multiplier)

  if kind == 'DepthwiseConv2D':
    out = [layers_lib.DepthwiseConv2D(
        a['kernel_size'], depth_multiplier=a['depth_multiplier'], strides=a['strides'],
        padding=a['padding'], dilation=a['dilation_rate'], use_bias=a['use_bias'],
        options=options)]
  elif kind == 'SeparableConv2D':
    out = [layers_lib.SeparableConv2D(
        width(a['filters']), a['kernel_size'], depth_multiplier=a['depth_multiplier'],
        strides=a['strides'], padding=a['padding'], dilation=a['dilation_rate'],
        use_bias=a['use_bias'], options=options)]
  elif kind == 'Conv2D' and _pair(a['kernel_size']) == (1, 1) and _pair(a['strides']) == (1, 1):
    # The same function and parameters as Keras' Conv2D(f, 1), with the pointwise layer's faster
    # hand-written gradient (padding and dilation mean nothing for a 1x1 kernel at stride 1).
    out = [layers_lib.PointwiseConv2D(width(a['filters']), use_bias=a['use_bias'])]
  elif kind == 'Conv2D':
    out = [layers_lib.Conv2D(width(a['filters']), a['kernel_size'], strides=a['strides'],
                             padding=a['padding'], dilation=a['dilation_rate'],
                             use_bias=a['use_bias'])]
  elif kind == 'PointwiseConv2D':
    out = [layers_lib.PointwiseConv2D(width(a['filters']), use_bias=a['use_bias'])]
  elif kind == 'Dense':
    out = [layers_lib.Dense(width(a['units']), use_bias=a['use_bias'])]
  elif kind == 'BatchNormalization':
    momentum = model.bn_momentum if a['momentum'] is None else a['momentum']
    epsilon = model.bn_epsilon if a['epsilon'] is None else a['epsilon']
    out = [layers_lib.BatchNorm(momentum=momentum, epsilon=epsilon, options=options)]
  elif kind == 'Dropout':
    out = [layers_lib.Dropout(a['rate'], options=options)]
  elif kind == 'Activation':
    out = [layers_lib.Activation(a['activation'])]
  elif kind == 'ReLU':
    out = [layers_lib.Activation('relu' if a['max_value'] is None else 'relu6')]
  elif kind == 'MaxPooling2D':
    out = [layers_lib.MaxPool2D(a['pool_size'], strides=a['strides'], padding=a['padding'])]
  elif kind == 'AveragePooling2D':
    out = [layers_lib.AvgPool2D(a['pool_size'], strides=a['strides'], padding=a['padding'])]
  elif kind == 'GlobalAveragePooling2D':
    out = [layers_lib.GlobalAvgPool()]
  elif kind == 'Flatten':
    out = [layers_lib.Flatten()]
  else:  # pragma: no cover - KINDS and this function list the same layers.
    raise AssertionError(kind)
  if kind != 'Activation' and a.get('activation') not in (None, 'linear'):
    out.append(layers_lib.Activation(a['activation']))
  return out
