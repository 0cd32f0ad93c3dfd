"""Where a compiled training step's time goes, per XLA operation and per layer type.

    python benchmarks/profile_step.py --config=configs/model3.py [--steps=4] [--top=25]

Traces one compiled epoch of `dsconv_jax.throughput` (after compiling and one warm-up epoch) with
`jax.profiler`, sums each XLA operation's time over the epoch and divides by the steps. Each
operation (usually a fusion of several) is assigned to the layer of its root instruction, as the
HLO metadata names it, and to the forward or backward pass ('transpose(...)' in the name).
Prints one JSON object. The per-operation times are summed over the CPU's threads, so their total
can exceed the wall-clock step time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=wrong-import-position

from dsconv_jax import cli, reporting, throughput  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('top', 25, 'Operations to list.')
LAYERS = ('DepthwiseConv2D', 'PointwiseConv2D', 'SeparableConv2D', 'BatchNorm', 'Dropout',
          'MaxPool2D', 'Activation', 'GlobalAvgPool', 'Conv2D', 'Dense')


def _root_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the op_name metadata of that instruction (a fusion's is its root's)."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"',
                       hlo_text, re.M):
    names.setdefault(m.group(1), m.group(2))
  return names


def _category(op_name: str) -> str:
  backward = 'transpose(' in op_name
  for layer in LAYERS:
    if re.search(rf'/{layer}(_\d+)?/', op_name + '/'):
      return f'{layer} {"backward" if backward else "forward"}'
  if any(s in op_name for s in ('adam', 'apply_gradients', 'scale_by', 'optax')):
    return 'optimizer'
  if 'cross_entropy' in op_name or 'log_softmax' in op_name:
    return 'loss'
  return 'other'


def main(argv) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  config = cli.get_config()
  variant = throughput.variants_of(config, FLAGS.depthwise_impl, FLAGS.compute_dtype,
                                   FLAGS.dropout_impl)[0]
  runner = throughput.JaxRunner(throughput.config_for(config, variant),
                                steps_per_chunk=FLAGS.steps, variant=variant)
  runner.setup()
  names = _root_op_names(runner.compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      seconds = runner.run_chunk()
    trace_file = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)[0]
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e['name'] in names:
      per_op[e['name']] += e.get('dur', 0) / 1000 / FLAGS.steps  # ms per step
  per_category = collections.Counter()
  for op, ms in per_op.items():
    per_category[_category(names[op])] += ms
  total = sum(per_op.values())
  print(json.dumps({
      'model': config.model, 'device': reporting.device_description(),
      'batch_size': config.batch_size, **variant,
      'depthwise_resolved': runner.depthwise_resolved,
      'steps': FLAGS.steps, 'wall_ms_per_step': 1000 * seconds / FLAGS.steps,
      'op_ms_per_step_summed_over_threads': total,
      'by_layer_type': [{'category': c, 'ms_per_step': ms, 'share': ms / total}
                        for c, ms in per_category.most_common()],
      'top_operations': [{'op': op, 'ms_per_step': ms, 'root': names[op][-120:]}
                         for op, ms in per_op.most_common(FLAGS.top)],
      'versions': reporting.versions(),
      'date': time.strftime('%Y-%m-%d'),
  }, indent=2))


if __name__ == '__main__':
  cli.main(main)
