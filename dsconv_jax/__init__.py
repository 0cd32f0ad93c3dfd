"""dsconv_jax: compact depthwise-separable CNNs in JAX/Flax, trained and used.

    import dsconv_jax
    summary = dsconv_jax.train_and_evaluate(config, 'runs/model3')   # train (dsconv_jax.train)
    run = dsconv_jax.load_run('runs/model3')                          # use (dsconv_jax.inference)
    probabilities = run.predict(images)

Both names are imported on first use (module `__getattr__`), so that `import dsconv_jax`, and the
command-line tools that need no JAX (`compare`), stay cheap and do not start JAX.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_LAZY = {
    'train_and_evaluate': 'dsconv_jax.train',
    'load_run': 'dsconv_jax.inference',
    'Run': 'dsconv_jax.inference',
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # Later lookups skip this function.
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
