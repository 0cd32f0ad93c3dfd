#!/usr/bin/env bash
# Prepares the first GPU call (benchmarks/accelerator.sh) on this machine, where the package
# registry can be reached: the device machine (Python 3.12, JAX with CUDA, flax, optax, orbax,
# absl, numpy, pillow, protobuf, PyYAML, torch; no TensorFlow) lacks two pure-Python dependencies,
# ml-collections and tensorboardX, and the CIFAR-10 image folder.
#
#   bash benchmarks/device_prep.sh [DATASET_ROOT]   # default ../shared/datasets/cifar10-jpeg
#
# Fills .whl/ with those two wheels (the versions installed here, so the device runs what the
# tests ran) and .data/cifar10-jpeg/ with the dataset (both ignored by git), checks that what a
# call carries fits its 64 MiB, and prints the device call. accelerator.sh installs .whl/*.whl
# into a temporary folder on PYTHONPATH when a module it needs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
src=${1:-../shared/datasets/cifar10-jpeg}
[ -d "$src/train" ] && [ -d "$src/test" ] || {
  echo "error: $src is not an image-folder dataset (no train/ and test/ in it)" >&2; exit 1; }

version() {  # The installed version of a distribution, or the newest when it is not installed.
  "$PYTHON" -c "import importlib.metadata as m, sys
try: print('==' + m.version(sys.argv[1]))
except m.PackageNotFoundError: print('')" "$1"
}
rm -rf .whl.tmp && mkdir -p .whl.tmp
for dist in ml-collections tensorboardX; do
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl.tmp \
    "$dist$(version "$dist")"
done
rm -rf .whl && mv .whl.tmp .whl

if [ ! -d .data/cifar10-jpeg ] || ! diff -rq "$src" .data/cifar10-jpeg >/dev/null 2>&1; then
  rm -rf .data/cifar10-jpeg.tmp && mkdir -p .data
  cp -r "$src" .data/cifar10-jpeg.tmp
  rm -rf .data/cifar10-jpeg && mv .data/cifar10-jpeg.tmp .data/cifar10-jpeg
fi

# What a call carries: the working tree git would commit, plus the carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 |
  cut -f1)
carried=$(du -sb .whl .data/cifar10-jpeg | awk '{s += $1} END {print s}')
total=$((tree + carried))
limit=$((64 * 1024 * 1024))
echo "carried: $((total / 1024 / 1024)) MiB of $((limit / 1024 / 1024)) MiB" \
  "(tree $tree bytes, .whl + .data $carried bytes)"
[ "$total" -lt "$limit" ] || { echo "error: over the 64 MiB a device call carries" >&2; exit 1; }
ls .whl
cat <<'EOF'
device call (run tool), carry [".whl", ".data/cifar10-jpeg"], timeout_s 600:
  bash benchmarks/accelerator.sh --data=.data/cifar10-jpeg --out=$OUT --only=throughput,model3 \
    --step_timeout=280
then --only=bench --seeds=0,1,2 --step_timeout=500 (BENCHMARKS.md, "GPU").
EOF
