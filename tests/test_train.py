"""End-to-end training on generated data: the contract's files, resume equality, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import data, models, steps, train
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {'epoch_seconds', 'train_seconds', 'train_images_per_second'}


def config_for(folder, **overrides):
  config = get_testing_config()
  config.dataset = f'folder:{folder}'
  config.train_examples = 0
  config.eval_examples = 0
  for k, v in overrides.items():
    config[k] = v
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_short_run_writes_the_contract_files(tmp_path, image_folder):
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config_for(image_folder, num_epochs=2), workdir)
  rows = read_metrics(workdir)
  assert [r['epoch'] for r in rows] == [1, 2]
  for key in ('learning_rate', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
              'epoch_seconds', 'train_images_per_second'):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[1]['learning_rate'] == pytest.approx(0.01 / 1.319)
  with open(os.path.join(workdir, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  for key in ('params_total', 'params_trainable', 'max_val_accuracy', 'best_epoch',
              'test_accuracy', 'train_seconds', 'seed', 'device', 'device_count',
              'process_count', 'versions', 'config'):
    assert key in on_disk, key
  assert on_disk["params_total"] == 179 and on_disk['device'].startswith('cpu')
  assert on_disk['max_val_accuracy'] == max(r['val_accuracy'] for r in rows)
  assert on_disk['test_accuracy'] == rows[-1]['val_accuracy']  # val is the whole test split here
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  with open(os.path.join(workdir, 'curves.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))


def test_model_learns_on_an_easy_dataset(tmp_path):
  # Classes differ by their brightest channel: a few epochs of the tiny net separate them.
  from conftest import make_image_folder
  folder = make_image_folder(tmp_path / 'easy', per_class=(64, 16))
  summary = train.train_and_evaluate(
      config_for(folder, num_epochs=4, batch_size=16, learning_rate=0.05),
      str(tmp_path / 'run'))
  assert summary['max_val_accuracy'] > 0.8  # chance is 1/3


def test_resume_matches_an_uninterrupted_run(tmp_path, image_folder):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config_for(image_folder, num_epochs=3), straight)
  train.train_and_evaluate(config_for(image_folder, num_epochs=1), resumed)
  # A line of an epoch whose checkpoint was never written (a crash) and a torn line are dropped.
  with open(os.path.join(resumed, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'epoch': 2, 'val_accuracy': 0.0}) + '\n{"epoch": 3, "tr')
  summary = train.train_and_evaluate(config_for(image_folder, num_epochs=3), resumed)
  assert without_timings(read_metrics(resumed)) == without_timings(read_metrics(straight))
  with open(os.path.join(straight, 'summary.json')) as f:
    expected = json.load(f)
  for key in ('max_val_accuracy', 'best_epoch', 'test_accuracy', 'params_total'):
    assert summary[key] == expected[key]


def test_finished_run_is_not_retrained(tmp_path, image_folder, capsys, monkeypatch):
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(config_for(image_folder, num_epochs=1), workdir)
  capsys.readouterr()

  def not_loaded(config):
    raise AssertionError('a finished run loads no data (nor builds or compiles anything)')

  # Its result comes from summary.json: nothing is loaded, built or compiled.
  monkeypatch.setattr(train.experiment_lib, 'load_data', not_loaded)
  summary = train.train_and_evaluate(config_for(image_folder, num_epochs=1), workdir)
  out = capsys.readouterr().out
  assert f'the run in {workdir} finished its 1 epoch earlier; not retrained' in out
  assert f'test accuracy {100 * first["test_accuracy"]:.2f}%' in out and 'epoch   1/1' not in out
  assert 'Total params' not in out  # No model table for a run that has nothing left to train.
  assert summary['epochs'] == 1 and summary['test_accuracy'] == first['test_accuracy']
  # More epochs: the run goes on from its checkpoint.
  monkeypatch.undo()
  train.train_and_evaluate(config_for(image_folder, num_epochs=2), workdir)
  assert 'resuming from the checkpoint of epoch 1' in capsys.readouterr().out


def test_resuming_a_different_model_is_refused(tmp_path, image_folder):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config_for(image_folder), workdir)
  with pytest.raises(UserError, match="different configuration.*model: 'tiny' there"):
    train.train_and_evaluate(config_for(image_folder, model='model3'), workdir)


def test_evaluation_counts_the_last_partial_batch(image_folder):
  ds = data.load_folder(image_folder)  # 12 test images
  config = config_for(image_folder)
  model = models.build_model(config, ds.num_classes)
  import optax
  state = steps.create_train_state(model, jax.random.key(3), ds.image_shape, optax.sgd(0.1))
  mesh = steps.create_mesh()
  mean, std = jnp.zeros(3), jnp.full(3, 255.0)
  import functools
  evaluate = steps.make_evaluate(
      mesh, batch_size=5, step_fn=functools.partial(steps.eval_step, mean=mean, std=std))
  images, labels, mask = steps.padded_split(ds.test, 5)  # 15 rows, 3 of them padding
  assert images.shape[0] == 15 and mask.sum() == 12
  got = evaluate(state, images, labels, mask)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       steps.preprocess(ds.test.images, mean, std))
  np.testing.assert_allclose(got['accuracy'], np.mean(np.argmax(logits, -1) == ds.test.labels),
                             rtol=1e-6)
  loss = steps.cross_entropy_loss(logits, ds.test.labels).mean()
  np.testing.assert_allclose(got['loss'], loss, rtol=1e-5)


def test_evaluation_batches_are_no_larger_than_the_splits_evaluated(image_folder):
  # Padding 12 test images to a batch of 1000 would compute 1000 images per evaluation.
  from dsconv_jax import experiment  # pylint: disable=g-import-not-at-top
  config = config_for(image_folder, eval_batch_size=1000, holdout=5)
  loaded = experiment.load_data(config)
  assert (len(loaded.val.labels), len(loaded.test.labels)) == (5, 12)
  exp = experiment.create_experiment(config, loaded)
  assert exp.eval_batch_size == 12
  assert [a.shape[0] for a in exp.put_split(loaded.val)] == [12] * 3
  small = experiment.create_experiment(config_for(image_folder, eval_batch_size=5, holdout=5),
                                       loaded)
  assert small.eval_batch_size == 5  # A configured batch below the splits' sizes is kept.
  # The figures do not depend on the batch.
  for a, b in ((exp.evaluate, small.evaluate), (exp.evaluate_tta_flip, small.evaluate_tta_flip)):
    got = {k: float(v) for k, v in a(exp.state, *exp.put_split(loaded.test)).items()}
    want = {k: float(v) for k, v in b(small.state, *small.put_split(loaded.test)).items()}
    assert got == pytest.approx(want, rel=1e-5)
  # A lowered batch is a multiple of 6 x the devices, so that each TTA view count (1, 2, 3, 6)
  # divides it (a prime split size would leave TTA one image a step), and never exceeds the
  # configured one.
  batch = experiment._eval_batch_size  # pylint: disable=protected-access
  assert (batch(1000, loaded, 5), batch(10, loaded, 4), batch(3, loaded, 4)) == (30, 12, 4)
  prime = experiment.Data(loaded.dataset, loaded.train, data.Split(
      np.zeros((997, 4, 4, 3), np.uint8), np.zeros(997, np.int32)))
  assert (batch(1000, prime, 1), batch(1000, prime, 2)) == (1000, 1000)
  assert batch(2000, prime, 2) == 1008
  views = experiment._view_batch_size  # pylint: disable=protected-access
  assert [views(batch(2000, prime, 2), v, 2) for v in (1, 2, 3, 6)] == [1008, 504, 336, 168]


def test_bad_config_values_are_user_errors(tmp_path, image_folder):
  for key, value, match in (('batch_size', 0, 'batch_size must be a positive'),
                            ('num_epochs', -1, 'num_epochs must be a positive'),
                            ('train_examples', -5, 'train_examples must be >= 0'),
                            ('batch_size', 4096, 'larger than the 36 training examples')):
    with pytest.raises(UserError, match=match):
      train.train_and_evaluate(config_for(image_folder, **{key: value}), str(tmp_path / key))


def test_cifar10_through_tfds_mock_data(tmp_path, monkeypatch, batched_mock_reads):
  tfds = pytest.importorskip('tensorflow_datasets')
  from dsconv_jax import tfds_source
  monkeypatch.setattr(tfds_source, '_can_reach', lambda host, port, timeout: True)
  config = get_testing_config()
  config.dataset = 'cifar10'
  config.data_dir = str(tmp_path / 'tfds')
  with tfds.testing.mock_data(num_examples=24):
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['dataset'] == 'tfds:cifar10' and summary['train_examples'] == 24


def _main_cli(*args):
  return subprocess.run([sys.executable, '-m', 'dsconv_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('case', ['unknown_model', 'missing_folder', 'violated_constraint',
                                  'missing_workdir_flag'])
def test_cli_errors_are_one_line(tmp_path, image_folder, case):
  args = ['--config=configs/tiny.py', f'--workdir={tmp_path}/run',
          f'--config.dataset=folder:{image_folder}']
  expected_code, expected = {
      'unknown_model': (1, "unknown model 'nope'"),
      'missing_folder': (1, 'does not exist'),
      'violated_constraint': (1, 'violates the configured constraints'),
      'missing_workdir_flag': (2, '--workdir=DIR is required'),
  }[case]
  if case == 'unknown_model':
    args.append('--config.model=nope')
  elif case == 'missing_folder':
    args[2] = f'--config.dataset=folder:{tmp_path}/nowhere'
  elif case == 'violated_constraint':
    args.append('--config.constraints.max_params=100')
  else:
    args.pop(1)
  out = _main_cli(*args)
  assert out.returncode == expected_code, out.stderr
  assert expected in out.stderr
  assert 'Traceback' not in out.stderr
  assert len([l for l in out.stderr.splitlines() if l.startswith('error:')]) == 1


def test_cli_trains_from_a_folder(tmp_path, image_folder):
  out = _main_cli('--config=configs/tiny.py', f'--workdir={tmp_path}/run',
                  f'--config.dataset=folder:{image_folder}', '--config.num_epochs=1')
  assert out.returncode == 0, out.stderr
  assert 'Total params: 179' in out.stdout and 'epoch   1/1' in out.stdout
  assert os.path.exists(os.path.join(tmp_path, 'run', 'summary.json'))
  quiet = _main_cli('--config=configs/tiny.py', f'--workdir={tmp_path}/quiet', '--quiet',
                    f'--config.dataset=folder:{image_folder}', '--config.num_epochs=1')
  assert quiet.returncode == 0 and 'Total params' not in quiet.stdout, quiet.stdout


def test_batch_norm_warmup_warning_names_momentum_steps_and_the_way_out():
  tiny = models.create_model('tiny')  # Keras' momentum 0.99
  warning = train.batch_norm_warmup_warning(tiny, (32, 32, 3), steps_per_epoch=4)
  assert warning.startswith('warning: BatchNorm momentum 0.99 over 4 steps per epoch leaves 96%')
  assert 'about 299 steps' in warning and '--config.bn_momentum=0.9' in warning
  # Enough steps, or a faster momentum: the statistics have settled, no warning.
  assert train.batch_norm_warmup_warning(tiny, (32, 32, 3), steps_per_epoch=400) is None
  fast = models.create_model('dsresnet', widths=(8, 16), blocks=(1, 1), stem_multiplier=1)
  assert train.batch_norm_warmup_warning(fast, (32, 32, 3), steps_per_epoch=40) is None
  # Already at 0.9 but too few steps: the advice does not repeat the momentum it has.
  warning = train.batch_norm_warmup_warning(fast, (32, 32, 3), steps_per_epoch=8)
  assert warning.startswith('warning: BatchNorm momentum 0.9 over 8 steps')
  assert '--config.bn_momentum' not in warning and '--config.bn_recalibrate_batches=20' in warning


def test_short_run_prints_the_warning_on_its_own_line(tmp_path, image_folder, capsys):
  train.train_and_evaluate(config_for(image_folder), str(tmp_path / 'run'), quiet=True)
  out, err = capsys.readouterr()
  lines = err.splitlines()
  assert sum(l.startswith('warning: BatchNorm momentum 0.99 over 4 steps') for l in lines) == 1
  assert 'warning:' not in out  # Warnings go to stderr.


def test_a_near_chance_result_repeats_the_warning_beside_it(tmp_path, image_folder, capsys,
                                                            monkeypatch):
  # Any accuracy counts as near chance here, so that the repeat does not hang on what 4 steps
  # of the tiny model happen to reach.
  monkeypatch.setattr(train, 'NEAR_CHANCE', 100.0)
  train.train_and_evaluate(config_for(image_folder), str(tmp_path / 'run'), quiet=True)
  out, err = capsys.readouterr()
  assert out.splitlines()[-1].startswith('max val accuracy')
  last = err.splitlines()[-1]
  assert last.startswith('warning: validation accuracy ') and 'is near chance (33%)' in last, last
  assert 'momentum 0.99 over the 4 steps trained leaves 96%' in last
  # The remedy measured to lift a short run above chance comes first.
  assert last.index('--config.bn_recalibrate_batches=20') < last.index('--config.bn_momentum=0.9')


def test_a_result_above_chance_is_not_warned_of_again(tmp_path, image_folder, capsys,
                                                      monkeypatch):
  monkeypatch.setattr(train, 'NEAR_CHANCE', 0.0)
  train.train_and_evaluate(config_for(image_folder), str(tmp_path / 'run'), quiet=True)
  assert 'warning: validation accuracy' not in capsys.readouterr().err


def test_no_warmup_warning_when_statistics_are_recomputed(tmp_path, image_folder, capsys):
  config = config_for(image_folder)
  config.bn_recalibrate_batches = 2
  train.train_and_evaluate(config, str(tmp_path / 'run'), quiet=True)
  assert 'warning:' not in ''.join(capsys.readouterr())


def test_a_failed_start_leaves_no_workdir(tmp_path, image_folder):
  workdir = tmp_path / 'run'
  with pytest.raises(UserError, match='does not exist'):
    train.train_and_evaluate(config_for(str(tmp_path / 'no_images')), str(workdir))
  assert not workdir.exists()
  os.makedirs(workdir)  # A folder the user made is left alone, even when the start fails.
  with pytest.raises(UserError, match='does not exist'):
    train.train_and_evaluate(config_for(str(tmp_path / 'no_images')), str(workdir))
  assert workdir.exists()
