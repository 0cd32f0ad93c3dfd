"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The whole dataset is put in device memory once, as uint8. An epoch is one compiled call: a seeded
permutation, then `lax.scan` over the steps, each gathering its batch on the device, preprocessing,
augmenting and updating. Evaluation is one compiled call over the padded split with a mask, so the
last partial batch counts. Preprocessing is one function used by both, which makes the source
Baseline's bug (test images not preprocessed like training images) impossible.

Data parallelism: all devices form a 1-D mesh with axis 'batch'; parameters are replicated and
each step's batch is sharded over the mesh, so XLA's SPMD partitioner computes BatchNorm statistics
and gradients over the global batch. `train_step` itself is a pure function of
(state, images, labels, key).

Randomness is derived from `config.seed` by folding in (purpose, epoch, step), never carried, so a
run resumed from the checkpoint of epoch E draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from dsconv_jax import analysis
from dsconv_jax import augment as augment_lib
from dsconv_jax import checkpoint as checkpoint_lib
from dsconv_jax import data as data_lib
from dsconv_jax import fileio
from dsconv_jax import models
from dsconv_jax import optim
from dsconv_jax import reporting
from dsconv_jax.errors import UserError

# Streams of randomness folded from the seed: one purpose each.
_INIT, _PERMUTATION, _STEP = 0, 1, 2


class TrainState(train_state.TrainState):
  batch_stats: Any


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images -> float32 network input; identical for training and evaluation."""
  return (images.astype(jnp.float32) - mean) / std


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy (Keras' categorical_crossentropy on softmax outputs)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = dict(config.get('model_kwargs', {}) or {})
  kwargs.setdefault('num_classes', num_classes)
  if config.get('depthwise_impl') and config.model != 'baseline':
    kwargs.setdefault('depthwise_impl', config.depthwise_impl)
  return models.create_model(config.model, **kwargs)


def create_train_state(model, key: jax.Array, image_shape, tx) -> TrainState:
  variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape)),
                         train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}))


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               mean: jax.Array, std: jax.Array, augment: tuple[str, ...] = ()):
  """One optimizer step on a batch of uint8 images; returns the new state and batch metrics."""
  x = preprocess(images, mean, std)
  if augment:
    x = augment_lib.apply(augment, x, jax.random.fold_in(key, 0))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        rngs={'dropout': jax.random.fold_in(key, 1)}, mutable=['batch_stats'])
    return cross_entropy_loss(logits, labels).mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates.get('batch_stats', state.batch_stats))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {'loss': loss, 'accuracy': accuracy}


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              mean: jax.Array, std: jax.Array) -> jax.Array:
  """Sums of (loss, correct, count) over the masked examples of a batch."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          preprocess(images, mean, std), train=False)
  loss = cross_entropy_loss(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.stack([jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(mask)])


def make_train_epoch(mesh, *, steps_per_epoch: int, batch_size: int, seed_key: jax.Array,
                     step_fn: Callable) -> Callable:
  """A jitted (state, images, labels, epoch) -> (state, per-step losses and accuracies)."""
  batch_sharding = NamedSharding(mesh, P('batch'))

  def train_epoch(state, images, labels, epoch):
    perm = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(seed_key, _PERMUTATION), epoch), labels.shape[0])
    batches = perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    epoch_key = jax.random.fold_in(jax.random.fold_in(seed_key, _STEP), epoch)

    def body(state, xs):
      step, idx = xs
      x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
      y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)
      return step_fn(state, x, y, jax.random.fold_in(epoch_key, step))

    return jax.lax.scan(body, state, (jnp.arange(steps_per_epoch), batches))

  return jax.jit(train_epoch, donate_argnums=(0,))


def make_evaluate(mesh, *, batch_size: int, step_fn: Callable) -> Callable:
  """A jitted (state, images, labels, mask) -> {'loss', 'accuracy'} over a padded split."""
  batch_sharding = NamedSharding(mesh, P('batch'))

  def evaluate(state, images, labels, mask):
    def body(totals, i):
      take = lambda a: jax.lax.with_sharding_constraint(
          jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size), batch_sharding)
      return totals + step_fn(state, take(images), take(labels), take(mask)), None

    totals, _ = jax.lax.scan(body, jnp.zeros(3), jnp.arange(labels.shape[0] // batch_size))
    return {'loss': totals[0] / totals[2], 'accuracy': totals[1] / totals[2]}

  return jax.jit(evaluate)


def create_mesh() -> jax.sharding.Mesh:
  """All devices of all processes on one data-parallel axis, 'batch'.

  Auto axes: the program is written for one device and XLA's SPMD partitioner splits it, with
  `with_sharding_constraint` saying how each step's batch is laid out.
  """
  return jax.make_mesh((jax.device_count(),), ('batch',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear error per bad value, before any work is done."""
  for key in ('num_epochs', 'batch_size', 'eval_batch_size'):
    if int(config[key]) <= 0:
      raise UserError(f'config.{key} must be a positive integer, got {config[key]}')
  for key in ('train_examples', 'eval_examples'):
    if int(config[key]) < 0:
      raise UserError(f'config.{key} must be >= 0 (0 means the whole split), got {config[key]}')
  n = jax.device_count()
  if config.batch_size % n:
    raise UserError(f'config.batch_size={config.batch_size} does not divide over the {n} devices; '
                    f'use a multiple of {n}')


def _padded_split(split: data_lib.Split, batch_size: int):
  n = len(split.labels)
  total = -(-n // batch_size) * batch_size
  pad = total - n
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return images, labels, mask


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` into `workdir`, resuming from its newest checkpoint; returns the summary."""
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

  model = create_model(config, dataset.num_classes)
  report = analysis.analyze_model(model, image_shape, config.constraints)
  print(analysis.format_table(report, f'{config.model} on {image_shape[0]}x{image_shape[1]}x'
                              f'{image_shape[2]} ({dataset.source})'), flush=True)
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
  tx = optim.create_optimizer(config, optim.step_schedule(epoch_lr, steps_per_epoch))

  mesh = create_mesh()
  replicated = NamedSharding(mesh, P())
  seed_key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(seed_key, _INIT)
  state = jax.jit(functools.partial(create_train_state, model, image_shape=image_shape, tx=tx),
                  out_shardings=replicated)(init_key)

  checkpoints = checkpoint_lib.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                           keep=config.checkpoint_keep)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  start_epoch = 0
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    start_epoch, state = restored
    print(f'resuming from the checkpoint of epoch {start_epoch} in {checkpoints.directory}',
          flush=True)
    if start_epoch > config.num_epochs:
      raise UserError(f'workdir {workdir!r} already holds {start_epoch} epochs, more than '
                      f'config.num_epochs={config.num_epochs}; raise num_epochs or use a new '
                      '--workdir')
  history = [r for r in fileio.read_jsonl(metrics_path) if r.get('epoch', 0) <= start_epoch]
  if is_writer:
    # Drops lines of epochs past the checkpoint (their state was lost) and any torn line.
    fileio.atomic_write_text(metrics_path, ''.join(json.dumps(r, sort_keys=True) + '\n'
                                                   for r in history))

  put = lambda a: jax.device_put(a, replicated)
  mean_d, std_d = put(np.asarray(mean, np.float32)), put(np.asarray(std, np.float32))
  train_images, train_labels = put(train.images), put(train.labels)
  augment = augment_lib.parse(config.augment)
  step_fn = functools.partial(train_step, mean=mean_d, std=std_d, augment=augment)
  train_epoch = make_train_epoch(mesh, steps_per_epoch=steps_per_epoch,
                                 batch_size=config.batch_size, seed_key=seed_key, step_fn=step_fn)
  eval_batch = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()
  evaluate = make_evaluate(mesh, batch_size=eval_batch,
                           step_fn=functools.partial(eval_step, mean=mean_d, std=std_d))
  val_arrays = tuple(put(a) for a in _padded_split(val, eval_batch))

  writer = None
  if is_writer:
    from dsconv_jax import tensorboard
    writer = tensorboard.EventWriter(workdir)

  t0 = time.perf_counter()
  compiled_epoch = train_epoch.lower(state, train_images, train_labels, np.int32(1)).compile()
  compile_seconds = time.perf_counter() - t0
  train_seconds = sum(r['epoch_seconds'] for r in history)

  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    t0 = time.perf_counter()
    state, step_metrics = compiled_epoch(state, train_images, train_labels, np.int32(epoch))
    losses = np.asarray(step_metrics['loss'])
    train_time = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
      bad = int(np.argmin(np.isfinite(losses)))
      raise UserError(f'training diverged: the loss is {losses[bad]} at epoch {epoch}, step '
                      f'{bad + 1}; the checkpoint of epoch {epoch - 1} is kept. Lower '
                      'config.learning_rate')
    val_metrics = jax.device_get(evaluate(state, *val_arrays))
    epoch_seconds = time.perf_counter() - t0
    train_seconds += epoch_seconds
    row = {
        'epoch': epoch,
        'learning_rate': float(epoch_lr(epoch)),
        'train_loss': float(losses.mean()),
        'train_accuracy': float(np.asarray(step_metrics['accuracy']).mean()),
        'val_loss': float(val_metrics['loss']),
        'val_accuracy': float(val_metrics['accuracy']),
        'epoch_seconds': epoch_seconds,
        'train_seconds': train_time,
        'train_images_per_second': steps_per_epoch * config.batch_size / train_time,
    }
    history.append(row)
    if is_writer:
      fileio.append_jsonl(metrics_path, row)
      writer.scalars({k: v for k, v in row.items() if k != 'epoch'}, epoch)
    print(reporting.format_epoch(row, config.num_epochs), flush=True)
    checkpoints.save(epoch, state)
  checkpoints.close()

  if not config.eval_examples:
    test_accuracy = history[-1]['val_accuracy']  # Validation already ran on the whole test split.
  else:
    test_arrays = tuple(put(a) for a in _padded_split(dataset.test, eval_batch))
    test_accuracy = float(jax.device_get(evaluate(state, *test_arrays))['accuracy'])

  best = max(history, key=lambda r: r['val_accuracy'])
  summary = {
      'model': config.model,
      'dataset': dataset.source,
      'params_total': report.params_total,
      'params_trainable': report.params_trainable,
      'params_non_trainable': report.params_non_trainable,
      'max_val_accuracy': best['val_accuracy'],
      'best_epoch': best['epoch'],
      'final_val_accuracy': history[-1]['val_accuracy'],
      'test_accuracy': test_accuracy,
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
    fileio.atomic_write_json(os.path.join(workdir, 'summary.json'), summary)
    reporting.plot_curves([('', history)], os.path.join(workdir, 'curves.png'),
                          title=f'{config.model} ({dataset.source})')
    writer.close()
  print(f'max val accuracy {100 * best["val_accuracy"]:.2f}% (epoch {best["epoch"]}), test '
        f'accuracy {100 * test_accuracy:.2f}%, {train_seconds:.1f} s of training', flush=True)
  return summary
