"""Learning-rate schedules and optimizers, including Keras' exact Adam.

Keras' Adam differs from `optax.adam` in where epsilon goes: Keras divides by
`sqrt(v) + eps` before the bias correction folded into the step size,
`lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, with eps = 1e-7, while optax divides by
`sqrt(v_hat) + eps` with eps = 1e-8. Early in training that makes Keras' effective epsilon ~30x
larger. `keras_adam` reproduces Keras so the source recipes are trained as they were.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsconv_jax.errors import UserError

Schedule = Callable[[jax.Array | int], jax.Array]


PER_EPOCH_SCHEDULES = ('inverse_time', 'constant')
PER_STEP_SCHEDULES = ('cosine', 'onecycle', 'cosine_onecycle')
# 'cosine_onecycle' starts at learning_rate / this (PyTorch's OneCycleLR default div_factor).
ONECYCLE_DIV_FACTOR = 25.0
# config.weight_decay_params: which parameters weight decay shrinks.
WEIGHT_DECAY_PARAMS = ('kernels', 'all')


def create_learning_rate_fn(config, steps_per_epoch: int) -> Callable[[int], float]:
  """Returns lr(epoch) for 1-based epochs: the value the epoch's first step uses.

  'inverse_time' is source 000's `LearningRateScheduler(lambda epoch, lr: lr0 / (1 + decay *
  epoch))` with Keras' 0-based epoch: lr(1) = lr0, lr(2) = lr0 / (1 + decay), ... and, like the
  other per-epoch kind 'constant', holds within an epoch. The per-step kinds ('cosine',
  'onecycle', 'cosine_onecycle', see `create_schedule`) change every step; lr(epoch) then reports their value at the
  epoch's first step, which is what metrics.jsonl's `learning_rate` shows.
  """
  lr0 = float(config.learning_rate)
  kind = config.lr_schedule
  if lr0 <= 0:
    raise UserError(f'config.learning_rate must be > 0, got {lr0}')
  if kind == 'inverse_time':
    decay = float(config.lr_decay)
    return lambda epoch: lr0 / (1.0 + decay * (epoch - 1))
  if kind == 'constant':
    return lambda epoch: lr0
  if kind in PER_STEP_SCHEDULES:
    schedule = _per_step_schedule(config, steps_per_epoch)
    return lambda epoch: float(schedule((epoch - 1) * steps_per_epoch))
  raise UserError(f'config.lr_schedule must be one of '
                  f'{", ".join(PER_EPOCH_SCHEDULES + PER_STEP_SCHEDULES)}, got {kind!r}')


def _per_step_schedule(config, steps_per_epoch: int) -> Schedule:
  """'cosine' or 'onecycle' with a linear warm-up over `config.warmup_epochs`, to 0 at the end;
  or 'cosine_onecycle'.

  optax's own schedules, joined: warm-up lr0 * (step + 1) / warmup_steps (so that no step trains
  at lr 0), then `optax.cosine_decay_schedule` ('cosine') or `optax.linear_schedule` to 0
  ('onecycle', the triangular one-cycle of airbench) over the remaining steps.
  'cosine_onecycle' is PyTorch's OneCycleLR with anneal_strategy='cos' (xvel/cifar10-tiniest's):
  a cosine from lr0 / 25 up to lr0 over the warm-up, then a cosine down to
  `config.final_learning_rate` at the end (`optax.piecewise_interpolate_schedule`, which
  `optax.cosine_onecycle_schedule` is built on; that one cannot end at 0).
  """
  lr0 = float(config.learning_rate)
  total = max(1, int(config.num_epochs) * steps_per_epoch)
  warmup = float(config.get('warmup_epochs', 0.0) or 0.0)
  if warmup < 0:
    raise UserError(f'config.warmup_epochs must be >= 0, got {warmup}')
  warmup_steps = min(int(round(warmup * steps_per_epoch)), total - 1)
  if config.lr_schedule == 'cosine_onecycle':
    final = config.get('final_learning_rate', 0.0) or 0.0
    if not isinstance(final, (int, float)) or isinstance(final, bool) or not 0 <= final <= lr0:
      raise UserError('config.final_learning_rate must be a number in [0, learning_rate], got '
                      f'{final!r}')
    start = lr0 / ONECYCLE_DIV_FACTOR
    return optax.piecewise_interpolate_schedule(
        'cosine', start, {warmup_steps: ONECYCLE_DIV_FACTOR, total: float(final) / lr0})
  decay_steps = max(1, total - warmup_steps)
  if config.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr0, decay_steps)
  else:
    decay = optax.linear_schedule(lr0, 0.0, decay_steps)
  if not warmup_steps:
    return decay
  # From lr0 / W at step 0 to lr0 at step W - 1 (a constant lr0 when W is 1).
  warm = optax.linear_schedule(lr0 / warmup_steps, lr0, warmup_steps - 1)
  return optax.join_schedules([warm, decay], [warmup_steps])


def create_schedule(config, steps_per_epoch: int) -> Schedule:
  """The per-step learning rate the optimizer uses, traceable inside jit (step 0 is epoch 1)."""
  if config.lr_schedule in PER_STEP_SCHEDULES:
    create_learning_rate_fn(config, steps_per_epoch)  # Validates learning_rate.
    return _per_step_schedule(config, steps_per_epoch)
  return step_schedule(create_learning_rate_fn(config, steps_per_epoch), steps_per_epoch)


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


def decay_mask(params) -> Any:
  """True for the parameters weight decay applies to: kernels (ndim > 1), not BN scales or biases.

  Decaying BatchNorm's scale and bias or a conv's bias only shrinks what BN re-normalises anyway
  and hurts small nets; every kernel here (depthwise, pointwise, dense) has ndim >= 2.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _keras_adam(config, schedule: Schedule) -> optax.GradientTransformation:
  return optax.chain(scale_by_keras_adam(), optax.scale_by_learning_rate(schedule))


def _sgd(config, schedule: Schedule) -> optax.GradientTransformation:
  return optax.sgd(schedule, momentum=config.get('momentum', 0.9) or None,
                   nesterov=bool(config.get('nesterov', False)))


def weight_decay_mask(config) -> Callable[[Any], Any] | None:
  """The mask of config.weight_decay_params: 'kernels' (`decay_mask`) or 'all' (None: every
  parameter, as PyTorch's AdamW decays them unless told otherwise)."""
  which = config.get('weight_decay_params', 'kernels')
  if which not in WEIGHT_DECAY_PARAMS:
    raise UserError(f'config.weight_decay_params must be one of {", ".join(WEIGHT_DECAY_PARAMS)}, '
                    f'got {which!r}')
  return decay_mask if which == 'kernels' else None


def _adamw(config, schedule: Schedule) -> optax.GradientTransformation:
  return optax.adamw(schedule, weight_decay=float(config.get('weight_decay', 0.0) or 0.0),
                     mask=weight_decay_mask(config))


# config.optimizer -> (config, per-step schedule) -> transformation, before weight decay.
OPTIMIZERS: dict[str, Callable[[Any, Schedule], optax.GradientTransformation]] = {
    'keras_adam': _keras_adam,
    'adam': lambda config, schedule: optax.adam(schedule),
    'adamw': _adamw,
    'sgd': _sgd,
}
# Optimizers that apply config.weight_decay themselves (decoupled), not as L2 on the gradient.
DECOUPLED_DECAY = ('adamw',)


def _biases_not_given(params) -> Any:
  raise ValueError('config.bn_bias_lr_multiplier needs the model\'s BatchNorm biases: pass '
                   'create_optimizer(..., batch_norm_biases=analysis.batch_norm_biases(model, '
                   'image_shape))')


def create_optimizer(config, schedule: Schedule,
                     batch_norm_biases: Callable[[Any], Any] | None = None
                     ) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer` (a key of `OPTIMIZERS`).

  `config.weight_decay` (0 = off) skips BatchNorm parameters and biases (`decay_mask`; every
  parameter with config.weight_decay_params='all'). For
  'adamw' it is decoupled (optax.adamw: wd * lr * param); for the others it is added to the
  gradient before the optimizer (L2, the classic SGD form). `config.bn_bias_lr_multiplier`
  (1 = off) scales the updates of BatchNorm biases, i.e. their learning rate (airbench trains
  them at a much higher rate than the kernels); `batch_norm_biases` (params -> a tree of bools,
  called when the optimizer is initialised) says which they are, found by what the model
  computes (`analysis.batch_norm_biases`). It is needed only to initialise such an optimizer.
  """
  name = config.optimizer
  wd = float(config.get('weight_decay', 0.0) or 0.0)
  if wd < 0:
    raise UserError(f'config.weight_decay must be >= 0, got {wd}')
  if name not in OPTIMIZERS:
    raise UserError(f'config.optimizer must be one of {", ".join(OPTIMIZERS)}, got {name!r}')
  bias_lr = float(config.get('bn_bias_lr_multiplier', 1.0))
  if bias_lr <= 0:
    raise UserError(f'config.bn_bias_lr_multiplier must be > 0, got {bias_lr}')
  tx = OPTIMIZERS[name](config, schedule)
  if wd and name not in DECOUPLED_DECAY:
    tx = optax.chain(optax.add_decayed_weights(wd, mask=weight_decay_mask(config)), tx)
  if bias_lr != 1.0:
    tx = optax.chain(tx, optax.masked(optax.scale(bias_lr),
                                      batch_norm_biases or _biases_not_given))
  return tx
