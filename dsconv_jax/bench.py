"""Seeded multi-seed benchmark: one resumable run per seed, then mean and standard deviation.

    python -m dsconv_jax.bench --config=configs/model3.py --seeds=0,1,2,3,4 --workdir=DIR

Trains seed n into DIR/seed_<n>/ exactly as `dsconv_jax.main` would (resumable the same way; a
seed whose run already finished with the same config is not trained again), then writes
DIR/bench.json with the per-seed summaries and the mean and sample standard deviation (ddof=1)
of max_val_accuracy, test_accuracy and train_seconds, and prints them as a table.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags
import numpy as np

from dsconv_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.flag(flags.DEFINE_string, 'workdir', None, 'Folder for the per-seed runs and bench.json.')
cli.flag(flags.DEFINE_list, 'seeds',
         ['0', '1', '2', '3', '4'], 'Comma-separated seeds, e.g. 0,1,2,3,4.')
cli.define_distributed_flags()

METRICS = ('max_val_accuracy', 'test_accuracy', 'train_seconds')


def parse_seeds(values: Sequence[str]) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise cli.UsageError(f'--seeds must be comma-separated integers, got {",".join(values)!r}'
                         ) from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise cli.UsageError(f'--seeds must name distinct seeds, got {",".join(values)!r}')
  return seeds


def _normalized(obj: Any) -> Any:
  return json.loads(json.dumps(obj, sort_keys=True))


def finished_summary(seed_dir: str, config) -> dict[str, Any] | None:
  """The run's summary if it finished all epochs with exactly this config, else None."""
  path = os.path.join(seed_dir, 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  if summary.get('config') != _normalized(config.to_dict()):
    return None
  return summary if summary.get('epochs') == config.num_epochs else None


def aggregate(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
  """Mean and sample standard deviation (0 for a single seed) of each benchmark metric."""
  out: dict[str, Any] = {'n': len(summaries), 'mean': {}, 'std': {}}
  for key in METRICS:
    values = np.array([s[key] for s in summaries.values()], np.float64)
    out['mean'][key] = float(values.mean())
    out['std'][key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return out


def format_table(summaries: dict[int, dict[str, Any]], stats: dict[str, Any]) -> str:
  rows = [('seed', 'max val acc', 'best epoch', 'test acc', 'train s')]
  for seed, s in summaries.items():
    rows.append((str(seed), f'{100 * s["max_val_accuracy"]:.2f}%', str(s['best_epoch']),
                 f'{100 * s["test_accuracy"]:.2f}%', f'{s["train_seconds"]:.1f}'))
  m, sd = stats['mean'], stats['std']
  rows.append((f'mean ± std (n={stats["n"]})',
               f'{100 * m["max_val_accuracy"]:.2f} ± {100 * sd["max_val_accuracy"]:.2f}%', '',
               f'{100 * m["test_accuracy"]:.2f} ± {100 * sd["test_accuracy"]:.2f}%',
               f'{m["train_seconds"]:.1f} ± {sd["train_seconds"]:.1f}'))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in rows]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


def run_bench(config, workdir: str, seeds: Sequence[int]) -> dict[str, Any]:
  """Trains (or resumes, or keeps) one run per seed and writes DIR/bench.json."""
  import jax
  from dsconv_jax import fileio, train
  summaries: dict[int, dict[str, Any]] = {}
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
      summary = _normalized(train.train_and_evaluate(seed_config, seed_dir))
    summaries[seed] = summary
  stats = aggregate(summaries)
  result = {'seeds': list(seeds), **stats,
            'runs': {str(seed): s for seed, s in summaries.items()}}
  if jax.process_index() == 0:
    fileio.atomic_write_json(os.path.join(workdir, 'bench.json'), result)
    print(format_table(summaries, stats), flush=True)
  return result


def run(argv) -> None:
  del argv
  config = cli.get_config()
  if not FLAGS.workdir:
    raise cli.UsageError('--workdir=DIR is required (where the per-seed runs go)')
  seeds = parse_seeds(FLAGS.seeds)
  cli.apply_determinism(config)
  cli.initialize_distributed()
  run_bench(config, FLAGS.workdir, seeds)


if __name__ == '__main__':
  cli.main(run)
