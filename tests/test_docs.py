"""The documentation: the site builds with warnings as errors, the configuration reference covers
every key, and the commands the pages show run as written (on generated images)."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import make_image_folder
from dsconv_jax import config_reference
from dsconv_jax import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
# A CIFAR-10 image folder (ROOT/{train,test}/<class>/) to run the quickstart's first run on.
CIFAR10_FOLDER = 'DSCONV_JAX_CIFAR10_FOLDER'
# Test accuracy the first run must reach there (chance: 10%).
FIRST_RUN_CIFAR10_THRESHOLD = 0.35  # Measured: 45.94% (results/first-run-model3-cpu-5k-4ep).


def doc_block(page: str, marker: str, which: int = 0) -> str:
  """The fenced block after `<!-- marker -->` in docs/<page> (`which` = 1: the one after it)."""
  with open(os.path.join(DOCS, page)) as f:
    text = f.read()
  end = text.index(f'<!-- {marker} -->')
  for _ in range(which + 1):
    start = text.index('\n', text.index('```', end)) + 1
    end = text.index('```', start) + 3
  return text[start:end - 3]


def doc_commands(page: str, marker: str) -> list[list[str]]:
  """The block's commands, continuation lines joined, each split as a shell would."""
  joined = doc_block(page, marker).replace('\\\n', ' ')
  return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def run_module(args: list[str], env, timeout: float = 600, **replace
               ) -> subprocess.CompletedProcess:
  """Runs a `python -m dsconv_jax.X ...` command from the docs, with some arguments replaced."""
  assert args[:2] == ['python', '-m'], args
  args = [replace.get(a, a) for a in args[2:]]
  out = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, (args, out.stderr[-3000:])
  return out


def test_the_site_builds_with_warnings_as_errors(tmp_path):
  if not all(importlib.util.find_spec(m) for m in ('sphinx', 'myst_parser', 'sphinx_book_theme')):
    if os.environ.get('CI'):
      pytest.fail("the docs tooling is missing: pip install -e '.[test]' installs it")
    pytest.skip("the docs tooling is not installed (pip install -e '.[docs]')")
  out = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
                        '-d', str(tmp_path / 'doctrees'), DOCS, str(tmp_path / 'html')],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-5000:]
  with open(tmp_path / 'html' / 'configuration.html') as f:
    page = f.read()
  assert all(key.name in page for key in config_reference.keys())


def _flat_keys(config, prefix=''):
  for name, value in config.items():
    if hasattr(value, 'items') and len(value):
      yield from _flat_keys(value, f'{prefix}{name}.')
    else:
      yield prefix + name


def test_the_configuration_reference_lists_every_key_with_its_meaning():
  keys = config_reference.keys()
  assert [k.name for k in keys] == sorted(_flat_keys(defaults.get_config()), key=[
      k.name for k in keys].index)
  assert {k.name for k in keys} == set(_flat_keys(defaults.get_config()))
  undescribed = [k.name for k in keys if not k.description]
  assert not undescribed, f'give these keys a comment in dsconv_jax/defaults.py: {undescribed}'
  table = config_reference.markdown()
  assert '| `constraints.max_params` | `100_000` | The Keras total must stay below this' in table
  assert "| `optimizer` | `'keras_adam'` | 'keras_adam' (Keras' Adam" in table
  # A heading comment ('# Training.') is not a key's meaning.
  assert not any(k.description.startswith('Training.') for k in keys)


def test_the_summary_commands_print_what_the_pages_show(cli_env):
  """docs/designing.md: each summary command's output holds the lines the page shows after it."""
  for marker in ('summary-model3', 'summary-fit'):
    (command,) = doc_commands('designing.md', marker)
    out = run_module(command, cli_env).stdout
    for line in doc_block('designing.md', marker, which=1).splitlines():
      line = line.rstrip()
      if line and line != '...':
        assert line.removesuffix('...').rstrip() in out, (marker, line)


def test_the_first_run_learns_on_generated_images(tmp_path, cli_env):
  """docs/quickstart.md's first run, as written, on generated images: clearly above chance."""
  folder = make_image_folder(tmp_path / 'images', per_class=(64, 16))
  (command,) = doc_commands('quickstart.md', 'first-run')
  workdir = tmp_path / 'first'
  run_module(command + [f'--config.dataset=folder:{folder}', '--config.cache_dir='], cli_env,
             **{'--workdir=runs/first': f'--workdir={workdir}'})
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  # Chance: 1/3. Measured: 0.75-0.8 after its 4 epochs, by the JAX release.
  assert summary['test_accuracy'] >= 0.6, summary['test_accuracy']


@pytest.mark.skipif(not os.environ.get(CIFAR10_FOLDER), reason=f'{CIFAR10_FOLDER} is not set')
def test_the_first_run_learns_on_cifar10(tmp_path, cli_env):
  """The first run, exactly as written, on the CIFAR-10 folder that DSCONV_JAX_CIFAR10_FOLDER names
  (a few minutes on a 2-core CPU)."""
  (command,) = doc_commands('quickstart.md', 'first-run')
  workdir = tmp_path / 'first'
  run_module(command + [f'--config.dataset=folder:{os.environ[CIFAR10_FOLDER]}'], cli_env,
             timeout=3600, **{'--workdir=runs/first': f'--workdir={workdir}'})
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['test_accuracy'] >= FIRST_RUN_CIFAR10_THRESHOLD, summary['test_accuracy']


def test_the_linen_module_commands_run(tmp_path, cli_env):
  """docs/your_model.md's Linen example: summary, then one short epoch on generated images."""
  folder = make_image_folder(tmp_path / 'images', per_class=(16, 4))
  summary, train = doc_commands('your_model.md', 'linen-commands')
  assert 'Constraints: all hold.' in run_module(summary, cli_env).stdout
  run_module(train + [f'--config.dataset=folder:{folder}', '--config.num_epochs=1',
                      '--config.batch_size=8', '--config.cache_dir='], cli_env,
             **{'--workdir=runs/my_module': f'--workdir={tmp_path}/my_module'})
  assert (tmp_path / 'my_module' / 'summary.json').exists()


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path, cli_env):
  """docs/your_model.md's walkthrough: its config file and four commands, one short epoch each."""
  folder = make_image_folder(tmp_path / 'images', per_class=(16, 4))
  config = tmp_path / 'mine.py'
  config.write_text(doc_block('your_model.md', 'walkthrough-config'))
  data = [f'--config.dataset=folder:{folder}', '--config.num_epochs=1', '--config.batch_size=8',
          '--config.cache_dir=']
  for command in doc_commands('your_model.md', 'walkthrough-commands'):
    command = [a.replace('--config=mine.py', f'--config={config}').replace('runs/', f'{tmp_path}/')
               for a in command]
    out = run_module(command + (data if command[2] == 'dsconv_jax.main' else []), cli_env)
    if command[2] == 'dsconv_jax.summary':
      assert 'Constraints: all hold.' in out.stdout and 'Residual' not in out.stderr
  table = (tmp_path / 'mine-vs-model3.md').read_text()
  assert '| mine ' in table and '| model3 ' in table
  assert (tmp_path / 'mine-vs-model3.png').exists()


# Where the product and its tests live: no history, no paths outside the repository.
PRODUCT = ('dsconv_jax', 'configs', 'benchmarks', 'examples', 'docs', 'tests', 'README.md')
# The history's own places, and this file, whose patterns and examples name what they find.
HISTORY = ('docs/journal.md', 'CHANGELOG.md', os.path.join('tests', 'test_docs.py'))
STALE = [
    (re.compile(r'\bissues?\s*#?\d+', re.IGNORECASE), 'an issue number'),
    (re.compile(r'\b20\d\d-\d\d-\d\d\b'), 'a date'),
    (re.compile(r'\.\./shared|/work/|product\.md'), 'a path outside the repository'),
]


def product_files():
  for entry in PRODUCT:
    path = os.path.join(ROOT, entry)
    if os.path.isfile(path):
      yield entry
      continue
    for folder, subfolders, files in os.walk(path):
      subfolders[:] = [d for d in subfolders if d not in ('_build', '_generated', '__pycache__')]
      for name in files:
        if name.endswith(('.py', '.md', '.sh', '.txt', '.ipynb', '.toml')):
          yield os.path.relpath(os.path.join(folder, name), ROOT)


def stale_references(text: str) -> list[str]:
  return [f'{what}: {m.group(0)!r}' for pattern, what in STALE for m in pattern.finditer(text)]


def test_no_history_or_outside_path_in_the_product():
  found = []
  for path in product_files():
    if path in HISTORY:
      continue
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        found += [f'{path}:{number}: {s}' for s in stale_references(line)]
  assert not found, 'move these to docs/journal.md or CHANGELOG.md:\n' + '\n'.join(found)


def test_the_history_check_finds_what_it_names():
  assert stale_references('as issue 16 showed') == ["an issue number: 'issue 16'"]
  assert stale_references('on 2026-12-03 a run') == ["a date: '2026-12-03'"]
  assert len(stale_references('folder:../shared/datasets and /work/x')) == 2
  assert stale_references('5,000 issues later, 2026 images') == []
