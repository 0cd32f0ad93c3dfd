#!/usr/bin/env bash
# Sets up .venv when needed, then trains the default model or runs the tests.
#   ./run.sh [--config.KEY=VALUE ...]   train configs/model3.py on CIFAR-10 into runs/model3
#   ./run.sh test [PYTEST ARGS ...]     run the test suite
#   ./run.sh docs                       build the documentation into docs/_build/html
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

setup() {
  local extras="test,tfds,export"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    local cuda_major
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -n 1)
    if [ "${cuda_major:-0}" -ge 13 ]; then extras="$extras,cuda"; else extras="$extras,cuda12"; fi
  fi
  # Reinstall only when pyproject.toml or the extras changed since the last setup.
  local stamp="$VENV/.dsconv_jax-installed"
  local want
  want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PYTHON --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "installing dsconv_jax[$extras] into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
}

setup
if [ "${1:-}" = "docs" ]; then  # The test extra includes the docs extra's tooling.
  exec "$VENV/bin/python" -m sphinx -W --keep-going -b html docs docs/_build/html
fi
if [ "${1:-}" = "test" ]; then
  shift
  # Test files spread over up to 4 pytest-xdist workers (one per core), each file on one worker so
  # that its module fixtures are built once; `-n 0` (or any -n/--numprocesses) overrides.
  # Measured on the 2-core CPU machine: 760 s with two workers (and tests/conftest.py's compilation
  # cache per process) against 1,261 s in one process.
  workers=()
  case " $* " in
    *" -n"*|*" --numprocesses"*) ;;
    *) cores=$(nproc 2>/dev/null || echo 1)
       workers=(-n "$(( cores < 4 ? cores : 4 ))" --dist loadfile) ;;
  esac
  exec "$VENV/bin/python" -m pytest ${workers[@]+"${workers[@]}"} "$@"
fi
exec "$VENV/bin/python" -m dsconv_jax.main --config=configs/model3.py --workdir=runs/model3 "$@"
