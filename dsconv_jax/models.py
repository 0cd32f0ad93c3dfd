"""The models of the source studies, built from `dsconv_jax.layers`, and `build_model`.

Parameter counts are the Keras counts (BatchNorm moving statistics included as non-trainable);
`tests/test_models.py` checks each against the number its source printed.

`config.model` takes three forms (`build_model`): a name from `MODELS`; 'sequential', a model
written in the config file as Keras layer calls (`config.layers`, `dsconv_jax.sequential`); or an
import path 'package.module:Class' naming any `flax.linen.Module` (importable from the working
directory, or installed), called as `module(images, train=...)` and returning logits, or any
`flax.nnx.Module` class, constructed with `rngs=` and called as `module(images)` in the mode
`model.train()` / `model.eval()` set (`dsconv_jax.nnx_adapter` gives it a Linen module's
`init`/`apply`).

The configuration's model options (`MODEL_OPTIONS`) reach every model: a model that declares the
option as a field (a constructor argument for NNX) gets it as one; otherwise `config.bn_momentum`
and `config.bn_epsilon` are set on each of its BatchNorm layers, and the layer forms
(`config.depthwise_impl`, `config.dropout_impl`) reach it through training's rewrite of its traced
computation (`dsconv_jax.fast_forms`). The BatchNorm defaults mean "the model's own value".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsconv_jax import nnx_adapter
from dsconv_jax import sequential
from dsconv_jax.errors import UserError
from dsconv_jax.layers import (Activation, BatchNorm, Conv2D, Dense, DepthwiseConv2D, Dropout,
                               Flatten, GlobalAvgPool, MaxPool2D, Options, PointwiseConv2D,
                               SeparableConv2D)
# Also `models.scale_width`, as before; it lives in layers so that `sequential` can use it too.
from dsconv_jax.layers import ACTIVATIONS, scale_width


class DepthwisePointwiseNet(nn.Module):
  """Source 000's Model 2/3/4: DepthwiseConv2D + 1x1 Conv2D blocks, ReLU, BN, dropout, GAP.

  35,387 parameters (34,427 trainable) for 32x32x3 inputs and 10 classes. Each block is
  depthwise 3x3 -> pointwise 1x1 -> ReLU -> BatchNorm -> Dropout, all without biases; the first
  block pads 'same', the others 'valid'. Output sizes 32, 30, 28, pool 14, 12, 10, 8, pool 4, 2.
  `dropout_rates` are the rates of the three stages (Model 3: 0.1, 0.2, 0.25).
  `width_multiplier` scales every hidden width (`scale_width`); 1.0 is the source network.
  `bn_momentum`, `bn_epsilon`: every BatchNorm's (Keras' defaults; `config.bn_momentum`, ...).
  """
  num_classes: int = 10
  dropout_rates: Sequence[float] = (0.1, 0.2, 0.25)
  options: Options = Options()
  width_multiplier: float = 1.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    d1, d2, d3 = self.dropout_rates
    w32, w64, w128 = (scale_width(w, self.width_multiplier) for w in (32, 64, 128))

    def block(x, features, rate, padding='valid'):
      x = DepthwiseConv2D(3, padding=padding, use_bias=False, options=self.options)(x, train)
      x = PointwiseConv2D(features, use_bias=False)(x, train)
      x = Activation('relu')(x, train)
      x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                    options=self.options)(x, train)
      return Dropout(rate, options=self.options)(x, train)

    x = block(x, w32, d1, padding='same')
    x = block(x, w64, d1)
    x = block(x, w128, d1)
    x = MaxPool2D(2)(x, train)
    x = PointwiseConv2D(w32, use_bias=False)(x, train)
    x = block(x, w32, d2)
    x = block(x, w64, d2)
    x = block(x, w128, d2)
    x = MaxPool2D(2)(x, train)
    x = PointwiseConv2D(w32, use_bias=False)(x, train)
    x = block(x, w32, d3)
    x = PointwiseConv2D(self.num_classes, use_bias=False)(x, train)
    return GlobalAvgPool()(x, train)


class Separable80k(nn.Module):
  """Source 001's network: 7 SeparableConv2D (no bias) + dropout 0.07 + BN + ReLU, then GAP.

  80,203 parameters (78,891 trainable). Widths 32-48-96, pool, 128-160, pool, 192 (valid),
  num_classes (valid); the last separable convolution has no BN or activation.
  `width_multiplier` scales every hidden width (`scale_width`); 1.0 is the source network.
  `bn_momentum`, `bn_epsilon`: every BatchNorm's (Keras' defaults; `config.bn_momentum`, ...).
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 48, 96, 128, 160, 192)
  dropout_rate: float = 0.07
  options: Options = Options()
  width_multiplier: float = 1.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    w = [scale_width(v, self.width_multiplier) for v in self.widths]

    def block(x, features, padding='same'):
      x = SeparableConv2D(features, 3, padding=padding, use_bias=False,
                          options=self.options)(x, train)
      x = Dropout(self.dropout_rate, options=self.options)(x, train)
      x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                    options=self.options)(x, train)
      return Activation('relu')(x, train)

    x = block(x, w[0])
    x = block(x, w[1])
    x = block(x, w[2])
    x = MaxPool2D(2)(x, train)
    x = block(x, w[3])
    x = block(x, w[4])
    x = MaxPool2D(2)(x, train)
    x = block(x, w[5], padding='valid')
    x = SeparableConv2D(self.num_classes, 3, padding='valid', use_bias=False,
                        options=self.options)(x, train)
    return GlobalAvgPool()(x, train)


DEPTHWISE_NORMS = ('', 'bn', 'bn_act')  # DSResNet.depthwise_norm's values.


def parse_kernel_mix(spec: str) -> tuple[tuple[int, int], ...]:
  """DSResNet.kernel_mix, e.g. '3,7,7d3', as ((kernel, dilation), ...); '' is ()."""
  groups = []
  for token in (t.strip() for t in (spec or '').split(',') if t.strip()):
    kernel, _, dilation = token.partition('d')
    if not (kernel.isdigit() and int(kernel) % 2 == 1 and (not dilation or dilation.isdigit())
            and int(dilation or 1) >= 1):
      raise UserError(f'config.model_kwargs.kernel_mix={spec!r}: {token!r} is not an odd kernel '
                      "size with an optional dilation (such as '5' or '7d3')")
    groups.append((int(kernel), int(dilation or 1)))
  return tuple(groups)


class DSResNet(nn.Module):
  """This project's model under the source rules: a depthwise-separable ResNet, pool-often.

  Stem: depthwise 3x3 (depth multiplier `stem_multiplier`, so each colour channel gets several
  filters before any mixing) -> pointwise -> BN -> ReLU. Then one stage per entry of `widths`
  (default 32x32, 16x16, 8x8 maps); every stage after the first opens with a transition,
  depthwise 3x3 -> pointwise to the new width -> max-pool 2 -> BN -> ReLU (airbench's
  conv-pool-norm-act order: BN then normalises the pooled map it feeds on), and each stage holds
  `blocks` residual blocks of two (depthwise 3x3 -> pointwise -> BN) with a ReLU between and after
  the identity add. The head is a pointwise conv to the classes on the last (8x8) map, then global
  average pooling: no dense layer, and no 1x1 conv on a 1x1 map.

  Why this shape: parameters of a separable net sit almost all in the pointwise convs (C_in x
  C_out), so width goes where the maps are small; pooling early (ResNet-8 / airbench style) keeps
  the 32x32 stage cheap and lets three stages reach a receptive field beyond 32 pixels. The
  identity shortcuts cost no parameters. 95,456 parameters with the defaults (Keras count;
  93,776 trainable).
  `width_multiplier` scales every hidden width (`scale_width`) for `config.fit_params`.

  `expansion` > 0 swaps the residual block for MobileNetV2's inverted residual: pointwise to
  `expansion` x the width -> BN -> act -> depthwise -> BN -> act -> pointwise back -> BN, added to
  the input with no activation after the add (the linear bottleneck). Its depthwise filters work
  in the wide space, and there is one per block instead of two.

  `dilation` spaces the taps of every depthwise filter after the stem (the stem keeps
  `kernel_size` undilated, so that the first layer sees neighbouring pixels): a 3x3 filter with
  dilation 2 spans 5x5 for the same 9 parameters a channel. `kernel_mix` (e.g. '3,7,7d3') splits
  the channels of each of those depthwise convolutions into as many near-equal groups, each with
  its own kernel size and dilation (MixConv, Tan and Le 2019; xvel/cifar10-tiniest's blocks mix
  3x3, 7x7 and 7x7 with dilation 3 the same way); '' uses `kernel_size` and `dilation`.

  `depthwise_norm` chooses what sits between the depthwise and the pointwise half of every
  depthwise-separable convolution (stem, transitions, basic blocks): '' nothing (Keras'
  SeparableConv2D, the sources' layer; Xception found no nonlinearity there best), 'bn' a
  BatchNorm, 'bn_act' a BatchNorm and the activation (MobileNetV1's separable layer: twice the
  nonlinear depth for 4 parameters per channel).
  """
  num_classes: int = 10
  widths: Sequence[int] = (40, 80, 160)
  blocks: Sequence[int] = (1, 1, 1)
  stem_multiplier: int = 8
  kernel_size: int = 3  # Of every depthwise convolution (5: RF grows faster, +16 params/channel).
  # Every nonlinearity, by Keras name (`layers.ACTIVATIONS`): airbench trains with 'gelu'.
  activation: str = 'relu'
  # 0: the basic block (two depthwise-separable convs); t >= 1: inverted residual, expansion t.
  expansion: int = 0
  depthwise_norm: str = ''  # '', 'bn' or 'bn_act' between depthwise and pointwise (see above).
  dilation: int = 1  # Of every depthwise filter after the stem.
  kernel_mix: str = ''  # Channel groups with their own kernel and dilation, e.g. '3,7,7d3'.
  dropout_rate: float = 0.0
  # Keras' 0.99 leaves the moving statistics mostly at their initial values for the first few
  # hundred steps (0.99^100 = 0.37), so short runs evaluate at chance; 0.9 (PyTorch's default)
  # settles in tens of steps and is as good over 50 epochs. `build_model` sets both from
  # config.bn_momentum and config.bn_epsilon (configs/dsresnet.py: 0.9).
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  options: Options = Options()
  width_multiplier: float = 1.0

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:  # A config value: one line, before any tracing.
      raise UserError(f'config.model_kwargs.activation must be one of {sorted(ACTIVATIONS)}, '
                      f'got {self.activation!r}')
    if (not isinstance(self.expansion, int) or isinstance(self.expansion, bool)
        or self.expansion < 0):
      raise UserError('config.model_kwargs.expansion must be an integer >= 0 (0: the basic '
                      f'block, t: inverted residual with expansion t), got {self.expansion!r}')
    if self.depthwise_norm not in DEPTHWISE_NORMS:
      raise UserError("config.model_kwargs.depthwise_norm must be one of '', 'bn' or 'bn_act' "
                      f'(what sits between depthwise and pointwise), got {self.depthwise_norm!r}')
    if (not isinstance(self.dilation, int) or isinstance(self.dilation, bool)
        or self.dilation < 1):
      raise UserError(f'config.model_kwargs.dilation must be an integer >= 1, got '
                      f'{self.dilation!r}')
    parse_kernel_mix(self.kernel_mix)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    widths = [scale_width(w, self.width_multiplier) for w in self.widths]

    def bn(x):
      return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       options=self.options)(x, train)

    def depthwise(x):
      """Every depthwise convolution after the stem: one, or one per channel group."""
      mix = parse_kernel_mix(self.kernel_mix) or ((self.kernel_size, self.dilation),)
      conv = lambda x, k, d: DepthwiseConv2D(k, padding='same', dilation=d, use_bias=False,
                                             options=self.options)(x, train)
      if len(mix) == 1:
        return conv(x, *mix[0])
      c, n = x.shape[-1], len(mix)
      bounds = [c * i // n for i in range(1, n)]
      return jnp.concatenate([conv(part, k, d) for part, (k, d) in
                              zip(jnp.split(x, bounds, axis=-1), mix) if part.shape[-1]],
                             axis=-1)  # A group can be empty at the narrowest widths.

    def ds_conv(x, features, stem=False):
      if stem:
        x = DepthwiseConv2D(self.kernel_size, depth_multiplier=self.stem_multiplier,
                            padding='same', use_bias=False, options=self.options)(x, train)
      else:
        x = depthwise(x)
      if self.depthwise_norm:
        x = bn(x)
      if self.depthwise_norm == 'bn_act':
        x = Activation(self.activation)(x, train)
      return PointwiseConv2D(features, use_bias=False)(x, train)

    def residual_block(x, features):
      y = Activation(self.activation)(bn(ds_conv(x, features)), train)
      y = bn(ds_conv(y, features))
      return Activation(self.activation)(x + y, train)

    def inverted_residual_block(x, features):
      act = lambda y: Activation(self.activation)(y, train)
      y = act(bn(PointwiseConv2D(features * self.expansion, use_bias=False)(x, train)))
      y = act(bn(depthwise(y)))
      return x + bn(PointwiseConv2D(features, use_bias=False)(y, train))

    block = inverted_residual_block if self.expansion else residual_block
    x = ds_conv(x, widths[0], stem=True)
    x = Activation(self.activation)(bn(x), train)
    for stage, (features, n_blocks) in enumerate(zip(widths, self.blocks)):
      if stage:
        x = MaxPool2D(2)(ds_conv(x, features), train)
        x = Activation(self.activation)(bn(x), train)
      for _ in range(n_blocks):
        x = block(x, features)
    if self.dropout_rate:
      x = Dropout(self.dropout_rate, options=self.options)(x, train)
    x = PointwiseConv2D(self.num_classes, use_bias=False)(x, train)
    return GlobalAvgPool()(x, train)


class Baseline(nn.Module):
  """Source 000's Baseline: 6 Conv2D (48-48-96-96-192-192), Dense 512-256-10, dropout 0.25/0.5.

  1,172,410 parameters (all trainable, no BatchNorm). It breaks the depthwise-separable and
  no-dense rules on purpose: it is the score to beat (82.93% max val in the source).
  """
  num_classes: int = 10
  options: Options = Options()  # Dropout masks only: it has no depthwise convolution.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for features in (48, 96, 192):
      x = Conv2D(features, 3, padding='same')(x, train)
      x = Activation('relu')(x, train)
      x = Conv2D(features, 3, padding='valid')(x, train)
      x = Activation('relu')(x, train)
      x = MaxPool2D(2)(x, train)
      x = Dropout(0.25, options=self.options)(x, train)
    x = Flatten()(x, train)
    for features in (512, 256):
      x = Dense(features)(x, train)
      x = Activation('relu')(x, train)
      x = Dropout(0.5, options=self.options)(x, train)
    return Dense(self.num_classes)(x, train)


class TinyNet(nn.Module):
  """A tiny depthwise-separable net, used for testing only (fast to compile on a CPU)."""
  num_classes: int = 10
  width: int = 8
  dropout_rate: float = 0.1
  options: Options = Options()
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = DepthwiseConv2D(3, padding='same', use_bias=False, options=self.options)(x, train)
    x = PointwiseConv2D(self.width, use_bias=False)(x, train)
    x = Activation('relu')(x, train)
    x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                  options=self.options)(x, train)
    x = Dropout(self.dropout_rate, options=self.options)(x, train)
    x = MaxPool2D(2)(x, train)
    x = SeparableConv2D(self.num_classes, 3, padding='valid', use_bias=False,
                        options=self.options)(x, train)
    return GlobalAvgPool()(x, train)


# Model name -> constructor. Variants are partials of one module (Flax examples' style).
MODELS: dict[str, Callable[..., nn.Module]] = {
    'baseline': Baseline,
    'model2': DepthwisePointwiseNet,
    'model3': DepthwisePointwiseNet,
    # Source 000 says only "Model 3 with more dropout"; these rates are this project's assumption.
    'model4': functools.partial(DepthwisePointwiseNet, dropout_rates=(0.2, 0.3, 0.35)),
    'separable80k': Separable80k,
    'dsresnet': DSResNet,
    'tiny': TinyNet,
}


SEQUENTIAL = 'sequential'  # config.model for a model written as config.layers.

# The model options of the configuration: every model gets them (see the module docstring).
# Layer-form options and their defaults.
LAYER_FORM_DEFAULTS = {'depthwise_impl': 'auto', 'dropout_impl': 'hash'}
MODEL_OPTIONS = ('bn_momentum', 'bn_epsilon', *LAYER_FORM_DEFAULTS)


def model_constructor(name: str) -> Callable[..., Any]:
  """The constructor behind a `config.model` value: a built-in model, `sequential.Sequential`,
  or the `flax.linen.Module` or `flax.nnx.Module` class of an import path 'package.module:Class'."""
  if name in MODELS:
    return MODELS[name]
  if name == SEQUENTIAL:
    return sequential.Sequential
  if isinstance(name, str) and ':' in name:
    return import_model_class(name)
  raise UserError(f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}; or '
                  f"'{SEQUENTIAL}' with config.layers, or an import path 'package.module:Class' "
                  'of a flax.linen.Module or flax.nnx.Module')


def import_model_class(path: str) -> type:
  """The `flax.linen.Module` or `flax.nnx.Module` class named by 'package.module:Class'
  (UserError if it is neither).

  The module is imported as Python would from the working directory (which is put on `sys.path`
  when missing: an entry point run as a console script does not have it) or from the installed
  packages.
  """
  module_name, _, attr = path.partition(':')
  parts = module_name.split('.') + attr.split('.')
  if not all(p.isidentifier() for p in parts):
    raise UserError(f"config.model={path!r} is not an import path 'package.module:Class' (nor a "
                    f'built-in model: {", ".join(sorted(MODELS))}, or \'{SEQUENTIAL}\')')
  cwd = os.getcwd()
  if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
    sys.path.append(cwd)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + '.')):
      raise UserError(f'config.model={path!r}: no module named {e.name!r} in the working '
                      f'directory ({cwd}) or the installed packages') from None
    raise UserError(f'config.model={path!r}: importing {module_name!r} failed: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    # The module's own code failed (a syntax error, an exception at import): the user's to fix.
    detail = (str(e).strip().splitlines() or [''])[0]
    raise UserError(f'config.model={path!r}: importing {module_name!r} failed: '
                    f'{type(e).__name__}: {detail}') from None
  obj: Any = module
  for part in attr.split('.'):
    if not hasattr(obj, part):
      where = getattr(module, '__file__', None) or module_name
      raise UserError(f'config.model={path!r}: module {module_name!r} ({where}) has no {attr!r}')
    obj = getattr(obj, part)
  if not (isinstance(obj, type) and issubclass(obj, nn.Module)) and not nnx_adapter.is_nnx_class(
      obj):
    raise UserError(f'config.model={path!r} names {type(obj).__name__} {obj!r}, not a '
                    'flax.linen.Module or flax.nnx.Module class')
  return obj


def create_model(name: str, **kwargs: Any) -> Any:
  """Builds model `name` (any `config.model` form) with keyword overrides (num_classes, ...).

  An NNX class comes back as an `nnx_adapter.NNXModel` (a Linen module's `init` and `apply`).
  """
  make = model_constructor(name)
  if nnx_adapter.is_nnx_class(make):
    return nnx_adapter.NNXModel(make, kwargs, name=name)
  try:
    return make(**kwargs)
  except TypeError as e:
    raise UserError(f'bad model_kwargs for model {name!r}: {e}') from None


def module_class(model: Any) -> type:
  """The class the user (or this package) wrote behind a built model (an adapter's inner one)."""
  if isinstance(model, nnx_adapter.NNXModel):
    return model.cls
  if isinstance(model, BatchNormOverride):
    return module_class(model.module)
  return type(model)


def declares(make: Callable[..., Any], field: str) -> bool:
  """Whether the module class behind `make` (a class or a partial of one) has field `field` (an
  NNX class: a constructor argument)."""
  while isinstance(make, functools.partial):
    make = make.func
  if nnx_adapter.is_nnx_class(make):
    return field in nnx_adapter.constructor_defaults(make)
  return dataclasses.is_dataclass(make) and any(f.name == field for f in dataclasses.fields(make))


def kwargs_with_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """`kwargs` plus the defaults of model `name`'s other plain fields (numbers, strings, tuples of
  them), so that two runs built alike compare equal however their configs spelled it (a config
  that names a default, like configs/dsresnet.py's architecture, against one that leaves it out).
  """
  make = model_constructor(name)
  while isinstance(make, functools.partial):
    kwargs = {**make.keywords, **kwargs}
    make = make.func
  plain = lambda v: (isinstance(v, (int, float, str, bool)) or
                     (isinstance(v, tuple) and all(isinstance(x, (int, float, str)) for x in v)))
  out = dict(kwargs)
  if nnx_adapter.is_nnx_class(make):
    defaults = nnx_adapter.constructor_defaults(make)
  elif dataclasses.is_dataclass(make):
    defaults = {f.name: f.default for f in dataclasses.fields(make)
                if f.name not in ('parent', 'name')}
  else:
    defaults = {}
  for field, default in defaults.items():
    if field not in out and plain(default):
      out[field] = default
  return out


def options_from_config(config) -> Options:
  """The layers' `Options` the config asks for (config.depthwise_impl, config.dropout_impl)."""
  try:
    return Options(depthwise=config.get('depthwise_impl', 'auto'),
                   dropout=config.get('dropout_impl', 'hash'))
  except ValueError as e:
    raise UserError(f'config.{e}') from None


def batch_norm_from_config(config) -> dict[str, float]:
  """{'bn_momentum': ..., 'bn_epsilon': ...} from the config (the keys it sets: None, the default,
  leaves each model its own value), checked."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  out = {}
  momentum, epsilon = config.get('bn_momentum', None), config.get('bn_epsilon', None)
  if momentum is not None:
    if not number(momentum) or not 0 <= momentum <= 1:
      raise UserError(f'config.bn_momentum must be a number in [0, 1] (or None: the model\'s '
                      f'own), got {momentum!r}')
    out['bn_momentum'] = float(momentum)
  if epsilon is not None:
    if not number(epsilon) or not epsilon > 0:
      raise UserError(f'config.bn_epsilon must be a positive number (or None: the model\'s own), '
                      f'got {epsilon!r}')
    out['bn_epsilon'] = float(epsilon)
  return out


@dataclasses.dataclass(frozen=True)
class BatchNormOverride:
  """A Linen module whose every `flax.linen.BatchNorm` runs with the configuration's momentum
  and/or epsilon (None: its own), for a module that declares no bn_momentum / bn_epsilon field.

  It has the module's `init`, `apply` and `clone` (parameters and their names are the module's
  own); other attributes are the module's. The values are set on each BatchNorm when it is called
  (`flax.linen.intercept_methods`): Linen creates those layers inside the module's own code, so
  there is no constructor argument to give them.
  """
  module: nn.Module
  bn_momentum: float | None = None
  bn_epsilon: float | None = None

  def __getattr__(self, name: str) -> Any:
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self.module, name)

  def _override(self, next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == '__call__':
      # A BatchNorm instance lives for one trace of the module; its fields are plain attributes.
      if self.bn_momentum is not None:
        object.__setattr__(module, 'momentum', self.bn_momentum)
      if self.bn_epsilon is not None:
        object.__setattr__(module, 'epsilon', self.bn_epsilon)
    return next_fun(*args, **kwargs)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._override):
      return self.module.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._override):
      return self.module.apply(*args, **kwargs)

  def clone(self, **overrides: Any) -> 'BatchNormOverride':
    return dataclasses.replace(self, module=self.module.clone(**overrides))


def build_model(config, num_classes: int) -> Any:
  """The model of `config`: `config.model` built with `config.model_kwargs` for `num_classes`.

  `config.model` is a built-in name (`MODELS`), 'sequential' (the model of `config.layers`,
  `dsconv_jax.sequential`), or an import path 'package.module:Class' of a `flax.linen.Module`
  or a `flax.nnx.Module` (built as an `nnx_adapter.NNXModel`). Each of `num_classes`, the
  implementation `options` (config.depthwise_impl, dropout_impl) and `bn_momentum`/`bn_epsilon`
  (config.bn_momentum, bn_epsilon) goes to a model that declares that field, and never replaces a
  value given in model_kwargs; a model that does not declare them gets `bn_momentum`/`bn_epsilon`
  on each BatchNorm layer, and the layer forms through training (`dsconv_jax.fast_forms`).
  `width_multiplier` comes only from model_kwargs (where `config.fit_params` puts it,
  `dsconv_jax.budget`).
  """
  name = config.model
  make = model_constructor(name)
  kwargs = dict(config.get('model_kwargs', {}) or {})
  layers = config.get('layers', None)
  if name == SEQUENTIAL:
    kwargs.setdefault('layers', sequential.parse_layers(layers))
  elif layers:
    raise UserError(f"config.layers is only read by config.model = '{SEQUENTIAL}'; config.model "
                    f'is {name!r} (set config.layers = () or config.model = \'{SEQUENTIAL}\')')
  batch_norm = batch_norm_from_config(config)
  provided = {'num_classes': lambda: num_classes, 'options': lambda: options_from_config(config),
              **{k: (lambda v=v: v) for k, v in batch_norm.items()}}
  for field, value in provided.items():
    if field not in kwargs and declares(make, field):
      kwargs[field] = value()
  if not declares(make, 'options'):
    # Checked here too: the forms reach such a model through training's rewrite of its traced
    # computation (`dsconv_jax.fast_forms`), not through a field.
    options_from_config(config)
  override = {k: v for k, v in batch_norm.items() if not declares(make, k)}
  if nnx_adapter.is_nnx_class(make):
    return nnx_adapter.NNXModel(make, kwargs, name=name, **override)
  model = create_model(name, **kwargs)
  return BatchNormOverride(model, **override) if override else model
