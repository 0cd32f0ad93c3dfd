"""Learning-rate schedules and optimizers, including Keras' exact Adam.

Keras' Adam differs from `optax.adam` in where epsilon goes: Keras divides by
`sqrt(v) + eps` before the bias correction folded into the step size,
`lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, with eps = 1e-7, while optax divides by
`sqrt(v_hat) + eps` with eps = 1e-8. Early in training that makes Keras' effective epsilon ~30x
larger. `keras_adam` reproduces Keras so the source recipes are trained as they were.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsconv_jax.errors import UserError

Schedule = Callable[[jax.Array | int], jax.Array]


def create_learning_rate_fn(config, steps_per_epoch: int) -> Callable[[int], float]:
  """Returns lr(epoch) for 1-based epochs, constant within an epoch like Keras' scheduler.

  'inverse_time' is source 000's `LearningRateScheduler(lambda epoch, lr: lr0 / (1 + decay *
  epoch))` with Keras' 0-based epoch: lr(1) = lr0, lr(2) = lr0 / (1 + decay), ...
  """
  del steps_per_epoch  # Per-epoch schedules only, so far.
  lr0 = float(config.learning_rate)
  kind = config.lr_schedule
  if lr0 <= 0:
    raise UserError(f'config.learning_rate must be > 0, got {lr0}')
  if kind == 'inverse_time':
    decay = float(config.lr_decay)
    return lambda epoch: lr0 / (1.0 + decay * (epoch - 1))
  if kind == 'constant':
    return lambda epoch: lr0
  raise UserError(f"config.lr_schedule must be 'inverse_time' or 'constant', got {kind!r}")


def step_schedule(epoch_lr: Callable[[int], float], steps_per_epoch: int) -> Schedule:
  """The per-step form of a per-epoch schedule, traceable inside jit (step 0 is in epoch 1)."""
  def schedule(step):
    epoch = step // steps_per_epoch + 1
    return epoch_lr(epoch)
  return schedule


class KerasAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
  """Keras' Adam direction (before the learning rate): see the module docstring."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    return KerasAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                          jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    updates = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
    return updates, KerasAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(config, schedule: Schedule) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer`: keras_adam, adam or sgd (momentum, nesterov)."""
  name = config.optimizer
  if name == 'keras_adam':
    return optax.chain(scale_by_keras_adam(), optax.scale_by_learning_rate(schedule))
  if name == 'adam':
    return optax.adam(schedule)
  if name == 'sgd':
    return optax.sgd(schedule, momentum=config.get('momentum', 0.9) or None,
                     nesterov=bool(config.get('nesterov', False)))
  raise UserError(f"config.optimizer must be 'keras_adam', 'adam' or 'sgd', got {name!r}")
