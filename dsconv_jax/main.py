"""Trains one model into a workdir; the same command again resumes it from its newest checkpoint.

  python -m dsconv_jax.main --config=configs/model3.py --workdir=DIR [--config.KEY=VALUE ...]

--config is a config file (configs/*.py), --workdir the folder the run writes (one run at a time:
a second run on a busy workdir stops at once), --quiet leaves out the per-epoch lines.

Common keys (every key, its default and its meaning: docs/configuration.md):
  --config.model=NAME            a built-in model, 'sequential' (config.layers) or 'module:Class'
  --config.dataset=cifar10       a tfds name, or folder:ROOT with ROOT/{train,test}/<class>/
  --config.num_epochs=50  --config.batch_size=128  --config.learning_rate=0.01  --config.seed=0
  --config.train_examples=N      train on the first N examples (0 = all); eval_examples alike
  --config.holdout=N             validate on N held-out training images, not the test split
  --config.augment=crop,flip     on-device augmentation ('' = none)
  --config.bn_momentum=0.9       BatchNorm's moving averages (Keras' 0.99 needs ~300 steps)
  --config.compilation_cache_dir=DIR  where compiled programs are kept for the next run
                                 (default ~/.cache/dsconv_jax/compilation; '' = off; deleting the
                                 folder clears it)
"""

# Before any other import: a SIGINT or SIGTERM during start-up (imports, JAX's initialisation, the
# data, the first compile) waits for a safe point instead of interrupting a compiled extension.
from dsconv_jax import stopping  # pylint: disable=g-bad-import-order
if __name__ == '__main__':
  stopping.defer_signals()


from absl import flags

from dsconv_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
cli.flag(flags.DEFINE_string, 'workdir', None,
         'Folder for metrics, summary, checkpoints and curves.')
cli.flag(flags.DEFINE_bool, 'quiet', False,
         'No per-epoch progress lines (the run still writes all its files and prints its final '
         'line and any error).')
cli.define_distributed_flags()


def run(argv) -> None:
  del argv
  config = cli.get_config()
  if not FLAGS.workdir:
    raise cli.UsageError('--workdir=DIR is required (where the run writes its files)')
  cli.apply_determinism(config)
  cli.initialize_distributed()
  from dsconv_jax import train  # Imported late: JAX starts only after the flags are valid.
  train.train_and_evaluate(config, FLAGS.workdir, quiet=FLAGS.quiet)


if __name__ == '__main__':
  cli.main(run)
