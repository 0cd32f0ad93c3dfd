"""This project's model under the source rules: DS-ResNet, a depthwise-separable ResNet.

    python -m dsconv_jax.main --config=configs/dsresnet.py --workdir=runs/dsresnet

Widths (32,96,128) with blocks (1,2,1): most parameters in the middle (16x16) stage, fitted to the
budget by `fit_params` (width multiplier 63/64): 97,378 parameters (95,490 trainable; Keras count,
BatchNorm statistics included), 22.5M MACs per image. Depthwise 3x3 + pointwise convolutions
only, BatchNorm, identity shortcuts, max-pool downsampling, a pointwise conv to the classes on the
8x8 map, then global average pooling; output receptive field 48 pixels (covers 32x32). BatchNorm
momentum 0.9 rather than Keras' 0.99 (see the model's docstring and
results/proxy-dsresnet-recipe-bn099). See `models.DSResNet` and
`python -m dsconv_jax.summary --config=configs/dsresnet.py`. The model's own defaults (widths
(40,80,160), blocks (1,1,1): 95,456 parameters, 19.5M MACs, ~1.3x faster on the CPU) were this
config's until issue 16's 50-epoch runs put the middle-stage architecture ahead on both seeds:
--config.model_kwargs.widths='(40,80,160)' --config.model_kwargs.blocks='(1,1,1)'
--config.fit_params=0 trains them.

Recipe (each part a config key, off in the source configs): SGD with Nesterov momentum, batch 128,
lr 0.1 with a 2-epoch linear warm-up then cosine to 0 per step, weight decay 5e-4 on kernels only,
no label smoothing, an EMA of the weights (0.999) for evaluation with BatchNorm statistics
recomputed for those weights over 40 training batches before each evaluation (PreciseBN,
`bn_recalibrate_batches`: the moving statistics belong to the live weights, which cost a 50-epoch
run 2.5 points at the end, issue 16), per-channel standardisation, random crop (reflect pad 4),
horizontal flip and cutout (one 8x8 square; the regulariser for the 10-point train/test gap of
the run that opened issue 16) on the device; test_accuracy_tta_flip and
test_accuracy_tta_multicrop (airbench's multi-crop TTA, `tta_translate=1`: evaluation only, +0.30
to +0.51 points over flip TTA in every run of results/recipe10-cpu and +0.44 at 50 epochs) are
reported beside test_accuracy.

Goal: 92% final test accuracy in 50 epochs (mean of 5 seeds); best source result 84.5%.
Measured, 50 epochs on the whole CIFAR-10 JPEG copy, CPU (test / flip TTA / multi-crop TTA):
  this config, seed 0 (results/dsresnet-b128-ls0-cpu-50ep): 88.62% / 88.77% / 89.24%
the best 50-epoch figure so far. With GELU and batch 64 / lr 0.05 on top (seed 0,
results/dsresnet-gelu-b64-cpu-50ep): 88.31% / 88.89% / 89.35%, ahead at each of epochs 1-36 and
level at the end, so neither is taken. Two blocks at 32x32 and 16x16 with this recipe, widths
(32,64,128) and blocks (2,2,1) (results/dsresnet-early221-cpu-50ep): 88.15% / 88.62% / 89.18%,
behind this config's run at every epoch from 11 on. More compute at 32x32 and 16x16, widths
(40,96,112) and blocks (2,3,1), 28.1M MACs (results/dsresnet-hr231-cpu-50ep): 88.22% / 88.93% /
89.18%, level to epoch 45 and 0.40 behind at the end. Weight decay 2.5e-4
(results/dsresnet-wd25-cpu-50ep): 88.06% / 88.60% / 89.13%, level to epoch 39, then 0.28-0.56
behind. Weight decay 1e-3 (results/dsresnet-wd1e3-cpu-50ep): 88.45% / 88.80% / 89.18%, behind
by 0.54-1.19 over epochs 11-30 and level over 43-49. depthwise_norm=bn_act
(results/dsresnet-dwbnact-cpu-50ep): 87.75% / 88.52% / 88.87%, level to epoch 18 and behind at
each of epochs 19-50 (by 0.16-0.87), training accuracy 91.42%. The runs below trained the config's former
recipe (batch 256, lr 0.2, label smoothing 0.1, 20 recalibration batches: --config.batch_size=256
--config.learning_rate=0.2 --config.label_smoothing=0.1 --config.bn_recalibrate_batches=20);
with it this architecture averaged 88.25% test over five seeded runs (the two CPU seeds below
and three H200 seeds):
  this architecture, seed 0 (results/dsresnet-mid121-cpu-50ep): 88.09% / 88.66% / 88.92%
  this architecture, seed 1 (results/dsresnet-mid121-seed1-cpu-50ep): 88.40% / 88.73% / 89.03%
  former default (40,80,160)/(1,1,1), seed 0 (results/dsresnet-cpu-50ep): 87.73% / 88.14% / 88.58%
  former default, seed 1 (results/dsresnet-seed1-cpu-50ep): 87.29% / 87.90% / 88.30%
so a mean of +0.74 points test for this architecture over two seeds each (seed 1 alone: +1.11
test, +0.73 multi-crop TTA). On an H200, seeds 0-2 (results/gpu-h200-dsresnet-bench): 88.25 ±
0.11% test, 89.06% multi-crop TTA. Without cutout (--config.augment=crop,flip), seed 0
(results/dsresnet-mid121-nocutout-cpu-50ep): 87.95% / 88.85% / 89.17%, inside the seed spread of
the run with it (at 10 epochs cutout cost 1.13 points, results/recipe10-cpu); cutout stays.
The run that opened issue 16 (the recipe before the PreciseBN evaluation and cutout, made
outside the project): 84.89% final test, 87.59% with statistics recomputed offline, 98.0% on
training images.
"""

import ml_collections

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'dsresnet'
  # The architecture, each field overridable: --config.model_kwargs.kernel_size=5,
  # --config.model_kwargs.widths='(32,64,112)' --config.model_kwargs.blocks='(1,2,2)'
  # --config.model_kwargs.activation=gelu, --config.model_kwargs.expansion=3 (inverted residual
  # blocks, MobileNetV2's; 0 = the basic block of two depthwise-separable convs),
  # --config.model_kwargs.depthwise_norm=bn_act (BatchNorm and activation between each depthwise
  # and its pointwise, MobileNetV1's layer; 'bn' the BatchNorm alone; '' Keras' SeparableConv2D),
  # --config.model_kwargs.dilation=2 (every depthwise filter after the stem dilated),
  # --config.model_kwargs.kernel_mix=3,7,7d3 (channels split across kernels and dilations).
  config.model_kwargs = ml_collections.ConfigDict(
      {'widths': (32, 96, 128), 'blocks': (1, 2, 1), 'stem_multiplier': 8, 'kernel_size': 3,
       'activation': 'relu', 'expansion': 0, 'depthwise_norm': '', 'dilation': 1,
       'kernel_mix': ''})
  # The width multiplier that keeps the parameters under 100,000 (63/64 for the widths above),
  # found again for any override of the architecture; 0 builds the widths as given.
  config.fit_params = 99_999
  config.bn_momentum = 0.9  # Keras' 0.99 settles too slowly for short runs (models.DSResNet).
  # Batch 128 / lr 0.1 and no label smoothing: +0.53 points test over batch 256 / lr 0.2 / 0.1
  # at 50 epochs, seed 0 (results/dsresnet-b128-ls0-cpu-50ep; the two changes were stacked).
  config.batch_size = 128
  config.normalization = 'standardize'
  config.augment = 'crop,flip,cutout'  # results/dsresnet-cpu-50ep; 'crop,flip' to leave it out.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.1
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 2.0
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0
  config.ema_decay = 0.999
  config.bn_recalibrate_batches = 40  # 5,120 images: statistics for the EMA weights evaluated.
  config.tta_flip = True
  config.tta_translate = 1  # Multi-crop TTA, reported as test_accuracy_tta_multicrop.
  # Validate on 5,000 training images held out (500 a class, drawn by data_seed): choices never
  # see the test split, which is evaluated once at the end. The model trains on the other 45,000.
  config.holdout = 5000
  return config
