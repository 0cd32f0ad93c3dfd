#!/usr/bin/env bash
# The 10-epoch screen on the holdout: the reference network, then every line of a candidates file
# (default benchmarks/candidates40.txt), then one table of every run.
#
#   bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]
#
# DATA_ROOT is an image-folder copy of CIFAR-10 (ROOT/{train,test}/<class>/); each run trains into
# OUT/<name> (python -m dsconv_jax.main, so a run cut off resumes from its newest checkpoint when
# the script is started again, and a finished one is skipped). A candidates line is a name and
# --config.KEY=VALUE overrides of configs/dsresnet.py; $OUT in a line is this OUT (the
# distillation line's teacher is the reference network's run). NAMES="base k5" runs only those
# lines (the reference network's run is 'tiniest'). PYTHON picks the interpreter (default python).
# The table, OUT/table.md (benchmarks/recipe_table.py, baseline OUT/base), lists every finished run
# with the split it validated on and its final holdout and test figures.
#
# The reference network runs its own recipe (configs/tiniest.py) scaled to 10 epochs: warm-up over
# 1% of the run (0.1 epoch), the mixup ramp over half the run (a fraction already), and its EMA
# with the warm-up cap, since a plain 0.999 average over 10 epochs' 1,750 steps would still hold
# 17% of the initial weights (0.999^1750) when evaluated.
set -euo pipefail

DATA=${1:?usage: bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]}
OUT=${2:?usage: bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]}
LIST=${3:-benchmarks/candidates40.txt}
PYTHON=${PYTHON:-python}
NAMES=${NAMES:-}
mkdir -p "$OUT"

wanted() { [ -z "$NAMES" ] || [[ " $NAMES " == *" $1 "* ]]; }

run() {  # NAME ARGS...: one training run into $OUT/NAME, unless it has finished.
  local name=$1
  shift
  if [ -f "$OUT/$name/summary.json" ]; then
    echo "== $name: finished"
    return 0
  fi
  echo "== $name: $*"
  "$PYTHON" -m dsconv_jax.main --workdir="$OUT/$name" --config.dataset="folder:$DATA" --quiet "$@"
}

if wanted tiniest; then
  run tiniest --config=configs/tiniest.py --config.num_epochs=10 --config.warmup_epochs=0.1 \
      --config.ema_warmup=True
fi
names=()
while read -r name overrides; do
  [ -z "$name" ] && continue
  names+=("$name")
  wanted "$name" || continue
  eval "run $name --config=configs/dsresnet.py $overrides"
done < "$LIST"

finished=()
for name in "${names[@]:1}" tiniest; do
  [ -f "$OUT/$name/summary.json" ] && finished+=("$OUT/$name")
done
if [ -f "$OUT/${names[0]}/summary.json" ]; then
  "$PYTHON" benchmarks/recipe_table.py "$OUT/${names[0]}" "${finished[@]}" > "$OUT/table.md"
  echo "== table: $OUT/table.md"
fi
