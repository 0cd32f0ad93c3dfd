"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

Loads the data, builds and checks the model, restores the newest checkpoint if there is one, runs
the compiled epochs of `dsconv_jax.steps`, and writes the run's files (metrics.jsonl,
summary.json, checkpoints/, TensorBoard events, curves.png).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from dsconv_jax import analysis
from dsconv_jax import augment as augment_lib
from dsconv_jax import budget
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import data as data_lib
from dsconv_jax import faults
from dsconv_jax import fileio
from dsconv_jax import layers
from dsconv_jax import models
from dsconv_jax import optim
from dsconv_jax import reporting
from dsconv_jax import steps
from dsconv_jax import stopping
from dsconv_jax.errors import UserError


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model of `config` (name, model_kwargs, depthwise_impl) for `num_classes` outputs."""
  kwargs = dict(config.get('model_kwargs', {}) or {})
  kwargs.setdefault('num_classes', num_classes)
  if config.get('depthwise_impl') and config.model != 'baseline':
    kwargs.setdefault('depthwise_impl', config.depthwise_impl)
  return models.create_model(config.model, **kwargs)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear error per bad value, before any work is done."""
  for key in ('num_epochs', 'batch_size', 'eval_batch_size', 'train_examples', 'eval_examples'):
    # A config file that builds its own ConfigDict is not type-checked by ml_collections.
    if not isinstance(config[key], int) or isinstance(config[key], bool):
      raise UserError(f'config.{key} must be an integer, got {config[key]!r}')
  for key in ('num_epochs', 'batch_size', 'eval_batch_size'):
    if int(config[key]) <= 0:
      raise UserError(f'config.{key} must be a positive integer, got {config[key]}')
  for key in ('train_examples', 'eval_examples'):
    if int(config[key]) < 0:
      raise UserError(f'config.{key} must be >= 0 (0 means the whole split), got {config[key]}')
  if config.get('compute_dtype', 'float32') not in steps.COMPUTE_DTYPES:
    raise UserError(f'config.compute_dtype must be one of {", ".join(steps.COMPUTE_DTYPES)}, got '
                    f'{config.compute_dtype!r}')
  if config.get('dropout_impl', 'hash') not in layers.DROPOUT_IMPLS:
    raise UserError(f'config.dropout_impl must be one of {", ".join(layers.DROPOUT_IMPLS)}, got '
                    f'{config.dropout_impl!r}')
  # Optimizer and schedule values (names, signs): building them is cheap and checks each, so a
  # typo fails here rather than after the dataset is decoded.
  optim.create_optimizer(config, optim.create_schedule(config, 1))
  ema_decay = float(config.get('ema_decay', 0.0) or 0.0)
  if not 0.0 <= ema_decay < 1.0:
    raise UserError(f'config.ema_decay must be in [0, 1) (0 = off), got {ema_decay}')
  n = jax.device_count()
  if config.batch_size % n:
    raise UserError(f'config.batch_size={config.batch_size} does not divide over the {n} devices; '
                    f'use a multiple of {n}')


def _precision_kwargs(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The compute dtype for train_step and eval_step alike: both must see the same network."""
  return {'compute_dtype': config.get('compute_dtype', 'float32')}


def _ema_decay(config: ml_collections.ConfigDict) -> float:
  return float(config.get('ema_decay', 0.0) or 0.0)


def init_state(config: ml_collections.ConfigDict, model, image_shape, tx, mesh,
               seed_key: jax.Array) -> steps.TrainState:
  """The initial train state of seed `seed_key`, replicated over `mesh`."""
  return jax.jit(functools.partial(steps.create_train_state, model, image_shape=image_shape,
                                   tx=tx, ema=bool(_ema_decay(config))),
                 out_shardings=NamedSharding(mesh, P()))(jax.random.fold_in(seed_key, steps.INIT))


def bind_train_step(config: ml_collections.ConfigDict, mean: jax.Array,
                    std: jax.Array) -> Callable:
  """`steps.train_step` with the config's recipe bound (augmentation, label smoothing, EMA,
  compute dtype, dropout masks) and the normalisation's device arrays: what `main` trains and
  `throughput` times."""
  return functools.partial(steps.train_step, mean=mean, std=std,
                           augment=augment_lib.parse(config.augment),
                           label_smoothing=float(config.get('label_smoothing', 0.0) or 0.0),
                           ema_decay=_ema_decay(config), **_precision_kwargs(config),
                           dropout_impl=config.get('dropout_impl', 'hash'))


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{jax.process_index()}-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.unlink(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable ({e.strerror or e}); choose another '
                    '--workdir') from None


def _check_run_identity(workdir: str, identity: dict[str, Any]) -> None:
  """Refuses to resume a workdir that belongs to a different model or dataset."""
  path = os.path.join(workdir, 'run.json')
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    diffs = [f'{k}: {previous.get(k)!r} there, {v!r} now' for k, v in identity.items()
             if previous.get(k) != v]
    if diffs:
      raise UserError(f'workdir {workdir!r} holds a run of a different configuration ('
                      + '; '.join(diffs) + '); use a new --workdir')
  else:
    fileio.atomic_write_json(path, identity)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       quiet: bool = False) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest checkpoint; returns the summary.

  Crash-safe: killed at any moment, the same call resumes to the metrics of an uninterrupted run
  (metrics lines are appended before their epoch's checkpoint is saved, and lines past the restored
  checkpoint are dropped). SIGTERM/SIGINT stop after the current epoch is saved, raising
  `errors.Stopped`. `quiet` turns the per-epoch progress lines off.
  """
  validate_config(config)
  is_writer = jax.process_index() == 0
  _prepare_workdir(workdir)

  dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.cache_dir,
                                  config.image_size)
  train = dataset.train
  if config.train_examples:
    train = data_lib.take_subset(train, config.train_examples, config.data_seed)
  val = dataset.test
  if config.eval_examples:
    val = data_lib.take_subset(val, config.eval_examples, config.data_seed + 1)
  steps_per_epoch = len(train.labels) // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} is larger than the '
                    f'{len(train.labels)} training examples')
  image_shape = dataset.image_shape

  config, width = budget.resolve_width(config, image_shape, dataset.num_classes)
  model = create_model(config, dataset.num_classes)
  report = analysis.analyze_model(model, image_shape, config.constraints)
  if is_writer:
    print(analysis.format_table(report, f'{config.model} on {image_shape[0]}x{image_shape[1]}x'
                                f'{image_shape[2]} ({dataset.source})'), flush=True)
    if width['fit_params']:
      print(budget.describe(width), flush=True)
  if report.violations:
    raise UserError(f'model {config.model!r} violates the configured constraints: '
                    + '; '.join(report.violations))

  identity = {'model': config.model, 'model_kwargs': dict(config.get('model_kwargs', {}) or {}),
              'dataset': dataset.source, 'image_shape': list(image_shape),
              'num_classes': dataset.num_classes, 'train_examples': int(config.train_examples),
              'seed': int(config.seed)}
  if is_writer:
    _check_run_identity(workdir, identity)

  mean, std = data_lib.normalization_stats(train.images, config.normalization)
  epoch_lr = optim.create_learning_rate_fn(config, steps_per_epoch)
  tx = optim.create_optimizer(config, optim.create_schedule(config, steps_per_epoch))

  mesh = steps.create_mesh()
  seed_key = jax.random.key(config.seed)
  state = init_state(config, model, image_shape, tx, mesh, seed_key)

  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           keep=config.checkpoint_keep)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  start_epoch = 0
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    start_epoch, state = restored
    if is_writer:
      print(f'resuming from the checkpoint of epoch {start_epoch} in {checkpoints.directory}',
            flush=True)
    if start_epoch > config.num_epochs:
      raise UserError(f'workdir {workdir!r} already holds {start_epoch} epochs, more than '
                      f'config.num_epochs={config.num_epochs}; raise num_epochs or use a new '
                      '--workdir')
  history = [r for r in fileio.read_jsonl(metrics_path) if r.get('epoch', 0) <= start_epoch]
  if is_writer:
    # Drops lines of epochs past the checkpoint (their state was lost) and any torn line.
    with fileio.writing(repr(metrics_path)):
      fileio.atomic_write_text(metrics_path, ''.join(json.dumps(r, sort_keys=True) + '\n'
                                                     for r in history))

  # The data lives on the devices, rows split over the mesh; each process transfers its part.
  n_dev = mesh.size
  mean_d = steps.put_replicated(mesh, np.asarray(mean, np.float32))
  std_d = steps.put_replicated(mesh, np.asarray(std, np.float32))
  train_images = steps.put_sharded_rows(mesh, steps.pad_rows(train.images, n_dev))
  train_labels = steps.put_sharded_rows(mesh, steps.pad_rows(train.labels, n_dev))
  train_epoch = steps.make_train_epoch(
      mesh, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
      num_examples=len(train.labels), seed_key=seed_key,
      step_fn=bind_train_step(config, mean_d, std_d))
  eval_batch = -(-config.eval_batch_size // n_dev) * n_dev
  evaluate = steps.make_evaluate(
      mesh, batch_size=eval_batch,
      step_fn=functools.partial(steps.eval_step, mean=mean_d, std=std_d,
                                **_precision_kwargs(config)))
  put_split = lambda split: tuple(steps.put_sharded_rows(mesh, a)
                                  for a in steps.padded_split(split, eval_batch))
  val_arrays = put_split(val)

  writer = None
  if is_writer:
    from dsconv_jax import tensorboard
    with fileio.writing(f'TensorBoard events in {workdir!r}'):
      writer = tensorboard.EventWriter(workdir)
      # Readers then drop what a killed run wrote past its last checkpoint (those epochs rerun).
      writer.session_start(start_epoch + 1)

  t0 = time.perf_counter()
  compiled_epoch = train_epoch.lower(state, train_images, train_labels, np.int32(1)).compile()
  compile_seconds = time.perf_counter() - t0
  train_seconds = sum(r['epoch_seconds'] for r in history)

  # Only process 0 reports progress, as it alone writes the run's files.
  progress = reporting.Progress(config.num_epochs, quiet=quiet or not is_writer)
  kept = lambda e: f'the checkpoint of epoch {e} is kept' if e else 'no epoch was saved'
  try:
    with stopping.StopOnSignals() as stop:
      for epoch in range(start_epoch + 1, config.num_epochs + 1):
        progress.start(epoch)
        t0 = time.perf_counter()
        state, step_metrics = compiled_epoch(state, train_images, train_labels, np.int32(epoch))
        faults.maybe_kill('step', epoch)
        losses = steps.host_value(step_metrics['loss'])
        train_time = time.perf_counter() - t0
        if not np.all(np.isfinite(losses)):
          bad = int(np.argmin(np.isfinite(losses)))
          raise UserError(f'training diverged: the loss is {losses[bad]} at epoch {epoch}, step '
                          f'{bad + 1}; {kept(epoch - 1)}. Lower config.learning_rate')
        val_metrics = evaluate(state, *val_arrays)
        faults.maybe_kill('eval', epoch)
        val_metrics = {k: steps.host_value(v) for k, v in val_metrics.items()}
        if not np.isfinite(val_metrics['loss']):
          # The last step's update can break the weights without a bad training loss.
          raise UserError(f'training diverged: the validation loss is {val_metrics["loss"]} '
                          f'after epoch {epoch}; {kept(epoch - 1)}. Lower config.learning_rate')
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        row = {
            'epoch': epoch,
            'learning_rate': float(epoch_lr(epoch)),
            'train_loss': float(losses.mean()),
            'train_accuracy': float(steps.host_value(step_metrics['accuracy']).mean()),
            'val_loss': float(val_metrics['loss']),
            'val_accuracy': float(val_metrics['accuracy']),
            'epoch_seconds': epoch_seconds,
            'train_seconds': train_time,
            'train_images_per_second': steps_per_epoch * config.batch_size / train_time,
        }
        history.append(row)
        if is_writer:
          with fileio.writing(f'the metrics of epoch {epoch} to {metrics_path!r}'):
            faults.maybe_tear_line(metrics_path, row, epoch)
            fileio.append_jsonl(metrics_path, row)
            writer.scalars({k: v for k, v in row.items() if k != 'epoch'}, epoch)
        progress.end(row)
        # Saved after the metrics line: a crash in between drops the line on resume and redoes
        # the epoch, whereas the other order could keep a checkpoint whose line is lost.
        checkpoints.save(epoch, state)
        faults.maybe_kill('checkpoint', epoch)
        if stop.requested and epoch < config.num_epochs:
          checkpoints.wait()
          raise stop.stopped(epoch)
  except BaseException:
    progress.clear()
    # The save in flight must finish, whatever stopped the run, so that the newest checkpoint on
    # disk is whole; its own error, if any, would only hide the one being raised.
    with contextlib.suppress(Exception):
      checkpoints.close()
    if writer is not None:
      writer.close()
    raise
  checkpoints.close()

  if not config.eval_examples:
    test_accuracy = history[-1]['val_accuracy']  # Validation already ran on the whole test split.
  else:
    test_accuracy = float(steps.host_value(evaluate(state, *put_split(dataset.test))['accuracy']))
  extra = {}
  if config.get('tta_flip', False):
    # Reported beside test_accuracy, never in its place: the sources evaluated single views.
    evaluate_tta = steps.make_evaluate(
        mesh, batch_size=eval_batch,
        step_fn=functools.partial(steps.eval_step, mean=mean_d, std=std_d, tta_flip=True,
                                  **_precision_kwargs(config)))
    extra['test_accuracy_tta_flip'] = float(steps.host_value(
        evaluate_tta(state, *put_split(dataset.test))['accuracy']))

  best = max(history, key=lambda r: r['val_accuracy'])
  summary = {
      'model': config.model,
      'dataset': dataset.source,
      'params_total': report.params_total,
      'params_trainable': report.params_trainable,
      'params_non_trainable': report.params_non_trainable,
      'width_multiplier': width['width_multiplier'],
      'fit_params': width['fit_params'],
      'max_val_accuracy': best['val_accuracy'],
      'best_epoch': best['epoch'],
      'final_val_accuracy': history[-1]['val_accuracy'],
      'test_accuracy': test_accuracy,
      **extra,
      'train_seconds': train_seconds,
      'compile_seconds': compile_seconds,
      'epochs': len(history),
      'train_examples': len(train.labels),
      'val_examples': len(val.labels),
      'test_examples': len(dataset.test.labels),
      'normalization': {'mean': mean, 'std': std},
      'seed': int(config.seed),
      'device': reporting.device_description(),
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'versions': reporting.versions(),
      'config': config.to_dict(),
  }
  if is_writer:
    with fileio.writing(f'summary.json and curves.png to {workdir!r}'):
      fileio.atomic_write_json(os.path.join(workdir, 'summary.json'), summary)
      reporting.plot_curves([('', history)], os.path.join(workdir, 'curves.png'),
                            title=f'{config.model} ({dataset.source})')
    writer.close()
    print(f'max val accuracy {100 * best["val_accuracy"]:.2f}% (epoch {best["epoch"]}), test '
          f'accuracy {100 * test_accuracy:.2f}%, {train_seconds:.1f} s of training', flush=True)
  return summary
