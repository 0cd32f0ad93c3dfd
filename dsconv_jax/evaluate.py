"""Evaluates a finished run per class: `python -m dsconv_jax.evaluate --workdir=DIR`.

Without `--dataset` it evaluates the run's own test split (its config's dataset, loaded as training
loaded it), which reproduces the run's `test_accuracy`. `--dataset=folder:ROOT` evaluates another
image folder with the same classes: ROOT/test/<class>/<image> when ROOT has a test/ folder, else
ROOT/<class>/<image>, decoded as the run decoded its images (grey or RGB as the run's channels,
resized to its image size). Another tfds name works as well when its classes are the run's.

Prints the accuracy, the per-class accuracy and the most confused pairs (markdown tables), and
writes a labelled confusion matrix: `--out`, by default DIR/confusion.png for the run's own test
split (what training wrote) and DIR/confusion-<dataset name>.png for another dataset. A workdir
without a finished run, a dataset whose classes differ from the run's and an unreadable image are
one-line errors with exit status 1; command-line mistakes exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Sequence

import numpy as np

from dsconv_jax import confusion
from dsconv_jax import data as data_lib
from dsconv_jax.errors import UsageError, UserError, run_cli

USAGE = ('python -m dsconv_jax.evaluate --workdir=DIR [--dataset=folder:ROOT] [--out=PNG] '
         '[--tta_flip] [--tta_translate=T]')


def load_split(run, dataset: str | None = None) -> tuple[data_lib.Split, str]:
  """(the split to evaluate, its source): the run's test split, or `dataset`'s (see above)."""
  if not dataset:
    own = run.dataset()
    return own.test, own.source
  from dsconv_jax import inference
  if dataset.startswith('folder:'):
    root = os.path.abspath(os.path.expanduser(dataset[len('folder:'):]))
    if not os.path.isdir(root):
      raise UserError(f'dataset folder {root!r} does not exist' if not os.path.exists(root) else
                      f'dataset folder {root!r} is a file, not a folder')
    split_dir = os.path.join(root, 'test') if os.path.isdir(os.path.join(root, 'test')) else root
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith('.'))
    if not classes:
      raise UserError(f'{split_dir!r} has no class folders; expected {split_dir}/<class>/<image>')
    inference.check_classes(classes, run.class_names, f'folder:{split_dir}')
    paths, labels = [], []
    for label, name in enumerate(classes):
      folder = os.path.join(split_dir, name)
      names = sorted(f for f in os.listdir(folder)
                     if f.lower().endswith(data_lib.IMAGE_EXTENSIONS) and not f.startswith('.'))
      paths += [os.path.join(folder, f) for f in names]
      labels += [label] * len(names)
    if not paths:
      raise UserError(f'the class folders of {split_dir!r} hold no images')
    split = data_lib.Split(run.load_images(paths), np.asarray(labels, np.int32))
    return split, f'folder:{split_dir}'
  h, w, _ = run.image_shape
  other = data_lib.load_dataset(dataset, run.config.data_dir, run.config.cache_dir,
                                h if h == w else 0)
  inference.check_classes(other.class_names, run.class_names, other.source)
  if tuple(other.image_shape) != run.image_shape:
    raise UserError(f'the images of {other.source} are {"x".join(map(str, other.image_shape))}, '
                    f'the run\'s {"x".join(map(str, run.image_shape))}')
  return other.test, other.source


def evaluate(run, dataset: str | None = None, batch_size: int = 256, tta_flip: bool = False,
             tta_translate: int = 0) -> dict[str, Any]:
  """Evaluates `run` on its test split or `dataset`'s: matrix, accuracy, per-class accuracy
  (with test-time augmentation as `tta_flip` / `tta_translate` say, as in training's config)."""
  split, source = load_split(run, dataset)
  predicted = run.logits(split.images, batch_size=batch_size, tta_flip=tta_flip,
                         tta_translate=tta_translate).argmax(-1)
  matrix = confusion.from_predictions(split.labels, predicted, run.num_classes)
  # Another dataset is its test split when it has one (a tfds name, ROOT/test/), else all of it.
  own = not dataset
  description = (f'the test split of {source}' if own or not source.startswith('folder:')
                 else source)
  return {'matrix': matrix, 'source': source, 'own_test_split': own,
          'tta': _tta_name(tta_flip, tta_translate), 'tta_flip': bool(tta_flip),
          'tta_translate': int(tta_translate),
          'description': description, 'examples': int(matrix.sum()),
          'correct': int(np.trace(matrix)), 'accuracy': confusion.accuracy(matrix),
          'per_class': confusion.per_class_accuracy(matrix, run.class_names)}


def _tta_name(tta_flip: bool, tta_translate: int) -> str:
  views = (['flip'] if tta_flip else []) + ([f'translate {tta_translate}'] if tta_translate else [])
  return ' + '.join(views)


def default_out(workdir: str, dataset: str | None) -> str:
  if not dataset:
    return os.path.join(workdir, 'confusion.png')
  name = os.path.basename(os.path.normpath(dataset.split(':', 1)[-1])) or 'dataset'
  return os.path.join(workdir, f'confusion-{re.sub(r"[^A-Za-z0-9._-]+", "_", name)}.png')


def report(run, result: dict[str, Any], pairs: int) -> str:
  """The printed report: accuracy (and the run's recorded one), then the markdown tables."""
  lines = [f'{result["description"]}: {result["examples"]} images, run {run.workdir} (epoch '
           f'{run.epoch}{", EMA weights" if run.ema else ""})',
           f'accuracy {100 * result["accuracy"]:.2f}% ({result["correct"]}/{result["examples"]})']
  # The run's figure for the same views: its multi-crop one only with the run's own flip/shift.
  flip, translate = result['tta_flip'], result['tta_translate']
  if not translate:
    recorded = 'test_accuracy_tta_flip' if flip else 'test_accuracy'
  elif (flip == bool(run.config.get('tta_flip', False))
        and translate == int(run.config.get('tta_translate', 0) or 0)):
    recorded = 'test_accuracy_tta_multicrop'
  else:
    recorded = None
  if result['tta']:
    lines[-1] += f' with test-time augmentation ({result["tta"]})'
  if result['own_test_split'] and recorded in run.summary:
    lines[-1] += f'; the run recorded {100 * run.summary[recorded]:.2f}%'
  tables = confusion.markdown(result['matrix'], run.class_names, pairs)
  matrix = result['matrix']
  confused = int(np.count_nonzero(matrix) - np.count_nonzero(np.diag(matrix)))
  if confused > pairs:
    tables += (f'\n(the {pairs} most confused of {confused} confused pairs; --pairs={confused} '
               'lists them all)\n')
  return '\n'.join(lines) + '\n\n' + tables


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes are `UsageError`s: one line on stderr and exit status 2."""

  def error(self, message):
    raise UsageError(f'{message}; usage: {USAGE}')


def main(argv: Sequence[str] | None = None) -> None:
  parser = _ArgumentParser(
      prog='python -m dsconv_jax.evaluate', usage=USAGE,
      description='Evaluates a finished run on its test split or another dataset with the same '
      'classes: accuracy, per-class accuracy, the most confused pairs, and a confusion matrix PNG.')
  parser.add_argument('--workdir', required=True, metavar='DIR',
                      help='the workdir of a finished dsconv_jax.main run')
  parser.add_argument('--dataset', default=None, metavar='SOURCE',
                      help="folder:ROOT (ROOT/test/<class>/ or ROOT/<class>/) or a tfds name; "
                      "default: the run's own test split")
  parser.add_argument('--out', default=None, metavar='PNG',
                      help='the confusion matrix PNG (default: in the workdir)')
  parser.add_argument('--pairs', type=int, default=5, metavar='N',
                      help='most confused pairs listed (default 5)')
  parser.add_argument('--tta_flip', action='store_true',
                      help="average each image's and its mirror's logits")
  parser.add_argument('--tta_translate', type=int, default=0, metavar='T',
                      help='multi-crop: also the image shifted T pixels up-left and down-right '
                      '(airbench: 1; default 0, off)')
  parser.add_argument('--batch_size', type=int, default=256, metavar='N',
                      help='images per compiled batch (default 256)')

  def body():
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.pairs < 0 or not 0 <= args.tta_translate <= 8:
      raise UsageError('--batch_size must be at least 1, --pairs at least 0 and --tta_translate '
                       'in 0..8')
    from dsconv_jax import inference  # Here: argument mistakes are reported without JAX.
    run = inference.load_run(args.workdir)
    out = args.out or default_out(args.workdir, args.dataset)
    inference.check_writable(out, '--out')
    result = evaluate(run, args.dataset, args.batch_size, args.tta_flip, args.tta_translate)
    print(report(run, result, args.pairs), end='', flush=True)
    name = os.path.basename(os.path.normpath(result['source'].split(':', 1)[-1]))
    try:
      confusion.plot_confusion(result['matrix'], run.class_names, out,
                               title=f'{run.config.model} on {name}: accuracy '
                               f'{100 * result["accuracy"]:.2f}%')
    except OSError as e:
      raise UserError(f'cannot write --out={out} ({e.strerror or e})') from None
    print(f'wrote {out}')

  run_cli(body)


if __name__ == '__main__':
  main()
