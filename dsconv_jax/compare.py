"""Compares finished runs: `python -m dsconv_jax.compare DIR [DIR ...] --out PATH`.

Each DIR is a workdir of `dsconv_jax.main` (metrics.jsonl and summary.json). Writes PATH, a PNG of
the runs' loss and accuracy curves overlaid (one colour per run, labelled by directory name), and
PATH with a .md suffix, a markdown table of their summaries (parameters, max val accuracy and its
epoch, test accuracy, training time, the late dip of the validation curve), and prints the table.
`--reach=82.93,84.5` adds a column per accuracy (in percent): the first epoch whose validation
accuracy reached it, or "never". A missing DIR or one that is not a finished run is a one-line
error with exit status 1; command-line mistakes exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

from dsconv_jax import fileio
from dsconv_jax import reporting
from dsconv_jax.errors import UsageError, UserError, run_cli

USAGE = 'python -m dsconv_jax.compare DIR [DIR ...] --out PATH [--reach PCT[,PCT...]]'


def load_run(directory: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(metrics rows, summary) of a finished run in `directory`, or a UserError saying what lacks."""
  if not os.path.isdir(directory):
    raise UserError(f'run folder {directory!r} does not exist')
  metrics_path = os.path.join(directory, 'metrics.jsonl')
  if not os.path.isfile(metrics_path):
    raise UserError(f'{directory!r} has no metrics.jsonl; is it a --workdir of dsconv_jax.main?')
  rows = fileio.read_jsonl(metrics_path)
  if not rows:
    raise UserError(f'{metrics_path!r} holds no finished epoch')
  summary_path = os.path.join(directory, 'summary.json')
  if not os.path.isfile(summary_path):
    raise UserError(f'{directory!r} has no summary.json: the run has not finished; run its '
                    'command again to finish it')
  try:
    with open(summary_path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {summary_path!r} ({e})') from None
  return rows, summary


def run_labels(directories: Sequence[str]) -> list[str]:
  """Directory names, with as many parent folders as it takes to tell equal names apart."""
  parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in directories]
  depth = [1] * len(parts)
  while True:
    labels = ['/'.join(p[-k:]) for p, k in zip(parts, depth)]
    clashing = [i for i, label in enumerate(labels)
                if labels.count(label) > 1 and depth[i] < len(parts[i])]
    if not clashing:
      return labels
    for i in clashing:
      depth[i] += 1


def markdown_table(labels: Sequence[str], summaries: Sequence[dict[str, Any]],
                   metrics: Sequence[Sequence[dict[str, Any]]],
                   reach: Sequence[float] = ()) -> str:
  """One row per run: what validated it (`val_split`), parameters, max val accuracy and its epoch, test accuracy, training time,
  the late dip (`reporting.late_dip`: how far validation accuracy sagged in the last third
  below its best before, in points; a healthy curve has 0 or a fraction of a point), and for each
  accuracy of `reach` (in percent) the first epoch that reached it, or "never"."""

  def get(summary, key, fmt):
    value = summary.get(key)
    return '-' if value is None else fmt(value)

  lines = ['| run | val split | params | max val acc | best epoch | test acc | train s | epochs '
           '| late dip |' + ''.join(f' first >= {pct:g}% |' for pct in reach),
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |'
           + ' ---: |' * len(reach)]
  for label, s, rows in zip(labels, summaries, metrics):
    dip = reporting.late_dip(rows)
    cells = [label.replace('|', '\\|'),
             reporting.val_split_of(s),
             get(s, 'params_total', lambda v: f'{v:,}'),
             get(s, 'max_val_accuracy', lambda v: f'{100 * v:.2f}%'),
             get(s, 'best_epoch', str),
             get(s, 'test_accuracy', lambda v: f'{100 * v:.2f}%'),
             get(s, 'train_seconds', lambda v: f'{v:.1f}'),
             get(s, 'epochs', str),
             '-' if dip is None else f'{100 * dip:.2f}']
    for pct in reach:
      epoch = reporting.first_epoch_reaching(rows, pct / 100)
      cells.append('never' if epoch is None else str(epoch))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def table_path(out: str) -> str:
  return os.path.splitext(out)[0] + '.md'


def parse_reach(text: str) -> list[float]:
  """'82.93,84.5' -> [82.93, 84.5]: accuracies in percent, each in (0, 100]."""
  values = []
  for part in text.split(','):
    try:
      value = float(part)
    except ValueError:
      raise UsageError(f'--reach={text}: {part.strip()!r} is not a number; give accuracies in '
                       'percent, e.g. --reach=82.93,84.5') from None
    if not 0 < value <= 100:
      raise UsageError(f'--reach={text}: {part.strip()} is not an accuracy in percent (0, 100]')
    values.append(value)
  return values


def compare(directories: Sequence[str], out: str, reach: Sequence[float] = ()) -> dict[str, Any]:
  """Writes the overlaid curves to `out` and the table next to it; returns what was written.

  `out` without an extension gets '.png'. Returns a dict with `png` (the PNG's path),
  `table_path`, `table` (the markdown text), `labels` and `lines` (the number of curves drawn:
  4 per run).
  """
  if not os.path.splitext(out)[1]:
    out += '.png'
  if table_path(out) == out:
    raise UsageError(f'--out={out} would be overwritten by the table; name a .png file')
  runs = [load_run(d) for d in directories]
  labels = run_labels(directories)
  table = markdown_table(labels, [summary for _, summary in runs], [rows for rows, _ in runs],
                         reach)
  with fileio.writing(f'{out!r} and {table_path(out)!r}'):
    lines = reporting.plot_curves(list(zip(labels, [rows for rows, _ in runs])), out,
                                  title=' vs '.join(labels) if len(labels) <= 4 else '',
                                  val_splits=[reporting.val_split_of(s) for _, s in runs])
    fileio.atomic_write_text(table_path(out), table)
  return {'png': out, 'table_path': table_path(out), 'table': table, 'labels': labels,
          'lines': lines}


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes are `UsageError`s: one line on stderr and exit status 2."""

  def error(self, message):
    raise UsageError(f'{message}; usage: {USAGE}')


def main(argv: Sequence[str] | None = None) -> None:
  parser = _ArgumentParser(
      prog='python -m dsconv_jax.compare', usage=USAGE,
      description='Overlays the curves of finished runs (PNG at PATH) and tabulates their '
      'summaries (markdown at PATH with a .md suffix, also printed).')
  parser.add_argument('dirs', nargs='+', metavar='DIR', help='workdirs of dsconv_jax.main')
  parser.add_argument('--out', required=True, metavar='PATH', help='the PNG to write')
  parser.add_argument('--reach', default='', metavar='PCT[,PCT...]',
                      help='accuracies in percent (e.g. 82.93,84.5): a column each with the '
                      'first epoch whose validation accuracy reached it')

  def body():
    args = parser.parse_args(argv)
    result = compare(args.dirs, args.out, parse_reach(args.reach) if args.reach else ())
    print(result['table'], end='')
    print(f'wrote {result["png"]} and {result["table_path"]}')

  run_cli(body)


if __name__ == '__main__':
  main()
