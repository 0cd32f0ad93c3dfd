"""benchmarks/recalibration_study.py: a finished run evaluated with BatchNorm statistics
recomputed over differently augmented training batches."""

import json
import os
import subprocess
import sys

import pytest

from test_recipe import recipe_config

from dsconv_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'recalibration_study.py')


@pytest.mark.slow
def test_study_reproduces_the_run_and_evaluates_each_augmentation(tmp_path, image_folder):
  config = recipe_config(image_folder, 1)
  config.augment = 'crop,flip,cutout'
  config.bn_recalibrate_batches = 2
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir, quiet=True)
  before = sorted(os.listdir(workdir))
  out = str(tmp_path / 'study.json')
  done = subprocess.run([sys.executable, SCRIPT, f'--workdir={workdir}', '--augment=train;none',
                         f'--json={out}'], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  result = json.load(open(out))
  assert sorted(os.listdir(workdir)) == before  # Nothing in the run's folder is written.
  assert result['reproduces_run'] is True and result['ema'] is True
  moving, as_trained, clean = result['rows']
  assert moving['batches'] == 0 and as_trained['batches'] == clean['batches'] == 2
  assert as_trained['test_accuracy'] == summary['test_accuracy']
  last = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))][-1]
  assert abs(as_trained['test_loss'] - last['val_loss']) < 1e-5 * last['val_loss']
  assert as_trained['test_accuracy_tta_flip'] == summary['test_accuracy_tta_flip']
  assert "augment 'none' (none)" in clean['statistics']
  assert "reproduces the run's test_accuracy: yes" in done.stdout
  assert '| recomputed, augment \'train\' (crop,flip,cutout) | 2 | ' in done.stdout


def test_study_of_a_missing_run_is_one_line(tmp_path):
  done = subprocess.run([sys.executable, SCRIPT, f'--workdir={tmp_path / "nothing"}'],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr.startswith('error: workdir') and 'does not exist' in done.stderr
  assert 'Traceback' not in done.stderr
