"""Every source model has exactly its Keras parameter count; every config builds."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import experiment, models

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs')


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# (total, trainable) as printed by Keras in the sources. Non-trainable = BatchNorm moving
# mean and variance, 2 per channel: Model 3 has 480 BN channels (960), the 80k net 656 (1,312).
EXPECTED = {
    'baseline': (1_172_410, 1_172_410),  # product.md's reconstruction; matches exactly.
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


def test_every_config_file_builds_a_model_within_its_constraints():
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))]
  assert {'baseline', 'model2', 'model3', 'model4', 'separable80k'} <= set(names)
  for name in names:
    config = load_config(name)
    description = experiment.describe_model(config, (32, 32, 3), 10)
    assert description.report.violations == [], name
    # The command-line contract (product.md): keys every config has.
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
  variables = model.init(jax.random.key(1), x)
  _, state = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)},
                         mutable=['batch_stats', 'intermediates'],
                         capture_intermediates=lambda m, _: type(m).__name__ == 'Dropout')
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
