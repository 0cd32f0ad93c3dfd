"""The fast forms for every model, however it is written: a rewrite of the traced computation.

`accelerate(fn, forms)` returns a function with `fn`'s values that traces `fn` to a jaxpr
(`jax.make_jaxpr`, each time it is called, so it sees the arguments' shapes, dtypes and any
context such as Flax method interceptors) and evaluates that jaxpr again with these operations
replaced by their fast forms (`dsconv_jax.fast_grads`, measured in BENCHMARKS.md):

* a depthwise convolution (`conv_general_dilated` whose `feature_group_count` equals the input
  channels: one filter per channel, any depth multiplier, stride, dilation and padding) by the
  shifted form when `Forms.depthwise` is 'shifted';
* a 1x1 convolution with one group (any stride, no padding) by `pointwise_conv`, a matrix product
  with a hand-written gradient;
* max pooling over non-overlapping windows (`reduce_window_max`, window = strides, no padding, on
  NHWC maps) by `tiled_max_pool`;
* a Bernoulli mask (`jax.random.bernoulli` with a constant probability: what `flax.linen.Dropout`
  and `flax.nnx.Dropout` draw their keep masks with) by `layers.hash_keep_mask` when
  `Forms.dropout` is 'hash' (the masks differ from Threefry's, their distribution does not).

Everything else is bound as traced. Whatever wrote the computation (the project's layers, a
`sequential` spec, plain Linen, plain NNX through `nnx.split`/`nnx.merge`), it reaches XLA in the
same forms, so it trains at the same speed. The project's own layers already emit the fast forms;
the rewrite finds nothing left to replace in them.

Sub-computations: `jit` and `closed_call` are evaluated inline (rewritten); `checkpoint` (remat),
`scan`, `cond` and `while` are rebuilt with `jax.checkpoint`, `lax.scan`, `lax.switch` and
`lax.while_loop` around their rewritten bodies. `custom_jvp_call` and `custom_vjp_call` are bound
unchanged: under differentiation JAX runs the user's own rule, which the rewrite cannot see into,
so the forward body as written is what that rule belongs to.

`resolve_forms` turns the config's choices into `Forms`: depthwise 'auto' is 'shifted' on the CPU
(about 80x faster than grouped in Model 3's compiled CPU epoch, results/throughput-cpu-forms) and,
on an accelerator, whichever of the two forms `measure_depthwise` times faster on the model's own
depthwise convolutions (forward and backward, compiled): which one wins there depends on the
device and the shapes (XLA's grouped-convolution backward pass is slow on NVIDIA GPUs,
jax-ml/jax#13800; the shifted form trained DS-ResNet 1.26x faster on an H200,
results/gpu-h200-dsresnet-bench).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jex_core
from jax.extend import source_info_util
import jax.numpy as jnp
import numpy as np

from dsconv_jax import layers as layers_lib
from dsconv_jax.fast_grads import pointwise_conv, shifted_depthwise, tiled_max_pool

DEPTHWISE_FORMS = ('grouped', 'shifted')


@dataclasses.dataclass(frozen=True)
class Forms:
  """Which fast forms the rewrite puts in (each one gives the same function of the inputs).

  depthwise: 'shifted' (depthwise convolutions become shifted multiply-adds) or 'grouped' (they
    stay XLA grouped convolutions).
  dropout: 'hash' (Bernoulli masks from the counter hash) or 'threefry' (as traced).
  pointwise, max_pool: whether 1x1 convolutions and tiled max pooling get their fast forms.
  """
  depthwise: str = 'shifted'
  dropout: str = 'hash'
  pointwise: bool = True
  max_pool: bool = True

  def __post_init__(self):
    if self.depthwise not in DEPTHWISE_FORMS:
      raise ValueError(f'depthwise form must be one of {DEPTHWISE_FORMS}, got {self.depthwise!r}')
    if self.dropout not in layers_lib.DROPOUT_IMPLS:
      raise ValueError(f'dropout form must be one of {layers_lib.DROPOUT_IMPLS}, got '
                       f'{self.dropout!r}')


def accelerate(fn: Callable, forms: Forms = Forms()) -> Callable:
  """`fn` with its depthwise and pointwise convolutions, max pooling and dropout in `forms`.

  Array arguments (and tracers) are the traced inputs; every other argument (Python numbers,
  strings, booleans such as `train=`, collections names) is fixed while tracing, as `jit`'s
  static arguments are. Pure: the result is a function of the arguments alone, so it runs under
  `jit`, `grad`, `vmap` and `pmap` like `fn`.
  """
  def accelerated(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [_is_array(leaf) for leaf in leaves]

    def flat_fn(*arrays):
      it = iter(arrays)
      full = [next(it) if d else leaf for leaf, d in zip(leaves, dynamic)]
      a, kw = jax.tree.unflatten(treedef, full)
      return fn(*a, **kw)

    arrays = [leaf for leaf, d in zip(leaves, dynamic) if d]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    outs = evaluate(closed.jaxpr, closed.consts, arrays, forms)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return accelerated


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def evaluate(jaxpr, consts: Sequence[Any], args: Sequence[Any], forms: Forms) -> list[Any]:
  """The values of `jaxpr` (an open jaxpr) on `args`, with the fast forms of `forms` put in."""
  env: dict[Any, Any] = {}
  # Values known while tracing: literals carried through operations that keep the value (a
  # scalar placed on the mesh by `reshard`, say), so that a rule can read them.
  constants: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def constant(v):
    return v.val if isinstance(v, jex_core.Literal) else constants.get(v)

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    ctx = getattr(getattr(eqn, 'ctx', None), 'manager', None) or contextlib.nullcontext()
    # What an equation becomes keeps its name stack (the layer's module path) and source line,
    # as jax's own evaluation of a jaxpr does: HLO metadata and profiles still name the layers.
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), ctx:
      outs = _rewrite(eqn, invals, forms, constant)
      if outs is None:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
      if eqn.primitive.name in _KEEPS_VALUE and constant(eqn.invars[0]) is not None:
        constants[eqn.outvars[0]] = constant(eqn.invars[0])
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


# Primitives whose output has their (first) input's value: constants pass through them.
_KEEPS_VALUE = frozenset({'reshard', 'convert_element_type', 'copy', 'copy_p', 'device_put',
                          'sharding_constraint', 'mesh_cast'})


def _rewrite(eqn, invals, forms: Forms, constant: Callable[[Any], Any]):
  """The outputs of `eqn` in a fast form (a list for multiple-result primitives), or None when
  it keeps its own form. `constant(var)` is a variable's value when it is known while tracing."""
  rule = _RULES.get(eqn.primitive.name)
  if rule is None:
    return None
  return rule(eqn, invals, forms, constant)


def _closed(closed_jaxpr) -> tuple[Any, Sequence[Any]]:
  """(jaxpr, consts) of a ClosedJaxpr, or of an open Jaxpr without constants."""
  if hasattr(closed_jaxpr, 'consts'):
    return closed_jaxpr.jaxpr, closed_jaxpr.consts
  return closed_jaxpr, ()


def _call_fn(closed_jaxpr, forms: Forms) -> Callable:
  jaxpr, consts = _closed(closed_jaxpr)
  return lambda *args: evaluate(jaxpr, consts, args, forms)


# --- Convolutions ----------------------------------------------------------------------------

def _conv_layout(eqn):
  """(lhs_spec, rhs_spec, out_spec) of a 2-D convolution, or None for any other rank."""
  dn = eqn.params['dimension_numbers']
  if len(dn.lhs_spec) != 4:
    return None
  return dn.lhs_spec, dn.rhs_spec, dn.out_spec


def _plain_conv(eqn) -> bool:
  """A convolution with no input dilation (not transposed), one batch group, and no accumulation
  dtype of its own: the kind both fast forms compute."""
  p = eqn.params
  lhs, rhs = (v.aval for v in eqn.invars)
  return (_conv_layout(eqn) is not None and p['batch_group_count'] == 1
          and all(d == 1 for d in p['lhs_dilation'])
          and p['preferred_element_type'] in (None, lhs.dtype)
          and lhs.dtype == rhs.dtype and jnp.issubdtype(lhs.dtype, jnp.floating))


def is_depthwise(eqn) -> bool:
  """Whether `eqn` is a depthwise convolution the shifted form computes: one group per input
  channel (each group one input channel and `m` filters), no negative padding."""
  if eqn.primitive.name != 'conv_general_dilated' or not _plain_conv(eqn):
    return False
  lhs_spec, rhs_spec, _ = _conv_layout(eqn)
  c = eqn.invars[0].aval.shape[lhs_spec[1]]
  groups = eqn.params['feature_group_count']
  return (groups == c and c > 1 and eqn.invars[1].aval.shape[rhs_spec[1]] == 1
          and all(lo >= 0 and hi >= 0 for lo, hi in eqn.params['padding']))


def is_pointwise(eqn) -> bool:
  """Whether `eqn` is a 1x1 convolution with one group and no padding."""
  if eqn.primitive.name != 'conv_general_dilated' or not _plain_conv(eqn):
    return False
  _, rhs_spec, _ = _conv_layout(eqn)
  rhs = eqn.invars[1].aval.shape
  return (eqn.params['feature_group_count'] == 1
          and rhs[rhs_spec[2]] == 1 and rhs[rhs_spec[3]] == 1
          and all(lo == 0 and hi == 0 for lo, hi in eqn.params['padding']))


def _to_nhwc(x, spec):
  """An array laid out as `spec` (batch, feature, spatial...) positions -> NHWC."""
  perm = (spec[0], spec[2], spec[3], spec[1])
  return x if perm == (0, 1, 2, 3) else jnp.transpose(x, perm)


def _kernel_hwio(k, rhs_spec):
  perm = (rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0])
  return k if perm == (0, 1, 2, 3) else jnp.transpose(k, perm)


def _from_nhwc(y, out_spec):
  """NHWC -> the layout `out_spec` names."""
  source = {out_spec[0]: 0, out_spec[2]: 1, out_spec[3]: 2, out_spec[1]: 3}
  perm = tuple(source[a] for a in range(4))
  return y if perm == (0, 1, 2, 3) else jnp.transpose(y, perm)


def shifted_conv(eqn, x, k):
  """The depthwise convolution `eqn` of (x, k) in the shifted form, in `eqn`'s layouts."""
  lhs_spec, rhs_spec, out_spec = _conv_layout(eqn)
  p = eqn.params
  k = _kernel_hwio(k, rhs_spec)
  kh, kw, _, cm = k.shape
  y = shifted_depthwise(_to_nhwc(x, lhs_spec), k.reshape(kh, kw, cm), tuple(p['window_strides']),
                        tuple(map(tuple, p['padding'])), tuple(p['rhs_dilation']))
  return _from_nhwc(y, out_spec)


def _depthwise_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  if forms.depthwise == 'shifted' and is_depthwise(eqn):
    return shifted_conv(eqn, *invals)
  if forms.pointwise and is_pointwise(eqn):
    return _pointwise(eqn, *invals)
  return None


def _pointwise(eqn, x, k):
  lhs_spec, rhs_spec, out_spec = _conv_layout(eqn)
  sh, sw = eqn.params['window_strides']
  x = _to_nhwc(x, lhs_spec)
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  return _from_nhwc(pointwise_conv(x, _kernel_hwio(k, rhs_spec)[0, 0]), out_spec)


# --- Pooling and dropout ---------------------------------------------------------------------

def _max_pool_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  p = eqn.params
  x = eqn.invars[0].aval
  window = tuple(p['window_dimensions'])
  if not (forms.max_pool and x.ndim == 4 and jnp.issubdtype(x.dtype, jnp.floating)
          and window[0] == 1 and window[3] == 1 and window != (1, 1, 1, 1)
          and tuple(p['window_strides']) == window
          and all(d == 1 for d in p['base_dilation']) and all(d == 1 for d in p['window_dilation'])
          and all(lo == 0 and hi == 0 for lo, hi in p['padding'])):
    return None
  return tiled_max_pool(invals[0], window[1:3])


# `jax.random.bernoulli` is a jit of this name with inputs (key, p) and a boolean mask out.
_BERNOULLI = '_bernoulli'


def _jit_rule(eqn, invals, forms: Forms, constant):
  p = eqn.params
  if p.get('name') == _BERNOULLI:
    mask = _hash_bernoulli(eqn, invals, forms, constant(eqn.invars[1]))
    if mask is not None:
      return [mask]
  if not all(_unspecified(s) for s in (*p.get('in_shardings', ()), *p.get('out_shardings', ()))):
    return None  # A jit that places its values: bound as written.
  return _call_fn(p['jaxpr'], forms)(*invals)


def _unspecified(sharding) -> bool:
  return type(sharding).__name__ == 'UnspecifiedValue'


def _hash_bernoulli(eqn, invals, forms: Forms, p):
  """`layers.hash_keep_mask`'s mask for a Bernoulli draw with the constant probability `p`
  (None: not known while tracing), or None."""
  if forms.dropout != 'hash' or len(eqn.invars) != 2 or len(eqn.outvars) != 1 or p is None:
    return None
  key = eqn.invars[0]
  out = eqn.outvars[0].aval
  if (out.dtype != jnp.bool_ or key.aval.shape != ()
      or not jnp.issubdtype(key.aval.dtype, jax.dtypes.prng_key)):
    return None
  keep = float(np.asarray(p))
  if not 0.0 < keep <= 1.0:
    return None
  return layers_lib.hash_keep_mask(invals[0], 1.0 - keep, out.shape)


def _call_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  return _call_fn(eqn.params['call_jaxpr'], forms)(*invals)


def _checkpoint_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  p = eqn.params
  body = _call_fn(p['jaxpr'], forms)
  return jax.checkpoint(lambda *a: body(*a), prevent_cse=p['prevent_cse'],
                        policy=p['policy'])(*invals)


def _scan_counts(p) -> tuple[int, int]:
  """(constants, carried values) among a scan's inputs: its `num_consts` and `num_carry` params,
  or, where JAX no longer has them (0.12), the sizes of the first two groups of `ft_in`, the tree
  (constants, carry, scanned inputs) of its flat inputs."""
  if 'num_consts' in p:
    return p['num_consts'], p['num_carry']
  consts, carry = p['ft_in'].unpack()[:2]
  count = lambda group: len(jax.tree.leaves(group, is_leaf=lambda x: x is None))
  return count(consts), count(carry)


def _scan_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  p = eqn.params
  n_consts, n_carry = _scan_counts(p)
  consts, carry, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[
      n_consts + n_carry:]
  inner = _call_fn(p['jaxpr'], forms)

  def body(carry, x):
    outs = inner(*consts, *carry, *x)
    return list(outs[:n_carry]), list(outs[n_carry:])

  carry, ys = jax.lax.scan(body, list(carry), list(xs), length=p['length'], reverse=p['reverse'],
                           unroll=p['unroll'])
  return [*carry, *ys]


def _cond_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  branches = [_call_fn(b, forms) for b in eqn.params['branches']]
  index, operands = invals[0], invals[1:]
  return jax.lax.switch(index, [lambda *a, f=f: list(f(*a)) for f in branches], *operands)


def _while_rule(eqn, invals, forms: Forms, constant):
  del constant  # Only the Bernoulli rule reads known values.
  p = eqn.params
  nc, nb = p['cond_nconsts'], p['body_nconsts']
  cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
  cond, body = _call_fn(p['cond_jaxpr'], forms), _call_fn(p['body_jaxpr'], forms)
  return jax.lax.while_loop(lambda c: cond(*cond_consts, *c)[0],
                            lambda c: list(body(*body_consts, *c)), list(init))


_RULES: dict[str, Callable] = {
    'conv_general_dilated': _depthwise_rule,
    'reduce_window_max': _max_pool_rule,
    'jit': _jit_rule,
    'pjit': _jit_rule,
    'closed_call': _call_rule,
    'core_call': _call_rule,
    'checkpoint': _checkpoint_rule,
    'remat2': _checkpoint_rule,
    'scan': _scan_rule,
    'cond': _cond_rule,
    'while': _while_rule,
}


# --- Choosing the depthwise form -------------------------------------------------------------

def depthwise_convs(jaxpr) -> list[Any]:
  """Every depthwise convolution the shifted form computes in `jaxpr` and the jaxprs inside it
  (the equations, once per occurrence in the program text)."""
  found = []

  def walk(j):
    for eqn in j.eqns:
      if is_depthwise(eqn):
        found.append(eqn)
      for sub in jex_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(getattr(jaxpr, 'jaxpr', jaxpr))
  return found


def _conv_signature(eqn) -> tuple:
  return (tuple(v.aval.shape for v in eqn.invars), str(eqn.invars[0].aval.dtype),
          tuple(sorted((k, str(v)) for k, v in eqn.params.items())))


# Timings already taken in this process: (signature, form, repeats) -> seconds. Runs of the same
# convolutions in one process (a `bench` run's seeds, `throughput` configurations) then choose
# alike, and each convolution is compiled and timed once.
_TIMINGS: dict[tuple, float] = {}


def measure_depthwise(convs: Sequence[Any], repeats: int = 5) -> dict[str, float]:
  """Seconds of one compiled forward and backward pass of every convolution in `convs` (equations
  from `depthwise_convs`), in each form: {'grouped': s, 'shifted': s}, each the sum over the
  convolutions (a repeated one counted each time) of its best of `repeats` runs."""
  counts = collections.Counter(_conv_signature(e) for e in convs)
  first = {}
  for e in convs:
    first.setdefault(_conv_signature(e), e)
  totals = {}
  for form in DEPTHWISE_FORMS:
    total = 0.0
    for signature, eqn in first.items():
      key = (signature, form, repeats)
      if key not in _TIMINGS:
        _TIMINGS[key] = _time_conv(eqn, form, repeats)
      total += counts[signature] * _TIMINGS[key]
    totals[form] = total
  return totals


def _time_conv(eqn, form: str, repeats: int) -> float:
  lhs, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], lhs.shape, lhs.dtype)
  k = jax.random.normal(keys[1], rhs.shape, rhs.dtype)
  cotangent = jax.random.normal(keys[2], out.shape, out.dtype)
  if form == 'shifted':
    conv = lambda x, k: shifted_conv(eqn, x, k)
  else:
    conv = lambda x, k: eqn.primitive.bind(x, k, **eqn.params)
  step = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), argnums=(0, 1)))
  jax.block_until_ready(step(x, k))  # Compile and warm up.
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, k))
    best = min(best, time.perf_counter() - t0)
  return best


def choose_depthwise(backend: str, convs: Sequence[Any],
                     timer: Callable[[Sequence[Any]], dict[str, float]] = measure_depthwise
                     ) -> tuple[str, dict[str, float] | None]:
  """The depthwise form for 'auto' on `backend`, and the timings it was chosen by (None when
  nothing was timed): 'shifted' on the CPU; elsewhere the form `timer` finds faster on `convs`
  ('grouped' when the model has no depthwise convolution to time)."""
  if backend == 'cpu':
    return 'shifted', None
  if not convs:
    return 'grouped', None
  seconds = timer(convs)
  return min(DEPTHWISE_FORMS, key=lambda f: seconds[f]), seconds


def resolve_forms(depthwise_impl: str, dropout_impl: str, trace: Callable[[], Any] | None = None,
                  backend: str | None = None,
                  timer: Callable[[Sequence[Any]], dict[str, float]] = measure_depthwise
                  ) -> tuple[Forms, dict[str, float] | None]:
  """`Forms` for config.depthwise_impl and config.dropout_impl, and the depthwise timings behind
  an 'auto' choice (None when none were taken). `trace` returns the model's training-step jaxpr
  (only called when 'auto' needs a measurement); `backend` defaults to JAX's default backend."""
  backend = backend or jax.default_backend()
  if depthwise_impl not in layers_lib.DEPTHWISE_IMPLS:
    raise ValueError(f'depthwise_impl must be one of {layers_lib.DEPTHWISE_IMPLS}, got '
                     f'{depthwise_impl!r}')
  seconds = None
  depthwise = depthwise_impl
  if depthwise == 'auto':
    convs = depthwise_convs(trace()) if (backend != 'cpu' and trace is not None) else []
    depthwise, seconds = choose_depthwise(backend, convs, timer)
  return Forms(depthwise=depthwise, dropout=dropout_impl), seconds
