"""Classifies images with a finished run: `python -m dsconv_jax.predict --workdir=DIR PATH ...`.

Each PATH is an image file or a folder, searched recursively for image files. Images are decoded
as training decoded its images (`inference.Run.load_images`: the same mode rules, grey or RGB as
the run's channels, resized to the run's image size), and classified with the weights the run
evaluated. Per image it prints the `--top_k` classes with their probabilities, or with `--json`
one JSON object per line: `path`, `top_k` ([{"class", "probability"}, ...], most probable first)
and `probabilities` ({class: probability} for every class, in class-id order).

A workdir without a finished run, a missing path or an unreadable image is a one-line error with
exit status 1; command-line mistakes exit with status 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import numpy as np

from dsconv_jax.errors import UsageError, run_cli

USAGE = ('python -m dsconv_jax.predict --workdir=DIR [--top_k=K] [--json] [--batch_size=N] '
         'PATH [PATH ...]')
# Images decoded and classified at a time, so that large folders need bounded memory.
CHUNK = 4096


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes are `UsageError`s: one line on stderr and exit status 2."""

  def error(self, message):
    raise UsageError(f'{message}; usage: {USAGE}')


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
  """The `k` most probable classes of one image, most probable first (ties: lower class id)."""
  order = np.argsort(-probabilities, kind='stable')[:k]
  return [{'class': class_names[i], 'probability': float(probabilities[i])} for i in order]


def format_line(path: str, best: Sequence[dict[str, Any]]) -> str:
  """e.g. 'img/0001.png  cat 91.20%  dog 6.10%  frog 2.70%'."""
  return path + '  ' + '  '.join(f'{c["class"]} {100 * c["probability"]:.2f}%' for c in best)


def json_record(path: str, probabilities: np.ndarray, class_names: Sequence[str],
                k: int) -> dict[str, Any]:
  # float() of a float32 prints its shortest repr, which reads back to the same float32.
  return {'path': path, 'top_k': top_k(probabilities, class_names, k),
          'probabilities': {name: float(p) for name, p in zip(class_names, probabilities)}}


def predict_paths(run, paths: Sequence[str], k: int, as_json: bool, batch_size: int,
                  out=None) -> int:
  """Prints the predictions of `paths` (files, after `inference.find_images`); returns the count."""
  import sys
  out = out or sys.stdout
  for start in range(0, len(paths), CHUNK):
    chunk = paths[start:start + CHUNK]
    probabilities = run.predict(run.load_images(chunk), batch_size=batch_size)
    for path, p in zip(chunk, probabilities):
      if as_json:
        print(json.dumps(json_record(path, p, run.class_names, k)), file=out)
      else:
        print(format_line(path, top_k(p, run.class_names, k)), file=out)
    out.flush()
  return len(paths)


def main(argv: Sequence[str] | None = None) -> None:
  parser = _ArgumentParser(
      prog='python -m dsconv_jax.predict', usage=USAGE,
      description='Classifies image files (or folders of them, recursively) with the finished run '
      'in --workdir: the top classes and their probabilities per image.')
  parser.add_argument('paths', nargs='+', metavar='PATH', help='image files or folders')
  parser.add_argument('--workdir', required=True, metavar='DIR',
                      help='the workdir of a finished dsconv_jax.main run')
  parser.add_argument('--top_k', type=int, default=3, metavar='K',
                      help='classes shown per image (default 3)')
  parser.add_argument('--json', action='store_true',
                      help='one JSON object per image: path, top_k, probabilities')
  parser.add_argument('--batch_size', type=int, default=256, metavar='N',
                      help='images per compiled batch (default 256)')

  def body():
    args = parser.parse_args(argv)
    if args.top_k < 1:
      raise UsageError(f'--top_k must be at least 1, got {args.top_k}')
    if args.batch_size < 1:
      raise UsageError(f'--batch_size must be at least 1, got {args.batch_size}')
    # Imported here: argument mistakes are reported without starting JAX.
    from dsconv_jax import inference
    paths = inference.find_images(args.paths)
    run = inference.load_run(args.workdir)
    predict_paths(run, paths, min(args.top_k, run.num_classes), args.json, args.batch_size)

  run_cli(body)


if __name__ == '__main__':
  main()
