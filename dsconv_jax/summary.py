"""Shows a model before training: `python -m dsconv_jax.summary --config=configs/model3.py [--json]`.

Per layer: output size, parameters, multiply-accumulates and activation size per image, receptive
field and jump, computed from the real module (`dsconv_jax.analysis`); Keras-style totals; advice on
the output's receptive field against the image (advice only: it never fails the command); with
`--config.fit_params=N`, the width multiplier chosen for that budget (`dsconv_jax.budget`); and the
configured constraints, each violation with its reason. Exits 1, with the reasons on stderr, when a
constraint is violated.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from dsconv_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.flag(flags.DEFINE_bool, 'json', False, 'Print one JSON object instead of the table.')
cli.flag(flags.DEFINE_string, 'input_shape', '',
                    'H,W,C of the input (default: 32,32,3, or config.image_size if set).')
cli.flag(flags.DEFINE_integer, 'num_classes', 10, 'Number of classes of the output layer.')


def input_shape(config) -> tuple[int, int, int]:
  if FLAGS.input_shape:
    try:
      h, w, c = (int(v) for v in FLAGS.input_shape.split(','))
    except ValueError:
      raise cli.UsageError(f'--input_shape must be H,W,C, got {FLAGS.input_shape!r}') from None
    return h, w, c
  size = int(config.get('image_size', 0) or 32)
  return size, size, 3


def run(argv) -> None:
  del argv
  config = cli.get_config()
  from dsconv_jax import analysis, budget, experiment
  shape = input_shape(config)
  description = experiment.describe_model(config, shape, FLAGS.num_classes)
  config, report, width = description.config, description.report, description.width
  if FLAGS.json:
    print(json.dumps({'model': config.model, 'width_multiplier': width['width_multiplier'],
                      'fit_params': width['fit_params'], **report.to_json()}, indent=2))
  else:
    print(analysis.format_table(report, f'{config.model} on {shape[0]}x{shape[1]}x{shape[2]}'))
    if width['fit_params']:
      print(budget.describe(width))
    if not report.violations:
      print('Constraints: all hold.')
  if report.violations:
    print(f'error: model {config.model!r} violates the configured constraints:', file=sys.stderr)
    for v in report.violations:
      print(f'  - {v}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  cli.main(run)
