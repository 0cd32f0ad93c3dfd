"""This project's model under the source rules: DS-ResNet, a depthwise-separable ResNet.

    python -m dsconv_jax.main --config=configs/dsresnet.py --workdir=runs/dsresnet

95,456 parameters (93,776 trainable; Keras count, BatchNorm statistics included): depthwise 3x3 +
pointwise convolutions only, BatchNorm, identity shortcuts, max-pool downsampling, a pointwise conv
to the classes on the 8x8 map, then global average pooling; output receptive field 40 pixels
(covers 32x32). BatchNorm momentum 0.9 rather than Keras' 0.99 (see the model's docstring and
results/proxy-dsresnet-recipe-bn099). See `models.DSResNet` and
`python -m dsconv_jax.summary --config=configs/dsresnet.py`.

Recipe (each part a config key, off in the source configs): SGD with Nesterov momentum, batch 256,
lr 0.2 with a 2-epoch linear warm-up then cosine to 0 per step, weight decay 5e-4 on kernels only,
label smoothing 0.1, an EMA of the weights (0.999) for evaluation with BatchNorm statistics
recomputed for those weights over 20 training batches before each evaluation (PreciseBN,
`bn_recalibrate_batches`: the moving statistics belong to the live weights, which cost a 50-epoch
run 2.5 points at the end, issue 16), per-channel standardisation, random crop (reflect pad 4),
horizontal flip and cutout (one 8x8 square; the regulariser for the 10-point train/test gap of
the run that opened issue 16) on the device; test_accuracy_tta_flip and
test_accuracy_tta_multicrop (airbench's multi-crop TTA, `tta_translate=1`: evaluation only, +0.30
to +0.51 points over flip TTA in every run of results/recipe10-cpu and +0.44 at 50 epochs) are
reported beside test_accuracy.

Goal: 92% final test accuracy in 50 epochs (mean of 5 seeds); best source result 84.5%.
Measured, 50 epochs on the whole CIFAR-10 JPEG copy, CPU, seed 0 (results/dsresnet-cpu-50ep, run
with this recipe when cutout was an override): 87.73% test, 88.14% flip TTA, 88.58% multi-crop
TTA; first at 82.93% by epoch 11, 84.5% by epoch 17. Widths (32,96,128) and blocks (1,2,1),
refitted with --config.fit_params=99999 (97,378 parameters, 22.5M MACs): 88.09% test, 88.92%
multi-crop TTA (results/dsresnet-mid121-cpu-50ep): +0.36 points on one seed each, less than the
0.79 a second seed moved the 10-epoch baseline, so not the default. Without cutout
(--config.augment=crop,flip), 50 epochs is still to be measured; at 10 epochs cutout cost 1.13
points (results/recipe10-cpu, whose baseline is crop,flip: 83.61% test). The run that opened
issue 16 (the recipe before the PreciseBN evaluation and cutout, made outside the project):
84.89% final test, 87.59% with statistics recomputed offline, 98.0% on training images.
"""

import ml_collections

from dsconv_jax import defaults as default


def get_config():
  config = default.get_config()
  config.model = 'dsresnet'
  # The architecture, each field overridable: --config.model_kwargs.kernel_size=5,
  # --config.model_kwargs.widths='(32,64,112)' --config.model_kwargs.blocks='(1,2,2)'
  # --config.model_kwargs.activation=gelu, --config.model_kwargs.expansion=3 (inverted residual
  # blocks, MobileNetV2's; 0 = the basic block of two depthwise-separable convs).
  config.model_kwargs = ml_collections.ConfigDict(
      {'widths': (40, 80, 160), 'blocks': (1, 1, 1), 'stem_multiplier': 8, 'kernel_size': 3,
       'activation': 'relu', 'expansion': 0})
  config.bn_momentum = 0.9  # Keras' 0.99 settles too slowly for short runs (models.DSResNet).
  config.batch_size = 256
  config.normalization = 'standardize'
  config.augment = 'crop,flip,cutout'  # results/dsresnet-cpu-50ep; 'crop,flip' to leave it out.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.2
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 2.0
  config.weight_decay = 5e-4
  config.label_smoothing = 0.1
  config.ema_decay = 0.999
  config.bn_recalibrate_batches = 20  # Statistics for the EMA weights that are evaluated.
  config.tta_flip = True
  config.tta_translate = 1  # Multi-crop TTA, reported as test_accuracy_tta_multicrop.
  return config
