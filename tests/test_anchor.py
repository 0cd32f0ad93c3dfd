"""The reference network (examples/tiniest.py, configs/tiniest.py), the seed-legal candidates
taken from it (DSResNet's dilation and kernel_mix, benchmarks/candidates40.txt) and timing another
config file beside a config (throughput's --also=--config=FILE)."""

import json
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import analysis, experiment, layers, models, throughput
from dsconv_jax.errors import UsageError, UserError
from test_models import cifar_report, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiniest_has_the_published_size_and_is_reported_outside_the_rules():
  from examples import tiniest
  model = tiniest.Tiniest()
  report = analysis.analyze_model(model, (32, 32, 3), load_config('dsresnet').constraints)
  # 97,530: the original's count (its README); 43.9M MACs, 1.95x DS-ResNet's 22.5M at 3x3.
  assert report.params_total == report.params_trainable == 97_530
  assert report.macs_total == 43_878_176
  text = ' '.join(report.violations)
  assert 'BatchNorm' in text and 'Dense' in text and 'Conv_0' in text
  assert report.layers[-1].output_shape == [10]
  # Its config turns those rules off (and keeps the parameter budget, which it meets).
  config = load_config('tiniest')
  assert config.model == 'examples.tiniest:Tiniest' and config.constraints.max_params == 100_000
  assert not (config.constraints.depthwise_separable_only or config.constraints.require_batch_norm)
  assert config.constraints.allow_dense


def test_tiniest_gate_keeps_a_finite_gradient_where_exp_overflows():
  from examples import tiniest
  g = jnp.array([-3.0, 0.5, 30.0, 200.0])
  grad = jax.grad(lambda g: tiniest.gate(g, jnp.ones_like(g)).sum())(g)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(tiniest.gate(g, jnp.ones_like(g))[2:], g[2:])  # tanh(exp) is 1.
  np.testing.assert_allclose(tiniest.gate(g[:2], 1.0), jnp.tanh(jnp.exp(g[:2])) * g[:2])


@pytest.mark.slow
def test_tiniest_initialises_as_pytorch_does():
  from examples import tiniest
  # One compiled init, with the one-operation depthwise form (the initial values are the same).
  model = tiniest.Tiniest(options=layers.Options(depthwise='grouped'))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  bound = lambda fan_in: fan_in ** -0.5
  block = params['Block_0']
  # Depthwise 7x7: fan_in 49 (one input channel per group); pointwise 48 -> 96: fan_in 48.
  for leaf, fan_in in ((block['DepthwiseConv2D_1']['kernel'], 49),
                       (block['DepthwiseConv2D_1']['bias'], 49),
                       (block['PointwiseConv2D_0']['kernel'], 48),
                       (params['Conv_1']['kernel'], 48), (params['Dense_0']['bias'], 80)):
    assert float(jnp.abs(leaf).max()) <= bound(fan_in)
    assert float(jnp.abs(leaf).max()) > 0.8 * bound(fan_in)
  np.testing.assert_array_equal(block['residual_scale'], 1.0)


@pytest.mark.slow
def test_dsresnet_dilation_and_kernel_mix_shape_the_depthwise_filters():
  base = models.DSResNet(widths=(8, 16), blocks=(1, 1))
  dilated = base.clone(dilation=2)
  mixed = base.clone(kernel_mix='3,5d2')
  shape = (16, 16, 3)
  rows = lambda m: {r.name: r for r in analysis.analyze_model(m, shape).layers}
  b, d, m = rows(base), rows(dilated), rows(mixed)
  # The stem keeps its 3x3; the block's first depthwise sees 2 more pixels a side with dilation 2.
  assert d['DepthwiseConv2D_0'].receptive_field == b['DepthwiseConv2D_0'].receptive_field
  assert d['DepthwiseConv2D_1'].receptive_field == b['DepthwiseConv2D_1'].receptive_field + 2
  assert analysis.count_params(dilated, shape) == analysis.count_params(base, shape)
  # kernel_mix '3,5d2' splits 8 channels into 4 with 3x3 and 4 with 5x5 at dilation 2:
  # 4 * 9 + 4 * 25 weights instead of 8 * 9.
  assert m['DepthwiseConv2D_1'].params == 4 * 9 and m['DepthwiseConv2D_2'].params == 4 * 25
  # After the stem: three depthwise convs of 8 channels (the block's two, the transition's) and
  # two of 16, each with half its channels at 5x5 instead of 3x3.
  assert (analysis.count_params(mixed, shape) - analysis.count_params(base, shape)
          == 3 * 4 * (25 - 9) + 2 * 8 * (25 - 9))
  out = mixed.init_with_output(jax.random.key(0), jnp.zeros((2, *shape)))[0]
  assert out.shape == (2, 10)
  with pytest.raises(UserError, match='kernel_mix'):
    base.clone(kernel_mix='3,4')
  with pytest.raises(UserError, match='dilation'):
    base.clone(dilation=0)


def candidate_lines():
  with open(os.path.join(ROOT, 'benchmarks', 'candidates40.txt')) as f:
    return [line.split(None, 1) for line in f if line.strip()]


@pytest.mark.slow
def test_every_screening_line_is_a_named_holdout_run_inside_the_rules():
  # benchmarks/screen40.sh trains each line as overrides of configs/dsresnet.py; a typo or a
  # model over the budget would cost a run of the screen.
  # The script sets each run's length (EPOCHS) and $WARMUP, 1% of it: 10 epochs here.
  lines = [(name, text.replace('$WARMUP', '0.1')) for name, text in candidate_lines()]
  assert len(lines) >= 10 and len({name for name, _ in lines}) == len(lines)
  assert lines[0][0] == 'base'
  for _, overrides in lines:
    assert 'num_epochs' not in overrides and '--config.holdout=5000' in overrides
  configs = throughput.configs_of(load_config('dsresnet'),
                                  [f'--config.num_epochs=10 {o}' for _, o in lines])[1:]
  seen = {}
  for (name, text), (_, config) in zip(lines, configs):
    experiment.validate_config(config)
    report = cifar_report(config, seen)
    assert report.violations == [] and report.params_total < 100_000, name
  assert len(seen) >= 6  # The architectures: base, k5, k7, dil2/dil3 (= base), mix, one down.


def test_every_recorded_screening_line_still_trains_what_it_trained():
  # The screen's recorded runs (results/screen40-cpu-10ep) are read against each other and rerun
  # at 50 epochs on a GPU from the same file: a line keeps its meaning whatever the defaults of
  # configs/dsresnet.py are (every line names the depthwise kernel size it ran).
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import recipe_table  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  screen = os.path.join(ROOT, 'results', 'screen40-cpu-10ep')
  lines = [(name, text.replace('$WARMUP', '0.1').replace('$OUT', '/screen'))
           for name, text in candidate_lines()]
  configs = throughput.configs_of(load_config('dsresnet'),
                                  [f'--config.num_epochs=10 {o}' for _, o in lines])[1:]
  checked = []
  for (name, _), (_, config) in zip(lines, configs):
    path = os.path.join(screen, name, 'summary.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      recorded = json.load(f)['config']
    # The teacher's folder differs by machine; the width multiplier is fit_params' result for
    # the architecture compared (recorded after fitting, 1.0 before).
    ran, now = (json.loads(json.dumps({k: v for k, v in c.items() if k != 'distill_workdir'}))
                for c in (recorded, config.to_dict()))
    for c in (ran, now):
      c['model_kwargs'].pop('width_multiplier', None)
    assert recipe_table.changes(now, ran) == '(baseline)', name
    checked.append(name)
  assert {'base', 'k5', 'k7', 'dil2', 'mix377d3', 'onedown', 'adamw1c', 'distillk5'} <= set(
      checked)


def test_also_can_time_another_config_file_beside_the_config():
  config = load_config('dsresnet')
  path = os.path.join(ROOT, 'configs', 'tiniest.py')
  (_, first), (text, other) = throughput.configs_of(
      config, [f'--config={path} --config.batch_size=64'])
  assert other.model == 'examples.tiniest:Tiniest' and other.batch_size == 64
  assert first.model == 'dsresnet' and shlex.split(text)[0] == f'--config={path}'
  with pytest.raises(UsageError, match='--config=FILE'):
    throughput.configs_of(config, ['--config= --config.seed=1'])
  with pytest.raises(UsageError, match='no key'):
    throughput.configs_of(config, [f'--config={path} --config.no_such_key=1'])


def test_screen_script_runs_the_reference_then_each_line_once_and_tables_them(tmp_path):
  # A stand-in interpreter records each call and finishes each run at once: what is tested is
  # the script's plan (order, overrides, $OUT, skipping finished runs, the table's arguments).
  # A training call's flags go through dsconv_jax.main's own parser (absl and ml_collections:
  # the config file before its overrides), and the run's summary records the parsed config.
  import subprocess
  import sys
  log = tmp_path / 'calls.txt'
  fake = tmp_path / 'python'
  fake.write_text(
      f'#!{sys.executable}\n'
      'import json, os, sys\n'
      f'open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")\n'
      'if sys.argv[1:3] == ["-m", "dsconv_jax.main"]:\n'
      '  from absl import flags\n'
      '  from dsconv_jax import main\n'
      '  flags.FLAGS(["main", *sys.argv[3:]])\n'
      '  config = flags.FLAGS.config\n'
      '  os.makedirs(flags.FLAGS.workdir, exist_ok=True)\n'
      '  with open(os.path.join(flags.FLAGS.workdir, "summary.json"), "w") as f:\n'
      '    json.dump({"dataset": config.dataset, "epochs": config.num_epochs,\n'
      '               "quiet": flags.FLAGS.quiet}, f)\n')
  fake.chmod(0o755)
  lines = tmp_path / 'lines.txt'
  lines.write_text("base --config.seed=0\n\nwide --config.model_kwargs.widths='(8,16)'\n"
                   'taught --config.distill_workdir=$OUT/tiniest --config.warmup_epochs=$WARMUP\n')
  out = tmp_path / 'out'
  run = lambda **env: subprocess.run(
      ['bash', os.path.join(ROOT, 'benchmarks', 'screen40.sh'), '/data', str(out), str(lines)],
      cwd=ROOT, env={**os.environ, 'PYTHON': str(fake), 'PYTHONPATH': ROOT, **env}, check=True,
      timeout=120, capture_output=True, text=True)
  run(NAMES='base wide')
  calls = log.read_text().splitlines()
  assert len(calls) == 3 and 'tiniest' not in ' '.join(calls)  # Two runs, then the table.
  assert calls[2] == f'benchmarks/recipe_table.py {out}/base {out}/wide'
  tail = f' --config.dataset=folder:/data --workdir={out}/wide --quiet'
  assert calls[1] == ('-m dsconv_jax.main --config=configs/dsresnet.py --config.num_epochs=10 '
                      '--config.model_kwargs.widths=(8,16)' + tail)
  with open(out / 'wide' / 'summary.json') as f:
    assert json.load(f) == {'dataset': 'folder:/data', 'epochs': 10, 'quiet': True}
  log.write_text('')
  run()
  calls = log.read_text().splitlines()
  assert [c.split('--workdir=')[1].split()[0] for c in calls[:2]] == [
      f'{out}/tiniest', f'{out}/taught']  # The others had finished.
  assert ('--config=configs/tiniest.py --config.num_epochs=10 --config.warmup_epochs=0.1 '
          '--config.ema_warmup=True --config.dataset=') in calls[0]
  assert (f'--config.distill_workdir={out}/tiniest --config.warmup_epochs=0.1 '
          '--config.dataset=') in calls[1]
  assert calls[2] == (f'benchmarks/recipe_table.py {out}/base {out}/wide {out}/taught '
                      f'{out}/tiniest')
  # 50 epochs (the GPU's screen): every run that long, warm-ups 1% of it, and the reference
  # network's EMA as published (no warm-up cap), the teacher its run of the same length.
  log.write_text('')
  long = tmp_path / 'long'
  subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'screen40.sh'), '/data', str(long),
                  str(lines)], cwd=ROOT,
                 env={**os.environ, 'PYTHON': str(fake), 'PYTHONPATH': ROOT, 'EPOCHS': '50'},
                 check=True, timeout=120, capture_output=True, text=True)
  calls = log.read_text().splitlines()
  assert ('--config=configs/tiniest.py --config.num_epochs=50 --config.warmup_epochs=0.5 '
          '--config.dataset=') in calls[0]
  assert all('--config.num_epochs=50 ' in c for c in calls[1:4])
  assert (f'--config.distill_workdir={long}/tiniest --config.warmup_epochs=0.5 '
          '--config.dataset=') in calls[3]
  bad = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'screen40.sh'), '/data',
                        str(long), str(lines)], cwd=ROOT, env={**os.environ, 'EPOCHS': '5O'},
                       timeout=60, capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip() == "error: EPOCHS must be a positive integer, got '5O'"

