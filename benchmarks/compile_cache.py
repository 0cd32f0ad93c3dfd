"""What the persistent compilation cache saves: a first run against a second, side by side.

    python benchmarks/compile_cache.py --dataset=folder:ROOT --out=results/NAME/compile_cache.json

For each config (Model 3 and DS-ResNet by default) two runs of one epoch train into new workdirs
with one compilation cache that starts empty: the first compiles and writes the cache, the second
loads its programs from it. Each run is a real `python -m dsconv_jax.main` process; reported per
run: `compile_seconds` (summary.json: the epoch and the evaluation, compiled or loaded), the
programs loaded and compiled (summary.json's `compilation_cache`), and the wall seconds from the
process's start to its first finished epoch (metrics.jsonl's first line). The decoded dataset is
read from `--data_cache` (the product's dataset cache, filled by a warm-up run when it is empty),
so that both runs read it alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(config: str, workdir: str, common: list[str], cache: str) -> dict:
  """One `main` process: seconds to its first finished epoch, and its summary's figures."""
  command = [sys.executable, '-m', 'dsconv_jax.main', f'--config={config}', f'--workdir={workdir}',
             f'--config.compilation_cache_dir={cache}', '--quiet', *common]
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  metrics = os.path.join(workdir, 'metrics.jsonl')
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  first_epoch = None
  while process.poll() is None:
    if first_epoch is None and os.path.exists(metrics) and os.path.getsize(metrics):
      first_epoch = time.perf_counter() - start
    time.sleep(0.05)
  err = process.stderr.read()
  if process.returncode != 0:
    raise SystemExit(f'{" ".join(command)} failed:\n{err[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(metrics) as f:
    row = json.loads(f.readline())
  return {'seconds_to_first_epoch': first_epoch, 'compile_seconds': summary['compile_seconds'],
          'epoch_1_seconds': row['epoch_seconds'], 'compilation_cache': summary['compilation_cache'],
          'process_seconds': time.perf_counter() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', required=True, help='e.g. folder:/path/to/cifar10-jpeg')
  parser.add_argument('--configs', default='configs/model3.py,configs/dsresnet.py')
  parser.add_argument('--train_examples', type=int, default=2000)
  parser.add_argument('--eval_examples', type=int, default=1000)
  parser.add_argument('--data_cache', default='',
                      help='config.cache_dir of the runs (default: a new folder, filled first)')
  parser.add_argument('--out', required=True, help='the JSON written')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix='compile-cache-bench-') as tmp:
    common = [f'--config.dataset={args.dataset}',
              f'--config.cache_dir={args.data_cache or tmp + "/data"}',
              '--config.num_epochs=1', f'--config.train_examples={args.train_examples}',
              f'--config.eval_examples={args.eval_examples}', '--config.holdout=0']
    configs = args.configs.split(',')
    if not args.data_cache:
      _run(configs[0], f'{tmp}/warm-up', common, '')  # Decodes and caches the dataset.
    results = {}
    for config in configs:
      name = os.path.splitext(os.path.basename(config))[0]
      cache = f'{tmp}/cache-{name}'
      results[name] = {label: _run(config, f'{tmp}/{name}-{label}', common, cache)
                       for label in ('first', 'second')}
      print(name, json.dumps(results[name]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'command': ' '.join(sys.argv), 'train_examples': args.train_examples,
               'eval_examples': args.eval_examples, 'results': results}, f, indent=2)
    f.write('\n')


if __name__ == '__main__':
  main()
