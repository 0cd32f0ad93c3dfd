"""Compilation paid once (dsconv_jax/compile_cache.py): the evaluation is compiled before epoch 1,
processes share the persistent cache safely, and a rerun loads its programs from it. Asserted
through JAX's own events (programs traced, lowered, compiled, loaded), not wall time."""

import json
import os
import subprocess
import sys

import jax.monitoring
import pytest

from conftest import make_image_folder
from dsconv_jax import callbacks as callbacks_lib
from dsconv_jax import train
from dsconv_jax.defaults import get_testing_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CompileWatch(callbacks_lib.Callback):
  """Counts JAX's compilation events (trace, lowering, compile) within epoch 1."""

  def __init__(self):
    self.during_epoch_1 = []
    self.recording = False
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def _on_duration(self, event, duration, **kwargs):
    del duration, kwargs
    if self.recording and event.startswith('/jax/core/compile/'):
      self.during_epoch_1.append(event)

  def on_epoch_start(self, epoch):
    self.recording = epoch == 1

  def on_epoch_end(self, epoch, row, state):
    self.recording = False


def test_the_evaluation_is_compiled_before_epoch_1(tmp_path):
  folder = make_image_folder(tmp_path / 'images')
  config = get_testing_config()
  config.dataset = f'folder:{folder}'
  config.train_examples = config.eval_examples = 0
  config.bn_recalibrate_batches = 2  # PreciseBN's recomputation too.
  watch = CompileWatch()
  train.train_and_evaluate(config, str(tmp_path / 'run'), quiet=True,
                           callbacks_hook=lambda callbacks: [watch, *callbacks])
  assert watch.during_epoch_1 == []


def main_command(workdir, folder, cache, *extra):
  return [sys.executable, '-m', 'dsconv_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.dataset=folder:{folder}', '--config.num_epochs=1',
          '--config.train_examples=0', '--config.eval_examples=0',
          f'--config.compilation_cache_dir={cache}', '--quiet', *extra]


def cache_counts(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)['compilation_cache']


@pytest.mark.slow
def test_processes_share_the_cache_and_another_seed_compiles_nothing(tmp_path, cli_env):
  folder = make_image_folder(tmp_path / 'images')
  cache = str(tmp_path / 'cache')
  # The config key's folder and settings, not the tests' own cache.
  env = {k: v for k, v in cli_env.items()
         if not k.startswith(('JAX_PERSISTENT_CACHE', 'JAX_COMPILATION_CACHE'))}
  # Two processes compile the same programs into one empty cache at once.
  runs = [subprocess.Popen(main_command(tmp_path / f'run{i}', folder, cache), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in (1, 2)]
  for run in runs:
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert 'persistent compilation cache' not in err and 'Traceback' not in err, err[-3000:]
  # Bounded, so JAX locks the folder around each read and write (no half-written entry is read).
  assert os.path.exists(os.path.join(cache, '.lockfile'))
  first = [cache_counts(tmp_path / f'run{i}') for i in (1, 2)]
  assert all(c['dir'] == cache for c in first)
  assert sum(c['misses'] for c in first) > 0
  # Another seed (as a bench's next seed; the seed's key is an argument of the programs, not a
  # constant in them): every program (the epoch, the evaluation, ...) is loaded, none compiled.
  again = subprocess.run(main_command(tmp_path / 'run3', folder, cache, '--config.seed=1'),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  counts = cache_counts(tmp_path / 'run3')
  assert counts['misses'] == 0 and counts['hits'] >= 2, counts
