"""Per-class results: a split's confusion matrix, per-class accuracy, the most confused pairs.

The matrix counts (true class, predicted class) pairs: rows are true classes, columns
predictions. A training run computes it on the devices (`experiment_confusion`: one compiled scan
over the padded split, like `steps.make_evaluate`, so it also works when the split spans hosts)
and stores it with the per-class accuracy in summary.json and as confusion.png;
`dsconv_jax.evaluate` computes it on the host from a restored run's predictions
(`from_predictions`). Both score the logits of `steps.eval_logits` (the EMA weights when the run
has them), so they agree with the run's test accuracy.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from dsconv_jax import fileio


def experiment_confusion(exp, state, split) -> np.ndarray:
  """The confusion matrix of `split` (a `data.Split`) under `exp`'s model and evaluation."""
  import jax  # Here, not at the top: `evaluate` plots and tabulates without this function.
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from dsconv_jax import steps

  num_classes = exp.data.num_classes
  batch_size = exp.eval_batch_size
  batch_sharding = NamedSharding(exp.mesh, P('batch'))
  mean = steps.put_replicated(exp.mesh, np.asarray(exp.mean, np.float32))
  std = steps.put_replicated(exp.mesh, np.asarray(exp.std, np.float32))
  logits_fn = functools.partial(steps.eval_logits, mean=mean, std=std,
                                compute_dtype=exp.config.get('compute_dtype', 'float32'))

  @jax.jit
  def confusion(state, images, labels, mask):
    def body(totals, i):
      take = lambda a: jax.lax.with_sharding_constraint(
          jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size), batch_sharding)
      x, y, m = take(images), take(labels), take(mask)
      predicted = jnp.argmax(logits_fn(state, x), -1)
      # Padding rows have mask 0, so they add nothing.
      pairs = jax.nn.one_hot(y, num_classes) * m[:, None]
      return totals + pairs.T @ jax.nn.one_hot(predicted, num_classes), None

    totals, _ = jax.lax.scan(body, jnp.zeros((num_classes, num_classes)),
                             jnp.arange(labels.shape[0] // batch_size))
    return jax.lax.with_sharding_constraint(totals, NamedSharding(exp.mesh, P()))

  # float32 counts are exact up to 2**24 examples per cell.
  return np.rint(steps.host_value(confusion(state, *exp.put_split(split)))).astype(np.int64)


def from_predictions(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """The confusion matrix of integer `labels` against `predicted` classes."""
  labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
  counts = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def accuracy(matrix: np.ndarray) -> float:
  return float(np.trace(matrix) / max(1, matrix.sum()))


def per_class_accuracy(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
  """{class: the fraction of its examples predicted as it}; None for a class without examples."""
  totals = matrix.sum(1)
  return {name: (float(matrix[i, i] / totals[i]) if totals[i] else None)
          for i, name in enumerate(class_names)}


def most_confused(matrix: np.ndarray, class_names: Sequence[str], n: int = 5
                  ) -> list[dict[str, Any]]:
  """The `n` largest off-diagonal cells: true class, predicted class, count, share of the true."""
  totals = matrix.sum(1)
  cells = [(int(matrix[i, j]), i, j) for i in range(len(class_names))
           for j in range(len(class_names)) if i != j and matrix[i, j]]
  cells.sort(key=lambda c: (-c[0], c[1], c[2]))
  return [{'true': class_names[i], 'predicted': class_names[j], 'count': count,
           'fraction': count / totals[i]} for count, i, j in cells[:n]]


def summary_fields(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
  """What summary.json stores of the test split's per-class results."""
  return {'test_accuracy_per_class': per_class_accuracy(matrix, class_names),
          'test_confusion': matrix.tolist()}


def markdown(matrix: np.ndarray, class_names: Sequence[str], n_pairs: int = 5) -> str:
  """Per-class accuracy and the most confused pairs, as two markdown tables."""
  escape = lambda s: str(s).replace('|', '\\|')
  totals = matrix.sum(1)
  lines = ['| class | accuracy | correct | examples |', '| --- | ---: | ---: | ---: |']
  for i, name in enumerate(class_names):
    acc = f'{100 * matrix[i, i] / totals[i]:.2f}%' if totals[i] else '-'
    lines.append(f'| {escape(name)} | {acc} | {matrix[i, i]} | {totals[i]} |')
  pairs = most_confused(matrix, class_names, n_pairs)
  lines += ['', '| true class | predicted as | count | share of the true class |',
            '| --- | --- | ---: | ---: |']
  lines += [f'| {escape(p["true"])} | {escape(p["predicted"])} | {p["count"]} | '
            f'{100 * p["fraction"]:.2f}% |' for p in pairs]
  if not pairs:
    lines.append('| (none: every example is predicted right) | | | |')
  return '\n'.join(lines) + '\n'


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str = '') -> None:
  """Writes a labelled confusion matrix to `path` (PNG, atomically).

  Cells are coloured by the share of their row (the true class), so that classes of different
  sizes compare; each cell is annotated with its count when there are at most 20 classes.
  """
  # A Figure without pyplot: no backend is chosen, so a notebook's inline plots keep theirs.
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  k = len(class_names)
  totals = matrix.sum(1, keepdims=True)
  shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
  side = min(24.0, max(4.5, 0.55 * k + 2.5))
  fig = matplotlib.figure.Figure(figsize=(side + 1.0, side))
  ax = fig.subplots()
  image = ax.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='share of the true class')
  fontsize = 9 if k <= 12 else 7 if k <= 20 else 5
  ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha='right', fontsize=fontsize)
  ax.set_yticks(range(k), labels=list(class_names), fontsize=fontsize)
  ax.set(xlabel='predicted class', ylabel='true class')
  if k <= 20:
    for i in range(k):
      for j in range(k):
        ax.text(j, i, str(int(matrix[i, j])), ha='center', va='center', fontsize=fontsize,
                color='white' if shares[i, j] > 0.5 else 'black')
  ax.set_title(title or f'confusion matrix, accuracy {100 * accuracy(matrix):.2f}%', fontsize=10)
  fig.tight_layout()
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
