"""Exports a finished run to ONNX: `python -m dsconv_jax.export --workdir=DIR --out=model.onnx`.

The ONNX model takes what the run was trained on and returns logits:

* input `images`: uint8 [batch, H, W, C], NHWC, the pixels as stored (0..255); the batch size is
  dynamic. The run's normalisation ((x - mean) / std per channel) is the graph's first operation,
  so that callers need not know it.
* output `logits`: float32 [batch, classes]; softmax gives the class probabilities.
* metadata (`metadata_props`): `class_names` (JSON list, index = class id), `image_shape`,
  `normalization_mean`, `normalization_std`, `input_layout`, and the run it came from.

The conversion goes through jax2onnx (no TensorFlow), tracing `model.apply` in evaluation mode
with the weights the run evaluated (the EMA weights when it kept them), in float32. The model is
built with depthwise convolutions in their grouped form (`layers.Options(depthwise='grouped')`),
so that each is one ONNX `Conv` with `group` = its input channels. jax2onnx writes the 1x1
convolutions as `Einsum` ('nhwc,cf->nhwf'); they are rewritten as the equivalent `MatMul`, which
runtimes and quantizers know, and the shapes of the intermediate values are inferred afresh
(`infer_shapes_afresh`: jax2onnx's own go stale across its layout transposes).

Checks, each printed as it runs: `onnx.checker.check_model` with its full check (an error, and
nothing written, when it fails); an onnxruntime session opened at log level 0, whose warnings
(captured from its C++ log) are printed; every grouped convolution of the traced model (found by
its `feature_group_count`, whatever the layer is called) present as a grouped `Conv`; and
onnxruntime's logits on the first 256 test images (all of them when there are fewer) against
JAX's: the largest difference is printed and must be below 1e-4, otherwise nothing is written and
the command fails. The int8 model gets the first two as well.

`--int8` also writes a statically quantised model next to the float one (`<stem>.int8.onnx`, or
`--int8_out`): onnxruntime's `quantize_static` in QDQ format, int8 weights per output channel and
uint8 activations of the convolutions and matrix products, with activation ranges calibrated
(min/max) on `--calibration_images` training images. It prints the test accuracy of both models
under onnxruntime and both file sizes.

Needs the `export` extra (jax2onnx, onnx, onnxruntime). A workdir without a finished run or an
output path that cannot be written is a one-line error with exit status 1; command-line
mistakes exit with status 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import re
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from dsconv_jax.errors import UsageError, UserError, run_cli

USAGE = ('python -m dsconv_jax.export --workdir=DIR --out=model.onnx [--int8] [--int8_out=PATH] '
         '[--calibration_images=N]')
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'
# ONNX opset of the export: 18 is the oldest for which jax2onnx writes a valid graph (it gives
# ReduceMean its axes as an input, which opset 18 introduced); onnxruntime runs it since 1.14.
OPSET = 18
TOLERANCE = 1e-4  # The largest |logit difference| allowed between onnxruntime and JAX.
CHECK_IMAGES = 256


def _require_export_packages():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top,unused-import
    import onnx  # pylint: disable=g-import-not-at-top,unused-import
    import onnxruntime  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise UserError(f'the export needs jax2onnx, onnx and onnxruntime ({e}); install them with '
                    "pip install -e '.[export]'") from None


def int8_path(out: str) -> str:
  """Where `--int8` writes by default: model.onnx -> model.int8.onnx."""
  stem, ext = os.path.splitext(out)
  return f'{stem}.int8{ext or ".onnx"}'


def conv_groups(proto) -> list[int]:
  """The `group` of every Conv node of an ONNX model (1 when not given)."""
  from onnx import helper
  groups = []
  for node in proto.graph.node:
    if node.op_type == 'Conv':
      attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
      groups.append(int(attrs.get('group', 1)))
  return groups


def einsum_to_matmul(proto) -> int:
  """Rewrites jax2onnx's 1x1 convolutions, Einsum 'nhwc,cf->nhwf', as MatMul; returns how many.

  ONNX MatMul broadcasts like numpy's: [N, H, W, C] @ [C, F] = [N, H, W, F], the same sums.
  """
  from onnx import helper
  count = 0
  for i, node in enumerate(proto.graph.node):
    if node.op_type != 'Einsum':
      continue
    equation = helper.get_attribute_value(node.attribute[0]).decode().replace(' ', '')
    inputs, output = equation.split('->')
    lhs, rhs = inputs.split(',')
    # A contraction of lhs's last axis with rhs's first, rhs a matrix, nothing else moved.
    if len(rhs) == 2 and lhs[-1] == rhs[0] and output == lhs[:-1] + rhs[1] and \
        len(set(lhs + rhs[1])) == len(lhs) + 1:
      proto.graph.node[i].CopyFrom(helper.make_node(
          'MatMul', list(node.input), list(node.output), name=node.name or f'MatMul_{i}'))
      count += 1
  return count


# Flax's pooling functions, which jax2onnx replaces during a conversion by versions that take
# the window only by keyword: `nn.max_pool(x, (2, 2))`, as Flax documents it, then fails with a
# TypeError. The model is traced with Flax's own functions (their `lax.reduce_window` reaches
# jax2onnx's lax plugins, which write the same ONNX pooling).
_FLAX_POOLING = (('flax.linen', ('max_pool', 'avg_pool', 'min_pool', 'pool')),
                 ('flax.nnx', ('max_pool', 'avg_pool', 'min_pool', 'pool')))


@contextlib.contextmanager
def _flax_pooling(originals: dict[tuple[Any, str], Any]):
  """Puts Flax's pooling functions (as they were before jax2onnx patched them) back for a while."""
  patched = {key: getattr(*key) for key in originals}
  for (module, name), fn in originals.items():
    setattr(module, name, fn)
  try:
    yield
  finally:
    for (module, name), fn in patched.items():
      setattr(module, name, fn)


def _pooling_functions() -> dict[tuple[Any, str], Any]:
  found = {}
  for module_name, names in _FLAX_POOLING:
    module = importlib.import_module(module_name)
    found.update({(module, n): getattr(module, n) for n in names if hasattr(module, n)})
  return found


def convert(run):
  """The run's model in float32 as an ONNX ModelProto (uint8 images in, logits out)."""
  import jax
  import jax.numpy as jnp
  import jax2onnx
  from dsconv_jax import models
  from dsconv_jax import steps

  config = run.config.copy_and_resolve_references()
  if models.declares(models.model_constructor(config.model), 'options'):
    with config.unlocked():
      config.depthwise_impl = 'grouped'  # One grouped Conv per depthwise layer in the graph.
  model = models.build_model(config, run.num_classes)
  mean, std = jnp.asarray(run.mean), jnp.asarray(run.std)

  pooling = _pooling_functions()

  def logits(images):
    with _flax_pooling(pooling):
      return model.apply(run.network_variables, steps.preprocess(images, mean, std), train=False)

  spec = jax.ShapeDtypeStruct(('batch', *run.image_shape), jnp.uint8)
  proto = jax2onnx.to_onnx(logits, [spec], model_name=f'dsconv_jax_{run.config.model}',
                           opset=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  einsum_to_matmul(proto)
  proto = infer_shapes_afresh(proto)
  h, w, c = run.image_shape
  proto.producer_name = 'dsconv_jax (jax2onnx)'
  proto.doc_string = (f'{run.config.model} trained by dsconv_jax ({run.workdir}, epoch '
                      f'{run.epoch}). Input {INPUT_NAME}: uint8 [batch, {h}, {w}, {c}] NHWC '
                      f'pixels 0..255, normalised inside. Output {OUTPUT_NAME}: float32 [batch, '
                      f'{run.num_classes}]; softmax for probabilities. Class names in metadata.')
  metadata = {
      'class_names': json.dumps(run.class_names),
      'image_shape': json.dumps(list(run.image_shape)),
      'input_layout': 'NHWC uint8, 0..255 (normalised inside the graph)',
      'normalization_mean': json.dumps([float(v) for v in run.mean]),
      'normalization_std': json.dumps([float(v) for v in run.std]),
      'model': run.config.model,
      'source_workdir': os.path.abspath(run.workdir),
      'source_epoch': str(run.epoch),
      'ema_weights': str(run.ema).lower(),
  }
  del proto.metadata_props[:]
  for key, value in metadata.items():
    proto.metadata_props.add(key=key, value=value)
  return proto


def jax_logits(run, images: np.ndarray) -> np.ndarray:
  """JAX's float32 logits of the run's model as the run built it (its own depthwise form)."""
  import jax
  from dsconv_jax import steps
  apply = jax.jit(lambda variables, x: run.network.apply(
      variables, steps.preprocess(x, run.mean, run.std), train=False))
  return np.asarray(apply(run.network_variables, images))


def infer_shapes_afresh(proto):
  """`proto` with the shapes of its intermediate values inferred again by ONNX, from scratch.

  jax2onnx records a value's shape as JAX saw it (NHWC) and may then move the value across its
  layout transposes (NCHW), leaving the recorded shape stale: `onnx.checker`'s full check fails
  on it and onnxruntime warns that it falls back to a lenient merge. Value infos are optional in
  ONNX, so they are dropped and inferred again; an inconsistency left is reported by
  `check_model`.
  """
  import onnx
  del proto.graph.value_info[:]
  return onnx.shape_inference.infer_shapes(proto, check_type=True, data_prop=True)


def check_model(proto, what: str) -> str:
  """`onnx.checker.check_model` with its full check (shape inference included); a UserError."""
  import onnx
  try:
    onnx.checker.check_model(proto, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
    first = str(e).strip().splitlines()[0]
    raise UserError(f'the {what} ONNX model fails onnx.checker\'s full check ({first}); nothing '
                    'was written') from None
  return 'onnx.checker full check passed'


def check_grouped(proto, expected: Sequence[int]) -> list[int]:
  """`expected` (the groups of the model's grouped convolutions, as traced); a UserError when
  the graph lacks a Conv with one of them."""
  found = collections.Counter(conv_groups(proto))
  missing = collections.Counter(expected) - found
  if missing:
    raise UserError(f'the ONNX graph lacks grouped convolutions with group = '
                    f'{", ".join(map(str, sorted(missing.elements())))} (Conv groups in the '
                    f'graph: {sorted(found.elements())})')
  return sorted(expected)


# onnxruntime's log lines: '<time> [W:onnxruntime:, graph.cc:128 MergeShapeInfo] ...' (V, I, W, E
# or F for verbose, info, warning, error, fatal), maybe inside terminal colour codes.
_ORT_LOG = re.compile(r'\[([VIWEF]):onnxruntime')


def session(model_bytes_or_path):
  """An onnxruntime session on the CPU, and the lines it logged at warning level or above.

  It opens at log severity 0 (everything) with the process's stderr captured at the file
  descriptor (onnxruntime logs from C++); lines that are not onnxruntime's go back to stderr.
  """
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.log_severity_level = 0
  sys.stderr.flush()
  with tempfile.TemporaryFile() as captured:
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      sess = ort.InferenceSession(model_bytes_or_path, options,
                                  providers=['CPUExecutionProvider'])
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    captured.seek(0)
    lines = captured.read().decode(errors='replace').splitlines()
  warnings = []
  for line in lines:
    match = _ORT_LOG.search(line)
    if match is None:
      print(line, file=sys.stderr)
    elif match.group(1) in 'WEF':
      warnings.append(re.sub(r'\x1b\[[0-9;]*m', '', line).strip())
  return sess, warnings


def session_check(warnings: Sequence[str], log) -> str:
  """What the session's log says, for the list of checks; its warnings as `warning:` lines."""
  for line in warnings:
    log(f'warning: onnxruntime: {line}')
  if warnings:
    return f'onnxruntime session (log level 0) wrote {len(warnings)} warnings (shown above)'
  return 'onnxruntime session (log level 0) wrote no warnings'


def run_onnx(sess, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Logits of `images` under an onnxruntime session, in batches."""
  out = [sess.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch_size]})[0]
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class _Calibration:
  """onnxruntime's CalibrationDataReader protocol (`get_next`) over batches of images."""

  def __init__(self, images: np.ndarray, batch_size: int = 32):
    self._batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

  def get_next(self) -> dict[str, np.ndarray] | None:
    batch = next(self._batches, None)
    return None if batch is None else {INPUT_NAME: batch}


def quantize(float_model: bytes, calibration: np.ndarray) -> bytes:
  """The statically quantised (QDQ, int8 weights per channel, uint8 activations) model."""
  from onnxruntime import quantization
  from onnxruntime.quantization import shape_inference
  with tempfile.TemporaryDirectory(prefix='dsconv_jax-int8-') as tmp:
    source, prepared, quantized = (os.path.join(tmp, n) for n in ('float.onnx', 'prepared.onnx',
                                                                  'int8.onnx'))
    with open(source, 'wb') as f:
      f.write(float_model)
    # Shape inference and constant folding first (onnxruntime's advice): the weights become
    # initializers, which the quantizer can quantize per channel.
    shape_inference.quant_pre_process(source, prepared)
    quantization.quantize_static(
        prepared, quantized, _Calibration(calibration),
        quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=['Conv', 'MatMul'],
        per_channel=True, activation_type=quantization.QuantType.QUInt8,
        # No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops (does not
        # merge) the outputs it clears at that count, so 4+ batches collected nothing. Memory
        # grows with the calibration images instead (about 4 MB per Model 3 image).
        weight_type=quantization.QuantType.QInt8)
    with open(quantized, 'rb') as f:
      return f.read()


def write_atomic(path: str, payload: bytes, flag: str) -> None:
  from dsconv_jax import fileio
  try:
    with fileio.atomic_open(path, 'wb') as f:
      f.write(payload)
  except OSError as e:
    raise UserError(f'cannot write {flag}={path} ({e.strerror or e}); choose another {flag}'
                    ) from None


def export(workdir: str, out: str, *, int8: bool = False, int8_out: str | None = None,
           calibration_images: int = 256, log=print) -> dict[str, Any]:
  """Exports the run in `workdir` to `out` (and its int8 model); returns what it measured."""
  from dsconv_jax import analysis
  from dsconv_jax import data as data_lib
  from dsconv_jax import inference
  int8_out = (int8_out or int8_path(out)) if int8 else None
  for path, flag in ((out, '--out'), (int8_out, '--int8_out')):
    if path:
      inference.check_writable(path, flag)
  if int8_out and os.path.abspath(int8_out) == os.path.abspath(out):
    raise UsageError(f'--int8_out={int8_out} is --out; name another file')
  _require_export_packages()
  run = inference.load_run(workdir)
  dataset = run.dataset()
  test = dataset.test

  proto = convert(run)
  structure = analysis.parameter_structure(run.network, run.image_shape)
  groups = check_grouped(proto, structure.grouped_convolutions())
  checks = [check_model(proto, 'float32')]
  payload = proto.SerializeToString()
  h, w, c = run.image_shape
  log(f'exported {run.workdir} ({run.config.model}, epoch {run.epoch}'
      f'{", EMA weights" if run.ema else ""}): input {INPUT_NAME} uint8 [batch, {h}, {w}, {c}] '
      f'NHWC, output {OUTPUT_NAME} float32 [batch, {run.num_classes}]')
  float_session, warnings = session(payload)
  checks.append(session_check(warnings, log))
  checks.append('grouped convolutions as grouped Conv: '
                + (f'group = {", ".join(map(str, groups))}' if groups else 'none in the model'))
  log(f'checks (float32): {"; ".join(checks)}')
  check = test.images[:CHECK_IMAGES]
  difference = float(np.max(np.abs(run_onnx(float_session, check) - jax_logits(run, check))))
  log(f'onnxruntime vs JAX on {len(check)} test images: largest logit difference '
      f'{difference:.3g} (required < {TOLERANCE:g})')
  if not difference < TOLERANCE:
    raise UserError(f'onnxruntime\'s logits differ from JAX\'s by {difference:.3g} (>= '
                    f'{TOLERANCE:g}); nothing was written')
  write_atomic(out, payload, '--out')
  result = {'out': out, 'bytes': len(payload), 'max_difference': difference,
            'check_images': len(check), 'groups': groups}
  if not int8:
    log(f'wrote {out} ({len(payload):,} bytes)')
    return result

  calibration = data_lib.take_subset(dataset.train, min(calibration_images,
                                                        len(dataset.train.labels)),
                                     int(run.config.get('data_seed', 0))).images
  quantized = quantize(payload, calibration)
  import onnx
  int8_checks = [check_model(onnx.load_from_string(quantized), 'int8')]
  int8_session, warnings = session(quantized)
  int8_checks.append(session_check(warnings, log))
  accuracy = lambda sess: float(np.mean(
      run_onnx(sess, test.images).argmax(-1) == test.labels))
  float_accuracy, int8_accuracy = accuracy(float_session), accuracy(int8_session)
  write_atomic(int8_out, quantized, '--int8_out')
  log(f'int8: static quantisation (QDQ; int8 weights per channel, uint8 activations), calibrated '
      f'on {len(calibration)} training images')
  log(f'checks (int8): {"; ".join(int8_checks)}')
  log(f'\n| model | file | bytes | test accuracy ({len(test.labels)} images, onnxruntime) |\n'
      f'| --- | --- | ---: | ---: |\n'
      f'| float32 | {out} | {len(payload):,} | {100 * float_accuracy:.2f}% |\n'
      f'| int8 | {int8_out} | {len(quantized):,} | {100 * int8_accuracy:.2f}% |')
  log(f'wrote {out} and {int8_out}')
  result.update(int8_out=int8_out, int8_bytes=len(quantized), float_accuracy=float_accuracy,
                int8_accuracy=int8_accuracy, calibration_images=len(calibration),
                test_images=len(test.labels))
  return result


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose mistakes are `UsageError`s: one line on stderr and exit status 2."""

  def error(self, message):
    raise UsageError(f'{message}; usage: {USAGE}')


def main(argv: Sequence[str] | None = None) -> None:
  parser = _ArgumentParser(
      prog='python -m dsconv_jax.export', usage=USAGE,
      description='Exports a finished run to ONNX (uint8 NHWC images in, logits out), checked '
      'against JAX with onnxruntime; --int8 also writes a statically quantised model.')
  parser.add_argument('--workdir', required=True, metavar='DIR',
                      help='the workdir of a finished dsconv_jax.main run')
  parser.add_argument('--out', required=True, metavar='PATH', help='the ONNX file to write')
  parser.add_argument('--int8', action='store_true',
                      help='also write a statically quantised int8 model and compare accuracies')
  parser.add_argument('--int8_out', default=None, metavar='PATH',
                      help='where --int8 writes (default: --out with .int8.onnx)')
  parser.add_argument('--calibration_images', type=int, default=256, metavar='N',
                      help='training images that calibrate the int8 ranges (default 256; each '
                      'takes about 4 MB of memory for Model 3)')

  def body():
    args = parser.parse_args(argv)
    if args.calibration_images < 1:
      raise UsageError(f'--calibration_images must be at least 1, got {args.calibration_images}')
    if args.int8_out and not args.int8:
      raise UsageError('--int8_out needs --int8')
    export(args.workdir, args.out, int8=args.int8, int8_out=args.int8_out,
           calibration_images=args.calibration_images,
           log=lambda line: print(line, flush=True))

  run_cli(body)


if __name__ == '__main__':
  main()
