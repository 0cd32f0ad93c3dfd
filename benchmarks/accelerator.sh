#!/usr/bin/env bash
# Every accelerator measurement in one call: see benchmarks/accelerator.py.
#   bash benchmarks/accelerator.sh --data=.data/cifar10-jpeg [--out=$OUT]
#   bash benchmarks/accelerator.sh --smoke --out=/tmp/acc
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# On the device machine, which lacks ml-collections and tensorboardX: the wheels that
# benchmarks/device_prep.sh put in .whl/ (carried with the call), installed outside the image.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/accelerator.py "$@"
