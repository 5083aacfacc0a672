#!/bin/bash
# Every example, a few steps each, on one torch device: does each run there end to end?
#
#   DEVICE=cuda bash benchmarks/examples_on_device.sh    # default DEVICE=cuda
#
# Data from $BILEVEL_DATA (default ../shared/data); logs and results under $WORK (default
# /tmp/bilevel-examples-$DEVICE). Prints one line per run and a count of those that failed.
DEVICE=${DEVICE:-cuda}
W=${WORK:-/tmp/bilevel-examples-$DEVICE}
export BILEVEL_DATA=${BILEVEL_DATA:-../shared/data}  # (run from the repository's root)
rm -rf "$W" && mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
D="--device $DEVICE --no-progress"
ok=0
bad=0
try() {  # name, command...
    local name=$1
    shift
    SECONDS=0
    if timeout 300 "$@" --out "$W/$name" >"$W/$name.log" 2>&1; then
        ok=$((ok + 1))
        r=ok
    else
        r="FAILED (exit $?)"
        bad=$((bad + 1))
    fi
    echo "$name: $r in $SECONDS s: $(tail -1 "$W/$name.log" | cut -c1-200)"
}
HC="--ul-steps 3 --ll-steps 10 --n-val 200 --final-steps 10"
for m in reverse truncated implicit-cg implicit-neumann forward; do
    n=500
    [ $m = forward ] && n=40  # Forward: one JVP per example weight
    try hc-$m python3 examples/hyper_cleaning.py --method $m $HC --n-train $n $D
done
try hc-mlp python3 examples/hyper_cleaning.py --model mlp --method reverse $HC --n-train 500 $D
FP="--ul-steps 3 --ll-steps 10 --n-train 300 --n-val 200 --final-steps 10"
for m in implicit-cg reverse forward; do
    try fp-$m python3 examples/feature_penalty.py --method $m $FP $D
done
for m in implicit reverse; do
    try eq-$m python3 examples/equilibrium_mnist.py --method $m --ul-steps 3 --batch 50 $D
done
OM="--meta-steps 3 --meta-batch 2 --query 2 --hidden 8 --eval-every 1000 --val-tasks 2"
OM="$OM --eval-tasks 2 --cache-dir $W/cache"
for m in maml fomaml imaml reptile metasgd hyperrep; do
    try om-$m python3 examples/omniglot.py --method $m $OM $D
done
for u in truncated implicit; do
    try om-hyperrep-$u python3 examples/omniglot.py --method hyperrep --ul-method $u $OM $D
done
try om-hyperrep-bda python3 examples/omniglot.py --method hyperrep --ll bda $OM $D
echo "examples on $DEVICE: $ok ran, $bad failed"
[ "$bad" = 0 ]
