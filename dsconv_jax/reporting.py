"""What a run leaves behind for people: curves, a one-line-per-epoch log, device and versions."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any, Sequence, TextIO

from dsconv_jax import fileio


def device_description() -> str:
  """e.g. 'gpu: NVIDIA H100 80GB HBM3' or 'cpu: cpu'."""
  import jax  # Here, not at the top: `compare` uses this module without starting JAX.
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


def format_epoch(row: dict[str, Any], num_epochs: int, eta_seconds: float | None = None) -> str:
  """One finished epoch as one line: rate, losses (train: mean over the epoch), speed, ETA."""
  line = (f'epoch {row["epoch"]:>3}/{num_epochs}  lr {row["learning_rate"]:.6g}  '
          f'train loss {row["train_loss"]:.4f} acc {100 * row["train_accuracy"]:.2f}%  '
          f'val loss {row["val_loss"]:.4f} acc {100 * row["val_accuracy"]:.2f}%  '
          f'{row["epoch_seconds"]:.1f} s  {row["train_images_per_second"]:,.0f} img/s')
  if eta_seconds is not None and row['epoch'] < num_epochs:
    line += f'  ETA {format_duration(eta_seconds)}'
  return line


def format_duration(seconds: float) -> str:
  """e.g. '42s', '3m05s', '1h02m'."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class Progress:
  """Per-epoch progress on stdout.

  Each finished epoch prints one permanent line (`format_epoch`, with an ETA from this process's
  epoch times). On a terminal, a transient line also says which epoch is running, overwritten by
  that epoch's line; it is left out when stdout is a file or a pipe, so logs hold only whole lines.
  `quiet` prints nothing at all.

  There is no in-epoch progress: an epoch is one compiled call (a `lax.scan` over its steps), and
  reporting from inside it would need host callbacks in the hottest loop for epochs that take well
  under a second on an accelerator.
  """

  def __init__(self, num_epochs: int, quiet: bool = False, stream: TextIO | None = None):
    self.num_epochs = num_epochs
    self.quiet = quiet
    self.stream = stream or sys.stdout
    self.live = not quiet and _isatty(self.stream)
    self._seconds: list[float] = []

  def start(self, epoch: int) -> None:
    if self.live:
      last = f', last epoch {self._seconds[-1]:.1f} s' if self._seconds else ''
      self.stream.write(f'\repoch {epoch:>3}/{self.num_epochs}  training ...{last}\x1b[K')
      self.stream.flush()

  def end(self, row: dict[str, Any]) -> None:
    self._seconds.append(row['epoch_seconds'])
    if self.quiet:
      return
    # The first epoch of a process includes one-off work (warm-up, evaluation's compile).
    recent = self._seconds[1:] or self._seconds
    eta = sum(recent) / len(recent) * (self.num_epochs - row['epoch'])
    prefix = '\r\x1b[K' if self.live else ''
    self.stream.write(prefix + format_epoch(row, self.num_epochs, eta) + '\n')
    self.stream.flush()

  def clear(self) -> None:
    """Removes the transient line (before an error or a stop message)."""
    if self.live:
      self.stream.write('\r\x1b[K')
      self.stream.flush()


def _isatty(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def late_dip(rows: Sequence[dict[str, Any]], fraction: float = 1 / 3) -> float | None:
  """How far (in accuracy, 0..1) validation accuracy falls in the last `fraction` of a run's
  epochs below the best it reached before each of them; 0 for a curve that never sags there.

  A run whose evaluated weights meet BatchNorm statistics of other weights (an EMA without
  recomputed statistics) sags there as the learning rate decays; None for runs of fewer than 3
  epochs.
  """
  values = [r['val_accuracy'] for r in rows]
  if len(values) < 3:
    return None
  start = len(values) - max(1, round(fraction * len(values)))
  best, dip = max(values[:start]), 0.0
  for v in values[start:]:
    dip = max(dip, best - v)
    best = max(best, v)
  return dip


def first_epoch_reaching(rows: Sequence[dict[str, Any]], accuracy: float) -> int | None:
  """The first epoch whose validation accuracy is at least `accuracy` (0..1), or None if none is.

  The question source 000 asks of a model ("beats the baseline's 82.93% within 50 epochs"), asked
  of every long run: when did it first pass a given figure. Accuracies are recorded
  from float32 (82.93% is stored as 0.82929998...), so a figure met exactly counts as reached: the
  comparison allows float32's rounding (1e-6).
  """
  for row in rows:
    if row['val_accuracy'] >= accuracy - 1e-6:
      return row['epoch']
  return None


def val_split_of(summary: dict[str, Any] | None) -> str:
  """summary.json's `val_split`: 'test' or 'holdout:N' (runs recorded before it existed
  validated on the test split)."""
  return str((summary or {}).get('val_split') or 'test')


def val_name(val_split: str) -> str:
  """The curves' name for a validation split: 'holdout' or 'test'."""
  return val_split.split(':', 1)[0]


def plot_curves(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str,
                title: str = '', val_splits: Sequence[str] | None = None) -> int:
  """Loss and accuracy per epoch, train (dashed) and validation (solid), one colour per run.

  The validation curves are labelled with what they validated on ('holdout' or 'test',
  `val_splits`, one per run; 'test' when not given). Writes a PNG to `path` atomically and
  returns the number of lines drawn (4 per run).
  """
  # A Figure without pyplot: no backend is chosen, so a notebook's inline plots keep theirs.
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  fig = matplotlib.figure.Figure(figsize=(11, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  lines = 0
  val_splits = list(val_splits or ['test'] * len(runs))
  for i, (label, rows) in enumerate(runs):
    color = f'C{i % 10}'
    epochs = [r['epoch'] for r in rows]
    prefix = f'{label} ' if label else ''
    for ax, key in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
      ax.plot(epochs, [r[f'train_{key}'] for r in rows], '--', color=color,
              label=f'{prefix}train')
      ax.plot(epochs, [r[f'val_{key}'] for r in rows], '-', color=color,
              label=f'{prefix}{val_name(val_splits[i])}')
      lines += 2
  ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
  ax_acc.set(xlabel='epoch', ylabel='accuracy', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs are whole
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with fileio.atomic_open(path, 'wb') as f:
    fig.savefig(f, format='png', dpi=100)
  return lines
