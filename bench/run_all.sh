#!/usr/bin/env bash
# Every benchmark at the issue's GPU sizes, one JSON (and log) each into the folder $1, each under its own time limit
# so that one slow compile cannot cost the others. SMALL=1 runs the CPU smoke sizes instead.
#   bash bench/run_all.sh bench/out        (the digits accuracy guard needs DIGITS_WEIGHTS=<folder>, see digits_accuracy.py)
# EDM_VARIANTS and TRAIN_VARIANTS pick edm_sampling.py's and discriminator_training.py's variants (defaults authors,fast
# and plain,fast); *_LIMIT the time limits (0 skips that one; RECIPE_LIMIT is 0 unless set);
# DIGITS_ARGS adds arguments to the accuracy guard (e.g. --attention flash).
set -u
out=$(realpath -m "${1:-bench/out}")
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python=${PYTHON:-python3}

run() {  # name, time limit in seconds (0: skip it), script and its arguments
    local name=$1 limit=$2
    shift 2
    [ "$limit" -gt 0 ] || return 0
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$python" "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
    echo "exit $?"
    grep -E '^(authors|fp32|fast|plain|[0-9]+) ' "$out/$name.log" | cut -c1-600
    grep -E 'Error|error:' "$out/$name.log" | tail -n 3
}

if [ "${SMALL:-0}" = 1 ]; then
    run edm_sampling 600 edm_sampling.py --small --batch 4 --steps 3 --repeats 1 --variants authors,fast_nocl --components
    run discriminator_training 600 discriminator_training.py --small --batches 8 --steps 2 --warmup 2 --num-workers 0 \
        --trainer-batches 8
    run dit_sampling 600 dit_sampling.py --small --batch 2 --steps 2
    run recipe 600 recipe.py --small
    [ -n "${DIGITS_WEIGHTS:-}" ] && run digits_accuracy 600 digits_accuracy.py --weights "$DIGITS_WEIGHTS" --seeds 0 --num-samples 32 ${DIGITS_ARGS:-}
else
    # The accuracy guard times nothing and its 8x8 networks barely load the GPU: it runs beside the timed benchmarks.
    [ -n "${DIGITS_WEIGHTS:-}" ] && run digits_accuracy "${DIGITS_LIMIT:-240}" digits_accuracy.py --weights "$DIGITS_WEIGHTS" ${DIGITS_ARGS:-} &
    run edm_sampling "${EDM_LIMIT:-300}" edm_sampling.py --batch 512 --repeats 1 --variants "${EDM_VARIANTS:-authors,fast}" \
        --components --profile
    run discriminator_training "${TRAIN_LIMIT:-150}" discriminator_training.py --batches 128,512 --steps 50 --profile \
        --variants "${TRAIN_VARIANTS:-plain,fast}"
    run dit_sampling "${DIT_LIMIT:-150}" dit_sampling.py --batch 64 --steps 10
    run recipe "${RECIPE_LIMIT:-0}" recipe.py   # the whole EDM-G++ recipe through run.py: about 5 min, a call of its own
    wait
fi
exit 0
