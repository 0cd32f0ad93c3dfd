"""Every source model has exactly its Keras parameter count; every config builds; build_model's
three forms (built-in name, 'sequential', import path) and what each model is given."""

import glob
import importlib
import importlib.util
import json
import os
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import analysis, experiment, models, train
from dsconv_jax.defaults import get_config, get_testing_config
from dsconv_jax.errors import UserError
from dsconv_jax.layers import Options

from conftest import make_image_folder

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Every config field experiment.describe_model reads: configs equal in these are one architecture.
_ARCHITECTURE_FIELDS = ('model', 'model_kwargs', 'layers', 'fit_params', 'constraints',
                        'bn_momentum', 'bn_epsilon', 'depthwise_impl', 'dropout_impl')


def cifar_report(config, cache: dict):
  """describe_model's report of `config` for 32x32x3 images and 10 classes, analysed once per
  architecture in `cache` (recipe-only candidate lines share their config's)."""
  key = json.dumps({k: config.get(k) for k in _ARCHITECTURE_FIELDS}, sort_keys=True, default=str)
  if key not in cache:
    cache[key] = experiment.describe_model(config, (32, 32, 3), 10).report
  return cache[key]


# (total, trainable) as printed by Keras in the sources. Non-trainable = BatchNorm moving
# mean and variance, 2 per channel: Model 3 has 480 BN channels (960), the 80k net 656 (1,312).
EXPECTED = {
    'baseline': (1_172_410, 1_172_410),  # the source study's reconstruction; matches exactly.
    'model2': (35_387, 34_427),
    'model3': (35_387, 34_427),
    'model4': (35_387, 34_427),
    'separable80k': (80_203, 78_891),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_config_parameter_counts(name):
  config = load_config(name)
  report = experiment.describe_model(config, (32, 32, 3), 10).report
  assert (report.params_total, report.params_trainable) == EXPECTED[name]
  assert report.params_non_trainable == EXPECTED[name][0] - EXPECTED[name][1]
  assert report.violations == []  # The baseline's config switches its constraints off.


def analysis_sees_flax_batch_norm():
  """Whether `analysis` counts a plain `nn.BatchNorm` for constraints.require_batch_norm.

  Until it reports plain flax.linen layers, an imported model of them (configs/my_module.py)
  shows 'no BatchNorm layer'; that one violation is then expected, and no other.
  """
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=not train)(x)

  return analysis.analyze_model(Net(), (4, 4, 1), {'require_batch_norm': True}).violations == []


def test_every_config_file_builds_a_model_within_its_constraints(monkeypatch):
  monkeypatch.chdir(os.path.dirname(CONFIG_DIR))  # configs/my_module.py imports from the root.
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))]
  assert {'baseline', 'model2', 'model3', 'model4', 'separable80k', 'my_sequential',
          'my_module'} <= set(names)
  for name in names:
    config = load_config(name)
    description = experiment.describe_model(config, (32, 32, 3), 10)
    violations = description.report.violations
    if ':' in config.model and not analysis_sees_flax_batch_norm():
      violations = [v for v in violations if 'has no BatchNorm layer' not in v]
    assert violations == [], name
    # The command-line contract: keys every config has.
    for key in ('dataset', 'data_dir', 'num_epochs', 'batch_size', 'seed', 'learning_rate',
                'train_examples', 'eval_examples'):
      assert key in config, (name, key)
    for key in ('max_params', 'depthwise_separable_only', 'require_batch_norm', 'allow_dense'):
      assert key in config.constraints, (name, key)


@pytest.mark.parametrize('name', ['model3', 'separable80k', 'baseline', 'tiny'])
def test_output_is_logits_per_class(name):
  model = models.create_model(name, num_classes=7)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((4, 32, 32, 3))), v)
  assert out.shape == (4, 7)


def _dropped_fractions(name):
  """The fraction of units each Dropout layer of model `name` zeroes in one training pass."""
  model = models.create_model(name)
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  # Compiled: op by op, the two models' init and apply took 32 s of the suite's time.
  variables = jax.jit(model.init)(jax.random.key(1), x)
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, rngs={'dropout': jax.random.key(2)},
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda m, _: type(m).__name__ == 'Dropout'))(variables, x)
  outputs = [v['__call__'][0] for k, v in sorted(state['intermediates'].items(),
                                                  key=lambda kv: int(kv[0].split('_')[-1]))
             if k.startswith('Dropout_')]
  return [float(jnp.mean(y == 0)) for y in outputs]


def test_model4_drops_more_units_than_model3_in_every_stage():
  m3, m4 = _dropped_fractions('model3'), _dropped_fractions('model4')
  assert len(m3) == len(m4) == 7
  # Model 3's rates 0.1/0.2/0.25 by stage, Model 4's 0.2/0.3/0.35 (BN outputs are never exactly 0).
  np.testing.assert_allclose(m3, [0.1] * 3 + [0.2] * 3 + [0.25], atol=0.02)
  np.testing.assert_allclose(m4, [0.2] * 3 + [0.3] * 3 + [0.35], atol=0.02)


def test_unknown_model_is_a_user_error():
  with pytest.raises(models.UserError, match='unknown model'):
    models.create_model('resnet9000')


def test_example_configs_of_the_two_new_forms():
  mine = experiment.describe_model(load_config('my_sequential'), (32, 32, 3), 10).report
  assert (mine.params_total, mine.params_trainable) == (91_154, 89_554)
  assert mine.receptive_field_status == 'covers' and len(mine.layers) == 30
  config = load_config('my_module')
  assert config.model == 'examples.my_nets:SeparableNet'
  model = models.build_model(config, 10)
  assert analysis.count_params(model, (32, 32, 3)) == 37_829


# ---------------------------------------------------------------------------------------------
# Import paths: config.model = 'package.module:Class'.

USER_MODULE = """
import flax.linen as nn
import jax.numpy as jnp


class Net(nn.Module):
  num_classes: int = 10
  width: int = 4
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train=False):
    c = x.shape[-1]
    x = nn.Conv(c, (3, 3), feature_group_count=c, use_bias=False)(x)
    x = nn.Conv(self.width, (1, 1), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon)(x)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return jnp.mean(nn.Conv(self.num_classes, (1, 1))(x), axis=(1, 2))


class Bare(nn.Module):  # Declares none of the fields build_model can give.
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(x)
    return jnp.mean(nn.Conv(10, (1, 1))(x), axis=(1, 2))


class NoNorm(nn.Module):  # No BatchNorm at all.
  @nn.compact
  def __call__(self, x, train=False):
    return jnp.mean(nn.Conv(10, (1, 1))(x), axis=(1, 2))


def not_a_module():
  pass
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """write(name, source): a module in the working directory (tmp_path), which, as under a console
  script, is not on sys.path."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'path', [p for p in sys.path
                                    if p and os.path.abspath(p) != str(tmp_path)])
  written = []

  def write(name, source=USER_MODULE):
    (tmp_path / f'{name}.py').write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    written.append(name)
    return name

  yield write
  for name in written:
    sys.modules.pop(name, None)


def test_an_imported_module_trains_one_epoch(user_module, tmp_path):
  user_module('byom_train_nets')
  folder = make_image_folder(tmp_path / 'images')
  config = get_testing_config()
  config.model = 'byom_train_nets:Net'
  config.model_kwargs.width = 6
  config.dataset = f'folder:{folder}'
  config.train_examples = config.eval_examples = 0
  # The constraint checks are not this test's subject (and see analysis_sees_flax_batch_norm).
  config.constraints.require_batch_norm = False
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'), quiet=True)
  # depthwise 27 + pointwise 18 + BatchNorm 24 + classes 6 * 3 + 3.
  assert summary['model'] == 'byom_train_nets:Net' and summary['params_total'] == 90
  assert summary['epochs'] == 1 and np.isfinite(summary['test_accuracy'])


def test_a_run_with_tuple_model_kwargs_is_its_own_run_when_resumed(tmp_path):
  # run.json holds JSON lists; configs/my_module.py's model_kwargs.widths is a tuple.
  identity = {'model': 'examples.my_nets:SeparableNet', 'model_kwargs': {'widths': (32, 64)}}
  train._check_run_identity(str(tmp_path), identity)  # pylint: disable=protected-access
  train._check_run_identity(str(tmp_path), identity)  # pylint: disable=protected-access
  with pytest.raises(UserError, match='different configuration'):
    train._check_run_identity(str(tmp_path), {**identity, 'model_kwargs': {'widths': (32, 65)}})


def test_model_kwargs_that_name_the_defaults_resume_a_run_that_left_them_out(tmp_path):
  # A dsresnet run started before configs/dsresnet.py spelled its architecture out resumes.
  train._check_run_identity(str(tmp_path), {'model': 'dsresnet', 'model_kwargs': {}})  # pylint: disable=protected-access
  spelled = {'widths': (40, 80, 160), 'blocks': (1, 1, 1), 'stem_multiplier': 8, 'kernel_size': 3}
  train._check_run_identity(str(tmp_path), {'model': 'dsresnet', 'model_kwargs': spelled})  # pylint: disable=protected-access
  with pytest.raises(UserError, match='different configuration'):
    train._check_run_identity(str(tmp_path), {  # pylint: disable=protected-access
        'model': 'dsresnet', 'model_kwargs': {**spelled, 'kernel_size': 5}})


def test_build_model_gives_each_model_only_the_fields_it_declares(user_module):
  user_module('byom_fields_nets')
  config = get_config()
  config.bn_momentum, config.bn_epsilon = 0.8, 1e-4
  config.model = 'byom_fields_nets:Net'
  net = models.build_model(config, 7)
  assert (net.num_classes, net.bn_momentum, net.bn_epsilon) == (7, 0.8, 1e-4)
  config.model_kwargs.bn_momentum = 0.5  # model_kwargs win.
  assert models.build_model(config, 7).bn_momentum == 0.5
  config.model_kwargs = {}
  config.model = 'byom_fields_nets:Bare'
  # Given no field (no TypeError); the BatchNorm values reach its layers through a wrapper.
  bare = models.build_model(config, 7)
  assert type(bare.module).__name__ == 'Bare' and models.module_class(bare).__name__ == 'Bare'
  config.model = 'baseline'  # No BatchNorm, no bn fields.
  assert models.build_model(config, 7).num_classes == 7
  config.model = 'sequential'
  config.layers = ['Dense("num_classes")']
  config.depthwise_impl = 'grouped'
  spec = models.build_model(config, 7)
  assert (spec.num_classes, spec.options, spec.bn_momentum, spec.bn_epsilon) == (
      7, Options(depthwise='grouped'), 0.8, 1e-4)


@pytest.mark.parametrize('path, problem', [
    ('byom_missing_xyz:Net', "no module named 'byom_missing_xyz' in the working directory"),
    ('byom_err_nets:Nope', "module 'byom_err_nets' ("),
    ('byom_err_nets:not_a_module', 'names function'),
    ('byom_err_syntax:Net', "importing 'byom_err_syntax' failed: SyntaxError"),
    ('byom_err_dep:Net', "importing 'byom_err_dep' failed: No module named 'byom_no_such_dep'"),
    ('my-nets:Net', "is not an import path 'package.module:Class'"),
])
def test_a_bad_import_path_is_one_line(user_module, path, problem):
  user_module('byom_err_nets')
  user_module('byom_err_syntax', 'class Net(:\n')
  user_module('byom_err_dep', 'import byom_no_such_dep\n')
  config = get_config()
  config.model = path
  with pytest.raises(UserError) as e:
    models.build_model(config, 10)
  assert '\n' not in str(e.value) and str(e.value).startswith(f'config.model={path!r}')
  assert problem in str(e.value), str(e.value)


def _batch_norms(model):
  """(momentum, epsilon) of each flax BatchNorm `model` calls (the project's wrap one each)."""
  return analysis.batch_norm_settings(model, (32, 32, 3))


@pytest.mark.parametrize('name, n_bn', [('model3', 7), ('separable80k', 6), ('dsresnet', 9),
                                        ('tiny', 1)])
def test_bn_momentum_and_epsilon_reach_every_batch_norm_of_a_builtin_model(name, n_bn):
  config = get_config()
  config.model = name
  config.bn_momentum, config.bn_epsilon = 0.8, 1e-4
  assert _batch_norms(models.build_model(config, 10)) == [(0.8, 1e-4)] * n_bn
  # Without a config each model keeps its own defaults: Keras' (DS-ResNet: momentum 0.9).
  default = (0.9 if name == 'dsresnet' else 0.99, 1e-3)
  assert _batch_norms(models.create_model(name)) == [default] * n_bn


def test_the_dsresnet_config_keeps_momentum_0_9_and_the_source_configs_keras():
  assert set(_batch_norms(models.build_model(load_config('dsresnet'), 10))) == {(0.9, 1e-3)}
  for name in ('model3', 'separable80k'):
    assert set(_batch_norms(models.build_model(load_config(name), 10))) == {(0.99, 1e-3)}


def test_bn_momentum_and_epsilon_reach_an_imported_module(user_module):
  user_module('byom_bn_nets')
  config = get_config()
  config.model = 'byom_bn_nets:Net'
  config.bn_momentum, config.bn_epsilon = 0.8, 1e-4
  assert _batch_norms(models.build_model(config, 10)) == [(0.8, 1e-4)]
  config.model = 'byom_bn_nets:Bare'  # It declares no field: set on each of its BatchNorms.
  model = models.build_model(config, 10)
  assert _batch_norms(model) == [(0.8, 1e-4)]
  variables = model.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  _, updates = model.apply(variables, jnp.ones((2, 4, 4, 3)), train=True, mutable=['batch_stats'])
  # Momentum 0.8 in the update itself: 0.8 * 0 + 0.2 * 1.
  np.testing.assert_allclose(updates['batch_stats']['BatchNorm_0']['mean'], 0.2, rtol=1e-6)
  config.bn_epsilon = None  # The module's own: flax's 1e-5.
  assert _batch_norms(models.build_model(config, 10)) == [(0.8, 1e-5)]
  config.bn_momentum = None
  assert _batch_norms(models.build_model(config, 10)) == [(0.99, 1e-5)]


def test_model_options_that_cannot_reach_a_model_stop_with_one_line(user_module):
  user_module('byom_opt_nets')
  config = get_config()
  config.model = 'byom_opt_nets:Bare'
  # The layer forms reach every model through training's rewrite (tests/test_fast_forms.py):
  # accepted for a model without an `options` field; a bad value is still one line.
  config.depthwise_impl, config.dropout_impl = 'grouped', 'threefry'
  models.build_model(config, 10)
  config.depthwise_impl = 'fft'
  with pytest.raises(UserError, match='config.depthwise_impl must be one of'):
    models.build_model(config, 10)
  config.depthwise_impl, config.dropout_impl = 'auto', 'hash'
  config.model = 'byom_opt_nets:NoNorm'
  config.bn_momentum = 0.9
  with pytest.raises(UserError, match=r"config.bn_momentum=0.9 cannot reach model "
                                      r"'byom_opt_nets:NoNorm': it calls no BatchNorm layer"):
    experiment.describe_model(config, (8, 8, 3), 10)


def test_a_bad_bn_value_is_a_user_error():
  config = get_config()
  config.bn_momentum = 1.5
  with pytest.raises(UserError, match=r'config.bn_momentum must be a number in \[0, 1\]'):
    models.build_model(config, 10)
