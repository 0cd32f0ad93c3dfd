import collections, re, sys
import numpy as np
from dsconv_jax import cli, experiment, throughput
from dsconv_jax.defaults import get_config
import importlib.util
spec = importlib.util.spec_from_file_location('c', 'examples/model3_spec.py'); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
for model in ['model3', 'examples.plain_nets:Model3NNX', 'examples.plain_nets:Model3Linen']:
  config = m.get_config()
  config.model = model; config.layers = ()
  config.batch_size = 128
  data = experiment.synthetic_data(128 * 2, (32, 32, 3), 10, 0)
  exp = experiment.create_experiment(config, data)
  lowered = exp.train_epoch.lower(exp.state, exp.train_images, exp.train_labels, np.int32(0))
  text = lowered.compile().as_text()
  ops = collections.Counter(re.findall(r'= \S+ (\w[\w-]*)\(', text))
  print(model, sum(ops.values()), {k: ops[k] for k in ['convolution', 'reduce-window', 'select-and-scatter', 'fusion', 'dot', 'reduce', 'custom-call', 'while', 'rng-bit-generator', 'copy', 'transpose', 'sort']})
  print('  ', ops.most_common(12))
