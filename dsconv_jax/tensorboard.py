"""TensorBoard scalar event files without TensorFlow: a writer, and a reader for tests and tools.

An event file is a TFRecord stream: each record is a little-endian uint64 length, the masked CRC32C
of those 8 bytes, the payload, and the masked CRC32C of the payload. Each payload is a serialized
`tensorflow.Event` protobuf. Only a handful of fields are needed, so they are encoded by hand rather
than pulling in protobuf and the TensorFlow schemas:
  Event{double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
        SessionLog session_log = 7}
  Summary{repeated Value value = 1}
  Value{string tag = 1; float simple_value = 2}
  SessionLog{SessionStatus status = 1}, START = 1

A resumed run writes a new file that starts with a SessionLog START event at its first step:
TensorBoard then drops the points of that step and later ones read before it (the ones a killed
run wrote past its last checkpoint), and so does `read_scalars`.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from typing import Iterator

import numpy as np

_U64 = (1 << 64) - 1
_MAX_VARINT_BYTES = 10  # a 64-bit value takes at most ceil(64 / 7) bytes
_file_counter = itertools.count()  # tells apart writers opened by one process in the same second


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  # TFRecord masks the CRC so that a CRC of data which itself holds CRCs stays well mixed.
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= _U64  # a negative int64 is encoded as its 64-bit two's complement, as protobuf does
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _length_delimited(number: int, data: bytes) -> bytes:
  return _key(number, 2) + _varint(len(data)) + data


_SESSION_START = 1


def _event(step: int, *, file_version: bytes = b'',
           values: dict[str, float] | None = None, session_start: bool = False) -> bytes:
  out = _key(1, 1) + struct.pack('<d', time.time()) + _key(2, 0) + _varint(int(step))
  if file_version:
    out += _length_delimited(3, file_version)
  if session_start:
    out += _length_delimited(7, _key(1, 0) + _varint(_SESSION_START))
  if values:
    summary = b''.join(
        _length_delimited(1, _length_delimited(1, tag.encode('utf-8')) + _key(2, 5) +
                          np.float32(float(value)).astype('<f4').tobytes())
        for tag, value in values.items())
    out += _length_delimited(5, summary)
  return out


class EventWriter:
  """Writes scalars to a new `events.out.tfevents.*` file in `logdir`, readable by TensorBoard."""

  def __init__(self, logdir: str | os.PathLike):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    while True:
      name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
              f'{os.getpid()}.{next(_file_counter)}')
      self.path = os.path.join(self.logdir, name)
      try:
        self._file = open(self.path, 'xb')  # 'x': never append to a file another writer owns
        break
      except FileExistsError:
        continue
    self._write(_event(0, file_version=b'brain.Event:2'))
    self.flush()

  def _write(self, payload: bytes) -> None:
    header = struct.pack('<Q', len(payload))
    self._file.write(header + struct.pack('<I', _masked_crc32c(header)) + payload +
                     struct.pack('<I', _masked_crc32c(payload)))

  def session_start(self, step: int) -> None:
    """Marks a (re)start at `step`: readers drop the points at `step` and later read before it."""
    self._write(_event(step, session_start=True))
    self.flush()

  def scalar(self, tag: str, value: float, step: int) -> None:
    self.scalars({tag: value}, step)

  def scalars(self, values: dict[str, float], step: int) -> None:
    """Writes all `values` as one event at `step`, then flushes so a killed run keeps them."""
    if values:
      self._write(_event(step, values=values))
    self.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _records(data: bytes, path: str) -> Iterator[bytes]:
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    if len(data) - pos < 12:
      return  # an incomplete header: the writer was killed mid-record, as TensorBoard tolerates
    if struct.unpack('<I', data[pos + 8:pos + 12])[0] != _masked_crc32c(header):
      raise ValueError(f'{path}: corrupted record length at byte {pos}')
    start = pos + 12
    end = start + struct.unpack('<Q', header)[0]
    if end + 4 > len(data):
      return  # the length is intact, so this is a record cut short, not a corrupted one
    payload = data[start:end]
    if struct.unpack('<I', data[end:end + 4])[0] != _masked_crc32c(payload):
      raise ValueError(f'{path}: corrupted record data at byte {start}')
    yield payload
    pos = end + 4


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = 0
  for i in range(_MAX_VARINT_BYTES):
    if pos >= len(buf):
      break
    value |= (buf[pos] & 0x7F) << (7 * i)
    pos += 1
    if not buf[pos - 1] & 0x80:
      return value, pos
  raise ValueError('malformed protobuf varint')


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
  """Yields (field number, wire type, value) of a protobuf message, checking it is well formed."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    wire_type = key & 7
    if wire_type == 0:
      value, pos = _read_varint(buf, pos)
    else:
      if wire_type == 2:
        size, pos = _read_varint(buf, pos)
      elif wire_type in (1, 5):
        size = 8 if wire_type == 1 else 4
      else:
        raise ValueError(f'unsupported protobuf wire type {wire_type}')
      if pos + size > len(buf):
        raise ValueError('truncated protobuf field')
      value, pos = buf[pos:pos + size], pos + size
    yield key >> 3, wire_type, value


def read_scalars(path_or_logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Returns {tag: [(step, value), ...]} from one event file or every event file in a directory.

  Files of a directory are read in name order, which is creation order for EventWriter's names, so a
  resumed run's points follow the earlier ones. A SessionLog START event at step S drops the points
  read so far at steps >= S, as TensorBoard does, so a resumed run has no duplicated steps.
  Non-scalar summaries are skipped. Raises ValueError on a CRC mismatch or a malformed record; a
  record cut short at the end of a file is ignored.
  """
  path = os.fspath(path_or_logdir)
  if os.path.isdir(path):
    paths = [os.path.join(path, name) for name in sorted(os.listdir(path)) if '.tfevents.' in name]
  else:
    paths = [path]
  scalars: dict[str, list[tuple[int, float]]] = {}
  for file_path in paths:
    with open(file_path, 'rb') as f:
      data = f.read()
    for record in _records(data, file_path):
      step, points, restart = 0, [], False
      for number, wire_type, value in _fields(record):
        if number == 2 and wire_type == 0:
          step = value - (1 << 64) if value >> 63 else value  # back from two's complement
        elif number == 7 and wire_type == 2:
          restart = any((n, w, v) == (1, 0, _SESSION_START) for n, w, v in _fields(value))
        elif number == 5 and wire_type == 2:
          for encoded in (v for n, w, v in _fields(value) if (n, w) == (1, 2)):
            fields = {n: v for n, w, v in _fields(encoded) if (n, w) in ((1, 2), (2, 5))}
            if 2 in fields:
              points.append((fields.get(1, b'').decode('utf-8'), struct.unpack('<f', fields[2])[0]))
      if restart:
        scalars = {tag: kept for tag, series in scalars.items()
                   if (kept := [(s, v) for s, v in series if s < step])}
      for tag, value in points:
        scalars.setdefault(tag, []).append((step, value))
  return scalars
