"""The recipe table: finished runs side by side with their difference to a baseline.

    python benchmarks/recipe_table.py BASELINE_DIR DIR [DIR ...] > table.md

For each run: what it changes against the baseline's config (keys whose values differ, read from
summary.json), the split it validated on (summary.json's `val_split`: 'holdout:N', N training
images never trained on, or 'test' for runs that validated on the test split, as every run from
before the holdout did), parameters, multiply-accumulates per image (summary.json's
`macs_per_image`, or for runs recorded before it, counted from the run's config), the final
validation accuracy (the last epoch's: what a choice on the holdout reads), the max validation
accuracy (epoch), the final test accuracy, the flip and multi-crop test-time-augmented
accuracies when the run reports them, the final training accuracy (metrics.jsonl, augmented
batches), training seconds, and the final validation and test accuracies' differences to the
baseline's in points (the validation difference only between runs on the same split: choices
are made on it, never on the test figures). A run that reports no multi-crop accuracy gets the one `--multicrop
DIR=ACC` gives (e.g. from `python -m dsconv_jax.evaluate --workdir=DIR --tta_flip
--tta_translate=1`), marked with an asterisk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Keys that name where a run lives or how it reports, not what it trains.
IGNORED = {'cache_dir', 'data_dir', 'dataset', 'tta_flip', 'tta_translate', 'checkpoint_keep',
           'deterministic'}


def flatten(config: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return out


def load(directory: str) -> tuple[dict, list[dict]]:
  with open(os.path.join(directory, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(directory, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return summary, rows


def resolved(config: dict) -> dict:
  """`config` flattened, with the project's defaults (and the model's) for keys it lacks: runs
  recorded before a key existed ran with its default."""
  from dsconv_jax import defaults, models
  out = flatten(defaults.get_config().to_dict())
  out.update(flatten(config))
  kwargs = models.kwargs_with_defaults(config['model'], dict(config.get('model_kwargs') or {}))
  out.update(flatten({'model_kwargs': kwargs}))
  return out


def changes(config: dict, baseline: dict) -> str:
  a, b = resolved(config), resolved(baseline)
  keys = sorted(k for k in set(a) | set(b)
                if k.split('.')[0] not in IGNORED and a.get(k) != b.get(k))
  return ', '.join(f'{k}={a.get(k)!r}' for k in keys) or '(baseline)'


def macs(summary: dict) -> int:
  """Multiply-accumulates per image of the run's model."""
  if 'macs_per_image' in summary:
    return summary['macs_per_image']
  from dsconv_jax import experiment, inference
  return experiment.describe_model(inference.config_of(summary), tuple(summary['image_shape']),
                                   len(summary['class_names'])).report.macs_total


def pct(x) -> str:
  return '' if x is None else f'{100 * x:.2f}%'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('baseline')
  parser.add_argument('dirs', nargs='*')
  parser.add_argument('--multicrop', action='append', default=[], metavar='DIR=ACC')
  args = parser.parse_args(argv)
  extra = {os.path.normpath(k): float(v) for k, v in (m.split('=', 1) for m in args.multicrop)}
  base_summary, base_rows = load(args.baseline)
  base_split = base_summary.get('val_split', 'test')
  print('| run | change against the baseline | val split | params | MACs | final val | '
        'max val (epoch) | test | flip TTA | multi-crop TTA | train acc | seconds | '
        'val - baseline | test - baseline |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for directory in [args.baseline, *args.dirs]:
    summary, rows = load(directory)
    split = summary.get('val_split', 'test')
    multicrop = summary.get('test_accuracy_tta_multicrop')
    mark = ''
    if multicrop is None and os.path.normpath(directory) in extra:
      multicrop, mark = extra[os.path.normpath(directory)], '*'
    val_delta = (f'{100 * (rows[-1]["val_accuracy"] - base_rows[-1]["val_accuracy"]):+.2f}'
                 if split == base_split else '(other split)')
    delta = 100 * (summary['test_accuracy'] - base_summary['test_accuracy'])
    print(f'| `{os.path.basename(os.path.normpath(directory))}` | '
          f'{changes(summary["config"], base_summary["config"])} | {split} | '
          f'{summary["params_total"]:,} | {macs(summary) / 1e6:.1f}M | '
          f'{pct(rows[-1]["val_accuracy"])} | '
          f'{pct(summary["max_val_accuracy"])} ({summary["best_epoch"]}) | '
          f'{pct(summary["test_accuracy"])} | {pct(summary.get("test_accuracy_tta_flip"))} | '
          f'{pct(multicrop)}{mark} | {pct(rows[-1]["train_accuracy"])} | '
          f'{summary["train_seconds"]:,.0f} | {val_delta} | {delta:+.2f} |')


if __name__ == '__main__':
  sys.exit(main())
