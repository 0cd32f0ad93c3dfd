"""Crash safety end to end, through the real command line in subprocesses.

A run killed with SIGKILL at each point of tests/faults.py, then started again with the same
command, ends with the metrics of a run that was never interrupted; SIGTERM and SIGINT stop it after
saving; a damaged newest checkpoint falls back to the previous one; a diverging run and a full disk
stop with one clear error and keep the last good checkpoint.
"""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_image_folder
import faults
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import stopping
from dsconv_jax.errors import Stopped, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 5
TIMING_KEYS = {'epoch_seconds', 'train_seconds', 'train_images_per_second'}
SUMMARY_KEYS = ('max_val_accuracy', 'best_epoch', 'final_val_accuracy', 'test_accuracy', 'epochs',
                'params_total')
# Runs dsconv_jax.main after the Python code it is appended to (a patch for one test).
RUN_MAIN = ('\nimport runpy\n'
            'runpy.run_module("dsconv_jax.main", run_name="__main__", alter_sys=True)\n')


def main_cli(workdir, folder, env, *extra, fault=None, prelude=None, epochs=EPOCHS):
  """Runs dsconv_jax.main; `fault` = (point, epoch[, signal]) installs tests/faults.py's."""
  args = ['--config=configs/tiny.py', f'--workdir={workdir}', f'--config.dataset=folder:{folder}',
          f'--config.num_epochs={epochs}', '--config.train_examples=0',
          '--config.eval_examples=0', *extra]
  if fault:
    prelude = faults.prelude(*fault) + (prelude or '')
  python = [sys.executable, '-c', prelude + RUN_MAIN] if prelude else [sys.executable, '-m',
                                                                       'dsconv_jax.main']
  return subprocess.run(python + args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)


def metrics_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    text = f.read()
  assert not text or text.endswith('\n'), 'torn line'
  return [json.loads(line) for line in text.splitlines()]


def saved_epochs(workdir):
  """Finished checkpoints (Orbax renames a step's folder to its number once it is complete)."""
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def without_timings(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def summary_of(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def assert_same_run(workdir, reference):
  rows = metrics_rows(workdir)
  assert [r['epoch'] for r in rows] == list(range(1, EPOCHS + 1))
  assert without_timings(rows) == without_timings(metrics_rows(reference))
  got, expected = summary_of(workdir), summary_of(reference)
  assert {k: got[k] for k in SUMMARY_KEYS} == {k: expected[k] for k in SUMMARY_KEYS}


def assert_clean_error(out, code, message):
  assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
  assert message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-4000:]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp('crash') / 'images')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, folder, cli_env):
  """A run of EPOCHS epochs that nothing interrupted."""
  workdir = str(tmp_path_factory.mktemp('crash') / 'reference')
  out = main_cli(workdir, folder, cli_env)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def copy_run(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  return workdir


def test_killed_at_every_point_resumes_to_the_same_metrics(tmp_path, folder, reference, cli_env):
  workdir = str(tmp_path / 'run')
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  # Killed at each point in turn, each run resuming from what the previous one left behind.
  for point, epoch in (('start', 1), ('end', 2), ('checkpoint', 3), ('metrics', 4)):
    out = main_cli(workdir, folder, cli_env, fault=(point, epoch))
    assert out.returncode == -signal.SIGKILL, (point, out.stderr[-3000:])
    with open(metrics_path) as f:
      lines = f.read().splitlines(keepends=True)
    whole = [json.loads(line)['epoch'] for line in lines if line.endswith('\n')]
    if point == 'metrics':
      assert whole == list(range(1, epoch)) and not lines[-1].endswith('\n'), lines  # torn
    elif point == 'checkpoint':
      # The epoch's line is written while its checkpoint is still being saved.
      assert whole == list(range(1, epoch + 1)), lines
    else:
      assert whole == list(range(1, epoch)), (point, lines)
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  out = main_cli(workdir, folder, cli_env)  # The same command, not killed this time.
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from the checkpoint of epoch' in out.stdout
  assert_same_run(workdir, reference)
  # TensorBoard: four processes wrote points, some of them for epochs later redone; a reader
  # gets each metric once per epoch, with the values of metrics.jsonl.
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.SCALARS: 0})  # 0: keep every point
  accumulator.Reload()
  rows = metrics_rows(workdir)
  for key in ('learning_rate', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
              'epoch_seconds', 'train_images_per_second'):
    assert [(e.step, e.value) for e in accumulator.Scalars(key)] == [
        (r['epoch'], float(np.float32(r[key]))) for r in rows], key


def test_metrics_line_of_an_epoch_whose_save_was_cut_is_recomputed(tmp_path, reference, folder,
                                                                   cli_env):
  workdir = copy_run(reference, tmp_path)
  # What a save killed halfway leaves: the epoch's metrics line, its checkpoint unfinished.
  checkpoints = os.path.join(workdir, 'checkpoints')
  os.rename(os.path.join(checkpoints, str(EPOCHS)),
            os.path.join(checkpoints, f'{EPOCHS}.orbax-checkpoint-tmp'))
  os.unlink(os.path.join(workdir, 'summary.json'))
  assert len(metrics_rows(workdir)) == EPOCHS

  out = main_cli(workdir, folder, cli_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from the checkpoint of epoch {EPOCHS - 1}' in out.stdout
  assert f'epoch {EPOCHS:>3}/{EPOCHS}' in out.stdout
  assert_same_run(workdir, reference)
  assert saved_epochs(workdir) == [EPOCHS - 1, EPOCHS]
  assert not glob.glob(os.path.join(checkpoints, '*tmp*'))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, folder,
                                                                   cli_env):
  workdir = copy_run(reference, tmp_path)
  os.unlink(os.path.join(workdir, 'summary.json'))  # Stopped before its end: it resumes.
  newest = os.path.join(workdir, 'checkpoints', str(EPOCHS))
  rng = np.random.default_rng(0)
  for path in glob.glob(os.path.join(newest, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.write(rng.integers(0, 256, os.path.getsize(path), dtype=np.uint8).tobytes())

  out = main_cli(workdir, folder, cli_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'warning: the checkpoint of epoch {EPOCHS} cannot be read' in out.stderr
  assert f'resuming from the checkpoint of epoch {EPOCHS - 1}' in out.stdout
  assert_same_run(workdir, reference)
  assert saved_epochs(workdir) == [EPOCHS - 1, EPOCHS]
  moved = os.listdir(os.path.join(workdir, 'checkpoints.damaged'))
  assert len(moved) == 1 and moved[0].startswith(f'{EPOCHS}-')


def test_sigterm_and_sigint_stop_after_saving_and_the_run_resumes(tmp_path, reference, folder,
                                                                 cli_env):
  workdir = str(tmp_path / 'run')
  for name, epoch in (('SIGTERM', 2), ('SIGINT', 4)):
    out = main_cli(workdir, folder, cli_env, fault=('start', epoch, getattr(signal, name)))
    # The signal arrives while the epoch trains: the epoch finishes and is saved, then it stops.
    assert_clean_error(out, 128 + getattr(signal, name),
                       f'stopped by {name} after saving epoch {epoch}; run the same command to '
                       'resume')
    assert f'received {name}' in out.stderr and 'error:' not in out.stderr
    assert saved_epochs(workdir)[-1] == epoch
    assert [r['epoch'] for r in metrics_rows(workdir)] == list(range(1, epoch + 1))
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  out = main_cli(workdir, folder, cli_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_run(workdir, reference)


# Sends SIGTERM to the process once the dataset is decoded: before the checkpoints are read.
SIGTERM_AFTER_LOADING = '''
import os, signal
from dsconv_jax import experiment
_load_data = experiment.load_data
def load_data(config):
  data = _load_data(config)
  os.kill(os.getpid(), signal.SIGTERM)
  return data
experiment.load_data = load_data
'''


def test_a_signal_while_a_resumed_run_loads_its_data_does_not_say_nothing_was_trained(
    tmp_path, reference, folder, cli_env):
  # A 24-epoch run stopped while decoding its dataset said "before epoch 1 started (nothing was
  # trained)": alarming and false, since its checkpoints are not read yet at that point.
  workdir = str(tmp_path / 'run')
  assert main_cli(workdir, folder, cli_env, epochs=2).returncode == 0
  out = main_cli(workdir, folder, cli_env, prelude=SIGTERM_AFTER_LOADING)
  assert_clean_error(out, 128 + signal.SIGTERM, '')
  assert out.stderr.strip().splitlines()[-1] == (
      'stopped by SIGTERM before training started (no checkpoint was written or changed); run '
      'the same command to resume'), out.stderr[-2000:]
  assert saved_epochs(workdir) == [1, 2]
  assert [r['epoch'] for r in metrics_rows(workdir)] == [1, 2]
  out = main_cli(workdir, folder, cli_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_run(workdir, reference)


@pytest.mark.parametrize('signame', ['SIGINT', 'SIGTERM'])
def test_a_signal_at_any_moment_stops_cleanly(tmp_path, folder, cli_env, signame):
  """Start-up (imports, JAX), data decoding, the first compile, epochs: always a clean stop."""
  signum = getattr(signal, signame)
  for delay in (0.3, 1.0, 2.0, 3.5, 5.0, 8.0):
    workdir = str(tmp_path / f'run-{delay}')
    process = subprocess.Popen(
        [sys.executable, '-m', 'dsconv_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.dataset=folder:{folder}', '--config.num_epochs=500',
         '--config.train_examples=0', '--config.eval_examples=0'],
        cwd=ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, (delay, err[-3000:])
    assert 'Traceback' not in err and 'Fatal' not in err, (delay, err[-3000:])
    assert err.strip().splitlines()[-1].startswith(f'stopped by {signame} '), (delay, err)
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      metrics_rows(workdir)  # Whole lines only.


@contextlib.contextmanager
def small_filesystem(path):
  """A real 16 MiB tmpfs mounted at `path` (root only); yields the path of a ballast file that
  fills it (see FILL_BEFORE_SECOND_SAVE) and a function that frees the space, or None where
  mounting is not permitted."""
  os.makedirs(path)
  mounted = shutil.which('mount') and subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', path], capture_output=True
  ).returncode == 0
  if not mounted:
    yield None
    return
  try:
    ballast = os.path.join(path, 'ballast')
    yield ballast, lambda: os.unlink(ballast)
  finally:
    subprocess.run(['umount', '-l', path], check=False)


# Where no filesystem can be mounted: every file this process writes is limited to this size, so
# Orbax's own writes (tensorstore's file layer) fail with EFBIG ("File too large") as a full disk
# fails them with ENOSPC.
FILE_SIZE_LIMIT = '''
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))
'''


# The tmpfs fills up just as epoch 2's checkpoint starts (epoch 1's is complete, epoch 2's
# metrics line written): a ballast file takes every free block, so Orbax's first write of the
# checkpoint fails with ENOSPC from the kernel. Filling at a fixed moment rather than sizing the
# free space in bytes: a checkpoint of configs/tiny.py is 10 to over 20 files of one 4 KiB block
# each (the number of tensorstore's OCDBT data files varies with timing), and Orbax deletes step
# N-2 in the background, so a byte budget let the failure fall on one save or another or on the
# summary's plots (a fresh-clone CI run saved every epoch and failed at the plots).
FILL_BEFORE_SECOND_SAVE = '''
import os
from dsconv_jax import checkpoint as _checkpoint
_save = _checkpoint.Checkpoints.save
def _save_on_a_full_disk(self, epoch, state):
  if epoch == 2:
    self.wait()  # What save() does first: epoch 1's checkpoint is on disk.
    stat = os.statvfs(os.path.dirname({ballast!r}))
    with open({ballast!r}, 'ab') as f:
      f.write(bytes(stat.f_bavail * stat.f_frsize))
  return _save(self, epoch, state)
_checkpoint.Checkpoints.save = _save_on_a_full_disk
'''


def test_full_disk_while_saving_is_one_clear_error_and_nothing_half_written(
    tmp_path, reference, folder, cli_env):
  env = dict(cli_env)
  with small_filesystem(str(tmp_path / 'small')) as mounted:
    workdir = str(tmp_path / 'small' / 'run')
    if mounted is None:
      grow = None
      env.pop('JAX_COMPILATION_CACHE_DIR')  # Its files would hit the limit too.
      out = main_cli(workdir, folder, env, prelude=FILE_SIZE_LIMIT)
      cause = 'File too large'
    else:
      ballast, grow = mounted
      out = main_cli(workdir, folder, env, prelude=FILL_BEFORE_SECOND_SAVE.format(
          ballast=ballast))
      cause = 'No space left on device'
    assert_clean_error(out, 1, cause)
    errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
    # The error is all it says, beside warnings about the run itself.
    said = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith('warning:')]
    assert len(errors) == 1 and said == errors, out.stderr[-3000:]
    if grow is not None:  # The tmpfs fills at epoch 2's save; the file limit may hit another file.
      assert 'cannot save the checkpoint of epoch 2 ' in errors[0], errors
      assert 'the checkpoint of epoch 1 is intact' in errors[0], errors
      assert saved_epochs(workdir) == [1]
    metrics_rows(workdir)  # Whole lines only.
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))
    # No temporary file of fileio's ('.NAME.PID.HEX.tmp') is left.
    assert not [name for _, dirs, files in os.walk(workdir) for name in dirs + files
                if name.endswith('.tmp')]
    # Space freed: the same command finishes the run as if nothing had happened.
    if grow is None:
      out = main_cli(workdir, folder, cli_env)
    else:
      grow()
      out = main_cli(workdir, folder, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(workdir, reference)


def test_divergence_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
    tmp_path, reference, folder, cli_env):
  workdir = copy_run(reference, tmp_path)
  before = summary_of(workdir)
  out = main_cli(workdir, folder, cli_env, '--config.learning_rate=1e30', epochs=EPOCHS + 2)
  assert_clean_error(out, 1, f'training diverged: the loss is nan at epoch {EPOCHS + 1}, step ')
  assert f'the checkpoint of epoch {EPOCHS} is kept' in out.stderr
  assert saved_epochs(workdir) == [EPOCHS - 1, EPOCHS]
  assert [r['epoch'] for r in metrics_rows(workdir)] == list(range(1, EPOCHS + 1))
  assert summary_of(workdir) == before


def test_checkpoint_write_errors_name_the_epoch_whose_save_failed(tmp_path, monkeypatch):
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  checkpoints.save(1, {'w': np.zeros(3)})
  checkpoints.wait()

  def full_disk(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Failed to write 123 bytes: No space left on device')

  # A background write of epoch 2 fails; the next save reports it as epoch 2's, not epoch 3's.
  checkpoints.save(2, {'w': np.ones(3)})
  monkeypatch.setattr(checkpoints.manager, 'wait_until_finished', full_disk)
  with pytest.raises(UserError, match=r'cannot save the checkpoint of epoch 2 .*\(No space left '
                     r'on device\); the checkpoint of epoch 1 is intact'):
    checkpoints.save(3, {'w': np.ones(3)})
  monkeypatch.undo()
  checkpoints.close()


def test_a_save_past_orbaxs_deadline_is_not_called_a_full_disk(tmp_path, monkeypatch):
  # A process suspended mid-save wakes past Orbax's deadline; its error names that, not disk space.
  checkpoints = checkpoint_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  checkpoints.save(1, {'w': np.zeros(3)})
  checkpoints.wait()
  options = checkpoints.manager._options  # pylint: disable=protected-access
  # Longer than Orbax's default of 1,200 s, which a 23-minute SIGSTOP outlasted.
  assert options.async_options.timeout_secs == checkpoint_lib.SAVE_TIMEOUT_SECONDS > 1200

  def late(*args, **kwargs):  # Orbax's own text, from the run it happened to.
    raise TimeoutError('ChainedFuture completed 1/3 futures but timed out after 0.00 seconds.')

  checkpoints.save(2, {'w': np.ones(3)})
  monkeypatch.setattr(checkpoints.manager, 'wait_until_finished', late)
  with pytest.raises(UserError) as raised:
    checkpoints.save(3, {'w': np.ones(3)})
  assert str(raised.value).endswith(
      f'was not saved within {checkpoint_lib.SAVE_TIMEOUT_SECONDS} s (the process was suspended, '
      'or the disk stalled); the checkpoint of epoch 1 is intact: run the same command to resume')
  assert 'epoch 2' in str(raised.value) and 'disk space' not in str(raised.value)
  monkeypatch.undo()
  checkpoints.close()


def test_stop_on_signals_sets_a_flag_and_restores_the_handlers():
  previous = signal.getsignal(signal.SIGTERM)
  with stopping.StopOnSignals() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    error = stop.stopped(7)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert isinstance(error, Stopped) and error.exit_code == 128 + signal.SIGTERM
  assert str(error) == 'stopped by SIGTERM after saving epoch 7; run the same command to resume'


def test_checkpoints_of_another_model_are_an_error_not_a_fresh_start(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  checkpoints = checkpoint_lib.Checkpoints(directory)
  for epoch in (1, 2):
    checkpoints.save(epoch, {'w': np.full(3, epoch, np.float32)})
  checkpoints.close()
  checkpoints = checkpoint_lib.Checkpoints(directory)
  assert checkpoints.restore_latest({'w': np.zeros(3, np.float32)})[0] == 2
  with pytest.raises(UserError, match='no checkpoint .* can be restored .*different model'):
    checkpoints.restore_latest({'kernel': np.zeros((2, 2), np.float32)})
  checkpoints.close()
  assert saved_epochs(str(tmp_path)) == [1, 2]  # Nothing was moved aside.
  assert not os.path.exists(directory + '.damaged')


def test_orbax_error_logs_stay_filtered_after_close_once_a_save_failed(tmp_path):
  # A save can fail in its synchronous part while Orbax's write threads run on and log the same
  # failure with a traceback later, after the run has closed its checkpoints: the filter must
  # outlive close() whenever any save failed, and a clean close must remove it.
  import logging  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger('absl')
  quiet = lambda: [f for f in absl_logger.filters
                   if isinstance(f, checkpoint_lib._QuietOrbaxErrors)]
  before = quiet()
  clean = checkpoint_lib.Checkpoints(str(tmp_path / 'clean'))
  clean.save(1, {'x': np.zeros(2, np.float32)})
  clean.close()
  assert quiet() == before
  failing = checkpoint_lib.Checkpoints(str(tmp_path / 'failing'))
  def no_space(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  failing.manager.save = no_space
  with pytest.raises(UserError, match='No space left on device'):
    failing.save(1, {'x': np.zeros(2, np.float32)})
  failing.close()  # Nothing in flight: returns quietly.
  try:
    assert failing._quiet in quiet()
  finally:
    for target in failing._filtered:
      target.removeFilter(failing._quiet)
