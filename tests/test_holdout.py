"""config.holdout: validation on held-out training images, the test split evaluated once."""

import json
import os
import re

import numpy as np
import pytest

from dsconv_jax import compare, data, experiment, reporting, train
from dsconv_jax.errors import UserError
from test_models import load_config
from test_train import config_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def indexed_split(per_class=(30, 20, 25)):
  """A split whose image i holds the value i in its first pixel (up to 2**16 images)."""
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(per_class)])
  np.random.default_rng(0).shuffle(labels)
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256
  images[:, 0, 0, 1] = np.arange(len(labels)) // 256
  return data.Split(images, labels)


def index_of(split):
  return split.images[:, 0, 0, 0].astype(int) + 256 * split.images[:, 0, 0, 1].astype(int)


def ids(split):
  return set(index_of(split).tolist())


def test_holdout_is_class_balanced_disjoint_and_complete():
  split = indexed_split()
  rest, held = data.split_holdout(split, 30, seed=0, num_classes=3)
  assert np.bincount(held.labels, minlength=3).tolist() == [10, 10, 10]
  assert not ids(rest) & ids(held)
  assert ids(rest) | ids(held) == set(range(75)) and len(rest.labels) == 45
  # Labels stay with their images.
  for part in (rest, held):
    np.testing.assert_array_equal(split.labels[index_of(part)], part.labels)
  # A size that does not divide by the classes gives the remainder to some classes, one each.
  _, odd = data.split_holdout(split, 31, seed=0, num_classes=3)
  assert sorted(np.bincount(odd.labels, minlength=3).tolist()) == [10, 10, 11]


def test_the_same_data_seed_draws_the_same_holdout():
  split = indexed_split()
  _, a = data.split_holdout(split, 12, seed=3, num_classes=3)
  _, b = data.split_holdout(split, 12, seed=3, num_classes=3)
  _, c = data.split_holdout(split, 12, seed=4, num_classes=3)
  assert ids(a) == ids(b) and ids(a) != ids(c)


@pytest.mark.parametrize('n, match', [
    (2, 'fewer than the 3 classes'),
    (60, 'takes 20 images of class 1, which has 20 training images'),
    (-1, 'integer >= 0'),
])
def test_too_small_or_too_large_a_holdout_is_one_line(n, match):
  with pytest.raises(UserError, match=match) as e:
    data.split_holdout(indexed_split(), n, seed=0, num_classes=3)
  assert '\n' not in str(e.value)


def test_load_data_holds_out_before_train_examples_and_never_trains_on_the_holdout(
    image_folder):
  # image_folder: 12 training and 4 test images of 3 classes, each image distinct.
  config = config_for(image_folder, holdout=6, train_examples=20, data_seed=5)
  d = experiment.load_data(config)
  assert d.val_split == 'holdout:6' and len(d.val.labels) == 6 and len(d.train.labels) == 20
  assert np.bincount(d.val.labels, minlength=3).tolist() == [2, 2, 2]
  as_rows = lambda s: {img.tobytes() for img in s.images}
  assert not as_rows(d.train) & as_rows(d.val)
  assert as_rows(d.val) <= as_rows(d.dataset.train) and not as_rows(d.val) & as_rows(d.test)
  assert as_rows(d.test) == as_rows(d.dataset.test)
  # Another training seed validates on the same images; another data seed on others.
  config.seed = 7
  assert as_rows(experiment.load_data(config).val) == as_rows(d.val)
  config.data_seed = 6
  assert as_rows(experiment.load_data(config).val) != as_rows(d.val)
  # Off: the test split validates, as the sources did.
  off = experiment.load_data(config_for(image_folder))
  assert off.val_split == 'test' and len(off.val.labels) == 12 and len(off.train.labels) == 36


def test_a_run_validates_on_the_holdout_and_tests_once_on_the_test_split(
    tmp_path, image_folder, monkeypatch):
  seen = []
  original = experiment.Experiment.put_split

  def put_split(self, split):
    seen.append(len(split.labels))
    return original(self, split)

  monkeypatch.setattr(experiment.Experiment, 'put_split', put_split)
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config_for(image_folder, holdout=6, num_epochs=2), workdir,
                                     quiet=True)
  assert summary['val_split'] == 'holdout:6'
  assert (summary['val_examples'], summary['train_examples'], summary['test_examples']) == (6, 30, 12)
  # The holdout goes to the devices once for all epochs; the test split only at the end (its
  # accuracy, then the confusion matrix).
  assert seen[0] == 6 and seen[1:] and set(seen[1:]) == {12}
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert summary['max_val_accuracy'] == max(r['val_accuracy'] for r in rows)
  # Validation is over the 6 held-out images, the test figure over the 12 test images.
  for r in rows:
    assert r['val_accuracy'] * 6 == pytest.approx(round(r['val_accuracy'] * 6))
  assert sum(sum(r) for r in summary['test_confusion']) == 12
  with open(os.path.join(workdir, 'run.json')) as f:
    assert json.load(f)['holdout'] == 6
  # Resuming with another holdout would train on other images: refused.
  with pytest.raises(UserError, match='different configuration'):
    train.train_and_evaluate(config_for(image_folder, holdout=9, num_epochs=3), workdir,
                             quiet=True)
  # So is resuming without one: it would train on the held-out images.
  with pytest.raises(UserError, match='holdout: 6 there, none now'):
    train.train_and_evaluate(config_for(image_folder, holdout=0, num_epochs=3), workdir,
                             quiet=True)


def test_compare_shows_what_validated_each_run():
  summaries = {0: {'max_val_accuracy': 0.5, 'test_accuracy': 0.4, 'train_seconds': 1.0,
                   'val_split': 'holdout:6'}}
  table = compare.markdown_table(['a', 'b'], [summaries[0], {}], [[], []])
  assert [line.split('|')[2].strip() for line in table.splitlines()[2:]] == ['holdout:6', 'test']


def test_the_own_model_selects_on_the_holdout():
  assert load_config('dsresnet').holdout == 5000
  for source in ('baseline', 'model2', 'model3', 'model4', 'separable80k'):
    assert load_config(source).holdout == 0, source  # Validated on the test split, as they did.


def test_the_curves_legend_names_the_validation_split(tmp_path, monkeypatch):
  import matplotlib.axes
  labels = []
  original = matplotlib.axes.Axes.plot

  def plot(self, *args, **kwargs):
    labels.append(kwargs.get('label'))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, 'plot', plot)
  rows = [{'epoch': 1, 'train_loss': 1.0, 'val_loss': 1.1, 'train_accuracy': 0.5,
           'val_accuracy': 0.4}]
  reporting.plot_curves([('a', rows), ('b', rows)], str(tmp_path / 'c.png'),
                        val_splits=['holdout:5000', 'test'])
  assert labels == ['a train', 'a holdout', 'a train', 'a holdout',
                    'b train', 'b test', 'b train', 'b test']


def results_splits(folder: str) -> set[str]:
  """The validation splits of the training runs recorded under results/FOLDER (any depth)."""
  found = set()
  for root, _, files in os.walk(os.path.join(ROOT, 'results', folder)):
    if 'summary.json' in files:
      with open(os.path.join(root, 'summary.json')) as f:
        summary = json.load(f)
      if 'test_accuracy' in summary:  # A training run's, not a measurement's.
        found.add(reporting.val_split_of(summary))
  return found


def results_index(text: str) -> list[tuple[list[str], str]]:
  """results/README.md's table: (the folders a row names, its 'validated on' cell) per row."""
  rows = []
  for line in text.splitlines():
    if line.startswith('| `'):
      cells = [c.strip() for c in line.strip('|').split('|')]
      rows.append((re.findall(r'`([^`]+)`', cells[0]), cells[1]))
  return rows


def test_the_results_index_says_what_each_run_validated_on():
  with open(os.path.join(ROOT, 'results', 'README.md')) as f:
    rows = results_index(f.read())
  folders = {d for d in os.listdir(os.path.join(ROOT, 'results'))
             if os.path.isdir(os.path.join(ROOT, 'results', d))}
  assert sorted(folders - {n for names, _ in rows for n in names}) == []  # Each has its row.
  for names, cell in rows:
    splits = set().union(*(results_splits(n) for n in names))
    assert cell == (', '.join(sorted(splits)) or '-'), names
  # What a row says is read from its second cell, for each folder it names.
  assert results_index('| `a`, `b` | holdout:5000 | x |\n| `c` | - | y |') == [
      (['a', 'b'], 'holdout:5000'), (['c'], '-')]
