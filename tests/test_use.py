"""Using what a run trained: `load_run`, `predict`, `evaluate` (per class) and `export` (ONNX).

One short real run of the tiny model (EMA weights on) serves every test; the command-line tools
run in-process (their `main(argv)`) except where the `python -m` entry itself is the point.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsconv_jax import defaults
from dsconv_jax import evaluate
from dsconv_jax import inference
from dsconv_jax import predict
from dsconv_jax import train
from dsconv_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
CLASSES = ['cat', 'dog', 'frog']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, image folder, summary) of a finished 2-epoch run with an EMA of the weights,
  evaluated with BatchNorm statistics recomputed for them (PreciseBN)."""
  from conftest import make_image_folder
  root = tmp_path_factory.mktemp('use')
  folder = make_image_folder(root / 'images', classes=tuple(CLASSES), per_class=(16, 6))
  config = defaults.get_testing_config()
  config.dataset = f'folder:{folder}'
  config.num_epochs = 2
  config.train_examples = 0
  config.eval_examples = 0
  config.ema_decay = 0.9
  config.bn_recalibrate_batches = 2
  config.tta_flip = True
  config.tta_translate = 1
  workdir = str(root / 'run')
  summary = train.train_and_evaluate(config, workdir, quiet=True)
  return workdir, folder, summary


@pytest.fixture(scope='module')
def run(trained):
  return inference.load_run(trained[0])


def cli(env, module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)


def call_main(main, argv, capsys):
  """(exit status, stdout, stderr) of an entry point's `main(argv)` run in this process."""
  capsys.readouterr()
  try:
    main(argv)
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_summary_stores_what_inference_needs_and_per_class_results(trained):
  workdir, _, summary = trained
  with open(os.path.join(workdir, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk['class_names'] == CLASSES
  assert on_disk['image_shape'] == [32, 32, 3]
  assert on_disk['config']['model'] == 'tiny' and len(on_disk['normalization']['mean']) == 3
  matrix = np.asarray(on_disk['test_confusion'])
  assert matrix.shape == (3, 3) and matrix.sum() == on_disk['test_examples'] == 18
  # The matrix is the test accuracy's: its diagonal counts the correct predictions.
  assert np.trace(matrix) / matrix.sum() == pytest.approx(on_disk['test_accuracy'], abs=1e-6)
  assert on_disk['test_accuracy_per_class'] == {
      name: matrix[i, i] / matrix[i].sum() for i, name in enumerate(CLASSES)}
  with open(os.path.join(workdir, 'confusion.png'), 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE


def test_load_run_restores_the_ema_weights_and_predicts(trained, run):
  import orbax.checkpoint as ocp
  workdir, _, summary = trained
  assert run.class_names == CLASSES and run.image_shape == (32, 32, 3)
  assert run.epoch == 2 and run.ema and run.config.model == 'tiny'
  # The weights are the checkpoint's EMA, not the trained parameters.
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  raw = manager.restore(2, args=ocp.args.StandardRestore())
  ema = raw['ema_params']['DepthwiseConv2D_0']['kernel']
  got = np.asarray(run.variables['params']['DepthwiseConv2D_0']['kernel'])
  np.testing.assert_array_equal(got, np.asarray(ema))
  assert not np.array_equal(got, np.asarray(raw['params']['DepthwiseConv2D_0']['kernel']))

  test = run.dataset().test
  probabilities = run.predict(test.images)
  assert probabilities.shape == (18, 3) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
  correct = int(np.sum(probabilities.argmax(-1) == test.labels))
  assert correct == round(summary['test_accuracy'] * 18)
  # Any batch size; a row's probabilities do not depend on the rows around it.
  np.testing.assert_allclose(run.predict(test.images[5:8]), probabilities[5:8], rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(run.predict(test.images, batch_size=4), probabilities, rtol=1e-6,
                             atol=1e-7)
  assert run.predict(test.images[:0]).shape == (0, 3)


def test_load_run_reads_without_touching_the_workdir(trained, tmp_path):
  # Safe beside a training process that writes the same folder: a save in flight (its temporary
  # folder) is left alone, and nothing is created.
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained[0], workdir)
  in_flight = os.path.join(workdir, 'checkpoints', '3.orbax-checkpoint-tmp-1700000000000000')
  os.makedirs(in_flight)
  before = sorted(os.listdir(workdir)) + sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert inference.load_run(workdir).epoch == 2
  assert os.path.isdir(in_flight)
  after = sorted(os.listdir(workdir)) + sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert after == before


def test_predict_rejects_images_it_cannot_take(run):
  with pytest.raises(UserError, match='uint8'):
    run.predict(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(UserError, match=r'image\[None\]'):
    run.predict(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(UserError, match=r'got shape \[2, 28, 28, 3\]'):
    run.predict(np.zeros((2, 28, 28, 3), np.uint8))


def test_images_are_decoded_as_training_decoded_them(run, tmp_path):
  from PIL import Image
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
  Image.fromarray(grey, 'L').save(tmp_path / 'grey.png')
  rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
  Image.fromarray(big, 'RGB').save(tmp_path / 'big.png')
  images = run.load_images([str(tmp_path / n) for n in ('grey.png', 'rgba.png', 'big.png')])
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  # Grey: resized bilinearly as grey, then repeated into the run's three channels.
  resized = np.asarray(Image.fromarray(grey, 'L').resize((32, 32), Image.BILINEAR))
  for c in range(3):
    np.testing.assert_array_equal(images[0, ..., c], resized)
  np.testing.assert_array_equal(images[1], rgba[..., :3])  # Alpha dropped, colour kept.
  np.testing.assert_array_equal(
      images[2], np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR)))


def test_predict_prints_the_top_classes_of_every_image_in_a_folder(trained, run, capsys):
  _, folder, _ = trained
  code, out, err = call_main(predict.main, ['--workdir', trained[0], os.path.join(folder, 'test')],
                             capsys)
  assert code == 0, err
  lines = out.splitlines()
  paths = sorted(os.path.join(folder, 'test', c, f) for c in CLASSES
                 for f in os.listdir(os.path.join(folder, 'test', c)))
  assert [line.split('  ')[0] for line in lines] == paths
  probabilities = run.predict(run.load_images(paths))
  for line, p in zip(lines, probabilities):
    shown = [cell.rsplit(' ', 1) for cell in line.split('  ')[1:]]
    order = np.argsort(-p, kind='stable')
    assert [name for name, _ in shown] == [CLASSES[i] for i in order]  # top 3 of 3, best first
    assert [float(pct[:-1]) for _, pct in shown] == pytest.approx(100 * p[order], abs=0.006)


def test_predict_json_gives_what_load_run_predict_gives(trained, run, cli_env):
  _, folder, _ = trained
  files = [os.path.join(folder, 'test', 'dog', '0001.png'), os.path.join(folder, 'test', 'cat')]
  out = cli(cli_env, 'dsconv_jax.predict', f'--workdir={trained[0]}', '--json', '--top_k=2',
            *files)
  assert out.returncode == 0, out.stderr
  records = [json.loads(line) for line in out.stdout.splitlines()]
  paths = [files[0]] + [os.path.join(files[1], f'{i:04d}.png') for i in range(6)]
  assert [r['path'] for r in records] == paths
  expected = run.predict(run.load_images(paths))
  for record, p in zip(records, expected):
    assert list(record['probabilities']) == CLASSES
    np.testing.assert_allclose(list(record['probabilities'].values()), p, rtol=1e-6, atol=1e-7)
    order = np.argsort(-p, kind='stable')[:2]
    assert [t['class'] for t in record['top_k']] == [CLASSES[i] for i in order]
    assert [t['probability'] for t in record['top_k']] == [record['probabilities'][CLASSES[i]]
                                                           for i in order]


def test_evaluate_reproduces_the_runs_test_accuracy_per_class(trained, run, capsys, tmp_path):
  workdir, _, summary = trained
  result = evaluate.evaluate(run)
  assert result['matrix'].tolist() == summary['test_confusion']
  assert result['per_class'] == summary['test_accuracy_per_class']
  out_png = str(tmp_path / 'report' / 'confusion.png')
  code, out, err = call_main(evaluate.main, [f'--workdir={workdir}', f'--out={out_png}'], capsys)
  assert code == 0, err
  correct = round(summary['test_accuracy'] * 18)
  assert (f'accuracy {100 * correct / 18:.2f}% ({correct}/18); the run recorded '
          f'{100 * summary["test_accuracy"]:.2f}%') in out
  for name, acc in summary['test_accuracy_per_class'].items():
    i = CLASSES.index(name)
    row = summary['test_confusion'][i]
    assert f'| {name} | {100 * acc:.2f}% | {row[i]} | {sum(row)} |' in out
  for pair in evaluate.confusion.most_confused(result['matrix'], CLASSES):
    assert f'| {pair["true"]} | {pair["predicted"]} | {pair["count"]} |' in out
  with open(out_png, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE


def test_evaluate_with_tta_reproduces_the_runs_tta_accuracies(trained, run, capsys):
  workdir, _, summary = trained
  for flags, key in (([ '--tta_flip'], 'test_accuracy_tta_flip'),
                     (['--tta_flip', '--tta_translate=1'], 'test_accuracy_tta_multicrop')):
    result = evaluate.evaluate(run, tta_flip=True, tta_translate=1 if len(flags) == 2 else 0)
    assert result['accuracy'] == pytest.approx(summary[key])
    code, out, err = call_main(evaluate.main, [f'--workdir={workdir}', *flags], capsys)
    assert code == 0, err
    assert f'with test-time augmentation ({result["tta"]}); the run recorded ' \
           f'{100 * summary[key]:.2f}%' in out
  # The views differ: on these images at least one TTA changes some logits.
  plain = run.logits(run.dataset().test.images)
  assert not np.allclose(plain, run.logits(run.dataset().test.images, tta_flip=True,
                                           tta_translate=1))
  # Other views than the run's multi-crop: nothing recorded to compare with.
  code, out, err = call_main(evaluate.main, [f'--workdir={workdir}', '--tta_translate=2'], capsys)
  assert code == 0 and 'translate 2)' in out and 'recorded' not in out, err
  code, _, err = call_main(evaluate.main, [f'--workdir={workdir}', '--tta_translate=9'], capsys)
  assert code == 2 and '--tta_translate' in err


def test_evaluate_another_folder_of_other_sizes_and_modes(trained, run, capsys, tmp_path):
  from conftest import make_image_folder
  # Grey 40x40 JPEGs in ROOT/<class>/ (no test/ level): decoded to the run's 32x32 RGB.
  other = make_image_folder(tmp_path / 'other', classes=tuple(CLASSES), per_class=(0, 3),
                            size=40, mode='L', ext='.jpg', seed=3)
  root = os.path.join(other, 'test')
  code, out, err = call_main(evaluate.main, [f'--workdir={trained[0]}',
                                             f'--dataset=folder:{root}'], capsys)
  assert code == 0, err
  paths = [os.path.join(root, c, f'{i:04d}.jpg') for c in CLASSES for i in range(3)]
  predicted = run.predict(run.load_images(paths)).argmax(-1)
  correct = int(np.sum(predicted == np.repeat(np.arange(3), 3)))
  assert f'accuracy {100 * correct / 9:.2f}% ({correct}/9)' in out and 'recorded' not in out
  assert os.path.exists(os.path.join(trained[0], 'confusion-test.png'))


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
  pytest.importorskip('jax2onnx')
  pytest.importorskip('onnxruntime')
  from dsconv_jax import export
  out = str(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')
  lines = []
  result = export.export(trained[0], out, int8=True, calibration_images=24, log=lines.append)
  return out, result, '\n'.join(lines)


def test_export_writes_an_onnx_model_that_onnxruntime_runs_like_jax(trained, run, exported):
  import onnx
  import onnxruntime as ort
  out, result, log = exported
  model = onnx.load(out)
  onnx.checker.check_model(model)
  # Depthwise convolutions are grouped Convs: group = channels (3 input channels, 8 features).
  groups = sorted(int(a.i) for n in model.graph.node if n.op_type == 'Conv'
                  for a in n.attribute if a.name == 'group')
  assert groups == [3, 8]
  assert 'Einsum' not in {n.op_type for n in model.graph.node}
  metadata = {p.key: p.value for p in model.metadata_props}
  assert json.loads(metadata['class_names']) == CLASSES
  assert json.loads(metadata['image_shape']) == [32, 32, 3]
  session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
  (inp,), (outp,) = session.get_inputs(), session.get_outputs()
  assert (inp.name, inp.type, outp.name) == ('images', 'tensor(uint8)', 'logits')
  images = run.dataset().test.images
  logits = session.run(None, {'images': images})[0]
  assert np.abs(logits - run.logits(images)).max() < 1e-4
  assert result['max_difference'] < 1e-4 and result['check_images'] == 18
  assert (f'onnxruntime vs JAX on 18 test images: largest logit difference '
          f'{result["max_difference"]:.3g}') in log
  # The export says which checks ran, for both models.
  assert ('checks (float32): onnx.checker full check passed; onnxruntime session (log level 0) '
          'wrote no warnings; grouped convolutions as grouped Conv: group = 3, 8') in log
  assert ('checks (int8): onnx.checker full check passed; onnxruntime session (log level 0) '
          'wrote no warnings') in log
  onnx.checker.check_model(model, full_check=True)
  # Any batch size (the batch dimension is dynamic).
  assert session.run(None, {'images': images[:1]})[0].shape == (1, 3)


def test_export_int8_reports_accuracy_and_sizes(trained, run, exported):
  import onnx
  import onnxruntime as ort
  out, result, log = exported
  int8_out = out[:-len('.onnx')] + '.int8.onnx'
  assert result['int8_out'] == int8_out
  model = onnx.load(int8_out)
  assert 'QuantizeLinear' in {n.op_type for n in model.graph.node}
  test = run.dataset().test
  for path, key in ((out, 'float_accuracy'), (int8_out, 'int8_accuracy')):
    logits = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(
        None, {'images': test.images})[0]
    accuracy = float(np.mean(logits.argmax(-1) == test.labels))
    assert result[key] == accuracy
    size = os.path.getsize(path)
    assert result['int8_bytes' if 'int8' in key else 'bytes'] == size
    assert f'| {path} | {size:,} | {100 * accuracy:.2f}% |' in log
  assert result['float_accuracy'] == pytest.approx(trained[2]['test_accuracy'], abs=1e-6)


def test_int8_calibration_uses_every_batch(exported, run):
  """Calibration over more batches than onnxruntime's intermediate-output limit would keep: every
  batch counts (with CalibMaxIntermediateOutputs, 4+ batches collected nothing at all)."""
  from dsconv_jax import export
  with open(exported[0], 'rb') as f:
    float_model = f.read()
  train = run.dataset().train.images
  images = np.resize(train, (4 * 32, *train.shape[1:]))  # Exactly 4 calibration batches of 32.
  quantized = export.quantize(float_model, images)
  assert len(quantized) > 0


@pytest.mark.parametrize('case', ['no_run', 'unreadable_image', 'other_classes',
                                  'export_under_a_file'])
def test_bad_input_is_one_error_line_and_exit_1(case, trained, tmp_path, capsys):
  from dsconv_jax import export
  workdir, folder, _ = trained
  if case == 'no_run':
    empty = tmp_path / 'empty'
    empty.mkdir()
    main, argv = predict.main, [f'--workdir={empty}', folder]
    message = 'holds no finished run'
  elif case == 'unreadable_image':
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    main, argv = predict.main, [f'--workdir={workdir}', str(tmp_path / 'broken.png')]
    message = 'cannot read image'
  elif case == 'other_classes':
    from conftest import make_image_folder
    other = make_image_folder(tmp_path / 'other', classes=('cat', 'horse'), per_class=(1, 1))
    main, argv = evaluate.main, [f'--workdir={workdir}', f'--dataset=folder:{other}']
    message = "differ from the run's (only in the dataset: horse; only in the run: dog, frog)"
  else:
    (tmp_path / 'file').write_text('a regular file')
    main, argv = export.main, [f'--workdir={workdir}', f'--out={tmp_path / "file" / "m.onnx"}']
    message = 'is a file, not a folder'
  code, out, err = call_main(main, argv, capsys)
  assert code == 1
  assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err
  assert out == ''


def test_import_is_cheap_and_names_are_lazy(cli_env):
  script = ('import sys, dsconv_jax; assert "jax" not in sys.modules; '
            'assert dsconv_jax.load_run.__module__ == "dsconv_jax.inference"; '
            'assert dsconv_jax.train_and_evaluate.__module__ == "dsconv_jax.train"; print("ok")')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=cli_env)
  assert out.returncode == 0 and out.stdout == 'ok\n', out.stderr
