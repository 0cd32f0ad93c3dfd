"""The fast forms reach every model however it is written (`dsconv_jax.fast_forms`).

Each rewrite is checked two ways: the rewritten computation no longer holds the slow form (so a
rewrite that silently stops applying fails), and its values and gradients equal those of the
computation as traced (jax.grad of the un-rewritten function), in float32.
"""

import functools
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import experiment, fast_forms, layers
from dsconv_jax.defaults import get_testing_config
from examples import plain_nets

TOL = dict(rtol=2e-5, atol=2e-5)


def _eqns(jaxpr, into_custom_rules=False):
  """Every equation of `jaxpr` and of the jaxprs inside it that run as written (not the bodies of
  custom_jvp/custom_vjp calls, whose rules run in training, unless `into_custom_rules`)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name in ('custom_jvp_call', 'custom_vjp_call') and not into_custom_rules:
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub, into_custom_rules)


def _names(fn, *args):
  return [e.primitive.name for e in _eqns(jax.make_jaxpr(fn)(*args))]


def _threefry_masks(fn, *args):
  """The per-element random draws (Threefry bits of a whole map) in `fn`'s computation; a hash
  mask draws two words per layer."""
  return [e for e in _eqns(jax.make_jaxpr(fn)(*args))
          if e.primitive.name == 'random_bits' and len(e.params['shape']) > 1]


def _grouped(fn, *args, into_custom_rules=False):
  """The grouped convolutions (feature_group_count > 1) left in `fn`'s computation."""
  return [e for e in _eqns(jax.make_jaxpr(fn)(*args), into_custom_rules)
          if e.primitive.name == 'conv_general_dilated' and e.params['feature_group_count'] > 1]


def _assert_same_values_and_grads(f, g, *args, labels=None, argnums=None):
  """f and g agree in value and in the gradient of a random projection w.r.t. every argument
  (or those of `argnums`), compiled: one program each, however many cases it holds. `labels`
  name f's outputs."""
  f, g = jax.jit(f), jax.jit(g)
  out_f, out_g = f(*args), g(*args)
  cotangents = jax.tree.map(lambda a: _random(a.shape, 7), out_f)
  loss = lambda fn: lambda *a: sum(jnp.vdot(o, c) for o, c in zip(
      jax.tree.leaves(fn(*a)), jax.tree.leaves(cotangents)))
  argnums = tuple(range(len(args))) if argnums is None else argnums
  grads_f = jax.jit(jax.grad(loss(f), argnums))(*args)
  grads_g = jax.jit(jax.grad(loss(g), argnums))(*args)
  for name, (a, b) in (('value', (out_f, out_g)), ('gradient', (grads_f, grads_g))):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    for i, (u, v) in enumerate(zip(leaves_a, leaves_b)):
      label = labels[i % len(labels)] if labels else i
      np.testing.assert_allclose(u, v, **TOL, err_msg=f'{name} {label}')


def _random(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# (kernel, strides, dilation, padding, depth multiplier, layout): 'SAME' and 'VALID', strided,
# dilated, with a depth multiplier, an even map under a stride (TensorFlow's odd pixel at the
# end), explicit asymmetric padding, and an NCHW layout.
DEPTHWISE_CASES = [
    (3, 1, 1, 'SAME', 1, 'NHWC'),
    (3, 1, 1, 'VALID', 1, 'NHWC'),
    (3, 2, 1, 'SAME', 1, 'NHWC'),
    (3, 2, 1, 'VALID', 1, 'NHWC'),
    (3, 1, 2, 'SAME', 1, 'NHWC'),
    (3, 1, 2, 'VALID', 2, 'NHWC'),
    (5, 2, 2, 'SAME', 3, 'NHWC'),
    (3, 1, 1, ((0, 2), (1, 0)), 1, 'NHWC'),
    (3, 2, 1, 'SAME', 2, 'NCHW'),
]
C = 4


def _depthwise(case):
  kernel, stride, dilation, padding, multiplier, layout = case
  x = _random((2, C, 10, 10) if layout == 'NCHW' else (2, 10, 10, C))
  k = _random((kernel, kernel, 1, C * multiplier), 1)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=(layout, 'HWIO', layout),
                                        feature_group_count=C)
  return conv, x, k


def test_depthwise_convolutions_become_the_shifted_form_with_autodiffs_gradient():
  cases = [_depthwise(case) for case in DEPTHWISE_CASES]
  for case, (conv, x, k) in zip(DEPTHWISE_CASES, cases):
    assert _grouped(conv, x, k) and not _grouped(fast_forms.accelerate(conv), x, k), case
  every = lambda xs, ks: [conv(x, k) for (conv, _, _), x, k in zip(cases, xs, ks)]
  _assert_same_values_and_grads(every, fast_forms.accelerate(every), [x for _, x, _ in cases],
                                [k for _, _, k in cases], labels=DEPTHWISE_CASES)


def test_depthwise_convolutions_stay_grouped_when_the_form_is_grouped():
  conv, x, k = _depthwise(DEPTHWISE_CASES[0])
  assert _grouped(fast_forms.accelerate(conv, fast_forms.Forms(depthwise='grouped')), x, k)


POINTWISE_CASES = [(1, 'NHWC'), (2, 'NHWC'), (1, 'NCHW')]


def test_pointwise_convolutions_become_the_matmul_form():
  x = [_random((2, 5, 7, 7) if layout == 'NCHW' else (2, 7, 7, 5)) for _, layout in
       POINTWISE_CASES]
  k = _random((1, 1, 5, 6), 1)
  every = lambda xs, k: [jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=(layout, 'HWIO', layout))
                         for x, (stride, layout) in zip(xs, POINTWISE_CASES)]
  fast = fast_forms.accelerate(every)
  assert _names(every, x, k).count('conv_general_dilated') == 3
  assert 'conv_general_dilated' not in _names(fast, x, k)
  assert _names(fast, x, k).count('custom_vjp_call') == 3  # fast_grads.pointwise_conv
  _assert_same_values_and_grads(every, fast, x, k, labels=POINTWISE_CASES)


def test_a_full_convolution_keeps_its_form():
  x, k = _random((2, 8, 8, 3)), _random((3, 3, 3, 4), 1)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert 'conv_general_dilated' in _names(fast_forms.accelerate(conv), x, k)


def test_tiled_max_pooling_becomes_the_tiled_form_and_overlapping_pooling_does_not():
  # Rounded values: ties inside windows, where the gradient must go to the first maximum.
  x = jnp.round(_random((2, 7, 7, 3)) * 2)
  tiled = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  fast = fast_forms.accelerate(tiled)
  assert 'reduce_window_max' in _names(tiled, x)
  assert 'reduce_window_max' not in _names(fast, x)
  _assert_same_values_and_grads(tiled, fast, x)
  overlapping = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2))
  assert 'reduce_window_max' in _names(fast_forms.accelerate(overlapping), x)


def test_bernoulli_masks_become_hash_masks():
  key, x = jax.random.key(3), _random((4, 16, 16, 8))
  dropout = lambda key, x: jnp.where(jax.random.bernoulli(key, 0.75, x.shape), x / 0.75, 0.0)
  hashed = lambda key, x: jnp.where(layers.hash_keep_mask(key, 0.25, x.shape), x / 0.75, 0.0)
  fast = jax.jit(fast_forms.accelerate(dropout))(key, x)
  np.testing.assert_array_equal(fast, jax.jit(hashed)(key, x))
  assert not np.array_equal(fast, jax.jit(dropout)(key, x))  # Not Threefry's mask any more.
  same = fast_forms.accelerate(dropout, fast_forms.Forms(dropout='threefry'))
  assert _threefry_masks(same, key, x) and not _threefry_masks(fast_forms.accelerate(dropout),
                                                               key, x)


def test_linen_dropout_gets_hash_masks_with_its_rate():
  model = nn.Dropout(0.3)
  x = np.ones((8, 16, 16, 16), np.float32)
  apply = lambda x, key: model.apply({}, x, deterministic=False, rngs={'dropout': key})
  key = jax.random.key(0)
  assert _threefry_masks(apply, x, key) and not _threefry_masks(fast_forms.accelerate(apply), x,
                                                                key)
  y = np.asarray(jax.jit(fast_forms.accelerate(apply))(x, key))
  assert np.all((y == 0) | np.isclose(y, 1 / 0.7))
  assert abs((y == 0).mean() - 0.3) < 0.01


def _sub_jaxpr_model(x, k):
  """A depthwise convolution inside each kind of sub-computation the rewrite rebuilds."""
  conv = lambda x: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  x = jax.jit(conv)(x)
  x = jax.checkpoint(conv)(x)
  x, _ = jax.lax.scan(lambda c, _: (conv(c), None), x, None, length=2)
  x = jax.lax.cond(jnp.sum(x) > 0, conv, lambda x: -conv(x), x)
  return x


def test_sub_computations_are_rewritten_with_autodiffs_gradient():
  x, k = _random((2, 6, 6, 4)), _random((3, 3, 1, 4), 1) * 0.3
  fast = fast_forms.accelerate(_sub_jaxpr_model)
  assert len(_grouped(_sub_jaxpr_model, x, k)) == 5 and not _grouped(fast, x, k)
  _assert_same_values_and_grads(_sub_jaxpr_model, fast, x, k)


def test_while_loops_are_rewritten_and_custom_rules_are_kept():
  x, k = _random((2, 6, 6, 4)), _random((3, 3, 1, 4), 1) * 0.3
  conv = lambda x: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  loop = lambda x, n: jax.lax.while_loop(lambda c: c[1] < n, lambda c: (conv(c[0]), c[1] + 1),
                                         (x, 0))[0]
  fast = fast_forms.accelerate(loop)
  assert not _grouped(fast, x, 3)
  np.testing.assert_allclose(fast(x, 3), loop(x, 3), **TOL)

  # A user's custom_vjp is bound as written: its rule belongs to the body as written.
  custom = jax.custom_vjp(conv)
  custom.defvjp(lambda x: (conv(x), None), lambda _, g: (g,))
  assert len(_grouped(fast_forms.accelerate(custom), x, into_custom_rules=True)) == 1


def _nnx_functional(model):
  """A plain NNX model as a pure function of its parameters and other state (BatchNorm
  statistics, dropout rng counts), the way NNX code goes functional: `nnx.split`/`nnx.merge`."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    return m(x), nnx.state(m, nnx.Not(nnx.Param))

  return apply, params, rest


def _linen_functional(model, x, concrete):
  """A plain Linen model in training mode as a function of (params, batch_stats, images), and
  its variables (shapes only unless `concrete`: tracing needs no values)."""
  init = jax.jit(model.init) if concrete else functools.partial(jax.eval_shape, model.init)
  variables = init(jax.random.key(0), x)
  apply = lambda params, stats, x: model.apply(
      {'params': params, 'batch_stats': stats}, x, train=True,
      rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats'])
  return apply, variables['params'], variables['batch_stats']


def _nnx_model(make, concrete):
  model = make(rngs=nnx.Rngs(0)) if concrete else nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  model.train()
  return _nnx_functional(model)


# Model 3 (seven dropout layers) and the tiny net, in plain Linen and plain NNX:
# name -> (make(concrete) -> (apply, params, rest), dropout layers).
PLAIN_MODELS = {
    'Model3Linen': (lambda c: _linen_functional(plain_nets.Model3Linen(), _random((2, 32, 32, 3)),
                                                c), 7),
    'Model3NNX': (lambda c: _nnx_model(plain_nets.Model3NNX, c), 7),
    'TinyLinen': (lambda c: _linen_functional(plain_nets.TinyLinen(), _random((2, 16, 16, 3)), c),
                  0),
    'TinyNNX': (lambda c: _nnx_model(plain_nets.TinyNNX, c), 0),
}


@pytest.mark.parametrize('name', sorted(PLAIN_MODELS))
def test_plain_linen_and_nnx_models_get_every_fast_form(name):
  make, dropout_layers = PLAIN_MODELS[name]
  apply, params, rest = make(False)
  x = _random((2, 32, 32, 3))
  fast = fast_forms.accelerate(apply)
  names = _names(fast, params, rest, x)
  assert len(_grouped(apply, params, rest, x)) == (7 if 'Model3' in name else 2)
  assert 'conv_general_dilated' not in names and 'reduce_window_max' not in names
  assert len(_threefry_masks(apply, params, rest, x)) == dropout_layers
  assert not _threefry_masks(fast, params, rest, x)


def _layer_names(fn, *args) -> set[str]:
  """The layer names (Flax module paths' parts, e.g. 'Conv_0') in the operations' locations of
  `fn`'s lowered gradient: the names profiles and XLA dumps show."""
  fn = jax.jit(fn)
  loss = lambda *a: fn(*a)[0].sum()  # The logits'.
  text = jax.jit(jax.grad(loss, (0, 2))).lower(*args).as_text(debug_info=True)
  return {part for name in re.findall(r'loc\("([^"\[]+/[^"\[]+)"', text)  # Not the arguments'.
          for part in name.split('/') if re.fullmatch(r'[A-Za-z]+_\d+', part)}


def test_the_fast_forms_keep_the_layer_names_of_every_operation():
  # Linen modules name their operations (NNX modules put no names on JAX's name stack).
  apply, params, rest = PLAIN_MODELS['TinyLinen'][0](True)
  x = _random((2, 32, 32, 3))
  names = _layer_names(apply, params, rest, x)
  assert len(names) >= 3, names
  assert _layer_names(fast_forms.accelerate(apply), params, rest, x) == names


@pytest.mark.parametrize('name', ['TinyLinen', 'TinyNNX'])
def test_plain_models_train_with_autodiffs_gradient(name):
  apply, params, rest = PLAIN_MODELS[name][0](True)
  x = _random((2, 16, 16, 3))
  fast = fast_forms.accelerate(apply)
  # The logits, and their gradients w.r.t. the parameters and the images.
  _assert_same_values_and_grads(lambda *a: apply(*a)[0], lambda *a: fast(*a)[0], params, rest,
                                x, argnums=(0, 2))


# --- The depthwise form of 'auto' -----------------------------------------------------------

def _model_convs():
  model = plain_nets.TinyLinen()
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return fast_forms.depthwise_convs(jax.make_jaxpr(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x))


def test_auto_on_an_accelerator_takes_the_form_measured_faster():
  convs = _model_convs()
  assert len(convs) == 2
  calls = []

  def timer(faster):
    def measure(c):
      calls.append(len(c))
      return {'grouped': 2.0, 'shifted': 1.0} if faster == 'shifted' else {
          'grouped': 1.0, 'shifted': 2.0}
    return measure

  assert fast_forms.choose_depthwise('gpu', convs, timer('shifted'))[0] == 'shifted'
  assert fast_forms.choose_depthwise('gpu', convs, timer('grouped'))[0] == 'grouped'
  assert calls == [2, 2]
  # On the CPU the shifted form, untimed; explicit forms are never timed.
  assert fast_forms.choose_depthwise('cpu', convs, timer('grouped')) == ('shifted', None)
  forms, seconds = fast_forms.resolve_forms('grouped', 'hash', lambda: 1 / 0, 'gpu',
                                            timer('shifted'))
  assert forms.depthwise == 'grouped' and seconds is None and calls == [2, 2]
  forms, seconds = fast_forms.resolve_forms('auto', 'threefry', lambda: 1 / 0, 'cpu')
  assert forms == fast_forms.Forms('shifted', 'threefry') and seconds is None


def test_the_depthwise_measurement_times_both_forms():
  seconds = fast_forms.measure_depthwise(_model_convs()[:1], repeats=1)
  assert set(seconds) == {'grouped', 'shifted'} and all(s > 0 for s in seconds.values())


# --- The one hook: every model's training state computes in the fast forms -------------------

@pytest.mark.parametrize('model,depthwise_impl,dropout_impl', [
    ('examples.my_nets:SeparableNet', 'auto', 'hash'),  # Plain Linen, dropout and max pooling.
    ('examples.my_nets:SeparableNet', 'grouped', 'threefry'),
    ('examples.plain_nets:Model3NNX', 'auto', 'hash'),  # Plain NNX, through nnx_adapter.
])
def test_the_experiment_puts_the_fast_forms_into_every_step(model, depthwise_impl, dropout_impl):
  config = get_testing_config()
  config.model = model
  if 'SeparableNet' in model:
    config.model_kwargs = {'widths': (8, 16)}
  config.depthwise_impl, config.dropout_impl = depthwise_impl, dropout_impl
  config.batch_size = 4
  data = experiment.synthetic_data(4, (32, 32, 3), 10, 0)
  exp = experiment.create_experiment(config, data)
  assert exp.forms == fast_forms.Forms('shifted' if depthwise_impl == 'auto' else 'grouped',
                                       dropout_impl)
  state = exp.state
  step = functools.partial(exp.train_epoch, state, exp.train_images, exp.train_labels)
  names = _names(step, np.int32(1))
  assert ('conv_general_dilated' in names) == (depthwise_impl == 'grouped')
  assert 'reduce_window_max' not in names  # Tiled max pooling in either case.
  assert bool(_threefry_masks(step, np.int32(1))) == (dropout_impl == 'threefry')
