"""Flax NNX models in the functional form the pipeline uses: a Linen module's `init` and `apply`.

A user's `nnx.Module` class, written in plain NNX (constructed with `rngs=`, train and eval mode
as `model.train()` / `model.eval()` set them), is converted once, when the model is built, into
`NNXModel`: two graph definitions (the module in training mode and in evaluation mode, from
`nnx.split` of an abstract instance, so nothing is computed) and the list of its variables. Inside
a jitted step, `apply` merges the graph for the mode asked for with the variables it is given
(`nnx.merge`), calls it, and hands back the variables that changed (`nnx.state`): the object
graph is walked only while a step is traced, never while it runs.

The variables are the collections a Linen module has, nested dicts keyed by the NNX path (list
indices as strings):

* 'params': every `nnx.Param` (trained, counted as trainable, like Linen's params);
* 'batch_stats': every `nnx.BatchStat` (BatchNorm's moving statistics, non-trainable);
* 'nnx_state' (`STATE`): everything else, the `nnx.Rngs` keys (as raw key data, uint32, which
  checkpoints store like any array) and counters first of all. It travels in the train state
  (`steps.TrainState.model_state`), is updated by every training step (each dropout mask advances
  its stream's counter, as in NNX) and is checkpointed, so a resumed run draws the masks an
  uninterrupted one draws. It holds no weights: parameter counts leave it out.

Randomness is NNX's own: `apply` ignores Linen's `rngs=` (the pipeline's per-step key), and the
model's streams, seeded from the run's seed at `init`, draw every mask.

`intercept_calls(hook)` lets `dsconv_jax.analysis` see every submodule call of a traced `apply`
(the NNX counterpart of `flax.linen.intercept_methods`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Callable, Iterator, Mapping

from flax import nnx
import jax

from dsconv_jax.errors import UserError

PARAMS, BATCH_STATS, STATE = 'params', 'batch_stats', 'nnx_state'
COLLECTIONS = (PARAMS, BATCH_STATS, STATE)

# hook(path, module, call, args, kwargs) -> output, for every submodule call inside `apply`.
Hook = Callable[[tuple[str, ...], nnx.Module, Callable[..., Any], tuple, dict], Any]
_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar('nnx_adapter_hook',
                                                                    default=None)


def is_nnx_class(obj: Any) -> bool:
  return isinstance(obj, type) and issubclass(obj, nnx.Module)


def collection_of(variable_type: type) -> str:
  if issubclass(variable_type, nnx.Param):
    return PARAMS
  if issubclass(variable_type, nnx.BatchStat):
    return BATCH_STATS
  return STATE


def constructor_defaults(cls: type) -> dict[str, Any]:
  """The keyword arguments of `cls`'s constructor, with their defaults (`rngs` left out)."""
  out = {}
  for name, p in inspect.signature(cls.__init__).parameters.items():
    if name in ('self', 'rngs') or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    out[name] = p.default
  return out


class NNXModel:
  """An `nnx.Module` class built with `kwargs`, in the functional form of a Linen module.

  `init(rngs, x)` constructs the module with `nnx.Rngs(rngs['params'])` and returns its variables
  (see the module docstring); `apply(variables, x, train=..., mutable=...)` runs it. `bn_momentum`
  and `bn_epsilon`, when not None, are set on every `nnx.BatchNorm` of the graph (the
  configuration's values, for a class whose constructor does not take them).
  """

  state_collections = (STATE,)  # Carried by the train state beside params and batch_stats.

  def __init__(self, cls: type, kwargs: Mapping[str, Any] | None = None, *, name: str = '',
               bn_momentum: float | None = None, bn_epsilon: float | None = None):
    self.cls = cls
    self.kwargs = dict(kwargs or {})
    self.name = name or f'{cls.__module__}:{cls.__qualname__}'
    self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon
    try:
      abstract = nnx.eval_shape(lambda: cls(**self.kwargs, rngs=nnx.Rngs(0)))
    except TypeError as e:
      raise UserError(f'bad model_kwargs for model {self.name!r}: {e}') from None
    except Exception as e:  # pylint: disable=broad-except
      # The module's own constructor failed (a bad argument value): the user's to fix.
      detail = (str(e).strip().splitlines() or [''])[0]
      raise UserError(f'constructing model {self.name!r} with {self.kwargs} failed: '
                      f'{type(e).__name__}: {detail}') from None
    if not isinstance(abstract, nnx.Module):
      raise UserError(f'model {self.name!r} built {type(abstract).__name__}, not an nnx.Module')
    self._set_batch_norm(abstract)
    abstract.train()
    self._train_graph, state = nnx.split(abstract)
    abstract.eval()
    self._eval_graph, _ = nnx.split(abstract)
    self._template = list(nnx.to_flat_state(state))
    self._key_impls = {}
    for path, variable in self._template:
      if isinstance(variable, nnx.RngKey):
        impl = []
        jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), variable.get_value())
        self._key_impls[path] = impl[0]

  def __repr__(self) -> str:
    return f'NNXModel({self.name}, {self.kwargs})'

  def __getattr__(self, name: str) -> Any:
    """A constructor argument of the module (given, or its default), like a Linen field."""
    if name.startswith('_') or name in ('cls', 'kwargs'):
      raise AttributeError(name)
    if name in self.kwargs:
      return self.kwargs[name]
    defaults = constructor_defaults(self.cls)
    if name in defaults and defaults[name] is not inspect.Parameter.empty:
      return defaults[name]
    raise AttributeError(f'{self.cls.__name__} has no constructor argument {name!r}')

  def clone(self, **overrides: Any) -> 'NNXModel':
    """The same class with some constructor arguments replaced (like `flax.linen.Module.clone`)."""
    return NNXModel(self.cls, {**self.kwargs, **overrides}, name=self.name,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)

  def _set_batch_norm(self, module: nnx.Module) -> None:
    settings = {k: v for k, v in (('momentum', self.bn_momentum), ('epsilon', self.bn_epsilon))
                if v is not None}
    if settings:
      module.set_attributes(nnx.BatchNorm, **settings, raise_if_not_found=False)

  # The functional form.

  def init(self, rngs: Any, x: Any = None, train: bool = False) -> dict[str, Any]:
    """The variables of a new module whose `nnx.Rngs` are seeded by `rngs` (a key, or Linen's
    dict of keys, of which 'params' seeds every stream). `x` and `train` are not needed: an NNX
    module creates its variables when constructed."""
    del x, train
    key = rngs['params'] if isinstance(rngs, Mapping) else rngs
    module = self.cls(**self.kwargs, rngs=nnx.Rngs(key))
    return self.variables_of(nnx.state(module))

  def apply(self, variables: Mapping[str, Any], x: Any, train: bool = False,
            rngs: Any = None, mutable: Any = False) -> Any:
    """The module's output on `x` in training or evaluation mode; with `mutable` (True or a
    list of collections) also the changed collections, as Linen's `apply` returns them."""
    del rngs  # The module's own nnx.Rngs streams, in `variables`, draw its randomness.
    module = self.merge(variables, train=train)
    hook = _HOOK.get()
    if hook is not None:
      _intercept(module, hook)
    y = module(x)
    if mutable is False:
      return y
    new = self.variables_of(nnx.state(module))
    keep = COLLECTIONS if mutable is True else tuple(mutable)
    return y, {k: v for k, v in new.items() if k in keep}

  def merge(self, variables: Mapping[str, Any], train: bool = False) -> nnx.Module:
    """The module (in training or evaluation mode) holding `variables`."""
    flat = []
    for path, template in self._template:
      value = _lookup(variables, collection_of(type(template)), path)
      if path in self._key_impls:
        value = jax.random.wrap_key_data(value, impl=self._key_impls[path])
      flat.append((path, template.replace(value)))
    graph = self._train_graph if train else self._eval_graph
    return nnx.merge(graph, nnx.from_flat_state(flat))

  def variables_of(self, state: nnx.State) -> dict[str, Any]:
    """`state` (an `nnx.State` of the module) as the collections of the functional form."""
    out: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(state):
      value = variable.get_value()
      if isinstance(variable, nnx.RngKey):
        value = jax.random.key_data(value)
      node = out.setdefault(collection_of(type(variable)), {})
      for part in path[:-1]:
        node = node.setdefault(str(part), {})
      node[str(path[-1])] = value
    return out


def _lookup(variables: Mapping[str, Any], collection: str, path: tuple) -> Any:
  node = variables[collection]
  for part in path:
    node = node[str(part)]
  return node


def _intercept(module: nnx.Module, hook: Hook) -> None:
  """Makes every submodule of `module` (a merged copy, used once) report its calls to `hook`."""
  for path, sub in nnx.iter_modules(module):
    sub.__class__ = _reporting_class(type(sub))
    object.__setattr__(sub, '_dsconv_path', tuple(str(p) for p in path))


_REPORTING: dict[type, type] = {}


def _reporting_class(cls: type) -> type:
  """A subclass of `cls` whose `__call__` goes through the active hook (same name)."""
  if getattr(cls, '_dsconv_reporting', False):
    return cls
  if cls not in _REPORTING:

    def __call__(self, *args, **kwargs):
      call = lambda *a, **k: cls.__call__(self, *a, **k)
      hook = _HOOK.get()
      if hook is None:
        return call(*args, **kwargs)
      return hook(self._dsconv_path, self, call, args, kwargs)

    _REPORTING[cls] = type(cls.__name__, (cls,), {
        '__call__': __call__, '_dsconv_reporting': True, '__module__': cls.__module__,
        '__qualname__': cls.__qualname__})
  return _REPORTING[cls]


@contextlib.contextmanager
def intercept_calls(hook: Hook) -> Iterator[None]:
  """Within the block, every submodule call of an `NNXModel.apply` goes through `hook`."""
  token = _HOOK.set(hook)
  try:
    yield
  finally:
    _HOOK.reset(token)
