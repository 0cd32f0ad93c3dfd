"""Shared command-line plumbing: the --config flag, multi-host flags, and clean user errors."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import logging

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dsconv_jax.errors import UsageError, UserError, run_cli

FLAGS = flags.FLAGS
# JAX reports each accelerator plugin it did not find (libtpu, CUDA) at INFO level; on a CPU-only
# machine that is noise in front of every command.
logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)


def flag(define: Callable[..., object], name: str, *args, **kwargs) -> None:
  """Defines a flag unless an entry point imported earlier in this process already did.

  Each entry point (main, summary, bench, throughput) defines its flags at import, as absl
  programs do; tests and tools that import several of them in one process would otherwise fail
  with DuplicateFlagError.
  """
  if name not in FLAGS:
    define(name, *args, **kwargs)


def define_config_flag() -> None:
  if 'config' in FLAGS:
    return
  config_flags.DEFINE_config_file(
      'config', None, 'Config file defining get_config(), e.g. configs/model3.py; override values '
      'with --config.KEY=VALUE.', lock_config=True)


def define_distributed_flags() -> None:
  if 'coordinator_address' in FLAGS:
    return
  flags.DEFINE_string('coordinator_address', None,
                      'HOST:PORT of process 0, to train on several hosts (not needed on Cloud TPU '
                      'VMs, where jax.distributed initialises itself).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts) taking part.')
  flags.DEFINE_integer('process_id', None, 'This process\'s index, 0 .. num_processes - 1.')


def apply_determinism(config) -> None:
  """Asks XLA for deterministic GPU kernels when the config says so; before JAX starts."""
  import os
  if config.get('deterministic', False):
    if 'jax' in sys.modules and 'jax._src.xla_bridge' in sys.modules:
      from jax._src import xla_bridge
      if xla_bridge.backends_are_initialized():
        raise UserError('config.deterministic must be applied before JAX starts its backends')
    flag = '--xla_gpu_deterministic_ops=true'
    if flag not in os.environ.get('XLA_FLAGS', ''):
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


def initialize_distributed() -> None:
  """Joins the processes of a multi-host run when asked to (or on a Cloud TPU VM)."""
  import jax
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise UsageError('--coordinator_address, --num_processes and --process_id go together')
    # CPU processes need a collectives implementation to talk to each other (GPUs and TPUs bring
    # their own); gloo works over TCP on any machine.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _on_cloud_tpu_vm():
    jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
  import os
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID'))


def get_config():
  """The parsed --config, or a usage error when it is missing."""
  config = FLAGS.config
  if config is None:
    raise UsageError('--config=configs/NAME.py is required')
  return config


def main(body: Callable[[Sequence[str]], None]) -> None:
  """Runs an absl program whose user errors end in one line, exit 1 (usage errors: exit 2)."""

  def wrapped(argv):
    if not FLAGS['verbosity'].present:
      # Orbax and JAX log every step at INFO; users see warnings and the run's own lines.
      absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
      raise UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    body(argv)

  def flags_parser(argv):
    _check_config_file(argv)
    try:
      argv = FLAGS(argv)
      _check_config_loaded()
      return argv
    except Exception as e:  # pylint: disable=broad-except
      # A typo in a --config.KEY override surfaces as one of several errors, depending on where
      # ml_collections notices it; name the key whatever the error.
      unknown = _unknown_config_override(argv)
      if unknown:
        print(f'error: {unknown}', file=sys.stderr)
        sys.exit(2)
      _report_parse_error(e, argv)

  run_cli(lambda: app.run(lambda argv: run_cli(lambda: wrapped(argv)), flags_parser=flags_parser))


def _report_parse_error(e: Exception, argv: Sequence[str]) -> None:
  """Prints a flag-parsing error as one line and exits (2 for usage, 1 for a bad config file)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if isinstance(e, flags.Error) and 'Error whilst parsing config file' in str(e):
    # The config file itself failed (e.g. it sets a value of the wrong type): a bad config, not a
    # command-line usage error. The cause is the message's last line, after a traceback.
    flag_name = lines[0].split(': Error whilst')[0].removeprefix('flag ')
    print(f'error: cannot load {flag_name}: {lines[-1]}', file=sys.stderr)
    sys.exit(1)
  if isinstance(e, flags.Error):
    print(f'error: {_first_line(e)}\nusage: python -m {_module_name()} --config=configs/'
          'model3.py [--config.KEY=VALUE ...] (--helpfull for all flags)', file=sys.stderr)
    sys.exit(2)
  if isinstance(e, UserError):
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  # Config files are executed while flags are parsed: a missing file or an error inside one is the
  # user's to fix, not a crash. The cause is the message's last line.
  given = next((a for a in argv if a.startswith('--config=')), '--config')
  print(f'error: cannot load {given}: {lines[-1] if lines else type(e).__name__}',
        file=sys.stderr)
  sys.exit(1)


def _unknown_config_override(argv: Sequence[str]) -> str | None:
  """'unknown config key ...' for the first --config.KEY=VALUE whose KEY the config lacks.

  The config file is loaded again on its own (config files are cheap and side-effect free); None
  when it cannot be loaded (that error is reported instead) or every key exists.
  """
  import difflib
  import importlib.util
  path = next((a[len('--config='):] for a in argv if a.startswith('--config=')), None)
  if not path or not os.path.isfile(path):
    return None
  try:
    spec = importlib.util.spec_from_file_location('_dsconv_jax_config_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    node, done = config, []
    for part in key.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f" (did you mean '{'.'.join(done + close)}'?)" if close else ''
        return f"unknown config key '{key}'{hint}"
      node, done = node[part], done + [part]
  return None


# Keys whose contents belong to the model (its constructor's arguments, checked when it is built).
_MODEL_KEYS = ('model_kwargs',)


def _check_config_file(argv: Sequence[str]) -> None:
  """Checks the keys and value types that --config's file sets, as overrides are checked.

  The file runs with `defaults.get_config()` giving an unchecked copy of the defaults, so that it
  runs to its end whatever it sets; then every key it holds is compared with the defaults. An
  unknown key ends the program with exit status 2 (a usage error, as on the command line), naming
  the key, the file and the nearest known key; a value of the wrong type with exit status 1, naming
  the key, the value and the type it must have. Nothing is reported when the file cannot be loaded
  or is not a file (the flag parser then says why). Keys under `model_kwargs` are the model's.
  """
  path = _config_path(argv)
  if path is None:
    return
  config = _load_unchecked(path)
  if config is None:
    return
  from dsconv_jax import defaults
  problem = _config_problem(config, defaults.get_config(), path)
  if problem is not None:
    status, message = problem
    print(f'error: {message}', file=sys.stderr)
    sys.exit(status)


def _config_path(argv: Sequence[str]) -> str | None:
  path = next((a[len('--config='):] for a in argv if a.startswith('--config=')), None)
  return path if path and os.path.isfile(path) else None


def _load_unchecked(path: str):
  """`get_config()` of the config file at `path`, its defaults not type-checked; None on error."""
  import importlib.util
  import ml_collections
  from dsconv_jax import defaults
  checked = defaults.get_config
  defaults.get_config = lambda: ml_collections.ConfigDict(checked().to_dict(), type_safe=False)
  try:
    spec = importlib.util.spec_from_file_location('_dsconv_jax_config_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    defaults.get_config = checked


def _config_problem(config, reference, path: str, prefix: str = '') -> tuple[int, str] | None:
  """(exit status, message) for the first key of `config` unknown to, or of another type than,
  `reference` (the defaults); None when every key is known and well typed."""
  import difflib
  for key in config.keys():
    name = prefix + key
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ''
      return 2, f"unknown config key '{name}' set in {path}{hint}"
    value, expected = config[key], reference[key]
    if key in _MODEL_KEYS and prefix == '':
      if value is not None and not hasattr(value, 'keys'):
        return 1, (f'config.{name} = {value!r} in {path}: must be a group of keys, the '
                   f"model's arguments (config.{name}.NAME = VALUE)")
      continue
    if hasattr(expected, 'keys'):
      if not hasattr(value, 'keys'):
        return 1, (f'config.{name} = {value!r} in {path}: must be a group of keys '
                   f'(config.{name}.KEY = VALUE)')
      problem = _config_problem(value, expected, path, f'{name}.')
      if problem is not None:
        return problem
      continue
    kind = reference.get_type(key)
    if not _has_type(value, kind, nullable=expected is None):
      return 1, (f'config.{name} = {value!r} in {path}: must be '
                 f'{_type_words(kind, nullable=expected is None)}, not {_type_words(type(value))}')
  return None


def _has_type(value, kind: type, nullable: bool) -> bool:
  """Whether `value` fits a key whose default has type `kind` (as ml_collections would take it)."""
  if value is None:
    return nullable or kind is type(None)
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _type_words(kind: type, nullable: bool = False) -> str:
  words = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string',
           tuple: 'a list', list: 'a list', dict: 'a group of keys', type(None): 'None'}
  text = words.get(kind, 'a group of keys' if hasattr(kind, 'keys') else kind.__name__)
  return f'{text} or None' if nullable else text


def _check_config_loaded() -> None:
  """ml_collections defers a config file's load error to first use; surface it now, in one line."""
  if 'config' not in FLAGS or FLAGS['config'].value is None:
    return
  try:
    FLAGS.config.keys()
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[-1] if lines else type(e).__name__
    raise UserError(f'cannot load --config={FLAGS["config"].config_filename}: {detail}') from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0]


def _module_name() -> str:
  main_mod = sys.modules.get('__main__')
  spec = getattr(main_mod, '__spec__', None)
  return spec.name if spec is not None else 'dsconv_jax.main'
