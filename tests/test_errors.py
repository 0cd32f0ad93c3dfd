"""Bad input through the real command line: exit 1 (2 for usage), one clear line, no traceback.

Also covered elsewhere: an unknown model, a missing dataset folder, a violated constraint and a
missing --workdir (test_train.py::test_cli_errors_are_one_line); a full disk while saving and a
diverging run (test_crash.py); compare's errors (test_compare.py).
"""

import os
import subprocess
import sys

import pytest

from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_cli(env, *args):
  return subprocess.run([sys.executable, '-m', 'dsconv_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(out, code, message):
  assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, out.stderr[-3000:]
  assert message in errors[0], errors[0]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]


def _write_config(path, body):
  with open(path, 'w') as f:
    f.write('from dsconv_jax import defaults\n\n\ndef get_config():\n'
            '  config = defaults.get_testing_config()\n' + body + '  return config\n')
  return str(path)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


# case: (arguments after --config=configs/tiny.py --workdir=..., exit status, message part)
CASES = {
    'unknown_config_file': (['--config=configs/nosuch.py'], 1,
                            'cannot load --config=configs/nosuch.py: [Errno 2] No such file'),
    # A config file is checked like the command line: the key, the value, the type it must have.
    'config_file_sets_a_wrong_type': (['--config={config}'], 1,
                                      "config.batch_size = 'abc' in {config}: must be an integer, "
                                      'not a string'),
    'typo_in_a_config_file': (['--config={config}'], 2,
                              "unknown config key 'num_epoch' set in {config} (did you mean "
                              "'num_epochs'?)"),
    'typo_in_a_nested_key_of_a_config_file': (
        ['--config={config}'], 2, "unknown config key 'constraints.allow_dens' set in {config} "
        "(did you mean 'constraints.allow_dense'?)"),
    # A value that cannot be parsed is reported by the flag parser, before anything runs, like an
    # unknown flag: a command-line usage error, exit status 2.
    'value_of_the_wrong_type': (['--config.batch_size=abc'], 2,
                                'flag --config.batch_size=abc: invalid literal for int()'),
    # A typo in a key: a usage error naming the key and the nearest one.
    'typo_in_a_config_key': (['--config.batchsize=64'], 2,
                             "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    'typo_in_a_nested_config_key': (
        ['--config.constraints.max_param=5'], 2,
        "unknown config key 'constraints.max_param' (did you mean 'constraints.max_params'?)"),
    'unknown_config_key': (['--config.zzz=1'], 2, "unknown config key 'zzz'"),
    'dataset_folder_is_a_file': (['--config.dataset=folder:{file}'], 1,
                                 "dataset folder '{file}' is a file, not a folder"),
    'zero_batch_size': (['--config.batch_size=0'], 1, 'config.batch_size must be a positive'),
    'zero_epochs': (['--config.num_epochs=0'], 1, 'config.num_epochs must be a positive'),
    'negative_learning_rate': (['--config.learning_rate=-0.1'], 1,
                               'config.learning_rate must be > 0'),
    # Checked before the dataset is read: the folder here is empty, yet the schedule is named.
    'unknown_schedule_before_reading_data': (
        ['--config.lr_schedule=cosin', '--config.dataset=folder:{empty}'], 1,
        "config.lr_schedule must be one of inverse_time, constant, cosine, onecycle, cosine_onecycle, got 'cosin'"),
    'batch_does_not_fit_the_devices': (['--config.batch_size=7'], 1,
                                       'config.batch_size=7 does not divide over the 2 devices'),
    'unknown_tfds_dataset': (['--config.dataset=nosuchdataset'], 1,
                             "unknown tfds dataset 'nosuchdataset'"),
    'empty_dataset_folder': (['--config.dataset=folder:{empty}'], 1, 'has no train/ folder'),
    'half_copied_dataset': (['--config.dataset=folder:{half}'], 1,
                            "holds no images (.jpg, .jpeg, .png"),
    'half_copied_image': (['--config.dataset=folder:{truncated}'], 1,
                          "cannot read image '{truncated}/train/dog/0001.png'"),
    'corrupt_image': (['--config.dataset=folder:{corrupt}'], 1,
                      "cannot read image '{corrupt}/test/cat/0000.png'"),
    'class_folders_differ': (['--config.dataset=folder:{classes}'], 1,
                             "class folders of train/ and test/ in '{classes}' differ (only in "
                             "train: ['frog']; only in test: ['toad'])"),
    'workdir_under_a_file': (['--workdir={file}/run'], 1, "workdir '{file}/run' is not writable"),
}


CONFIG_FILES = {
    'config_file_sets_a_wrong_type': "  config.batch_size = 'abc'\n",
    'typo_in_a_config_file': '  config.num_epoch = 1\n',
    'typo_in_a_nested_key_of_a_config_file': '  config.constraints.allow_dens = True\n',
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_one_clear_line(tmp_path, image_folder, cli_env, case):
  args, code, message = CASES[case]
  env = dict(cli_env)
  names = {'config': str(tmp_path / 'bad_config.py'), 'file': str(tmp_path / 'a_file'),
           'empty': str(tmp_path / 'empty'), 'half': str(tmp_path / 'half'),
           'truncated': str(tmp_path / 'truncated'), 'corrupt': str(tmp_path / 'corrupt'),
           'classes': str(tmp_path / 'classes')}
  if case in CONFIG_FILES:
    _write_config(names['config'], CONFIG_FILES[case])
  elif case == 'batch_does_not_fit_the_devices':
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        ' --xla_force_host_platform_device_count=2').strip()
  elif case == 'unknown_tfds_dataset':
    pytest.importorskip('tensorflow_datasets')
  elif case == 'empty_dataset_folder':
    os.makedirs(names['empty'])
  elif case == 'half_copied_dataset':
    make_image_folder(names['half'], per_class=(2, 1))
    for image in os.listdir(os.path.join(names['half'], 'test', 'frog')):
      os.unlink(os.path.join(names['half'], 'test', 'frog', image))  # the copy stopped here
  elif case == 'half_copied_image':
    make_image_folder(names['truncated'], per_class=(2, 1))
    _truncate(os.path.join(names['truncated'], 'train', 'dog', '0001.png'))
  elif case == 'corrupt_image':
    make_image_folder(names['corrupt'], per_class=(2, 1))
    with open(os.path.join(names['corrupt'], 'test', 'cat', '0000.png'), 'wb') as f:
      f.write(b'not an image at all')
  elif case == 'class_folders_differ':
    make_image_folder(names['classes'], per_class=(2, 1))
    os.rename(os.path.join(names['classes'], 'test', 'frog'),
              os.path.join(names['classes'], 'test', 'toad'))
  elif case in ('workdir_under_a_file', 'dataset_folder_is_a_file'):
    with open(names['file'], 'w') as f:
      f.write('a regular file, not a folder')
  args = [a.format(**names) for a in args]
  full = ['--config=configs/tiny.py', f'--workdir={tmp_path}/run',
          f'--config.dataset=folder:{image_folder}']
  for a in args:  # an argument given by the case replaces the default one with the same flag
    flag = a.split('=')[0]
    full = ([a if f.split('=')[0] == flag else f for f in full]
            if any(f.split('=')[0] == flag for f in full) else full + [a])
  out = main_cli(env, *full)
  assert_one_line_error(out, code, message.format(**names))


def test_resuming_a_workdir_of_another_run_is_refused(tmp_path, image_folder, cli_env):
  workdir = str(tmp_path / 'run')
  first = main_cli(cli_env, '--config=configs/tiny.py', f'--workdir={workdir}',
                   f'--config.dataset=folder:{image_folder}', '--config.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = f.read()
  other = make_image_folder(tmp_path / 'other', per_class=(4, 2))
  for flag, diff in ((f'--config.dataset=folder:{other}', "dataset: 'folder:"),
                     ('--config.seed=1', 'seed: 0 there, 1 now')):
    out = main_cli(cli_env, '--config=configs/tiny.py', f'--workdir={workdir}',
                   f'--config.dataset=folder:{image_folder}', '--config.num_epochs=2', flag)
    assert_one_line_error(out, 1, f"workdir '{workdir}' holds a run of a different configuration")
    assert diff in out.stderr and 'use a new --workdir' in out.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert f.read() == metrics  # Refused before anything was touched.


def _file_check(tmp_path, body):
  """(exit status or None, stderr) of the command line's check of a config file setting `body`."""
  from dsconv_jax import cli
  path = _write_config(tmp_path / 'config.py', body)
  try:
    cli._check_config_file(['prog', f'--config={path}'])  # pylint: disable=protected-access
  except SystemExit as e:
    return e.code
  return None


def test_a_config_file_may_set_any_model_kwargs_and_known_keys_of_their_types(tmp_path, capsys):
  assert _file_check(tmp_path, "  config.model_kwargs.anything = 'the model checks it'\n"
                               '  config.bn_momentum = 0.9\n  config.learning_rate = 1\n'
                               "  config.layers = ['Dense(10)']\n") is None
  assert _file_check(tmp_path, '  config.bn_epsilon = None\n') is None  # None: the model's own.
  assert _file_check(tmp_path, "  config.tta_flip = 'yes'\n") == 1
  assert "config.tta_flip = 'yes' in " in capsys.readouterr().err
  assert _file_check(tmp_path, "  config.bn_momentum = 'high'\n") == 1
  assert 'must be a number or None, not a string' in capsys.readouterr().err
  assert _file_check(tmp_path, '  config.model_kwargs = 3\n') == 1
  assert "must be a group of keys, the model's arguments" in capsys.readouterr().err
