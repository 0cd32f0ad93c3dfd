"""The project's accelerator measurements, in one call (benchmarks/accelerator.sh).

    bash benchmarks/accelerator.sh --data=.data/cifar10-jpeg [--out=$OUT]   # on the GPU machine
    bash benchmarks/accelerator.sh --smoke --out=/tmp/acc                   # anywhere, ~2 minutes
    bash benchmarks/accelerator.sh --data=... --only=bench -- --config.model_kwargs.blocks='(1,1,1)'

In order, each timed (wall seconds, start-up and compilation included):
1. `throughput` of Model 3 against PyTorch (when torch is installed) for the depthwise forms
   (auto, grouped, shifted) and float32/bfloat16 -> throughput.json;
2. Model 3's source recipe, 50 epochs on the image-folder copy of CIFAR-10 (the source took
   1,967 s; the product's goal is under 20 s of training) -> model3-summary.json and
   model3-metrics.jsonl;
3. the project's own model, `bench` over seeds 0-4, 50 epochs each (goal: mean final test
   accuracy 92%) -> bench.json; first its training speed in both depthwise forms, in the
   configuration bench trains (`configs/dsresnet.py` with the overrides below) ->
   throughput-dsresnet.json, and bench trains with the faster form (`bench_depthwise_impl` in
   accelerator.json) unless the overrides name one: XLA's backward pass for grouped
   convolutions is slow on NVIDIA GPUs (jax-ml/jax#13800), where 'auto' means grouped; then, on
   each finished seed, benchmarks/recalibration_study.py (evaluation only: the EMA weights'
   BatchNorm statistics from training-augmented batches, as the runs report, against clean
   ones) -> recalibration.json;
then accelerator.json: the device, versions, each step's command, wall seconds and exit status, and
the headline figures, rewritten after every step, so that a call cut off at its time limit still
brings back what its finished steps measured. Everything goes to --out (at most 8 files, no
deeper folders, so that a remote machine's output folder brings all of it back); the runs'
workdirs (checkpoints) stay in --workdir.

`--only=throughput,model3` and `--only=bench --seeds=0,1` split the work over several calls
where a machine limits a call's time, and `--step_timeout=S` stops any one step after S seconds
(exit status 124 in accelerator.json) and goes on with the next.

Config overrides after `--` (`--config.KEY=VALUE` only) go to the bench step, so that one call
measures a candidate recipe over 5 seeds against `configs/dsresnet.py` unchanged (single-seed
CPU runs cannot separate them): each set of overrides trains in its own workdir
(bench-dsresnet-<hash of the overrides>), and accelerator.json records them.

TensorFlow is never needed: the data is a folder dataset (`folder:ROOT`). A GPU machine whose
image lacks ml-collections and tensorboardX gets them from benchmarks/device_prep.sh (run where
pip works), which puts their wheels in .whl/ and the dataset in .data/; accelerator.sh installs
the wheels when needed, and a module still missing stops the call before any step (exit 1).
`--smoke` runs the same commands with a few steps, 1 epoch, one throughput variant, a generated
3-class image folder and one seed, so that the script is known to work before a GPU is ever seen
(tests/test_accelerator.py).
"""

from __future__ import annotations

import argparse
import hashlib
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


# What every step imports (the device machine's image lacks ml_collections and tensorboardX:
# benchmarks/device_prep.sh brings them as wheels). Checked before any step runs, so that a call
# missing one fails in seconds with one message instead of three tracebacks.
REQUIRED = ('jax', 'flax', 'optax', 'orbax.checkpoint', 'absl', 'ml_collections', 'numpy', 'PIL',
            'tensorboardX')


def _missing_modules() -> list[str]:
  missing = []
  for name in REQUIRED:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  return missing


TIMED_OUT = 124  # A step stopped by --step_timeout, as timeout(1) reports it.
STEPS = ('throughput', 'model3', 'bench')


def _run(name: str, args: list[str], log, steps: list[dict], timeout: float | None = None,
         stdout=None) -> dict:
  """Runs `python -m ARGS`, its output to `stdout` (default `log`) and errors to `log`; records
  its wall time and status (TIMED_OUT when it ran past `timeout` seconds and was stopped)."""
  command = [sys.executable, '-m', *args]
  print(f'== {name}: {" ".join(args)}', file=log, flush=True)
  t0 = time.perf_counter()
  try:
    status = subprocess.run(command, cwd=ROOT, stdout=stdout or log, stderr=subprocess.STDOUT
                            if stdout is None else log, timeout=timeout).returncode
  except subprocess.TimeoutExpired:  # subprocess.run has killed it.
    status = TIMED_OUT
    print(f'== {name}: stopped after --step_timeout={timeout:g} s', file=log, flush=True)
  step = {'name': name, 'command': 'python -m ' + ' '.join(args), 'exit_status': status,
          'wall_seconds': round(time.perf_counter() - t0, 2)}
  steps.append(step)
  print(f'{name}: exit {status}, {step["wall_seconds"]} s', flush=True)
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
  parser.add_argument('--only', default=','.join(STEPS),
                      help=f'the steps to run, comma-separated, of {",".join(STEPS)} (default: all)')
  parser.add_argument('--seeds', default='', help='bench\'s seeds (default 0,1,2,3,4; smoke: 0)')
  parser.add_argument('--step_timeout', type=float, default=0,
                      help='stop a step after this many seconds and go on (0: no limit)')
  parser.add_argument('overrides', nargs='*', metavar='--config.KEY=VALUE',
                      help='after --: config overrides for the bench step')
  args = parser.parse_args(argv)
  bad = [o for o in args.overrides if not (o.startswith('--config.') and '=' in o)]
  if bad:
    parser.error(f'after -- only --config.KEY=VALUE overrides (for bench) are taken, '
                 f'got {bad[0]!r}')
  only = [s.strip() for s in args.only.split(',') if s.strip()]
  unknown = sorted(set(only) - set(STEPS))
  if unknown or not only:
    parser.error(f'--only takes steps of {",".join(STEPS)}, got {args.only!r}')
  if args.step_timeout < 0:
    parser.error(f'--step_timeout must be >= 0 seconds, got {args.step_timeout:g}')
  timeout = args.step_timeout or None
  missing = _missing_modules()
  if missing:
    print(f'error: {", ".join(missing)} cannot be imported here; on the device machine run '
          'benchmarks/device_prep.sh beforehand (where pip works) and carry .whl with the call '
          '(BENCHMARKS.md, "GPU"); elsewhere pip install -e .', file=sys.stderr)
    return 1
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
  result = {'smoke': args.smoke, 'data': data, 'steps': steps, 'peer': has_torch,
            'bench_overrides': args.overrides}

  def write_result():  # After every step: a call cut off at its limit keeps the steps before.
    result['headline'] = _headline(out)
    if 'dsresnet' in result['headline']:
      result['headline']['dsresnet']['overrides'] = args.overrides
    tmp = os.path.join(out, '.accelerator.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(out, 'accelerator.json'))

  with open(os.path.join(out, 'log.txt'), 'w') as log:
    if 'throughput' in only:
      throughput = ['dsconv_jax.throughput', '--config=configs/model3.py', '--json']
      throughput += (['--depthwise_impl=auto', '--compute_dtype=bfloat16', '--steps=2',
                      '--chunks=1'] if args.smoke else
                     ['--depthwise_impl=auto,grouped,shifted', '--compute_dtype=float32,bfloat16',
                      '--steps=50', '--chunks=5'])
      if has_torch:
        throughput.append('--peer=pytorch')
      with open(os.path.join(out, 'throughput.json'), 'w') as f:
        _run('throughput', throughput, log, steps, timeout, stdout=f)
      write_result()

    if 'model3' in only:
      model3_dir = os.path.join(workdir, 'model3-50ep')
      _run('model3', ['dsconv_jax.main', '--config=configs/model3.py', f'--workdir={model3_dir}',
                      '--quiet', *dataset, *short], log, steps, timeout)
      _copy(os.path.join(model3_dir, 'summary.json'), os.path.join(out, 'model3-summary.json'))
      _copy(os.path.join(model3_dir, 'metrics.jsonl'), os.path.join(out, 'model3-metrics.jsonl'))
      write_result()

    if 'bench' in only:
      bench_dir = os.path.join(workdir, 'bench-dsresnet')
      if args.overrides:  # bench resumes seeds by workdir: another recipe needs its own.
        bench_dir += '-' + hashlib.sha1(' '.join(args.overrides).encode()).hexdigest()[:8]
      seeds = args.seeds or ('0' if args.smoke else '0,1,2,3,4')
      form = []
      if not any(o.startswith('--config.depthwise_impl=') for o in args.overrides):
        # The own model's two depthwise forms, in the configuration bench trains: XLA's
        # grouped-convolution backward pass is slow on NVIDIA GPUs (jax-ml/jax#13800), so 'auto'
        # (grouped off the CPU) may be the slower there. Smoke: one form (the grouped one costs
        # the CPU ~8 s a step and another compilation).
        forms = ['dsconv_jax.throughput', '--config=configs/dsresnet.py', '--json',
                 *args.overrides]
        forms += (['--depthwise_impl=shifted', '--steps=1', '--chunks=1',
                   '--config.batch_size=16'] if args.smoke else
                  ['--depthwise_impl=grouped,shifted', '--steps=50', '--chunks=3'])
        with open(os.path.join(out, 'throughput-dsresnet.json'), 'w') as f:
          _run('throughput_dsresnet', forms, log, steps, timeout, stdout=f)
        write_result()
        fastest = _fastest_form(out)  # None if the timing failed: bench keeps 'auto'.
        if fastest:
          form = [f'--config.depthwise_impl={fastest}']
          result['bench_depthwise_impl'] = fastest
      _run('bench_dsresnet', ['dsconv_jax.bench', '--config=configs/dsresnet.py',
                              f'--seeds={seeds}', f'--workdir={bench_dir}', *dataset, *short,
                              *args.overrides, *form],
           log, steps, timeout)
      if not _copy(os.path.join(bench_dir, 'bench.json'), os.path.join(out, 'bench.json')):
        result['bench_seeds_finished'] = _finished_seeds(bench_dir)  # Stopped before the end.
      write_result()
      # Evaluation only, on each finished seed: the PreciseBN statistics of the EMA weights from
      # batches augmented as in training (what the runs report) against clean ones.
      studies = []
      for name in sorted(_finished_seeds(bench_dir)):
        path = os.path.join(workdir, f'recalibration-{os.path.basename(bench_dir)}-{name}.json')
        step = _run(f'recalibration_{name}', [
            'benchmarks.recalibration_study', f'--workdir={os.path.join(bench_dir, name)}',
            '--augment=train;none', f'--json={path}'], log, steps, timeout)
        if not step['exit_status'] and os.path.exists(path):
          with open(path) as f:
            studies.append(json.load(f))
      if studies:
        tmp = os.path.join(out, '.recalibration.json.tmp')
        with open(tmp, 'w') as f:
          json.dump(studies, f, indent=2)
        os.replace(tmp, os.path.join(out, 'recalibration.json'))
      write_result()

  failed = [s['name'] for s in steps if s['exit_status']]
  print(f'wrote {out}/accelerator.json' + (f'; failed: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


def _finished_seeds(bench_dir: str) -> dict:
  """{seed directory: its test accuracy} for each of bench's runs that wrote a summary."""
  found = {}
  for name in sorted(os.listdir(bench_dir)) if os.path.isdir(bench_dir) else []:
    path = os.path.join(bench_dir, name, 'summary.json')
    if os.path.exists(path):
      with open(path) as f:
        found[name] = json.load(f).get('test_accuracy')
  return found


def _load(out: str, name: str):
  """A JSON file of `out`; None for one a stopped step left missing, empty or cut short."""
  try:
    with open(os.path.join(out, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _fastest_form(out: str) -> str | None:
  """The depthwise form that trained the own model fastest in throughput-dsresnet.json."""
  forms = _load(out, 'throughput-dsresnet.json')
  if not forms or not forms.get('variants'):
    return None
  best = max(forms['variants'], key=lambda v: v['train_images_per_second'])
  return best['depthwise_impl']


def _headline(out: str) -> dict:
  """The figures the issues ask for, read back from what the steps wrote."""
  headline = {}
  load = lambda name: _load(out, name)
  throughput = load('throughput.json')
  if throughput:
    headline['device'] = throughput['device']
    headline['throughput'] = {
        f'{v["depthwise_impl"]}/{v["compute_dtype"]}': round(v['train_images_per_second'])
        for v in throughput['variants']}
    if 'ratio' in throughput:
      headline['ratio_to_pytorch'] = throughput['ratio']
  forms = load('throughput-dsresnet.json')
  if forms:
    headline['dsresnet_forms'] = {v['depthwise_impl']: round(v['train_images_per_second'])
                                  for v in forms['variants']}
  model3 = load('model3-summary.json')
  if model3:
    headline['model3'] = {k: model3[k] for k in ('train_seconds', 'max_val_accuracy',
                                                  'test_accuracy', 'epochs')}
    headline['model3']['source_seconds'] = 1967
  bench = load('bench.json')
  if bench:
    headline['dsresnet'] = {'n': bench['n'], 'mean': bench['mean'], 'std': bench['std']}
  studies = load('recalibration.json')
  if studies:
    # Mean test accuracy over the studied seeds, per source of the recomputed statistics.
    by_augment: dict[str, list[float]] = {}
    for study in studies:
      for row in study['rows']:
        by_augment.setdefault(row.get('bn_recalibrate_augment', 'moving averages'),
                              []).append(row['test_accuracy'])
    headline['recalibration'] = {k: {'n': len(v), 'mean_test_accuracy': sum(v) / len(v)}
                                 for k, v in by_augment.items()}
  return headline


if __name__ == '__main__':
  sys.exit(main())
