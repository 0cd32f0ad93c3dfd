"""What Orbax's background machinery reports after a failed save is dropped, and nothing else
(dsconv_jax/checkpoint.py): the run ends with its one error line on every Orbax release."""

import logging
import types

from dsconv_jax import checkpoint


def record(name, level, message, pathname='/x/y.py'):
  return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_orbax_background_reports_are_dropped_and_other_records_kept():
  quiet = checkpoint._QuietOrbaxErrors()  # pylint: disable=protected-access
  assert not quiet.filter(record('asyncio', logging.ERROR, 'Future exception was never retrieved'))
  assert not quiet.filter(record('absl', logging.WARNING, 'Waiting for previous save to complete '
                                 'took 1.03 seconds. If this number is high, ...'))
  assert not quiet.filter(record('absl', logging.ERROR, 'x', '/site-packages/orbax/a.py'))
  assert quiet.filter(record('asyncio', logging.ERROR, 'Task was destroyed but it is pending'))
  assert quiet.filter(record('absl', logging.ERROR, 'a failure of ours'))
  assert quiet.filter(record('absl', logging.WARNING, 'warning: something else'))


def test_only_closed_loop_callbacks_are_kept_from_the_unraisable_hook():
  seen = []
  hook = checkpoint._QuietClosedLoop()  # pylint: disable=protected-access
  hook.previous = seen.append
  unraisable = lambda e: types.SimpleNamespace(exc_value=e)
  hook(unraisable(RuntimeError('Event loop is closed')))
  other = unraisable(RuntimeError('something else'))
  hook(other)
  assert seen == [other]
