"""A second signal stops a run at once, even while XLA compiles (dsconv_jax/stopping.py): the
signals are counted off the main thread, which is inside one long compile call."""

import os
import signal
import subprocess
import sys
import time

from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Replaces the run's compilation by one of a program that takes XLA far longer than a second (tens
# of seconds on a 2-core CPU), announced on stderr just before the compile call starts.
SLOW_COMPILE = '''
import sys
import jax, jax.numpy as jnp
from dsconv_jax import experiment
def _slow(x):
  for i in range(400):
    x = (jnp.tanh(x @ x.T + i) if i % 2 else
         jnp.cumsum(jnp.sort(x, axis=i % 4 // 2), axis=0))
  return x
def compile_epoch(self, state):
  lowered = jax.jit(_slow).lower(jnp.ones((64, 64)))
  print('compiling', file=sys.stderr, flush=True)
  lowered.compile()
  raise AssertionError('the compile finished before the second signal stopped the run')
experiment.Experiment.compile_epoch = compile_epoch
import runpy
runpy.run_module('dsconv_jax.main', run_name='__main__', alter_sys=True)
'''


def test_a_second_sigint_during_compilation_stops_at_once(tmp_path, cli_env):
  folder = make_image_folder(tmp_path / 'images')
  env = dict(cli_env)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # Compiled afresh, never loaded.
  process = subprocess.Popen(
      [sys.executable, '-c', SLOW_COMPILE, '--config=configs/tiny.py',
       f'--workdir={tmp_path / "run"}', f'--config.dataset=folder:{folder}',
       '--config.train_examples=0', '--config.eval_examples=0',
       '--config.compilation_cache_dir=', '--quiet'],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    lines = []
    while not lines or lines[-1] != 'compiling\n':
      lines.append(process.stderr.readline())
      assert lines[-1], ''.join(lines) + process.communicate()[1]
    time.sleep(0.5)  # Inside XLA's compile call.
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = process.communicate(timeout=600)
    stopped_after = time.monotonic() - sent
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGINT, err[-3000:]
  assert err.endswith('received SIGINT again: stopping now\n'), err[-3000:]
  assert 'received SIGINT: stopping at the next safe point' in err
  assert 'Traceback' not in err, err[-3000:]
  # Within about a second, not when the compile ends (tens of seconds later).
  assert stopped_after < 10, stopped_after
