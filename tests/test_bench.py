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
  assert result['seeds'] == [0, 1] and result['n'] == 2
  runs = [result['runs'][s] for s in ('0', '1')]
  assert [r['seed'] for r in runs] == [0, 1]
  for key in ('max_val_accuracy', 'test_accuracy', 'train_seconds'):
    values = [r[key] for r in runs]
    assert result['mean'][key] == pytest.approx(np.mean(values))
    assert result['std'][key] == pytest.approx(np.std(values, ddof=1))
  for seed in (0, 1):
    with open(workdir / f'seed_{seed}' / 'summary.json') as f:
      assert json.load(f) == result['runs'][str(seed)]
  assert 'mean ± std (n=2)' in out.stdout
  # Rerunning keeps finished seeds; a longer run resumes each seed from its checkpoint.
  again = _bench(image_folder, workdir)
  assert again.returncode == 0 and again.stdout.count('not retrained') == 2
  assert 'epoch' not in again.stdout.replace('best epoch', '')
  longer = _bench(image_folder, workdir, '--config.num_epochs=2')
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert longer.stdout.count('resuming from the checkpoint of epoch 1') == 2
  assert 'epoch   1/2' not in longer.stdout and longer.stdout.count('epoch   2/2') == 2


def test_aggregate_single_seed_has_zero_std():
  stats = bench.aggregate({3: {'max_val_accuracy': 0.5, 'test_accuracy': 0.4,
                               'train_seconds': 2.0}})
  assert stats['std'] == {'max_val_accuracy': 0.0, 'test_accuracy': 0.0, 'train_seconds': 0.0}


def test_bad_seeds_are_usage_errors():
  with pytest.raises(UsageError):
    bench.parse_seeds(['0', 'x'])
  with pytest.raises(UsageError):
    bench.parse_seeds(['1', '1'])
