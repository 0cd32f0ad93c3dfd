#!/usr/bin/env bash
# Side by side: the smoke run's bench step (1 epoch of DS-ResNet on 72 generated images, 6 held
# out, 24 test) before and after the evaluation batch follows the split size. No persistent cache.
set -u
PY=${PYTHON:-python}
for rep in 1 2; do
  for tree in old new; do
    dir=${NEW:-.}; [ $tree = old ] && dir=$OLD
    rm -rf /tmp/accruns/bench-$tree
    start=$(date +%s.%N)
    (cd $dir && JAX_PLATFORMS=cpu $PY -m dsconv_jax.bench --config=configs/dsresnet.py --seeds=0 \
      --workdir=/tmp/accruns/bench-$tree --config.dataset=folder:/tmp/accruns/images \
      --config.cache_dir=/tmp/accruns/cache --config.num_epochs=1 --config.batch_size=16 \
      --config.holdout=6 --config.augment=crop --config.label_smoothing=0.2 >/dev/null 2>&1)
    rc=$?
    end=$(date +%s.%N)
    acc=$(python3 -c "import json;s=json.load(open('/tmp/accruns/bench-$tree/seed_0/summary.json'));print(s['final_val_accuracy'],s['test_accuracy'],s.get('test_accuracy_tta_flip'),s.get('test_accuracy_tta_multicrop'))")
    echo "{\"tree\": \"$tree\", \"rep\": $rep, \"rc\": $rc, \"wall_seconds\": $(python3 -c "print(round($end-$start,1))"), \"figures\": \"$acc\"}"
  done
done
