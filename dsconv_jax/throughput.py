"""Training speed, ours and a peer's, in one process run.

    python -m dsconv_jax.throughput --config=configs/model3.py [--peer=pytorch|keras] [--json]
        [--depthwise_impl=grouped,shifted] [--compute_dtype=float32,bfloat16]
        [--dropout_impl=hash,threefry] [--steps=20] [--chunks=3] [--config.KEY=VALUE ...]
        [--also="--config.KEY=VALUE ..." ...]

Times whole compiled epochs of `dsconv_jax.steps` (a `lax.scan` of `--steps` train steps, each
gathering its batch from a device-resident uint8 dataset, preprocessing, augmenting and updating,
exactly as `main` trains) on synthetic data: random uint8 images and labels, config.batch_size
per step. Each timed chunk ends in `block_until_ready`; compilation and one warm-up chunk are not
timed (a peer's `compile_seconds` is its whole warm-up chunk). Images per second are the best
chunk's (the least disturbed by other work on the machine).

The comma-separated `--depthwise_impl`, `--compute_dtype` and `--dropout_impl` lists measure every
combination side by side; the first of each list (default: the config's value) is the headline.
Each `--also` is another configuration timed beside it in the same run: the config as given with
more `--config.KEY=VALUE` overrides, quoted as one argument (shell quoting inside it), e.g.
`--also="--config.model_kwargs.widths='(40,80,160)' --config.model_kwargs.blocks='(1,1,1)'"`;
so architectures under design are compared on one machine at one moment, not across runs on a
shared machine.
`--peer=pytorch` (benchmarks/torch_model3.py: eager and torch.compile, NCHW and channels_last) or
`--peer=keras` (benchmarks/keras_model3.py: the sources' Keras model, with and without XLA) trains
the same model on the same kind of data with the same batch size; its best variant is the peer's
figure and `ratio` is ours / peer. All runners take their chunks in turn (round robin), so that a
change in the machine's load hits every runner alike.

`--json` prints one JSON object: `device`, `batch_size`, `train_images_per_second`,
`compile_seconds`, `epoch_seconds_50k` (seconds per 50,000-image epoch), `variants` (each with
its `overrides`, '' for the config as given, and the model's `params` and `macs`), and with a
peer `peer_images_per_second`, `peer_variant`, `peer_variants` and `ratio`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

from absl import flags

from dsconv_jax import cli
from dsconv_jax.errors import UsageError, UserError

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.flag(flags.DEFINE_bool, 'json', False, 'Print one JSON object instead of the table.')
cli.flag(flags.DEFINE_enum, 'peer', '', ['', 'pytorch', 'keras'],
         'Also measure this framework training the same model, in the same run.')
cli.flag(flags.DEFINE_integer, 'steps', 20, 'Train steps per timed chunk (one compiled epoch).')
cli.flag(flags.DEFINE_integer, 'chunks', 3,
         'Timed chunks per runner, after one untimed warm-up chunk.')
cli.flag(flags.DEFINE_string, 'depthwise_impl', '',
         'Comma-separated depthwise forms to measure (auto, grouped, shifted); '
         'default: config.depthwise_impl.')
cli.flag(flags.DEFINE_string, 'compute_dtype', '',
         'Comma-separated compute dtypes (float32, bfloat16); default: the config\'s.')
cli.flag(flags.DEFINE_string, 'dropout_impl', '',
         'Comma-separated dropout mask generators (hash, threefry); default: the '
         'config\'s.')
cli.flag(flags.DEFINE_multi_string, 'also', [],
         'Another configuration to time in the same run: --config.KEY=VALUE overrides on top of '
         '--config, quoted as one argument; repeatable.')
cli.flag(flags.DEFINE_bool, 'peer_compile', True,
         'Include the peer\'s compiled variants (torch.compile, Keras with XLA).')

# The 50,000 training images of CIFAR-10: seconds per epoch = this / images per second.
EPOCH_IMAGES = 50_000
PEERS = {'pytorch': ('torch_model3.py', 'torch', 'PyTorch'),
         'keras': ('keras_model3.py', 'tensorflow', 'TensorFlow (Keras)')}
VARIANT_KEYS = ('depthwise_impl', 'compute_dtype', 'dropout_impl')


class Runner:
  """Something that trains: `setup()` compiles and warms up (returns seconds), `run_chunk()`."""
  name: str = ''
  images_per_chunk: int = 0

  def setup(self) -> float:
    raise NotImplementedError

  def run_chunk(self) -> float:
    """Runs one chunk of steps to completion and returns its wall-clock seconds."""
    raise NotImplementedError


class JaxRunner(Runner):
  """Compiled epochs of `steps.make_train_epoch` for one config, on synthetic device data."""

  def __init__(self, config, *, steps_per_chunk: int, variant: dict[str, str],
               overrides: str = ''):
    self.config = config
    self.variant = variant
    self.overrides = overrides
    self.name = ' '.join([overrides] * bool(overrides) + [f'{k}={v}' for k, v in variant.items()])
    if steps_per_chunk <= 0:
      raise UsageError(f'--steps must be positive, got {steps_per_chunk}')
    self.steps_per_chunk = steps_per_chunk
    self.images_per_chunk = steps_per_chunk * config.batch_size
    self._epoch = 0

  def setup(self) -> float:
    from dsconv_jax import experiment
    from dsconv_jax import inference

    config = self.config
    size = int(config.get('image_size', 0) or 32)
    # Exactly the run `main` builds, on synthetic data: one epoch is one timed chunk.
    data = experiment.synthetic_data(self.images_per_chunk, (size, size, 3), 10, config.seed)
    workdir = experiment.distill_settings(config)[0]
    self.experiment = experiment.create_experiment(
        config, data, teacher_run=inference.load_run(workdir) if workdir else None)
    report = self.experiment.description.report
    self.params, self.macs = report.params_total, report.macs_total
    # The form the run computes in: 'auto' is measured on accelerators (`fast_forms`).
    self.depthwise_resolved = self.experiment.forms.depthwise
    self.depthwise_seconds = self.experiment.depthwise_seconds
    self.state = self.experiment.state
    self.compiled, compile_seconds = self.experiment.compile_epoch(self.state)
    self.run_chunk()  # Warm-up: first-run allocations and thread start-up.
    return compile_seconds

  def run_chunk(self) -> float:
    import jax
    import numpy as np
    self._epoch += 1
    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.experiment.train_images,
                                        self.experiment.train_labels, np.int32(self._epoch))
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def _split(value: str, default: str) -> list[str]:
  items = [v.strip() for v in value.split(',') if v.strip()] if value else []
  return items or [default]


def variants_of(config, depthwise: str = '', dtypes: str = '',
                dropout: str = '') -> list[dict[str, str]]:
  """Every combination of the listed values (the config's value where a list is empty)."""
  from dsconv_jax import layers, steps
  lists = [_split(depthwise, config.get('depthwise_impl', 'auto')),
           _split(dtypes, config.get('compute_dtype', 'float32')),
           _split(dropout, config.get('dropout_impl', 'hash'))]
  allowed = [layers.DEPTHWISE_IMPLS, steps.COMPUTE_DTYPES, layers.DROPOUT_IMPLS]
  for key, values, ok in zip(VARIANT_KEYS, lists, allowed):
    bad = [v for v in values if v not in ok]
    if bad:
      raise UsageError(f'--{key}: unknown value(s) {", ".join(bad)}; choose from {", ".join(ok)}')
  return [dict(zip(VARIANT_KEYS, combo)) for combo in itertools.product(*lists)]


def configs_of(config, also: list[str] | tuple[str, ...] = ()) -> list[tuple[str, Any]]:
  """(overrides, config): the config as given, then one per `--also` string, parsed by
  ml_collections' own `--config.KEY=VALUE` parser (as `main` parses them), so a key or value that
  `main` would refuse is refused here too (a UsageError). An `--also` string that opens with
  `--config=FILE` starts from that config file instead of the given config (another model and
  recipe timed beside it)."""
  from ml_collections import config_flags
  out = [('', config)]
  for text in also:
    try:
      args = shlex.split(text)
    except ValueError as e:
      raise UsageError(f'--also={text!r}: {e}') from None
    path = args[0][len('--config='):] if args and args[0].startswith('--config=') else None
    overrides = args[1:] if path is not None else args
    bad = [a for a in overrides if not (a.startswith('--config.') and '=' in a)]
    if not args or bad or path == '':
      raise UsageError(f'--also={text!r}: give --config.KEY=VALUE overrides only, after an '
                       'optional --config=FILE' + (f' (not {bad[0]!r})' if bad else ''))
    argv = ['throughput', *args]
    flag_values = flags.FlagValues()
    try:  # `sys_argv` names the overrides to define as flags (else sys.argv's would be).
      if path is None:
        config_flags.DEFINE_config_dict('config', config.copy_and_resolve_references(),
                                        flag_values=flag_values, lock_config=True, sys_argv=argv)
      else:
        config_flags.DEFINE_config_file('config', path, flag_values=flag_values,
                                        lock_config=True, sys_argv=argv)
      flag_values(argv)
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as e:
      # An unknown key: ml_collections raises AttributeError(KeyError("'key'")), bare texts.
      key = e.args[0] if isinstance(e, AttributeError) and e.args else e
      if isinstance(key, KeyError):
        raise UsageError(f'--also={text!r}: the config has no key {key.args[0]}') from None
      raise UsageError(f'--also={text!r}: {str(e).strip().splitlines()[0]}') from None
    out.append((shlex.join(args), flag_values.config))
  return out


def plan(config, also=(), depthwise: str = '', dtypes: str = '', dropout: str = ''
         ) -> list[tuple[str, Any, dict[str, str]]]:
  """(overrides, config, variant) of every runner of ours, in order: each configuration (the one
  given first, then each `also`) with every combination of its variants; the first is the
  headline."""
  return [(overrides, config_for(c, v), dict(v))
          for overrides, c in configs_of(config, also)
          for v in variants_of(c, depthwise, dtypes, dropout)]


def config_for(config, variant: dict[str, str]):
  """A copy of `config` with the variant's values."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in variant.items():
      config[key] = value
  return config


def load_peer(peer: str):
  """The peer's benchmark module (benchmarks/*_model3.py), or a one-line UserError."""
  filename, package, framework = PEERS[peer]
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                      filename)
  if not os.path.exists(path):
    raise UserError(f'--peer={peer} needs benchmarks/{filename} from the dsconv_jax source '
                    'checkout; run from there')
  try:
    __import__(package)
  except ImportError:
    hint = ('pip install -e ".[bench]" (or pip install torch)' if peer == 'pytorch' else
            'pip install tensorflow-cpu')
    raise UserError(f'--peer={peer} needs {framework}, which is not installed: {hint}') from None
  spec = importlib.util.spec_from_file_location(f'dsconv_jax_peer_{peer}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _measure(runners: list[Runner], chunks: int, log: Callable[[str], None]) -> list[dict]:
  """Sets every runner up, then times `chunks` chunks of each in turn."""
  results = []
  for runner in runners:
    log(f'compiling and warming up: {runner.name}')
    try:
      results.append({'name': runner.name, 'compile_seconds': runner.setup(), 'chunk_seconds': []})
    except Exception as e:  # pylint: disable=broad-except
      # A peer variant that cannot run here (torch.compile without a working C++ toolchain,
      # XLA refusing an op) is reported as skipped, not fatal; ours is never skipped.
      if isinstance(runner, JaxRunner) or isinstance(e, UserError):
        raise
      reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
      log(f'skipped {runner.name}: {reason[:200]}')
      results.append({'name': runner.name, 'skipped': reason[:300]})
  live = [(r, res) for r, res in zip(runners, results) if 'skipped' not in res]
  for i in range(chunks):
    for runner, res in live:
      res['chunk_seconds'].append(runner.run_chunk())
    log(f'chunk {i + 1}/{chunks}: ' + ', '.join(
        f'{r.name} {r.images_per_chunk / res["chunk_seconds"][-1]:,.0f} img/s' for r, res in live))
  for runner, res in live:
    best = min(res['chunk_seconds'])
    res['images_per_second'] = runner.images_per_chunk / best
    res['epoch_seconds_50k'] = EPOCH_IMAGES / res['images_per_second']
  return results


def measure(config, *, peer: str = '', steps_per_chunk: int = 20, chunks: int = 3,
            depthwise: str = '', dtypes: str = '', dropout: str = '', peer_compile: bool = True,
            also: list[str] | tuple[str, ...] = (),
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Measures our training speed (and the peer's) and returns the JSON-ready result."""
  import jax
  from dsconv_jax import reporting

  if steps_per_chunk <= 0 or chunks <= 0:
    raise UsageError('--steps and --chunks must be positive')
  peer_module = load_peer(peer) if peer else None
  ours = [JaxRunner(c, steps_per_chunk=steps_per_chunk, variant=v, overrides=overrides)
          for overrides, c, v in plan(config, also, depthwise, dtypes, dropout)]
  runners: list[Runner] = list(ours)
  if peer_module is not None:
    size = int(config.get('image_size', 0) or 32)
    runners += peer_module.make_runners(batch_size=config.batch_size, steps=steps_per_chunk,
                                        image_size=size, seed=config.seed,
                                        compiled=peer_compile)
  results = _measure(runners, chunks, log)

  variant_rows = []
  for runner, res in zip(ours, results):
    variant_rows.append({'overrides': runner.overrides, **runner.variant,
                         'params': runner.params, 'macs': runner.macs,
                         'depthwise_resolved': runner.depthwise_resolved,
                         **({'depthwise_seconds': runner.depthwise_seconds}
                            if runner.depthwise_seconds else {}),
                         'train_images_per_second': res['images_per_second'],
                         'epoch_seconds_50k': res['epoch_seconds_50k'],
                         'compile_seconds': res['compile_seconds'],
                         'chunk_seconds': res['chunk_seconds']})
  head = variant_rows[0]
  out: dict[str, Any] = {
      'model': config.model,
      'device': reporting.device_description(),
      'device_count': jax.device_count(),
      'batch_size': int(config.batch_size),
      'steps_per_chunk': steps_per_chunk,
      'chunks': chunks,
      'statistic': 'best chunk of each runner; chunks taken in turn (round robin)',
      'data': 'synthetic: random uint8 images and labels on the device',
      **{k: head[k] for k in VARIANT_KEYS},
      'params': head['params'],
      'depthwise_resolved': head['depthwise_resolved'],
      'train_images_per_second': head['train_images_per_second'],
      'epoch_seconds_50k': head['epoch_seconds_50k'],
      'compile_seconds': head['compile_seconds'],
      'variants': variant_rows,
      'versions': reporting.versions(),
  }
  if peer_module is not None:
    peer_rows = results[len(ours):]
    measured = [r for r in peer_rows if 'images_per_second' in r]
    if not measured:
      raise UserError(f'no variant of --peer={peer} could run here: '
                      + '; '.join(f'{r["name"]}: {r.get("skipped")}' for r in peer_rows))
    best = max(measured, key=lambda r: r['images_per_second'])
    out.update({
        'peer': peer,
        'peer_images_per_second': best['images_per_second'],
        'peer_epoch_seconds_50k': best['epoch_seconds_50k'],
        'peer_variant': best['name'],
        'peer_variants': peer_rows,
        'peer_versions': peer_module.versions(),
        'ratio': head['train_images_per_second'] / best['images_per_second'],
    })
  return out


def format_result(result: dict[str, Any]) -> str:
  """A short table of every runner's figures."""
  lines = [f'{result["model"]} on {result["device"]}, batch {result["batch_size"]}, '
           f'{result["steps_per_chunk"]} steps per chunk, best of {result["chunks"]} chunks',
           f'{"runner":<58} {"img/s":>9} {"s/epoch":>8} {"compile s":>9}']
  several = len({row.get('overrides', '') for row in result['variants']}) > 1
  heading = None
  for row in result['variants']:
    name = 'dsconv_jax ' + ' '.join(f'{k}={row[k]}' for k in VARIANT_KEYS)
    if several and row.get('overrides', '') != heading:  # Each --also configuration's rows.
      heading = row.get('overrides', '')
      lines.append(f'{heading or "--config as given"} ({row["params"]:,} params, '
                   f'{row["macs"] / 1e6:.1f}M MACs):')
    lines.append(f'{name:<58} {row["train_images_per_second"]:>9,.0f} '
                 f'{row["epoch_seconds_50k"]:>8.1f} {row["compile_seconds"]:>9.1f}')
  for row in result.get('peer_variants', []):
    name = f'{result["peer"]} {row["name"]}'
    if 'skipped' in row:
      lines.append(f'{name:<58} skipped: {row["skipped"][:80]}')
    else:
      lines.append(f'{name:<58} {row["images_per_second"]:>9,.0f} '
                   f'{row["epoch_seconds_50k"]:>8.1f} {row["compile_seconds"]:>9.1f}')
  if 'ratio' in result:
    lines.append(f'ratio (ours / {result["peer"]} {result["peer_variant"]}): '
                 f'{result["ratio"]:.2f}')
  return '\n'.join(lines)


def run(argv) -> None:
  del argv
  config = cli.get_config()
  log = lambda s: print(s, file=sys.stderr, flush=True)
  result = measure(config, peer=FLAGS.peer, steps_per_chunk=FLAGS.steps, chunks=FLAGS.chunks,
                   depthwise=FLAGS.depthwise_impl, dtypes=FLAGS.compute_dtype,
                   dropout=FLAGS.dropout_impl, peer_compile=FLAGS.peer_compile,
                   also=FLAGS.also, log=log)
  print(json.dumps(result, indent=2) if FLAGS.json else format_result(result), flush=True)


if __name__ == '__main__':
  cli.main(run)
