"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

The run is built once by `experiment.create_experiment`; this module restores the newest
checkpoint, loops over the epochs (each one compiled call of `dsconv_jax.steps`), hands each epoch's
results to the callbacks of `dsconv_jax.callbacks` (metrics.jsonl, TensorBoard, progress,
checkpoint), and writes summary.json, curves.png and confusion.png at the end.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from dsconv_jax import analysis
from dsconv_jax import budget
from dsconv_jax import callbacks as callbacks_lib
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import confusion as confusion_lib
from dsconv_jax import experiment as experiment_lib
from dsconv_jax import fileio
from dsconv_jax import reporting
from dsconv_jax import steps
from dsconv_jax import stopping
from dsconv_jax.errors import UserError

# A hook that receives the default callbacks and returns the list the loop calls (tests add fault
# injection with it).
CallbacksHook = Callable[[list[callbacks_lib.Callback]], Sequence[callbacks_lib.Callback]]


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
                       callbacks_hook: CallbacksHook | None = None) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest checkpoint; returns the summary.

  Crash-safe: killed at any moment, the same call resumes to the metrics of an uninterrupted run
  (see `callbacks`). SIGTERM/SIGINT stop after the current epoch is saved, raising
  `errors.Stopped`. `quiet` turns the per-epoch progress lines off.
  """
  experiment_lib.validate_config(config)
  is_writer = jax.process_index() == 0
  _prepare_workdir(workdir)
  data = experiment_lib.load_data(config)
  exp = experiment_lib.create_experiment(
      config, data, on_model=lambda d: _report_model(d, data, workdir, is_writer))
  config = exp.config

  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           keep=config.checkpoint_keep)
  start_epoch, state = _restore(checkpoints, exp.state, config, workdir, is_writer)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  history = [r for r in fileio.read_jsonl(metrics_path) if r.get('epoch', 0) <= start_epoch]
  # Only process 0 writes the run's files and reports progress.
  callbacks = callbacks_lib.default_callbacks(
      metrics_path=metrics_path, history=history, logdir=workdir, start_epoch=start_epoch,
      progress=reporting.Progress(config.num_epochs, quiet=quiet or not is_writer),
      checkpoints=checkpoints, is_writer=is_writer)
  if callbacks_hook is not None:
    callbacks = list(callbacks_hook(callbacks))
  val_arrays = exp.put_split(data.val)
  compiled_epoch, compile_seconds = exp.compile_epoch(state)

  try:
    with stopping.StopOnSignals() as stop:
      for epoch in range(start_epoch + 1, config.num_epochs + 1):
        for callback in callbacks:
          callback.on_epoch_start(epoch)
        state, row = _train_epoch(exp, compiled_epoch, state, epoch, val_arrays)
        history.append(row)
        for callback in callbacks:
          callback.on_epoch_end(epoch, row, state)
        if stop.requested and epoch < config.num_epochs:
          raise stop.stopped(epoch)
  except BaseException as e:
    callbacks_lib.close_all(callbacks, e)
    raise
  callbacks_lib.close_all(callbacks, None)

  summary = _summarize(exp, state, history, compile_seconds)
  if is_writer:
    _write_summary(workdir, summary, history)
  return summary


def _report_model(description: experiment_lib.ModelDescription, data: experiment_lib.Data,
                  workdir: str, is_writer: bool) -> None:
  """Prints the model's table, refuses violated constraints and a workdir of another run."""
  config, report, (h, w, c) = description.config, description.report, data.image_shape
  if is_writer:
    print(analysis.format_table(report, f'{config.model} on {h}x{w}x{c} ({data.dataset.source})'),
          flush=True)
    if description.width['fit_params']:
      print(budget.describe(description.width), flush=True)
  if report.violations:
    raise UserError(f'model {config.model!r} violates the configured constraints: '
                    + '; '.join(report.violations))
  if is_writer:
    _check_run_identity(workdir, {
        'model': config.model, 'model_kwargs': dict(config.get('model_kwargs', {}) or {}),
        'dataset': data.dataset.source, 'image_shape': list(data.image_shape),
        'num_classes': data.num_classes, 'train_examples': int(config.train_examples),
        'seed': int(config.seed)})


def _restore(checkpoints, initial_state, config, workdir: str, is_writer: bool):
  """(epochs done, state): the newest readable checkpoint's, or (0, the initial state)."""
  restored = checkpoints.restore_latest(initial_state)
  if restored is None:
    return 0, initial_state
  start_epoch, state = restored
  if is_writer:
    print(f'resuming from the checkpoint of epoch {start_epoch} in {checkpoints.directory}',
          flush=True)
  if start_epoch > config.num_epochs:
    raise UserError(f'workdir {workdir!r} already holds {start_epoch} epochs, more than '
                    f'config.num_epochs={config.num_epochs}; raise num_epochs or use a new '
                    '--workdir')
  return start_epoch, state


def _train_epoch(exp: experiment_lib.Experiment, compiled_epoch, state, epoch: int, val_arrays):
  """Trains and evaluates epoch `epoch`: (the new state, its metrics.jsonl row)."""
  kept = f'the checkpoint of epoch {epoch - 1} is kept' if epoch > 1 else 'no epoch was saved'
  t0 = time.perf_counter()
  state, step_metrics = compiled_epoch(state, exp.train_images, exp.train_labels, np.int32(epoch))
  losses = steps.host_value(step_metrics['loss'])
  train_time = time.perf_counter() - t0
  if not np.all(np.isfinite(losses)):
    bad = int(np.argmin(np.isfinite(losses)))
    raise UserError(f'training diverged: the loss is {losses[bad]} at epoch {epoch}, step '
                    f'{bad + 1}; {kept}. Lower config.learning_rate')
  val = {k: float(steps.host_value(v)) for k, v in exp.evaluate(state, *val_arrays).items()}
  if not np.isfinite(val['loss']):
    # The last step's update can break the weights without a bad training loss.
    raise UserError(f'training diverged: the validation loss is {val["loss"]} after epoch '
                    f'{epoch}; {kept}. Lower config.learning_rate')
  batch_size = exp.config.batch_size
  return state, {
      'epoch': epoch,
      'learning_rate': float(exp.epoch_lr(epoch)),
      'train_loss': float(losses.mean()),
      'train_accuracy': float(steps.host_value(step_metrics['accuracy']).mean()),
      'val_loss': val['loss'],
      'val_accuracy': val['accuracy'],
      'epoch_seconds': time.perf_counter() - t0,
      'train_seconds': train_time,
      'train_images_per_second': exp.steps_per_epoch * batch_size / train_time,
  }


def _summarize(exp: experiment_lib.Experiment, state, history, compile_seconds: float
               ) -> dict[str, Any]:
  """summary.json's contents: the final test accuracy (and TTA), the run's figures, the config."""
  config, data, report = exp.config, exp.data, exp.description.report
  test = data.dataset.test
  if not config.eval_examples:
    test_accuracy = history[-1]['val_accuracy']  # Validation already ran on the whole test split.
  else:
    test_accuracy = float(steps.host_value(exp.evaluate(state, *exp.put_split(test))['accuracy']))
  extra = {}
  if config.get('tta_flip', False):
    # Reported beside test_accuracy, never in its place: the sources evaluated single views.
    extra['test_accuracy_tta_flip'] = float(steps.host_value(
        exp.evaluate_tta_flip(state, *exp.put_split(test))['accuracy']))
  best = max(history, key=lambda r: r['val_accuracy'])
  width = exp.description.width
  matrix = confusion_lib.experiment_confusion(exp, state, test)
  return {
      'model': config.model,
      'dataset': data.dataset.source,
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
      'train_seconds': sum(r['epoch_seconds'] for r in history),
      'compile_seconds': compile_seconds,
      'epochs': len(history),
      'train_examples': len(data.train.labels),
      'val_examples': len(data.val.labels),
      'test_examples': len(test.labels),
      'normalization': {'mean': exp.mean, 'std': exp.std},
      # What inference needs besides `config` and the checkpoint (`dsconv_jax.inference`).
      'class_names': list(data.dataset.class_names),
      'image_shape': list(data.image_shape),
      **confusion_lib.summary_fields(matrix, data.dataset.class_names),
      'seed': int(config.seed),
      'device': reporting.device_description(),
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'versions': reporting.versions(),
      'config': config.to_dict(),
  }


def _write_summary(workdir: str, summary: dict[str, Any], history) -> None:
  with fileio.writing(f'summary.json, curves.png and confusion.png to {workdir!r}'):
    fileio.atomic_write_json(os.path.join(workdir, 'summary.json'), summary)
    reporting.plot_curves([('', history)], os.path.join(workdir, 'curves.png'),
                          title=f'{summary["model"]} ({summary["dataset"]})')
    confusion_lib.plot_confusion(np.asarray(summary['test_confusion']), summary['class_names'],
                                 os.path.join(workdir, 'confusion.png'))
  best = summary['max_val_accuracy']
  print(f'max val accuracy {100 * best:.2f}% (epoch {summary["best_epoch"]}), test accuracy '
        f'{100 * summary["test_accuracy"]:.2f}%, {summary["train_seconds"]:.1f} s of training',
        flush=True)
