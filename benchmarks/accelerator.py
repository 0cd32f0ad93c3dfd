"""Every accelerator measurement the open issues ask for, in one call (benchmarks/accelerator.sh).

    bash benchmarks/accelerator.sh --data=.data/cifar10-jpeg [--out=$OUT]   # on the GPU machine
    bash benchmarks/accelerator.sh --smoke --out=/tmp/acc                   # anywhere, ~2 minutes

In order, each timed (wall seconds, start-up and compilation included):
1. `throughput` of Model 3 against PyTorch (when torch is installed) for the depthwise forms
   (auto, grouped, shifted) and float32/bfloat16 -> throughput.json;
2. Model 3's source recipe, 50 epochs on the image-folder copy of CIFAR-10 (the source took
   1,967 s; the product's goal is under 20 s of training) -> model3-summary.json and
   model3-metrics.jsonl;
3. the project's own model, `bench` over seeds 0-4, 50 epochs each (goal: mean final test
   accuracy 92%) -> bench.json;
then accelerator.json: the device, versions, each step's command, wall seconds and exit status, and
the headline figures. Everything goes to --out (at most 8 files, no deeper folders: what the
device tool brings back); the runs' workdirs (checkpoints) stay in --workdir.

TensorFlow is never needed: the data is a folder dataset (`folder:ROOT`); ml-collections, if
missing on the machine, travels as a wheel (see the device notes). `--smoke` runs the same
commands with a few steps, 1 epoch, one throughput variant, a generated 3-class image folder and
one seed, so that the script is known to work before a GPU is ever seen
(tests/test_accelerator.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generated_folder(root: str) -> str:
  """A small 3-class image folder (the smoke run's dataset)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 8)):
    for c, name in enumerate(('cat', 'dog', 'frog')):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(n):
        img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
        img[..., c] += 160
        Image.fromarray(img).save(os.path.join(folder, f'{i:04d}.png'))
  return root


def _run(name: str, args: list[str], log, steps: list[dict]) -> dict:
  """Runs `python -m ARGS`, appending its output to `log`; records its wall time and status."""
  command = [sys.executable, '-m', *args]
  print(f'== {name}: {" ".join(args)}', file=log, flush=True)
  t0 = time.perf_counter()
  out = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  step = {'name': name, 'command': 'python -m ' + ' '.join(args), 'exit_status': out.returncode,
          'wall_seconds': round(time.perf_counter() - t0, 2)}
  steps.append(step)
  print(f'{name}: exit {out.returncode}, {step["wall_seconds"]} s', flush=True)
  return step


def _copy(src: str, dst: str) -> bool:
  if not os.path.exists(src):
    return False
  with open(src, 'rb') as f, open(dst, 'wb') as g:
    g.write(f.read())
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.environ.get('OUT', 'accelerator-out'),
                      help='where the results go (default: $OUT)')
  parser.add_argument('--data', default='', help='ROOT of the CIFAR-10 image-folder copy')
  parser.add_argument('--workdir', default='', help='the runs\' workdirs (default: OUT/../runs)')
  parser.add_argument('--smoke', action='store_true', help='a few steps of each, generated data')
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  workdir = os.path.abspath(args.workdir or os.path.join(os.path.dirname(out), 'accelerator-runs'))
  os.makedirs(workdir, exist_ok=True)
  if args.smoke:
    data = _generated_folder(os.path.join(workdir, 'images'))
  elif args.data:
    data = os.path.abspath(args.data)
  else:
    parser.error('--data=ROOT (the CIFAR-10 image folder) is required unless --smoke')

  dataset = [f'--config.dataset=folder:{data}', '--config.cache_dir=' + os.path.join(workdir,
                                                                                    'cache')]
  short = ['--config.num_epochs=1', '--config.batch_size=16'] if args.smoke else []
  has_torch = importlib.util.find_spec('torch') is not None
  steps: list[dict] = []
  with open(os.path.join(out, 'log.txt'), 'w') as log:
    throughput = ['dsconv_jax.throughput', '--config=configs/model3.py', '--json']
    throughput += (['--depthwise_impl=auto', '--compute_dtype=bfloat16', '--steps=2',
                    '--chunks=1'] if args.smoke else
                   ['--depthwise_impl=auto,grouped,shifted', '--compute_dtype=float32,bfloat16',
                    '--steps=50', '--chunks=5'])
    if has_torch:
      throughput.append('--peer=pytorch')
    with open(os.path.join(out, 'throughput.json'), 'w') as f:
      print(f'== throughput: {" ".join(throughput)}', file=log, flush=True)
      t0 = time.perf_counter()
      done = subprocess.run([sys.executable, '-m', *throughput], cwd=ROOT, stdout=f, stderr=log)
      steps.append({'name': 'throughput', 'command': 'python -m ' + ' '.join(throughput),
                    'exit_status': done.returncode,
                    'wall_seconds': round(time.perf_counter() - t0, 2)})

    model3_dir = os.path.join(workdir, 'model3-50ep')
    _run('model3', ['dsconv_jax.main', '--config=configs/model3.py', f'--workdir={model3_dir}',
                    '--quiet', *dataset, *short], log, steps)
    _copy(os.path.join(model3_dir, 'summary.json'), os.path.join(out, 'model3-summary.json'))
    _copy(os.path.join(model3_dir, 'metrics.jsonl'), os.path.join(out, 'model3-metrics.jsonl'))

    bench_dir = os.path.join(workdir, 'bench-dsresnet')
    seeds = '0' if args.smoke else '0,1,2,3,4'
    _run('bench_dsresnet', ['dsconv_jax.bench', '--config=configs/dsresnet.py',
                            f'--seeds={seeds}', f'--workdir={bench_dir}', *dataset, *short],
         log, steps)
    _copy(os.path.join(bench_dir, 'bench.json'), os.path.join(out, 'bench.json'))

  result = {'smoke': args.smoke, 'data': data, 'steps': steps, 'peer': has_torch}
  result['headline'] = _headline(out)
  with open(os.path.join(out, 'accelerator.json'), 'w') as f:
    json.dump(result, f, indent=2)
  failed = [s['name'] for s in steps if s['exit_status']]
  print(f'wrote {out}/accelerator.json' + (f'; failed: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


def _headline(out: str) -> dict:
  """The figures the issues ask for, read back from what the steps wrote."""
  headline = {}
  load = lambda name: json.load(open(os.path.join(out, name))) if os.path.exists(
      os.path.join(out, name)) and os.path.getsize(os.path.join(out, name)) else None
  throughput = load('throughput.json')
  if throughput:
    headline['device'] = throughput['device']
    headline['throughput'] = {
        f'{v["depthwise_impl"]}/{v["compute_dtype"]}': round(v['train_images_per_second'])
        for v in throughput['variants']}
    if 'ratio' in throughput:
      headline['ratio_to_pytorch'] = throughput['ratio']
  model3 = load('model3-summary.json')
  if model3:
    headline['model3'] = {k: model3[k] for k in ('train_seconds', 'max_val_accuracy',
                                                  'test_accuracy', 'epochs')}
    headline['model3']['source_seconds'] = 1967
  bench = load('bench.json')
  if bench:
    headline['dsresnet'] = {'n': bench['n'], 'mean': bench['mean'], 'std': bench['std']}
  return headline


if __name__ == '__main__':
  sys.exit(main())
