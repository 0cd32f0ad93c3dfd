"""Side-by-side ablation of the hand-written gradients in dsconv_jax/layers.py, in one process.

    python benchmarks/cpu_step_ablation.py --config=configs/model3.py [--steps=4] [--chunks=4] \
        [--runners=current,taps_kernel_grad_per_tap]

Each runner is `dsconv_jax.throughput`'s compiled epoch with some of the layers' fast paths
replaced, while it is traced, by the plain autodiff form they replaced:

* `pointwise_einsum`: `pointwise_conv` as a bare einsum (autodiff gradient);
* `pool_select_and_scatter`: `tiled_max_pool` as `nn.max_pool` (select-and-scatter gradient);
* `taps_autodiff`: the shifted depthwise form with autodiff instead of its own gradient;
* `taps_kernel_grad_per_tap`: that gradient's kernel part as one pass over the batch per tap
  instead of the CPU's loop over chunks of it (`fast_grads._taps_kernel_grad_blocked`);
* `taps_unchunked`: that, and autodiff for the strided layers (the hand-written gradient at
  stride 1 only): the depthwise gradient before the chunking;
* `all_before`: all of them, with Threefry dropout masks: the step with none of the fast paths.

A replacement is made in every module that holds the name (`layers`, `fast_forms`, `fast_grads`),
so built-in layers and models written in plain Flax are traced with it alike.

Prints one JSON object: images per second (best chunk, chunks taken in turn) per runner.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=wrong-import-position
import flax.linen as nn  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from dsconv_jax import cli, fast_forms, fast_grads, layers, reporting, throughput  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('runners', None, 'the runners to measure (default: all)')


def _taps_autodiff(x, k, dilation, strides):
  out_size = fast_grads._out_size(x.shape, k.shape, dilation, strides)  # pylint: disable=protected-access
  return fast_grads.shifted_taps_strided(x, k, strides, dilation, out_size)


_SHIFTED_TAPS = fast_grads.shifted_taps


def _taps_autodiff_strided(x, k, dilation, strides):
  if strides == (1, 1):
    return _SHIFTED_TAPS(x, k, dilation, strides)
  return _taps_autodiff(x, k, dilation, strides)


REPLACEMENTS = {
    'pointwise_einsum': {'pointwise_conv': lambda x, k: jnp.einsum('nhwc,cf->nhwf', x, k)},
    'pool_select_and_scatter': {
        'tiled_max_pool': lambda x, w: nn.max_pool(x, w, w, padding='VALID')},
    'taps_autodiff': {'shifted_taps': _taps_autodiff},
    'taps_kernel_grad_per_tap': {
        '_taps_kernel_grad_blocked': fast_grads._taps_kernel_grad},  # pylint: disable=protected-access
    'taps_strided_autodiff': {'shifted_taps': _taps_autodiff_strided},
}
MODULES = (layers, fast_forms, fast_grads)
RUNNERS = {
    'current': ((), 'hash'),
    'pointwise_einsum': (('pointwise_einsum',), 'hash'),
    'pool_select_and_scatter': (('pool_select_and_scatter',), 'hash'),
    'taps_autodiff': (('taps_autodiff',), 'hash'),
    'taps_kernel_grad_per_tap': (('taps_kernel_grad_per_tap',), 'hash'),
    'taps_unchunked': (('taps_kernel_grad_per_tap', 'taps_strided_autodiff'), 'hash'),
    'all_before': (('pointwise_einsum', 'pool_select_and_scatter', 'taps_autodiff'), 'threefry'),
}


class AblatedRunner(throughput.JaxRunner):
  """A JaxRunner traced with some of the fast paths' functions replaced."""

  def __init__(self, name, replacements, **kwargs):
    super().__init__(**kwargs)
    self.name, self.replacements = name, replacements

  def setup(self) -> float:
    saved = []
    for group in self.replacements:
      for attr, fn in REPLACEMENTS[group].items():
        holders = [m for m in MODULES if hasattr(m, attr)]
        if not holders:
          raise AttributeError(f'no module of {[m.__name__ for m in MODULES]} has {attr}')
        for module in holders:
          saved.append((module, attr, getattr(module, attr)))
          setattr(module, attr, fn)
    try:
      return super().setup()  # Traces and compiles here.
    finally:
      for module, attr, fn in reversed(saved):
        setattr(module, attr, fn)


def main(argv) -> None:
  del argv
  config = cli.get_config()
  unknown = sorted(set(FLAGS.runners or ()) - set(RUNNERS))
  if unknown:
    raise cli.UsageError(f'--runners: unknown {unknown}; known: {sorted(RUNNERS)}')
  runners = []
  for name, (groups, dropout) in RUNNERS.items():
    if FLAGS.runners and name not in FLAGS.runners:
      continue
    variant = throughput.variants_of(config, dropout=dropout)[0]
    runners.append(AblatedRunner(name, groups, config=throughput.config_for(config, variant),
                                 steps_per_chunk=FLAGS.steps, variant=variant))
  results = throughput._measure(  # pylint: disable=protected-access
      runners, FLAGS.chunks, lambda s: print(s, file=sys.stderr, flush=True))
  print(json.dumps({
      'model': config.model, 'device': reporting.device_description(),
      'batch_size': config.batch_size, 'steps_per_chunk': FLAGS.steps, 'chunks': FLAGS.chunks,
      'statistic': 'best chunk of each runner; chunks taken in turn (round robin)',
      'runners': [{'name': r.name, 'replaced': list(r.replacements),
                   'dropout_impl': r.variant['dropout_impl'], **res}
                  for r, res in zip(runners, results)],
      'versions': reporting.versions()}, indent=2))


if __name__ == '__main__':
  # throughput's flags (--steps, --chunks, --config) are defined on import.
  cli.main(main)
