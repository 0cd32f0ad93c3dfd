"""Trains one model: `python -m dsconv_jax.main --config=configs/model3.py --workdir=DIR`.

Running the same command again on the same DIR resumes from the newest checkpoint.
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
