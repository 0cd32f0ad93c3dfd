"""examples/quickstart.ipynb runs top to bottom in a Jupyter kernel (nbclient), on a tiny
generated image folder, and its output reads as a notebook's should."""

import importlib.util
import os

import pytest

from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'examples', 'quickstart.ipynb')


def execute(path: str):
  import nbclient
  import nbformat
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  return notebook


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  if not all(importlib.util.find_spec(m) for m in ('nbclient', 'nbformat', 'ipykernel')):
    if os.environ.get('CI'):
      pytest.fail("nbclient and ipykernel are missing: pip install -e '.[test]' installs them")
    pytest.skip('nbclient and ipykernel are not installed')
  folder = make_image_folder(tmp_path / 'images', per_class=(16, 4))
  monkeypatch.setenv('DSCONV_JAX_NOTEBOOK_DATA', folder)
  monkeypatch.setenv('DSCONV_JAX_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('DSCONV_JAX_NOTEBOOK_EPOCHS', '2')
  (tmp_path / 'home').mkdir()
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # The dataset cache goes there.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  notebook = execute(NOTEBOOK)

  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  text = [out.get('text', '') for cell in code for out in cell.outputs if out.output_type == 'stream']
  # Progress suits a notebook: whole lines, no carriage returns or terminal escapes.
  assert not [t for t in text if '\r' in t or '\x1b' in t], text
  assert any('epoch   2/2' in t for t in text), text
  assert any('test accuracy' in t for t in text)
  images = [out for cell in code for out in cell.outputs
            if out.output_type == 'display_data' and 'image/png' in out.get('data', {})]
  assert len(images) >= 2  # The curves and the predicted images, inline.
  assert (tmp_path / 'run' / 'model.onnx').exists()
  assert not (tmp_path / 'home' / 'data').exists()  # The folder given was used, none written.
