"""`python -m dsconv_jax.compare`: overlaid curves and a summary table of finished runs."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsconv_jax import compare, reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def cli(env, module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory, cli_env):
  """Two short real runs of the tiny model, of 2 and 3 epochs."""
  from conftest import make_image_folder
  root = tmp_path_factory.mktemp('compare')
  folder = make_image_folder(root / 'images')
  runs = []
  for name, epochs in (('short', 2), ('longer', 3)):
    out = cli(cli_env, 'dsconv_jax.main', '--config=configs/tiny.py', f'--workdir={root / name}',
              f'--config.dataset=folder:{folder}', f'--config.num_epochs={epochs}', '--quiet')
    assert out.returncode == 0, out.stderr[-3000:]
    assert f'epoch   1/{epochs}' not in out.stdout  # --quiet: no per-epoch lines
    runs.append(str(root / name))
  return runs


def test_compare_writes_overlaid_curves_and_a_table_of_the_summaries(tmp_path, two_runs, cli_env):
  out_png = str(tmp_path / 'report' / 'cmp.png')
  out = cli(cli_env, 'dsconv_jax.compare', *two_runs, '--out', out_png)
  assert out.returncode == 0, out.stderr
  with open(out_png, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  with open(str(tmp_path / 'report' / 'cmp.md')) as f:
    table = f.read()
  assert table in out.stdout
  rows = [line.strip('|').split('|') for line in table.splitlines()[2:]]
  assert [r[0].strip() for r in rows] == ['short', 'longer']
  for row, run in zip(rows, two_runs):
    with open(os.path.join(run, 'summary.json')) as f:
      s = json.load(f)
    cells = [c.strip() for c in row]
    with open(os.path.join(run, 'metrics.jsonl')) as f:
      dip = reporting.late_dip([json.loads(line) for line in f])
    assert cells[1:] == ['test', f'{s["params_total"]:,}', f'{100 * s["max_val_accuracy"]:.2f}%',
                         str(s['best_epoch']), f'{100 * s["test_accuracy"]:.2f}%',
                         f'{s["train_seconds"]:.1f}', str(s['epochs']),
                         '-' if dip is None else f'{100 * dip:.2f}']
  # In-process: two runs draw twice the lines of one.
  assert compare.compare(two_runs, str(tmp_path / 'two.png'))['lines'] == 8
  assert compare.compare(two_runs[:1], str(tmp_path / 'one.png'))['lines'] == 4


def test_late_dip_measures_the_sag_of_the_last_third():
  curve = lambda *vals: [{'val_accuracy': v} for v in vals]
  # 9 epochs: the last 3 are judged against the best before each of them.
  assert reporting.late_dip(curve(.5, .6, .7, .72, .74, .75, .76, .77, .78)) == 0.0
  assert reporting.late_dip(curve(.5, .6, .7, .72, .74, .80, .70, .77, .79)) == pytest.approx(.10)
  # A new best inside the last third raises the bar for the epochs after it.
  assert reporting.late_dip(curve(.5, .6, .7, .72, .74, .75, .80, .76, .81)) == pytest.approx(.04)
  assert reporting.late_dip(curve(.5, .6)) is None


def test_first_epoch_reaching_a_figure():
  rows = [{'epoch': e, 'val_accuracy': v} for e, v in ((1, .5), (2, .8293), (3, .80), (4, .85))]
  assert reporting.first_epoch_reaching(rows, .8293) == 2  # reaching counts, not only passing
  assert reporting.first_epoch_reaching(rows, .84) == 4
  assert reporting.first_epoch_reaching(rows, .9) is None
  # As recorded: 8,293 of 10,000 correct, stored from float32, reaches 82.93%.
  stored = [{'epoch': 1, 'val_accuracy': float(np.float32(8293 / 10000))}]
  assert stored[0]['val_accuracy'] < .8293
  assert reporting.first_epoch_reaching(stored, .8293) == 1
  assert reporting.first_epoch_reaching(stored, .8294) is None


def test_reach_adds_the_first_epoch_at_each_accuracy(tmp_path, two_runs, cli_env):
  with open(os.path.join(two_runs[1], 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  pct = math.floor(10000 * max(r['val_accuracy'] for r in rows)) / 100  # the run's best, floored
  out = cli(cli_env, 'dsconv_jax.compare', *two_runs, '--out', str(tmp_path / 'c.png'),
            f'--reach={pct},100')
  assert out.returncode == 0, out.stderr
  header, _, _, longer = out.stdout.splitlines()[:4]
  assert header.endswith(f'| first >= {pct:g}% | first >= 100% |'), header
  expected = [reporting.first_epoch_reaching(rows, p / 100) for p in (pct, 100)]
  assert expected[0] is not None
  assert [c.strip() for c in longer.strip('|').split('|')][-2:] == [
      'never' if e is None else str(e) for e in expected]


def test_labels_tell_equal_directory_names_apart():
  assert compare.run_labels(['runs/a', 'runs/b']) == ['a', 'b']
  assert compare.run_labels(['x/m3/seed_0', 'y/m3/seed_0', 'y/m3/seed_1']) == [
      'x/m3/seed_0', 'y/m3/seed_0', 'seed_1']


def test_bad_arguments(tmp_path, two_runs, cli_env):
  unfinished = str(tmp_path / 'unfinished')
  shutil.copytree(two_runs[0], unfinished)
  os.unlink(os.path.join(unfinished, 'summary.json'))
  out_png = str(tmp_path / 'x.png')
  for args, code, message in (
      ([str(tmp_path / 'nowhere'), '--out', out_png], 1, 'does not exist'),
      ([str(tmp_path), '--out', out_png], 1, 'has no metrics.jsonl'),
      ([unfinished, '--out', out_png], 1, 'has no summary.json: the run has not finished'),
      (['--out', out_png], 2, 'the following arguments are required: DIR'),
      ([two_runs[0]], 2, 'the following arguments are required: --out'),
      ([two_runs[0], '--out', str(tmp_path / 'x.md')], 2, 'would be overwritten by the table'),
      ([two_runs[0], '--out', out_png, '--reach=84.5,high'], 2, "'high' is not a number"),
      ([two_runs[0], '--out', out_png, '--reach=0'], 2,
       'not an accuracy in percent')):
    out = cli(cli_env, 'dsconv_jax.compare', *args)
    assert out.returncode == code, (args, out.stderr)
    assert out.stderr.startswith('error: ') and message in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1 and 'Traceback' not in out.stderr
  assert not os.path.exists(out_png)


def test_out_without_an_extension_gets_png(tmp_path, two_runs):
  result = compare.compare(two_runs, str(tmp_path / 'report'))
  assert result['png'] == str(tmp_path / 'report.png')
  with open(tmp_path / 'report.png', 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  assert os.path.exists(tmp_path / 'report.md') and not os.path.exists(tmp_path / 'report')
