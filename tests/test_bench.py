"""Multi-seed benchmarks: per-seed runs, bench.json statistics, resuming instead of retraining."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsconv_jax import bench
from dsconv_jax.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(folder, workdir, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'dsconv_jax.bench', '--config=configs/tiny.py', '--seeds=0,1',
       f'--workdir={workdir}', f'--config.dataset=folder:{folder}', '--config.cache_dir=',
       *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_bench_writes_statistics_and_resumes(image_folder, tmp_path):
  workdir = tmp_path / 'bench'
  out = _bench(image_folder, workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / 'bench.json') as f:
    result = json.load(f)
  assert result['seeds'] == [0, 1] and result['n'] == 2 and result['val_split'] == 'test'
  runs = [result['runs'][s] for s in ('0', '1')]
  assert [r['seed'] for r in runs] == [0, 1]
  for key in ('max_val_accuracy', 'final_val_accuracy', 'test_accuracy', 'train_seconds'):
    values = [r[key] for r in runs]
    assert result['mean'][key] == pytest.approx(np.mean(values))
    assert result['std'][key] == pytest.approx(np.std(values, ddof=1))
  for seed in (0, 1):
    with open(workdir / f'seed_{seed}' / 'summary.json') as f:
      assert json.load(f) == result['runs'][str(seed)]
  assert 'mean ± std (n=2)' in out.stdout and 'validated on: test' in out.stdout
  assert out.stdout.count('Total params:') == 1  # The model table once for all seeds.
  # Time to the default target (the source baseline's 82.93%), from each seed's metrics.jsonl.
  to_target = result['to_target']
  assert to_target['target_accuracy'] == pytest.approx(0.8293)
  for seed in ('0', '1'):
    rows = [json.loads(line) for line in open(workdir / f'seed_{seed}' / 'metrics.jsonl')]
    assert to_target['runs'][seed] == bench.time_to_target(rows, 0.8293)
  assert 'passes 82.93% at' in out.stdout
  # Rerunning keeps finished seeds; a longer run resumes each seed from its checkpoint.
  again = _bench(image_folder, workdir)
  assert again.returncode == 0 and again.stdout.count('not retrained') == 2
  assert 'epoch' not in again.stdout.replace('best epoch', '')
  longer = _bench(image_folder, workdir, '--config.num_epochs=2')
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert longer.stdout.count('resuming from the checkpoint of epoch 1') == 2
  assert 'epoch   1/2' not in longer.stdout and longer.stdout.count('epoch   2/2') == 2


def test_aggregate_single_seed_has_zero_std():
  stats = bench.aggregate({3: {'max_val_accuracy': 0.5, 'final_val_accuracy': 0.45,
                               'test_accuracy': 0.4, 'train_seconds': 2.0}})
  assert stats['std'] == {'max_val_accuracy': 0.0, 'final_val_accuracy': 0.0,
                          'test_accuracy': 0.0, 'train_seconds': 0.0}
  # A summary written before final_val_accuracy existed: no figure rather than a wrong one.
  older = bench.aggregate({3: {'max_val_accuracy': 0.5, 'test_accuracy': 0.4,
                               'train_seconds': 2.0}})
  assert older['mean']['final_val_accuracy'] is None and 'ema_extra' not in older


def test_aggregate_and_table_give_each_further_average_its_statistics():
  def summary(val, extra):
    return {'max_val_accuracy': val, 'best_epoch': 9, 'final_val_accuracy': val,
            'test_accuracy': val - 0.01, 'train_seconds': 5.0,
            'ema_extra': [{'decay': 0.9995, 'final_val_accuracy': extra,
                           'test_accuracy': extra - 0.02, 'final_val_loss': 0.3}]}
  summaries = {0: summary(0.88, 0.885), 1: summary(0.882, 0.889)}
  stats = bench.aggregate(summaries)
  (average,) = stats['ema_extra']
  assert average['decay'] == 0.9995
  assert average['mean']['final_val_accuracy'] == pytest.approx(0.887)
  assert average['std']['test_accuracy'] == pytest.approx(np.std([0.865, 0.869], ddof=1))
  table = bench.format_table(summaries, stats).splitlines()
  assert table[-1].startswith('| EMA 0.9995, mean ± std') and '88.70 ± 0.28%' in table[-1]
  assert '88.10 ± 0.14%' in table[-2]  # The runs' own final validation figure.


def test_time_to_target_takes_first_epoch_strictly_above():
  rows = [{'epoch': 2, 'val_accuracy': 0.83, 'epoch_seconds': 2.0},
          {'epoch': 1, 'val_accuracy': 0.8293, 'epoch_seconds': 1.5},
          {'epoch': 3, 'val_accuracy': 0.9, 'epoch_seconds': 4.0}]
  assert bench.time_to_target(rows, 0.8293) == {'epochs_to_target': 2, 'seconds_to_target': 3.5}
  assert bench.time_to_target(rows, 0.95) == {'epochs_to_target': None,
                                               'seconds_to_target': None}
  assert bench.time_to_target([], 0.5)['epochs_to_target'] is None


def test_target_stats_over_the_seeds_that_passed():
  times = {0: {'epochs_to_target': 2, 'seconds_to_target': 3.0},
           1: {'epochs_to_target': 4, 'seconds_to_target': 5.0},
           2: {'epochs_to_target': None, 'seconds_to_target': None}}
  stats = bench.target_stats(times, 0.8)
  assert stats['reached'] == 2
  assert stats['mean'] == {'epochs_to_target': 3.0, 'seconds_to_target': 4.0}
  assert stats['std']['epochs_to_target'] == pytest.approx(np.std([2, 4], ddof=1))
  table = bench.format_table(
      {s: {'max_val_accuracy': 0.9, 'best_epoch': 3, 'test_accuracy': 0.9, 'train_seconds': 6.0}
       for s in times}, bench.aggregate(
           {s: {'max_val_accuracy': 0.9, 'test_accuracy': 0.9, 'train_seconds': 6.0}
            for s in times}), times, stats)
  assert 'epoch 2, 3.0 s' in table and '(2/3 seeds)' in table
  none = bench.target_stats({0: times[2]}, 0.8)
  assert none['reached'] == 0 and none['mean']['seconds_to_target'] is None


def test_target_accuracy_outside_0_1_is_a_usage_error(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'dsconv_jax.bench', '--config=configs/tiny.py', '--seeds=0',
       f'--workdir={tmp_path}', '--target_accuracy=83'], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert '--target_accuracy must be a fraction' in out.stderr


def test_bad_seeds_are_usage_errors():
  with pytest.raises(UsageError):
    bench.parse_seeds(['0', 'x'])
  with pytest.raises(UsageError):
    bench.parse_seeds(['1', '1'])


def test_a_finished_seed_of_a_fitted_model_is_kept(tmp_path):
  """With fit_params on, a run saves the config with the width multiplier the fit chose, which
  the config given to bench lacks: the seed still counts as finished (rather than trained or
  evaluated again); any other change does not."""
  from dsconv_jax import budget  # pylint: disable=g-import-not-at-top
  from test_models import load_config  # pylint: disable=g-import-not-at-top
  config = load_config('dsresnet')
  fitted, info = budget.resolve_width(config, (32, 32, 3), 10)
  assert 0 < info['width_multiplier'] < 1  # What a run saves differs from what bench is given.
  assert 'width_multiplier' not in config.model_kwargs
  seed_dir = tmp_path / 'seed_0'
  seed_dir.mkdir()
  summary = {'config': bench._normalized(fitted.to_dict()), 'epochs': config.num_epochs,
             'test_accuracy': 0.5}
  (seed_dir / 'summary.json').write_text(json.dumps(summary))
  assert bench.finished_summary(str(seed_dir), config) == summary
  for key, value in (('fit_params', 80_000), ('learning_rate', 0.05), ('num_epochs', 49)):
    other = config.copy_and_resolve_references()
    with other.unlocked():
      other[key] = value
    assert bench.finished_summary(str(seed_dir), other) is None, key
  other = config.copy_and_resolve_references()
  other.model_kwargs.widths = (32, 96, 120)
  assert bench.finished_summary(str(seed_dir), other) is None
