#!/usr/bin/env bash
# Prepares the first GPU call (benchmarks/accelerator.sh) on this machine, where the package
# registry can be reached: the device machine (Python 3.12, JAX with CUDA, flax, optax, orbax,
# absl, numpy, pillow, protobuf, PyYAML, torch; no TensorFlow) lacks two pure-Python dependencies,
# ml-collections and tensorboardX, and the CIFAR-10 image folder.
#
#   bash benchmarks/device_prep.sh DATASET_ROOT   # e.g. ~/data/cifar10-jpeg
#
# Fills .whl/ with those two wheels (the versions installed here, so the device runs what the
# tests ran) and packs the dataset into .data/cifar10-jpeg.tgz (both ignored by git), checks that
# what a call carries fits its 64 MiB, and prints the device calls. accelerator.sh installs
# .whl/*.whl into a temporary folder on PYTHONPATH when a module it needs is missing.
#
# One archive, not the folder: a call carries a 60,000-file folder badly (56 MiB of bytes, counted
# over the 64 MiB limit), and the gzipped tar (19.8 MB: the JPEGs' identical headers compress)
# well; the call unpacks it with tar first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
src=${1:?usage: bash benchmarks/device_prep.sh DATASET_ROOT}
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

# The archive holds cifar10-jpeg/{train,test}/...; rebuilt only when the source is newer.
name=$(basename "$src")
archive=.data/$name.tgz
if [ ! -f "$archive" ] || [ -n "$(find "$src" -newer "$archive" -print -quit)" ]; then
  mkdir -p .data
  tar czf "$archive.tmp" -C "$(dirname "$src")" "$name"
  mv "$archive.tmp" "$archive"
fi

# What a call carries: the working tree git would commit, plus the carried paths.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 |
  cut -f1)
carried=$(du -cb .whl "$archive" | tail -n 1 | cut -f1)
total=$((tree + carried))
limit=$((64 * 1024 * 1024))
echo "carried: $((total / 1024 / 1024)) MiB of $((limit / 1024 / 1024)) MiB" \
  "(tree $tree bytes, .whl + $archive $carried bytes)"
[ "$total" -lt "$limit" ] || { echo "error: over the 64 MiB a device call carries" >&2; exit 1; }
ls .whl
cat <<EOF
device call (run tool), carry [".whl", "$archive"], timeout_s 600; each command unpacks first:
  mkdir -p /tmp/d && tar xzf $archive -C /tmp/d &&
  bash benchmarks/accelerator.sh --data=/tmp/d/$name --workdir=/tmp/ar --out=\$OUT ...
BENCHMARKS.md ("GPU") has the next calls, with each step's measured wall time.
EOF
