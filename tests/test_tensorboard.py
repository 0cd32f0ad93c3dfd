"""TensorBoard event files, read back by TensorBoard's own EventAccumulator: the points of each
epoch, a resume that replaces what a killed run wrote past its checkpoint, a run killed between
epochs, a full disk or an unwritable folder, and no TensorFlow."""

import errno
import glob
import os
import signal
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from dsconv_jax import tensorboard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(logdir):
  """{tag: [(step, value), ...]} as TensorBoard shows the folder: every file, purges applied."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0})  # 0: keep every point
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()['scalars']}


def f32(value):
  return float(np.float32(value))  # simple_value is a float32


def row(epoch, run=1):
  """Per-epoch metrics as train.py writes them; `run` tells apart the values of a resumed run."""
  return {'learning_rate': 0.1 / epoch, 'train_loss': 2.0 / epoch + run,
          'val_accuracy': 0.1 * epoch + 0.01 * run, 'train_images_per_second': 1234.5 * epoch}


def run_python(code, *args):
  return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_scalars_and_learning_rate_read_back_with_their_steps_and_tags(tmp_path):
  logdir = tmp_path / 'logs' / 'run'  # nested and missing: the writer creates it
  with tensorboard.EventWriter(logdir, start_step=1) as writer:
    for epoch in (1, 2, 3):
      writer.scalars(row(epoch), epoch)
  # The tags are the metric names themselves, with no prefix, as before tensorboardX.
  assert read_scalars(logdir) == {
      tag: [(epoch, f32(row(epoch)[tag])) for epoch in (1, 2, 3)] for tag in row(1)}
  assert len(glob.glob(str(logdir / 'events.out.tfevents.*'))) == 1


def test_a_resume_keeps_one_point_per_epoch_with_the_values_of_the_resumed_run(tmp_path):
  first = tensorboard.EventWriter(tmp_path, start_step=1)
  for epoch in (1, 2, 3):
    first.scalars({**row(epoch, run=1), 'only_in_the_first_run': 1.0}, epoch)
  # Killed after epoch 3 but before its checkpoint: the run resumes from epoch 2's and redoes 3,
  # within the same second here, which the two files' names must still order.
  second = tensorboard.EventWriter(tmp_path, start_step=3)
  for epoch in (3, 4, 5):
    second.scalars(row(epoch, run=2), epoch)
  second.close()
  scalars = read_scalars(tmp_path)
  for tag in row(1):
    assert scalars[tag] == [(1, f32(row(1, 1)[tag])), (2, f32(row(2, 1)[tag]))] + [
        (epoch, f32(row(epoch, 2)[tag])) for epoch in (3, 4, 5)], tag
  # The purge is by step, for every tag, not only for the tags the resumed run writes again.
  assert scalars['only_in_the_first_run'] == [(1, 1.0), (2, 1.0)]
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 2


def test_a_run_killed_between_epochs_keeps_every_epoch_it_wrote(tmp_path):
  # A resume starts after the last checkpoint, so these points are never written again.
  code = ('import os, signal, sys\n'
          'from dsconv_jax import tensorboard\n'
          'writer = tensorboard.EventWriter(sys.argv[1], start_step=1)\n'
          'for epoch in (1, 2, 3):\n'
          '  writer.scalars({"val_accuracy": epoch / 10}, epoch)\n'
          'os.kill(os.getpid(), signal.SIGKILL)\n')
  out = run_python(code, tmp_path)
  assert out.returncode == -signal.SIGKILL, out.stderr
  assert read_scalars(tmp_path) == {'val_accuracy': [(e, f32(e / 10)) for e in (1, 2, 3)]}


# The file size limit makes a write past it fail with EFBIG, as a full disk fails with ENOSPC, and
# needs no root. SIGXFSZ is ignored, so that the write fails rather than the signal killing Python.
FULL_DISK = '''
import resource, signal, sys
from dsconv_jax import tensorboard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
writer, written = None, 0
try:
  writer = tensorboard.EventWriter(sys.argv[1], start_step=1)
  for epoch in range(1, 1000):
    writer.scalars({'train_loss': 1.5, 'val_accuracy': 0.25}, epoch)
    written = epoch
except OSError as e:
  print('creating' if writer is None else 'writing', e.errno, written)
  if writer is not None:
    writer.close()  # what train.py does on its way out: quiet, the error was raised once already
'''


def test_a_full_disk_is_an_oserror_of_the_call_that_hit_it_and_nothing_is_printed(tmp_path):
  for limit, call in ((0, 'creating'), (300, 'writing')):
    logdir = tmp_path / str(limit)
    out = run_python(FULL_DISK, logdir, limit)
    # No traceback from a background thread or an atexit hook, and close() did not raise again.
    assert (out.returncode, out.stderr) == (0, ''), out.stderr
    where, error, written = out.stdout.split()
    assert (where, int(error)) == (call, errno.EFBIG)
    # Every point of a call that returned is on disk whole; the one cut short is ignored.
    if call == 'writing':
      assert int(written) > 0
      assert read_scalars(logdir)['val_accuracy'] == [
          (epoch, 0.25) for epoch in range(1, int(written) + 1)]


def test_an_unwritable_folder_is_an_oserror_of_the_constructor(tmp_path):
  not_a_folder = tmp_path / 'file'
  not_a_folder.write_text('')
  for logdir in (not_a_folder, not_a_folder / 'run'):
    try:
      tensorboard.EventWriter(logdir, start_step=1)
    except OSError:
      pass
    else:
      raise AssertionError(f'no OSError for {logdir}')


def test_writes_without_importing_tensorflow_or_tensorboard(tmp_path):
  # Every import of either is refused and recorded, so that even an import guarded by
  # `except ImportError` is caught; TensorBoard itself reads the file back, in this process.
  code = '''
import sys
class Refuse:
  tried = []
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorboard'):
      self.tried.append(name)
      raise ImportError(f'{name} is refused')
sys.meta_path.insert(0, Refuse())
from dsconv_jax import tensorboard
with tensorboard.EventWriter(sys.argv[1], start_step=1) as writer:
  writer.scalars({'learning_rate': 0.5}, 1)
assert not Refuse.tried, Refuse.tried
'''
  out = run_python(code, tmp_path)
  assert out.returncode == 0, out.stderr
  assert read_scalars(tmp_path) == {'learning_rate': [(1, 0.5)]}
