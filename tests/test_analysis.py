"""Receptive fields, jumps, output sizes and constraint checks, computed from the real modules."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import pytest

from dsconv_jax import analysis, layers, models
from dsconv_jax.defaults import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_rows(report):
  """The rows of layers with a spatial kernel or pooling (where RF changes)."""
  return [l for l in report.layers if l.type in ('DepthwiseConv2D', 'SeparableConv2D',
                                                 'MaxPool2D', 'Conv2D')]


@pytest.mark.parametrize('impl', ['grouped', 'shifted'])
def test_model3_receptive_fields(impl):
  report = analysis.analyze_model(models.create_model('model3', depthwise_impl=impl), (32, 32, 3))
  # Source 000 annotated these by hand (and got the last ones wrong: it claimed 42 and 54).
  assert [l.receptive_field for l in conv_rows(report)] == [3, 5, 7, 8, 12, 16, 20, 22, 30]
  assert [l.jump for l in conv_rows(report)] == [1, 1, 1, 2, 2, 2, 2, 4, 4]
  assert [l.output_shape[0] for l in conv_rows(report)] == [32, 30, 28, 14, 12, 10, 8, 4, 2]
  last_conv = [l for l in report.layers if l.type == 'PointwiseConv2D'][-1]
  assert last_conv.receptive_field == 30 and last_conv.output_shape == [2, 2, 10]


def test_separable80k_receptive_fields_match_source_annotations():
  report = analysis.analyze_model(models.create_model('separable80k'), (32, 32, 3))
  # Source 001's comments: rout = 3, 5, 7, 8 (pool), 12, 16, 18 (pool), 26, 34.
  assert [l.receptive_field for l in conv_rows(report)] == [3, 5, 7, 8, 12, 16, 18, 26, 34]
  assert [l.output_shape for l in conv_rows(report)][-1] == [4, 4, 10]
  assert [l.params for l in report.layers if l.type == 'SeparableConv2D'] == [
      123, 1824, 5040, 13152, 21632, 32160, 3648]  # Source 001's Keras summary.


class _Residual(layers.Layer):
  """x + dw5x5(dw3x3(x)), a stride-2 projection branch, to check RF through branches."""

  @nn.compact
  def __call__(self, x, train=False):
    y = layers.DepthwiseConv2D(3, padding='same', use_bias=False)(x)
    y = layers.DepthwiseConv2D(5, padding='same', use_bias=False, dilation=2)(y)
    return nn.relu(x + y)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = _Residual()(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding='same', use_bias=False)(x)
    x = layers.DepthwiseConv2D(3, padding='valid', use_bias=False)(x)
    return layers.GlobalAvgPool()(x)


def test_receptive_field_through_residual_dilated_and_strided_layers():
  report = analysis.analyze_model(_Net(), (16, 16, 4))
  rf = [l.receptive_field for l in report.layers]
  jumps = [l.jump for l in report.layers]
  # Residual: max(1, 3 + (5-1)*2) = 11. Stride-2 3x3: 11 + 2 = 13, jump 2. Then 3x3: 13 + 4 = 17.
  assert rf[:3] == [11, 13, 17] and jumps[:3] == [1, 2, 2]
  assert report.layers[0].name == '_Residual_0' and report.layers[0].params == 9 * 4 + 25 * 4


def test_baseline_violations_name_each_broken_rule():
  c = get_config().constraints
  report = analysis.analyze_model(models.create_model('baseline'), (32, 32, 3), c)
  text = '\n'.join(report.violations)
  assert 'not below constraints.max_params=100,000' in text
  assert sum('convolution across channels' in v for v in report.violations) == 6
  assert sum('dense layer' in v for v in report.violations) == 3
  assert 'no BatchNorm' in text


def test_model3_satisfies_the_source_constraints_but_not_a_smaller_budget():
  c = get_config().constraints
  assert analysis.analyze_model(models.create_model('model3'), (32, 32, 3), c).violations == []
  c.max_params = 35_000
  violations = analysis.analyze_model(models.create_model('model3'), (32, 32, 3), c).violations
  assert violations == ['35,387 parameters (Keras count, BatchNorm statistics included) is not '
                        'below constraints.max_params=35,000']


def test_pointwise_on_a_1x1_map_counts_as_dense():
  class Disguised(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = layers.DepthwiseConv2D(8, use_bias=False)(x)  # 8x8 -> 1x1
      x = layers.BatchNorm()(x, train)
      return layers.PointwiseConv2D(10)(x)[:, 0, 0]
  c = get_config().constraints
  violations = analysis.analyze_model(Disguised(), (8, 8, 3), c).violations
  assert any('1x1 convolution on a 1x1 map is a dense layer' in v for v in violations)


def _summary_cli(*args):
  return subprocess.run([sys.executable, '-m', 'dsconv_jax.summary', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_summary_cli_json_and_table():
  out = _summary_cli('--config=configs/model3.py', '--json')
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert report['params_total'] == 35_387 and report['params_trainable'] == 34_427
  assert report['params_non_trainable'] == 960 and report['violations'] == []
  assert {'name', 'type', 'output_shape', 'params', 'receptive_field', 'jump'} <= set(
      report['layers'][0])
  table = _summary_cli('--config=configs/baseline.py')
  assert table.returncode == 0, table.stderr
  assert 'Total params: 1,172,410' in table.stdout


def test_summary_cli_exits_1_with_reasons_on_violation():
  out = _summary_cli('--config=configs/model3.py', '--config.constraints.max_params=30000')
  assert out.returncode == 1
  assert 'not below constraints.max_params=30,000' in out.stderr
  assert 'Traceback' not in out.stderr
