"""Default config values shared by every config in configs/: source 000's Model 3 recipe.

Config files call `get_config()` from here and override a handful of fields, so that they work
wherever the package is installed and whatever the working directory.
"""

import ml_collections
import ml_collections.config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Model: a name from dsconv_jax.models.MODELS; 'sequential', the model of config.layers; or an
  # import path 'package.module:Class' of any flax.linen.Module (importable from the working
  # directory, or installed), called as module(images, train=...) and returning logits, or of any
  # flax.nnx.Module, constructed with rngs= and called as module(images) in the mode that
  # model.train() / model.eval() set.
  config.model = 'model3'
  # Keyword overrides for the model's constructor.
  config.model_kwargs = ml_collections.ConfigDict()
  # config.model = 'sequential' only: Keras layer calls as strings, e.g.
  # ['SeparableConv2D(32, 3, padding="same", use_bias=False)', 'BatchNormalization()', ...,
  #  'Conv2D("num_classes", 1)', 'GlobalAveragePooling2D()'] (grammar: dsconv_jax/sequential.py).
  config.layers = ()
  # Momentum of every BatchNorm layer of any model; None keeps the model's own (the built-in
  # models and 'sequential': Keras' 0.99; DS-ResNet: 0.9).
  config.bn_momentum = ml_collections.config_dict.placeholder(float)
  # Added to the variance before normalising, in every BatchNorm layer; None keeps the model's
  # own (Keras' 1e-3 for the built-in models and 'sequential').
  config.bn_epsilon = ml_collections.config_dict.placeholder(float)
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
  # Dropout masks of every model: 'hash' (a seeded counter hash, fused into the step:
  # BENCHMARKS.md) or 'threefry' (jax.random.bernoulli, Flax's own masks; about 2x slower on CPU).
  config.dropout_impl = 'hash'
  # Widest width multiplier (1/64 grid) whose parameter count stays below N; 0 = off (budget.py).
  config.fit_params = 0

  # Data: 'cifar10' (or another tfds name) or 'folder:/path/to/root' (ROOT/{train,test}/<class>/).
  config.dataset = 'cifar10'
  # tfds data_dir ('' = tfds' default, ~/tensorflow_datasets).
  config.data_dir = ''
  # Where decoded datasets (image folders and tfds) are cached as uint8 arrays ('' = no cache).
  config.cache_dir = '~/.cache/dsconv_jax'
  # JAX's persistent compilation cache: a rerun, a resume and each bench seed load the compiled
  # epoch and evaluation from here ('' = off; JAX_COMPILATION_CACHE_DIR, when set, wins). Bounded
  # (least recently used entries go first); deleting the folder clears it.
  config.compilation_cache_dir = '~/.cache/dsconv_jax/compilation'
  # Resize every image to image_size x image_size (0 = keep the stored size, which must be uniform).
  config.image_size = 0
  # Use only the first N examples of the seeded shuffle of each split (0 = all). The subsets are
  # fixed by data_seed, so that runs with different seeds see the same examples.
  config.train_examples = 0  # Of the training images left after the holdout.
  config.eval_examples = 0  # Of the split validated on after each epoch.
  config.data_seed = 0  # Draws those subsets and the holdout.
  # Training images held out (class-balanced, drawn by data_seed) and validated on after every
  # epoch, so that choices never see the test split, which is evaluated once at the end
  # (summary.json's val_split 'holdout:N'). 0 validates on the test split, as the source studies
  # did (val_split 'test').
  config.holdout = 0
  # 'scale' (x / 255, source 000), 'center' (x / 255 - 0.5) or 'standardize' (per-channel
  # mean/std of the training data).
  config.normalization = 'scale'
  # Comma-separated on-device augmentations, applied in the order named: '', 'crop', 'flip',
  # 'altflip' (airbench's alternating flip: each image mirrored in every other epoch), 'cutout',
  # 'rotate', 'sharpen', 'jitter' (colour) (e.g. 'crop,flip'; dsconv_jax/augment.py).
  config.augment = ''
  # 'crop' pads by 4 pixels mirroring the border ('reflect') or repeating it ('edge').
  config.crop_padding_mode = 'reflect'
  # 'rotate': each image (probability 0.95) turned by an angle uniform in +-this many degrees.
  config.rotate_degrees = 15.0
  # 'sharpen': PIL's sharpness with a factor uniform in [1, this] (probability 0.95; 1 = none).
  config.sharpen_factor = 2.2
  # 'jitter' (probability 0.9): brightness shift, contrast factor, saturation factor and hue turn,
  # each uniform in +-its value (around 0, 1, 1 and 0), kornia's ColorJiggle.
  config.color_jitter = (0.1, 0.1, 0.5, 0.05)
  # Batch mixing after the augmentations: each image is blended with a partner's, lam of the
  # partner's, lam uniform in [0, this], and so is its loss (0 = off; mixup or cutmix, not both).
  config.mixup = 0.0
  # Batch mixing after the augmentations: each image takes a box of lam of its area from a
  # partner's, lam uniform in [0, this], and so does its loss (0 = off; mixup or cutmix, not both).
  config.cutmix = 0.0
  # The bound of lam grows linearly from 0 to mixup/cutmix over this fraction of the epochs
  # (0 = the full bound from the start; xvel/cifar10-tiniest's mixup: 0.5, half the run).
  config.mix_ramp = 0.0

  # Training.
  config.num_epochs = 50  # Passes over the training images.
  config.batch_size = 128  # Global: split over all devices, so it must divide by their number.
  # Images per evaluation step at most (memory only; no effect on results).
  config.eval_batch_size = 1000
  config.seed = 0  # Initialisation, data order, dropout and augmentation (not the subsets).
  # 'keras_adam' (Keras' Adam, eps 1e-7), 'adam' (optax), 'adamw' (decoupled weight decay),
  # 'sgd' (with momentum, nesterov).
  config.optimizer = 'keras_adam'
  config.momentum = 0.9  # Of 'sgd'.
  config.nesterov = False  # Nesterov momentum for 'sgd'.
  config.learning_rate = 0.01  # The peak (or first) learning rate of lr_schedule.
  # 'inverse_time': lr = learning_rate / (1 + lr_decay * (epoch - 1)), set once per epoch like
  # Keras' LearningRateScheduler; 'constant'; per step: 'cosine' or 'onecycle' (linear) to 0
  # at the end of num_epochs (so a resumed run must keep num_epochs to keep the same schedule),
  # or 'cosine_onecycle' (to final_learning_rate).
  config.lr_schedule = 'inverse_time'
  config.lr_decay = 0.319  # Of 'inverse_time' (source 000's value).
  # Linear warm-up of the per-step schedules over this many epochs (fractions allowed).
  config.warmup_epochs = 0.0
  # Weight decay (0 = off), on the parameters weight_decay_params names.
  config.weight_decay = 0.0
  # The learning rate 'cosine_onecycle' ends at (it starts at learning_rate / 25, rises over
  # warmup_epochs and falls along a cosine: PyTorch's OneCycleLR).
  config.final_learning_rate = 0.0
  # What weight decay shrinks: 'kernels' (not BatchNorm parameters or biases) or 'all'.
  config.weight_decay_params = 'kernels'
  # Learning-rate multiplier of the BatchNorm biases (1 = the same as every other parameter).
  config.bn_bias_lr_multiplier = 1.0
  # Identity (Dirac) initialisation of the convolutions (`layers.dirac_init`; airbench).
  config.dirac_init = False
  # Label smoothing of the training loss (0 = off; 0.1 is usual).
  config.label_smoothing = 0.0
  # Decay of an exponential moving average of the weights, evaluated instead of them (0 = off).
  config.ema_decay = 0.0
  # Cap the decay at (1 + step) / (10 + step) early on (TensorFlow's num_updates), so the average
  # forgets the initial weights fast; False averages with ema_decay from the first step.
  config.ema_warmup = True
  # Further decays, e.g. '0.998,0.9995' ('' = none): moving averages of the weights kept beside
  # ema_decay's (same warm-up), each evaluated once at the end on the validation split and test
  # (summary.json 'ema_extra'), so that one run compares decays. Training is unchanged. With the
  # warm-up, decays at or above its cap at the last step follow the cap alike: one at most.
  config.ema_extra_decays = ''
  # Distillation: a finished run's workdir whose model (the teacher) scores every training batch
  # as the student sees it; '' = off. The loss is (1 - distill_weight) x the label loss +
  # distill_weight x T^2 KL(teacher || student) at temperature T = distill_temperature. The
  # teacher must have trained on the same split (holdout, data_seed).
  config.distill_workdir = ''
  # The teacher's share of the loss, in [0, 1] (with distill_workdir).
  config.distill_weight = 0.5
  # The softmax temperature T of teacher and student in the distillation term (with
  # distill_workdir; the term is scaled by T^2).
  config.distill_temperature = 4.0
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
  config.constraints.require_batch_norm = True  # At least one BatchNorm layer.
  config.constraints.allow_dense = False  # Dense (fully connected) layers allowed.
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
