#!/usr/bin/env bash
# Sets up .venv from uv.lock when needed, then trains the default model or runs the tests.
#   ./run.sh [--config.KEY=VALUE ...]   train configs/model3.py on CIFAR-10 into runs/model3
#                                       (installs the package and the tfds extra)
#   ./run.sh test [PYTEST ARGS ...]     run the test suite (adds the test and export extras)
#   ./run.sh lock [UV LOCK ARGS ...]    refresh uv.lock after a change to pyproject.toml
#                                       (`./run.sh lock --check` fails while it is stale)
#   ./run.sh newest [PYTEST ARGS ...]   run the suite on the newest releases pyproject.toml allows,
#                                       without the lock and without the export extra, in
#                                       .venv-newest on the newest Python found
#   ./run.sh docs [SPHINX ARGS ...]     build the documentation into docs/_build/html
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
# uv resolves and installs (uv.lock: every extra, every platform, one file); pinned so that the
# lock is read and written the same way everywhere.
UV_VERSION=0.13.9
export UV_PYTHON_DOWNLOADS=never  # The Python of the venv, never one fetched on the side.

check_python() {
  if ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: dsconv_jax needs Python 3.11 or newer; $1 is $("$1" --version 2>&1 | head -n 1)." \
         "Run PYTHON=python3.11 ./run.sh ..." >&2
    exit 1
  fi
}

# A venv holding uv itself (pip only installs uv; uv installs everything else).
ensure_uv() {
  local venv=$1 python=$2
  if [ ! -x "$venv/bin/python" ]; then
    check_python "$python"
    echo "creating $venv with $("$python" --version 2>&1)" >&2
    "$python" -m venv "$venv"
  fi
  if [ "$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  fi
}

gpu_extra() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    local cuda_major
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -n 1)
    if [ "${cuda_major:-0}" -ge 13 ]; then echo cuda; else echo cuda12; fi
  fi
}

# Installs the locked versions of the package and `extras` (plus those installed before: extras
# are only added, so that `./run.sh` after `./run.sh test` reinstalls nothing).
setup() {
  local want=("$@") gpu
  gpu=$(gpu_extra)
  [ -n "$gpu" ] && want+=("$gpu")
  local stamp="$VENV/.dsconv_jax-installed" inputs had=()
  inputs="$(cat pyproject.toml uv.lock | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$inputs" ]; then
    read -r -a had <<< "$(sed -n 2p "$stamp")"
  fi
  local all missing=0 e
  all=$(printf '%s\n' ${had[@]+"${had[@]}"} "${want[@]}" | sort -u | tr '\n' ' ')
  for e in "${want[@]}"; do
    case " ${had[*]-} " in *" $e "*) ;; *) missing=1 ;; esac
  done
  if [ -x "$VENV/bin/python" ] && [ "$missing" = 0 ]; then
    return
  fi
  ensure_uv "$VENV" "$PYTHON"
  local args=() names
  for e in $all; do args+=(--extra "$e"); done
  names=$(echo $all | tr ' ' ',')
  echo "installing dsconv_jax[$names] from uv.lock into $VENV" >&2
  # --locked: uv.lock must match pyproject.toml (`./run.sh lock` refreshes it); --inexact: keep
  # what is installed beyond these extras (uv itself, extras of earlier calls).
  "$VENV/bin/uv" sync --quiet --locked --inexact "${args[@]}"
  printf '%s\n%s\n' "$inputs" "$all" > "$stamp"
}

# The newest Python 3.11+ on this machine (on PATH, or installed by pyenv): the newest releases of
# JAX and Flax need the newest Pythons.
newest_python() {
  local candidates=() p best='' best_version=0
  for p in python3.14 python3.13 python3.12 python3.11 "$PYTHON"; do
    command -v "$p" >/dev/null 2>&1 && candidates+=("$(command -v "$p")")
  done
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.*/bin/python3; do [ -x "$p" ] && candidates+=("$p"); done
  fi
  for p in "${candidates[@]}"; do
    local v
    v=$("$p" -c 'import sys; print(sys.version_info[0] * 100 + sys.version_info[1])' 2>/dev/null) \
      || continue
    if [ "$v" -ge 311 ] && [ "$v" -gt "$best_version" ]; then best=$p; best_version=$v; fi
  done
  echo "${best:-$PYTHON}"
}

run_tests() {
  local python=$1
  shift
  # Test files spread over up to 4 pytest-xdist workers (one per core), each file on one worker so
  # that its module fixtures are built once; `-n 0` (or any -n/--numprocesses) overrides.
  # Measured on the 2-core CPU machine: 760 s with two workers (and tests/conftest.py's compilation
  # cache per process) against 1,261 s in one process.
  local workers=()
  case " $* " in
    *" -n"*|*" --numprocesses"*) ;;
    *) local cores
       cores=$(nproc 2>/dev/null || echo 1)
       workers=(-n "$(( cores < 4 ? cores : 4 ))" --dist loadfile) ;;
  esac
  exec "$python" -m pytest ${workers[@]+"${workers[@]}"} "$@"
}

case "${1:-}" in
  test)
    shift
    setup tfds test export
    run_tests "$VENV/bin/python" "$@" ;;
  lock)
    shift
    ensure_uv "$VENV" "$PYTHON"
    exec "$VENV/bin/uv" lock "$@" ;;
  newest)
    shift
    newest=.venv-newest
    ensure_uv "$newest" "$(newest_python)"
    echo "installing the newest releases of dsconv_jax[tfds,test] into $newest" >&2
    # --resolution highest ignores uv.lock; the export extra stays out (jax2onnx pins Orbax), so
    # its tests skip.
    "$newest/bin/uv" pip install --quiet --python "$newest/bin/python" --resolution highest \
      --upgrade --reinstall-package dsconv_jax -e ".[tfds,test]"
    "$newest/bin/python" - <<'EOF' >&2
import importlib.metadata as m
print('newest:', ', '.join(f'{p} {m.version(p)}' for p in (
    'jax', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-datasets')))
EOF
    run_tests "$newest/bin/python" "$@" ;;
  docs)
    shift
    setup docs
    exec "$VENV/bin/python" -m sphinx -W --keep-going -b html docs docs/_build/html "$@" ;;
  *)
    setup tfds
    exec "$VENV/bin/python" -m dsconv_jax.main --config=configs/model3.py --workdir=runs/model3 \
      "$@" ;;
esac
