"""dsconv_jax.throughput: the JSON contract, side-by-side variants, the peers and their errors.

Only the shape of the results is tested, never a speed: timings on a shared CPU are not a test.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from dsconv_jax import throughput
from dsconv_jax.defaults import get_testing_config
from dsconv_jax.errors import UsageError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A Keras-style model written in the config, as one shell-quoted --also argument.
SEQUENTIAL = ('--config.model=sequential --config.layers=\''
              '("SeparableConv2D(12, 3, use_bias=False)", "BatchNormalization()", '
              '"SeparableConv2D(\\"num_classes\\", 3, use_bias=False)", '
              '"GlobalAveragePooling2D()")\'')


def test_cli_prints_one_json_object_with_every_variant():
  out = subprocess.run(
      [sys.executable, '-m', 'dsconv_jax.throughput', '--config=configs/tiny.py', '--json',
       '--steps=2', '--chunks=1', '--depthwise_impl=shifted', f'--also={SEQUENTIAL}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  result = json.loads(out.stdout)
  for key in ('device', 'batch_size', 'train_images_per_second', 'compile_seconds',
              'epoch_seconds_50k', 'variants', 'versions', 'params'):
    assert key in result, key
  assert result['batch_size'] == 8 and result['device'].startswith('cpu')
  # The config as given, then the --also configuration (its model built, not only named).
  tiny, other = result['variants']
  assert tiny['overrides'] == '' and shlex.split(other['overrides']) == shlex.split(SEQUENTIAL)
  assert [v['depthwise_impl'] for v in result['variants']] == ['shifted', 'shifted']
  assert result['depthwise_impl'] == 'shifted' and result['params'] == tiny['params']
  assert (tiny['params'], other['params']) == (235, 339) and tiny['macs'] < other['macs']
  for v in result['variants']:
    assert v['train_images_per_second'] > 0 and len(v['chunk_seconds']) == 1
    assert v['epoch_seconds_50k'] == pytest.approx(50_000 / v['train_images_per_second'])
  assert 'ratio' not in result and 'peer_images_per_second' not in result


def test_variants_are_every_combination_and_bad_values_are_usage_errors():
  config = get_testing_config()
  variants = throughput.variants_of(config, 'grouped,shifted', 'float32,bfloat16', '')
  assert len(variants) == 4 and {v['dropout_impl'] for v in variants} == {config.dropout_impl}
  assert variants[0] == {'depthwise_impl': 'grouped', 'compute_dtype': 'float32',
                         'dropout_impl': config.dropout_impl}
  with pytest.raises(UsageError, match='compute_dtype'):
    throughput.variants_of(config, '', 'float16', '')


def test_the_plan_is_every_configuration_with_every_variant_headline_first():
  config = get_testing_config()
  runners = throughput.plan(config, ['--config.batch_size=4'], 'shifted,grouped', 'float32', '')
  assert [(o, c.batch_size, v['depthwise_impl']) for o, c, v in runners] == [
      ('', 8, 'shifted'), ('', 8, 'grouped'),
      ('--config.batch_size=4', 4, 'shifted'), ('--config.batch_size=4', 4, 'grouped')]
  assert all(c.depthwise_impl == v['depthwise_impl'] for _, c, v in runners)  # Applied.
  # A variant key left unlisted takes each configuration's own value, an --also's included.
  runners = throughput.plan(config, ['--config.compute_dtype=bfloat16'], 'shifted', '', '')
  assert [v['compute_dtype'] for _, _, v in runners] == [config.compute_dtype, 'bfloat16']


def test_the_table_heads_each_configurations_rows_only_when_there_are_several():
  def row(overrides, params, impl):
    return {'overrides': overrides, 'params': params, 'macs': 2.5e6, 'depthwise_impl': impl,
            'compute_dtype': 'float32', 'dropout_impl': 'hash', 'train_images_per_second': 100.0,
            'epoch_seconds_50k': 500.0, 'compile_seconds': 1.0}
  result = {'model': 'tiny', 'device': 'cpu: cpu', 'batch_size': 8, 'steps_per_chunk': 2,
            'chunks': 1, 'variants': [row('', 235, 'shifted'), row('', 235, 'grouped'),
                                      row('--config.fit_params=300', 290, 'shifted')]}
  lines = throughput.format_result(result).splitlines()
  assert [l for l in lines if l.endswith('MACs):')] == [
      '--config as given (235 params, 2.5M MACs):',
      '--config.fit_params=300 (290 params, 2.5M MACs):']
  assert lines.index('--config.fit_params=300 (290 params, 2.5M MACs):') == len(lines) - 2
  result['variants'] = result['variants'][:2]
  assert 'MACs' not in throughput.format_result(result)  # One configuration: no headings.


def test_also_configurations_take_mains_overrides_and_refuse_what_main_refuses():
  from configs import dsresnet
  config = dsresnet.get_config()
  text = ("--config.model_kwargs.widths='(40,80,160)' --config.model_kwargs.blocks='(1,1,1)' "
          '--config.fit_params=0')
  (base_label, base), (label, other) = throughput.configs_of(config, [text])
  assert base is config and base_label == ''
  assert tuple(other.model_kwargs.widths) == (40, 80, 160)
  assert tuple(other.model_kwargs.blocks) == (1, 1, 1) and other.fit_params == 0
  assert tuple(config.model_kwargs.blocks) == (1, 2, 1) and config.fit_params == 99999  # Untouched.
  assert shlex.split(label) == shlex.split(text)  # Pastes back into a shell as it was.
  for bad, message in [('--config.model_kwargs.depth=3', "the config has no key 'depth'$"),
                       ('--config.num_epochs=many', 'invalid literal for int'),
                       ('--config.fit_params', 'KEY=VALUE overrides only'),
                       ('num_epochs=3', "not 'num_epochs=3'"),
                       ('', 'KEY=VALUE overrides only'),
                       ("--config.model_kwargs.widths='(1", 'No closing quotation')]:
    with pytest.raises(UsageError, match=message):
      throughput.configs_of(config, [bad])


@pytest.mark.parametrize('peer,module,message', [('pytorch', 'torch', 'needs PyTorch'),
                                                 ('keras', 'tensorflow', 'needs TensorFlow')])
def test_missing_peer_framework_is_a_one_line_user_error(monkeypatch, peer, module, message):
  monkeypatch.setitem(sys.modules, module, None)  # `import torch` now raises ImportError.
  with pytest.raises(UserError, match=message) as e:
    throughput.load_peer(peer)
  assert '\n' not in str(e.value)


def test_missing_peer_exits_1_with_the_message(tmp_path):
  # A stand-in `torch` that fails to import, first on the path of a fresh interpreter.
  (tmp_path / 'torch.py').write_text('raise ImportError("no torch here")\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
  out = subprocess.run(
      [sys.executable, '-m', 'dsconv_jax.throughput', '--config=configs/tiny.py',
       '--peer=pytorch', '--steps=1', '--chunks=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith('error: --peer=pytorch needs PyTorch')
  assert 'Traceback' not in out.stderr


def test_pytorch_peer_is_measured_in_the_same_run():
  pytest.importorskip('torch')
  config = get_testing_config()
  result = throughput.measure(config, peer='pytorch', steps_per_chunk=1, chunks=1,
                              peer_compile=False)
  assert [r['name'] for r in result['peer_variants']] == ['eager NCHW', 'eager channels_last']
  assert result['peer_variant'] in ('eager NCHW', 'eager channels_last')
  assert result['ratio'] == pytest.approx(
      result['train_images_per_second'] / result['peer_images_per_second'])
  assert 'torch' in result['peer_versions']
  json.dumps(result)  # JSON-ready.
