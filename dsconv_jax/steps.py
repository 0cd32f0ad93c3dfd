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

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from dsconv_jax import augment as augment_lib
from dsconv_jax import nnx_adapter

# Streams of randomness folded from the seed: one purpose each.
INIT, PERMUTATION, STEP, RECALIBRATE, FLIP = 0, 1, 2, 3, 4
# config.compute_dtype values: the dtype of activations (parameters stay float32).
COMPUTE_DTYPES = ('float32', 'bfloat16')


class TrainState(train_state.TrainState):
  batch_stats: Any
  # An exponential moving average of `params`, evaluated in their place; None when
  # config.ema_decay is 0, so that the state (and its checkpoints) are then as before.
  ema_params: Any = None
  # The model's other variable collections that training updates (an NNX model's `nnx.Rngs`
  # keys and counters: `nnx_adapter.STATE`), by collection; None for Linen models.
  model_state: Any = None


class TrainStateWithAverages(TrainState):
  """A `TrainState` that also keeps further moving averages of `params` (config.ema_extra_decays),
  evaluated once at the end. A subclass, not a field of `TrainState`: Orbax stores even a None
  field, so a new field would change every run's checkpoint structure and leave the checkpoints
  of earlier versions unreadable."""
  ema_extra: Any = None  # A tuple of parameter trees, one per decay.


def further_averages(state: TrainState) -> tuple[Any, ...] | None:
  """The state's further moving averages (`TrainStateWithAverages`), or None."""
  return getattr(state, 'ema_extra', None)


def last_decay(decay: float, total_steps: int, warmup: bool) -> float:
  """The decay `update_ema` applies at a run's last step (step `total_steps`): with `warmup`,
  `decay` capped at (1 + total_steps) / (10 + total_steps). Two decays at or above the cap there
  give the same average throughout the run."""
  if not warmup:
    return decay
  return min(decay, (1.0 + total_steps) / (10.0 + total_steps))


def model_variables(state: 'TrainState', params: Any) -> dict[str, Any]:
  """The variables `state.apply_fn` takes: `params`, the BatchNorm statistics, the model state."""
  return {'params': params, 'batch_stats': state.batch_stats, **(state.model_state or {})}


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array,
               dtype: Any = jnp.float32) -> jax.Array:
  """uint8 images -> network input in `dtype`; identical for training and evaluation.

  The arithmetic is float32 whatever `dtype` (the compute dtype, config.compute_dtype), so that
  bfloat16 runs see the float32 values rounded once.
  """
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy (Keras' categorical_crossentropy on softmax outputs).

  With `label_smoothing` = e the target is (1 - e) * one_hot + e / num_classes (Keras' and
  optax's definition); 0 keeps the exact integer-label form of the source recipes.
  """
  # At least float32 (bfloat16 logits are promoted); float64 stays float64 (tests with x64 on).
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def mixed_cross_entropy(logits: jax.Array, labels: jax.Array, partner: jax.Array | None = None,
                        lam: jax.Array | None = None, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy of a mixed batch (`augment.mix_batch`): example i weighs its own
  label by 1 - lam_i and its partner's, labels[partner_i], by lam_i. Cross-entropy is linear in
  the target, so this is the loss against the soft label (1 - lam) one_hot(y) + lam
  one_hot(y_partner) (smoothed as `cross_entropy_loss` smooths). Without `partner`, the plain loss.
  """
  loss = cross_entropy_loss(logits, labels, label_smoothing)
  if partner is None:
    return loss
  partner_loss = cross_entropy_loss(logits, labels[partner], label_smoothing)
  return (1.0 - lam) * loss + lam * partner_loss


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """Per-example T^2 KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al., 2015): the
  student matches the teacher's softened outputs; T^2 keeps the gradient's scale as T changes."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / temperature
  targets = jax.nn.softmax(teacher_logits.astype(logits.dtype) / temperature, axis=-1)
  return temperature ** 2 * optax.kl_divergence(jax.nn.log_softmax(logits, axis=-1), targets)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Distillation in the train step: the teacher's `logits` of the step's (normalised, augmented,
  mixed) batch, and the share `weight` of the distillation loss at `temperature`."""
  logits: Callable[[jax.Array], jax.Array]
  weight: float
  temperature: float


def update_ema(state: 'TrainState', decay: float, warmup: bool = True,
               extra_decays: tuple[float, ...] = ()) -> 'TrainState':
  """Moves `state.ema_params` (and each of `state.ema_extra`, at `extra_decays`) towards
  `state.params` after a step.

  With `warmup` the decay is min(decay, (1 + step) / (10 + step)) (TensorFlow's
  ExponentialMovingAverage with num_updates): early on the average follows the weights closely,
  so that it does not drag the random initialisation into short runs' evaluations. Without it the
  decay is `decay` from the first step (the plain average of xvel/cifar10-tiniest and of
  PyTorch's usual EMA). BatchNorm's moving statistics are not averaged again: they already are a
  moving average, and evaluation uses them with the EMA params.
  """
  step = jnp.asarray(state.step, jnp.float32)

  def moved(average, decay):
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else jnp.float32(decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, average, state.params)

  state = state.replace(ema_params=moved(state.ema_params, decay))
  extra = further_averages(state)
  if extra is not None or extra_decays:
    state = state.replace(ema_extra=tuple(
        moved(average, d) for average, d in zip(extra, extra_decays, strict=True)))
  return state


def create_train_state(model, key: jax.Array, image_shape, tx, ema: bool = False,
                       init_params: Callable[[Any], Any] | None = None,
                       ema_extra: int = 0) -> TrainState:
  """The initial state; with `ema` it also holds `ema_params`, starting at the initial params,
  and with `ema_extra` = n, n further averages (`TrainStateWithAverages`) starting there too.

  `init_params` transforms the model's initial parameters (e.g. `layers.dirac_init`). The
  collections a model names in `state_collections` (an NNX model's) go to `model_state`.
  """
  variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape)),
                         train=False)
  params = variables['params']
  if init_params is not None:
    params = init_params(params)
  model_state = {k: variables[k] for k in getattr(model, 'state_collections', ())
                 if k in variables}
  fields = dict(apply_fn=model.apply, params=params, tx=tx,
                batch_stats=variables.get('batch_stats', {}),
                ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                model_state=model_state or None)
  if ema_extra:
    return TrainStateWithAverages.create(
        **fields, ema_extra=tuple(jax.tree.map(jnp.copy, params) for _ in range(ema_extra)))
  return TrainState.create(**fields)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               mean: jax.Array, std: jax.Array, augment: tuple[str, ...] = (),
               axis_name: str | None = None, label_smoothing: float = 0.0,
               ema_decay: float = 0.0, compute_dtype: str = 'float32',
               flip: jax.Array | None = None,
               strengths: augment_lib.Strengths = augment_lib.Strengths(),
               ema_warmup: bool = True, mix: augment_lib.Mix | None = None,
               teacher: Teacher | None = None, ema_extra_decays: tuple[float, ...] = ()):
  """One optimizer step on a batch of uint8 images; returns the new state and batch metrics.

  A pure function. Under jit with a sharded batch (`make_train_epoch`) it needs nothing else.
  Under `jax.pmap(..., axis_name=A)` pass `axis_name=A` and a state whose model was built with
  `layers.Options(batch_norm_axis=A)`: each device then holds a slice of the batch, and BatchNorm
  statistics, gradients and metrics are averaged over A, so the update is the global batch's (with
  equal slices). Randomness is per call: under pmap, fold the device index
  into `key` when dropout or augmentation should differ between devices. `label_smoothing`
  applies to the training loss only (the reported loss is the smoothed one); `ema_decay` > 0
  updates `state.ema_params` (`update_ema`). `compute_dtype` 'bfloat16' runs activations in
  bfloat16 (mixed precision); parameters, BatchNorm statistics, gradients and the loss stay
  float32. How layers compute (depthwise form, dropout masks) is the model's `layers.Options`.
  `flip` (booleans, one per image) mirrors the images it marks before `augment` (the epoch's
  alternating flip, `augment.alternating_flips`); `strengths` are the ops' (`augment.Strengths`).
  `ema_warmup` False averages with `ema_decay` from the first step (`update_ema`);
  `ema_extra_decays` are the decays of `state.ema_extra`'s averages. `mix` mixes
  the augmented batch (`augment.mix_batch`, its strength a function of `state.step`) and the loss
  weighs both labels (`mixed_cross_entropy`). `teacher` adds distillation: the loss is
  (1 - weight) times the label loss plus weight times `distillation_loss` against the teacher's
  logits of the same batch; the teacher is a fixed function, so under pmap each device computes
  its own slice's logits.
  """
  x = preprocess(images, mean, std)
  if flip is not None:
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  if augment:
    x = augment_lib.apply(augment, x, jax.random.fold_in(key, 0), strengths, mean, std)
  partner = lam = None
  if mix is not None:
    x, partner, lam = augment_lib.mix_batch(mix.kind, x, jax.random.fold_in(key, 2),
                                            mix.strength(state.step))
  teacher_logits = None if teacher is None else jax.lax.stop_gradient(teacher.logits(x))
  # Augmentation runs in float32 so that both precisions see the same augmented images.
  x = x.astype(compute_dtype)

  carried = list(state.model_state or {})

  def loss_fn(params):
    logits, updates = state.apply_fn(
        model_variables(state, params), x, train=True,
        rngs={'dropout': jax.random.fold_in(key, 1)}, mutable=['batch_stats', *carried])
    loss = mixed_cross_entropy(logits, labels, partner, lam, label_smoothing)
    if teacher is not None:
      loss = ((1.0 - teacher.weight) * loss + teacher.weight *
              distillation_loss(logits, teacher_logits, teacher.temperature))
    return loss.mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates.get('batch_stats', state.batch_stats),
                                model_state={k: updates[k] for k in carried} or None)
  if ema_decay:
    state = update_ema(state, ema_decay, ema_warmup, ema_extra_decays)
  return state, metrics


def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              mean: jax.Array, std: jax.Array, tta_flip: bool = False, tta_translate: int = 0,
              compute_dtype: str = 'float32') -> jax.Array:
  """Sums of (loss, correct, count) over the masked examples of a batch.

  Uses `state.ema_params` when the state has them; the views are `eval_logits`'.
  `compute_dtype` as in `train_step`; the loss is float32.
  """
  logits = eval_logits(state, images, mean=mean, std=std, tta_flip=tta_flip,
                       tta_translate=tta_translate, compute_dtype=compute_dtype)
  loss = cross_entropy_loss(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.stack([jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(mask)])


def eval_logits(state: TrainState, images: jax.Array, *, mean: jax.Array, std: jax.Array,
                tta_flip: bool = False, tta_translate: int = 0,
                compute_dtype: str = 'float32') -> jax.Array:
  """The logits that evaluation scores (`eval_step`; per-class results use them too).

  `state.ema_params` in place of `state.params` when the state has them. Test-time augmentation:
  with `tta_flip` the mean of the image's and its left-right mirror's logits; with
  `tta_translate` = t > 0 also airbench's multi-crop, 1/2 the image's (flip-averaged) logits plus
  1/4 each of the image shifted by t pixels up-left and down-right (reflect-padded).
  """
  params = state.params if state.ema_params is None else state.ema_params
  x = preprocess(images, mean, std, compute_dtype)
  apply = lambda x: state.apply_fn(model_variables(state, params), x, train=False)
  return tta_logits(apply, x, tta_flip=tta_flip, tta_translate=tta_translate)


def tta_logits(apply: Callable[[jax.Array], jax.Array], x: jax.Array, *, tta_flip: bool = False,
               tta_translate: int = 0) -> jax.Array:
  """`apply`'s logits of the preprocessed batch `x` under the test-time augmentation of
  `eval_logits` (also `inference.Run.logits`'s)."""
  views = (lambda x: 0.5 * (apply(x) + apply(x[:, :, ::-1, :]))) if tta_flip else apply
  logits = views(x)
  if tta_translate:
    t = tta_translate
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (t, t), (t, t), (0, 0)), mode='reflect')
    logits = (0.5 * logits + 0.25 * views(padded[:, :h, :w]) +
              0.25 * views(padded[:, 2 * t:2 * t + h, 2 * t:2 * t + w]))
  return logits


def _exact_batch_statistics(next_fun, args, kwargs, context):
  """A method interceptor under which each training-mode `nn.BatchNorm` stores its batch's own
  statistics in `batch_stats` (instead of moving its average towards them).

  Flax writes m * old + (1 - m) * batch; with old set to 0 first, dividing by (1 - m) leaves the
  batch's mean and (biased) variance exactly, whatever each layer's momentum m.
  """
  module = context.module
  training = (isinstance(module, nn.BatchNorm) and context.method_name == '__call__'
              and not kwargs.get('use_running_average', module.use_running_average))
  if not training or module.is_initializing():
    return next_fun(*args, **kwargs)
  for name in ('mean', 'var'):
    module.put_variable('batch_stats', name,
                        jnp.zeros_like(module.get_variable('batch_stats', name)))
  y = next_fun(*args, **kwargs)
  for name in ('mean', 'var'):
    module.put_variable('batch_stats', name,
                        module.get_variable('batch_stats', name) / (1.0 - module.momentum))
  return y


def _exact_nnx_batch_statistics(path, module, call, args, kwargs):
  """`_exact_batch_statistics` for an NNX model's `nnx.BatchNorm` (`nnx_adapter.intercept_calls`):
  momentum 0 for the call, so that its statistics become the batch's own. The module is the
  merged copy of one traced call."""
  del path
  if not isinstance(module, nnx.BatchNorm) or _first_not_none(
      kwargs.get('use_running_average'), module.use_running_average):
    return call(*args, **kwargs)
  module.momentum = 0.0
  return call(*args, **kwargs)


def _first_not_none(*values):
  return next((v for v in values if v is not None), None)


def batch_statistics(state: TrainState, images: jax.Array, key: jax.Array, *, mean: jax.Array,
                     std: jax.Array, augment: tuple[str, ...] = (),
                     compute_dtype: str = 'float32',
                     strengths: augment_lib.Strengths = augment_lib.Strengths()) -> Any:
  """Every BatchNorm layer's statistics of one batch, for the weights `eval_step` evaluates.

  The batch goes through the network in training mode (dropout as in training, augmented by
  `augment`: config.bn_recalibrate_augment's), with the EMA weights when the state has them.
  """
  params = state.params if state.ema_params is None else state.ema_params
  x = preprocess(images, mean, std)
  if augment:
    x = augment_lib.apply(augment, x, jax.random.fold_in(key, 0), strengths, mean, std)
  with nn.intercept_methods(_exact_batch_statistics), nnx_adapter.intercept_calls(
      _exact_nnx_batch_statistics):
    _, updates = state.apply_fn(model_variables(state, params), x.astype(compute_dtype),
                                train=True,
                                rngs={'dropout': jax.random.fold_in(key, 1)},
                                mutable=['batch_stats'])
  return updates['batch_stats']


def make_recalibrate(mesh, *, num_batches: int, batch_size: int, num_examples: int,
                     seed_key: jax.Array, stats_fn: Callable) -> Callable:
  """A jitted (state, images, epoch) -> state whose BatchNorm statistics are recomputed.

  PreciseBN (Wu and Johnson, 2021; facebookresearch/pycls): the mean over `num_batches` seeded
  training batches of each batch's statistics, for the weights evaluated, in place of the moving
  averages, which lag behind the weights (and belong to the live weights, not their EMA). Only
  evaluation uses the result; training keeps its own moving averages.
  """
  batch_sharding = NamedSharding(mesh, P('batch'))

  def recalibrate(state, images, epoch):
    key = jax.random.fold_in(jax.random.fold_in(seed_key, RECALIBRATE), epoch)
    perm = jax.random.permutation(key, num_examples)[:num_batches * batch_size]

    def body(total, i):
      idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
      x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
      stats = stats_fn(state, x, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, total, stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
    total, _ = jax.lax.scan(body, zeros, jnp.arange(num_batches))
    return state.replace(batch_stats=jax.tree.map(lambda t: t / num_batches, total))

  return jax.jit(recalibrate)


def make_train_epoch(mesh, *, steps_per_epoch: int, batch_size: int, num_examples: int,
                     seed_key: jax.Array, step_fn: Callable,
                     alternate_flip: bool = False) -> Callable:
  """A jitted (state, images, labels, epoch) -> (state, per-step losses and accuracies).

  `images` and `labels` hold the training split on the devices (rows beyond `num_examples` are
  padding, never drawn); each epoch draws a permutation of the `num_examples` rows. With
  `alternate_flip`, `step_fn` gets `flip=` the batch's alternating flips
  (`augment.alternating_flips`, one draw per seed).
  """
  batch_sharding = NamedSharding(mesh, P('batch'))
  replicated = NamedSharding(mesh, P())

  def train_epoch(state, images, labels, epoch, seed_key):
    perm = jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(seed_key, PERMUTATION), epoch), num_examples)
    batches = perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    epoch_key = jax.random.fold_in(jax.random.fold_in(seed_key, STEP), epoch)

    flips = (augment_lib.alternating_flips(jax.random.fold_in(seed_key, FLIP), num_examples,
                                           epoch) if alternate_flip else None)

    def body(state, xs):
      step, idx = xs
      x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
      y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)
      extra = {} if flips is None else {
          'flip': jax.lax.with_sharding_constraint(flips[idx], batch_sharding)}
      return step_fn(state, x, y, jax.random.fold_in(epoch_key, step), **extra)

    state, metrics = jax.lax.scan(body, state, (jnp.arange(steps_per_epoch), batches))
    return state, jax.lax.with_sharding_constraint(metrics, replicated)

  return _KeyArgument(jax.jit(train_epoch, donate_argnums=(0,)), seed_key)


class _KeyArgument:
  """A jitted `f(*args, seed_key)` called as `f(*args)`: the seed's key is an argument of the
  compiled program, not a constant in it, so that every seed runs one program (and the
  persistent compilation cache serves a bench's further seeds). `lower(...).compile()` gives
  the compiled program, called the same way."""

  def __init__(self, fn: Callable, seed_key: jax.Array):
    self._fn, self._seed_key = fn, seed_key

  def __call__(self, *args):
    return self._fn(*args, self._seed_key)

  def lower(self, *args) -> _KeyArgument:
    return _KeyArgument(self._fn.lower(*args, self._seed_key), self._seed_key)

  def compile(self) -> _KeyArgument:
    return _KeyArgument(self._fn.compile(), self._seed_key)

  def __getattr__(self, name: str):
    return getattr(self._fn, name)  # e.g. a lowered program's as_text, cost_analysis.


def make_evaluate(mesh, *, batch_size: int, step_fn: Callable) -> Callable:
  """A jitted (state, images, labels, mask) -> {'loss', 'accuracy'} over a padded split."""
  batch_sharding = NamedSharding(mesh, P('batch'))

  def evaluate(state, images, labels, mask):
    def body(totals, i):
      take = lambda a: jax.lax.with_sharding_constraint(
          jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size), batch_sharding)
      return totals + step_fn(state, take(images), take(labels), take(mask)), None

    totals, _ = jax.lax.scan(body, jnp.zeros(3), jnp.arange(labels.shape[0] // batch_size))
    return jax.lax.with_sharding_constraint(
        {'loss': totals[0] / totals[2], 'accuracy': totals[1] / totals[2]},
        NamedSharding(mesh, P()))

  return jax.jit(evaluate)


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """`devices` (default: all devices of all processes) on one data-parallel axis, 'batch'.

  Auto axes: the program is written for one device and XLA's SPMD partitioner splits it, with
  `with_sharding_constraint` saying how each step's batch is laid out.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ('batch',),
                           axis_types=(jax.sharding.AxisType.Auto,))


def put_replicated(mesh, array) -> jax.Array:
  """A host array as a global array replicated on every device of `mesh` (any process count)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()),
                                      lambda index: array[index])


def put_sharded_rows(mesh, array) -> jax.Array:
  """A host array as a global array whose rows are split over the mesh's 'batch' axis.

  Each process transfers only the rows of its own devices (the callback is asked only for
  addressable shards), so a host never copies the other hosts' part of the data to a device.
  The row count must divide by the mesh size (see `pad_rows`).
  """
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P('batch')),
                                      lambda index: array[index])


def pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  """`array` with zero rows appended up to a multiple of `multiple`."""
  pad = -len(array) % multiple
  if not pad:
    return array
  return np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)])


def host_value(x: jax.Array) -> np.ndarray:
  """The value of a replicated global array on this host (also when it spans other hosts)."""
  return np.asarray(x.addressable_data(0)) if not x.is_fully_addressable else np.asarray(x)


def padded_split(split, batch_size: int):
  """(images, labels, mask) of a data split padded with masked zeros to a multiple of batch_size."""
  mask = np.ones(len(split.labels), np.float32)
  return tuple(pad_rows(a, batch_size) for a in (split.images, split.labels, mask))
