"""benchmarks/recipe_table.py: the table of recipe candidates against a baseline run."""

import json
import os
import subprocess
import sys

from test_models import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(directory, config, test_accuracy, val_accuracy=0.79, **extra):
  directory.mkdir(parents=True)
  summary = {'config': config.to_dict(), 'params_total': 97_378, 'max_val_accuracy': 0.8,
             'best_epoch': 10, 'test_accuracy': test_accuracy, 'test_accuracy_tta_flip': 0.81,
             'train_seconds': 1234.5, 'image_shape': [32, 32, 3],
             'class_names': [str(i) for i in range(10)], **extra}
  (directory / 'summary.json').write_text(json.dumps(summary))
  (directory / 'metrics.jsonl').write_text('\n'.join(json.dumps(
      {'epoch': e, 'train_accuracy': 0.5 + e / 100, 'val_accuracy': val_accuracy - (2 - e) / 10})
      for e in (1, 2)) + '\n')
  return str(directory)


def _table(*args):
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                         *args], capture_output=True, text=True, check=True, timeout=300)
  return [line.split(' | ') for line in done.stdout.splitlines()[2:]]


def test_recipe_table_names_a_folder_that_holds_no_finished_run_in_one_line(tmp_path):
  base = _run(tmp_path / 'base', load_config('dsresnet'), 0.8361)
  training = tmp_path / 'training'  # A run still training: metrics, no summary yet.
  training.mkdir()
  (training / 'metrics.jsonl').write_text('{"epoch": 1}\n')
  empty = _run(tmp_path / 'empty', load_config('dsresnet'), 0.8361)
  (tmp_path / 'empty' / 'metrics.jsonl').write_text('')
  for bad, says in ((tmp_path / 'typo', 'not a finished run'),
                    (training, 'not a finished run'), (empty, 'metrics.jsonl holds no epoch')):
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                           base, f'{base}+{bad}'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ''
    assert done.stderr.startswith(f'error: {bad}: {says}') and 'Traceback' not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_recipe_table_lists_changes_split_cost_and_differences_to_the_baseline(tmp_path):
  config = load_config('dsresnet')
  config.model_kwargs.kernel_size = 3  # The 3x3 network of the runs recorded then: 22.5M MACs.
  # Recorded before macs_per_image and val_split existed (it validated on the test split).
  base = _run(tmp_path / 'base', config, 0.8361)
  config.label_smoothing = 0.2
  config.model_kwargs.expansion = 3
  other = _run(tmp_path / 'other', config, 0.8280, val_accuracy=0.7765,
               macs_per_image=20_500_000, test_accuracy_tta_multicrop=0.8384, val_split='test')
  held = _run(tmp_path / 'held', config, 0.8300, val_split='holdout:5000',
              macs_per_image=20_500_000)
  rows = _table(base, other, held, f'--multicrop={base}=0.847')
  assert rows[0] == ['| `base`', '(baseline)', 'test', '50', '0', '97,378', '22.5M', '79.00%',
                     '80.00% (10)', '83.61%', '81.00%', '84.70%*', '52.00%', '1,234', '+0.00',
                     '+0.00 |']
  assert rows[1] == ['| `other`', "label_smoothing=0.2, model_kwargs.expansion=3", 'test', '50',
                     '0', '97,378', '20.5M', '77.65%', '80.00% (10)', '82.80%', '81.00%',
                     '83.84%', '52.00%', '1,234', '-1.35', '-0.81 |']
  # The final holdout figure is not comparable with a baseline that validated on another split.
  assert rows[2][2] == 'holdout:5000' and rows[2][7] == '79.00%'
  assert rows[2][-2:] == ['(other split)', '-0.61 |']


def test_recipe_table_averages_seed_groups_and_compares_each_length_with_its_own_baseline(
    tmp_path):
  config = load_config('dsresnet')
  config.model_kwargs.kernel_size = 3  # The baseline's kernels; the candidate changes them.
  config.holdout = 5000
  held = dict(val_split='holdout:5000', macs_per_image=22_500_000)

  def seeds(name, figures):
    out = []
    for seed, (test, val) in enumerate(figures):
      config.seed = seed
      out.append(_run(tmp_path / f'{name}{seed}', config, test, val, **held))
    config.seed = 0
    return out

  config.bn_epsilon = 1e-3  # Set in the config, as runs recorded before the key's default did.
  long = seeds('long', [(0.8796, 0.8818), (0.8788, 0.8824)])
  config.bn_epsilon = None  # Left to the model, which ran with the same value.
  held['model_options'] = {'bn_epsilon': [1e-3], 'bn_momentum': [0.9]}
  config.model_kwargs.kernel_size = 5
  wide = seeds('k5-', [(0.8850, 0.8900), (0.8870, 0.8920)])
  config.num_epochs = 10
  short_k5 = _run(tmp_path / 'short-k5', config, 0.8299, 0.8394, **held)
  config.model_kwargs.kernel_size = 3
  short = _run(tmp_path / 'short', config, 0.8231, 0.8282, **held)
  rows = _table('+'.join(long), '+'.join(wide), short, short_k5)
  assert rows[0][:5] == ['| `long0` + `long1`', '(baseline)', 'holdout:5000', '50', '0, 1']
  assert rows[0][7] == '88.21 ± 0.04%' and rows[0][9] == '87.92 ± 0.06%'
  assert rows[0][8] == '80.00 ± 0.00% (10, 10)'
  assert rows[1][1] == 'model_kwargs.kernel_size=5' and rows[1][7] == '89.10 ± 0.14%'
  assert rows[1][-2:] == ['+0.89', '+0.68 |']
  # The first 10-epoch row is compared with the 50-epoch baseline on test only, and becomes
  # the reference of the 10-epoch rows after it.
  assert rows[2][1] == 'num_epochs=10' and rows[2][3] == '10'
  assert rows[2][-2:] == ['(other length)', '-5.61 |']
  assert rows[3][1] == 'model_kwargs.kernel_size=5' and rows[3][-2:] == ['+1.12', '+0.68 |']
  assert rows[5][0].startswith('References: `long0` + `long1` for the rows on holdout:5000 at 50')
  # A group of runs that differ in more than their seeds is refused.
  bad = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                        f'{long[0]}+{wide[1]}'], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'in more than its seed: model_kwargs.kernel_size=5' in bad.stderr
  again = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                          f'{long[0]}+{long[0]}'], capture_output=True, text=True, timeout=300)
  assert again.returncode == 1 and 'repeats a run or a seed' in again.stderr


def test_recipe_table_gives_each_further_average_a_row_of_its_own(tmp_path):
  config = load_config('dsresnet')
  config.model_kwargs.kernel_size = 3  # The baseline's kernels; the candidate changes them.
  config.holdout = 5000
  held = dict(val_split='holdout:5000', macs_per_image=22_500_000)
  base = _run(tmp_path / 'base', config, 0.8792, 0.8821, **held)
  config.ema_extra_decays = '0.998,0.9995'
  extra = [{'decay': 0.998, 'final_val_accuracy': 0.8801, 'final_val_loss': 0.4,
            'test_accuracy': 0.8770},
           {'decay': 0.9995, 'final_val_accuracy': 0.8860, 'final_val_loss': 0.4,
            'test_accuracy': 0.8812}]
  runs = []
  for seed, shift in ((0, 0.0), (1, 0.002)):
    config.seed = seed
    kept = [dict(row, final_val_accuracy=row['final_val_accuracy'] + shift) for row in extra]
    runs.append(_run(tmp_path / f'ema{seed}', config, 0.8800, 0.8830, ema_extra=kept, **held))
  rows = _table(base, '+'.join(runs))
  # The further averages do not change what the run trains: its own row is the baseline's config.
  assert rows[1][0] == '| `ema0` + `ema1`' and rows[1][1] == '(baseline)'
  assert rows[2][0] == '| `ema0` + `ema1`, EMA 0.998' and rows[2][1] == 'ema_decay=0.998'
  assert rows[3][0] == '| `ema0` + `ema1`, EMA 0.9995' and rows[3][1] == 'ema_decay=0.9995'
  assert rows[3][7] == '88.70 ± 0.14%' and rows[3][9] == '88.12 ± 0.00%'
  assert rows[3][8] == rows[3][10] == rows[3][13] == ''  # Only the run's own average has them.
  assert rows[3][-2:] == ['+0.49', '+0.20 |']
  # Seeds that kept other averages do not make one row.
  config.seed, config.ema_extra_decays = 2, '0.998'
  other = _run(tmp_path / 'ema2', config, 0.88, 0.88, ema_extra=extra[:1], **held)
  bad = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                        base, f'{runs[0]}+{other}'], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'kept other further EMA decays: 0.998, 0.9995; 0.998' in bad.stderr
  reversed_ = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'recipe_table.py'),
                              base, f'{other}+{runs[0]}'], capture_output=True, text=True,
                             timeout=300)
  assert reversed_.returncode == 1 and 'kept other further EMA decays' in reversed_.stderr
