"""Width multipliers and filling a parameter budget (`config.fit_params`, dsconv_jax.budget)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import pytest

from dsconv_jax import analysis, budget, layers, models, train
from dsconv_jax.defaults import get_config, get_testing_config
from dsconv_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model3_config(**overrides):
  config = get_config()
  config.model = 'model3'
  for k, v in overrides.items():
    config[k] = v
  return config


@pytest.mark.parametrize('name,total', [('model3', 35_387), ('separable80k', 80_203)])
def test_multiplier_one_is_the_source_network(name, total):
  model = models.create_model(name, width_multiplier=1.0)
  assert analysis.count_params(model, (32, 32, 3)) == total


def test_multiplier_scales_hidden_widths_but_never_the_classes():
  report = analysis.analyze_model(models.create_model('model3', width_multiplier=0.5), (32, 32, 3))
  shapes = {l.name: l.output_shape for l in report.layers}
  assert shapes['PointwiseConv2D_0'] == [32, 32, 16] and shapes['PointwiseConv2D_2'] == [28, 28, 64]
  assert shapes['PointwiseConv2D_9'] == [2, 2, 10] and shapes['GlobalAvgPool_0'] == [10]
  sep = analysis.analyze_model(models.create_model('separable80k', width_multiplier=0.25),
                               (32, 32, 3))
  assert [l.output_shape[-1] for l in sep.layers if l.type == 'SeparableConv2D'] == [
      8, 12, 24, 32, 40, 48, 10]
  assert models.scale_width(3, 0.01) == 1  # Never a zero-width layer.


def test_count_params_is_the_analysis_total():
  model = models.create_model('separable80k', width_multiplier=1.3)
  assert analysis.count_params(model, (32, 32, 3)) == analysis.analyze_model(
      model, (32, 32, 3)).params_total


def test_model3_fit_100k_through_the_cli():
  out = subprocess.run(
      [sys.executable, '-m', 'dsconv_jax.summary', '--config=configs/model3.py',
       '--config.fit_params=100000', '--json'], cwd=ROOT, capture_output=True, text=True,
      timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  m = report['width_multiplier']
  assert report['fit_params'] == 100_000 and (m * budget.GRID).is_integer()
  assert report['params_total'] < 100_000 and report['violations'] == []
  # The next step of the grid would not fit.
  wider = models.create_model('model3', width_multiplier=m + 1 / budget.GRID)
  assert analysis.count_params(wider, (32, 32, 3)) >= 100_000
  assert (m, report['params_total']) == (110 / 64, 98_752)  # Measured; see README.


def test_resolve_width_sets_the_multiplier_on_a_copy_of_a_locked_config():
  config = model3_config(fit_params=40_000)
  config.lock()
  fitted, info = budget.resolve_width(config, (32, 32, 3), 10)
  assert 'width_multiplier' not in config.model_kwargs  # The given config is left alone.
  m = fitted.model_kwargs.width_multiplier
  assert info['width_multiplier'] == m and info['fit_params'] == 40_000
  assert info['params_total'] == analysis.count_params(models.build_model(fitted, 10), (32, 32, 3))
  assert info['params_total'] < 40_000 <= info['next_params_total']
  assert info['next_width_multiplier'] == m + 1 / budget.GRID
  assert 'Width multiplier' in budget.describe(info)


def test_fit_params_off_changes_nothing():
  config = model3_config()
  fitted, info = budget.resolve_width(config, (32, 32, 3), 10)
  assert fitted is config and info == {'width_multiplier': 1.0, 'fit_params': 0}
  baseline = model3_config(model='baseline')
  assert budget.resolve_width(baseline, (32, 32, 3), 10)[1]['width_multiplier'] is None


def test_fit_params_on_a_model_without_a_multiplier_is_a_user_error():
  with pytest.raises(UserError, match=r"model 'baseline' \(Baseline\) has no width_multiplier "
                                      r'field; models that do: .*model2, model3, model4, '
                                      r'separable80k'):
    budget.resolve_width(model3_config(model='baseline', fit_params=50_000), (32, 32, 3), 10)


def test_fit_params_too_small_or_negative_is_a_user_error():
  with pytest.raises(UserError, match='too small for model3: even the narrowest width'):
    budget.resolve_width(model3_config(fit_params=100), (32, 32, 3), 10)
  with pytest.raises(UserError, match='must be >= 0'):
    budget.resolve_width(model3_config(fit_params=-5), (32, 32, 3), 10)


def test_widest_below_finds_the_boundary_of_a_monotone_count():
  calls = []
  count = lambda k: calls.append(k) or 100 * k * k
  assert budget.widest_below(count, 10_000) == (9, 8_100, 10_000)  # 10,000 is not below.
  assert budget.widest_below(lambda k: 100 * k * k, 1_000_000) == (99, 980_100, 1_000_000)
  assert len(calls) == len(set(calls)) < 10  # Bisection, each count once.


def test_widest_below_refuses_a_count_that_is_not_monotone():
  dip = lambda k: 50 if k == 32 else k  # 32 -> 50, then 48 -> 48.
  with pytest.raises(UserError, match='not monotone in width_multiplier'):
    budget.widest_below(dip, 60)


class _WideTiny(nn.Module):
  """TinyNet with a width multiplier: 27 + 19 * width parameters for 3 inputs and 3 classes."""
  num_classes: int = 10
  width_multiplier: float = 1.0
  options: layers.Options = layers.Options()

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.DepthwiseConv2D(3, padding='same', use_bias=False, options=self.options)(x)
    x = layers.PointwiseConv2D(models.scale_width(8, self.width_multiplier), use_bias=False)(x)
    x = layers.BatchNorm()(layers.Activation('relu')(x), train)
    x = layers.MaxPool2D(2)(x)
    x = layers.SeparableConv2D(self.num_classes, 3, use_bias=False, options=self.options)(x)
    return layers.GlobalAvgPool()(x)


def test_training_records_the_chosen_multiplier(tmp_path, image_folder, monkeypatch):
  monkeypatch.setitem(models.MODELS, 'wide_tiny', _WideTiny)
  config = get_testing_config()
  config.model = 'wide_tiny'
  config.dataset = f'folder:{image_folder}'
  config.train_examples = config.eval_examples = 0
  config.fit_params = 200
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  # Width 9 (27 + 19 * 9 = 198) fits, 10 (217) does not; 8 * 75/64 rounds to 9, 8 * 76/64 to 10.
  assert summary['width_multiplier'] == 75 / 64 and summary['fit_params'] == 200
  assert summary['params_total'] == 198
  # Multiply-accumulates per 32x32 image at width 9: depthwise 32*32*3*9, pointwise 32*32*3*9,
  # then on the pooled map the separable conv's depthwise 14*14*9*9 and pointwise 14*14*9*3.
  assert summary['macs_per_image'] == 27_648 + 27_648 + 15_876 + 5_292
  assert summary['config']['model_kwargs'] == {'width_multiplier': 75 / 64}
