"""Seeded multi-seed benchmark: one resumable run per seed, then mean and standard deviation.

    python -m dsconv_jax.bench --config=configs/model3.py --seeds=0,1,2,3,4 --workdir=DIR

Trains seed n into DIR/seed_<n>/ exactly as `dsconv_jax.main` would (resumable the same way; a
seed whose run already finished with the same config is not trained again), then writes
DIR/bench.json with the per-seed summaries and the mean and sample standard deviation (ddof=1)
of max_val_accuracy, final_val_accuracy (the last epoch's: what a choice on a holdout reads),
test_accuracy and train_seconds, and prints them as a table. Runs that keep further moving
averages (config.ema_extra_decays) get the same statistics of each average's final validation
and test accuracy (bench.json's `ema_extra`), one table row each.

Time to accuracy: for each seed, the first epoch whose validation accuracy passes
`--target_accuracy` (default 0.8293, the source baseline's max val accuracy) and the seconds up
to the end of that epoch (the sum of metrics.jsonl's `epoch_seconds`: training and validation,
compilation excluded, as summary.json's `train_seconds` sums over all epochs), as
`epochs_to_target` / `seconds_to_target` (null where the run never passed it). bench.json's
`to_target` gives how many seeds passed and the mean and sample standard deviation of both over
those seeds.
"""

from __future__ import annotations

# Before any other import: a SIGINT or SIGTERM during start-up (imports, JAX's initialisation, the
# data, the first compile) waits for a safe point instead of interrupting a compiled extension.
from dsconv_jax import stopping  # pylint: disable=g-bad-import-order
if __name__ == '__main__':
  stopping.defer_signals()

import json
import os
from typing import Any, Sequence

from absl import flags
import numpy as np

from dsconv_jax import cli
from dsconv_jax import reporting

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.flag(flags.DEFINE_string, 'workdir', None, 'Folder for the per-seed runs and bench.json.')
cli.flag(flags.DEFINE_list, 'seeds',
         ['0', '1', '2', '3', '4'], 'Comma-separated seeds, e.g. 0,1,2,3,4.')
cli.flag(flags.DEFINE_float, 'target_accuracy', 0.8293,
         'Validation accuracy whose first passing epoch, and the seconds to it, are reported.')
cli.define_distributed_flags()

METRICS = ('max_val_accuracy', 'final_val_accuracy', 'test_accuracy', 'train_seconds')
# Each further average's figures (summary.json's `ema_extra` rows).
AVERAGE_METRICS = ('final_val_accuracy', 'test_accuracy')


def parse_seeds(values: Sequence[str]) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise cli.UsageError(f'--seeds must be comma-separated integers, got {",".join(values)!r}'
                         ) from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise cli.UsageError(f'--seeds must name distinct seeds, got {",".join(values)!r}')
  return seeds


# A finished seed is kept, not retrained (`reporting.finished_summary`, as `main` does).
_normalized = reporting.normalized
finished_summary = reporting.finished_summary


def time_to_target(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
  """First epoch whose val_accuracy exceeds `target`, and the seconds of epochs through it."""
  seconds = 0.0
  for row in sorted(rows, key=lambda r: r['epoch']):
    seconds += row['epoch_seconds']
    if row['val_accuracy'] > target:
      return {'epochs_to_target': row['epoch'], 'seconds_to_target': seconds}
  return {'epochs_to_target': None, 'seconds_to_target': None}


def target_stats(times: dict[int, dict[str, Any]], target: float) -> dict[str, Any]:
  """How many seeds passed `target`, and mean and std of their epochs and seconds to it."""
  passed = [t for t in times.values() if t['epochs_to_target'] is not None]
  out: dict[str, Any] = {'target_accuracy': target, 'reached': len(passed), 'mean': {},
                         'std': {}}
  for key in ('epochs_to_target', 'seconds_to_target'):
    values = np.array([t[key] for t in passed], np.float64)
    out['mean'][key] = float(values.mean()) if len(values) else None
    out['std'][key] = float(values.std(ddof=1)) if len(values) > 1 else (
        0.0 if len(values) else None)
  return out


def _statistics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
  """Mean and sample standard deviation (0 for one row) of each key over `rows`; None where a
  row lacks the key (a summary written before it existed)."""
  out: dict[str, Any] = {'mean': {}, 'std': {}}
  for key in keys:
    if any(r.get(key) is None for r in rows):
      out['mean'][key] = out['std'][key] = None
      continue
    values = np.array([r[key] for r in rows], np.float64)
    out['mean'][key] = float(values.mean())
    out['std'][key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return out


def aggregate(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Mean and sample standard deviation (0 for a single seed) of each benchmark metric, and of
  each further average's figures (`ema_extra`, when the runs kept them)."""
  out: dict[str, Any] = {'n': len(summaries), **_statistics(list(summaries.values()), METRICS)}
  kept = [{row['decay']: row for row in s.get('ema_extra', ())} for s in summaries.values()]
  if kept and kept[0] and all(k.keys() == kept[0].keys() for k in kept):
    out['ema_extra'] = [{'decay': decay, **_statistics([k[decay] for k in kept],
                                                       AVERAGE_METRICS)}
                        for decay in kept[0]]
  return out


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}%'


def _pct_spread(mean, std) -> str:
  return '-' if mean is None else f'{100 * mean:.2f} ± {100 * std:.2f}%'


def _to_target_cell(epochs, seconds) -> str:
  return '-' if epochs is None else f'epoch {epochs:g}, {seconds:.1f} s'


def format_table(summaries: dict[int, dict[str, Any]], stats: dict[str, Any],
                 times: dict[int, dict[str, Any]] | None = None,
                 to_target: dict[str, Any] | None = None) -> str:
  header = ('seed', 'max val acc', 'best epoch', 'final val acc', 'test acc', 'train s')
  if to_target is not None:
    header += (f'passes {100 * to_target["target_accuracy"]:.2f}% at',)
  rows = [header]
  for seed, s in summaries.items():
    row = (str(seed), _pct(s['max_val_accuracy']), str(s['best_epoch']),
           _pct(s.get('final_val_accuracy')), _pct(s['test_accuracy']),
           f'{s["train_seconds"]:.1f}')
    if to_target is not None:
      row += (_to_target_cell(times[seed]['epochs_to_target'], times[seed]['seconds_to_target']),)
    rows.append(row)
  m, sd = stats['mean'], stats['std']
  row = (f'mean ± std (n={stats["n"]})',
         _pct_spread(m['max_val_accuracy'], sd['max_val_accuracy']), '',
         _pct_spread(m['final_val_accuracy'], sd['final_val_accuracy']),
         _pct_spread(m['test_accuracy'], sd['test_accuracy']),
         f'{m["train_seconds"]:.1f} ± {sd["train_seconds"]:.1f}')
  if to_target is not None:
    tm, ts = to_target['mean'], to_target['std']
    row += ('-' if not to_target['reached'] else
            f'epoch {tm["epochs_to_target"]:.1f} ± {ts["epochs_to_target"]:.1f}, '
            f'{tm["seconds_to_target"]:.1f} ± {ts["seconds_to_target"]:.1f} s '
            f'({to_target["reached"]}/{stats["n"]} seeds)',)
  rows.append(row)
  for average in stats.get('ema_extra', ()):
    am, asd = average['mean'], average['std']
    rows.append((f'EMA {average["decay"]:g}, mean ± std', '', '',
                 _pct_spread(am['final_val_accuracy'], asd['final_val_accuracy']),
                 _pct_spread(am['test_accuracy'], asd['test_accuracy']), '')
                + (('',) if to_target is not None else ()))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in rows]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


def run_bench(config, workdir: str, seeds: Sequence[int],
              target_accuracy: float = 0.8293) -> dict[str, Any]:
  """Trains (or resumes, or keeps) one run per seed and writes DIR/bench.json.

  Process 0 holds DIR's lock throughout (`workdir_lock`), and each seed's run its own."""
  import jax
  from dsconv_jax import train, workdir_lock
  if jax.process_index() != 0:
    return _run_seeds(config, workdir, seeds, target_accuracy)
  train.prepare_workdir(workdir)
  with workdir_lock.hold(workdir):
    return _run_seeds(config, workdir, seeds, target_accuracy)


def _run_seeds(config, workdir: str, seeds: Sequence[int],
               target_accuracy: float) -> dict[str, Any]:
  import jax
  from dsconv_jax import fileio, train
  summaries: dict[int, dict[str, Any]] = {}
  shown = False  # The model table: once for all seeds (they share the model).
  for seed in seeds:
    seed_config = config.copy_and_resolve_references()
    with seed_config.unlocked():
      seed_config.seed = seed
    seed_dir = os.path.join(workdir, f'seed_{seed}')
    summary = finished_summary(seed_dir, seed_config)
    if summary is not None:
      print(f'seed {seed}: finished earlier in {seed_dir}, not retrained', flush=True)
    else:
      print(f'seed {seed}: training in {seed_dir}', flush=True)
      summary = _normalized(train.train_and_evaluate(seed_config, seed_dir,
                                                     show_model=not shown))
      shown = True
    summaries[seed] = summary
  stats = aggregate(summaries)
  # Every seed validates on the same split (the holdout is drawn by data_seed, not seed).
  val_splits = sorted({reporting.val_split_of(s) for s in summaries.values()})
  result = {'seeds': list(seeds), 'val_split': ', '.join(val_splits), **stats,
            'runs': {str(seed): s for seed, s in summaries.items()}}
  if jax.process_index() == 0:  # Only process 0 writes metrics.jsonl.
    times = {seed: time_to_target(
        fileio.read_jsonl(os.path.join(workdir, f'seed_{seed}', 'metrics.jsonl')),
        target_accuracy) for seed in seeds}
    to_target = target_stats(times, target_accuracy)
    result['to_target'] = {**to_target,
                           'runs': {str(seed): t for seed, t in times.items()}}
    fileio.atomic_write_json(os.path.join(workdir, 'bench.json'), result)
    print(f'validated on: {result["val_split"]}', flush=True)
    print(format_table(summaries, stats, times, to_target), flush=True)
  return result


def run(argv) -> None:
  del argv
  config = cli.get_config()
  if not FLAGS.workdir:
    raise cli.UsageError('--workdir=DIR is required (where the per-seed runs go)')
  seeds = parse_seeds(FLAGS.seeds)
  if not 0.0 <= FLAGS.target_accuracy <= 1.0:
    raise cli.UsageError('--target_accuracy must be a fraction in [0, 1], got '
                         f'{FLAGS.target_accuracy}')
  cli.apply_determinism(config)
  cli.initialize_distributed()
  run_bench(config, FLAGS.workdir, seeds, FLAGS.target_accuracy)


if __name__ == '__main__':
  cli.main(run)
