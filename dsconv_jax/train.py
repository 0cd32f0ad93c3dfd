"""Training and evaluation of one run: `train_and_evaluate(config, workdir)`.

The run is built once by `experiment.create_experiment`; this module restores the newest
checkpoint, loops over the epochs (each one compiled call of `dsconv_jax.steps`), hands each epoch's
results to the callbacks of `dsconv_jax.callbacks` (metrics.jsonl, TensorBoard, progress,
checkpoint), and writes summary.json, curves.png and confusion.png at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import flax.serialization
import jax
import ml_collections
import numpy as np

from dsconv_jax import analysis
from dsconv_jax import budget
from dsconv_jax import callbacks as callbacks_lib
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import compile_cache
from dsconv_jax import confusion as confusion_lib
from dsconv_jax import experiment as experiment_lib
from dsconv_jax import fileio
from dsconv_jax import inference
from dsconv_jax import models
from dsconv_jax import reporting
from dsconv_jax import steps
from dsconv_jax import stopping
from dsconv_jax import workdir_lock
from dsconv_jax.errors import UserError

# A hook that receives the default callbacks and returns the list the loop calls (tests add fault
# injection with it).
CallbacksHook = Callable[[list[callbacks_lib.Callback]], Sequence[callbacks_lib.Callback]]


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that this process can write there."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir!r} is a file, not a folder; choose another --workdir')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{jax.process_index()}-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.unlink(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable ({e.strerror or e}); choose another '
                    '--workdir') from None


# run.json keys written only when the run sets them (older run.json lack them).
OPTIONAL_IDENTITY = ('holdout', 'data_seed', 'ema_extra_decays')


def _check_run_identity(workdir: str, identity: dict[str, Any]) -> None:
  """Refuses to resume a workdir that belongs to a different model or dataset.

  model_kwargs compare with the model's defaults filled in (`models.kwargs_with_defaults`).
  """
  path = os.path.join(workdir, 'run.json')
  as_json = lambda value: json.loads(json.dumps(value))  # As run.json holds it (tuples as lists).
  identity = as_json(identity)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)

    def same(key, value):
      if key != 'model_kwargs' or previous.get('model') != identity.get('model'):
        return previous.get(key) == value
      try:
        fill = lambda kw: as_json(models.kwargs_with_defaults(identity['model'], kw or {}))
        return fill(previous.get(key)) == fill(value)
      except UserError:  # An import-path model that no longer imports: compare as written.
        return previous.get(key) == value

    diffs = [f'{k}: {previous.get(k)!r} there, {v!r} now' for k, v in identity.items()
             if not same(k, v)]
    # Keys recorded only when set: one the run had and this config lacks differs too.
    diffs += [f'{k}: {previous[k]!r} there, none now' for k in OPTIONAL_IDENTITY
              if k in previous and k not in identity]
    if diffs:
      raise UserError(f'workdir {workdir!r} holds a run of a different configuration ('
                      + '; '.join(diffs) + '); use a new --workdir')
  else:
    fileio.atomic_write_json(path, identity)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
                       show_model: bool = True,
                       callbacks_hook: CallbacksHook | None = None) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest checkpoint; returns the summary.

  Crash-safe: killed at any moment, the same call resumes to the metrics of an uninterrupted run
  (see `callbacks`). SIGTERM/SIGINT stop after the current epoch is saved, raising
  `errors.Stopped`. `quiet` turns the model table and the per-epoch progress lines off;
  `show_model` False only the table (bench shows it once for all seeds). A finished run resumed
  prints no table either.
  """
  experiment_lib.validate_config(config)
  cache_dir = compile_cache.configure(
      config.get('compilation_cache_dir', compile_cache.DEFAULT_DIR))
  cached_before = compile_cache.counts()
  is_writer = jax.process_index() == 0
  created = not os.path.exists(workdir)
  with stopping.StopOnSignals() as stop, contextlib.ExitStack() as lock:
    try:
      prepare_workdir(workdir)
      if is_writer:  # Only process 0 writes the workdir, so only it holds the lock.
        lock.enter_context(workdir_lock.hold(workdir))
      finished = _finished_summary(workdir, config)
      if finished is not None:
        return finished
      run = _start(config, workdir, quiet, show_model, is_writer, stop)
    except workdir_lock.WorkdirBusy:
      raise  # The workdir is the other run's, however new.
    except BaseException:
      if created and is_writer:
        # A run that failed to start leaves no workdir behind (nothing in it was trained).
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    exp, state, start_epoch, history, callbacks, compiled_epoch, compile_seconds, val_arrays = run
    if callbacks_hook is not None:
      callbacks = list(callbacks_hook(callbacks))
    config = exp.config
    try:
      stop.check(start_epoch + 1)
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

    eval_state = exp.eval_state(state, history[-1]['epoch'])  # What validation evaluated.
    summary = _summarize(exp, eval_state, history, compile_seconds)
    if steps.further_averages(state) is not None:
      summary['ema_extra'] = _ema_extra_results(exp, state, history[-1]['epoch'], val_arrays)
    # Programs this run loaded from the compilation cache, and compiled afresh.
    summary['compilation_cache'] = {'dir': cache_dir, **{
        k: v - cached_before[k] for k, v in compile_cache.counts().items()}}
    if is_writer:
      if exp.recalibrate is not None:
        _write_eval_batch_stats(workdir, eval_state.batch_stats)
      _write_summary(workdir, summary, history)
      warning = near_chance_warning(exp, summary)
      if warning:
        print(warning, file=sys.stderr, flush=True)  # Beside the result it explains.
  return summary


def _finished_summary(workdir: str, config) -> dict[str, Any] | None:
  """A run that finished every epoch of this config: its summary.json, its result line printed.

  Nothing is loaded, built or compiled for it. With several processes the full path is taken
  (each process then agrees on it; only process 0 has the workdir's files).
  """
  if jax.process_count() > 1:
    return None
  summary = reporting.finished_summary(workdir, config)
  if summary is not None:
    epochs = summary['epochs']
    print(f'the run in {workdir} finished its {epochs} epoch{"s" if epochs != 1 else ""} '
          'earlier; not retrained (raise --config.num_epochs to train on)', flush=True)
    _print_result(summary)
  return summary


def _teacher_run(config) -> inference.Run | None:
  """The finished run config.distill_workdir names (None when unset)."""
  workdir = experiment_lib.distill_settings(config)[0]
  return inference.load_run(workdir) if workdir else None


def _start(config, workdir: str, quiet: bool, show_model: bool, is_writer: bool,
           stop: stopping.StopOnSignals):
  """Everything before the first epoch: the experiment, the restored state, the callbacks, the
  compiled epoch and the validation split on the devices. A signal stops it between phases."""
  data = experiment_lib.load_data(config)
  stop.check(None)  # The checkpoints are not read yet: a resumed run's epoch is not known.
  exp = experiment_lib.create_experiment(
      config, data, on_model=lambda d: _report_model(d, data, workdir, is_writer),
      teacher_run=_teacher_run(config))
  config = exp.config
  stop.check(None)

  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           keep=config.checkpoint_keep)
  callbacks = [callbacks_lib.Checkpointing(checkpoints)]
  try:
    start_epoch, state = _restore(checkpoints, exp.state, config, workdir, is_writer)
    stop.check(start_epoch + 1)
    if is_writer and show_model and not quiet and start_epoch < config.num_epochs:
      print(_model_table(exp.description, data), flush=True)
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    history = [r for r in fileio.read_jsonl(metrics_path) if r.get('epoch', 0) <= start_epoch]
    # Only process 0 writes the run's files and reports progress.
    callbacks = callbacks_lib.default_callbacks(
        metrics_path=metrics_path, history=history, logdir=workdir, start_epoch=start_epoch,
        progress=reporting.Progress(config.num_epochs, quiet=quiet or not is_writer),
        checkpoints=checkpoints, is_writer=is_writer)
    val_arrays = exp.put_split(data.val)
    compiled_epoch, compile_seconds = exp.compile_epoch(state)
    compile_seconds += _compile_evaluation(exp, state, val_arrays)
  except BaseException as e:
    callbacks_lib.close_all(callbacks, e)  # Joins Orbax's threads before the error goes up.
    raise
  return exp, state, start_epoch, history, callbacks, compiled_epoch, compile_seconds, val_arrays


def _compile_evaluation(exp: experiment_lib.Experiment, state, val_arrays) -> float:
  """Compiles the validation (and PreciseBN's recomputation) before epoch 1, so that epoch 1's
  time is training; the calls after each epoch find them compiled. Returns the seconds taken."""
  t0 = time.perf_counter()
  exp.evaluate.lower(state, *val_arrays).compile()
  if exp.recalibrate is not None:
    exp.recalibrate.lower(state, exp.train_images, np.int32(1)).compile()
  return time.perf_counter() - t0


def _report_model(description: experiment_lib.ModelDescription, data: experiment_lib.Data,
                  workdir: str, is_writer: bool) -> None:
  """Refuses violated constraints (after printing the table) and a workdir of another run; warns
  when BatchNorm's statistics will not have settled by the first evaluation."""
  config, report = description.config, description.report
  if report.violations:
    if is_writer:
      print(_model_table(description, data), flush=True)
    raise UserError(f'model {config.model!r} violates the configured constraints: '
                    + '; '.join(report.violations))
  if is_writer:
    # Recomputed statistics (PreciseBN) do not depend on the moving averages: nothing to warn of.
    warning = None if config.get('bn_recalibrate_batches', 0) else batch_norm_warmup_warning(
        description.model, data.image_shape, len(data.train.labels) // config.batch_size)
    if warning:
      print(warning, file=sys.stderr, flush=True)
    _check_run_identity(workdir, {
        'model': config.model, 'model_kwargs': dict(config.get('model_kwargs', {}) or {}),
        # A spec is the model itself (only sequential runs record it: older run.json lack it).
        **({'layers': list(config.layers)} if config.model == 'sequential' else {}),
        'dataset': data.dataset.source, 'image_shape': list(data.image_shape),
        'num_classes': data.num_classes, 'train_examples': int(config.train_examples),
        'seed': int(config.seed),
        # Further averages change the checkpoints' structure (older run.json lack the key).
        **({'ema_extra_decays': list(experiment_lib.ema_extra_decays_of(config))}
           if experiment_lib.ema_extra_decays_of(config) else {}),
        # A holdout changes what is trained on (older run.json, without one, lack the keys).
        **({'holdout': int(config.holdout), 'data_seed': int(config.data_seed)}
           if config.get('holdout', 0) else {})})


# Above this share of their initial values (mean 0, variance 1) left in BatchNorm's moving
# statistics after the first epoch, evaluation sees the wrong statistics: warn.
BATCH_NORM_INITIAL_SHARE = 0.05


def batch_norm_warmup_warning(model, image_shape, steps_per_epoch: int) -> str | None:
  """A 'warning:' line when the first evaluation would still lean on BatchNorm's initial values.

  After n steps at momentum m the moving statistics hold m**n of their initial values: Keras'
  0.99 needs about 300 steps to forget them, so short runs of the source recipes validate near
  chance while training accuracy climbs (faithful to Keras, and a trap for a newcomer).
  """
  momenta = [m for m, _ in analysis.batch_norm_settings(model, image_shape)]
  if not momenta or steps_per_epoch <= 0:
    return None
  momentum = max(momenta)
  share = momentum ** steps_per_epoch
  if share <= BATCH_NORM_INITIAL_SHARE:
    return None
  needed = math.ceil(math.log(BATCH_NORM_INITIAL_SHARE) / math.log(momentum))
  return (f'warning: BatchNorm momentum {momentum} over {steps_per_epoch} steps per epoch leaves '
          f'{100 * share:.0f}% of the initial moving statistics in place at the first evaluation '
          f'(about {needed} steps are needed to forget them), so validation accuracy will read '
          f'near chance until then; {_batch_norm_remedies(momentum)}')


def _batch_norm_remedies(momentum: float) -> str:
  """The remedies for unsettled statistics, the one that lifts a short run above chance first
  (docs/troubleshooting.md cites the runs that measured them)."""
  remedies = ['--config.bn_recalibrate_batches=20 (statistics recomputed from training batches '
              'before each evaluation)', 'a smaller batch', 'more training data']
  if momentum > 0.9:
    remedies.append('--config.bn_momentum=0.9')
  return 'use ' + ', '.join(remedies[:-1]) + ', or ' + remedies[-1]


# A final validation accuracy below this multiple of chance (1 / classes) counts as near chance.
NEAR_CHANCE = 1.5


def near_chance_warning(exp: experiment_lib.Experiment, summary: dict[str, Any]) -> str | None:
  """A 'warning:' line for the end of a run whose validation ended near chance while BatchNorm's
  moving statistics still held much of their initial values over all the steps it trained."""
  config = exp.config
  chance = 1 / exp.data.num_classes
  if (config.get('bn_recalibrate_batches', 0)
      or summary['final_val_accuracy'] >= NEAR_CHANCE * chance):
    return None
  momenta = [m for m, _ in analysis.batch_norm_settings(exp.description.model,
                                                          exp.data.image_shape)]
  steps_trained = summary['epochs'] * (len(exp.data.train.labels) // config.batch_size)
  if not momenta or steps_trained <= 0 or max(momenta) ** steps_trained <= BATCH_NORM_INITIAL_SHARE:
    return None
  momentum = max(momenta)
  return (f'warning: validation accuracy {100 * summary["final_val_accuracy"]:.2f}% is near chance '
          f'({100 * chance:.0f}%): BatchNorm momentum {momentum} over the {steps_trained} steps '
          f'trained leaves {100 * momentum ** steps_trained:.0f}% of the initial moving statistics '
          f'in place, and evaluation normalises with them; {_batch_norm_remedies(momentum)}')


def _model_table(description: experiment_lib.ModelDescription, data: experiment_lib.Data) -> str:
  (h, w, c), config = data.image_shape, description.config
  table = analysis.format_table(description.report,
                                f'{config.model} on {h}x{w}x{c} ({data.dataset.source})')
  if description.width['fit_params']:
    table += '\n' + budget.describe(description.width)
  return table


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
  val = {k: float(steps.host_value(v))
         for k, v in exp.evaluate(exp.eval_state(state, epoch), *val_arrays).items()}
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
  """summary.json's contents: the final test accuracy (and TTA), the run's figures, the config.

  `state` is the state evaluated (with PreciseBN statistics when the run recomputes them).
  """
  config, data, report = exp.config, exp.data, exp.description.report
  test = data.test
  if _validated_on_all_of_test(exp):
    test_accuracy = history[-1]['val_accuracy']  # Validation already ran on the whole test split.
  else:
    test_accuracy = float(steps.host_value(exp.evaluate(state, *exp.put_split(test))['accuracy']))
  extra = {}
  if config.get('tta_flip', False):
    # Reported beside test_accuracy, never in its place: the sources evaluated single views.
    extra['test_accuracy_tta_flip'] = float(steps.host_value(
        exp.evaluate_tta_flip(state, *exp.put_split(test))['accuracy']))
  if exp.evaluate_tta_multicrop is not None:
    extra['test_accuracy_tta_multicrop'] = float(steps.host_value(
        exp.evaluate_tta_multicrop(state, *exp.put_split(test))['accuracy']))
  best = max(history, key=lambda r: r['val_accuracy'])
  width = exp.description.width
  matrix = confusion_lib.experiment_confusion(exp, state, test)
  return {
      'model': config.model,
      'dataset': data.dataset.source,
      'params_total': report.params_total,
      'params_trainable': report.params_trainable,
      'params_non_trainable': report.params_non_trainable,
      'macs_per_image': report.macs_total,
      # BatchNorm momenta and epsilons and layer forms as the model ran them (config.bn_momentum
      # and the like say None for "the model's own").
      'model_options': experiment_lib.model_options_used(config, exp.model, data.image_shape,
                                                         exp.forms),
      'width_multiplier': width['width_multiplier'],
      'fit_params': width['fit_params'],
      'val_split': data.val_split,
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


def _validated_on_all_of_test(exp: experiment_lib.Experiment) -> bool:
  """Whether validation already ran on the whole test split (its figure is the test figure)."""
  return exp.data.val_split == 'test' and not exp.config.eval_examples


def _ema_extra_results(exp: experiment_lib.Experiment, state, epoch: int, val_arrays
                       ) -> list[dict[str, Any]]:
  """Each further average's (config.ema_extra_decays) final validation and test figures, its
  weights evaluated as the run's EMA weights are (with PreciseBN statistics of their own when the
  run recomputes them)."""
  config, data = exp.config, exp.data
  test_on_val = _validated_on_all_of_test(exp)
  test_arrays = None if test_on_val else exp.put_split(data.test)
  results = []
  for decay, params in zip(experiment_lib.ema_extra_decays_of(config),
                           steps.further_averages(state), strict=True):
    evaluated = exp.eval_state(state.replace(ema_params=params), epoch)
    val = {k: float(steps.host_value(v)) for k, v in exp.evaluate(evaluated, *val_arrays).items()}
    test = val['accuracy'] if test_on_val else float(
        steps.host_value(exp.evaluate(evaluated, *test_arrays)['accuracy']))
    results.append({'decay': decay, 'final_val_accuracy': val['accuracy'],
                    'final_val_loss': val['loss'], 'test_accuracy': test})
  return results


def _write_eval_batch_stats(workdir: str, batch_stats) -> None:
  host = jax.tree.map(steps.host_value, batch_stats)
  name = experiment_lib.EVAL_BATCH_STATS
  with fileio.writing(f'{name} to {workdir!r}'):
    with fileio.atomic_open(os.path.join(workdir, name), 'wb') as f:
      f.write(flax.serialization.to_bytes(host))


def _write_summary(workdir: str, summary: dict[str, Any], history) -> None:
  with fileio.writing(f'summary.json, curves.png and confusion.png to {workdir!r}'):
    reporting.plot_curves([('', history)], os.path.join(workdir, 'curves.png'),
                          title=f'{summary["model"]} ({summary["dataset"]})',
                          val_splits=[summary['val_split']])
    confusion_lib.plot_confusion(np.asarray(summary['test_confusion']), summary['class_names'],
                                 os.path.join(workdir, 'confusion.png'))
    # summary.json last: it marks a finished run (bench and load_run look for it).
    fileio.atomic_write_json(os.path.join(workdir, 'summary.json'), summary)
  _print_result(summary)


def _print_result(summary: dict[str, Any]) -> None:
  best = summary['max_val_accuracy']
  split = reporting.val_split_of(summary)
  on = '' if split == 'test' else f', on the {split}'
  print(f'max val accuracy {100 * best:.2f}% (epoch {summary["best_epoch"]}{on}), test accuracy '
        f'{100 * summary["test_accuracy"]:.2f}%, {summary["train_seconds"]:.1f} s of training',
        flush=True)
  decay = summary.get('config', {}).get('ema_decay')
  for row in summary.get('ema_extra', ()):
    print(f'  EMA decay {row["decay"]:g} in place of {decay:g}: final val accuracy '
          f'{100 * row["final_val_accuracy"]:.2f}%{on.replace(",", "", 1)}, test accuracy '
          f'{100 * row["test_accuracy"]:.2f}%', flush=True)
