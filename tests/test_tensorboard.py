"""TensorBoard event files: round trip, readability by real TensorFlow/TensorBoard, corruption."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dsconv_jax import tensorboard

# Steps cover 0 (a one-byte varint), multi-byte varints and a value past 32 bits.
STEPS = (0, 1, 127, 128, 300, 2**40)
VALUES = {'train/loss': lambda s: 2.5 / (s + 1) + 0.1, 'train/accuracy': lambda s: -s * 0.37,
          'test/accuracy': lambda s: 1e-3 * (s % 997) + 1 / 3}


def _write_run(logdir, steps=STEPS):
  with tensorboard.EventWriter(logdir) as writer:
    for step in steps:
      writer.scalars({tag: fn(step) for tag, fn in VALUES.items()}, step)
    writer.scalar('lr', 0.125, steps[-1])
  return writer.path


def _expected(steps=STEPS):
  return {tag: [(s, float(np.float32(fn(s)))) for s in steps] for tag, fn in VALUES.items()}


def test_round_trip_and_file_name(tmp_path):
  logdir = str(tmp_path / 'logs' / 'run')  # nested and missing: the writer creates it
  path = _write_run(logdir)
  assert os.path.dirname(path) == logdir
  assert os.path.basename(path).startswith('events.out.tfevents.')
  expected = _expected()
  expected['lr'] = [(STEPS[-1], 0.125)]
  assert tensorboard.read_scalars(path) == expected
  assert tensorboard.read_scalars(logdir) == expected


def test_crc32c_matches_the_standard_check_value():
  # CRC-32C of b'123456789' is 0xE3069283 (RFC 3720); undo the TFRecord mask to compare.
  masked = (tensorboard._masked_crc32c(b'123456789') - 0xA282EAD8) & 0xFFFFFFFF
  assert ((masked << 15) | (masked >> 17)) & 0xFFFFFFFF == 0xE3069283


def test_each_scalars_call_is_flushed_and_writers_get_distinct_files(tmp_path):
  first, second = tensorboard.EventWriter(tmp_path), tensorboard.EventWriter(tmp_path)
  assert first.path != second.path
  first.scalars({'a': 1.0}, 0)
  second.scalars({'a': 2.0}, 1)
  # Nothing is closed yet: what a killed process leaves behind must already be readable.
  assert tensorboard.read_scalars(first.path) == {'a': [(0, 1.0)]}
  assert tensorboard.read_scalars(second.path) == {'a': [(1, 2.0)]}
  assert tensorboard.read_scalars(tmp_path) == {'a': [(0, 1.0), (1, 2.0)]}
  first.close()
  second.close()
  second.close()  # closing twice is harmless


def test_negative_steps_and_special_values(tmp_path):
  with tensorboard.EventWriter(tmp_path) as writer:
    writer.scalar('x', -0.0, -5)
    writer.scalar('x', float('inf'), 2**62)
    writer.scalar('y', float('nan'), 3)
  scalars = tensorboard.read_scalars(tmp_path)
  assert scalars['x'] == [(-5, -0.0), (2**62, float('inf'))]
  assert scalars['y'][0][0] == 3 and np.isnan(scalars['y'][0][1])


def test_module_does_not_import_tensorflow_or_protobuf():
  code = ('import sys, dsconv_jax.tensorboard; '
          'bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorboard") '
          'or m.startswith("google.protobuf")]; assert not bad, bad')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)


def test_tensorflow_reads_the_file(tmp_path):
  tf = pytest.importorskip('tensorflow')
  path = _write_run(str(tmp_path))
  events = list(tf.compat.v1.train.summary_iterator(path))
  assert events[0].file_version == 'brain.Event:2'
  read = {}
  for event in events[1:]:
    assert abs(event.wall_time - events[0].wall_time) < 60
    for value in event.summary.value:
      read.setdefault(value.tag, []).append((event.step, value.simple_value))
  expected = _expected()
  expected['lr'] = [(STEPS[-1], 0.125)]
  assert read == expected


def test_record_framing_is_byte_identical_to_tensorflow(tmp_path):
  tf = pytest.importorskip('tensorflow')
  payloads = [b'', b'x', bytes(range(256)) * 3]
  tf_path = str(tmp_path / 'tf.tfrecord')
  with tf.io.TFRecordWriter(tf_path) as tf_writer:
    for payload in payloads:
      tf_writer.write(payload)
  writer = tensorboard.EventWriter(tmp_path / 'ours')
  start = os.path.getsize(writer.path)  # past the file_version record
  for payload in payloads:
    writer._write(payload)
  writer.close()
  with open(tf_path, 'rb') as f_tf, open(writer.path, 'rb') as f_ours:
    assert f_ours.read()[start:] == f_tf.read()


def test_tensorboard_event_accumulator_loads_the_scalars(tmp_path):
  pytest.importorskip('tensorboard')
  from tensorboard.backend.event_processing import event_accumulator
  _write_run(str(tmp_path), steps=STEPS[:3])
  _write_run(str(tmp_path), steps=STEPS[3:])  # a resumed run: a second file in the same logdir
  accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'scalars': 0})
  accumulator.Reload()
  assert set(accumulator.Tags()['scalars']) == set(VALUES) | {'lr'}
  for tag, points in _expected().items():
    assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == points


def test_any_corrupted_byte_raises_value_error(tmp_path):
  with tensorboard.EventWriter(tmp_path) as writer:
    path = writer.path
    writer.scalars({'loss': 0.5, 'acc': 0.25}, 7)
  with open(path, 'rb') as f:
    data = f.read()
  for i in range(len(data)):
    corrupted = bytearray(data)
    corrupted[i] ^= 0x5A
    with open(path, 'wb') as f:
      f.write(corrupted)
    with pytest.raises(ValueError, match='corrupted'):
      tensorboard.read_scalars(path)


def test_a_record_cut_short_at_the_end_is_ignored(tmp_path):
  with tensorboard.EventWriter(tmp_path) as writer:
    writer.scalar('loss', 0.5, 1)
    size = os.path.getsize(writer.path)
    writer.scalar('loss', 0.25, 2)
  with open(writer.path, 'rb') as f:
    data = f.read()
  for cut in (size + 5, size + 14, len(data) - 1):
    with open(writer.path, 'wb') as f:
      f.write(data[:cut])
    assert tensorboard.read_scalars(writer.path) == {'loss': [(1, 0.5)]}
