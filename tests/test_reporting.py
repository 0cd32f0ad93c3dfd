"""Progress lines and atomic files' permissions (fast, no training)."""

import io
import os

from dsconv_jax import fileio
from dsconv_jax import reporting


class Terminal(io.StringIO):

  def isatty(self):
    return True


def _row(epoch, seconds=2.0):
  return {'epoch': epoch, 'learning_rate': 0.01, 'train_loss': 1.25, 'train_accuracy': 0.5,
          'val_loss': 1.5, 'val_accuracy': 0.25, 'epoch_seconds': seconds,
          'train_images_per_second': 1234.0}


def test_progress_on_a_terminal_has_a_transient_line_and_an_eta():
  out = Terminal()
  progress = reporting.Progress(10, stream=out)
  progress.start(1)
  assert out.getvalue() == '\repoch   1/10  training ...\x1b[K'
  progress.end(_row(1, seconds=30.0))  # The first epoch is slow (warm-up): left out of the ETA.
  progress.start(2)
  progress.end(_row(2, seconds=2.0))
  lines = out.getvalue().split('\n')
  # Each finished epoch's line overwrites the transient one ('\r', then clear to end of line).
  assert lines[0] == ('\repoch   1/10  training ...\x1b[K\r\x1b[K' +
                      reporting.format_epoch(_row(1, 30.0), 10, 270.0))
  assert lines[0].endswith('30.0 s  1,234 img/s  ETA 4m30s')
  assert lines[1] == ('\repoch   2/10  training ..., last epoch 30.0 s\x1b[K\r\x1b[K' +
                      reporting.format_epoch(_row(2, 2.0), 10, 16.0))
  assert lines[1].endswith('train loss 1.2500 acc 50.00%  val loss 1.5000 acc 25.00%  2.0 s  '
                           '1,234 img/s  ETA 16s')


def test_progress_in_a_file_has_whole_lines_only_and_quiet_has_none():
  out = io.StringIO()
  progress = reporting.Progress(2, stream=out)
  for epoch in (1, 2):
    progress.start(epoch)
    progress.end(_row(epoch))
  assert '\r' not in out.getvalue() and '\x1b' not in out.getvalue()
  assert out.getvalue().splitlines() == [reporting.format_epoch(_row(1), 2, 2.0),
                                         reporting.format_epoch(_row(2), 2)]
  assert 'ETA' not in out.getvalue().splitlines()[1]  # Nothing is left after the last epoch.
  quiet = Terminal()
  progress = reporting.Progress(2, quiet=True, stream=quiet)
  progress.start(1)
  progress.end(_row(1))
  progress.clear()
  assert quiet.getvalue() == ''


def test_format_duration():
  assert [reporting.format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 7325)] == [
      '0s', '59s', '1m01s', '59m59s', '1h00m', '2h02m']


def test_atomic_files_follow_the_umask_and_leave_no_temporary(tmp_path):
  path = str(tmp_path / 'summary.json')
  old = os.umask(0o022)
  try:
    fileio.atomic_write_json(path, {'a': 1})
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o777 == 0o644  # Not mkstemp's 0600: teammates can read it.
  assert os.listdir(tmp_path) == ['summary.json']


def test_versions_name_what_can_change_a_number_and_the_lock(tmp_path):
  import hashlib
  import importlib.metadata
  versions = reporting.versions()
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'pillow',
              'ml-collections'):
    assert versions[pkg] == importlib.metadata.version(pkg)
  with open(reporting.LOCK_PATH, 'rb') as f:
    assert versions['lock'] == hashlib.sha256(f.read()).hexdigest()[:16]
  assert isinstance(versions['differs_from_lock'], dict)
  # An installed distribution at a version the lock does not hold is named; others are not.
  lock = tmp_path / 'uv.lock'
  lock.write_text('version = 1\n\n[[package]]\nname = "numpy"\nversion = "0.0.1"\n\n'
                  f'[[package]]\nname = "Pillow"\nversion = "{importlib.metadata.version("pillow")}"\n')
  differs = reporting.lock_differences(str(lock))['differs_from_lock']
  assert differs == {'numpy': f'installed {importlib.metadata.version("numpy")}, locked 0.0.1'}
  assert reporting.lock_differences(str(tmp_path / 'none.lock')) == {}
