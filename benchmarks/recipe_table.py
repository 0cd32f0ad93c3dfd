"""The recipe table: finished runs side by side with their difference to a baseline.

    python benchmarks/recipe_table.py BASELINE DIR [DIR ...] > table.md

Each argument is a run's folder, or runs of one config with different seeds joined by `+`
(`A+B`: one row, each figure the seeds' mean ± sample standard deviation). For each row: what
it changes against its reference's config (keys whose values differ, read from summary.json),
the split it validated on (summary.json's `val_split`: 'holdout:N', N training images never
trained on, or 'test' for runs that validated on the test split, as every run from before the
holdout did), its epochs and seeds, parameters, multiply-accumulates per image (summary.json's
`macs_per_image`, or for runs recorded before it, counted from the run's config), the final
validation accuracy (the last epoch's: what a choice on the holdout reads), the max validation
accuracy (epochs), the final test accuracy, the flip and multi-crop test-time-augmented
accuracies when the run reports them, the final training accuracy (metrics.jsonl, augmented
batches), training seconds (a seed's mean), and the final validation and test accuracies'
differences to the reference's in points.

A row's reference is the first row validated on the same split for the same number of epochs
(the BASELINE for its own kind), so one table holds a short screen and full-length runs, each
compared with its own baseline. The first row of another split or length is compared with the
BASELINE on test only: validation figures are compared only on the same split and length, and
choices are made on them, never on the test figures. A run that reports no multi-crop accuracy
gets the one `--multicrop DIR=ACC` gives (e.g. from `python -m dsconv_jax.evaluate --workdir=DIR
--tta_flip --tta_translate=1`), marked with an asterisk.

A run that kept further moving averages of its weights (config.ema_extra_decays) gets a row for
each below its own: the same training evaluated with that average (summary.json's `ema_extra`),
its change `ema_decay=D` against the reference, with the final validation and test accuracies
(single view) and their differences; the figures only the run's own average has stay empty.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Keys that name where a run lives or how it reports, not what it trains.
IGNORED = {'cache_dir', 'data_dir', 'dataset', 'tta_flip', 'tta_translate', 'checkpoint_keep',
           'deterministic', 'ema_extra_decays'}


def flatten(config: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return out


def load(directory: str) -> tuple[dict, list[dict]]:
  """A finished run's summary.json and metrics.jsonl rows; one error line when either is missing
  or unreadable (a run still training, a mistyped folder)."""
  try:
    with open(os.path.join(directory, 'summary.json')) as f:
      summary = json.load(f)
    with open(os.path.join(directory, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError) as e:
    raise SystemExit(f'error: {directory}: not a finished run ({e})') from None
  if not rows:
    raise SystemExit(f'error: {directory}: metrics.jsonl holds no epoch')
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


def effective(summary: dict) -> dict:
  """The run's config, with the BatchNorm settings it left to the model (None) as the model ran
  them (summary.json's `model_options`, where the run recorded one value)."""
  config = dict(summary['config'])
  for key in ('bn_momentum', 'bn_epsilon'):
    ran = (summary.get('model_options') or {}).get(key)
    if config.get(key) is None and isinstance(ran, list) and len(ran) == 1:
      config[key] = ran[0]
  return config


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


def spread(values) -> str:
  """A figure in percent, or the mean and sample standard deviation of a seed group's."""
  if any(v is None for v in values):
    return ''
  if len(values) == 1:
    return pct(values[0])
  return f'{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}%'


class Row:
  """One table row: a run, or a group of runs of one config with different seeds (`A+B`)."""

  def __init__(self, entry: str, extra: dict):
    self.dirs = [os.path.normpath(d) for d in entry.split('+')]
    loaded = [load(d) for d in self.dirs]
    self.summaries = [s for s, _ in loaded]
    self.finals = [rows[-1] for _, rows in loaded]
    first = self.summaries[0]
    self.name = ' + '.join(f'`{os.path.basename(d)}`' for d in self.dirs)
    self.config = effective(first)
    self.split = first.get('val_split', 'test')
    self.epochs = first.get('epochs', first['config']['num_epochs'])
    seeds = [s['config'].get('seed', 0) for s in self.summaries]
    if len(set(self.dirs)) < len(self.dirs) or len(set(seeds)) < len(seeds):
      raise SystemExit(f'error: {entry}: a group repeats a run or a seed ({seeds})')
    for d, s in zip(self.dirs[1:], self.summaries[1:]):
      differ = changes(dict(effective(s), seed=self.config.get('seed')), self.config)
      split, epochs = s.get('val_split', 'test'), s.get('epochs', s['config']['num_epochs'])
      if differ != '(baseline)' or (split, epochs) != (self.split, self.epochs):
        raise SystemExit(f'error: {entry}: {os.path.basename(d)} differs from '
                         f'{os.path.basename(self.dirs[0])} in more than its seed: '
                         f'{differ}, {split}, {epochs} epochs')
    self.val = [r['val_accuracy'] for r in self.finals]
    self.test = [s['test_accuracy'] for s in self.summaries]
    self.multicrop, self.mark = [], ''
    for d, s in zip(self.dirs, self.summaries):
      value = s.get('test_accuracy_tta_multicrop')
      if value is None and d in extra:
        value, self.mark = extra[d], '*'
      self.multicrop.append(value)

    self.ema_decay = None  # A further average's decay on its row (`further_averages`).

  def key(self) -> tuple:
    return self.split, self.epochs

  def further_averages(self) -> list['Row']:
    """A row for each further average the runs kept (config.ema_extra_decays)."""
    kept = [{row['decay']: row for row in s.get('ema_extra', ())} for s in self.summaries]
    out = []
    if any(k.keys() != kept[0].keys() for k in kept):
      raise SystemExit(f'error: {self.name}: the seeds kept other further EMA decays: '
                       + '; '.join(', '.join(map(str, k)) or 'none' for k in kept))
    for decay in kept[0]:
      row = copy.copy(self)
      row.name = f'{self.name}, EMA {decay:g}'
      row.config = dict(self.config, ema_decay=decay)
      row.val = [k[decay]['final_val_accuracy'] for k in kept]
      row.test = [k[decay]['test_accuracy'] for k in kept]
      row.multicrop, row.mark, row.ema_decay = [None], '', decay
      out.append(row)
    return out

  def cells(self, reference: 'Row', first: 'Row') -> list[str]:
    s = self.summaries
    against = reference if reference is not self else first
    if reference is not self or self is first:
      val_delta = f'{100 * (statistics.mean(self.val) - statistics.mean(reference.val)):+.2f}'
    else:
      val_delta = '(other split)' if self.split != first.split else '(other length)'
    delta = 100 * (statistics.mean(self.test) - statistics.mean(against.test))
    best = ', '.join(str(x['best_epoch']) for x in s)
    seeds = ', '.join(str(x['config'].get('seed', 0)) for x in s)
    own = self.ema_decay is None  # Figures of the run's own average (max val, TTA, time).
    return [self.name, changes(self.config, against.config) if self is not first
            else '(baseline)', self.split, str(self.epochs), seeds,
            f'{s[0]["params_total"]:,}', f'{macs(s[0]) / 1e6:.1f}M', spread(self.val),
            f'{spread([x["max_val_accuracy"] for x in s])} ({best})' if own else '',
            spread(self.test),
            spread([x.get('test_accuracy_tta_flip') for x in s]) if own else '',
            spread(self.multicrop) + self.mark,
            spread([r['train_accuracy'] for r in self.finals]),
            f'{statistics.mean(x["train_seconds"] for x in s):,.0f}' if own else '',
            val_delta, f'{delta:+.2f}']


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('baseline')
  parser.add_argument('dirs', nargs='*')
  parser.add_argument('--multicrop', action='append', default=[], metavar='DIR=ACC')
  args = parser.parse_args(argv)
  extra = {os.path.normpath(k): float(v) for k, v in (m.split('=', 1) for m in args.multicrop)}
  rows = [row for entry in [args.baseline, *args.dirs]
          for run in [Row(entry, extra)] for row in [run, *run.further_averages()]]
  references = {}
  for row in rows:
    references.setdefault(row.key(), row)
  print('| run | change against the reference | val split | epochs | seeds | params | MACs | '
        'final val | max val (epoch) | test | flip TTA | multi-crop TTA | train acc | seconds | '
        'val - reference | test - reference |')
  print('|' + ' --- |' * 16)
  for row in rows:
    print('| ' + ' | '.join(row.cells(references[row.key()], rows[0])) + ' |')
  if len(references) > 1:
    print()
    print('References: ' + '; '.join(
        f'{r.name} for the rows on {split} at {epochs} epochs' for (split, epochs), r in
        references.items()) + f'. Each other reference is compared with {rows[0].name} on test '
        'only.')


if __name__ == '__main__':
  sys.exit(main())
