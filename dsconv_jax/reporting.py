"""What a run leaves behind for people: curves, a one-line-per-epoch log, device and versions."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Sequence

import jax

from dsconv_jax import fileio


def device_description() -> str:
  """e.g. 'gpu: NVIDIA H100 80GB HBM3' or 'cpu: cpu'."""
  d = jax.devices()[0]
  return f'{d.platform}: {d.device_kind}'


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def format_epoch(row: dict[str, Any], num_epochs: int) -> str:
  return (f'epoch {row["epoch"]:>3}/{num_epochs}  lr {row["learning_rate"]:.6g}  '
          f'train loss {row["train_loss"]:.4f} acc {100 * row["train_accuracy"]:.2f}%  '
          f'val loss {row["val_loss"]:.4f} acc {100 * row["val_accuracy"]:.2f}%  '
          f'{row["epoch_seconds"]:.1f} s  {row["train_images_per_second"]:,.0f} img/s')


def plot_curves(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str,
                title: str = '') -> None:
  """Loss and accuracy per epoch, train (dashed) and validation (solid), one colour per run."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (label, rows) in enumerate(runs):
    color = f'C{i % 10}'
    epochs = [r['epoch'] for r in rows]
    prefix = f'{label} ' if label else ''
    for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
      ax.plot(epochs, [r[f'train_{key}'] for r in rows], '--', color=color,
              label=f'{prefix}train')
      ax.plot(epochs, [r[f'val_{key}'] for r in rows], '-', color=color, label=f'{prefix}val')
  ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
  ax_acc.set(xlabel='epoch', ylabel='accuracy', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
