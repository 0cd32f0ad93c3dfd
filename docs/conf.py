"""Sphinx configuration of the dsconv_jax documentation (docs/; MyST Markdown pages).

    python -m sphinx -W --keep-going -b html docs docs/_build/html    # or: ./run.sh docs

Sphinx with MyST, as JAX, Flax and optax build theirs: the API reference comes from the docstrings
(autodoc), and the configuration reference is rendered from dsconv_jax/defaults.py at every build
(`dsconv_jax.config_reference`), so neither can drift from the code; the recorded results' table
is rendered from the runs' summary.json files in results/. Warnings are errors in the
test suite (tests/test_docs.py), so that broken links and references fail it.
"""

import glob
import json
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))

from dsconv_jax import config_reference  # pylint: disable=wrong-import-position

project = 'dsconv_jax'
author = 'the dsconv_jax authors'
copyright = 'the dsconv_jax authors'  # pylint: disable=redefined-builtin

extensions = ['myst_parser', 'sphinx.ext.autodoc']
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
exclude_patterns = ['_build', '_generated', 'Thumbs.db', '.DS_Store']
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3
# `name` in a docstring is code, as in the Markdown pages.
default_role = 'code'
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
# The package's modules import JAX lazily; nothing here needs an accelerator.
html_theme = 'sphinx_book_theme'
html_title = 'dsconv_jax'
html_theme_options = {'show_toc_level': 2}


def _write_if_changed(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  with open(path, 'w') as f:
    f.write(text)


# The configuration reference's table, regenerated from the code at every build.
_write_if_changed(os.path.join(DOCS, '_generated', 'config_table.md'), config_reference.markdown())


def _percent(value) -> str:
  return f'{100 * value:.2f}%' if isinstance(value, (int, float)) else ''


def results_table(root: str) -> str:
  """One row per training run recorded under results/ (each folder with a summary.json)."""
  rows = ['| `results/` | model | device | train images | epochs | val | max val | test | '
          'multi-crop TTA |', '| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |']
  for path in sorted(glob.glob(os.path.join(root, 'results', '**', 'summary.json'),
                               recursive=True)):
    with open(path) as f:
      summary = json.load(f)
    if 'test_accuracy' not in summary or 'max_val_accuracy' not in summary:
      continue  # A speed measurement, not a training run.
    folder = os.path.relpath(os.path.dirname(path), os.path.join(root, 'results'))
    rows.append(' | '.join([
        f'| `{folder}`', summary.get('model', ''), summary.get('device', '').replace('|', '/'),
        f"{summary.get('train_examples', 0):,}", f"{summary.get('epochs', '')}",
        summary.get('val_split', 'test'), _percent(summary['max_val_accuracy']),
        _percent(summary['test_accuracy']),
        _percent(summary.get('test_accuracy_tta_multicrop')) + ' |']))
  return '\n'.join(rows) + '\n'


_write_if_changed(os.path.join(DOCS, '_generated', 'results_table.md'),
                  results_table(os.path.dirname(DOCS)))
