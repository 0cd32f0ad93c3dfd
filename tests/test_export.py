"""Valid ONNX exports of every way of writing a model: the walkthrough's spec, plain Linen, NNX.

Each model is converted as `export` converts it (weights from its initialisation: the graph is
what matters here), then checked as a strict consumer would: `onnx.checker.check_model` with its
full check (shape inference included) and an onnxruntime session opened at log level 0 that
writes nothing at warning level or above (its C++ log, captured at the file descriptor), in
float32 and after int8 quantisation. tests/test_use.py exports a trained run end to end.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsconv_jax import defaults, export, inference, models
from dsconv_jax.errors import UserError

pytest.importorskip('jax2onnx')
pytest.importorskip('onnxruntime')
import onnx  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 3)
CLASSES = ['a', 'b', 'c']


def _walkthrough_config():
  """The model of the documentation's walkthrough (docs/your_model.md, its config block, as
  written)."""
  with open(os.path.join(ROOT, 'docs', 'your_model.md')) as f:
    text = f.read()
  start = text.index('```', text.index('<!-- walkthrough-config -->'))
  start = text.index('\n', start) + 1
  namespace = {}
  exec(text[start:text.index('```', start)], namespace)  # pylint: disable=exec-used
  return namespace['get_config']()


def _linen_config():
  config = defaults.get_config()
  config.model = 'examples.my_nets:SeparableNet'
  config.model_kwargs = {'widths': (8, 16)}
  return config


def _run(config):
  """A Run of `config`'s model with initialised weights and moving statistics not at 0/1."""
  model = models.build_model(config, len(CLASSES))
  variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  variables = {**variables, 'batch_stats': jax.tree.map(
      lambda v: v + 0.5, variables.get('batch_stats', {}))}
  return inference.Run(workdir='unused', config=config, summary={}, class_names=CLASSES,
                       image_shape=SHAPE, mean=np.full(3, 120, np.float32),
                       std=np.full(3, 60, np.float32), network=model,
                       network_variables=variables,
                       epoch=1, ema=False)


@pytest.fixture(scope='module', params=['walkthrough_spec', 'linen'])
def exported(request):
  """(run, float32 model, int8 model) of each model, converted and quantised once."""
  config = _walkthrough_config() if request.param == 'walkthrough_spec' else _linen_config()
  run = _run(config)
  proto = export.convert(run)
  images = np.random.default_rng(0).integers(0, 256, (8, *SHAPE), dtype=np.uint8)
  return run, proto, onnx.load_from_string(export.quantize(proto.SerializeToString(), images))


def test_float_and_int8_pass_the_full_check_and_open_without_warnings(exported):
  run, proto, quantized = exported
  images = np.random.default_rng(1).integers(0, 256, (4, *SHAPE), dtype=np.uint8)
  for model in (proto, quantized):
    onnx.checker.check_model(model, full_check=True)
    session, warnings = export.session(model.SerializeToString())
    assert warnings == []
    assert session.run(None, {'images': images})[0].shape == (4, len(CLASSES))
  # The float model computes what JAX does (Flax's pooling included, as the model calls it).
  logits = export.run_onnx(export.session(proto.SerializeToString())[0], images)
  np.testing.assert_allclose(logits, export.jax_logits(run, images), atol=1e-4)


def test_session_reports_what_onnxruntime_logs_at_warning_level(exported, capfd):
  """The check itself: a model with a stale value info (as jax2onnx left them) makes onnxruntime
  warn, and `session` returns the warning instead of letting it through."""
  _, proto, _ = exported
  stale = onnx.ModelProto()
  stale.CopyFrom(proto)
  value = next(v for v in stale.graph.value_info if len(v.type.tensor_type.shape.dim) == 4)
  dims = value.type.tensor_type.shape.dim
  dims[1].dim_value, dims[3].dim_value = dims[3].dim_value + 1, dims[1].dim_value + 1
  _, warnings = export.session(stale.SerializeToString())
  assert any(re.search(rf'Error merging shape info for output.*{value.name}', w) for w in warnings)
  with pytest.raises(UserError, match='fails onnx.checker.s full check'):
    export.check_model(stale, 'float32')
  assert 'onnxruntime' not in capfd.readouterr().err


def test_grouped_convolutions_are_found_by_structure(exported):
  """Every grouped convolution of the traced model (Linen `nn.Conv(feature_group_count=c)` as
  well as the spec's layers) is a grouped ONNX Conv; a graph without one is refused."""
  from dsconv_jax import analysis
  run, proto, _ = exported
  expected = analysis.parameter_structure(run.model, SHAPE).grouped_convolutions()
  assert expected and export.check_grouped(proto, expected) == expected
  missing = onnx.ModelProto()
  missing.CopyFrom(proto)
  conv = next(n for n in missing.graph.node
              if n.op_type == 'Conv' and any(a.name == 'group' and a.i > 1 for a in n.attribute))
  next(a for a in conv.attribute if a.name == 'group').i = 1
  with pytest.raises(UserError, match='lacks grouped convolutions with group = '):
    export.check_grouped(missing, expected)


NNX_NET = '''
"""A plain NNX net: depthwise and pointwise convolutions, BatchNorm, ReLU, global average."""
from flax import nnx
import jax.numpy as jnp


class Net(nnx.Module):
  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.depthwise = nnx.Conv(3, 3, (3, 3), feature_group_count=3, use_bias=False, rngs=rngs)
    self.pointwise = nnx.Conv(3, 8, (1, 1), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Conv(8, num_classes, (1, 1), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.pointwise(self.depthwise(x))))
    return jnp.mean(self.head(x), axis=(1, 2))
'''


def test_nnx_model_exports_valid_float_and_int8(tmp_path, monkeypatch):
  """An NNX module as `config.model`: trains one epoch and exports through the real command,
  float32 and int8."""
  from conftest import make_image_folder
  from dsconv_jax import train
  (tmp_path / 'nnx_net.py').write_text(NNX_NET)
  monkeypatch.syspath_prepend(str(tmp_path))
  config = defaults.get_testing_config()
  config.model = 'nnx_net:Net'
  try:
    models.build_model(config, len(CLASSES))
  except UserError as e:
    pytest.skip(f'config.model does not accept NNX modules yet: {e}')
  config.dataset = f'folder:{make_image_folder(tmp_path / "images", per_class=(8, 2), size=16)}'
  train.train_and_evaluate(config, str(tmp_path / 'run'), quiet=True)
  out, lines = str(tmp_path / 'nnx.onnx'), []
  export.export(str(tmp_path / 'run'), out, int8=True, calibration_images=8, log=lines.append)
  for path in (out, export.int8_path(out)):
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert export.session(path)[1] == []
  log = '\n'.join(lines)
  assert 'checks (float32): onnx.checker full check passed; onnxruntime session (log level 0) ' \
         'wrote no warnings; grouped convolutions as grouped Conv: group = 3' in log
