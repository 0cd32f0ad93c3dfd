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
  report = analysis.analyze_model(models.create_model('model3', options=layers.Options(depthwise=impl)), (32, 32, 3))
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
  assert {'name', 'type', 'output_shape', 'params', 'receptive_field', 'jump', 'macs',
          'activation_bytes'} <= set(report['layers'][0])
  assert report['macs_total'] == 10_961_024
  assert report['activation_bytes_total'] == sum(l['activation_bytes'] for l in report['layers'])
  assert report['output_receptive_field'] == 30 and report['receptive_field_status'] == 'short'
  assert 'falls short of the 32x32 image' in report['receptive_field_verdict']
  assert report['width_multiplier'] == 1.0 and report['fit_params'] == 0
  table = _summary_cli('--config=configs/baseline.py')
  assert table.returncode == 0, table.stderr
  assert 'Total params: 1,172,410' in table.stdout


def test_summary_cli_exits_1_with_reasons_on_violation():
  out = _summary_cli('--config=configs/model3.py', '--config.constraints.max_params=30000')
  assert out.returncode == 1
  assert 'not below constraints.max_params=30,000' in out.stderr
  assert 'Traceback' not in out.stderr


def test_summary_cli_receptive_field_advice_never_fails_the_run():
  # Model 3 holds every constraint but its output sees 30 of 32 pixels: advice, exit 0.
  out = _summary_cli('--config=configs/model3.py')
  assert out.returncode == 0, out.stderr
  assert 'falls short of the 32x32 image' in out.stdout and 'Constraints: all hold.' in out.stdout
  assert 'MACs per image: 10,961,024' in out.stdout
  assert 'error' not in out.stderr


MODEL3_MACS = 10_961_024  # Convolutions only: depthwise 846,720 + pointwise 10,114,304.


def test_model3_macs_are_the_same_in_both_depthwise_forms():
  reports = {impl: analysis.analyze_model(models.create_model('model3', options=layers.Options(depthwise=impl)),
                                          (32, 32, 3))
             for impl in ('grouped', 'shifted')}
  for report in reports.values():
    assert report.macs_total == MODEL3_MACS
    assert sum(l.macs for l in report.layers) == MODEL3_MACS  # Every MAC is in its layer.
    macs = {l.name: l.macs for l in report.layers}
    assert macs['DepthwiseConv2D_0'] == 32 * 32 * 3 * 9
    assert macs['DepthwiseConv2D_1'] == 30 * 30 * 32 * 9
    assert macs['PointwiseConv2D_2'] == 28 * 28 * 64 * 128
    assert macs['BatchNorm_0'] == macs['MaxPool2D_0'] == macs['GlobalAvgPool_0'] == 0
  assert ([l.macs for l in reports['grouped'].layers]
          == [l.macs for l in reports['shifted'].layers])


def test_macs_of_full_convolutions_and_dense_layers():
  report = analysis.analyze_model(models.create_model('baseline'), (32, 32, 3))
  macs = {l.name: l.macs for l in report.layers}
  assert macs['Conv2D_1'] == 30 * 30 * 48 * (3 * 3 * 48)  # out elements x kh*kw*Cin
  assert macs['Dense_0'] == (2 * 2 * 192) * 512
  assert report.macs_total == 55_145_472


def test_separable_macs_count_the_depth_multiplier():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return layers.SeparableConv2D(8, 3, depth_multiplier=2, options=layers.Options(depthwise='shifted'))(x)
  report = analysis.analyze_model(Net(), (10, 10, 4))
  # Depthwise: 8x8 outputs x (4 x 2) channels x 9 taps; pointwise: 8x8 x 8 outputs x 8 inputs.
  assert report.macs_total == 8 * 8 * 8 * 9 + 8 * 8 * 8 * 8


def test_operations_outside_every_layer_count_only_in_the_total():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = layers.GlobalAvgPool()(layers.PointwiseConv2D(6, use_bias=False)(x))
      return nn.Dense(5, use_bias=False)(x)  # A Flax layer, not a dsconv_jax Layer: no row.
  report = analysis.analyze_model(Net(), (4, 4, 3))
  assert [l.macs for l in report.layers] == [4 * 4 * 3 * 6, 0]
  assert report.macs_total == 4 * 4 * 3 * 6 + 6 * 5


def test_activation_bytes_are_output_elements_times_itemsize():
  class Half(layers.Layer):
    @nn.compact
    def __call__(self, x, train=False):
      return x.astype('bfloat16')

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = layers.PointwiseConv2D(16)(x)
      return Half()(x)
  report = analysis.analyze_model(Net(), (8, 6, 3))
  assert [l.activation_bytes for l in report.layers] == [8 * 6 * 16 * 4, 8 * 6 * 16 * 2]
  assert report.activation_bytes_total == 8 * 6 * 16 * 6
  assert report.activation_bytes_max == 8 * 6 * 16 * 4
  model3 = analysis.analyze_model(models.create_model('model3'), (32, 32, 3))
  row = next(l for l in model3.layers if l.name == 'PointwiseConv2D_2')
  assert row.activation_bytes == 28 * 28 * 128 * 4 == model3.activation_bytes_max


def test_model3_receptive_field_falls_short_of_the_image():
  report = analysis.analyze_model(models.create_model('model3'), (32, 32, 3))
  # The output is the last layer with spatial axes, not the global pooling row (34).
  assert report.receptive_field_layer == 'PointwiseConv2D_9'
  assert report.output_receptive_field == 30 and report.receptive_field_status == 'short'
  verdict = report.receptive_field_verdict
  assert 'falls short of the 32x32 image' in verdict
  for advice in ('pooling layer earlier', 'larger kernels', 'dilation', 'add depth'):
    assert advice in verdict
  assert 'adds 8' in verdict  # 2 x jump 4: one more 3x3 layer would reach 38 >= 32.
  assert report.violations == []


def test_separable80k_receptive_field_covers_the_image():
  report = analysis.analyze_model(models.create_model('separable80k'), (32, 32, 3))
  assert report.output_receptive_field == 34 and report.receptive_field_status == 'covers'
  assert 'covers the whole 32x32 image' in report.receptive_field_verdict


def test_receptive_field_many_times_the_image_overshoots():
  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      for _ in range(3):
        x = layers.DepthwiseConv2D(3, padding='same', dilation=8, use_bias=False)(x)
      x = layers.BatchNorm()(x, train)
      return layers.GlobalAvgPool()(x)
  c = get_config().constraints
  report = analysis.analyze_model(Dilated(), (8, 8, 3), c)
  assert report.output_receptive_field == 1 + 3 * 16  # 49 > 4 x 8
  assert report.receptive_field_status == 'overshoots' and report.violations == []
  assert 'overshoots the 8x8 image 6.1 times' in report.receptive_field_verdict
  # Exactly 4 times the image still covers; more than 4 times on one axis overshoots.
  just = analysis.receptive_field_advice(
      [analysis.LayerReport('a', 'DepthwiseConv2D', [8, 8, 3], 0, 0, 32, 1)], (8, 8, 3))
  assert just['receptive_field_status'] == 'covers'
  over = analysis.receptive_field_advice(
      [analysis.LayerReport('a', 'DepthwiseConv2D', [8, 8, 3], 0, 0, [8, 33], 1)], (8, 8, 3))
  assert over['receptive_field_status'] == 'overshoots'
