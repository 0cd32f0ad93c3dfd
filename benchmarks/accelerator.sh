#!/usr/bin/env bash
# Every accelerator measurement in one call: see benchmarks/accelerator.py.
#   bash benchmarks/accelerator.sh --data=.data/cifar10-jpeg [--out=$OUT]
#   bash benchmarks/accelerator.sh --smoke --out=/tmp/acc
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" benchmarks/accelerator.py "$@"
