"""config.model = 'sequential': models written as Keras layer calls in the config (sequential.py).

Each built-in model written as a spec is the same model: the same Keras parameter counts, the same
layers (name, type, output, parameters, receptive field, jump), the same function of the same
variables. Bad specs are one-line UserErrors naming the entry; specs train and fit budgets.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import analysis, budget, experiment, layers, models, sequential, train
from dsconv_jax.defaults import get_config, get_testing_config
from dsconv_jax.errors import UserError

from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES_HEAD = ['Conv2D("num_classes", 1, use_bias=False)', 'GlobalAveragePooling2D()']


def _m3_block(filters, rate, padding='valid'):
  # Source 000's Keras code, block for block (benchmarks/keras_model3.py).
  return [f'DepthwiseConv2D(3, depth_multiplier=1, use_bias=False, padding="{padding}")',
          f'Conv2D({filters}, 1, use_bias=False)', 'Activation("relu")', 'BatchNormalization()',
          f'Dropout({rate})']


MODEL3 = (_m3_block(32, 0.1, 'same') + _m3_block(64, 0.1) + _m3_block(128, 0.1)
          + ['MaxPooling2D(2)', 'Conv2D(32, 1, use_bias=False)']
          + _m3_block(32, 0.2) + _m3_block(64, 0.2) + _m3_block(128, 0.2)
          + ['MaxPooling2D(2)', 'Conv2D(32, 1, use_bias=False)']
          + _m3_block(32, 0.25) + CLASSES_HEAD)


def _sep80k_block(filters, padding='same'):
  return [f'SeparableConv2D({filters}, 3, padding="{padding}", use_bias=False)', 'Dropout(0.07)',
          'BatchNormalization()', 'Activation("relu")']


SEPARABLE80K = (_sep80k_block(32) + _sep80k_block(48) + _sep80k_block(96) + ['MaxPooling2D()']
                + _sep80k_block(128) + _sep80k_block(160) + ['MaxPooling2D()']
                + _sep80k_block(192, 'valid')
                + ['SeparableConv2D("num_classes", 3, use_bias=False)', 'GlobalAveragePooling2D()'])

BASELINE = []
for _f in (48, 96, 192):
  BASELINE += [f'Conv2D({_f}, 3, padding="same")', 'Activation("relu")', f'Conv2D({_f}, 3)',
               'Activation("relu")', 'MaxPooling2D()', 'Dropout(0.25)']
BASELINE += ['Flatten()', 'Dense(512)', 'Activation("relu")', 'Dropout(0.5)', 'Dense(256)',
             'Activation("relu")', 'Dropout(0.5)', 'Dense("num_classes")']


def _ds(filters, depth_multiplier=1):
  return [f'DepthwiseConv2D(3, padding="same", depth_multiplier={depth_multiplier}, '
          'use_bias=False)', f'PointwiseConv2D({filters}, use_bias=False)']


def _residual(filters):
  inner = (_ds(filters) + ['BatchNormalization()', 'ReLU()'] + _ds(filters)
           + ['BatchNormalization()'])
  return ['Residual([' + ', '.join(inner) + '])', 'ReLU()']


# models.DSResNet with its defaults: stem, then one stage per width (transition, residual block).
DSRESNET = _ds(40, 8) + ['BatchNormalization()', 'ReLU()'] + _residual(40)
for _f in (80, 160):
  DSRESNET += _ds(_f) + ['MaxPooling2D()', 'BatchNormalization()', 'ReLU()'] + _residual(_f)
DSRESNET += ['PointwiseConv2D("num_classes", use_bias=False)', 'GlobalAveragePooling2D()']

# spec name -> (the spec, the built-in config it equals, its Keras (total, trainable) counts)
SPECS = {
    'model3': (MODEL3, 'model3', (35_387, 34_427)),
    'separable80k': (SEPARABLE80K, 'separable80k', (80_203, 78_891)),
    'baseline': (BASELINE, 'baseline', (1_172_410, 1_172_410)),
    'dsresnet': (DSRESNET, 'dsresnet', (95_456, 93_776)),
}


def builtin_config(name):
  config = get_config()
  config.model = name
  if name == 'baseline':  # As configs/baseline.py: it breaks the rules on purpose.
    config.constraints.max_params = 0
    config.constraints.depthwise_separable_only = False
    config.constraints.require_batch_norm = False
    config.constraints.allow_dense = True
  return config


def spec_config(spec, base='model3'):
  config = builtin_config(base)
  config.model = 'sequential'
  config.layers = list(spec)
  return config


def _rows(report):
  return [(l.name, l.type, l.output_shape, l.params, l.params_trainable, l.receptive_field,
           l.jump, l.macs) for l in report.layers]


@pytest.mark.parametrize('name', sorted(SPECS))
def test_spec_is_the_builtin_model_layer_for_layer(name):
  spec, builtin, counts = SPECS[name]
  mine = experiment.describe_model(spec_config(spec, builtin), (32, 32, 3), 10).report
  theirs = experiment.describe_model(builtin_config(builtin), (32, 32, 3), 10).report
  assert (mine.params_total, mine.params_trainable) == counts
  assert (theirs.params_total, theirs.params_trainable) == counts
  assert mine.violations == theirs.violations == []
  # Receptive fields at the convolutions, and every other column of every row.
  convs = lambda r: [(l.name, l.receptive_field) for l in r.layers
                     if 'Conv' in l.type or l.type == 'Dense']
  assert convs(mine) == convs(theirs)
  assert _rows(mine) == _rows(theirs)
  assert mine.output_receptive_field == theirs.output_receptive_field


def _random_variables(model, shape=(32, 32, 3)):
  abstract = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                               jnp.zeros((1, *shape)), train=False))
  rng = np.random.default_rng(0)
  # Positive variances for the BatchNorm statistics; anything for the rest.
  return jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), abstract)


@pytest.mark.parametrize('name', ['model3', 'dsresnet', 'baseline'])
def test_spec_computes_the_builtin_function_of_the_same_variables(name):
  spec, builtin, _ = SPECS[name]
  mine = models.build_model(spec_config(spec, builtin), 10)
  theirs = models.build_model(builtin_config(builtin), 10)
  variables = _random_variables(theirs)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  ours = jax.jit(mine.apply)(variables, x)  # Fails if any variable's name or shape differs.
  np.testing.assert_allclose(ours, jax.jit(theirs.apply)(variables, x), rtol=1e-5, atol=1e-5)


def test_fit_params_scales_every_width_but_the_classes_layer():
  spec = sequential.parse_layers(DSRESNET)
  for k in (20, 64, 97):
    mine = sequential.Sequential(spec, num_classes=7, width_multiplier=k / budget.GRID)
    theirs = models.DSResNet(num_classes=7, width_multiplier=k / budget.GRID)
    assert analysis.count_params(mine, (32, 32, 3)) == analysis.count_params(theirs, (32, 32, 3))
  config = spec_config(DSRESNET)
  config.fit_params = 60_000
  fitted, info = budget.resolve_width(config, (32, 32, 3), 7)
  assert info['params_total'] < 60_000 <= info['next_params_total']
  assert fitted.model_kwargs.width_multiplier == info['width_multiplier'] < 1
  model = models.build_model(fitted, 7)
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[0])
  assert out.shape == (1, 7)


# Source 000's Model 3 exactly as its Keras code wrote it: 10 classes as a number.
MODEL3_AS_WRITTEN = MODEL3[:-2] + ['Conv2D(10, 1, use_bias=False)', 'GlobalAveragePooling2D()']


def test_keras_code_as_written_with_a_literal_class_count_is_the_same_model():
  mine = experiment.describe_model(spec_config(MODEL3_AS_WRITTEN), (32, 32, 3), 10).report
  theirs = experiment.describe_model(spec_config(MODEL3), (32, 32, 3), 10).report
  assert (mine.params_total, mine.params_trainable) == (35_387, 34_427)
  assert _rows(mine) == _rows(theirs)


def test_fit_params_leaves_a_literal_classes_layer_unscaled():
  config = spec_config(MODEL3_AS_WRITTEN)
  config.fit_params = 20_000
  fitted, info = budget.resolve_width(config, (32, 32, 3), 10)
  assert info['width_multiplier'] < 1 and info['params_total'] < 20_000
  report = experiment.describe_model(fitted, (32, 32, 3), 10).report
  assert report.layers[-2].output_shape == [2, 2, 10]  # The classes layer, unscaled.
  assert report.layers[1].output_shape[-1] < 32  # A hidden width, scaled.


# (spec, the entry named, a fragment of the problem)
MALFORMED = {
    'unknown layer': (['Conv2D(8, 3, padding="same")', 'Conv3D(8, 3)', *CLASSES_HEAD],
                      'config.layers[1]', "unknown layer 'Conv3D'"),
    'unknown argument': (['SeparableConv2D(8, 3, paddin="same")', *CLASSES_HEAD],
                         'config.layers[0]', "unsupported argument 'paddin' of SeparableConv2D "
                         "(did you mean 'padding'?)"),
    'wrong type': (['Conv2D(8, 3)', 'BatchNormalization()', 'Dropout("high")', *CLASSES_HEAD],
                   'config.layers[2]', "rate='high' must be a number in [0, 1)"),
    'window on a small map': (['MaxPooling2D(16)', 'DepthwiseConv2D(3)', *CLASSES_HEAD],
                              'config.layers[1]', "a 'valid' 3x3 window does not fit the 2x2 map"),
    'residual changes the shape': (
        ['Conv2D(8, 3, padding="same")', 'Residual([Conv2D(16, 1), BatchNormalization()])',
         *CLASSES_HEAD],
        'config.layers[1]', 'the residual branch turns its 32x32x8 input into 32x32x16'),
    'not a literal': (['Dense(__import__("os").getpid())', 'Dense("num_classes")'],
                      'config.layers[0]', 'is not a literal'),
    'a name for a string': (['Conv2D(8, 3, padding=same)', *CLASSES_HEAD], 'config.layers[0]',
                            'a string needs quotes: "same"'),
    'syntax': (['Conv2D(8, 3', *CLASSES_HEAD], 'config.layers[0]', 'not a layer call'),
    'not a call': (['Conv2D(8, 3)', 'GlobalAveragePooling2D', 'Dense("num_classes")'],
                   'config.layers[1]', 'write the layer as a call: GlobalAveragePooling2D(...)'),
    'inside a residual': (
        ['Residual([Conv2D(3, 3, padding="same"), BatchNormalization(momentm=0.9)])',
         *CLASSES_HEAD],
        'config.layers[0], residual layer 2',
        "'BatchNormalization(momentm=0.9)': unknown or unsupported argument 'momentm'"),
    'flattened before a convolution': (['Flatten()', 'Conv2D(8, 3)', 'Dense("num_classes")'],
                                       'config.layers[1]', 'needs a height x width x channels map'),
    'output is not the logits': (['Conv2D("num_classes", 1)'], 'config.layers[0]',
                                 "the model's output is 32x32x10 per image, not 10 logits"),
    'no classes layer': (['MaxPooling2D()', 'GlobalAveragePooling2D()'], 'config.layers',
                         'has no classes layer'),
    'a literal class count of another dataset': (
        ['Conv2D(8, 3)', 'Conv2D(7, 1, use_bias=False)', 'GlobalAveragePooling2D()'],
        'config.layers[1]', 'its 7 filters are the logits (the last layer with a width is the '
        'classes layer), but the dataset has 10 classes: write 10, or "num_classes"'),
    'zero filters': (['Conv2D(0, 3)', *CLASSES_HEAD], 'config.layers[0]',
                     'filters=0 must be a positive integer'),
    'too many positional': (['Dropout(0.1, 2, 3)', *CLASSES_HEAD], 'config.layers[0]',
                            'Dropout takes at most 1 positional argument here (rate), got 3'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_a_bad_spec_is_one_line_naming_the_entry(case):
  spec, where, problem = MALFORMED[case]
  with pytest.raises(UserError) as e:
    experiment.describe_model(spec_config(spec), (32, 32, 3), 10)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(where + (' ' if where != 'config.layers' else ' has')), message
  assert problem in message, message


def test_a_spec_is_read_never_evaluated(tmp_path):
  target = tmp_path / 'written'
  with pytest.raises(UserError, match=r'config.layers\[0\] .* is not a literal'):
    sequential.parse_layers([f'Dense(open({str(target)!r}, "w").write("x"))',
                             'Dense("num_classes")'])
  assert not target.exists()


def test_a_spec_with_another_model_is_refused():
  config = builtin_config('model3')
  config.layers = ['Conv2D(8, 3)']
  with pytest.raises(UserError, match="config.layers is only read by config.model = 'sequential'"):
    models.build_model(config, 10)


def test_keras_spellings_defaults_and_activation_argument():
  specs = sequential.parse_layers([
      'keras.layers.Convolution2D(8, (3, 3), activation="relu")', 'MaxPool2D()',
      'layers.Conv2D(8, 1, strides=2)', 'AvgPool2D(padding="SAME")', 'ReLU(max_value=6)',
      'GlobalAvgPool2D()', 'Dense(units="num_classes", use_bias=False)'])
  assert [s.kind for s in specs] == ['Conv2D', 'MaxPooling2D', 'Conv2D', 'AveragePooling2D',
                                     'ReLU', 'GlobalAveragePooling2D', 'Dense']
  assert dict(specs[0].args) == {'filters': 8, 'kernel_size': (3, 3), 'strides': 1,
                                 'padding': 'valid', 'dilation_rate': 1, 'activation': 'relu',
                                 'use_bias': True}
  report = analysis.analyze_model(sequential.Sequential(specs, num_classes=5), (32, 32, 3))
  assert [(l.type, l.output_shape) for l in report.layers] == [
      ('Conv2D', [30, 30, 8]), ('Activation', [30, 30, 8]), ('MaxPool2D', [15, 15, 8]),
      ('Conv2D', [8, 8, 8]),  # A strided 1x1 stays a Conv2D; at stride 1 it is PointwiseConv2D.
      ('AvgPool2D', [4, 4, 8]), ('Activation', [4, 4, 8]), ('GlobalAvgPool', [8]),
      ('Dense', [5])]
  assert report.params_total == (3 * 9 * 8 + 8) + (8 * 8 + 8) + 8 * 5


def test_average_pooling_leaves_padding_out_of_the_mean_as_keras():
  x = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 3, 1)
  same = layers.AvgPool2D(2, strides=2, padding='same').apply({}, x)
  # TensorFlow 'SAME' pads at the end; the last row and column average 2 and 1 pixels.
  np.testing.assert_allclose(same[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])
  valid = layers.AvgPool2D().apply({}, x)
  np.testing.assert_allclose(valid[:, 0, 0, 0], x[:, :2, :2, 0].mean(axis=(1, 2)))


def test_bn_momentum_and_epsilon_reach_a_spec_unless_written():
  config = spec_config(['BatchNormalization()', 'BatchNormalization(momentum=0.5, epsilon=0.01)',
                        *CLASSES_HEAD])
  config.bn_momentum, config.bn_epsilon = 0.8, 1e-4
  model = models.build_model(config, 10)
  assert analysis.batch_norm_settings(model, (8, 8, 3)) == [(0.8, 1e-4), (0.5, 0.01)]


def _summary(args, env, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'dsconv_jax.summary', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300, env=env)


def _write_config(path, layers):
  path.write_text('from dsconv_jax import defaults\n\n\ndef get_config():\n'
                  '  config = defaults.get_config()\n'
                  "  config.model = 'sequential'\n"
                  f'  config.layers = {list(layers)!r}\n'
                  '  return config\n')
  return str(path)


@pytest.mark.parametrize('case', ['unknown layer', 'window on a small map'])
def test_the_command_line_reports_a_bad_spec_in_one_line(tmp_path, cli_env, case):
  spec, where, problem = MALFORMED[case]
  out = _summary([f'--config={_write_config(tmp_path / "bad.py", spec)}'], cli_env)
  assert out.returncode == 1, out.stderr
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and out.stderr.strip() == errors[0], out.stderr
  assert errors[0].startswith(f'error: {where} ') and problem in errors[0]
  assert 'Traceback' not in out.stdout + out.stderr


def test_model3_as_a_spec_in_a_config_file_outside_the_repository(tmp_path, cli_env):
  path = _write_config(tmp_path / 'm3.py', MODEL3)
  out = _summary([f'--config={path}', '--json'], cli_env)
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout)
  assert (report['model'], report['params_total'], report['params_trainable']) == (
      'sequential', 35_387, 34_427)
  last_conv = [l for l in report['layers'] if 'Conv' in l['type']][-1]
  assert (last_conv['name'], last_conv['receptive_field']) == ('PointwiseConv2D_9', 30)
  assert report['output_receptive_field'] == 30
  assert report['violations'] == []


TINY = ['DepthwiseConv2D(3, padding="same", use_bias=False)', 'Conv2D(8, 1, use_bias=False)',
        'Activation("relu")', 'BatchNormalization()', 'Dropout(0.1)', 'MaxPooling2D()',
        'SeparableConv2D("num_classes", 3, use_bias=False)', 'GlobalAveragePooling2D()']


def test_a_spec_trains_and_a_workdir_refuses_another_spec(tmp_path):
  folder = make_image_folder(tmp_path / 'images')
  config = get_testing_config()
  config.model = 'sequential'
  config.layers = TINY
  config.dataset = f'folder:{folder}'
  config.train_examples = config.eval_examples = 0
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir, quiet=True)
  # models.TinyNet's layers, for 3 classes: 27 + 24 + 32 + 72 + 24.
  assert summary['epochs'] == 1 and summary['params_total'] == 179
  assert np.isfinite(summary['test_accuracy'])
  config.layers = [l.replace('Dropout(0.1)', 'Dropout(0.2)') for l in TINY]
  with pytest.raises(UserError, match="different configuration.*layers:"):
    train.train_and_evaluate(config, workdir, quiet=True)
