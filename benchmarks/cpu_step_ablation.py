"""Side-by-side ablation of the hand-written gradients in dsconv_jax/layers.py, in one process.

    python benchmarks/cpu_step_ablation.py --config=configs/model3.py [--steps=4] [--chunks=4]

Each runner is `dsconv_jax.throughput`'s compiled epoch with some of the layers' fast paths
replaced, while it is traced, by the plain autodiff form they replaced:

* `pointwise_einsum`: `pointwise_conv` as a bare einsum (autodiff gradient);
* `pool_select_and_scatter`: `tiled_max_pool` as `nn.max_pool` (select-and-scatter gradient);
* `taps_autodiff`: the stride-1 shifted depthwise form with autodiff instead of its own gradient;
* `all_before`: all three, with Threefry dropout masks: the step with none of the fast paths.

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

from dsconv_jax import cli, fast_grads, layers, reporting, throughput  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def _taps_autodiff(x, k, dilation):
  kh, kw = k.shape[:2]
  dh, dw = dilation
  out_size = (x.shape[1] - (kh - 1) * dh, x.shape[2] - (kw - 1) * dw)
  return fast_grads.shifted_taps_strided(x, k, (1, 1), dilation, out_size)


REPLACEMENTS = {
    'pointwise_einsum': {'pointwise_conv': lambda x, k: jnp.einsum('nhwc,cf->nhwf', x, k)},
    'pool_select_and_scatter': {
        'tiled_max_pool': lambda x, w: nn.max_pool(x, w, w, padding='VALID')},
    'taps_autodiff': {'shifted_taps': _taps_autodiff},
}
RUNNERS = {
    'current': ((), 'hash'),
    'pointwise_einsum': (('pointwise_einsum',), 'hash'),
    'pool_select_and_scatter': (('pool_select_and_scatter',), 'hash'),
    'taps_autodiff': (('taps_autodiff',), 'hash'),
    'all_before': (('pointwise_einsum', 'pool_select_and_scatter', 'taps_autodiff'), 'threefry'),
}


class AblatedRunner(throughput.JaxRunner):
  """A JaxRunner traced with some of `layers`' functions replaced."""

  def __init__(self, name, replacements, **kwargs):
    super().__init__(**kwargs)
    self.name, self.replacements = name, replacements

  def setup(self) -> float:
    saved = {}
    for group in self.replacements:
      for attr, fn in REPLACEMENTS[group].items():
        saved[attr] = getattr(layers, attr)
        setattr(layers, attr, fn)
    try:
      return super().setup()  # Traces and compiles here.
    finally:
      for attr, fn in saved.items():
        setattr(layers, attr, fn)


def main(argv) -> None:
  del argv
  config = cli.get_config()
  runners = []
  for name, (groups, dropout) in RUNNERS.items():
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
