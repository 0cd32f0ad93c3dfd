"""benchmarks/accelerator.sh --smoke: the first GPU session's one command works on the CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_script_smoke_run_writes_every_result(tmp_path, cli_env):
  out = tmp_path / 'out'
  done = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'accelerator.sh'), '--smoke',
                         f'--out={out}', f'--workdir={tmp_path / "runs"}'],
                        cwd=ROOT, env={**cli_env, 'PYTHON': sys.executable},
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads((out / 'accelerator.json').read_text())
  assert [s['name'] for s in result['steps']] == ['throughput', 'model3', 'bench_dsresnet']
  assert all(s['exit_status'] == 0 and s['wall_seconds'] > 0 for s in result['steps'])
  headline = result['headline']
  assert set(headline['throughput']) == {'auto/bfloat16'}
  assert headline['model3']['epochs'] == 1 and headline['model3']['source_seconds'] == 1967
  assert headline['dsresnet']['n'] == 1
  # What comes back from the device: at most 8 plain files, no folders.
  names = sorted(os.listdir(out))
  assert names == ['accelerator.json', 'bench.json', 'log.txt', 'model3-metrics.jsonl',
                   'model3-summary.json', 'throughput.json']
