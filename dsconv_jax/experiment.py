"""Setting up a run from its config: what `main` trains is by construction what `throughput` times.

`create_experiment(config, data)` builds, once, everything a run needs: the model (its width
fitted to a budget, its report), the normalisation, the optimizer and its schedule, the initial
train state on the mesh, the training split on the devices, and the jitted epoch and evaluation.
`train.train_and_evaluate` loops over its epochs; `throughput` times its epoch on synthetic data
(`synthetic_data`); `summary` prints its first stage, `describe_model`. Nothing else builds these.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from dsconv_jax import analysis
from dsconv_jax import augment as augment_lib
from dsconv_jax import budget
from dsconv_jax import data as data_lib
from dsconv_jax import fast_forms
from dsconv_jax import layers
from dsconv_jax import models
from dsconv_jax import optim
from dsconv_jax import steps
from dsconv_jax.errors import UserError


# The BatchNorm statistics a run evaluated with, when they are not the checkpoint's moving
# averages (config.bn_recalibrate_batches): `train` writes them at the end, `inference.load_run`
# uses them, so that predictions and exports are those of the evaluated model.
EVAL_BATCH_STATS = 'eval_batch_stats.msgpack'


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear error per bad value, before any work is done."""
  for key in ('num_epochs', 'batch_size', 'eval_batch_size', 'train_examples', 'eval_examples'):
    # A config file that builds its own ConfigDict is not type-checked by ml_collections.
    if not isinstance(config[key], int) or isinstance(config[key], bool):
      raise UserError(f'config.{key} must be an integer, got {config[key]!r}')
  for key in ('num_epochs', 'batch_size', 'eval_batch_size'):
    if int(config[key]) <= 0:
      raise UserError(f'config.{key} must be a positive integer, got {config[key]}')
  holdout = config.get('holdout', 0)
  if not isinstance(holdout, int) or isinstance(holdout, bool) or holdout < 0:
    raise UserError(f'config.holdout must be an integer >= 0 (0 = validate on the test split), '
                    f'got {holdout!r}')
  for key in ('train_examples', 'eval_examples'):
    if int(config[key]) < 0:
      raise UserError(f'config.{key} must be >= 0 (0 means the whole split), got {config[key]}')
  if config.get('compute_dtype', 'float32') not in steps.COMPUTE_DTYPES:
    raise UserError(f'config.compute_dtype must be one of {", ".join(steps.COMPUTE_DTYPES)}, got '
                    f'{config.compute_dtype!r}')
  models.options_from_config(config)  # depthwise_impl, dropout_impl
  # Optimizer and schedule values (names, signs): building them is cheap and checks each, so a
  # typo fails here rather than after the dataset is decoded.
  optim.create_optimizer(config, optim.create_schedule(config, 1))
  recalibrate = config.get('bn_recalibrate_batches', 0)
  if not isinstance(recalibrate, int) or isinstance(recalibrate, bool) or recalibrate < 0:
    raise UserError('config.bn_recalibrate_batches must be an integer >= 0 (0 = off), got '
                    f'{recalibrate!r}')
  recalibrate_augment(config)
  translate = config.get('tta_translate', 0)
  if not isinstance(translate, int) or isinstance(translate, bool) or not 0 <= translate <= 8:
    raise UserError(f'config.tta_translate must be an integer pixel shift in 0..8 (0 = off), got '
                    f'{translate!r}')
  ema_decay = ema_decay_of(config)
  if not 0.0 <= ema_decay < 1.0:
    raise UserError(f'config.ema_decay must be in [0, 1) (0 = off), got {ema_decay}')
  if not isinstance(config.get('ema_warmup', True), bool):
    raise UserError(f'config.ema_warmup must be True or False, got {config.ema_warmup!r}')
  ema_extra_decays_of(config)
  augment_lib.strengths_from_config(config)
  augment_lib.mix_from_config(config, 1)
  distill_settings(config)
  n = jax.device_count()
  if config.batch_size % n:
    raise UserError(f'config.batch_size={config.batch_size} does not divide over the {n} devices; '
                    f'use a multiple of {n}')


def check_distinct_averages(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """Refuses further EMA decays that keep the same average as another over `total_steps`: with
  config.ema_warmup, decays at or above the warm-up's cap at the last step are capped at every
  step, so they all follow the cap."""
  extra = ema_extra_decays_of(config)
  if not extra:
    return
  warmup = bool(config.get('ema_warmup', True))
  cap = steps.last_decay(1.0, total_steps, warmup)
  capped = [d for d in (ema_decay_of(config), *extra) if d >= cap]
  if len(capped) > 1:
    raise UserError(
        f'config.ema_extra_decays: over this run\'s {total_steps} steps the warm-up caps the '
        f'decays {", ".join(f"{d:g}" for d in capped)} at (1 + step) / (10 + step) at every '
        f'step (at most {cap:.6f}), so they keep the same average; keep one of them, choose '
        'smaller decays, or set config.ema_warmup=False')


def recalibrate_augment(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The augmentations of the PreciseBN batches: config.augment's for 'train', else the list."""
  spec = config.get('bn_recalibrate_augment', 'train')
  if not isinstance(spec, str):
    raise UserError("config.bn_recalibrate_augment must be 'train' or an augmentation list like "
                    f"config.augment's ('none', 'flip', 'crop,flip'), got {spec!r}")
  if spec.strip() == 'train':
    return augment_lib.parse(config.augment)
  names = augment_lib.parse(spec, key='config.bn_recalibrate_augment')
  if 'altflip' in names:  # An epoch-level draw over the training order: no PreciseBN batch has one.
    raise UserError("config.bn_recalibrate_augment cannot name 'altflip'; use 'flip'")
  return names


def ema_decay_of(config: ml_collections.ConfigDict) -> float:
  return float(config.get('ema_decay', 0.0) or 0.0)


def ema_extra_decays_of(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The decays of config.ema_extra_decays ('0.998,0.9995', a number or a sequence), checked:
  each in (0, 1), none repeated nor config.ema_decay's, and only beside an ema_decay > 0."""
  spec = config.get('ema_extra_decays', '') or ''
  if isinstance(spec, str) and not spec.strip():
    return ()
  items = spec.split(',') if isinstance(spec, str) else (
      spec if isinstance(spec, (list, tuple)) else [spec])
  decays = []
  for item in items:
    try:
      if isinstance(item, bool):
        raise ValueError
      decay = float(item.strip() if isinstance(item, str) else item)
    except (TypeError, ValueError):
      decay = None
    if decay is None or not 0.0 < decay < 1.0:
      raise UserError('config.ema_extra_decays must be decays in (0, 1) separated by commas, '
                      f"like '0.998,0.9995' ('' = none), got {spec!r}")
    decays.append(decay)
  if not decays:
    return ()
  if not ema_decay_of(config):
    raise UserError('config.ema_extra_decays needs config.ema_decay > 0: they are averages kept '
                    'beside it')
  if len(set(decays)) < len(decays) or ema_decay_of(config) in decays:
    raise UserError(f'config.ema_extra_decays={spec!r} repeats a decay (or config.ema_decay='
                    f'{ema_decay_of(config)}, which the run keeps anyway)')
  return tuple(decays)


def distill_settings(config: ml_collections.ConfigDict) -> tuple[str, float, float]:
  """(teacher workdir or '', weight, temperature) of config.distill_*, checked."""
  workdir = config.get('distill_workdir', '') or ''
  weight = config.get('distill_weight', 0.5)
  temperature = config.get('distill_temperature', 4.0)
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not isinstance(workdir, str):
    raise UserError(f'config.distill_workdir must be the workdir of a finished run (or \'\' for '
                    f'none), got {workdir!r}')
  if not number(weight) or not 0 <= weight <= 1:
    raise UserError(f'config.distill_weight must be a number in [0, 1], got {weight!r}')
  if not number(temperature) or not temperature > 0:
    raise UserError(f'config.distill_temperature must be a number > 0, got {temperature!r}')
  return workdir, float(weight), float(temperature)


def load_teacher(config: ml_collections.ConfigDict, data: 'Data', mesh, mean: jax.Array,
                 std: jax.Array, run: Any) -> steps.Teacher | None:
  """The `steps.Teacher` of config.distill_workdir (None when unset): the finished run's
  evaluated weights on every device, scoring the student's normalised batch in its own
  normalisation and compute dtype. `run` is that workdir's `inference.load_run` (loaded by the
  caller: inference builds on this module).

  A UserError when the teacher may have trained on what the student validates on (another
  holdout or data_seed), or was trained on other classes or image sizes.
  """
  workdir, weight, temperature = distill_settings(config)
  if not workdir:
    return None
  if run is None:
    raise ValueError('config.distill_workdir is set: pass the loaded teacher run, '
                     'create_experiment(..., teacher_run=inference.load_run(workdir))')
  split = run.summary.get('val_split', 'test')
  if config.get('holdout', 0) and (split != data.val_split or
                                   int(run.config.get('data_seed', 0)) != int(config.data_seed)):
    raise UserError(f'config.distill_workdir={workdir!r} trained beside validation split {split!r} '
                    f'(data_seed {run.config.get("data_seed", 0)}), this run validates on '
                    f'{data.val_split!r} (data_seed {config.data_seed}): the teacher may have '
                    'trained on the images this run validates on; train it with the same '
                    'holdout and data_seed')
  if list(run.class_names) != list(data.dataset.class_names) or tuple(
      run.image_shape) != tuple(data.image_shape):
    raise UserError(f'config.distill_workdir={workdir!r} was trained on other classes or image '
                    f'sizes ({run.num_classes} classes of {run.image_shape}) than this run '
                    f'({data.num_classes} of {tuple(data.image_shape)})')
  # The network as built for `apply` and its variables (for an NNX run too, not the module).
  variables = jax.tree.map(lambda a: steps.put_replicated(mesh, a), run.network_variables)
  t_mean = steps.put_replicated(mesh, np.asarray(run.mean, np.float32))
  t_std = steps.put_replicated(mesh, np.asarray(run.std, np.float32))
  dtype = run.config.get('compute_dtype', 'float32')
  model = run.network

  def logits(x):
    x = ((x * std + mean - t_mean) / t_std).astype(dtype)
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return steps.Teacher(logits, weight, temperature)


@dataclasses.dataclass(frozen=True)
class Data:
  """The dataset of a run and the splits it trains and validates on (seeded subsets, or whole)."""
  dataset: data_lib.Dataset
  train: data_lib.Split
  val: data_lib.Split  # Validated on after every epoch: the holdout, or the test split.
  # What `val` is: 'test' (the test split, as the source studies validated) or 'holdout:N' (N
  # training images never trained on, so that choices are made without the test split).
  val_split: str = 'test'

  @property
  def test(self) -> data_lib.Split:
    """The whole test split, evaluated once at the end (test_accuracy)."""
    return self.dataset.test

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.dataset.image_shape

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Loads `config.dataset`, holds out `config.holdout` training images to validate on (else the
  test split validates), then takes the configured subsets (train_examples of what is left to
  train on, eval_examples of the validation split). Both are drawn by `config.data_seed`, so
  every training seed sees the same images."""
  dataset = data_lib.load_dataset(config.dataset, config.data_dir, config.cache_dir,
                                  config.image_size)
  holdout = config.get('holdout', 0)
  if holdout:
    train, val = data_lib.split_holdout(dataset.train, holdout, config.data_seed,
                                        dataset.num_classes)
    val_split = f'holdout:{holdout}'
  else:
    train, val, val_split = dataset.train, dataset.test, 'test'
  if config.train_examples:
    train = data_lib.take_subset(train, config.train_examples, config.data_seed)
  if config.eval_examples:
    val = data_lib.take_subset(val, config.eval_examples, config.data_seed + 1)
  return Data(dataset, train, val, val_split)


def synthetic_data(num_examples: int, image_shape, num_classes: int, seed: int) -> Data:
  """Random uint8 images and labels (for timing): `num_examples` to train on, a few to validate."""
  rng = np.random.default_rng(seed)
  split = lambda n: data_lib.Split(rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
                                   rng.integers(0, num_classes, (n,), dtype=np.int32))
  dataset = data_lib.Dataset(split(num_examples), split(num_classes),
                             [f'class_{i}' for i in range(num_classes)], 'synthetic')
  return Data(dataset, dataset.train, dataset.test)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
  """A model as the config builds it, with its report (layers, parameters, violations)."""
  config: ml_collections.ConfigDict  # The config with config.fit_params' width applied.
  model: nn.Module
  report: analysis.ModelReport
  width: dict[str, Any]  # budget.resolve_width's info: width_multiplier, fit_params, ...


def describe_model(config: ml_collections.ConfigDict, image_shape, num_classes: int
                   ) -> ModelDescription:
  """Builds `config`'s model for images of `image_shape` (fitting its width first) and reports it."""
  config, width = budget.resolve_width(config, image_shape, num_classes)
  model = models.build_model(config, num_classes)
  report = analysis.analyze_model(model, image_shape, config.constraints)
  given = models.batch_norm_from_config(config)
  if given and not analysis.batch_norm_settings(model, image_shape):
    key, value = next(iter(given.items()))
    raise UserError(f'config.{key}={value} cannot reach model {config.model!r}: it calls no '
                    'BatchNorm layer (flax.linen.BatchNorm or flax.nnx.BatchNorm); leave '
                    f'config.{key} unset (None, the model\'s own)')
  return ModelDescription(config, model, report, width)


def model_options_used(config: ml_collections.ConfigDict, model: Any, image_shape,
                       forms: fast_forms.Forms | None = None) -> dict[str, Any]:
  """The model options as the model runs them, for summary.json: the distinct momenta and
  epsilons of its BatchNorm layers (in call order), and the layer forms it computes with:
  `forms`, the run's (`Experiment.forms`, which every model trains in, however written); without
  them, what the config asks of a model with `options` (None for another model)."""
  settings = analysis.batch_norm_settings(model, image_shape)
  distinct = lambda values: list(dict.fromkeys(values))
  takes_options = models.declares(models.module_class(model), 'options')
  if forms is not None:
    depthwise, dropout = forms.depthwise, forms.dropout
  elif takes_options:
    depthwise = layers.resolve_depthwise_impl(config.get('depthwise_impl', 'auto'))
    dropout = config.get('dropout_impl', 'hash')
  else:
    depthwise = dropout = None
  return {
      'bn_momentum': distinct(m for m, _ in settings),
      'bn_epsilon': distinct(e for _, e in settings),
      'depthwise_impl': depthwise,
      'dropout_impl': dropout,
  }


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once by `create_experiment`."""
  config: ml_collections.ConfigDict  # As `description.config`: the width applied.
  data: Data
  description: ModelDescription
  mesh: jax.sharding.Mesh
  seed_key: jax.Array
  mean: list[float]  # Normalisation, in 0..255 units (the training images' when standardized).
  std: list[float]
  steps_per_epoch: int
  epoch_lr: Callable[[int], float]  # lr(epoch), as metrics.jsonl reports it.
  state: steps.TrainState  # The initial state of the seed, replicated over the mesh.
  train_images: jax.Array  # The training split on the devices, rows sharded over the mesh.
  train_labels: jax.Array
  train_epoch: Callable  # jitted (state, images, labels, epoch) -> (state, per-step metrics)
  eval_batch_size: int
  evaluate: Callable  # jitted (state, images, labels, mask) -> {'loss', 'accuracy'}
  evaluate_tta_flip: Callable  # The same with the mirror-averaged logits.
  # The same with multi-crop TTA (config.tta_translate > 0; flips too with tta_flip), or None.
  evaluate_tta_multicrop: Callable | None = None
  # jitted (state, images, epoch) -> state with recalibrated BatchNorm statistics, or None.
  recalibrate: Callable | None = None
  # The fast forms every step of the run computes in (`accelerate_state`), and the depthwise
  # timings an 'auto' choice was made by (None when nothing was timed).
  forms: fast_forms.Forms | None = None
  depthwise_seconds: dict[str, float] | None = None

  @property
  def model(self) -> nn.Module:
    return self.description.model

  def put_split(self, split: data_lib.Split) -> tuple[jax.Array, ...]:
    """(images, labels, mask) of `split` on the devices, padded for `evaluate`."""
    return tuple(steps.put_sharded_rows(self.mesh, a)
                 for a in steps.padded_split(split, self.eval_batch_size))

  def eval_state(self, state: steps.TrainState, epoch: int) -> steps.TrainState:
    """The state to evaluate after epoch `epoch`: with PreciseBN statistics when configured."""
    if self.recalibrate is None:
      return state
    return self.recalibrate(state, self.train_images, np.int32(epoch))

  def compile_epoch(self, state: steps.TrainState) -> tuple[Callable, float]:
    """The compiled epoch for `state`'s layout, and the seconds compiling took."""
    t0 = time.perf_counter()
    compiled = self.train_epoch.lower(state, self.train_images, self.train_labels,
                                      np.int32(1)).compile()
    return compiled, time.perf_counter() - t0


def init_state(config: ml_collections.ConfigDict, model: nn.Module, image_shape, tx, mesh,
               seed_key: jax.Array) -> steps.TrainState:
  """The initial train state of seed `seed_key`, replicated over `mesh`."""
  init_params = None
  if config.get('dirac_init', False):
    init_params = functools.partial(
        layers.dirac_init,
        convolutions=analysis.parameter_structure(model, image_shape).convolutions)
  return jax.jit(functools.partial(steps.create_train_state, model, image_shape=image_shape,
                                   tx=tx, ema=bool(ema_decay_of(config)),
                                   ema_extra=len(ema_extra_decays_of(config)),
                                   init_params=init_params),
                 out_shardings=NamedSharding(mesh, P()))(jax.random.fold_in(seed_key, steps.INIT))


def accelerate_state(config: ml_collections.ConfigDict, state: steps.TrainState, image_shape,
                     batch_size: int
                     ) -> tuple[steps.TrainState, fast_forms.Forms, dict[str, float] | None]:
  """`state` whose `apply_fn` computes in the fast forms (`dsconv_jax.fast_forms.accelerate`),
  the forms, and the timings behind an 'auto' depthwise choice (taken on accelerators only, on
  the model's training computation at `batch_size` images per device).

  The one place where every model, however it is written, gets the fast forms: every train,
  evaluation and recalibration step calls `state.apply_fn`.
  """
  apply_fn = state.apply_fn

  def trace():
    x = jax.ShapeDtypeStruct((batch_size, *image_shape), config.get('compute_dtype', 'float32'))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return jax.make_jaxpr(lambda v, x: apply_fn(
        v, x, train=True, rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats']))(
            variables, x)

  forms, seconds = fast_forms.resolve_forms(config.get('depthwise_impl', 'auto'),
                                            config.get('dropout_impl', 'hash'), trace)
  return state.replace(apply_fn=fast_forms.accelerate(apply_fn, forms)), forms, seconds


def bind_train_step(config: ml_collections.ConfigDict, mean: jax.Array, std: jax.Array,
                    steps_per_epoch: int = 1, teacher: steps.Teacher | None = None) -> Callable:
  """`steps.train_step` with the config's recipe bound (augmentation and its strengths, batch
  mixing over `steps_per_epoch`-step epochs, label smoothing, EMA, compute dtype, the distillation
  `teacher`) and the normalisation's device arrays."""
  return functools.partial(steps.train_step, mean=mean, std=std,
                           augment=augment_lib.parse(config.augment),
                           strengths=augment_lib.strengths_from_config(config),
                           mix=augment_lib.mix_from_config(config, steps_per_epoch),
                           label_smoothing=float(config.get('label_smoothing', 0.0) or 0.0),
                           ema_decay=ema_decay_of(config),
                           ema_warmup=bool(config.get('ema_warmup', True)),
                           ema_extra_decays=ema_extra_decays_of(config),
                           compute_dtype=config.get('compute_dtype', 'float32'),
                           teacher=teacher)


def create_experiment(config: ml_collections.ConfigDict, data: Data, *,
                      on_model: Callable[[ModelDescription], None] | None = None,
                      teacher_run: Any = None) -> Experiment:
  """Builds the run of `config` on `data`; `on_model` sees the model before the state is built
  (where `main` prints its table and refuses violated constraints). `teacher_run` is the
  `inference.load_run` of config.distill_workdir when that is set."""
  validate_config(config)
  steps_per_epoch = len(data.train.labels) // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'config.batch_size={config.batch_size} is larger than the '
                    f'{len(data.train.labels)} training examples')
  check_distinct_averages(config, steps_per_epoch * config.num_epochs)
  if 'jitter' in augment_lib.parse(config.augment) and data.image_shape[-1] != 3:
    raise UserError(f"config.augment's 'jitter' adjusts RGB colour; these images have "
                    f'{data.image_shape[-1]} channel(s)')
  description = describe_model(config, data.image_shape, data.num_classes)
  if on_model is not None:
    on_model(description)
  config = description.config

  mean, std = data_lib.normalization_stats(data.train.images, config.normalization)
  tx = optim.create_optimizer(config, optim.create_schedule(config, steps_per_epoch),
                              analysis.batch_norm_biases(description.model, data.image_shape))
  mesh = steps.create_mesh()
  seed_key = jax.random.key(config.seed)
  state = init_state(config, description.model, data.image_shape, tx, mesh, seed_key)

  # The data lives on the devices, rows split over the mesh; each process transfers its part.
  n_dev = mesh.size
  state, forms, depthwise_seconds = accelerate_state(config, state, data.image_shape,
                                                     config.batch_size // n_dev)
  mean_d = steps.put_replicated(mesh, np.asarray(mean, np.float32))
  std_d = steps.put_replicated(mesh, np.asarray(std, np.float32))
  train_epoch = steps.make_train_epoch(
      mesh, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
      num_examples=len(data.train.labels), seed_key=seed_key,
      step_fn=bind_train_step(config, mean_d, std_d, steps_per_epoch,
                              load_teacher(config, data, mesh, mean_d, std_d,
                                           teacher_run)),
      alternate_flip='altflip' in augment_lib.parse(config.augment))
  eval_batch_size = _eval_batch_size(config.eval_batch_size, data, n_dev)

  def make_evaluate(tta_flip=False, tta_translate=0):
    # Several views per image are evaluated in proportionally smaller batches.
    views = (2 if tta_flip else 1) * (3 if tta_translate else 1)
    return steps.make_evaluate(
        mesh, batch_size=_view_batch_size(eval_batch_size, views, n_dev),
        step_fn=functools.partial(steps.eval_step, mean=mean_d, std=std_d, tta_flip=tta_flip,
                                  tta_translate=tta_translate,
                                  compute_dtype=config.get('compute_dtype', 'float32')))

  tta_translate = int(config.get('tta_translate', 0) or 0)
  multicrop = (make_evaluate(bool(config.get('tta_flip', False)), tta_translate)
               if tta_translate else None)
  recalibrate_batches = min(int(config.get('bn_recalibrate_batches', 0) or 0), steps_per_epoch)
  recalibrate = None
  if recalibrate_batches:
    recalibrate = steps.make_recalibrate(
        mesh, num_batches=recalibrate_batches, batch_size=config.batch_size,
        num_examples=len(data.train.labels), seed_key=seed_key,
        stats_fn=functools.partial(steps.batch_statistics, mean=mean_d, std=std_d,
                                   augment=recalibrate_augment(config),
                                   strengths=augment_lib.strengths_from_config(config),
                                   compute_dtype=config.get('compute_dtype', 'float32')))
  return Experiment(
      config=config, data=data, description=description, mesh=mesh, seed_key=seed_key,
      mean=mean, std=std, steps_per_epoch=steps_per_epoch,
      epoch_lr=optim.create_learning_rate_fn(config, steps_per_epoch), state=state,
      train_images=steps.put_sharded_rows(mesh, steps.pad_rows(data.train.images, n_dev)),
      train_labels=steps.put_sharded_rows(mesh, steps.pad_rows(data.train.labels, n_dev)),
      train_epoch=train_epoch, eval_batch_size=eval_batch_size, evaluate=make_evaluate(),
      evaluate_tta_flip=make_evaluate(tta_flip=True), evaluate_tta_multicrop=multicrop,
      recalibrate=recalibrate, forms=forms, depthwise_seconds=depthwise_seconds)


def _eval_batch_size(configured: int, data: Data, n_dev: int) -> int:
  """config.eval_batch_size, as a multiple of `n_dev`, or lower: the larger of the splits
  evaluated (val, test) rounded up to a multiple of 6 x `n_dev` (so that the 1, 2, 3 or 6 views
  of TTA divide it: `_view_batch_size`) when that is smaller. A split is padded with masked
  images to a multiple of the batch, so 24 test images in a batch of 1000 compute 1000 images.
  Measured: a 1-epoch DS-ResNet run on 72 generated images (24 test) spends 31 of its 83 s in
  its three final evaluations with batches of 1000; the whole run takes 37 and 19 s with
  batches of 24 against 99 and 56 s (two runs each, alternating)."""
  largest = max(len(data.val.labels), len(data.test.labels), 1)
  lowered = -(-largest // (6 * n_dev)) * (6 * n_dev)
  return lowered if lowered < configured else -(-configured // n_dev) * n_dev


def _view_batch_size(eval_batch_size: int, views: int, n_dev: int) -> int:
  """A batch for evaluating `views` views of each image in about the memory of one view: the
  largest divisor of `eval_batch_size` (so that the padded splits fit) that is a multiple of
  `n_dev` and at most eval_batch_size / views. Measured: six views of a batch of 1000 at once
  took over 20 GB on the CPU (kernel-5 DS-ResNet) and the process was killed; a 1-epoch
  DS-ResNet run with flip TTA peaked at 7.4 GB with one batch of 1000, 4.2 GB with two of 500."""
  for b in range(eval_batch_size // views, 0, -1):
    if eval_batch_size % b == 0 and b % n_dev == 0:
      return b
  return eval_batch_size
