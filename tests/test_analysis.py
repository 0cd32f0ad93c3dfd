"""Receptive fields, jumps, output sizes and constraint checks, computed from the real modules."""

import json
import math
import os
import re
import subprocess
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import analysis, layers, models
from dsconv_jax.defaults import get_config
from dsconv_jax.errors import UserError

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
      # A matrix product in the model's own code, in no layer: no row.
      return x @ self.param('kernel', nn.initializers.zeros, (6, 5))
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


class _Apply(layers.Layer):
  """A layer that applies `fn` to the map: the operation under test, in a row of its own."""
  fn: Callable

  @nn.compact
  def __call__(self, x, train=False):
    return self.fn(x)


class _Around(nn.Module):
  """3x3 depthwise (RF 3), `fn` in an `_Apply` row, 3x3 depthwise, global pooling."""
  fn: Callable

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.DepthwiseConv2D(3, padding='same', use_bias=False)(x)
    x = _Apply(self.fn)(x)
    x = layers.DepthwiseConv2D(3, padding='same', use_bias=False)(x)
    return layers.GlobalAvgPool()(x)


def _same_3x3(x):
  """A 3x3 'same' depthwise convolution outside any layer (all-ones kernel)."""
  return jax.lax.conv_general_dilated(x, jnp.ones((3, 3, 1, x.shape[-1])), (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=x.shape[-1])


@pytest.mark.parametrize('primitive, fn, reason', [
    ('gather', lambda x: x[:, jnp.array([3, 0, 1, 2, 4, 5, 6, 7])],
     'it picks pixels by index along the height or width axis'),
    ('transpose', lambda x: jnp.transpose(x, (0, 2, 1, 3)), 'it swaps the height and width axes'),
    ('concatenate', lambda x: jnp.concatenate([x, x], axis=2),
     'it joins maps along the height or width axis'),
    # A flip keeps the field's size, but pixel k then sees what pixel n - 1 - k saw: unknown.
    ('rev', lambda x: x[:, ::-1], 'it flips the height or width axis'),
    ('add', lambda x: x[:, :4] + x[:, ::2], 'it combines maps whose neighbouring pixels are 1 and 2'),
    # A primitive with no rule (a crop at positions known only when it runs).
    ('dynamic_slice', lambda x: jax.lax.dynamic_slice(x, (0, 1, 1, 0), (1, 4, 4, 3)),
     'the walk does not know how it moves pixels'),
], ids=['gather', 'transpose', 'concatenate', 'rev', 'strides_add', 'unknown'])
def test_operations_the_walk_cannot_follow_are_listed_naming_primitive_and_layer(primitive, fn,
                                                                                 reason):
  """A gap in the analysis is reported, never a refusal: the rows from there on have no field,
  the rest of the report (parameters, MACs, constraints) is complete."""
  report = analysis.analyze_model(_Around(fn), (8, 8, 3), get_config().constraints)
  (unknown,) = report.unknown
  assert re.fullmatch(f'receptive field after {primitive} in _Apply_0: [^\\n]+', unknown)
  assert reason in unknown
  assert [l.receptive_field for l in report.layers] == [3, None, None, None]
  assert report.receptive_field_status == 'unknown'
  # The constraints are still checked (this model has no BatchNorm).
  assert report.violations == ['the model has no BatchNorm layer '
                               '(constraints.require_batch_norm=True)']
  assert report.macs_total > 0 and report.params_total == 54
  table = analysis.format_table(report)
  assert 'Not analysed' in table and f'  - {unknown[:60]}' in table


def test_gap_outside_every_row_names_the_flax_module_or_the_model():
  class Mirror(nn.Module):  # A plain module: no row, its path names it.
    @nn.compact
    def __call__(self, x):
      return x[:, :, ::-1]

  class Net(nn.Module):
    top: bool = False

    @nn.compact
    def __call__(self, x, train=False):
      x = layers.DepthwiseConv2D(3, use_bias=False)(x)
      return jnp.flip(x, 1) if self.top else Mirror()(x)
  assert analysis.analyze_model(Net(), (8, 8, 3)).unknown[0].startswith(
      'receptive field after rev in Mirror_0: it flips')
  assert analysis.analyze_model(Net(top=True), (8, 8, 3)).unknown[0].startswith(
      'receptive field after rev in Net: it flips')


@pytest.mark.parametrize('fn, rf', [
    # Channels only: a gather, a flip, a cumulative sum and a reduction keep the field (3 + 2 = 5).
    (lambda x: x[..., jnp.array([2, 0, 1])], 5),
    (lambda x: x[..., ::-1], 5),
    (lambda x: jnp.cumsum(x, axis=-1), 5),
    (lambda x: x - jnp.max(x, axis=-1, keepdims=True), 5),
    # Concatenating along channels sees what either branch sees: 5 (3 + 2), then 5 + 2.
    (lambda x: jnp.concatenate([x, _same_3x3(x)], axis=-1), 7),
    # The bottom half starts 4 rows down: pixel 0 sees rows -1..1 and 3..5, then one more each way.
    (lambda x: jnp.concatenate(jnp.split(x, 2, axis=1), axis=-1), [9, 5]),
    # NCHW and back, with a 3x3 stride-2 pooling in NCHW: 3 + 2, jump 2, then 5 + 2 * 2.
    (lambda x: jnp.transpose(jax.lax.reduce_window(
        jnp.transpose(x, (0, 3, 1, 2)), -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), 'SAME'),
        (0, 2, 3, 1)), 9),
], ids=['gather_channels', 'rev_channels', 'cumsum_channels', 'reduce_channels',
        'concatenate_channels', 'split_height', 'nchw_pooling'])
def test_operations_on_channels_or_moving_axes_keep_an_exact_field(fn, rf):
  report = analysis.analyze_model(_Around(fn), (8, 8, 3))
  assert report.layers[2].receptive_field == rf


def test_values_of_a_flattened_map_may_be_picked_only_once_mixed():
  class Net(nn.Module):
    mix: bool

    @nn.compact
    def __call__(self, x, train=False):
      x = layers.Flatten()(layers.DepthwiseConv2D(3, use_bias=False)(x))
      # Each of the first 5 flattened values sees one pixel's 3x3 field, not the whole map.
      return (layers.Dense(8)(x) if self.mix else x)[:, :5]
  assert analysis.analyze_model(Net(mix=False), (6, 6, 3)).unknown[0].startswith(
      'receptive field after slice in Net: it may pick')
  # Mixed by the dense layer, every value sees the 4x4 map's fields: 3 + 3 = 6 pixels.
  assert analysis.analyze_model(Net(mix=True), (6, 6, 3)).layers[-1].receptive_field == 6


@pytest.mark.parametrize('name', ['model3', 'separable80k', 'dsresnet', 'tiny'])
def test_both_depthwise_forms_give_the_same_table(name):
  # The shifted form reaches the walk as slices, products and (with a depth multiplier, DSResNet's
  # stem) a broadcast and reshape; the grouped form as one convolution.
  grouped, shifted = (
      analysis.analyze_model(models.create_model(name, options=layers.Options(depthwise=impl)),
                             (32, 32, 3)) for impl in ('grouped', 'shifted'))
  assert grouped.layers == shifted.layers and grouped.macs_total == shifted.macs_total


class _PlainNet(nn.Module):
  """A depthwise-separable net of plain Flax layers and functions.

  `groups` sets the second 3x3 convolution's feature_group_count (0: depthwise); `dense` ends with
  nn.Dense after the global mean instead of a 1x1 convolution before it.
  """
  groups: int = 0
  dense: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(6, (3, 3), padding='SAME', feature_group_count=3, use_bias=False)(x)  # x2 depth
    x = nn.Conv(16, (1, 1), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    x = nn.Conv(16, (3, 3), padding='VALID', feature_group_count=self.groups or 16,
                use_bias=False)(x)
    x = nn.Conv(32, (1, 1), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    if self.dense:
      return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))
    return jnp.mean(nn.Conv(10, (1, 1))(x), axis=(1, 2))


def test_plain_flax_layers_get_rows_typed_like_the_projects():
  model = _PlainNet()
  report = analysis.analyze_model(model, (16, 16, 3), get_config().constraints)
  rows = [(l.name, l.type, l.output_shape, l.params) for l in report.layers]
  assert rows == [
      ('Conv_0', 'DepthwiseConv2D', [16, 16, 6], 3 * 3 * 6),
      ('Conv_1', 'PointwiseConv2D', [16, 16, 16], 6 * 16),
      ('BatchNorm_0', 'BatchNorm', [16, 16, 16], 4 * 16),
      ('Dropout_0', 'Dropout', [8, 8, 16], 0),
      ('Conv_2', 'DepthwiseConv2D', [6, 6, 16], 3 * 3 * 16),
      ('Conv_3', 'PointwiseConv2D', [6, 6, 32], 16 * 32),
      ('BatchNorm_1', 'BatchNorm', [6, 6, 32], 4 * 32),
      ('Conv_4', 'PointwiseConv2D', [3, 3, 10], 32 * 10 + 10)]
  # Conv 3x3: 3; pooling 2x2: 4, jump 2; 3x3: 4 + 2 * 2 = 8; average pooling 2x2: 8 + 2, jump 4.
  assert [l.receptive_field for l in report.layers] == [3, 3, 3, 4, 8, 8, 8, 10]
  assert [l.jump for l in report.layers] == [1, 1, 1, 2, 2, 2, 2, 4]
  # Flax's own variables (shapes only: a real init compiles for seconds on a CPU).
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  count = lambda tree: sum(math.prod(v.shape) for v in jax.tree.leaves(tree))
  assert set(variables) == {'params', 'batch_stats'}
  assert report.params_total == count(variables) == 1_328
  assert report.params_trainable == count(variables['params'])
  assert report.layers[2].params_trainable == 2 * 16
  assert report.layers[0].macs == 16 * 16 * 6 * 9 and report.layers[1].macs == 16 * 16 * 16 * 6
  assert report.violations == []
  assert report.receptive_field_layer == 'Conv_4' and report.output_receptive_field == 10


@pytest.mark.parametrize('groups', [1, 4])
def test_plain_full_or_grouped_3x3_conv_breaks_the_depthwise_separable_rule(groups):
  report = analysis.analyze_model(_PlainNet(groups=groups), (16, 16, 3), get_config().constraints)
  assert report.layers[4].name == 'Conv_2' and report.layers[4].type == 'Conv2D'
  assert [v.partition(' is not')[0] for v in report.violations] == [
      f'Conv_2: a 3x3 convolution across channels (16 inputs, feature_group_count={groups})']


def test_plain_dense_after_the_global_mean_breaks_the_no_dense_rule():
  report = analysis.analyze_model(_PlainNet(dense=True), (16, 16, 3), get_config().constraints)
  assert (report.layers[-1].name, report.layers[-1].type) == ('Dense_0', 'Dense')
  assert len(report.violations) == 1
  assert report.violations[0].startswith('Dense_0: a dense layer')
  assert 'constraints.allow_dense' in report.violations[0]


def test_model3_on_28x28_names_each_dense_layer_and_how_to_avoid_it():
  c = get_config().constraints
  report = analysis.analyze_model(models.create_model('model3'), (28, 28, 3), c)
  # 28 -> 26 -> 24, pool 12 -> 10 -> 8 -> 6, pool 3 -> 1: the last two 1x1 convolutions.
  assert [v.partition(':')[0] for v in report.violations] == ['PointwiseConv2D_8',
                                                                'PointwiseConv2D_9']
  for v in report.violations:
    assert 'a 1x1 convolution on a 1x1 map is a dense layer' in v and '(top level)' not in v
    assert 'with 28x28 images this map is 1x1' in v
    assert '--config.image_size=32 or more' in v and 'constraints.allow_dense=True' in v
  # The advice holds: one more jump (4 pixels) gives Model 3 its 2x2 map back.
  assert analysis.analyze_model(models.create_model('model3'), (32, 32, 3), c).violations == []


# ---------------------------------------------------------------------------------------------
# The blocks users reach for first: reported exactly, allowed or refused by the constraints only.

SE_NET = '''
"""A plain Linen net with the blocks of MobileNetV3 and EfficientNet (written by a test)."""
import flax.linen as nn
import jax.numpy as jnp


class SqueezeExcite(nn.Module):
  """Global average, two 1x1 convolutions, a sigmoid gate multiplied into the map."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Conv(max(1, c // 2), (1, 1))(s))
    return x * nn.sigmoid(nn.Conv(c, (1, 1))(s))


class Net(nn.Module):
    """1x1, depthwise 3x3 stride 2, hard_swish, depthwise 3x3 dilation 2, then `block`."""
    num_classes: int = 10
    block: str = 'se'
    batch_norm: bool = True
    flip: bool = False  # A flip of the map: a gap in the receptive-field analysis.

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(8, (1, 1), use_bias=False)(x)
      x = nn.Conv(8, (3, 3), strides=2, padding='SAME', feature_group_count=8, use_bias=False)(x)
      x = nn.hard_swish(x)
      x = nn.Conv(8, (3, 3), kernel_dilation=2, padding='SAME', feature_group_count=8,
                  use_bias=False)(x)
      if self.flip:
        x = jnp.flip(x, axis=1)
      if self.block == 'se':
        x = SqueezeExcite()(x)
      elif self.block == 'group_norm':
        x = nn.GroupNorm(num_groups=4)(x)
      elif self.block == 'layer_norm':
        x = nn.LayerNorm()(x)
      x = nn.Conv(16, (1, 1), use_bias=False)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.Conv(self.num_classes, (1, 1))(nn.relu(x))
      return jnp.mean(x, axis=(1, 2))
'''


@pytest.fixture(scope='module')
def se_net(tmp_path_factory):
  """The module of SE_NET, importable as 'se_net' (also by subprocesses, via PYTHONPATH)."""
  folder = tmp_path_factory.mktemp('se_net')
  (folder / 'se_net.py').write_text(SE_NET)
  sys.path.insert(0, str(folder))
  import se_net  # pylint: disable=import-outside-toplevel
  yield folder, se_net
  sys.path.remove(str(folder))
  sys.modules.pop('se_net', None)


@pytest.mark.parametrize('block, rf_after, context', [
    # Squeeze-and-excitation: the gate is pooled over the map, so every pixel sees all of it.
    ('se', 'image', ['mul in SqueezeExcite_0']),
    # GroupNorm's statistics are over the map (and a group of channels): the same.
    ('group_norm', 'image', ['sub in GroupNorm_0']),
    # LayerNorm over the channels of each pixel keeps the field: 11.
    ('layer_norm', 11, []),
])
def test_common_blocks_are_analysed_never_refused(se_net, block, rf_after, context):
  report = analysis.analyze_model(se_net[1].Net(block=block), (16, 16, 3),
                                  get_config().constraints)
  rows = {l.name: l for l in report.layers}
  # Strided depthwise: 3 pixels, jump 2; then (hard_swish) dilated 3x3 at jump 2: 3 + 2 * 2 * 2.
  assert (rows['Conv_1'].receptive_field, rows['Conv_1'].jump) == (3, 2)
  assert (rows['Conv_2'].receptive_field, rows['Conv_2'].jump) == (11, 2)
  after = rows['Conv_3']
  assert ('image' if after.sees_whole_image else after.receptive_field) == rf_after
  if rf_after == 'image':
    assert after.receptive_field == 16 and after.jump == 2
    assert report.receptive_field_status == 'whole'
    assert 'sees the whole 16x16 image' in report.receptive_field_verdict
    assert 'Global context' in analysis.format_table(report)
  assert report.global_context == context and report.unknown == []
  # The source constraints hold: the SE's 1x1 convolutions on the pooled map are its gate, not a
  # dense layer; every convolution is depthwise or 1x1; there is a BatchNorm.
  assert report.violations == []


def test_constraints_decide_norms_and_dense_layers_not_the_analysis(se_net):
  net = se_net[1].Net
  constraints = get_config().constraints
  # GroupNorm instead of BatchNorm: refused by require_batch_norm, allowed without it.
  report = analysis.analyze_model(net(block='group_norm', batch_norm=False), (16, 16, 3),
                                  constraints)
  assert report.violations == ['the model has no BatchNorm layer '
                               '(constraints.require_batch_norm=True)']
  constraints.require_batch_norm = False
  assert analysis.analyze_model(net(block='group_norm', batch_norm=False), (16, 16, 3),
                                constraints).violations == []

  class DenseHead(nn.Module):  # The SE net's features, then a dense classifier: refused.
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10)(net(num_classes=16)(x, train))
  report = analysis.analyze_model(DenseHead(), (16, 16, 3), constraints)
  assert len(report.violations) == 1 and report.violations[0].startswith('Dense_0: a dense layer')


def test_summary_json_lists_what_it_cannot_decide_and_exits_0(se_net, tmp_path):
  config = tmp_path / 'se.py'
  config.write_text('from dsconv_jax import defaults\n\n\ndef get_config():\n'
                    '  config = defaults.get_config()\n'
                    "  config.model = 'se_net:Net'\n"
                    "  config.model_kwargs = {'flip': True}\n"
                    '  return config\n')
  out = subprocess.run([sys.executable, '-m', 'dsconv_jax.summary', f'--config={config}',
                        '--json'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                            'PYTHONPATH': os.pathsep.join([str(se_net[0]), ROOT])})
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  gap, *dense = report['unknown']
  assert gap.startswith('receptive field after rev in Net: it flips the height or width axis')
  # Past the gap, whether the SE's 1x1 convolutions on the pooled map are its gate (allowed) or
  # dense layers (refused here) is undecided: listed, not refused.
  assert dense == [f'whether conv_general_dilated in SqueezeExcite_0/Conv_{i} is a dense layer '
                   'or a gate on the map: the walk lost the map before it' for i in (0, 1)]
  rows = {l['name']: l for l in report['layers']}
  assert rows['Conv_2']['receptive_field'] == 11
  assert rows['Conv_3']['receptive_field'] is None and rows['Conv_3']['jump'] is None
  assert report['receptive_field_status'] == 'unknown' and report['violations'] == []
  assert report['params_total'] > 0 and report['macs_total'] > 0


def test_a_model_with_analysis_gaps_and_global_context_is_set_up_to_train(se_net, tmp_path):
  """Training refuses violated constraints only: a Linen net with squeeze-and-excitation and a
  flip the walk cannot follow passes the training's model check and gets its initial state, with
  Dirac initialisation finding its depthwise `nn.Conv`s by structure (not as widening ones)."""
  from conftest import make_image_folder
  from dsconv_jax import defaults, experiment, train
  config = defaults.get_testing_config()
  config.dataset = f'folder:{make_image_folder(tmp_path / "images", per_class=(8, 2), size=16)}'
  config.model = 'se_net:Net'
  config.model_kwargs = {'flip': True}
  config.dirac_init = True
  config.bn_bias_lr_multiplier = 4.0
  data = experiment.load_data(config)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  exp = experiment.create_experiment(
      config, data, on_model=lambda d: train._report_model(d, data, workdir, True))
  assert exp.description.report.unknown and exp.description.report.violations == []
  depthwise = np.asarray(exp.state.params['Conv_1']['kernel'])  # (3, 3, 1, 8)
  centre = np.zeros((3, 3))
  centre[1, 1] = 1
  for c in range(4):
    np.testing.assert_array_equal(depthwise[:, :, 0, c], centre)
  assert not np.array_equal(depthwise[:, :, 0, 4], centre)
  # The optimizer's BatchNorm-bias mask is the model's: initialising it traced the structure.
  assert exp.state.opt_state is not None


def test_require_batch_norm_finds_a_batch_norm_by_what_it_computes():
  """A BatchNorm written by hand (no flax BatchNorm): normalised by stored moving statistics."""
  class HandNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      c = x.shape[-1]
      mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,))
      var = self.variable('batch_stats', 'var', jnp.ones, (c,))
      y = (x - mean.value) * jax.lax.rsqrt(var.value + 1e-3)
      return y * self.param('gamma', nn.initializers.ones, (c,)) + self.param(
          'beta', nn.initializers.zeros, (c,))

  class Net(nn.Module):
    hand_norm: bool

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(4, (1, 1))(x)
      x = HandNorm()(x) if self.hand_norm else nn.LayerNorm()(x)
      return jnp.mean(nn.Conv(3, (1, 1))(x), axis=(1, 2))
  constraints = get_config().constraints
  assert analysis.analyze_model(Net(hand_norm=True), (8, 8, 3), constraints).violations == []
  assert analysis.analyze_model(Net(hand_norm=False), (8, 8, 3), constraints).violations == [
      'the model has no BatchNorm layer (constraints.require_batch_norm=True)']
  structure = analysis.parameter_structure(Net(hand_norm=True), (8, 8, 3))
  assert [(n.moving, n.shift) for n in structure.normalisations] == [(True, ('HandNorm_0', 'beta'))]
