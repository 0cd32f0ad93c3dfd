"""One writer per workdir (dsconv_jax/workdir_lock.py), with real processes: a second run on a busy
workdir ends at once naming the holder; the lock goes with its holder when it is killed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import make_image_folder
from dsconv_jax import workdir_lock
from dsconv_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, folder, epochs):
  return [sys.executable, '-m', 'dsconv_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.dataset=folder:{folder}',
          f'--config.num_epochs={epochs}', '--config.train_examples=0',
          '--config.eval_examples=0', '--quiet']


def wait_for_holder(path, process, timeout=120):
  """The holder record of `path` once `process` has written it."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, process.communicate()
    try:
      with open(path) as f:
        holder = json.loads(f.read() or '{}')
      if holder.get('pid') == process.pid:
        return holder
    except (OSError, ValueError):
      pass
    time.sleep(0.1)
  raise AssertionError(f'{path} never named pid {process.pid}')


def test_a_second_run_on_a_busy_workdir_ends_at_once_naming_the_holder(tmp_path, cli_env):
  folder = make_image_folder(tmp_path / 'images')
  workdir = str(tmp_path / 'run')
  first = subprocess.Popen(main_command(workdir, folder, 500), cwd=ROOT, env=cli_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    holder = wait_for_holder(os.path.join(workdir, '.lock'), first)
    assert holder['host'] == socket.gethostname()
    assert '-m dsconv_jax.main --config=configs/tiny.py' in holder['command']

    second = subprocess.run(main_command(workdir, folder, 500), cwd=ROOT, env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    assert second.stderr.strip() == (
        f"error: workdir '{workdir}' is in use by another run (pid {first.pid} on "
        f"{socket.gethostname()}, running {holder['command']}); wait for it to finish or stop "
        'it, or choose another --workdir'), second.stderr[-3000:]
    assert first.poll() is None  # The holder trains on; the second removed nothing of its.
    assert os.path.isdir(workdir)
  finally:
    first.kill()  # SIGKILL: no handler runs, the kernel releases the lock.
    first.communicate()
  # The lock went with its holder: the next run (here this test process) takes it.
  with workdir_lock.hold(workdir):
    pass


def test_the_lock_is_released_when_its_holder_ends_and_held_across_processes(tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom dsconv_jax import workdir_lock\n'
       'with workdir_lock.hold(sys.argv[1]):\n  print("held", flush=True)\n  time.sleep(600)\n',
       workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {holder.pid} on '):
      with workdir_lock.hold(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(workdir):
    with open(os.path.join(workdir, '.lock')) as f:
      assert json.load(f)['pid'] == os.getpid()  # This process now holds and names itself.
  with workdir_lock.hold(workdir):  # Released at the end of the block.
    pass


def test_a_workdir_that_is_a_file_is_called_a_file(tmp_path):
  from dsconv_jax import train
  path = tmp_path / 'run'
  path.write_text('not a folder')
  with pytest.raises(UserError, match=r"workdir '.*run' is a file, not a folder"):
    train.prepare_workdir(str(path))
