"""benchmarks/recipe_table.py: issue 16's table of recipe candidates against a baseline run."""

import json
import os
import subprocess
import sys

from test_models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(directory, config, test_accuracy, **extra):
  directory.mkdir(parents=True)
  summary = {'config': config.to_dict(), 'params_total': 97_378, 'max_val_accuracy': 0.8,
             'best_epoch': 10, 'test_accuracy': test_accuracy, 'test_accuracy_tta_flip': 0.81,
             'train_seconds': 1234.5, 'image_shape': [32, 32, 3],
             'class_names': [str(i) for i in range(10)], **extra}
  (directory / 'summary.json').write_text(json.dumps(summary))
  (directory / 'metrics.jsonl').write_text(
      '\n'.join(json.dumps({'epoch': e, 'train_accuracy': 0.5 + e / 100}) for e in (1, 2)) + '\n')
  return str(directory)


def test_recipe_table_lists_changes_cost_and_difference_to_the_baseline(tmp_path):
  config = load_config('dsresnet')
  base = _run(tmp_path / 'base', config, 0.8361)  # Recorded before macs_per_image existed.
  config.label_smoothing = 0.2
  config.model_kwargs.expansion = 3
  other = _run(tmp_path / 'other', config, 0.8280, macs_per_image=20_500_000,
               test_accuracy_tta_multicrop=0.8384)
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'), base,
                         other, f'--multicrop={base}=0.847'], capture_output=True, text=True,
                        check=True, timeout=300)
  rows = [line.split(' | ') for line in done.stdout.splitlines()[2:]]
  assert rows[0] == ['| `base`', '(baseline)', '97,378', '22.5M', '80.00% (10)', '83.61%',
                     '81.00%', '84.70%*', '52.00%', '1,234', '+0.00 |']
  assert rows[1] == ['| `other`', "label_smoothing=0.2, model_kwargs.expansion=3", '97,378',
                     '20.5M', '80.00% (10)', '82.80%', '81.00%', '83.84%', '52.00%', '1,234',
                     '-0.81 |']
