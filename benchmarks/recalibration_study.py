"""Which images should PreciseBN's statistics come from? A finished run's final weights, evaluated
with BatchNorm statistics recomputed over training batches augmented in several ways.

    python benchmarks/recalibration_study.py --workdir=DIR [--augment='train;none;flip;crop,flip']
        [--batches=N] [--dataset=folder:ROOT] [--json=PATH] > table.md

A run with `config.bn_recalibrate_batches` evaluates its weights (the EMA's when it keeps one)
with statistics recomputed over that many training batches, augmented as training augments them
(`config.bn_recalibrate_augment='train'`). The test split is not augmented, so with cutout in
the recipe the statistics describe images with a square blanked that evaluation never sees. This
script restores the run's last checkpoint once and, for each `;`-separated value of
`bn_recalibrate_augment`, recomputes the statistics (same seeded batches, `--batches` of them:
the run's own number by default) and evaluates the whole test split: loss, accuracy and flip TTA.
It also evaluates the checkpoint's moving averages (the statistics of the live weights, what a
run without recalibration would use). Nothing is trained and nothing in DIR is written; the
'train' row with the run's batch count reproduces its summary.json `test_accuracy` and its last
validation loss (metrics.jsonl), which the table checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def study(workdir: str, specs: list[str], batches: int = 0, dataset: str = '') -> dict:
  """The rows of the study (see the module docstring) and what they were measured on."""
  import numpy as np
  from dsconv_jax import checkpoint as checkpoint_lib
  from dsconv_jax import experiment, fileio, inference, reporting, steps
  from dsconv_jax.errors import UserError

  summary = inference.read_summary(workdir)
  config = inference.config_of(summary)
  if dataset:
    config.dataset = dataset
  run_batches = int(config.get('bn_recalibrate_batches', 0) or 0)
  batches = batches or run_batches
  if batches <= 0:
    raise UserError(f'{workdir!r} trained without bn_recalibrate_batches; give --batches=N')
  data = experiment.load_data(config)
  base = experiment.create_experiment(config, data)
  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    restored = checkpoints.restore_latest(base.state)
  finally:
    checkpoints.close()
  if restored is None:
    raise UserError(f'workdir {workdir!r} holds no checkpoint')
  epoch, state = restored
  test = base.put_split(data.dataset.test)
  accuracy = lambda fn, st: float(steps.host_value(fn(st, *test)['accuracy']))
  loss = lambda fn, st: float(steps.host_value(fn(st, *test)['loss']))

  rows = [{'statistics': 'moving averages (live weights)', 'batches': 0,
           'test_loss': loss(base.evaluate, state), 'test_accuracy': accuracy(base.evaluate, state),
           'test_accuracy_tta_flip': accuracy(base.evaluate_tta_flip, state)}]
  for spec in specs:
    variant = config.copy_and_resolve_references()
    variant.bn_recalibrate_augment = spec
    variant.bn_recalibrate_batches = batches
    exp = experiment.create_experiment(variant, data)
    evaluated = exp.eval_state(state, epoch)
    rows.append({'statistics': f'recomputed, augment {spec!r} '
                               f'({",".join(experiment.recalibrate_augment(variant)) or "none"})',
                 'bn_recalibrate_augment': spec, 'batches': batches,
                 'test_loss': loss(exp.evaluate, evaluated),
                 'test_accuracy': accuracy(exp.evaluate, evaluated),
                 'test_accuracy_tta_flip': accuracy(exp.evaluate_tta_flip, evaluated)})
  reproduced = None
  if 'train' in specs and batches == run_batches:
    # The run's last validation was the whole test split unless it validated on a subset.
    row = next(r for r in rows if r.get('bn_recalibrate_augment') == 'train')
    last = fileio.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[-1:]
    same_loss = (not last or config.eval_examples
                 or bool(np.isclose(row['test_loss'], last[0]['val_loss'], rtol=1e-5)))
    reproduced = bool(np.isclose(row['test_accuracy'], summary['test_accuracy'], atol=1e-6)
                      and same_loss)
  return {'workdir': workdir, 'epoch': int(epoch), 'augment': config.augment,
          'ema': state.ema_params is not None, 'run_test_accuracy': summary['test_accuracy'],
          'reproduces_run': reproduced, 'test_examples': len(data.dataset.test.labels),
          'device': reporting.device_description(), 'versions': reporting.versions(),
          'rows': rows}


def table(result: dict) -> str:
  pct = lambda v: f'{100 * v:.2f}%'
  lines = [f'Run {result["workdir"]} (epoch {result["epoch"]}, training augment '
           f'{result["augment"]!r}, EMA weights: {result["ema"]}), '
           f'{result["test_examples"]} test images; its summary.json: '
           f'{pct(result["run_test_accuracy"])} test',
           '', '| statistics | batches | test loss | test | flip TTA |',
           '| --- | ---: | ---: | ---: | ---: |']
  for r in result['rows']:
    lines.append(f'| {r["statistics"]} | {r["batches"]} | {r["test_loss"]:.4f} | '
                 f'{pct(r["test_accuracy"])} | '
                 f'{pct(r["test_accuracy_tta_flip"])} |')
  if result['reproduces_run'] is not None:
    lines += ['', 'The \'train\' row reproduces the run\'s test_accuracy: '
              + ('yes' if result['reproduces_run'] else 'NO')]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--augment', default='train;none;flip;crop,flip',
                      help="';'-separated values of config.bn_recalibrate_augment")
  parser.add_argument('--batches', type=int, default=0,
                      help="training batches per recomputation (0: the run's own)")
  parser.add_argument('--dataset', default='', help="the run's dataset elsewhere (folder:ROOT)")
  parser.add_argument('--json', default='', help='also write the result as JSON here')
  args = parser.parse_args(argv)
  from dsconv_jax import fileio
  from dsconv_jax.errors import run_cli

  def run():
    specs = [s.strip() for s in args.augment.split(';')]
    result = study(args.workdir, specs, args.batches, args.dataset)
    print(table(result))
    if args.json:
      fileio.atomic_write_json(args.json, result)

  run_cli(run)
  return 0


if __name__ == '__main__':
  sys.exit(main())
