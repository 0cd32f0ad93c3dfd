"""The compiled parts of training: the train state, one step, one epoch, evaluation, the mesh.

An epoch is one compiled call: a seeded permutation, then `lax.scan` over the steps, each gathering
its batch from the device-resident uint8 dataset, preprocessing, augmenting and updating.
Evaluation is one compiled call over the padded split with a mask, so the last partial batch
counts. Preprocessing is one function used by both, which makes the source Baseline's bug (test
images not preprocessed like training images) impossible.

Data parallelism: all devices form a 1-D mesh with axis 'batch'; parameters are replicated and
each step's batch is sharded over the mesh, so XLA's SPMD partitioner computes BatchNorm statistics
and gradients over the global batch. `train_step` itself is a pure function of
(state, images, labels, key).

Randomness is derived from the seed by folding in (purpose, epoch, step), never carried, so a run
resumed from the checkpoint of epoch E draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

from typing import Any, Callable

from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from dsconv_jax import augment as augment_lib

# Streams of randomness folded from the seed: one purpose each.
INIT, PERMUTATION, STEP = 0, 1, 2


class TrainState(train_state.TrainState):
  batch_stats: Any


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images -> float32 network input; identical for training and evaluation."""
  return (images.astype(jnp.float32) - mean) / std


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy (Keras' categorical_crossentropy on softmax outputs)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


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
        jax.random.fold_in(jax.random.fold_in(seed_key, PERMUTATION), epoch), labels.shape[0])
    batches = perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    epoch_key = jax.random.fold_in(jax.random.fold_in(seed_key, STEP), epoch)

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


def padded_split(split, batch_size: int):
  """(images, labels, mask) of a data split padded with masked zeros to a multiple of batch_size."""
  n = len(split.labels)
  total = -(-n // batch_size) * batch_size
  pad = total - n
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.zeros(pad, np.int32)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return images, labels, mask
