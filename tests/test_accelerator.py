"""benchmarks/accelerator.sh --smoke: the first GPU session's one command works on the CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_script_smoke_run_writes_every_result(tmp_path, cli_env):
  out = tmp_path / 'out'
  done = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'accelerator.sh'), '--smoke',
                         f'--out={out}', f'--workdir={tmp_path / "runs"}',
                         '--', '--config.augment=crop', '--config.label_smoothing=0.2'],
                        cwd=ROOT, env={**cli_env, 'PYTHON': sys.executable},
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads((out / 'accelerator.json').read_text())
  assert [s['name'] for s in result['steps']] == [
      'throughput', 'model3', 'throughput_dsresnet', 'bench_dsresnet', 'recalibration_seed_0']
  assert all(s['exit_status'] == 0 and s['wall_seconds'] > 0 for s in result['steps'])
  headline = result['headline']
  assert set(headline['throughput']) == {'auto/bfloat16'}
  # The own model's forms are timed in the configuration bench trains (its overrides), and
  # bench trains with the fastest form timed (the smoke run times only 'shifted').
  forms = json.loads((out / 'throughput-dsresnet.json').read_text())
  assert forms['model'] == 'dsresnet' and set(headline['dsresnet_forms']) == {'shifted'}
  assert '--config.augment=crop' in result['steps'][2]['command']
  assert result['bench_depthwise_impl'] == 'shifted'
  assert headline['model3']['epochs'] == 1 and headline['model3']['source_seconds'] == 1967
  assert headline['dsresnet']['n'] == 1
  # The overrides after -- reach bench's runs (a candidate recipe measured over seeds), in a
  # workdir of their own, and are recorded.
  assert headline['dsresnet']['overrides'] == result['bench_overrides'] == [
      '--config.augment=crop', '--config.label_smoothing=0.2']  # Neither the config's value.
  bench_dirs = [d for d in os.listdir(tmp_path / 'runs') if d.startswith('bench-dsresnet')]
  assert len(bench_dirs) == 1 and bench_dirs[0] != 'bench-dsresnet', bench_dirs
  config = json.loads((tmp_path / 'runs' / bench_dirs[0] / 'seed_0' / 'summary.json').read_text())[
      'config']
  assert (config['augment'], config['label_smoothing'], config['depthwise_impl']) == (
      'crop', 0.2, 'shifted')
  # Each finished seed's recalibration study, whose 'train' row is what the run reported.
  study, = json.loads((out / 'recalibration.json').read_text())
  assert study['reproduces_run'] is True and study['augment'] == 'crop'
  assert [r.get('bn_recalibrate_augment') for r in study['rows']] == [None, 'train', 'none']
  assert {k: v['n'] for k, v in headline['recalibration'].items()} == {
      'moving averages': 1, 'train': 1, 'none': 1}
  # What comes back from the device: at most 8 plain files, no folders.
  names = sorted(os.listdir(out))
  assert names == ['accelerator.json', 'bench.json', 'log.txt', 'model3-metrics.jsonl',
                   'model3-summary.json', 'recalibration.json', 'throughput-dsresnet.json',
                   'throughput.json']


def test_bench_takes_the_depthwise_form_that_trained_fastest(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import accelerator  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  assert accelerator._fastest_form(str(tmp_path)) is None  # Not timed in this call: 'auto'.
  rows = [{'depthwise_impl': 'grouped', 'train_images_per_second': 9000.0},
          {'depthwise_impl': 'shifted', 'train_images_per_second': 21000.0}]
  (tmp_path / 'throughput-dsresnet.json').write_text(json.dumps({'variants': rows}))
  assert accelerator._fastest_form(str(tmp_path)) == 'shifted'
  rows[0]['train_images_per_second'] = 30000.0
  (tmp_path / 'throughput-dsresnet.json').write_text(json.dumps({'variants': rows}))
  assert accelerator._fastest_form(str(tmp_path)) == 'grouped'
  (tmp_path / 'throughput-dsresnet.json').write_text('{"variants": [{"depthwise_')  # Cut short.
  assert accelerator._fastest_form(str(tmp_path)) is None


def _accelerator(tmp_path, cli_env, *flags):
  return subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'accelerator.sh'), '--smoke',
                         f'--out={tmp_path / "out"}', f'--workdir={tmp_path / "runs"}', *flags],
                        cwd=ROOT, env={**cli_env, 'PYTHON': sys.executable},
                        capture_output=True, text=True, timeout=900)


def test_accelerator_script_runs_the_steps_asked_and_stops_one_at_its_timeout(tmp_path, cli_env):
  # A device call has 10 minutes: a step past --step_timeout is stopped (124, as timeout(1)),
  # the call goes on and accelerator.json says so, already written when the step ends.
  done = _accelerator(tmp_path, cli_env, '--only=model3,bench', '--step_timeout=3')
  assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads((tmp_path / 'out' / 'accelerator.json').read_text())
  assert [(s['name'], s['exit_status']) for s in result['steps']] == [
      ('model3', 124), ('throughput_dsresnet', 124), ('bench_dsresnet', 124)]
  assert all(3 <= s['wall_seconds'] < 60 for s in result['steps'])
  assert result['bench_seeds_finished'] == {}
  assert 'model3' not in result['headline'] and 'dsresnet' not in result['headline']
  assert not (tmp_path / 'out' / 'throughput.json').exists()
  # The forms' timing was stopped too: bench keeps the config's depthwise form ('auto').
  assert 'bench_depthwise_impl' not in result and 'depthwise_impl' not in result['steps'][2][
      'command']
  # A form named in the overrides is what bench trains with, and nothing is timed to pick one.
  done = _accelerator(tmp_path / 'named', cli_env, '--only=bench', '--step_timeout=3', '--',
                      '--config.depthwise_impl=grouped')
  result = json.loads((tmp_path / 'named' / 'out' / 'accelerator.json').read_text())
  assert [s['name'] for s in result['steps']] == ['bench_dsresnet'], done.stderr[-2000:]
  assert result['steps'][0]['command'].count('depthwise_impl') == 1
  assert 'bench_depthwise_impl' not in result


def test_accelerator_script_refuses_unknown_steps(tmp_path, cli_env):
  done = _accelerator(tmp_path, cli_env, '--only=throughput,gpu')
  assert done.returncode == 2 and "--only takes steps of throughput,model3,bench" in done.stderr
  # Only config overrides follow --; anything else is a usage error before any step runs.
  done = _accelerator(tmp_path, cli_env, '--only=bench', '--', '--seeds=3')
  assert done.returncode == 2 and "only --config.KEY=VALUE overrides" in done.stderr, done.stderr
  assert not (tmp_path / 'out' / 'accelerator.json').exists()


def test_accelerator_script_names_missing_modules_before_any_step(tmp_path, cli_env):
  # The device machine's image lacks tensorboardX and ml_collections: without the wheels of
  # benchmarks/device_prep.sh the call fails at once, with one message and no traceback.
  shadow = tmp_path / 'shadow' / 'tensorboardX'
  shadow.mkdir(parents=True)
  (shadow / '__init__.py').write_text("raise ImportError('not on this machine')\n")
  env = {**cli_env, 'PYTHONPATH': str(tmp_path / 'shadow') + os.pathsep + cli_env.get(
      'PYTHONPATH', '')}
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'accelerator.py'),
                         '--smoke', f'--out={tmp_path / "out"}', f'--workdir={tmp_path / "runs"}'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
  assert done.stderr.startswith('error: tensorboardX cannot be imported here; on the device '
                                'machine run benchmarks/device_prep.sh'), done.stderr
  assert 'Traceback' not in done.stderr and not (tmp_path / 'out').exists()


def test_device_prep_refuses_a_folder_that_is_not_an_image_dataset(tmp_path):
  # Checked before any download or copy: the device call would otherwise carry no data.
  done = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'device_prep.sh'),
                         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode == 1 and done.stderr == (
      f'error: {tmp_path} is not an image-folder dataset (no train/ and test/ in it)\n')


@pytest.mark.slow
def test_every_candidates16_line_parses_and_fits_the_rules():
  # BENCHMARKS.md's sweep feeds each line of benchmarks/candidates16.txt to bench as overrides of
  # configs/dsresnet.py: a typo or an architecture over the budget would cost a GPU call.
  from dsconv_jax import throughput
  from test_models import cifar_report, load_config
  with open(os.path.join(ROOT, 'benchmarks', 'candidates16.txt')) as f:
    lines = [line.strip() for line in f if line.strip()]
  assert len(lines) >= 5
  candidates = throughput.configs_of(load_config('dsresnet'), lines)[1:]
  reports = {}
  for text, (overrides, config) in zip(lines, candidates):
    report = cifar_report(config, reports)
    assert report.violations == [] and report.params_total < 100_000, text
    assert report.receptive_field_status == 'covers', text
    assert overrides != '', text
