"""Flax NNX models by import path (nnx_adapter.py): summary, training, resume, use, 2 devices.

The model is examples/my_nnx_nets.py's SeparableNet, narrowed to widths (4, 8): plain NNX, nothing
from dsconv_jax. Its summary rows equal those of the same network written as a `sequential` spec;
it trains with BatchNorm statistics and dropout, resumes exactly (its nnx.Rngs counters are in the
checkpoint), and its finished run predicts, evaluates and exports; bench trains it on 2 forced CPU
devices to the same metrics as one device (an epoch).
"""

import importlib.util
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsconv_jax import experiment, inference, models, nnx_adapter, steps, train
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UserError

from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'examples.my_nnx_nets:SeparableNet'
TIMINGS = {'epoch_seconds', 'train_seconds', 'train_images_per_second'}
STEPS_PER_EPOCH = 36 // 8  # 3 classes x 12 training images, batches of 8.


def _block(width):
  return ['DepthwiseConv2D(3, padding="same", use_bias=False)', f'Conv2D({width}, 1, use_bias=False)',
          'BatchNormalization()', 'ReLU()']


# The same network as SeparableNet(widths=(4, 8)), written as Keras layer calls.
SPEC = (_block(4) * 2 + ['MaxPooling2D()'] + _block(8) * 2
        + ['Dropout(0.1)', 'Conv2D("num_classes", 1)', 'GlobalAveragePooling2D()'])


def nnx_config(folder=None, num_epochs=2):
  config = get_testing_config()
  config.model = MODEL
  config.model_kwargs.widths = (4, 8)
  config.model_kwargs.dropout_rate = 0.1
  config.bn_momentum = 0.9  # Reaches the module's nnx.BatchNorm layers, which declare 0.99.
  config.num_epochs = num_epochs
  if folder:
    config.dataset = f'folder:{folder}'
    config.train_examples = config.eval_examples = 0
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMINGS} for l in f]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp('nnx') / 'images')


@pytest.fixture(scope='module')
def finished(folder, tmp_path_factory):
  """(workdir, summary) of an uninterrupted 2-epoch run of the NNX model."""
  workdir = str(tmp_path_factory.mktemp('nnx') / 'run')
  return workdir, train.train_and_evaluate(nnx_config(folder), workdir, quiet=True)


def test_summary_rows_are_those_of_the_same_network_written_as_a_spec():
  mine = experiment.describe_model(nnx_config(), (32, 32, 3), 10)
  spec = get_testing_config()
  spec.model, spec.layers = 'sequential', SPEC
  theirs = experiment.describe_model(spec, (32, 32, 3), 10).report
  assert isinstance(mine.model, nnx_adapter.NNXModel)
  report = mine.report
  row = lambda l: (l.type, l.output_shape, l.params, l.params_trainable, l.receptive_field,
                   l.jump, l.macs)
  layers = {'DepthwiseConv2D', 'PointwiseConv2D', 'BatchNorm', 'Dropout'}
  # Functions (nnx.relu, nnx.max_pool, jnp.mean) have no row, as in a Linen module.
  assert [row(l) for l in report.layers] == [row(l) for l in theirs.layers if l.type in layers]
  assert report.layers[0].name == 'stages/0/0/depthwise'  # The NNX path.
  assert (report.params_total, report.params_trainable) == (theirs.params_total,
                                                            theirs.params_trainable) == (481, 433)
  assert report.macs_total == theirs.macs_total
  assert report.violations == [] and report.output_receptive_field == theirs.output_receptive_field == 14


def test_an_nnx_model_trains_with_its_batch_norm_and_dropout_and_records_its_options(finished):
  workdir, summary = finished
  assert summary['params_total'] == 418 and summary['epochs'] == 2
  # It trained in the fast forms (`fast_forms`), as every model does.
  assert summary['model_options'] == {'bn_momentum': [0.9], 'bn_epsilon': [0.001],
                                      'depthwise_impl': 'shifted', 'dropout_impl': 'hash'}
  run = inference.load_run(workdir)
  # Every dropout mask advanced the stream's counter, which the checkpoint holds.
  assert int(run.network_variables['nnx_state']['dropout']['rngs']['count']) == 2 * STEPS_PER_EPOCH
  stats = run.network_variables['batch_stats']['stages']['0']['0']['norm']
  assert not np.allclose(stats['mean'], 0) and not np.allclose(stats['var'], 1)


def test_an_interrupted_nnx_run_resumes_to_the_same_metrics(finished, folder, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(nnx_config(folder, num_epochs=1), workdir, quiet=True)
  train.train_and_evaluate(nnx_config(folder), workdir, quiet=True)
  assert _metrics(workdir) == _metrics(finished[0])


def test_a_finished_nnx_run_is_its_trained_module_and_predicts_evaluates_and_exports(
    finished, folder, tmp_path):
  from dsconv_jax import evaluate, export
  from examples.my_nnx_nets import SeparableNet
  workdir, summary = finished
  run = inference.load_run(workdir)
  assert isinstance(run.model, SeparableNet) and isinstance(run.variables, nnx.State)
  images = run.dataset().test.images[:5]
  x = steps.preprocess(images, run.mean, run.std)
  np.testing.assert_allclose(run.predict(images), jax.nn.softmax(run.model(x)), atol=1e-5)
  result = evaluate.evaluate(run)
  assert result['accuracy'] == pytest.approx(summary['test_accuracy'])
  if importlib.util.find_spec('jax2onnx'):  # The export extra (not in the newest-release run).
    exported = export.export(workdir, str(tmp_path / 'model.onnx'), log=lambda *_: None)
    assert os.path.getsize(exported['out']) > 0 and exported['max_difference'] < 1e-4
  # As a distillation teacher, it scores a normalised batch as the run evaluates.
  student = nnx_config(folder)
  student.distill_workdir = workdir
  data = experiment.load_data(student)
  mesh = steps.create_mesh()
  mean, std = (steps.put_replicated(mesh, np.asarray(a, np.float32)) for a in (run.mean, run.std))
  teacher = experiment.load_teacher(student, data, mesh, mean, std, run)
  np.testing.assert_allclose(teacher.logits(x), run.model(x), atol=1e-4)


def test_bench_trains_an_nnx_model_on_two_devices_to_the_one_device_metrics(finished, folder,
                                                                            tmp_path):
  config = tmp_path / 'nnx_config.py'
  config.write_text(
      'from dsconv_jax import defaults\n\n\n'
      'def get_config():\n'
      '  config = defaults.get_testing_config()\n'
      f'  config.model = {MODEL!r}\n'
      '  config.model_kwargs.widths = (4, 8)\n'
      '  config.model_kwargs.dropout_rate = 0.1\n'
      '  config.bn_momentum = 0.9\n'
      '  config.num_epochs = 1\n'
      f'  config.dataset = "folder:{folder}"\n'
      '  config.train_examples = config.eval_examples = 0\n'
      '  return config\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  out = subprocess.run([sys.executable, '-m', 'dsconv_jax.bench', f'--config={config}',
                        '--seeds=0', f'--workdir={tmp_path / "bench"}'],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  bench_run = str(tmp_path / 'bench' / 'seed_0')
  with open(os.path.join(bench_run, 'summary.json')) as f:
    assert json.load(f)['device_count'] == 2
  for two, one in zip(_metrics(bench_run), _metrics(finished[0])[:1], strict=True):
    for key in one:
      assert two[key] == pytest.approx(one[key], abs=1e-5), (key, two, one)


# ---------------------------------------------------------------------------------------------
# The adapter's functional form.

class _InputNorm(nnx.Module):
  """BatchNorm on the input, then a 1x1 convolution to the classes (PreciseBN's check)."""

  def __init__(self, num_classes=10, *, rngs):
    self.norm = nnx.BatchNorm(3, momentum=0.99, rngs=rngs)
    self.classes = nnx.Conv(3, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.classes(self.norm(x)).mean((1, 2))


def test_precise_bn_statistics_of_an_nnx_model_are_the_batch_own():
  model = nnx_adapter.NNXModel(_InputNorm)
  state = steps.create_train_state(model, jax.random.key(0), (8, 8, 3), optax.sgd(0.1))
  images = jax.random.randint(jax.random.key(1), (4, 8, 8, 3), 0, 256).astype(jnp.uint8)
  zero, one = jnp.zeros(3), jnp.ones(3)
  stats = jax.jit(lambda s, x: steps.batch_statistics(s, x, jax.random.key(2), mean=zero,
                                                      std=one))(state, images)
  x = images.astype(jnp.float32)
  np.testing.assert_allclose(stats['norm']['mean'], x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats['norm']['var'], x.var((0, 1, 2)), rtol=1e-4)


def test_nnx_model_kwargs_are_checked_and_fields_given_like_a_linen_module():
  config = nnx_config()
  model = models.build_model(config, 7)
  assert model.num_classes == 7 and model.widths == (4, 8) and model.in_features == 3
  assert models.kwargs_with_defaults(MODEL, {'widths': (4, 8)})['dropout_rate'] == 0.1
  config.model_kwargs.depth = 3
  with pytest.raises(UserError, match=f"bad model_kwargs for model '{MODEL}'.*depth"):
    models.build_model(config, 10)
