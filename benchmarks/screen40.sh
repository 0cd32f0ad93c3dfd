#!/usr/bin/env bash
# The screen on the holdout: the reference network, then every line of a candidates file
# (default benchmarks/candidates40.txt), then one table of every run.
#
#   [EPOCHS=10] [NAMES="base k5"] bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]
#
# DATA_ROOT is an image-folder copy of CIFAR-10 (ROOT/{train,test}/<class>/); each run trains into
# OUT/<name> (python -m dsconv_jax.main, so a run cut off resumes from its newest checkpoint when
# the script is started again, and a finished one is skipped). A candidates line is a name and
# --config.KEY=VALUE overrides of configs/dsresnet.py (benchmarks/candidates40.txt's lines each
# name their depthwise kernel size, 3 for the screen's base, so a line trains what it trained
# whatever the config's default); $OUT in a line is this OUT (the
# distillation line's teacher is the reference network's run of the same length; distillk5's is
# the 5x5 network's 50-epoch run in results/, a path from this repository's root). NAMES runs
# only those lines (the reference network's run is 'tiniest'). PYTHON picks the interpreter
# (default python).
# The table, OUT/table.md (benchmarks/recipe_table.py, baseline OUT/base), lists every finished run
# with the split it validated on and its final holdout and test figures.
#
# EPOCHS (default 10) is every run's length: 10 screens on the CPU, 50 measures the candidates
# under the budget's rules (on a GPU: BENCHMARKS.md, "GPU"). Schedules a line gives in epochs
# scale with it through $WARMUP, 1% of the run (a line's warm-up, as the reference network's).
# The reference network runs its own recipe (configs/tiniest.py) scaled to EPOCHS: warm-up over
# $WARMUP epochs, the mixup ramp over half the run (a fraction already), and, below 30 epochs, its
# EMA with the warm-up cap, since a plain 0.999 average over 10 epochs' 1,750 steps would still
# hold 17% of the initial weights (0.999^1750) when evaluated (over 30 epochs' 5,250, 0.5%).
set -euo pipefail

DATA=${1:?usage: bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]}
OUT=${2:?usage: bash benchmarks/screen40.sh DATA_ROOT OUT [CANDIDATES]}
LIST=${3:-benchmarks/candidates40.txt}
PYTHON=${PYTHON:-python}
NAMES=${NAMES:-}
EPOCHS=${EPOCHS:-10}
if ! [[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: EPOCHS must be a positive integer, got '$EPOCHS'" >&2
  exit 2
fi
WARMUP=$(awk -v e="$EPOCHS" 'BEGIN { print e / 100 }')
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
  # The config file comes first: its overrides may only follow it.
  "$PYTHON" -m dsconv_jax.main "$@" --config.dataset="folder:$DATA" --workdir="$OUT/$name" --quiet
}

if wanted tiniest; then
  short_ema=()
  [ "$EPOCHS" -lt 30 ] && short_ema=(--config.ema_warmup=True)
  run tiniest --config=configs/tiniest.py --config.num_epochs="$EPOCHS" \
      --config.warmup_epochs="$WARMUP" "${short_ema[@]}"
fi
names=()
while read -r name overrides; do
  [ -z "$name" ] && continue
  names+=("$name")
  wanted "$name" || continue
  eval "run $name --config=configs/dsresnet.py --config.num_epochs=$EPOCHS $overrides"
done < "$LIST"

finished=()
for name in "${names[@]:1}" tiniest; do
  [ -f "$OUT/$name/summary.json" ] && finished+=("$OUT/$name")
done
if [ -f "$OUT/${names[0]}/summary.json" ]; then
  "$PYTHON" benchmarks/recipe_table.py "$OUT/${names[0]}" "${finished[@]}" > "$OUT/table.md"
  echo "== table: $OUT/table.md"
fi
