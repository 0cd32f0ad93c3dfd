"""`python -m dsconv_jax.main --help` points at the configuration reference and lists common keys
that exist."""

import os
import re
import subprocess
import sys

from dsconv_jax import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_help_lists_common_keys_and_points_at_the_reference(cli_env):
  out = subprocess.run([sys.executable, '-m', 'dsconv_jax.main', '--help'], cwd=ROOT,
                       env=cli_env, capture_output=True, text=True, timeout=120)
  text = out.stdout + out.stderr
  assert 'docs/configuration.md' in text, text
  keys = set(re.findall(r'--config\.([a-z_]+)=', text))
  assert {'model', 'dataset', 'num_epochs', 'batch_size', 'learning_rate', 'seed',
          'train_examples', 'compilation_cache_dir'} <= keys, keys
  config = defaults.get_config()
  assert [k for k in sorted(keys) if k not in config] == []  # No key that does not exist.
  assert 'Traceback' not in text
