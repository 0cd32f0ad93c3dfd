"""Filling a parameter budget: the widest width multiplier whose model stays below N parameters.

`--config.fit_params=N` asks for it. A model family takes part when its module declares a
`width_multiplier` field (scaling its hidden widths with `models.scale_width`); the search then
runs over the grid k / `GRID` (k = 1, 2, ...), i.e. a resolution of 1/64, and picks the largest k
whose Keras parameter count (BatchNorm statistics included, as `analysis` counts it) is below N.

The search doubles k from 1.0 until the count reaches N, then bisects. That relies on the count
being non-decreasing in the multiplier (true when every width is scaled by `scale_width`: each
parameter term is a product of non-decreasing widths); every count the search sees is checked
against that, and a model that breaks it is refused rather than fitted wrongly. Whatever the
model, the answer satisfies: count(k / 64) < N <= count((k + 1) / 64).
"""

from __future__ import annotations

import textwrap
from typing import Any, Callable, Sequence

import flax.linen as nn
import ml_collections

from dsconv_jax import analysis
from dsconv_jax import models
from dsconv_jax.errors import UserError

GRID = 64  # Multipliers are k / GRID.
_MAX_K = GRID * 1024  # Past a multiplier of 1024 the budget is not a design constraint any more.


def declares_width_multiplier(model: nn.Module) -> bool:
  """Whether `model`'s module has a `width_multiplier` field (an NNX class: argument)."""
  return models.declares(models.module_class(model), 'width_multiplier')


def resolve_width(config: ml_collections.ConfigDict, input_shape: Sequence[int],
                  num_classes: int) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Applies `config.fit_params` to `config`'s model; returns the config to build it from, and info.

  With fit_params = 0 (off) the config comes back unchanged. Otherwise it comes back as a copy
  (the given one may be locked, as the command line's is) with
  `model_kwargs.width_multiplier` set to the chosen multiplier, which replaces any given one.
  The info dict holds `width_multiplier` (None for a model without one) and `fit_params`, and
  after a search also `params_total` and the next grid step's `next_width_multiplier` and
  `next_params_total`.
  """
  budget = int(config.get('fit_params', 0) or 0)
  model = models.build_model(config, num_classes)
  declared = declares_width_multiplier(model)
  if budget == 0:
    return config, {'width_multiplier': model.width_multiplier if declared else None,
                    'fit_params': 0}
  if budget < 0:
    raise UserError(f'config.fit_params must be >= 0 (0 = off), got {budget}')
  if not declared:
    raise UserError(
        f'config.fit_params={budget:,} needs a model that declares a width multiplier, and model '
        f'{config.model!r} ({models.module_class(model).__name__}) has no width_multiplier field; models that '
        f'do: {", ".join(_models_with_multiplier())}, and \'sequential\' (an imported module '
        'can declare width_multiplier: float = 1.0 and scale its hidden widths with it). Or set '
        'config.fit_params=0')
  count = lambda k: analysis.count_params(model.clone(width_multiplier=k / GRID), input_shape)
  k, n, n_next = widest_below(count, budget, config.model)
  fitted = config.copy_and_resolve_references()
  with fitted.unlocked():
    fitted.model_kwargs.width_multiplier = k / GRID
  return fitted, {'width_multiplier': k / GRID, 'fit_params': budget, 'params_total': n,
                  'next_width_multiplier': (k + 1) / GRID, 'next_params_total': n_next}


def widest_below(count: Callable[[int], int], budget: int,
                 model_name: str = 'the model') -> tuple[int, int, int]:
  """The largest k with count(k) < budget, by doubling then bisection: (k, count(k), count(k+1)).

  Raises UserError when even k = 1 reaches the budget, when k would pass `_MAX_K`, or when the
  counts seen are not monotone in k.
  """
  seen: dict[int, int] = {}

  def at(k: int) -> int:
    if k not in seen:
      seen[k] = count(k)
      _check_monotone(seen, model_name)
    return seen[k]

  if at(1) >= budget:
    raise UserError(f'config.fit_params={budget:,} is too small for {model_name}: even the '
                    f'narrowest width (multiplier 1/{GRID}) has {seen[1]:,} parameters')
  lo, hi = 1, GRID
  while at(hi) < budget:
    lo, hi = hi, 2 * hi
    if hi > _MAX_K:
      raise UserError(f'config.fit_params={budget:,} is beyond a width multiplier of '
                      f'{_MAX_K // GRID} for {model_name} ({seen[lo]:,} parameters there)')
  # Invariant: at(lo) < budget <= at(hi).
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if at(mid) < budget:
      lo = mid
    else:
      hi = mid
  return lo, seen[lo], seen[hi]


def _check_monotone(seen: dict[int, int], model_name: str) -> None:
  ks = sorted(seen)
  for a, b in zip(ks, ks[1:]):
    if seen[b] < seen[a]:
      raise UserError(
          f'the parameter count of {model_name} is not monotone in width_multiplier ({a}/{GRID}: '
          f'{seen[a]:,}, {b}/{GRID}: {seen[b]:,}), so config.fit_params cannot search it')


def _models_with_multiplier() -> list[str]:
  return sorted(name for name, make in models.MODELS.items()
                if declares_width_multiplier(make()))


def describe(info: dict[str, Any]) -> str:
  """A few lines on the chosen multiplier, for the summary table and the training log."""
  if not info.get('fit_params'):
    return ''
  k = round(info['width_multiplier'] * GRID)
  return textwrap.fill(
      f'Width multiplier {info["width_multiplier"]} ({k}/{GRID}), the widest on the 1/{GRID} '
      f'grid below config.fit_params={info["fit_params"]:,}: {info["params_total"]:,} '
      f'parameters (the next step, {info["next_width_multiplier"]}, has '
      f'{info["next_params_total"]:,}).', 100)
