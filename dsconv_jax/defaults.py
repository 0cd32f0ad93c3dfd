"""Default config values shared by every config in configs/: source 000's Model 3 recipe.

Config files call `get_config()` from here and override a handful of fields, so that they work
wherever the package is installed and whatever the working directory.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model: a name from dsconv_jax.models.MODELS; 'sequential', the model of config.layers; or an
  # import path 'package.module:Class' of any flax.linen.Module (importable from the working
  # directory, or installed), called as module(images, train=...) and returning logits.
  config.model = 'model3'
  # Keyword overrides for the model's constructor.
  config.model_kwargs = ml_collections.ConfigDict()
  # config.model = 'sequential' only: Keras layer calls as strings, e.g.
  # ['SeparableConv2D(32, 3, padding="same", use_bias=False)', 'BatchNormalization()', ...,
  #  'Conv2D("num_classes", 1)', 'GlobalAveragePooling2D()'] (grammar: dsconv_jax/sequential.py).
  config.layers = ()
  # Momentum and epsilon of every BatchNorm layer (Keras' defaults), for models that declare
  # bn_momentum / bn_epsilon fields (all built-in ones with BatchNorm, and 'sequential').
  config.bn_momentum = 0.99
  config.bn_epsilon = 1e-3
  # Before each evaluation, recompute BatchNorm's statistics as the mean of this many training
  # batches' own statistics, for the weights evaluated (PreciseBN; the EMA weights when
  # ema_decay > 0); training keeps its moving averages. 0 = off (the source recipes: Keras).
  config.bn_recalibrate_batches = 0
  # The augmentation of those batches: 'train' (config.augment's, as training saw the images),
  # or a list like config.augment's ('none' = the images as evaluation sees them).
  config.bn_recalibrate_augment = 'train'
  # Depthwise convolution form of every model, however written (dsconv_jax/fast_forms.py):
  # 'auto' (shifted on CPU; elsewhere the form timed faster on the model's own depthwise
  # convolutions when the run starts), 'grouped', 'shifted'.
  config.depthwise_impl = 'auto'
  # Activation dtype: 'float32', or 'bfloat16' for mixed precision (parameters, BatchNorm
  # statistics, gradients and the loss stay float32). bfloat16 halves activation memory traffic on
  # GPUs and TPUs; on CPUs it is slower (BENCHMARKS.md).
  config.compute_dtype = 'float32'
  # Dropout masks: 'hash' (a seeded counter hash, fused into the step: BENCHMARKS.md) or
  # 'threefry' (jax.random.bernoulli, what runs drew before 'hash' existed; about 2x slower on CPU).
  config.dropout_impl = 'hash'
  # Widest width multiplier (1/64 grid) whose parameter count stays below N; 0 = off (budget.py).
  config.fit_params = 0

  # Data: 'cifar10' (or another tfds name) or 'folder:/path/to/root' (ROOT/{train,test}/<class>/).
  config.dataset = 'cifar10'
  # tfds data_dir ('' = tfds' default, ~/tensorflow_datasets).
  config.data_dir = ''
  # Where decoded datasets (image folders and tfds) are cached as uint8 arrays ('' = no cache).
  config.cache_dir = '~/.cache/dsconv_jax'
  # Resize every image to image_size x image_size (0 = keep the stored size, which must be uniform).
  config.image_size = 0
  # Use only the first N examples of the seeded shuffle of each split (0 = all). The subsets are
  # fixed by data_seed, so that runs with different seeds see the same examples.
  config.train_examples = 0
  config.eval_examples = 0
  config.data_seed = 0
  # Training images held out (class-balanced, drawn by data_seed) and validated on after every
  # epoch, so that choices never see the test split, which is evaluated once at the end
  # (summary.json's val_split 'holdout:N'). 0 validates on the test split, as the source studies
  # did (val_split 'test').
  config.holdout = 0
  # 'scale' (x / 255, source 000) or 'standardize' (per-channel mean/std of the training data).
  config.normalization = 'scale'
  # Comma-separated on-device augmentations: '', 'crop', 'flip', 'altflip' (airbench's alternating
  # flip: each image mirrored in every other epoch), 'cutout' (e.g. 'crop,flip').
  config.augment = ''

  # Training.
  config.num_epochs = 50
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.seed = 0
  # 'keras_adam' (Keras' Adam, eps 1e-7), 'adam' (optax), 'adamw' (decoupled weight decay),
  # 'sgd' (with momentum, nesterov).
  config.optimizer = 'keras_adam'
  config.momentum = 0.9
  config.nesterov = False
  config.learning_rate = 0.01
  # 'inverse_time': lr = learning_rate / (1 + lr_decay * (epoch - 1)), set once per epoch like
  # Keras' LearningRateScheduler; 'constant'; per step: 'cosine' or 'onecycle' (linear) to 0
  # at the end of num_epochs (so a resumed run must keep num_epochs to keep the same schedule).
  config.lr_schedule = 'inverse_time'
  config.lr_decay = 0.319
  # Linear warm-up of the per-step schedules over this many epochs (fractions allowed).
  config.warmup_epochs = 0.0
  # Weight decay on kernels only, never BatchNorm parameters or biases (0 = off).
  config.weight_decay = 0.0
  # Learning-rate multiplier of the BatchNorm biases (1 = the same as every other parameter).
  config.bn_bias_lr_multiplier = 1.0
  # Identity (Dirac) initialisation of the convolutions (`layers.dirac_init`; airbench).
  config.dirac_init = False
  # Label smoothing of the training loss (0 = off; 0.1 is usual).
  config.label_smoothing = 0.0
  # Decay of an exponential moving average of the weights, evaluated instead of them (0 = off).
  config.ema_decay = 0.0
  # Also report test_accuracy_tta_flip in summary.json (image and mirror averaged; off).
  config.tta_flip = False
  # Also report test_accuracy_tta_multicrop: airbench's multi-crop TTA, the image (and with
  # tta_flip its mirror) plus the image shifted by this many pixels up-left and down-right
  # (0 = off; airbench uses 1).
  config.tta_translate = 0
  # Make XLA's GPU kernels deterministic (--xla_gpu_deterministic_ops): bitwise-repeatable GPU
  # runs at some cost in speed. CPU runs are deterministic without it.
  config.deterministic = False
  # Checkpoints kept (the newest ones); more than 1 lets a damaged newest one fall back.
  config.checkpoint_keep = 2

  # The design rules of the source assignment, checked by `summary` and before training.
  config.constraints = ml_collections.ConfigDict()
  config.constraints.max_params = 100_000  # The Keras total must stay below this (0 = no limit).
  config.constraints.depthwise_separable_only = True  # No k x k (k > 1) convolution across channels.
  config.constraints.require_batch_norm = True
  config.constraints.allow_dense = False
  return config


def get_testing_config() -> ml_collections.ConfigDict:
  """A tiny model on a few images, used for testing only."""
  config = get_config()
  config.model = 'tiny'
  config.num_epochs = 1
  config.batch_size = 8
  config.eval_batch_size = 16
  config.train_examples = 32
  config.eval_examples = 16
  config.cache_dir = ''
  return config
